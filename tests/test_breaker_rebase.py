"""A resume or a breaker reset re-bases the breaker (day baseline, peak; resume also the kill switch's
base) on the current equity. On a wrong figure the limits trip far too late or never: a book missing
(an engine whose balance the exchange has not given since a restart) makes the baseline too low, and a
base of zero switches the limit off altogether. Both commands refuse until the books are complete."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest

from config import load_settings
from core.clock import SimClock, start_of_utc_day
from core.errors import TemporaryError
from core.events import BreakerBlind, Event, RiskRebased
from core.types import MarketType, TradingState
from engines.orchestrator import BREAKER_BLIND_ALERT_SECONDS, RISK_KEY, EngineParts, Orchestrator
from exchange.base import Balance
from monitoring.alerts import format_event
from risk.allocator import CapitalAllocator
from risk.gate import RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits, RiskState
from storage.ledger import Ledger
from tests.bounded import bounded

D = Decimal
NOW = 1_700_000_000.0 + 3600
MIDNIGHT = start_of_utc_day(1_700_000_000.0)
NOON = MIDNIGHT + 12 * 3600
HOUR = 3600.0


def limits() -> RiskLimits:
    return RiskLimits(max_daily_loss_pct=D(5), max_drawdown_pct=D(15), cooldown_seconds=HOUR,
                      kill_switch_loss_pct=D(25), flatten_on_trip=False)


@pytest.mark.parametrize("equity", [D(0), D(-5), D("NaN")])
def test_the_monitor_refuses_to_rebase_on_a_non_positive_equity(equity: Decimal) -> None:
    m = GlobalRiskMonitor(limits())
    m.update(NOON, {"spot": D(10000)})
    m.update(NOON + 1, {"spot": D(9400)})
    assert m.trading_state is TradingState.REDUCING
    with pytest.raises(ValueError):
        m.reset_breaker(NOON + 2, equity)
    m.kill(NOON + 3, "kill by telegram:1")
    with pytest.raises(ValueError):
        m.resume(NOON + 4, equity)
    # Nothing moved: the kill switch still counts from the first equity.
    assert m.trading_state is TradingState.HALTED
    assert m.state.initial_equity == D(10000)


class FakeExchange:
    def __init__(self, market_type: MarketType, equity: str) -> None:
        self.market_type = market_type
        self.equity = D(equity)
        self.down = False

    async def fetch_balance(self) -> Balance:
        if self.down:
            raise TemporaryError("balance unavailable (test)")
        return Balance(equity=self.equity)


class FakeFeed:
    def ticker(self, symbol: str) -> None:
        return None


async def rig(tmp_path: Path, state: RiskState) -> tuple[Orchestrator, FakeExchange, FakeExchange, Ledger]:
    clock = SimClock(NOW)
    settings = load_settings(env_file=None, data_dir=tmp_path, futures_enabled=True, looplag_enabled=False)
    orch = Orchestrator(settings, clock)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    orch.ledger = ledger
    spot, fut = FakeExchange(MarketType.SPOT, "6000"), FakeExchange(MarketType.FUTURES, "4000")
    for name, ex in (("spot", spot), ("futures", fut)):
        orch.parts[name] = EngineParts(name, ex, None, None, asyncio.Lock())  # type: ignore[arg-type]
        orch.feeds[name] = FakeFeed()  # type: ignore[assignment]
    orch.monitor = GlobalRiskMonitor(RiskLimits.from_settings(settings), state)
    orch.allocator = CapitalAllocator({"spot": 60, "futures": 40}, ["spot", "futures"])
    orch.gate = RiskGate(orch.monitor, orch.allocator, {})
    return orch, spot, fut, ledger


def saved(trading_state: TradingState) -> RiskState:
    """What the previous run persisted: 10,000 of equity today, the breaker tripped or halted."""
    return RiskState(trading_state=trading_state, reason="x", until=NOW + 10_000 if trading_state is
                     TradingState.REDUCING else None, initial_equity=D(10000), day_start=NOW - NOW % 86400,
                     day_start_equity=D(10000), peak_equity=D(10000), tripped_at=NOW - 60,
                     trip="daily_loss" if trading_state is TradingState.REDUCING else "manual")


@bounded(20)
async def test_breaker_reset_waits_for_every_book(tmp_path: Path) -> None:
    orch, spot, fut, ledger = await rig(tmp_path, saved(TradingState.REDUCING))
    try:
        fut.down = True  # restarted while the futures API is down: its book was never read
        await orch._refresh_books()
        await orch._update_risk()
        refused = await orch.breaker_reset(by="telegram:1")
        assert not refused.ok and "futures" in refused.message
        assert orch.trading_state is TradingState.REDUCING
        assert orch.monitor.state.day_start_equity == D(10000)
        fut.down = False
        await orch._refresh_books()
        assert (await orch.breaker_reset(by="telegram:1")).ok
        assert orch.monitor.state.day_start_equity == D(10000)
        # The day then goes badly: 8 % below the equity at the reset, limit 5 %.
        spot.equity = D("5200")
        await orch._refresh_books()
        await orch._update_risk()
        assert orch.trading_state is TradingState.REDUCING
    finally:
        await ledger.close()


@bounded(20)
async def test_resume_all_waits_for_every_book(tmp_path: Path) -> None:
    orch, spot, fut, ledger = await rig(tmp_path, saved(TradingState.HALTED))
    try:
        spot.down = fut.down = True  # restarted while Binance does not answer balances
        await orch._refresh_books()
        refused = await orch.resume("all", by="telegram:1")
        assert not refused.ok and "incomplete" in refused.message
        assert orch.trading_state is TradingState.HALTED
        spot.down = fut.down = False
        await orch._refresh_books()
        assert (await orch.resume("all", by="telegram:1")).ok
        assert orch.monitor.state.initial_equity == D(10000)
        # Then 90 % of the account is lost over the following days: the 25 % kill switch halts.
        spot.equity, fut.equity = D("600"), D("400")
        for day in range(1, 4):
            orch.clock._now = NOW + day * 86_400  # type: ignore[attr-defined]
            await orch._refresh_books()
            await orch._update_risk()
        assert orch.trading_state is TradingState.HALTED
    finally:
        await ledger.close()


# --- the set of engines changes between runs ----------------------------------------------------------

def test_an_engine_turned_off_is_not_a_loss_and_the_state_stays() -> None:
    m = GlobalRiskMonitor(limits())
    m.update(NOON, {"spot": D(6000), "futures": D(4000)})
    m.update(NOON + 60, {"spot": D(5400), "futures": D(4000)})  # a 6 % day: REDUCING
    assert m.trading_state is TradingState.REDUCING
    until = m.state.until
    # Restarted with futures off, from the persisted state.
    again = GlobalRiskMonitor(limits(), RiskState.from_dict(m.state.to_dict()))
    assert again.engine_change({"spot": D(5400)}) == (("futures", "spot"), ("spot",))
    assert again.update(NOON + 120, {"spot": D(5400)}) == []  # not a 46 % loss: no kill switch
    s = again.state
    assert (s.initial_equity, s.day_start_equity, s.peak_equity) == (D(5400), D(5400), D(5400))
    assert s.engines == ("spot",)
    assert (again.trading_state, s.until) == (TradingState.REDUCING, until)
    assert again.engine_change({"spot": D(5400)}) is None
    # From the new base the limits count as before: 5 % of 5,400 the same day trips again later.
    again.update(NOON + 2 * HOUR, {"spot": D(5400)})
    assert again.trading_state is TradingState.ACTIVE
    [t] = again.update(NOON + 2 * HOUR + 1, {"spot": D(5130)})
    assert t.new is TradingState.REDUCING


def test_a_snapshot_without_engines_adopts_the_current_ones_without_rebasing() -> None:
    old = RiskState.from_dict({"trading_state": "active", "initial_equity": "10000", "day_start": MIDNIGHT,
                               "day_start_equity": "10000", "peak_equity": "10000"})
    m = GlobalRiskMonitor(limits(), old)
    assert m.engine_change({"spot": D(9000)}) is None
    [t] = m.update(NOON, {"spot": D(9000)})  # a real 10 % loss still trips
    assert t.new is TradingState.REDUCING
    assert m.state.engines == ("spot",)


async def run_once(tmp_path: Path, clock: SimClock, engines: dict[str, str]) -> tuple[Orchestrator, list[Event]]:
    settings = load_settings(env_file=None, data_dir=tmp_path, futures_enabled="futures" in engines,
                             spot_enabled="spot" in engines, looplag_enabled=False)
    orch = Orchestrator(settings, clock)
    seen: list[Event] = []
    orch.bus.publish = seen.append  # type: ignore[method-assign]
    orch.ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    for name, equity in engines.items():
        ex = FakeExchange(MarketType.SPOT if name == "spot" else MarketType.FUTURES, equity)
        orch.parts[name] = EngineParts(name, ex, None, None, asyncio.Lock())  # type: ignore[arg-type]
        orch.feeds[name] = FakeFeed()  # type: ignore[assignment]
    saved_state = await orch.ledger.get_state(RISK_KEY)
    orch.monitor = GlobalRiskMonitor(RiskLimits.from_settings(settings),
                                     RiskState.from_dict(saved_state) if saved_state else None)
    orch.allocator = CapitalAllocator({"spot": 60, "futures": 40}, list(engines))
    orch.gate = RiskGate(orch.monitor, orch.allocator, {})
    await orch._refresh_books()
    await orch._update_risk()
    await orch._persist_risk()
    return orch, seen


@bounded(20)
async def test_restarting_with_an_engine_turned_off_rebases_and_tells_the_owner(tmp_path: Path) -> None:
    clock = SimClock(NOW)
    first, _ = await run_once(tmp_path, clock, {"spot": "6000", "futures": "4000"})
    assert first.trading_state is TradingState.ACTIVE
    await first.ledger.close()  # type: ignore[union-attr]
    clock._now = NOW + 600  # type: ignore[attr-defined]  # same UTC day, ten minutes later
    # FUTURES_ENABLED=false and a restart; the spot wallet is untouched (6000).
    second, seen = await run_once(tmp_path, clock, {"spot": "6000"})
    try:
        assert second.trading_state is TradingState.ACTIVE
        assert second._flatten_task is None
        [rebased] = [e for e in seen if isinstance(e, RiskRebased)]
        assert rebased.equity == D(6000) and "futures" in rebased.reason
        assert format_event(rebased) is not None
        stored = RiskState.from_dict(await second.ledger.get_state(RISK_KEY))  # type: ignore[union-attr,arg-type]
        assert (stored.engines, stored.initial_equity) == (("spot",), D(6000))
    finally:
        await second.ledger.close()  # type: ignore[union-attr]


# --- the breaker without a figure ---------------------------------------------------------------------

@bounded(20)
async def test_the_owner_hears_when_the_breaker_stays_blind_and_when_it_sees_again(tmp_path: Path) -> None:
    orch, _spot, fut, ledger = await rig(tmp_path, RiskState())
    seen: list[Event] = []
    orch.bus.publish = seen.append  # type: ignore[method-assign]
    clock = orch.clock
    assert isinstance(clock, SimClock)
    try:
        fut.down = True
        for _ in range(3):  # a few ticks within the first minutes: only the log hears of it
            await orch._refresh_books()
            await orch._update_risk()
            await clock.advance(60)
        assert not [e for e in seen if isinstance(e, BreakerBlind)]
        await clock.advance(BREAKER_BLIND_ALERT_SECONDS)
        for _ in range(3):  # told once, not every tick
            await orch._refresh_books()
            await orch._update_risk()
        [blind] = [e for e in seen if isinstance(e, BreakerBlind)]
        assert blind.blind and "no balance from futures" in blind.detail
        assert orch.breaker_blind() == blind.detail  # in the status report: /healthz answers 503 meanwhile
        text = format_event(blind)
        assert text is not None and "blind" in text and "futures" in text
        fut.down = False
        await orch._refresh_books()
        await orch._update_risk()
        [_, seeing] = [e for e in seen if isinstance(e, BreakerBlind)]
        assert orch.breaker_blind() is None
        assert not seeing.blind and "sees the whole account" in (format_event(seeing) or "")
    finally:
        await ledger.close()


def test_an_engine_change_onto_an_empty_wallet_waits_for_a_positive_figure() -> None:
    """Spot turned off, and the futures wallet reads 0 at the restart (funds in transit): no base of
    zero (the limits would be off), and nothing judged against the old wallets' baselines."""
    m = GlobalRiskMonitor(limits())
    m.update(NOON, {"spot": D(6000), "futures": D(4000)})
    again = GlobalRiskMonitor(limits(), RiskState.from_dict(m.state.to_dict()))
    assert again.engine_change({"futures": D(0)}) is None
    assert again.update(NOON + 60, {"futures": D(0)}) == []
    assert again.trading_state is TradingState.ACTIVE
    assert (again.state.engines, again.state.initial_equity) == (("futures", "spot"), D(10000))
    assert again.engine_change({"futures": D(4000)}) == (("futures", "spot"), ("futures",))
    again.update(NOON + 120, {"futures": D(4000)})  # funded: the new base
    assert again.state.initial_equity == D(4000)
    [t] = again.update(NOON + 180, {"futures": D(400)})  # 90 % of it lost: the kill switch
    assert t.new is TradingState.HALTED


@bounded(20)
async def test_resume_on_an_empty_account_says_so(tmp_path: Path) -> None:
    orch, spot, fut, ledger = await rig(tmp_path, saved(TradingState.HALTED))
    try:
        spot.equity, fut.equity = D(0), D(0)  # both wallets read: the account is empty
        await orch._refresh_books()
        refused = await orch.resume("all", by="telegram:1")
        assert not refused.ok and "equity is 0" in refused.message and "incomplete" not in refused.message
        assert orch.trading_state is TradingState.HALTED
    finally:
        await ledger.close()
