"""The one clock every component takes.

Nothing else in the project reads the wall clock or sleeps directly: live code gets a `LiveClock`,
tests and backtests a `SimClock`, so a 300 s engine stall is tested in milliseconds and a backtest
runs the very strategy and risk code that trades live.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from core.coroutines import Done, first_step, is_unstarted

T = TypeVar("T")

DAY_SECONDS = 86_400.0


class Clock(Protocol):
    """Time as the program sees it: epoch seconds (UTC) and a sleep that honours the same timeline."""

    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, aw: Awaitable[T], timeout: float) -> T: ...

    def wake_after(self, waiter: asyncio.Future[None], seconds: float) -> Cancellable: ...


class Cancellable(Protocol):
    def cancel(self) -> object: ...


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def utc_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def start_of_utc_day(ts: float) -> float:
    """Midnight UTC of the day containing `ts`; the daily-loss baseline is taken there."""
    return ts - (ts % DAY_SECONDS)


class LiveClock:
    """Wall time for timestamps, the event loop's monotonic clock for intervals."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait_for(self, aw: Awaitable[T], timeout: float) -> T:
        """`aw`'s result, or TimeoutError once `timeout` seconds have passed while it was suspended.

        A coroutine is run up to its first suspension before any timer exists (as `await` would run
        it): one that answers at once, as the paper exchanges do, never needs the timeout scope, which
        costs about 3.3 us. The deadline is still counted from the call. asyncio.timeout rather than
        asyncio.wait_for, which on 3.11 wraps every call in a task of its own."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = asyncio.current_task()
        # (Outside a task, timeout_at refuses before any step; a future or a task cannot be stepped.)
        steppable = is_unstarted(aw)  # (a bool: narrowing `aw` to a bare Coroutine would lose T)
        if task is not None and steppable:
            cancels = task.cancelling()
            step = first_step(aw)
            if isinstance(step, Done):
                return step.value
            if task.cancelling() != cancels:
                # The first step asked to cancel this very task: the request is delivered at the first
                # suspension, just ahead. A timeout scope opened now would count it as its own and
                # could report TimeoutError for it, where the scope the old way was opened before.
                return await step
            aw = step
        async with asyncio.timeout_at(deadline):
            return await aw

    def wake_after(self, waiter: asyncio.Future[None], seconds: float) -> Cancellable:
        """Resolve `waiter` (with None) once `seconds` have passed, unless it is done by then or the
        returned handle is cancelled. For a wait that ends either way (a price update or the time to
        beat): no timeout scope and no coroutine of its own between the waker and the waiting task,
        where `wait_for` has both; a cancelled task just stops waiting."""
        return asyncio.get_running_loop().call_later(max(0.0, seconds), _wake, waiter)


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until the loop is quiet (bounded), without moving any clock."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class _NoTimer:
    """SimClock's handle: `advance` skips a waiter that is done, so there is nothing to cancel."""

    def cancel(self) -> None:
        return None


class SimClock:
    """A clock that only moves when told to.

    `advance()` walks through pending sleeps in deadline order and lets the woken tasks run at each
    step, so code under test sees exactly the sequence of times it would see live.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def pending_sleeps(self) -> int:
        return sum(1 for _, _, f in self._heap if not f.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._now + seconds, next(self._seq), fut))
        await fut

    async def wait_for(self, aw: Awaitable[T], timeout: float) -> T:
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self.sleep(timeout))
        try:
            done, _ = await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            timer.cancel()
            raise
        timer.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait({task})
        raise TimeoutError(f"timed out after {timeout} simulated seconds")

    def wake_after(self, waiter: asyncio.Future[None], seconds: float) -> Cancellable:
        """As LiveClock.wake_after, on this clock's timeline: `waiter` joins the sleepers `advance`
        wakes (one done by then is passed over)."""
        heapq.heappush(self._heap, (self._now + max(0.0, seconds), next(self._seq), waiter))
        return _NoTimer()

    async def advance(self, seconds: float, settle_rounds: int = 20) -> None:
        """Move time forward by `seconds`, waking sleepers in order and letting them run."""
        target = self._now + seconds
        await settle(settle_rounds)
        while self._heap and self._heap[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._heap)
            if fut.done():
                continue
            self._now = max(self._now, deadline)
            fut.set_result(None)
            await settle(settle_rounds)
        self._now = max(self._now, target)
        await settle(settle_rounds)

    def set(self, ts: float) -> None:
        """Jump without waking anyone (for setting up a scenario, e.g. a new UTC day)."""
        self._now = ts
