"""The futures engine end to end with real components: a ledger on disk, the risk gate, the capital
allocator, the order manager and the paper futures exchange, on prices the test scripts and a
simulated clock. Each test checks that entries, partial take-profits, the trailing stop and the forced
exits happen at the prices where they should, and that what the ledger remembers survives a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from core.clock import DAY_SECONDS, SimClock
from core.errors import OrderRejected
from core.events import EventBus
from core.types import CandleSeries, MarketType, OrderIntent, OrderState, PositionSide, Side, Ticker
from engines.analysis import TIMEFRAMES
from engines.base import EngineContext
from engines.futures import FuturesEngine, settings_problems
from exchange.candles import timeframe_seconds
from exchange.feed_signal import UpdateSignal
from exchange.markets import paper_markets
from exchange.orders import OrderManager
from exchange.paper_futures import PaperFuturesExchange
from monitoring.health import HealthMonitor
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits
from storage.ledger import Ledger
from tests.test_analysis import series, zigzag

D = Decimal
START = 1_700_006_400.0  # 2023-11-15 00:00 UTC: a whole UTC day ahead
PORTFOLIO = D(25_000)  # futures gets 40%: an engine equity of 10 000


class ScriptedFeed:
    """A `MarketFeed` whose tickers and candles the test sets; each change bumps the version."""

    def __init__(self, clock: SimClock, symbols: list[str]) -> None:
        self.clock = clock
        self._symbols = symbols
        self.signal = UpdateSignal(clock)
        self.tickers: dict[str, Ticker] = {}
        self.data: dict[tuple[str, str], CandleSeries] = {}

    def price(self, symbol: str, price: str) -> None:
        p = D(price)
        self.tickers[symbol] = Ticker(symbol, p, p, p, self.clock.now())
        self.signal.bump()

    def trend(self, symbol: str, direction: PositionSide, price: float = 100.0) -> None:
        """A steady trend on every timeframe, ending at `price` now, with a volume surge on the last
        hour: the scanner and the analysis both pick it (long: confidence 90, ATR 1.9% -> 10x, stop
        capped at 3%; short: confidence 80 -> 7x)."""
        now = self.clock.now()
        up, down = (2.0, 1.2) if direction is PositionSide.LONG else (1.2, 2.0)
        for tf in TIMEFRAMES:
            closes = zigzag(200, 1.0, up, down)
            closes = [c * price / closes[-1] for c in closes]
            self.data[(symbol, tf)] = series(symbol, tf, closes, now - now % timeframe_seconds(tf),
                                             last_volume=300.0 if tf == "1h" else 100.0, observed_at=now)
        self.price(symbol, f"{price:.4f}")

    @property
    def version(self) -> int:
        return self.signal.version

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    @property
    def finished(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def ticker(self, symbol: str) -> Ticker | None:
        return self.tickers.get(symbol)

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None:
        got = self.data.get((symbol, timeframe))
        return None if got is None else got.tail(limit)

    async def wait_update(self, after: int, timeout: float) -> int:
        return await self.signal.wait(after, timeout)

    def on_update(self, listener: Any) -> Any:
        return self.signal.add_listener(listener)


@dataclass
class Rig:
    clock: SimClock
    feed: ScriptedFeed
    ledger: Ledger
    exchange: PaperFuturesExchange
    monitor: GlobalRiskMonitor
    allocator: CapitalAllocator
    ctx: EngineContext
    engine: FuturesEngine

    async def step(self) -> None:
        await self.engine.step()

    def restart(self) -> FuturesEngine:
        """A fresh engine on the same services, as the supervisor builds after a crash."""
        self.engine = FuturesEngine(self.ctx)
        return self.engine

    async def position_amount(self, symbol: str) -> Decimal:
        rows = {p.symbol: p for p in await self.ledger.positions("futures")}
        return rows[symbol].amount if symbol in rows else D(0)

    async def exits(self) -> list[tuple[str, Decimal, bool]]:
        orders = await self.ledger.orders_in_states([OrderState.FILLED], engine="futures")
        return [(o.reason, o.filled, o.reduce_only) for o in orders if o.reduce_only]


@pytest.fixture
async def make_rig(tmp_path: Path) -> Any:
    ledgers: list[Ledger] = []

    async def build(symbols: list[str], **overrides: Any) -> Rig:
        clock = SimClock(start=START + 600)
        settings = Settings(_env_file=None, **{"futures_symbols": symbols, **overrides})  # type: ignore[call-arg]
        feed = ScriptedFeed(clock, symbols)
        ledger = await Ledger.open(tmp_path / f"ledger{len(ledgers)}.sqlite3", clock)
        ledgers.append(ledger)
        exchange = PaperFuturesExchange(feed, clock, paper_markets(symbols, MarketType.FUTURES), D(10_000),
                                        taker_fee_pct=D("0.05"), slippage_bps=D(0))
        monitor = GlobalRiskMonitor(RiskLimits(D(5), D(15), 3600.0, D(25)))
        allocator = CapitalAllocator({"spot": 60.0, "futures": 40.0}, ["spot", "futures"])
        gate = RiskGate(monitor, allocator, {"futures": EngineLimits(settings.futures_max_positions,
                                                                     settings.futures_max_leverage)})
        health = HealthMonitor(clock, 60.0, 300.0)
        health.register("futures")
        bus = EventBus()
        orders = OrderManager("futures", exchange, ledger, bus, clock, boot_stamp=1)
        ctx = EngineContext(name="futures", settings=settings, clock=clock, bus=bus, ledger=ledger,
                            exchange=exchange, feed=feed, gate=gate, allocator=allocator, health=health,
                            orders=orders, equity=lambda: PORTFOLIO)
        engine = FuturesEngine(ctx)
        await engine.load_state()
        return Rig(clock, feed, ledger, exchange, monitor, allocator, ctx, engine)

    yield build
    for ledger in ledgers:
        await ledger.close()


async def until(check: Callable[[], bool], rounds: int = 100_000) -> None:
    """Yield to the loop (and so to the ledger's thread) until `check` holds; bounded."""
    for _ in range(rounds):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


# --- entries ----------------------------------------------------------------------------------------------


async def test_entry_sets_leverage_size_margin_and_exit_levels(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    [position] = await rig.ledger.positions("futures")
    # Confidence 90 -> 10x; 1% of 10 000 x 0.9 at a 3% stop = 3 000 notional = 30 at 100, margin 300.
    assert position.side is PositionSide.LONG and position.leverage == 10
    assert position.amount == D(30) and position.entry_price == D(100)
    assert position.stop_loss == D("97.0000") and position.take_profit == D("104.5000")
    assert position.meta["initial_amount"] == "30"
    assert rig.allocator.exposure("futures") == D(300)  # the allocator holds margin, not notional
    [entry] = await rig.ledger.orders_in_states([OrderState.FILLED], engine="futures")
    assert entry.leverage == 10 and not entry.reduce_only
    [exchange_position] = await rig.exchange.fetch_positions()
    assert exchange_position.leverage == 10 and exchange_position.margin == D(300)
    status = rig.engine.get_status()
    assert status["entries"] == 1 and status["candidates"] == ["AAA/USDT"]


async def test_leverage_is_set_on_the_exchange_before_the_entry(make_rig: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rig: Rig = await make_rig(["AAA/USDT", "BBB/USDT"], futures_max_correlated_positions=5)
    calls: list[tuple[str, int | None, str]] = []
    real = rig.exchange.ensure_symbol_setup

    async def setup(symbol: str, leverage: int | None, margin_mode: str = "isolated") -> None:
        calls.append((symbol, leverage, margin_mode))
        if symbol == "BBB/USDT":
            raise OrderRejected("leverage 10 not allowed")  # as a live exchange may answer
        await real(symbol, leverage, margin_mode)

    monkeypatch.setattr(rig.exchange, "ensure_symbol_setup", setup)
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    rig.feed.trend("BBB/USDT", PositionSide.LONG)
    await rig.step()
    assert sorted(calls) == [("AAA/USDT", 10, "isolated"), ("BBB/USDT", 10, "isolated")]
    assert [p.symbol for p in await rig.ledger.positions("futures")] == ["AAA/USDT"]  # BBB skipped, not sent
    assert rig.exchange.leverage("AAA/USDT") == 10


async def test_short_entry_mirrors_the_levels(make_rig: Any) -> None:
    rig: Rig = await make_rig(["BBB/USDT"])
    rig.feed.trend("BBB/USDT", PositionSide.SHORT)
    await rig.step()
    [position] = await rig.ledger.positions("futures")
    assert position.side is PositionSide.SHORT and position.leverage == 7  # confidence 80
    assert position.stop_loss == D("103.0000") and position.take_profit == D("95.5000")


async def test_pre_trade_checks_block_the_entries_beyond_a_limit(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT", "BBB/USDT", "CCC/USDT"], futures_max_correlated_positions=1)
    for s in ("AAA/USDT", "BBB/USDT", "CCC/USDT"):
        rig.feed.trend(s, PositionSide.LONG)  # the same shape: perfectly correlated returns
    await rig.step()
    assert len(await rig.ledger.positions("futures")) == 1
    assert rig.engine.counters.extra["blocked"] == 2


async def test_entries_need_fresh_data(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.clock.advance(600)  # the candles have not been refreshed for 10 minutes
    rig.feed.price("AAA/USDT", "100")
    await rig.step()
    assert await rig.ledger.positions("futures") == []
    assert rig.engine.get_status()["stale_symbols"] == ["AAA/USDT"]


# --- the exit ladder -------------------------------------------------------------------------------------


async def test_partials_trailing_and_the_final_exit_happen_at_their_prices(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    path = [
        ("101.4", D(30)),   # +1.4%: nothing yet
        ("101.5", D(18)),   # +1.5%: 40% of 30 taken
        ("101.8", D(18)),   # never twice
        ("101.6", D(18)),
        ("102.5", D(9)),    # +2.5%: 30% of 30 taken
        ("103.2", D(9)),    # +3.2%: the trail tightens to 0.5% behind 103.2 = 102.684
        ("102.7", D(9)),    # above the trail
        ("102.68", D(0)),   # through it: the rest is closed
    ]
    for price, amount in path:
        rig.feed.price("AAA/USDT", price)
        await rig.step()
        assert await rig.position_amount("AAA/USDT") == amount, price
    exits = await rig.exits()
    assert [(reason.split(" at ")[0], filled) for reason, filled, _ in exits] == [
        ("partial take-profit tp1", D(12)), ("partial take-profit tp2", D(9)), ("trailing-stop", D(9))]
    assert all(reduce_only for _, _, reduce_only in exits)
    [trade] = await rig.ledger.closed_trades("futures")
    assert trade.realized_pnl > 0
    metrics = rig.engine.get_status()["metrics"]["overall"]
    assert metrics["trades"] == 1 and metrics["wins"] == 1
    assert rig.allocator.exposure("futures") == 0


async def test_partials_are_not_repeated_after_a_restart(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    rig.feed.price("AAA/USDT", "101.5")
    await rig.step()
    assert await rig.position_amount("AAA/USDT") == D(18)
    engine = rig.restart()
    await engine.load_state()
    rig.feed.price("AAA/USDT", "101.7")
    await rig.step()
    assert await rig.position_amount("AAA/USDT") == D(18)
    rig.feed.price("AAA/USDT", "102.5")
    await rig.step()
    assert await rig.position_amount("AAA/USDT") == D(9)
    assert [r.split(" at ")[0] for r, _, _ in await rig.exits()] == ["partial take-profit tp1",
                                                                    "partial take-profit tp2"]


async def test_a_crash_between_marking_and_sending_skips_the_partial_rather_than_repeating_it(
        make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    [position] = await rig.ledger.positions("futures")
    # What the ledger holds if the daemon died right after marking tp1 and before its order went out.
    await rig.ledger.update_position("futures", "AAA/USDT", meta={**position.meta, "partials": "tp1"})
    engine = rig.restart()
    await engine.load_state()
    rig.feed.price("AAA/USDT", "101.6")
    await rig.step()
    assert await rig.position_amount("AAA/USDT") == D(30)


async def test_stop_loss_and_the_forced_exit_at_minus_four_percent(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT", "BBB/USDT"], futures_max_correlated_positions=5)
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    rig.feed.trend("BBB/USDT", PositionSide.LONG)
    await rig.step()
    rig.feed.price("AAA/USDT", "97.01")
    await rig.step()
    assert await rig.position_amount("AAA/USDT") == D(30)
    rig.feed.price("AAA/USDT", "96.99")   # through the 3% stop
    rig.feed.price("BBB/USDT", "95.5")    # a gap through the stop and past -4%
    await rig.step()
    reasons = sorted(r for r, _, _ in await rig.exits())
    assert reasons == ["force-close", "stop-loss"]
    assert await rig.ledger.positions("futures") == []


async def test_exits_pass_while_trading_is_reducing_and_entries_do_not(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT", "BBB/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    rig.monitor.update(rig.clock.now(), {"futures": D(100)})
    rig.monitor.update(rig.clock.now(), {"futures": D(90)})  # a 10% day: the breaker trips
    assert str(rig.monitor.trading_state) == "reducing"
    rig.feed.trend("BBB/USDT", PositionSide.LONG)
    rig.feed.price("AAA/USDT", "96.9")
    await rig.clock.advance(61)
    await rig.step()
    assert [r for r, _, _ in await rig.exits()] == ["stop-loss"]
    assert await rig.ledger.positions("futures") == []
    assert rig.engine.counters.denied == 1  # the BBB entry, at the gate


# --- the futures portfolio's day -------------------------------------------------------------------------


async def test_emergency_close_at_five_percent_of_the_day_and_no_entries_until_tomorrow(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT", "BBB/USDT"], futures_risk_per_trade_pct=3.0,
                              futures_max_correlated_positions=5)
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    rig.feed.trend("BBB/USDT", PositionSide.LONG)
    await rig.step()
    assert [p.amount for p in await rig.ledger.positions("futures")] == [D(90), D(90)]  # 9 000 each
    rig.feed.price("AAA/USDT", "97.2")
    rig.feed.price("BBB/USDT", "97.2")  # -2.8% each: 504 of 10 000 lost (with fees): over 5%
    await rig.step()
    exits = await rig.exits()
    assert len(exits) == 2 and all(r.startswith("emergency") for r, _, _ in exits)
    assert rig.engine.get_status()["emergency_today"] is True
    # The same day: the market looks as good as before, but nothing is entered.
    await rig.clock.advance(120)
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    assert await rig.ledger.positions("futures") == []
    # A restart the same day remembers it.
    engine = rig.restart()
    await engine.load_state()
    await rig.step()
    assert await rig.ledger.positions("futures") == []
    # A new UTC day: a new baseline, entries again.
    await rig.clock.advance(START + DAY_SECONDS + 60 - rig.clock.now())
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    assert len(await rig.ledger.positions("futures")) == 1
    assert rig.engine.get_status()["emergency_today"] is False


async def test_a_loss_under_the_emergency_limit_closes_nothing(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"], futures_risk_per_trade_pct=3.0)
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    rig.feed.price("AAA/USDT", "97.1")  # -2.9% of 9 000 = 261 (+ fees): 2.7% of the day
    await rig.step()
    assert await rig.position_amount("AAA/USDT") == D(90)
    assert rig.engine.day_pnl < 0


# --- the loop ----------------------------------------------------------------------------------------------


async def test_the_run_loop_monitors_every_few_seconds_and_stops_when_asked(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    engine = rig.engine
    task = asyncio.ensure_future(engine.start())
    try:
        rig.feed.trend("AAA/USDT", PositionSide.LONG)
        await until(lambda: engine.counters.entries == 1)
        steps = engine.counters.steps
        await until(lambda: rig.clock.pending_sleeps() > 0)
        await rig.clock.advance(5.0)  # no new data: the loop still turns after wait_seconds
        await until(lambda: engine.counters.steps > steps)
        assert rig.ctx.health.age("futures") == 0
        rig.feed.price("AAA/USDT", "96.5")
        await until(lambda: engine.counters.exits == 1)
    finally:
        engine.stop()
        rig.feed.signal.bump()
        await until(task.done)
        await task
    assert await rig.ledger.positions("futures") == []


async def test_a_position_closed_outside_the_engine_is_dropped_at_the_next_step(make_rig: Any) -> None:
    rig: Rig = await make_rig(["AAA/USDT"])
    rig.feed.trend("AAA/USDT", PositionSide.LONG)
    await rig.step()
    [position] = await rig.ledger.positions("futures")
    # The Orchestrator's flattening (kill switch) sends its own reduce-only order, not through the engine.
    result = await rig.ctx.orders.submit(OrderIntent(
        engine="futures", market=MarketType.FUTURES, symbol="AAA/USDT", side=Side.SELL, amount=position.amount,
        reduce_only=True, system_flatten=True, reason="flatten: kill"))
    assert result.filled == position.amount
    assert "AAA/USDT" in rig.engine.positions  # the engine has not looked yet
    rig.feed.price("AAA/USDT", "96")  # would be a forced exit of a position that no longer exists
    await rig.step()
    assert rig.engine.positions == {} and await rig.exits() == [("flatten: kill", position.amount, True)]
    assert rig.allocator.exposure("futures") == 0


def test_inconsistent_settings_are_reported_one_line_each() -> None:
    s = Settings(_env_file=None, futures_ema_fast=30, futures_ema_slow=20,  # type: ignore[call-arg]
                 futures_max_stop_pct=5.0, futures_leverage_mid_confidence=90.0)
    problems = settings_problems(s)
    assert len(problems) == 3
    assert any(p.startswith("FUTURES_EMA_FAST (30) must be below FUTURES_EMA_SLOW") for p in problems)
    assert any("FUTURES_FORCE_CLOSE_PCT" in p for p in problems)
    assert any("FUTURES_LEVERAGE_HIGH_CONFIDENCE" in p for p in problems)
    assert settings_problems(Settings(_env_file=None)) == []  # type: ignore[call-arg]
