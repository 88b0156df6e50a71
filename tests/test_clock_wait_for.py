"""`LiveClock.wait_for`: every network call and every exchange call of the program goes through it, so
it must be exactly `await aw` with a deadline. It runs a coroutine's first step before arming any
timer (an answer that needs no await, as paper gives, then costs no timeout scope); these tests hold it
to the semantics of `asyncio.timeout` around `await` in every other respect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from core.clock import LiveClock
from core.coroutines import CarryOn, first_step, is_unstarted

BOUND = 5.0  # seconds: no test here may hang longer (those counting scopes are bounded by wait_for itself)


@pytest.fixture
def scopes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The deadlines of the timeout scopes (`asyncio.timeout`, `asyncio.timeout_at`) opened meanwhile."""
    opened: list[float] = []
    real = asyncio.timeouts.Timeout.__init__

    def counting(self: asyncio.timeouts.Timeout, when: float | None, *rest: Any) -> None:
        opened.append(when if when is not None else float("inf"))
        real(self, when, *rest)

    monkeypatch.setattr(asyncio.timeouts.Timeout, "__init__", counting)
    yield opened


async def test_an_answer_that_needs_no_await_comes_back_without_a_timer(scopes: list[float]) -> None:
    async def answer() -> str:
        return "filled"

    assert await LiveClock().wait_for(answer(), 1.0) == "filled"
    assert scopes == []


async def test_an_error_before_any_await_is_raised_as_from_await(scopes: list[float]) -> None:
    class Refused(Exception):
        pass

    async def refuse() -> str:
        raise Refused("insufficient funds")

    with pytest.raises(Refused, match="insufficient funds"):
        await LiveClock().wait_for(refuse(), 1.0)
    assert scopes == []


async def test_a_call_that_awaits_is_answered_within_its_deadline(scopes: list[float]) -> None:
    async def slow() -> int:
        await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        return 7

    loop = asyncio.get_running_loop()
    before = loop.time()
    assert await LiveClock().wait_for(slow(), 2.0) == 7
    assert len(scopes) == 1 and before + 2.0 <= scopes[0] <= loop.time() + 2.0


async def test_a_call_that_hangs_times_out_and_is_cancelled_inside(scopes: list[float]) -> None:
    cleaned: list[str] = []
    never = asyncio.Event()

    async def hangs() -> None:
        try:
            await never.wait()
        finally:
            cleaned.append("finally ran")

    with pytest.raises(TimeoutError):
        await LiveClock().wait_for(hangs(), 0.05)
    assert cleaned == ["finally ran"]
    assert len(scopes) == 1


async def test_the_deadline_counts_from_the_call_not_from_the_first_await() -> None:
    """A first step that takes long (CPU work before the first await) uses up the timeout too."""

    async def busy_then_hangs() -> None:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # bounded: 0.3 s of work
            pass
        await asyncio.Event().wait()

    started = time.perf_counter()
    async with asyncio.timeout(BOUND):
        with pytest.raises(TimeoutError):
            await LiveClock().wait_for(busy_then_hangs(), 0.2)
    # From the call: timed out right after the 0.3 s step. From the first await it would be 0.5 s.
    assert time.perf_counter() - started < 0.45


async def test_cancelling_the_caller_cancels_the_call_and_is_not_a_timeout() -> None:
    cleaned: list[str] = []
    entered = asyncio.Event()

    async def hangs() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally ran")

    async def caller() -> None:
        await LiveClock().wait_for(hangs(), 60.0)

    async with asyncio.timeout(BOUND):
        task = asyncio.create_task(caller())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cleaned == ["finally ran"]
    assert task.cancelled()


