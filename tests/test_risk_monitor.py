"""The global circuit breaker: daily loss, drawdown, cooldown, UTC day roll, kill switch, persistence."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import Settings
from core.clock import DAY_SECONDS, start_of_utc_day
from core.types import TradingState
from risk.monitor import GlobalRiskMonitor, RiskLimits, RiskState, Transition

D = Decimal
ACTIVE, REDUCING, HALTED = TradingState.ACTIVE, TradingState.REDUCING, TradingState.HALTED

MIDNIGHT = start_of_utc_day(1_700_000_000.0)  # 2023-11-14 00:00:00 UTC
NOON = MIDNIGHT + 12 * 3600
HOUR = 3600.0


def limits(**kw: object) -> RiskLimits:
    base: dict[str, object] = dict(
        max_daily_loss_pct=D(5),
        max_drawdown_pct=D(15),
        cooldown_seconds=HOUR,
        kill_switch_loss_pct=D(25),
        flatten_on_trip=False,
    )
    base.update(kw)
    return RiskLimits(**base)  # type: ignore[arg-type]


def eq(total: str | Decimal) -> dict[str, Decimal]:
    """Both engines' equity, all of it in spot (the breaker judges the sum)."""
    return {"spot": D(total), "futures": D(0)}


def started(lim: RiskLimits | None = None, equity: str = "10000", at: float = NOON) -> GlobalRiskMonitor:
    m = GlobalRiskMonitor(lim or limits())
    assert m.update(at, eq(equity)) == []
    return m


# --- first update and the daily-loss limit -------------------------------------------------------
def test_first_update_sets_every_baseline_from_the_summed_equity() -> None:
    m = GlobalRiskMonitor(limits())
    assert m.state.initial_equity is None
    assert m.update(NOON, {"spot": D("6000.50"), "futures": D("3999.50")}) == []
    s = m.state
    assert (s.initial_equity, s.day_start_equity, s.peak_equity) == (D(10000), D(10000), D(10000))
    assert s.day_start == MIDNIGHT
    assert m.trading_state is ACTIVE


def test_daily_loss_trips_at_the_threshold_not_a_cent_before() -> None:
    m = started()
    assert m.update(NOON + 60, eq("9500.01")) == []
    assert m.trading_state is ACTIVE
    [t] = m.update(NOON + 120, {"spot": D("9499.99"), "futures": D("0.01")})  # the sum counts
    assert (t.old, t.new, t.until, t.flatten) == (ACTIVE, REDUCING, NOON + 120 + HOUR, False)
    assert "daily loss" in t.reason and "5.00%" in t.reason
    assert m.state.trip == "daily_loss"


@given(
    start_cents=st.integers(min_value=100, max_value=10**11),
    limit=st.decimals(min_value=D("0.01"), max_value=D("99.99"), places=2),
)
@settings(max_examples=150, deadline=None)
def test_any_daily_limit_trips_exactly_at_its_threshold(start_cents: int, limit: Decimal) -> None:
    start = D(start_cents) / 100
    loss = start * limit / 100  # exact: Decimal division by 100 only moves the point
    lim = limits(max_daily_loss_pct=limit, max_drawdown_pct=D(100), kill_switch_loss_pct=D(100))
    m = GlobalRiskMonitor(lim)
    m.update(NOON, eq(start))
    assert m.update(NOON + 1, eq(start - loss + D("0.01"))) == []
    transitions = m.update(NOON + 2, eq(start - loss))
    assert [t.new for t in transitions] == [REDUCING]


def test_flatten_on_trip_is_passed_on() -> None:
    m = started(limits(flatten_on_trip=True))
    [t] = m.update(NOON + 1, eq("9000"))
    assert t.new is REDUCING and t.flatten is True


# --- drawdown ------------------------------------------------------------------------------------
def test_drawdown_from_peak_trips_at_the_threshold_not_a_cent_before() -> None:
    m = started()
    m.update(NOON + 1, eq("12000"))  # new peak; the day is up 20 %
    assert m.state.peak_equity == D(12000)
    assert m.update(NOON + 2, eq("10200.01")) == []
    [t] = m.update(NOON + 3, eq("10200"))  # 15 % below the peak, still 2 % above the day's start
    assert (t.old, t.new) == (ACTIVE, REDUCING)
    assert "drawdown" in t.reason
    assert m.drawdown_pct(D(10200)) == D(15)


