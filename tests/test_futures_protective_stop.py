"""The futures engine's protective stops resting on the (paper) USD-M exchange, long and short: an entry
places a reduce-only STOP_MARKET for the whole position; a move through the stop is closed by that order
alone; a trailing move or a partial take-profit re-places it new-first (never a moment without a stop)
and only when the level moved enough; an engine exit cancels it first and closes exactly once, and not
at all when the cancel shows the stop already filled; a restart re-places a missing stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from core.clock import SimClock
from core.errors import OrderRejected
from core.events import EventBus
from core.types import MarketType, Order, OrderState, OrderType, Position, PositionSide
from engines.base import EngineContext
from engines.futures import META_STOP_ORDER, FuturesEngine
from exchange.base import OrderRequest, OrderUpdate
from exchange.markets import paper_markets
from exchange.orders import OrderManager
from exchange.paper_futures import PaperFuturesExchange
from monitoring.health import HealthMonitor
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits
from storage.ledger import Ledger
from tests.test_futures_engine import PORTFOLIO, START, ScriptedFeed

D = Decimal
SYMBOL = "AAA/USDT"
SIDES = [PositionSide.LONG, PositionSide.SHORT]


def px(side: PositionSide, move_pct: str) -> str:
    """The price `move_pct` percent in the position's favour from the entry at 100 (negative: against)."""
    move = D(move_pct)
    return str(D(100) + move if side is PositionSide.LONG else D(100) - move)


@dataclass
class Rig:
    clock: SimClock
    feed: ScriptedFeed
    ledger: Ledger
    exchange: PaperFuturesExchange
    ctx: EngineContext
    engine: FuturesEngine
    side: PositionSide
    # ("create", order type, reduce-only, client id) / ("cancel", client id), and after each call how
    # many protective stops rest on the exchange.
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    resting_after_call: list[int] = field(default_factory=list)
    late: set[asyncio.Task[None]] = field(default_factory=set)

    async def settle(self) -> None:
        """The exchange works resting orders at the current price; their fills reach the ledger."""
        self.exchange.process_prices()
        for _ in range(20):
            await asyncio.sleep(0)
        if self.late:
            await asyncio.wait(set(self.late))

    async def step(self) -> None:
        # what BaseEngine.start does around each step
        if self.engine._seen_changes != self.ctx.position_changes:
            self.engine._seen_changes = self.ctx.position_changes
            await self.engine.refresh_positions()
        await self.engine.step()

    async def price(self, move_pct: str) -> None:
        self.feed.price(SYMBOL, px(self.side, move_pct))

    async def position(self) -> Position | None:
        rows = {p.symbol: p for p in await self.ledger.positions("futures")}
        return rows.get(SYMBOL)

    async def live_stops(self) -> list[Order]:
        orders = await self.ledger.orders_in_states([OrderState.OPEN], engine="futures")
        return [o for o in orders if o.order_type is OrderType.STOP_MARKET]

    async def the_stop(self) -> Order:
        """The one live stop, which must be the one the position records."""
        position = await self.position()
        assert position is not None
        [stop] = await self.live_stops()
        assert position.meta[META_STOP_ORDER] == stop.client_order_id
        assert self.engine.positions[SYMBOL].meta[META_STOP_ORDER] == stop.client_order_id
        return stop

    def closes(self) -> list[OrderType]:
        """Every reduce-only order sent that is not a protective stop: the engine's own closes."""
        return [c[1] for c in self.calls if c[0] == "create" and c[2] and c[1] is not OrderType.STOP_MARKET]

    async def exchange_stops(self) -> int:
        """Protective stops resting on the exchange, as the exchange itself reports them."""
        resting = await self.exchange.fetch_open_orders([SYMBOL])
        return len([o for o in resting if o.order_type is OrderType.STOP_MARKET and o.reduce_only])


