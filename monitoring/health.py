"""Engine liveness (heartbeats and verdicts) and the restart policy the supervisor applies to them.

Both are passive: they answer questions, the Orchestrator's supervisor loop acts. Heartbeat ages are
measured on the clock's monotonic time, so a wall-clock jump (NTP, DST, a VM resuming) can neither
fake a stall nor hide one.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum

from core.clock import Clock
from core.values import value_type


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    RESTART = "restart"


class HealthMonitor:
    def __init__(self, clock: Clock, warning_seconds: float, restart_seconds: float) -> None:
        if not 0 < warning_seconds < restart_seconds:
            raise ValueError(
                f"need 0 < warning_seconds ({warning_seconds}) < restart_seconds ({restart_seconds})"
            )
        self._clock = clock
        self.warning_seconds = warning_seconds
        self.restart_seconds = restart_seconds
        self._beats: dict[str, float] = {}

    def register(self, engine: str) -> None:
        """Start watching `engine`; registering counts as a beat, so a fresh engine is not stale."""
        self._beats[engine] = self._clock.monotonic()

    def unregister(self, engine: str) -> None:
        self._beats.pop(engine, None)

    def heartbeat(self, engine: str) -> None:
        """Called every loop iteration, so it is one dict store.

        Beats from an engine that is not registered are ignored: a cancelled engine still unwinding
        after the supervisor dropped it must not make itself look alive again.
        """
        if engine in self._beats:
            self._beats[engine] = self._clock.monotonic()

    def age(self, engine: str) -> float | None:
        """Seconds since the last beat, or None when the engine is not watched."""
        last = self._beats.get(engine)
        if last is None:
            return None
        return max(0.0, self._clock.monotonic() - last)

    def verdict(self, engine: str) -> Verdict:
        """WARN at age >= warning_seconds, RESTART at age >= restart_seconds.

        Raises KeyError for an engine that is not registered: asking about an unwatched engine is a
        supervisor bug, and answering OK would hide it.
        """
        age = self.age(engine)
        if age is None:
            raise KeyError(engine)
        if age >= self.restart_seconds:
            return Verdict.RESTART
        if age >= self.warning_seconds:
            return Verdict.WARN
        return Verdict.OK

    def engines(self) -> list[str]:
        """Watched engines, in registration order."""
        return list(self._beats)


@value_type
class RestartDecision:
    """`attempt` is the number of restarts inside the window including this one; `backoff` is how
    long to wait before starting the engine again (0 when not allowed: it will not be started)."""

    allowed: bool
    attempt: int
    backoff: float


class RestartPolicy:
    """Restart intensity like an OTP supervisor: more than `max_restarts` within `window_seconds`
    and the engine is FAILED. Backoff is base * 2**(n-1), capped at backoff_max, where n counts the
    restarts inside the window, so an engine that crashed once a day ago starts again quickly.

    FAILED is sticky until `reset()`: an engine that failed stays stopped until a person restarts it,
    even after the window has slid past its crashes.
    """

    def __init__(
        self, max_restarts: int, window_seconds: float, backoff_base: float, backoff_max: float
    ) -> None:
        if max_restarts < 0 or window_seconds <= 0 or backoff_base < 0 or backoff_max < backoff_base:
            raise ValueError(
                "need max_restarts >= 0, window_seconds > 0 and 0 <= backoff_base <= backoff_max"
            )
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._recent: dict[str, deque[float]] = {}
        self._total: dict[str, int] = {}
        self._failed: set[str] = set()

    def on_restart(self, engine: str, now: float) -> RestartDecision:
        """Record that `engine` needs a restart at `now` (seconds, any one timeline) and say if it gets one."""
        recent = self._recent.setdefault(engine, deque())
        horizon = now - self.window_seconds
        while recent and recent[0] <= horizon:
            recent.popleft()
        recent.append(now)
        n = len(recent)
        if engine in self._failed or n > self.max_restarts:
            self._failed.add(engine)
            return RestartDecision(False, n, 0.0)
        self._total[engine] = self._total.get(engine, 0) + 1
        exponent = n - 1
        # 2.0 ** 1024 raises OverflowError; long before that the cap has won anyway.
        backoff = self.backoff_max if exponent >= 1024 else min(self.backoff_base * 2.0**exponent,
                                                                 self.backoff_max)
        return RestartDecision(True, n, backoff)

    def restarts(self, engine: str) -> int:
        """Restarts actually granted to `engine` since start (or the last reset)."""
        return self._total.get(engine, 0)

    def failed(self, engine: str) -> bool:
        return engine in self._failed

    def reset(self, engine: str) -> None:
        """Forget `engine`'s history, e.g. after a person restarts a FAILED engine."""
        self._recent.pop(engine, None)
        self._total.pop(engine, None)
        self._failed.discard(engine)