async def test_a_call_that_handles_the_timeout_itself_behaves_as_under_asyncio_timeout() -> None:
    """The scope's cancellation reaches the call; a call that swallows it and returns gives its answer
    to the caller, exactly as `async with asyncio.timeout(): await call()` does (the reference)."""

    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "late answer"
        return "unreachable"

    async def reference() -> str:
        async with asyncio.timeout(0.02):
            return await stubborn()

    async with asyncio.timeout(BOUND):
        assert await reference() == "late answer"
        assert await LiveClock().wait_for(stubborn(), 0.02) == "late answer"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_futures_and_tasks_still_time_out(scopes: list[float]) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await LiveClock().wait_for(loop.create_future(), 0.02)
    done: asyncio.Future[int] = loop.create_future()
    done.set_result(3)
    assert await LiveClock().wait_for(done, 1.0) == 3
    task = asyncio.create_task(asyncio.sleep(0.01, result="slept"))
    assert await LiveClock().wait_for(task, 1.0) == "slept"
    assert len(scopes) == 3


async def test_the_first_step_runs_in_the_callers_task() -> None:
    seen: list[asyncio.Task[Any] | None] = []

    async def where() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    async with asyncio.timeout(BOUND):
        await LiveClock().wait_for(where(), 1.0)
    assert seen == [asyncio.current_task()] * 2


async def test_only_unstarted_native_coroutines_are_stepped_by_hand() -> None:
    async def two_steps() -> int:
        await asyncio.sleep(0)
        return 2

    fresh = two_steps()
    assert is_unstarted(fresh)
    rest = first_step(fresh)
    assert isinstance(rest, CarryOn)
    assert not is_unstarted(fresh)  # suspended now: stepping it again would resume it out of turn
    assert not is_unstarted(rest)
    assert not is_unstarted(asyncio.get_running_loop().create_future())
    async with asyncio.timeout(BOUND):
        assert await rest == 2
    assert not is_unstarted(fresh)  # finished


async def test_a_first_step_that_cancels_its_own_caller_ends_in_cancellation_not_timeout() -> None:
    """Compared with `asyncio.timeout` around `await`: a call whose first step cancels the task that
    made it (a shutdown path might) ends that task with CancelledError, even when the deadline passes
    too; never a TimeoutError that a caller's `except TimeoutError` would swallow."""

    def make(outcome: list[str]) -> Any:
        async def cancels_caller_then_waits() -> None:
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            end = time.perf_counter() + 0.02
            while time.perf_counter() < end:  # past the deadline before the first await
                pass
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                outcome.append("cancelled inside")
                raise
        return cancels_caller_then_waits

    async def with_reference(outcome: list[str]) -> None:
        async with asyncio.timeout(0.01):
            await make(outcome)()

    async def with_clock(outcome: list[str]) -> None:
        await LiveClock().wait_for(make(outcome)(), 0.01)

    for caller in (with_reference, with_clock):
        outcome: list[str] = []
        async with asyncio.timeout(BOUND):
            task = asyncio.create_task(caller(outcome))
            with pytest.raises(asyncio.CancelledError):
                await task
        assert task.cancelled(), caller.__name__
        assert outcome == ["cancelled inside"], caller.__name__


async def test_outside_a_task_nothing_runs_before_the_refusal() -> None:
    """As with `asyncio.timeout`: no task, no timeout scope, and the call is not started."""
    ran: list[str] = []

    async def call() -> None:
        ran.append("ran")

    loop = asyncio.get_running_loop()
    outside: asyncio.Future[BaseException | None] = loop.create_future()

    def from_a_callback() -> None:
        inner = call()
        coro = LiveClock().wait_for(inner, 1.0)
        try:
            coro.send(None)
        except BaseException as exc:  # the refusal, raised outside any task
            outside.set_result(exc)
        else:
            outside.set_result(None)
        finally:
            coro.close()
            inner.close()  # never started, as under asyncio.timeout

    loop.call_soon(from_a_callback)
    async with asyncio.timeout(BOUND):
        refusal = await outside
    assert isinstance(refusal, RuntimeError)
    assert ran == []