@pytest.fixture
async def make_rig(tmp_path: Path) -> Any:
    ledgers: list[Ledger] = []

    async def build(side: PositionSide, **overrides: Any) -> Rig:
        clock = SimClock(start=START + 600)
        settings = Settings(_env_file=None, **{"futures_symbols": [SYMBOL], **overrides})  # type: ignore[call-arg]
        feed = ScriptedFeed(clock, [SYMBOL])
        ledger = await Ledger.open(tmp_path / f"ledger{len(ledgers)}.sqlite3", clock)
        ledgers.append(ledger)
        exchange = PaperFuturesExchange(feed, clock, paper_markets([SYMBOL], MarketType.FUTURES), D(10_000),
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
        orders.on_position_change = ctx.note_position_change
        engine = FuturesEngine(ctx)
        rig = Rig(clock, feed, ledger, exchange, ctx, engine, side)

        create, cancel = exchange.create_order, exchange.cancel_order

        async def recording_create(request: OrderRequest) -> OrderUpdate:
            try:
                return await create(request)
            finally:
                rig.calls.append(("create", request.order_type, request.reduce_only, request.client_order_id))
                rig.resting_after_call.append(await rig.exchange_stops())

        async def recording_cancel(symbol: str, client_order_id: str) -> OrderUpdate:
            try:
                return await cancel(symbol, client_order_id)
            finally:
                rig.calls.append(("cancel", client_order_id))
                rig.resting_after_call.append(await rig.exchange_stops())

        exchange.create_order = recording_create  # type: ignore[method-assign]
        exchange.cancel_order = recording_cancel  # type: ignore[method-assign]

        async def late_fill(update: OrderUpdate) -> None:
            order = await ledger.get_order(update.client_order_id)
            assert order is not None
            await orders.apply_update(order, update, notify=True)

        def on_fill(update: OrderUpdate) -> None:
            task = asyncio.ensure_future(late_fill(update))
            rig.late.add(task)
            task.add_done_callback(rig.late.discard)

        exchange.on_fill = on_fill
        await engine.load_state()
        return rig

    yield build
    for ledger in ledgers:
        await ledger.close()


async def enter(make_rig: Any, side: PositionSide, **overrides: Any) -> Rig:
    rig: Rig = await make_rig(side, **overrides)
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    position = await rig.position()
    assert position is not None and position.side is side
    return rig


# --- the stop after an entry ----------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_an_entry_places_a_reduce_only_stop_for_the_whole_position(make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    position = await rig.position()
    assert position is not None
    stop = await rig.the_stop()
    assert stop.reduce_only and stop.side is side.exit_side
    assert stop.stop_price == position.stop_loss == D(px(side, "-3"))
    assert stop.amount == position.amount
    assert position.meta["initial_amount"] == str(position.amount)  # the exit state's keys are kept
    [resting] = await rig.exchange.fetch_open_orders([SYMBOL])
    assert resting.client_order_id == stop.client_order_id
    assert [c[:3] for c in rig.calls] == [("create", OrderType.MARKET, False),
                                          ("create", OrderType.STOP_MARKET, True)]


# --- a stop-loss is the exchange's --------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_a_move_through_the_stop_is_closed_by_the_exchange_stop_alone(make_rig: Any,
                                                                            side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    stop = await rig.the_stop()
    await rig.price("-3.1")
    await rig.settle()  # the exchange's stop fires and its fill is recorded
    for _ in range(3):
        await rig.step()
        await rig.settle()
    assert await rig.position() is None and rig.engine.positions == {}
    assert await rig.exchange.fetch_positions() == []
    assert rig.closes() == [], "no engine close on top of the exchange's stop"
    done = await rig.ledger.get_order(stop.client_order_id)
    assert done is not None and done.state is OrderState.FILLED and done.filled == stop.amount
    [trade] = await rig.ledger.closed_trades("futures")
    assert trade.realized_pnl < 0


@pytest.mark.parametrize("side", SIDES)
async def test_a_stop_that_filled_unreported_is_seen_at_the_cancel_and_not_sold_again(
        make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    stop = await rig.the_stop()
    rig.exchange.on_fill = None  # the exchange's report of the fill is lost
    await rig.price("-4.5")  # past the forced exit too: the engine wants out at once
    await rig.settle()
    assert await rig.exchange.fetch_positions() == []
    assert await rig.position() is not None, "the ledger does not know yet"
    await rig.step()
    assert await rig.position() is None and rig.engine.positions == {}
    assert rig.closes() == [], "the cancel showed the fill: nothing sold again"
    done = await rig.ledger.get_order(stop.client_order_id)
    assert done is not None and done.state is OrderState.FILLED
    assert rig.engine.get_status()["metrics"]["overall"]["trades"] == 1


# --- engine exits cancel the stop first ---------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_a_forced_exit_cancels_the_stop_first_and_closes_once(make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    stop = await rig.the_stop()
    await rig.price("-4.5")  # a gap past the stop and the -4% forced exit, before the exchange worked it
    await rig.step()
    await rig.settle()
    await rig.step()
    assert await rig.position() is None and await rig.exchange.fetch_positions() == []
    tail = [c[:2] for c in rig.calls[2:]]
    assert tail == [("cancel", stop.client_order_id), ("create", OrderType.MARKET)]
    assert rig.closes() == [OrderType.MARKET]
    cancelled = await rig.ledger.get_order(stop.client_order_id)
    assert cancelled is not None and cancelled.state is OrderState.CANCELED
    assert await rig.exchange_stops() == 0
    filled = await rig.ledger.orders_in_states([OrderState.FILLED], engine="futures")
    assert [o.reason for o in filled if o.reduce_only] == ["force-close"]


@pytest.mark.parametrize("side", SIDES)
async def test_the_emergency_close_cancels_the_stop_first(make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side, futures_risk_per_trade_pct=3.0, futures_emergency_close_pct=2.0)
    stop = await rig.the_stop()
    await rig.price("-2.8")  # -2.8% of 8 000 or more (+ fees): over 2% of the engine's 10 000, inside the stop
    await rig.step()
    assert rig.engine.get_status()["emergency_today"] is True
    assert await rig.position() is None
    assert [c[:2] for c in rig.calls[2:]] == [("cancel", stop.client_order_id), ("create", OrderType.MARKET)]
    assert await rig.exchange_stops() == 0


# --- trailing and partials re-place the stop, new first ---------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_a_partial_take_profit_resizes_the_stop_new_before_old(make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    first = await rig.the_stop()
    await rig.price("1.5")  # +1.5%: 40% taken, and the trail activates
    await rig.step()
    position = await rig.position()
    assert position is not None and D(0) < position.amount < first.amount
    assert position.meta["partials"] == "tp1"
    stop = await rig.the_stop()
    assert stop.amount == position.amount, "the stop covers exactly what is left"
    tail = [c[:2] for c in rig.calls[2:]]
    assert tail == [("create", OrderType.MARKET), ("create", OrderType.STOP_MARKET),
                    ("cancel", first.client_order_id)], "the new stop is placed before the old is cancelled"
    assert (await rig.ledger.get_order(first.client_order_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    assert await rig.exchange_stops() == 1


@pytest.mark.parametrize("side", SIDES)
async def test_the_trailing_stop_moves_the_exchange_stop_throttled_and_never_leaves_it_out(
        make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    await rig.price("1.5")
    await rig.step()
    trailing = await rig.the_stop()
    position = await rig.position()
    assert position is not None
    # the trail is 1% behind the best price, 101.5 (long) or 98.5 (short)
    expected = D("100.4850") if side is PositionSide.LONG else D("99.4850")
    assert trailing.stop_price == expected == rig.engine.protective_level(position)
    stops_before = len([c for c in rig.calls if c[0] == "create" and c[1] is OrderType.STOP_MARKET])
    for move in ("1.52", "1.54", "1.55", "1.53"):  # a tick storm: the trail moves by under 0.1%
        await rig.price(move)
        await rig.step()
    assert len([c for c in rig.calls if c[0] == "create" and c[1] is OrderType.STOP_MARKET]) == stops_before
    assert (await rig.the_stop()).client_order_id == trailing.client_order_id
    await rig.price("2.2")  # the trail moves by about 0.7%: replaced
    await rig.step()
    moved = await rig.the_stop()
    assert moved.client_order_id != trailing.client_order_id
    assert moved.stop_price is not None and trailing.stop_price is not None
    if side is PositionSide.LONG:
        assert moved.stop_price == D("101.1780") > trailing.stop_price
    else:
        assert moved.stop_price == D("98.7780") < trailing.stop_price
    assert rig.engine.get_status()["stop_replacements"] == 2  # the partial's and this one
    # From the first stop to now, the exchange never held zero stops after any call.
    first_stop = next(i for i, c in enumerate(rig.calls) if c[0] == "create" and c[1] is OrderType.STOP_MARKET)
    assert min(rig.resting_after_call[first_stop:]) >= 1
    # The moved stop is the exchange's: a fall through it is closed by it alone.
    await rig.price("1.0")
    await rig.settle()
    await rig.step()
    assert await rig.position() is None
    assert rig.closes() == [OrderType.MARKET], "only the partial take-profit was the engine's"
    assert (await rig.ledger.get_order(moved.client_order_id)).state is OrderState.FILLED  # type: ignore[union-attr]


# --- restarts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_a_restart_replaces_a_missing_stop_and_keeps_a_live_one(make_rig: Any, side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    stop = await rig.the_stop()
    fresh = FuturesEngine(rig.ctx)
    await fresh.load_state()
    rig.engine = fresh
    assert (await rig.the_stop()).client_order_id == stop.client_order_id, "a live stop is not duplicated"
    await rig.ctx.orders.cancel(stop)  # e.g. cancelled by hand on the exchange while the daemon was down
    assert await rig.live_stops() == []
    fresh = FuturesEngine(rig.ctx)
    await fresh.load_state()
    rig.engine = fresh
    replaced = await rig.the_stop()
    position = await rig.position()
    assert position is not None
    assert replaced.client_order_id != stop.client_order_id
    assert replaced.stop_price == position.stop_loss and replaced.amount == position.amount
    assert await rig.exchange_stops() == 1


async def test_a_refused_stop_is_retried_later_not_on_every_tick(make_rig: Any) -> None:
    rig = await enter(make_rig, PositionSide.LONG)
    stop = await rig.the_stop()
    await rig.ctx.orders.cancel(stop)
    working = rig.exchange.create_order
    rig.exchange.create_order = _refusing  # type: ignore[method-assign]
    for _ in range(5):
        await rig.price("0.1")
        await rig.step()
    assert rig.engine.counters.rejected == 1, "one refusal, then a pause before the next try"
    assert await rig.position() is not None and await rig.live_stops() == []
    await rig.clock.advance(61)
    rig.exchange.create_order = working  # type: ignore[method-assign]
    rig.feed.trend(SYMBOL, PositionSide.LONG, 100.1)  # keep the data fresh after the clock moved
    await rig.step()
    assert (await rig.the_stop()).stop_price == D(97)


async def _refusing(request: OrderRequest) -> OrderUpdate:
    raise OrderRejected("service unavailable for stop orders")
