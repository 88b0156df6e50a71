"""A version counter that many consumers can wait on, on the project's clock.

Engines share one feed; each remembers the last version it saw and waits for a newer one. Every
waiter has a future of its own, and a bump resolves them all, so each wakes without consuming the
notification from the others, and a waiter's timeout cancels only its own future. (A bare future
rather than an `asyncio.Event` replaced on every bump: the event's `wait()` is one more coroutine to
step on the way from a price update to the engine.)

Listeners are for the exchange side of a paper venue: they run inside `bump()`, before any waiter
wakes, as a real venue's matching engine settles resting orders on a price before its clients see
it. That also spares a task switch per price update on the way from the update to the engines
(measured about 15-25 us at the median of bench/tick_to_order_bench.py when the paper exchange was
one more waiting task).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from core.clock import Clock


class UpdateSignal:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._version = 0
        self._wakes = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._listeners: list[Callable[[], None]] = []
        self._notifying = False

    @property
    def version(self) -> int:
        return self._version

    def bump(self) -> int:
        """A new version: listeners run first, in the order they were added, then waiters wake.

        A listener must not raise (the paper exchanges hand their errors to their own task); one
        that does is a bug, raised to whoever bumped (the feed's task) after the waiters have been
        released all the same, and the listeners after it miss this version. Nor may a listener
        bump: it would run every listener again inside itself."""
        if self._notifying:
            raise RuntimeError("UpdateSignal.bump() called from inside one of its listeners")
        self._version += 1
        self._notifying = True
        try:
            for listener in tuple(self._listeners):
                listener()
        finally:
            self._notifying = False
            self._release()
        return self._version

    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` on every bump until the returned function is called."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def wake(self) -> None:
        """Release current waiters without a new version (e.g. a replay ran out of data)."""
        self._wakes += 1
        self._release()

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():  # (one whose timeout cancelled it is done already)
                waiter.set_result(None)

    async def wait(self, after: int, timeout: float) -> int:
        """The current version as soon as it is past `after`; the unchanged version on timeout or wake."""
        if math.isnan(timeout):
            # It would never pass and never come due: each timer set for it would fire at once, for ever.
            raise ValueError("UpdateSignal.wait: the timeout is NaN")
        deadline = self._clock.monotonic() + timeout
        wakes = self._wakes
        loop = asyncio.get_running_loop()
        while self._version <= after and self._wakes == wakes:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            # Woken by a bump, a wake() or the deadline, whichever comes first (the loop then tells which).
            timer = self._clock.wake_after(waiter, remaining)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiters.discard(waiter)
        return self._version


def task_failure(task: asyncio.Task[None] | None) -> BaseException | None:
    """What ended a feed's own task, if it died (`MarketFeed.failure`): None while it runs, when it
    finished or was cancelled, or before it started."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()