def test_drawdown_cooldown_is_honoured_then_peak_is_rebased() -> None:
    m = started()
    m.update(NOON + 1, eq("12000"))
    [t] = m.update(NOON + 2, eq("10000"))
    assert t.until == NOON + 2 + HOUR
    # Still inside the cooldown: nothing changes, however good the equity looks.
    assert m.update(NOON + 2 + HOUR - 0.001, eq("10100")) == []
    assert m.trading_state is REDUCING
    [back] = m.update(NOON + 2 + HOUR, eq("10100"))
    assert (back.old, back.new, back.until) == (REDUCING, ACTIVE, None)
    assert m.state.peak_equity == D(10100)
    # Re-based: the same equity does not trip again.
    assert m.update(NOON + 3 + HOUR, eq("10100")) == []
    assert m.trading_state is ACTIVE


# --- cooldown of a daily-loss trip and the UTC day roll ------------------------------------------
def test_daily_trip_stays_reducing_while_the_same_day_loss_persists() -> None:
    m = started()
    m.update(NOON + 1, eq("9400"))
    [ext] = m.update(NOON + 1 + HOUR, eq("9450"))  # cooldown over, day still down 5.5 %
    assert (ext.old, ext.new) == (REDUCING, REDUCING)
    assert ext.until == NOON + 1 + 2 * HOUR
    assert ext.flatten is False
    assert m.trading_state is REDUCING
    [back] = m.update(NOON + 1 + 2 * HOUR, eq("9600"))  # recovered to -4 %
    assert back.new is ACTIVE


def test_daily_trip_ends_after_the_cooldown_once_a_new_utc_day_begins() -> None:
    lim = limits(cooldown_seconds=2 * HOUR)
    m = started(lim, at=MIDNIGHT + DAY_SECONDS - HOUR)  # 23:00
    m.update(MIDNIGHT + DAY_SECONDS - HOUR + 1, eq("9000"))
    assert m.trading_state is REDUCING
    [back] = m.update(MIDNIGHT + DAY_SECONDS + HOUR + 1, eq("9000"))  # 01:00:01 the next day
    assert back.new is ACTIVE
    assert m.state.day_start == MIDNIGHT + DAY_SECONDS
    assert m.state.day_start_equity == D(9000)


def test_day_baseline_rolls_exactly_at_utc_midnight() -> None:
    m = started()
    tomorrow = MIDNIGHT + DAY_SECONDS
    assert m.update(tomorrow - 0.001, eq("9550")) == []  # -4.5 % on the day
    assert m.state.day_start_equity == D(10000)
    assert m.update(tomorrow, eq("9550")) == []
    assert m.state.day_start == tomorrow
    assert m.state.day_start_equity == D(9550)
    # -4.71 % of today's baseline (but -9 % of yesterday's): no trip.
    assert m.update(tomorrow + 60, eq("9100")) == []
    assert m.daily_pnl(D(9100)) == D(-450)
    # 5 % of 9550 is 477.50.
    assert m.update(tomorrow + 61, eq("9072.51")) == []
    assert [t.new for t in m.update(tomorrow + 62, eq("9072.50"))] == [REDUCING]


def test_loss_just_before_midnight_still_counts_against_that_day() -> None:
    m = started()
    [t] = m.update(MIDNIGHT + DAY_SECONDS - 0.001, eq("9500"))
    assert t.new is REDUCING


# --- kill switch ---------------------------------------------------------------------------------
def test_kill_switch_halts_from_total_loss_and_always_flattens() -> None:
    m = started(limits(max_drawdown_pct=D(50)))
    equity = D(10000)
    day = MIDNIGHT
    # Lose 4 % a day: never a daily trip, but the total adds up.
    for _ in range(10):
        day += DAY_SECONDS
        m.update(day, eq(equity))
        equity = equity * D("0.96")
        transitions = m.update(day + 60, eq(equity))
        if transitions:
            break
    [t] = transitions
    assert (t.new, t.flatten, t.until) == (HALTED, True, None)
    assert "kill switch" in t.reason
    assert equity <= D(7500) < equity / D("0.96")


def test_kill_switch_trips_at_its_threshold_even_while_reducing() -> None:
    m = started()
    m.update(NOON + 1, eq("9000"))
    assert m.trading_state is REDUCING
    assert m.update(NOON + 2, eq("7500.01")) == []
    [t] = m.update(NOON + 3, eq("7500"))
    assert (t.old, t.new, t.flatten) == (REDUCING, HALTED, True)


def test_halted_never_ends_by_itself() -> None:
    m = started()
    m.update(NOON + 1, eq("7000"))
    assert m.trading_state is HALTED
    # Neither further losses (which would trip every other limit) nor a full recovery change it.
    for i, equity in enumerate(["6000", "5000", "20000", "20000", "12000"], start=1):
        assert m.update(NOON + i * DAY_SECONDS, eq(equity)) == []
        assert m.update(NOON + i * DAY_SECONDS + 1, eq(D(equity) / 2)) == []
    assert m.trading_state is HALTED


