"""The pre-trade gate: trading states, pause, max positions, leverage cap, capital reservation."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.types import MarketType, OrderIntent, Side, TradingState
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, GateDecision, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits, RiskState

D = Decimal
NOW = 1_700_000_000.0
EQUITY = D(10_000)  # spot budget 6000, futures 4000


def make_gate(state: TradingState = TradingState.ACTIVE) -> tuple[RiskGate, CapitalAllocator]:
    limits = RiskLimits(D(5), D(15), 3600.0, D(25))
    monitor = GlobalRiskMonitor(limits, RiskState(trading_state=state, until=NOW + 3600))
    allocator = CapitalAllocator({"spot": 60, "futures": 40}, {"spot", "futures"})
    gate = RiskGate(
        monitor,
        allocator,
        {"spot": EngineLimits(max_positions=3), "futures": EngineLimits(max_positions=2, max_leverage=10)},
    )
    return gate, allocator


def intent(
    engine: str = "spot",
    *,
    notional: str = "1000",
    amount: str = "0.01",
    reduce_only: bool = False,
    system_flatten: bool = False,
    leverage: int | None = None,
    side: Side = Side.BUY,
) -> OrderIntent:
    market = MarketType.SPOT if engine == "spot" else MarketType.FUTURES
    return OrderIntent(
        engine=engine, market=market, symbol="BTC/USDT", side=side, amount=D(amount),
        reduce_only=reduce_only, system_flatten=system_flatten, leverage=leverage, notional=D(notional),
    )


def check(gate: RiskGate, i: OrderIntent, open_positions: int = 0, has_position: bool = False) -> GateDecision:
    return gate.check(i, equity=EQUITY, open_positions=open_positions, has_position=has_position)


# --- trading states ------------------------------------------------------------------------------
def _entries(engine: str, max_leverage: int) -> st.SearchStrategy[OrderIntent]:
    """Entries that are within every limit, so only the trading state can deny them."""
    return st.builds(
        intent,
        engine=st.just(engine),
        notional=st.decimals(min_value=D("0.01"), max_value=D(3000), places=2).map(str),
        amount=st.decimals(min_value=D("0.0001"), max_value=D(10), places=4).map(str),
        leverage=st.one_of(st.none(), st.integers(min_value=1, max_value=max_leverage)),
        side=st.sampled_from(Side),
    )


entries = _entries("spot", 1) | _entries("futures", 10)


@given(i=entries, state=st.sampled_from([TradingState.REDUCING, TradingState.HALTED]),
       open_positions=st.integers(min_value=0, max_value=5), has_position=st.booleans())
@settings(max_examples=150, deadline=None)
def test_no_non_reducing_order_passes_while_reducing_or_halted(
    i: OrderIntent, state: TradingState, open_positions: int, has_position: bool
) -> None:
    gate, allocator = make_gate(state)
    d = check(gate, i, open_positions, has_position)
    assert not d.allowed and d.reservation is None
    assert state.value in d.reason or "halted" in d.reason
    assert allocator.reserved(i.engine) == 0


@given(i=entries)
@settings(max_examples=100, deadline=None)
def test_the_same_entries_pass_while_active(i: OrderIntent) -> None:
    gate, allocator = make_gate(TradingState.ACTIVE)
    d = check(gate, i)
    assert d.allowed and d.reservation is not None
    assert d.reservation.notional == i.notional
    assert allocator.reserved(i.engine) == i.notional


@pytest.mark.parametrize("state", [TradingState.ACTIVE, TradingState.REDUCING])
def test_reduce_only_passes_without_a_reservation(state: TradingState) -> None:
    gate, allocator = make_gate(state)
    d = check(gate, intent(reduce_only=True, side=Side.SELL), open_positions=3, has_position=True)
    assert d.allowed and d.reservation is None
    assert allocator.reserved("spot") == 0


def test_only_system_flatten_passes_while_halted() -> None:
    gate, _ = make_gate(TradingState.HALTED)
    assert not check(gate, intent(reduce_only=True, side=Side.SELL)).allowed
    d = check(gate, intent(reduce_only=True, system_flatten=True, side=Side.SELL))
    assert d.allowed and d.reservation is None


def test_state_is_read_live_from_the_monitor() -> None:
    monitor = GlobalRiskMonitor(RiskLimits(D(5), D(15), 3600.0, D(25)))
    allocator = CapitalAllocator({"spot": 100}, {"spot"})
    gate = RiskGate(monitor, allocator, {"spot": EngineLimits(max_positions=1)})
    monitor.update(NOW, {"spot": EQUITY})
    assert check(gate, intent()).allowed
    monitor.update(NOW + 1, {"spot": D(9000)})  # daily loss 10 %: the breaker trips
    assert not check(gate, intent(), has_position=True).allowed
    assert check(gate, intent(reduce_only=True, side=Side.SELL), has_position=True).allowed
    monitor.kill(NOW + 2, "test")
    assert not check(gate, intent(reduce_only=True, side=Side.SELL), has_position=True).allowed


# --- pause ---------------------------------------------------------------------------------------
def test_paused_engine_takes_no_entries_but_still_exits() -> None:
    gate, _ = make_gate()
    gate.set_paused("spot", True)
    assert gate.is_paused("spot") and not gate.is_paused("futures")
    d = check(gate, intent())
    assert not d.allowed and "paused" in d.reason
    assert check(gate, intent(reduce_only=True, side=Side.SELL), has_position=True).allowed
    assert check(gate, intent("futures")).allowed  # the other engine is not paused
    gate.set_paused("spot", False)
    assert check(gate, intent()).allowed


# --- position and leverage limits ----------------------------------------------------------------
def test_max_positions_blocks_a_new_position_but_not_adding_to_one() -> None:
    gate, _ = make_gate()
    assert check(gate, intent(), open_positions=2).allowed
    d = check(gate, intent(), open_positions=3)
    assert not d.allowed and "max positions" in d.reason
    assert check(gate, intent(), open_positions=3, has_position=True).allowed


def test_leverage_cap_per_engine() -> None:
    gate, _ = make_gate()
    assert check(gate, intent("futures", leverage=10)).allowed
    d = check(gate, intent("futures", leverage=11))
    assert not d.allowed and "leverage" in d.reason
    assert check(gate, intent("spot", leverage=None)).allowed
    assert check(gate, intent("spot", leverage=1)).allowed
    assert not check(gate, intent("spot", leverage=2)).allowed
    assert not check(gate, intent("futures", leverage=0)).allowed


@pytest.mark.parametrize(("amount", "notional"), [("0", "100"), ("-1", "100"), ("0.1", "0"), ("0.1", "-5"),
                                                  ("NaN", "100"), ("0.1", "NaN")])
def test_non_positive_amount_or_notional_is_denied(amount: str, notional: str) -> None:
    gate, allocator = make_gate()
    d = check(gate, intent(amount=amount, notional=notional))
    assert not d.allowed and "positive" in d.reason
    assert allocator.reserved("spot") == 0


def test_engine_without_limits_is_denied() -> None:
    gate, _ = make_gate()
    assert not check(gate, intent("grid")).allowed


# --- capital -------------------------------------------------------------------------------------
def test_budget_denial_then_release_frees_the_capital() -> None:
    gate, allocator = make_gate()
    first = check(gate, intent(notional="4000"))
    assert first.allowed and first.reservation is not None
    second = check(gate, intent(notional="4000"))
    assert not second.allowed and "budget" in second.reason and "2000.00 available" in second.reason
    allocator.release(first.reservation)
    assert check(gate, intent(notional="4000")).allowed


@given(notionals=st.lists(st.decimals(min_value=D(1), max_value=D(2500), places=2), max_size=30),
       exposure=st.decimals(min_value=D(0), max_value=D(6000), places=2))
@settings(max_examples=100, deadline=None)
def test_a_burst_of_entries_never_reserves_past_the_budget(notionals: list[Decimal], exposure: Decimal) -> None:
    gate, allocator = make_gate()
    allocator.set_exposure("spot", exposure)
    granted = D(0)
    for n in notionals:
        d = check(gate, intent(notional=str(n)), has_position=True)
        if d.allowed:
            granted += n
        else:
            # Denied only when it really did not fit.
            assert exposure + granted + n > allocator.budget("spot", EQUITY)
    assert exposure + granted <= allocator.budget("spot", EQUITY) == D(6000)
    assert allocator.reserved("spot") == granted
