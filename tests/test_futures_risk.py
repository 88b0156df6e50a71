"""The futures engine's pure risk rules: leverage tiers, position size bounds, pre-trade checks (each
blocks on its own), correlation, the exit ladder (partials once each, trailing, force-close) and the
day-loss trigger of the emergency close."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from core.types import MarketInfo, MarketType, PositionSide
from engines.futures_risk import (
    BookView,
    Closes,
    DayBaseline,
    EntryLimits,
    ExitParams,
    ExitState,
    LeveragePolicy,
    LeverageTier,
    OpenMark,
    Sizing,
    SizingParams,
    Skip,
    correlated_symbols,
    correlation,
    daily_loss_reached,
    decide_exit,
    leverage_for,
    margin_in_use,
    mark_value,
    max_margin,
    move_pct,
    partial_amounts,
    pearson,
    position_size,
    pre_trade_checks,
    stop_towards_entry,
    target_towards_entry,
    trailing_level,
)

D = Decimal
POLICY = LeveragePolicy()
EXITS = ExitParams()
BTC = MarketInfo("BTC/USDT", "BTC", "USDT", MarketType.FUTURES, amount_step=D("0.001"), price_step=D("0.1"),
                 min_amount=D("0.001"), min_notional=D("5"), max_leverage=20)


# --- leverage ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("confidence", "atr_pct", "expected"), [
    (95, 1.0, 10), (85, 1.0, 10), (84.9, 1.0, 7), (75, 1.0, 7), (70, 1.0, 5), (65, 1.0, 5),
    (64.9, 1.0, 3), (10, 1.0, 3),            # low confidence -> 3x
    (95, 3.5, 5), (80, 3.5, 3), (70, 3.5, 2), (50, 3.5, 1),  # high volatility halves (rounded down)
    (95, 3.0, 10),                            # at the threshold is not above it
    (95, float("nan"), 5),                    # an unreadable ATR counts as high volatility
])
def test_leverage_tiers(confidence: float, atr_pct: float, expected: int) -> None:
    assert leverage_for(confidence, atr_pct, POLICY) == expected


@settings(max_examples=200, deadline=None)
@given(confidence=st.floats(min_value=0, max_value=100), atr_pct=st.floats(min_value=0, max_value=20),
       max_leverage=st.integers(min_value=1, max_value=20), market_max=st.one_of(st.none(), st.integers(1, 125)))
def test_leverage_never_exceeds_the_caps_and_halving_never_raises_it(
        confidence: float, atr_pct: float, max_leverage: int, market_max: int | None) -> None:
    policy = LeveragePolicy(max_leverage=max_leverage)
    got = leverage_for(confidence, atr_pct, policy, market_max)
    assert 1 <= got <= max_leverage
    if market_max is not None:
        assert got <= market_max
    calm = leverage_for(confidence, 0.0, policy, market_max)
    if atr_pct > policy.high_volatility_atr_pct:
        assert got == max(1, calm // 2)
    else:
        assert got == calm
    assert leverage_for(min(100.0, confidence + 10), 0.0, policy, market_max) >= calm  # monotone in confidence


def test_leverage_policy_rejects_unordered_tiers() -> None:
    with pytest.raises(ValueError):
        LeveragePolicy(tiers=(LeverageTier(60, 5), LeverageTier(80, 10)))


# --- size --------------------------------------------------------------------------------------------------

equities = st.decimals(min_value=D("10"), max_value=D("1000000"), places=2)
entries = st.decimals(min_value=D("0.01"), max_value=D("100000"), places=2)


@settings(max_examples=200, deadline=None)
@given(equity=equities, entry=entries, stop_pct=st.decimals(min_value=D("0.05"), max_value=D("3"), places=2),
       confidence=st.floats(min_value=1, max_value=100), leverage=st.integers(min_value=1, max_value=20),
       risk=st.decimals(min_value=D("0.1"), max_value=D("10"), places=1))
def test_size_never_above_the_margin_cap_never_below_the_market_minimum(
        equity: Decimal, entry: Decimal, stop_pct: Decimal, confidence: float, leverage: int, risk: Decimal) -> None:
    params = SizingParams(risk_per_trade_pct=risk, max_position_pct=D(25))
    got = position_size(equity=equity, confidence=confidence, entry=entry, stop_distance=entry * stop_pct / 100,
                        leverage=leverage, params=params, market=BTC)
    if isinstance(got, Skip):
        assert "minimum" in got.reason
        return
    assert got.amount >= BTC.min_amount and got.notional >= BTC.min_notional
    assert got.amount % BTC.amount_step == 0
    assert got.margin <= max_margin(equity, params) <= equity * D("0.25")
    assert got.margin * leverage >= got.notional == got.amount * entry
    loss_at_stop = got.notional * stop_pct / 100
    assert loss_at_stop <= equity * risk / 100 * D(repr(min(confidence, 100.0))) / 100 + D("1e-20")


def test_size_follows_risk_and_confidence() -> None:
    # 1% of 10 000 at full confidence, stop 2% away: 5 000 notional at 100 = 50 units, 1 000 margin at 5x.
    got = position_size(equity=D(10_000), confidence=100.0, entry=D(100), stop_distance=D(2), leverage=5,
                        params=SizingParams(), market=BTC)
    assert isinstance(got, Sizing)
    assert (got.amount, got.notional, got.margin, got.capped) == (D(50), D(5000), D(1000), False)
    half = position_size(equity=D(10_000), confidence=50.0, entry=D(100), stop_distance=D(2), leverage=5,
                         params=SizingParams(), market=BTC)
    assert isinstance(half, Sizing) and half.amount == D(25)


def test_size_capped_at_a_quarter_of_equity_in_margin() -> None:
    # A stop 0.1% away would ask for 100 000 notional; at 2x that is 50 000 margin, capped at 2 500.
    got = position_size(equity=D(10_000), confidence=100.0, entry=D(100), stop_distance=D("0.1"), leverage=2,
                        params=SizingParams(), market=BTC)
    assert isinstance(got, Sizing) and got.capped
    assert got.margin == D(2500) and got.amount == D(50)


def test_below_the_market_minimum_is_skipped_never_rounded_up() -> None:
    got = position_size(equity=D(100), confidence=60.0, entry=D(50_000), stop_distance=D(1500), leverage=3,
                        params=SizingParams(), market=BTC)
    assert isinstance(got, Skip) and "minimum" in got.reason
    assert isinstance(position_size(equity=D(0), confidence=90, entry=D(1), stop_distance=D(1), leverage=1,
                                    params=SizingParams(), market=BTC), Skip)


@pytest.mark.parametrize(("side", "stop", "expected"), [
    (PositionSide.LONG, D("97.04"), D("97.1")), (PositionSide.SHORT, D("103.06"), D("103.0")),
])
def test_stops_round_towards_the_entry(side: PositionSide, stop: Decimal, expected: Decimal) -> None:
    assert stop_towards_entry(stop, side, D("0.1")) == expected


def test_targets_round_towards_the_entry() -> None:
    assert target_towards_entry(D("104.56"), PositionSide.LONG, D("0.1")) == D("104.5")
    assert target_towards_entry(D("95.44"), PositionSide.SHORT, D("0.1")) == D("95.5")


# --- pre-trade checks --------------------------------------------------------------------------------------

LIMITS = EntryLimits()
OK_BOOK = BookView(open_positions=2, margin_used=D(1000), equity=D(10_000), day_pnl=D(-100),
                   day_start_equity=D(10_000), correlated=("ETH/USDT",))


def test_a_book_within_every_limit_passes() -> None:
    result = pre_trade_checks(OK_BOOK, D(500), LIMITS)
    assert result.allowed and result.reason == "ok"


@pytest.mark.parametrize(("change", "margin", "needle"), [
    ({"open_positions": 12}, D(500), "max positions"),
    ({"margin_used": D(8600)}, D(400), "margin use"),          # 9 000 of 10 000 is not under 90%
    ({"day_pnl": D(-500)}, D(500), "daily loss"),               # exactly 5%
    ({"correlated": ("A", "B", "C")}, D(500), "correlated"),
    ({"equity": D(0)}, D(500), "equity"),
])
def test_each_limit_blocks_on_its_own(change: dict[str, object], margin: Decimal, needle: str) -> None:
    book = dataclasses.replace(OK_BOOK, **change)  # type: ignore[arg-type]
    result = pre_trade_checks(book, margin, LIMITS)
    assert not result.allowed
    assert len(result.reasons) == 1 and needle in result.reasons[0]


def test_every_failing_limit_is_reported() -> None:
    book = BookView(open_positions=12, margin_used=D(9500), equity=D(10_000), day_pnl=D(-600),
                    day_start_equity=D(10_000), correlated=("A", "B", "C"))
    assert len(pre_trade_checks(book, D(1), LIMITS).reasons) == 4


@settings(max_examples=200, deadline=None)
@given(pnl=st.decimals(min_value=D(-2000), max_value=D(2000), places=2),
       base=st.decimals(min_value=D(1), max_value=D(100_000), places=2),
       limit=st.decimals(min_value=D("0.5"), max_value=D(50), places=1))
def test_daily_loss_trips_exactly_at_the_threshold(pnl: Decimal, base: Decimal, limit: Decimal) -> None:
    assert daily_loss_reached(pnl, base, limit) == (-pnl / base * 100 >= limit)
    assert not daily_loss_reached(pnl, D(0), limit)


# --- correlation -------------------------------------------------------------------------------------------


def closes_from_returns(returns: np.ndarray, start: float = 0.0) -> Closes:
    close = 100.0 * np.exp(np.concatenate(([0.0], np.cumsum(returns))))
    ts = start + 3600.0 * np.arange(len(close))
    return Closes(ts, close)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 80))
def test_pearson_matches_numpy(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=n), rng.normal(size=n)
    assume(x.std() > 0 and y.std() > 0)
    got = pearson(x, y)
    assert got is not None and got == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)


def test_correlation_uses_log_returns_aligned_on_time() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(0, 0.01, 60)
    a = closes_from_returns(base)
    twin = closes_from_returns(base * 2)  # same moves, twice as large: perfectly correlated
    shifted = closes_from_returns(base, start=3600.0 * 30)  # only 31 bars in common with `a`
    other = closes_from_returns(rng.normal(0, 0.01, 60))
    assert correlation(a, twin, 48) == pytest.approx(1.0)
    assert correlation(a, shifted, 48) is None  # not enough common history: not counted
    assert abs(correlation(a, other, 48) or 0) < 0.5
    held = {"TWIN": twin, "OTHER": other, "SHIFTED": shifted, "NONE": None}
    assert correlated_symbols(a, held, 48, 0.8) == ("TWIN",)
    assert correlated_symbols(None, held, 48, 0.8) == ()


# --- exits -------------------------------------------------------------------------------------------------


def step_exit(state: ExitState, amount: Decimal, price: str, side: PositionSide = PositionSide.LONG,
              stop: str | None = "97", target: str | None = "104.5"):  # type: ignore[no-untyped-def]
    return decide_exit(side=side, entry=D(100), amount=amount, price=D(price),
                       stop_loss=None if stop is None else D(stop),
                       take_profit=None if target is None else D(target), state=state, params=EXITS,
                       amount_step=D("0.001"), min_amount=D("0.001"))


def test_partials_take_40_then_30_percent_of_the_initial_amount_once_each() -> None:
    state = ExitState(D(10))
    d = step_exit(state, D(10), "101.4")
    assert d.partials == () and d.close_reason is None
    d = step_exit(state, D(10), "101.5")
    assert [(p.rule.label, p.amount) for p in d.partials] == [("tp1", D(4))]
    state = ExitState(D(10), frozenset({"tp1"}), d.state.best_price, d.state.trailing_stop)
    assert step_exit(state, D(6), "101.6").partials == ()  # never twice
    d = step_exit(state, D(6), "102.5")
    assert [(p.rule.label, p.amount) for p in d.partials] == [("tp2", D(3))]
    state = ExitState(D(10), frozenset({"tp1", "tp2"}), d.state.best_price, d.state.trailing_stop)
    assert step_exit(state, D(3), "103").partials == ()


def test_a_jump_past_both_levels_takes_both_in_order() -> None:
    d = step_exit(ExitState(D(10)), D(10), "102.6")
    assert [(p.rule.label, p.amount) for p in d.partials] == [("tp1", D(4)), ("tp2", D(3))]


@settings(max_examples=200, deadline=None)
@given(initial=st.decimals(min_value=D("0.001"), max_value=D(1000), places=3),
       held_frac=st.floats(min_value=0.01, max_value=1.0),
       taken=st.sets(st.sampled_from(["tp1", "tp2"])),
       move=st.decimals(min_value=D(-3), max_value=D(4), places=2))
def test_partials_never_exceed_the_position_and_never_repeat(
        initial: Decimal, held_frac: float, taken: set[str], move: Decimal) -> None:
    amount = max(D("0.001"), (initial * D(repr(held_frac))).quantize(D("0.001")))
    state = ExitState(initial, frozenset(taken))
    parts = partial_amounts(state, amount, move, EXITS, D("0.001"), D("0.001"))
    labels = [p.rule.label for p in parts]
    assert len(labels) == len(set(labels)) and not set(labels) & taken
    assert sum((p.amount for p in parts), D(0)) <= amount
    for p in parts:
        assert move >= p.rule.trigger_pct
        assert p.amount >= 0 and p.amount % D("0.001") == 0


def test_partials_survive_a_restart_through_position_meta() -> None:
    state = ExitState(D(10), frozenset({"tp1"}), D("101.7"), D("100.683"))
    meta = state.to_meta({"stop_distance_pct": "3"})
    assert meta["partials"] == "tp1" and meta["stop_distance_pct"] == "3"
    back = ExitState.from_meta(meta, D(6))
    assert back == state
    assert [p.rule.label for p in step_exit(back, D(6), "101.8").partials] == []
    assert ExitState.from_meta({}, D(5)) == ExitState(D(5))  # a position without meta starts afresh


def test_trailing_stop_activates_tightens_and_never_loosens() -> None:
    long = PositionSide.LONG
    assert trailing_level(long, D(100), D("101.4"), EXITS) is None
    assert trailing_level(long, D(100), D("101.5"), EXITS) == D("101.5") * D("0.99")
    assert trailing_level(long, D(100), D(103), EXITS) == D(103) * D("0.995")
    assert trailing_level(PositionSide.SHORT, D(100), D(97), EXITS) == D(97) * D("1.005")
    state = ExitState(D(10), frozenset({"tp1", "tp2"}))
    d = step_exit(state, D(3), "103")
    assert d.state.trailing_stop == D("102.485") and d.close_reason is None
    d2 = step_exit(d.state, D(3), "102.6")  # falls back a little: the trail stays where it was
    assert d2.state.trailing_stop == D("102.485") and d2.state.best_price == D(103) and d2.close_reason is None
    d3 = step_exit(d2.state, D(3), "102.4")
    assert d3.close_reason == "trailing-stop"


@pytest.mark.parametrize(("price", "stop", "target", "reason"), [
    ("96.0", "97", "104.5", "force-close"),    # a gap through the stop: -4% wins
    ("96.9", "97", "104.5", "stop-loss"),
    ("104.5", "97", "104.5", "take-profit"),
    ("95.9", None, None, "force-close"),      # a position without levels is still closed at -4%
    ("96.1", None, None, None),
])
def test_close_reasons_in_order(price: str, stop: str | None, target: str | None, reason: str | None) -> None:
    assert step_exit(ExitState(D(10)), D(10), price, stop=stop, target=target).close_reason == reason


def test_short_positions_mirror_the_rules() -> None:
    short = PositionSide.SHORT
    assert move_pct(short, D(100), D(98)) == D(2)
    d = step_exit(ExitState(D(10)), D(10), "98.5", side=short, stop="103", target="95.5")
    assert [p.rule.label for p in d.partials] == ["tp1"]
    assert step_exit(ExitState(D(10)), D(10), "103", side=short, stop="103", target="95.5").close_reason == "stop-loss"
    assert step_exit(ExitState(D(10)), D(10), "104", side=short, stop=None, target=None).close_reason == "force-close"


# --- the day -----------------------------------------------------------------------------------------------


def test_mark_value_counts_unrealized_net_of_fees_and_margin_uses_leverage() -> None:
    marks = [OpenMark(PositionSide.LONG, D(2), D(100), D("0.2"), D(95), 5),
             OpenMark(PositionSide.SHORT, D(1), D(50), D("0.1"), None, 2)]
    assert mark_value(D(-30), marks) == D(-30) + D(-10) - D("0.2") - D("0.1")
    assert margin_in_use(marks) == D(40) + D(25)


@settings(max_examples=100, deadline=None)
@given(start=st.decimals(min_value=D(100), max_value=D(100_000), places=2),
       loss=st.decimals(min_value=D(0), max_value=D(20), places=2))
def test_emergency_trigger_is_the_day_loss_against_start_equity(start: Decimal, loss: Decimal) -> None:
    base = DayBaseline("2024-01-01", start, D(0))
    pnl = -start * loss / 100
    assert daily_loss_reached(pnl, base.equity, D(5)) == (loss >= 5)
    assert DayBaseline.from_dict(base.to_dict()) == base
    assert DayBaseline.from_dict({"day": "x"}) is None
