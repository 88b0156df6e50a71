"""Denials in a row: a tripped breaker refuses every entry signal for its whole cooldown. Each denial is
still counted and published (`OrderDenied`), but the log says it once, then once more with the count
when the run ends, instead of a line per signal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from config import load_settings
from core.clock import SimClock
from core.events import EventBus, OrderDenied, Subscription
from core.types import MarketType, OrderIntent, OrderType, Side, Ticker, TradingState
from engines.base import EngineContext
from engines.spot import SpotEngine
from exchange.markets import paper_markets
from exchange.orders import OrderManager
from exchange.paper import PaperExchange
from monitoring.health import HealthMonitor
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits
from storage.ledger import Ledger

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
EQUITY = Decimal(10_000)


class PriceFeed:
    """Fixed prices: the test calls `engine.trade` itself, so only the paper exchange reads them."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.symbols = SYMBOLS
        self.version = 0
        self.finished = False

    def ticker(self, symbol: str) -> Ticker | None:
        return Ticker(symbol, bid=Decimal(100), ask=Decimal(100), last=Decimal(100), ts=self.clock.now())

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> None:
        return None

    async def wait_update(self, after: int, timeout: float) -> int:
        await asyncio.sleep(0)
        return self.version


@dataclass
class Rig:
    engine: SpotEngine
    monitor: GlobalRiskMonitor
    gate: RiskGate
    clock: SimClock
    denials: Subscription

    def denied_events(self) -> list[OrderDenied]:
        events: list[OrderDenied] = []
        while not self.denials.queue.empty():
            event = self.denials.queue.get_nowait()
            assert isinstance(event, OrderDenied)
            events.append(event)
        return events


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = SimClock()
    settings = load_settings(env_file=None, data_dir=tmp_path, spot_symbols=SYMBOLS)
    feed = PriceFeed(clock)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    exchange = PaperExchange(MarketType.SPOT, feed, clock, paper_markets(SYMBOLS),  # type: ignore[arg-type]
                             {"USDT": EQUITY}, taker_fee_pct=Decimal("0.1"), maker_fee_pct=Decimal("0.1"),
                             slippage_bps=Decimal(0))
    await exchange.load_markets()
    bus = EventBus()
    denials = bus.subscribe("test", kinds=frozenset({OrderDenied}))
    allocator = CapitalAllocator({"spot": 100.0}, ["spot"])
    monitor = GlobalRiskMonitor(RiskLimits.from_settings(settings))
    monitor.update(clock.now(), {"spot": EQUITY})
    gate = RiskGate(monitor, allocator, {"spot": EngineLimits(max_positions=5)})
    health = HealthMonitor(clock, 60, 300)
    health.register("spot")
    orders = OrderManager("spot", exchange, ledger, bus, clock)
    await orders.reserve_ids()
    ctx = EngineContext(name="spot", settings=settings, clock=clock, bus=bus, ledger=ledger,
                        exchange=exchange, feed=feed, gate=gate, allocator=allocator,  # type: ignore[arg-type]
                        health=health, orders=orders, equity=lambda: EQUITY)
    try:
        yield Rig(SpotEngine(ctx), monitor, gate, clock, denials)
    finally:
        await ledger.close()


def buy(symbol: str = "BTC/USDT") -> OrderIntent:
    return OrderIntent(engine="spot", market=MarketType.SPOT, symbol=symbol, side=Side.BUY,
                       amount=Decimal("1"), order_type=OrderType.MARKET, notional=Decimal(100),
                       reason="test entry")


def lines(logs: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [entry for entry in logs if entry["event"] == event]


def trip(rig: Rig) -> None:
    rig.monitor.update(rig.clock.now(), {"spot": EQUITY * Decimal("0.93")})  # past the 5 % daily loss
    assert rig.monitor.trading_state is TradingState.REDUCING


async def test_a_tripped_breaker_logs_its_denials_once_and_the_count_when_they_end(rig: Rig) -> None:
    trip(rig)
    with capture_logs() as logs:
        for _ in range(25):
            assert await rig.engine.trade(buy()) is None
        assert rig.engine.counters.denied == 25
        assert len(rig.denied_events()) == 25  # every denial is still an event (the journal keeps each)
        assert len(lines(logs, "order denied")) == 1
        assert "breaker tripped" in str(lines(logs, "order denied")[0]["reason"])
        assert lines(logs, "order denials ended") == []

        rig.monitor.reset_breaker(rig.clock.now(), EQUITY * Decimal("0.93"))
        result = await rig.engine.trade(buy())
    assert result is not None and result.filled > 0
    ended = lines(logs, "order denials ended")
    assert len(ended) == 1
    assert ended[0]["denied"] == 25
    assert ended[0]["rule"] == "reducing"
    assert ended[0]["ended_by"] == "order passed the gate"


async def test_runs_are_per_symbol_and_a_new_rule_starts_a_new_run(rig: Rig) -> None:
    trip(rig)
    with capture_logs() as logs:
        for _ in range(3):
            await rig.engine.trade(buy("BTC/USDT"))
            await rig.engine.trade(buy("ETH/USDT"))
        assert [line["symbol"] for line in lines(logs, "order denied")] == ["BTC/USDT", "ETH/USDT"]

        rig.monitor.reset_breaker(rig.clock.now(), EQUITY * Decimal("0.93"))
        rig.gate.set_paused("spot", True)  # another rule: its first denial is logged, the old run ends
        await rig.engine.trade(buy("BTC/USDT"))
    denied = lines(logs, "order denied")
    assert [(line["symbol"], line["reason"]) for line in denied[2:]] == [("BTC/USDT", "engine paused")]
    ended = lines(logs, "order denials ended")
    assert [(line["symbol"], line["rule"], line["denied"], line["ended_by"]) for line in ended] == [
        ("BTC/USDT", "reducing", 3, "another rule denies")
    ]
    assert rig.engine.counters.denied == 7


async def test_a_single_denial_needs_no_closing_line(rig: Rig) -> None:
    rig.gate.set_paused("spot", True)
    with capture_logs() as logs:
        await rig.engine.trade(buy())
        rig.gate.set_paused("spot", False)
        result = await rig.engine.trade(buy())
    assert result is not None and result.filled > 0
    assert len(lines(logs, "order denied")) == 1
    assert lines(logs, "order denials ended") == []


async def test_a_run_still_open_when_the_engine_stops_is_logged_with_its_count(rig: Rig) -> None:
    trip(rig)
    with capture_logs() as logs:
        task = asyncio.create_task(rig.engine.start())
        for _ in range(4):
            await rig.engine.trade(buy())
        rig.engine.stop()
        await asyncio.wait_for(task, 5)
    ended = lines(logs, "order denials ended")
    assert [(line["denied"], line["ended_by"]) for line in ended] == [(4, "engine stopped")]
    assert [e["event"] for e in logs].index("order denials ended") < [e["event"] for e in logs].index(
        "engine stopped")
