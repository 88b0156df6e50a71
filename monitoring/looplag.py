"""A watchdog thread that notices when the event loop stops turning, and says where it is stuck.

A blocked loop cannot report on itself: the supervisor, the heartbeats and systemd's WATCHDOG=1 all
stop at once, and systemd eventually kills the process without a word about why. This thread runs
outside the loop, posts a no-op callback into it and times how long the loop takes to run it. Past the
threshold it logs, once per episode, the stack of the loop's thread — the blocking call itself — so the
journal shows the culprit before the watchdog restart, and logs the recovery when the loop turns again.

It measures real elapsed time by nature (a simulated clock does not move while the loop is blocked),
so it takes a `LiveClock`, never any `Clock`, reads its `monotonic()` from its own thread, waits with
threading.Event.wait(), and never touches the loop's own clock.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback

import structlog

from core.clock import LiveClock

log = structlog.get_logger("looplag")


class LoopLagMonitor:
    """Measures event-loop latency from a daemon thread; `start()` / `stop()` from the loop's owner."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, threshold_seconds: float, check_seconds: float,
        clock: LiveClock | None = None,
    ) -> None:
        if threshold_seconds <= 0 or check_seconds <= 0:
            raise ValueError("threshold_seconds and check_seconds must be positive")
        self._clock = clock if clock is not None else LiveClock()
        self._loop = loop
        self._threshold = threshold_seconds
        self._check = check_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread_id: int | None = None
        self.last_lag = 0.0
        self.max_lag = 0.0
        self.episodes = 0
        self.stalled = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        try:
            if asyncio.get_running_loop() is self._loop:
                self._loop_thread_id = threading.get_ident()
        except RuntimeError:
            pass  # started from outside the loop: the first callback that runs tells us its thread
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="looplag", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and wait for it (bounded: the thread is a daemon and cannot keep us up)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            turned = threading.Event()
            posted = self._clock.monotonic()
            try:
                self._loop.call_soon_threadsafe(self._mark, turned)
            except RuntimeError:
                return  # the loop is closed: nothing left to watch
            if not turned.wait(self._threshold):
                self._stalled(posted)
                while not turned.wait(min(self._check, self._threshold)):
                    if self._stop.is_set():
                        return
            lag = self._clock.monotonic() - posted
            self.last_lag = lag
            self.max_lag = max(self.max_lag, lag)
            if self.stalled:
                self.stalled = False
                log.warning("event loop turning again", blocked_seconds=round(lag, 3), episodes=self.episodes)
            self._stop.wait(self._check)

    def _mark(self, turned: threading.Event) -> None:
        self._loop_thread_id = threading.get_ident()
        turned.set()

    def _stalled(self, posted: float) -> None:
        self.stalled = True
        self.episodes += 1
        stack, where = self._loop_stack()
        log.error(
            "event loop blocked",
            blocked_seconds=round(self._clock.monotonic() - posted, 3),
            threshold_seconds=self._threshold,
            blocked_in=where,
            stack=stack,
        )

    def _loop_stack(self) -> tuple[str, str]:
        """The loop thread's current stack, innermost frame last, and a one-line 'where'."""
        ident = self._loop_thread_id if self._loop_thread_id is not None else threading.main_thread().ident
        frame = sys._current_frames().get(ident) if ident is not None else None
        if frame is None:
            return "(loop thread not found)", "unknown"
        summary = traceback.extract_stack(frame)
        last = summary[-1]
        return "".join(summary.format()), f"{last.name} ({last.filename}:{last.lineno})"
