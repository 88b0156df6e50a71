"""Heartbeat verdicts at their exact boundaries, and the supervisor's restart intensity and backoff."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from monitoring.health import HealthMonitor, RestartDecision, RestartPolicy, Verdict

START = 1_700_000_000.0


def monitor() -> tuple[HealthMonitor, SimClock]:
    clock = SimClock(START)
    return HealthMonitor(clock, warning_seconds=60.0, restart_seconds=300.0), clock


# --- heartbeats ----------------------------------------------------------------------------------
def test_verdicts_at_the_exact_boundaries() -> None:
    h, clock = monitor()
    h.register("spot")
    assert h.age("spot") == 0.0
    assert h.verdict("spot") is Verdict.OK
    clock.set(START + 59.999)
    assert h.verdict("spot") is Verdict.OK
    clock.set(START + 60.0)
    assert h.verdict("spot") is Verdict.WARN
    clock.set(START + 299.999)
    assert h.verdict("spot") is Verdict.WARN
    clock.set(START + 300.0)
    assert h.verdict("spot") is Verdict.RESTART
    assert h.age("spot") == 300.0


async def test_a_heartbeat_makes_a_stalled_engine_ok_again() -> None:
    h, clock = monitor()
    h.register("spot")
    h.register("futures")
    await clock.advance(250)
    h.heartbeat("futures")
    await clock.advance(50)
    assert h.verdict("spot") is Verdict.RESTART
    assert h.verdict("futures") is Verdict.OK
    assert h.age("futures") == 50.0
    h.heartbeat("spot")
    assert h.verdict("spot") is Verdict.OK


async def test_an_engine_loop_that_beats_stays_ok_and_one_that_hangs_is_caught() -> None:
    h, clock = monitor()
    h.register("spot")

    async def engine(beating_iterations: int) -> None:
        for _ in range(beating_iterations):
            h.heartbeat("spot")
            await clock.sleep(5)
        await clock.sleep(10_000)  # stuck: no more beats

    task = asyncio.create_task(engine(20))  # beats at 0, 5, ..., 95
    verdicts = []
    for _ in range(20):
        await clock.advance(5)
        verdicts.append(h.verdict("spot"))
    assert set(verdicts) == {Verdict.OK}
    await clock.advance(54)  # last beat 59 s ago
    assert h.verdict("spot") is Verdict.OK
    await clock.advance(2)
    assert h.verdict("spot") is Verdict.WARN
    await clock.advance(238)  # 299 s
    assert h.verdict("spot") is Verdict.WARN
    await clock.advance(1)
    assert h.age("spot") == 300.0
    assert h.verdict("spot") is Verdict.RESTART
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_register_counts_as_a_beat_and_unregister_stops_watching() -> None:
    h, clock = monitor()
    clock.set(START + 1000)
    h.register("spot")
    assert h.verdict("spot") is Verdict.OK
    assert h.engines() == ["spot"]
    h.unregister("spot")
    assert h.engines() == []
    assert h.age("spot") is None
    h.heartbeat("spot")  # a cancelled engine still unwinding cannot revive itself
    assert h.age("spot") is None
    with pytest.raises(KeyError):
        h.verdict("spot")
    h.unregister("spot")  # harmless twice


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        HealthMonitor(SimClock(), warning_seconds=300, restart_seconds=300)
    with pytest.raises(ValueError):
        HealthMonitor(SimClock(), warning_seconds=0, restart_seconds=300)


# --- restart policy ------------------------------------------------------------------------------
def test_backoff_doubles_and_the_intensity_limit_marks_failed() -> None:
    p = RestartPolicy(max_restarts=3, window_seconds=60, backoff_base=1, backoff_max=8)
    assert p.on_restart("spot", 0) == RestartDecision(True, 1, 1.0)
    assert p.on_restart("spot", 10) == RestartDecision(True, 2, 2.0)
    assert p.on_restart("spot", 20) == RestartDecision(True, 3, 4.0)
    refused = p.on_restart("spot", 30)
    assert not refused.allowed and refused.attempt == 4
    assert p.failed("spot")
    assert p.restarts("spot") == 3
    # The other engine is not affected.
    assert p.on_restart("futures", 30).allowed
    # FAILED stays failed even once the window has slid past the crashes...
    assert not p.on_restart("spot", 10_000).allowed
    # ...until a person resets it.
    p.reset("spot")
    assert not p.failed("spot") and p.restarts("spot") == 0
    assert p.on_restart("spot", 10_001) == RestartDecision(True, 1, 1.0)


def test_backoff_is_capped() -> None:
    p = RestartPolicy(max_restarts=10, window_seconds=3600, backoff_base=1, backoff_max=5)
    assert [p.on_restart("spot", t).backoff for t in range(6)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_restarts_outside_the_window_do_not_count() -> None:
    p = RestartPolicy(max_restarts=2, window_seconds=60, backoff_base=1, backoff_max=60)
    decisions = [p.on_restart("spot", t) for t in (0, 61, 122, 183)]
    assert all(d.allowed and d.attempt == 1 and d.backoff == 1.0 for d in decisions)
    assert p.restarts("spot") == 4
    # Exactly window_seconds later the old restart has left the window.
    p2 = RestartPolicy(max_restarts=1, window_seconds=60, backoff_base=1, backoff_max=60)
    assert p2.on_restart("spot", 0).allowed
    assert not p2.on_restart("spot", 59.999).allowed
    p3 = RestartPolicy(max_restarts=1, window_seconds=60, backoff_base=1, backoff_max=60)
    assert p3.on_restart("spot", 0).allowed
    assert p3.on_restart("spot", 60).allowed


def test_zero_max_restarts_fails_on_the_first_crash() -> None:
    p = RestartPolicy(max_restarts=0, window_seconds=60, backoff_base=1, backoff_max=60)
    assert p.on_restart("spot", 0) == RestartDecision(False, 1, 0.0)


def test_huge_restart_counts_do_not_overflow_the_backoff() -> None:
    p = RestartPolicy(max_restarts=2000, window_seconds=3600, backoff_base=1, backoff_max=30)
    last = [p.on_restart("spot", 0.0) for _ in range(1100)][-1]
    assert last == RestartDecision(True, 1100, 30.0)


def test_bad_policy_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1, window_seconds=60, backoff_base=1, backoff_max=60)
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=3, window_seconds=60, backoff_base=10, backoff_max=5)


@given(
    gaps=st.lists(st.floats(min_value=0, max_value=200, allow_nan=False), min_size=1, max_size=30),
    max_restarts=st.integers(min_value=0, max_value=6),
    window=st.floats(min_value=1, max_value=600, allow_nan=False),
)
@settings(max_examples=150, deadline=None)
def test_policy_matches_the_sliding_window_model(gaps: list[float], max_restarts: int, window: float) -> None:
    p = RestartPolicy(max_restarts=max_restarts, window_seconds=window, backoff_base=0.5, backoff_max=20)
    now, times, failed, granted = 0.0, [], False, 0
    for gap in gaps:
        now += gap
        times.append(now)
        in_window = sum(1 for t in times if t > now - window)
        d = p.on_restart("spot", now)
        failed = failed or in_window > max_restarts
        assert d.allowed == (not failed)
        assert d.attempt == in_window
        if d.allowed:
            granted += 1
            assert d.backoff == min(0.5 * 2 ** (in_window - 1), 20)
    assert p.restarts("spot") == granted
    assert p.failed("spot") == failed