# --- commands ------------------------------------------------------------------------------------
def test_kill_halts_and_flattens_and_resume_does_not_retrip() -> None:
    m = started()
    t = m.kill(NOON + 5, "/kill by 42")
    assert t == Transition(ACTIVE, HALTED, "/kill by 42", None, True)
    assert m.update(NOON + 6, eq("10000")) == []
    assert m.trading_state is HALTED
    assert m.reset_breaker(NOON + 7, D(10000)) is None  # a halt needs resume
    back = m.resume(NOON + 8, D("7000"))
    assert back is not None and (back.old, back.new) == (HALTED, ACTIVE)
    # The losses that led here were accepted: the same equity trips nothing.
    assert m.update(NOON + 9, eq("7000")) == []
    assert m.trading_state is ACTIVE
    assert m.resume(NOON + 10, D(7000)) is None


def test_reset_breaker_rebases_so_it_does_not_retrip_at_once() -> None:
    m = started()
    m.update(NOON + 1, eq("9400"))
    back = m.reset_breaker(NOON + 2, D(9400))
    assert back is not None and (back.old, back.new, back.until) == (REDUCING, ACTIVE, None)
    assert m.update(NOON + 3, eq("9400")) == []
    assert m.state.day_start_equity == D(9400)
    assert m.reset_breaker(NOON + 4, D(9400)) is None
    # The kill switch still counts from the first equity: 25 % of 10000.
    assert [t.new for t in m.update(NOON + 5, eq("7500"))] == [HALTED]


# --- persistence and settings --------------------------------------------------------------------
def test_state_survives_a_json_round_trip_and_a_restart_keeps_the_trip() -> None:
    m = started()
    m.update(NOON + 1, eq("12000"))
    m.update(NOON + 2, eq("9400.123456789"))
    snapshot = json.loads(json.dumps(m.state.to_dict()))
    assert snapshot["peak_equity"] == "12000"
    assert snapshot["trading_state"] == "reducing"
    restored = RiskState.from_dict(snapshot)
    assert restored == m.state
    again = GlobalRiskMonitor(limits(), restored)
    assert again.trading_state is REDUCING
    assert again.update(NOON + 3, eq("9999")) == []  # the cooldown goes on across the restart
    assert again.state.day_start_equity == D(10000)  # and the day's baseline is not forgotten


def test_state_property_is_a_copy() -> None:
    m = started()
    s = m.state
    s.trading_state = HALTED
    assert m.trading_state is ACTIVE


def test_limits_from_settings() -> None:
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        global_max_daily_loss_pct=3.5,
        global_max_drawdown_pct=12.0,
        global_circuit_breaker_cooldown_minutes=30.0,
        global_kill_switch_loss_pct=20.0,
        global_flatten_on_trip=True,
    )
    assert RiskLimits.from_settings(s) == RiskLimits(D("3.5"), D("12.0"), 1800.0, D("20.0"), True)


def test_pnl_helpers() -> None:
    m = started()
    assert m.daily_pnl(D(9800)) == D(-200)
    assert m.daily_pnl_pct(D(9800)) == D(-2)
    assert m.drawdown_pct(D(10500)) == 0
    assert GlobalRiskMonitor(limits()).daily_pnl_pct(D(5)) == 0


def test_no_equity_reported_decides_nothing_and_non_finite_is_refused() -> None:
    m = GlobalRiskMonitor(limits())
    assert m.update(NOON, {}) == []
    assert m.state.initial_equity is None
    with pytest.raises(ValueError):
        m.update(NOON, {"spot": D("NaN")})


# --- property: the breaker trips at the first breach, never before -------------------------------
@given(steps=st.lists(st.integers(min_value=-400, max_value=400), min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_first_trip_is_exactly_the_first_breach(steps: list[int]) -> None:
    lim = limits(max_daily_loss_pct=D(5), max_drawdown_pct=D(8), kill_switch_loss_pct=D(50),
                 cooldown_seconds=DAY_SECONDS)
    m = started(lim)
    start = equity = peak = D(10000)
    expected_trip = None
    for i, step in enumerate(steps):
        equity += step
        peak = max(peak, equity)
        breached = (start - equity) * 20 >= start or (peak - equity) * 100 >= 8 * peak
        transitions = m.update(NOON + 1 + i, eq(equity))
        if expected_trip is None and breached:
            expected_trip = i
            assert [t.new for t in transitions] == [REDUCING]
        elif expected_trip is None:
            assert transitions == [] and m.trading_state is ACTIVE
        else:
            assert transitions == [] and m.trading_state is REDUCING
