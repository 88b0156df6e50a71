"""The feed's version counter: waiters wake on a newer version, and listeners (the paper exchanges'
order matching) run inside the update, before any waiter sees it."""

from __future__ import annotations

import asyncio
import math

import pytest

from core.clock import SimClock, settle
from core.clock import _wake as clock_wake
from exchange.feed_signal import UpdateSignal


async def test_listeners_run_in_order_before_any_waiter_wakes() -> None:
    signal = UpdateSignal(SimClock())
    calls: list[str] = []
    seen_by_waiter: list[list[str]] = []

    async def waiter() -> None:
        await signal.wait(0, 10)
        seen_by_waiter.append(list(calls))

    task = asyncio.ensure_future(waiter())
    await settle()
    signal.add_listener(lambda: calls.append("first"))
    signal.add_listener(lambda: calls.append("second"))
    assert signal.bump() == 1
    assert calls == ["first", "second"]  # synchronously, inside bump()
    await settle()
    assert task.done() and seen_by_waiter == [["first", "second"]]


async def test_a_removed_listener_is_not_called_and_wake_calls_none() -> None:
    signal = UpdateSignal(SimClock())
    calls: list[int] = []
    remove = signal.add_listener(lambda: calls.append(signal.version))
    signal.bump()
    signal.wake()  # no new version: nothing new to settle
    remove()
    remove()  # twice is harmless
    signal.bump()
    assert calls == [1]


async def test_a_failing_listener_propagates_but_waiters_still_wake() -> None:
    signal = UpdateSignal(SimClock())
    woke: list[int] = []

    async def waiter() -> None:
        woke.append(await signal.wait(0, 10))

    task = asyncio.ensure_future(waiter())
    await settle()

    def boom() -> None:
        raise RuntimeError("matching bug")

    signal.add_listener(boom)
    with pytest.raises(RuntimeError, match="matching bug"):
        signal.bump()
    await settle()
    assert task.done() and woke == [1]


async def test_a_listener_may_not_bump_the_signal_it_listens_to() -> None:
    signal = UpdateSignal(SimClock())
    signal.add_listener(signal.bump)
    with pytest.raises(RuntimeError, match="inside one of its listeners"):
        signal.bump()
    assert signal.version == 1  # the outer bump stands; no nested one happened


async def test_task_failure_names_only_an_error_that_ended_the_task() -> None:
    from exchange.feed_signal import task_failure

    async def dies() -> None:
        raise RuntimeError("feed broke")

    async def ends() -> None:
        return None

    async def waits() -> None:
        await asyncio.sleep(10)

    died, ended, running = (asyncio.ensure_future(c) for c in (dies(), ends(), waits()))
    await settle()
    assert task_failure(None) is None
    assert isinstance(task_failure(died), RuntimeError)
    assert task_failure(ended) is None and task_failure(running) is None
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert task_failure(running) is None


@pytest.mark.parametrize("live", [False, True], ids=["sim-clock", "live-clock"])
async def test_every_waiter_wakes_once_per_bump_and_a_timeout_touches_only_its_own(live: bool) -> None:
    """Two engines wait on one feed: a bump wakes both with the new version; one's timeout, or its
    cancellation, neither wakes nor cancels the other; nothing is left registered afterwards."""
    from core.clock import LiveClock

    clock = LiveClock() if live else SimClock()
    signal = UpdateSignal(clock)
    async with asyncio.timeout(5):
        first = asyncio.ensure_future(signal.wait(0, 60))
        second = asyncio.ensure_future(signal.wait(0, 60))
        await settle()
        assert signal.bump() == 1
        assert await first == 1 and await second == 1

        patient = asyncio.ensure_future(signal.wait(1, 60))
        hasty = asyncio.ensure_future(signal.wait(1, 0.02))
        doomed = asyncio.ensure_future(signal.wait(1, 60))
        await settle()
        if live:
            assert await hasty == 1  # timed out: the version it had
        else:
            await clock.advance(0.05)  # type: ignore[union-attr]
            assert hasty.done() and hasty.result() == 1
        doomed.cancel()
        await settle()
        assert doomed.cancelled() and not patient.done()
        signal.bump()
        assert await patient == 2
        assert await signal.wait(0, 60) == 2  # already past: no wait at all
        late = asyncio.ensure_future(signal.wait(2, 60))
        await settle()
        signal.wake()  # no new version, but waiters are released (a replay ran out)
        assert await late == 2
    assert signal._waiters == set()
    if live:  # every wait's timer went with it: none left to fire 60 s from now
        timers = [h for h in asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
                  if not h.cancelled() and getattr(h, "_callback", None) is clock_wake]
        assert timers == []


@pytest.mark.parametrize("live", [False, True], ids=["sim-clock", "live-clock"])
async def test_a_nan_timeout_is_refused_not_spun_on(live: bool) -> None:
    """A NaN deadline never comes due and never passes: a timer set for it fires at once, again and
    again (a busy loop on a live clock, an `advance` that never returns on a simulated one). Refused."""
    from core.clock import LiveClock

    signal = UpdateSignal(LiveClock() if live else SimClock())
    with pytest.raises(ValueError, match="NaN"):
        await asyncio.wait_for(signal.wait(0, math.nan), 2.0)
    assert signal._waiters == set()
