"""The spot engine's exits with a protective stop resting on the (paper) exchange: a take-profit cancels the
stop and sells exactly once; a stop-loss is left to the exchange's stop and the engine never sells the
same coins again; a restart re-places a missing stop."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from config import load_settings
from core.clock import SimClock
from core.errors import DependencyError, TemporaryError
from core.events import EventBus
from core.types import CandleSeries, Fill, MarketType, Order, OrderState, OrderType, Side, Ticker
from engines import spot as spot_module
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

SYMBOL = "BTC/USDT"


class ScriptedFeed:
    """One symbol whose price the test sets."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self._ticker: Ticker | None = None
        self.version = 0
        self.symbols = [SYMBOL]
        self.finished = False

    def set_price(self, price: str) -> None:
        p = Decimal(price)
        self._ticker = Ticker(SYMBOL, bid=p, ask=p, last=p, ts=self.clock.now())
        self.version += 1

    def ticker(self, symbol: str) -> Ticker | None:
        return self._ticker if symbol == SYMBOL else None

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None:
        closes = np.full(60, float(self._ticker.last if self._ticker else 100))
        ts = np.arange(60, dtype=np.float64) * 300
        return CandleSeries(symbol, timeframe, ts, closes, closes, closes, closes, np.ones(60), self.clock.now())

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def wait_update(self, after: int, timeout: float) -> int:
        await asyncio.sleep(0)
        return self.version


@dataclass
class Rig:
    engine: SpotEngine
    ctx: EngineContext
    exchange: PaperExchange
    feed: ScriptedFeed
    ledger: Ledger
    sells: list[OrderType]
    late: set[asyncio.Task[None]]

    async def settle(self) -> None:
        """Let the exchange work resting orders at the current price and record late fills."""
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


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = SimClock()
    settings = load_settings(env_file=None, data_dir=tmp_path)
    feed = ScriptedFeed(clock)
    feed.set_price("100")
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    exchange = PaperExchange(MarketType.SPOT, feed, clock, paper_markets([SYMBOL]),  # type: ignore[arg-type]
                             {"USDT": Decimal(10_000)}, taker_fee_pct=Decimal("0.1"),
                             maker_fee_pct=Decimal("0.1"), slippage_bps=Decimal(0))
    await exchange.load_markets()
    sells: list[OrderType] = []
    original = exchange.create_order

    async def recording(request):  # type: ignore[no-untyped-def]
        if request.side is Side.SELL:
            sells.append(request.order_type)
        return await original(request)

    exchange.create_order = recording  # type: ignore[method-assign]
    bus = EventBus()
    allocator = CapitalAllocator({"spot": 100.0}, ["spot"])
    monitor = GlobalRiskMonitor(RiskLimits.from_settings(settings))
    monitor.update(clock.now(), {"spot": Decimal(10_000)})
    gate = RiskGate(monitor, allocator, {"spot": EngineLimits(max_positions=3)})
    health = HealthMonitor(clock, 60, 300)
    health.register("spot")
    orders = OrderManager("spot", exchange, ledger, bus, clock)
    ctx = EngineContext(name="spot", settings=settings, clock=clock, bus=bus, ledger=ledger,
                        exchange=exchange, feed=feed, gate=gate, allocator=allocator,  # type: ignore[arg-type]
                        health=health, orders=orders, equity=lambda: Decimal(10_000))
    orders.on_position_change = ctx.note_position_change
    late: set[asyncio.Task[None]] = set()

    async def late_fill(update):  # type: ignore[no-untyped-def]
        order = await ledger.get_order(update.client_order_id)
        assert order is not None
        await orders.apply_update(order, update, notify=True)

    def on_fill(update):  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(late_fill(update))
        late.add(task)
        task.add_done_callback(late.discard)

    exchange.on_fill = on_fill
    engine = SpotEngine(ctx)
    engine.symbols = [SYMBOL]
    await engine.load_state()
    try:
        yield Rig(engine, ctx, exchange, feed, ledger, sells, late)
    finally:
        await ledger.close()


async def enter(rig: Rig) -> None:
    ticker = rig.feed.ticker(SYMBOL)
    assert ticker is not None
    await rig.engine.enter(SYMBOL, ticker, "test entry")
    position = rig.engine.positions[SYMBOL]
    stop_id = position.meta.get("stop_order")
    assert stop_id, "the engine's own copy of the position knows its protective stop"
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None and stop.state is OrderState.OPEN and stop.order_type is OrderType.STOP_MARKET
    assert stop.stop_price == position.stop_loss and stop.amount == position.amount


async def test_take_profit_cancels_the_stop_then_sells_once(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    rig.feed.set_price("103")  # above the 2% take-profit
    await rig.settle()
    await rig.step()
    await rig.settle()
    assert await rig.ledger.positions("spot") == []
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET], "one protective stop, one market sell"
    assert not [o for o in await rig.ledger.recent_orders(20) if o.state is OrderState.REJECTED]
    await rig.step()  # the engine notices the close...
    await rig.engine.refresh_metrics()  # ...and its loop refreshes the trade metrics (throttled)
    stored = await rig.ledger.get_state("metrics:spot")
    assert stored is not None and stored["overall"]["trades"] == 1 and stored["overall"]["wins"] == 1
    assert rig.engine.get_status()["metrics"]["by_symbol"][SYMBOL]["trades"] == 1


async def test_stop_loss_is_the_exchanges_and_the_engine_never_sells_again(rig: Rig) -> None:
    await enter(rig)
    rig.feed.set_price("97")  # below the 1.5% stop
    await rig.settle()  # the exchange's stop fires and its fill is recorded
    for _ in range(3):
        await rig.step()
        await rig.settle()
    assert await rig.ledger.positions("spot") == []
    assert rig.sells == [OrderType.STOP_MARKET], "no market sell on top of the exchange's stop"
    assert not [o for o in await rig.ledger.recent_orders(20) if o.state is OrderState.REJECTED]


async def test_a_restarted_engine_replaces_a_missing_stop(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None
    await rig.ctx.orders.cancel(stop)  # e.g. cancelled by hand on the exchange while we were down
    fresh = SpotEngine(rig.ctx)
    fresh.symbols = [SYMBOL]
    await fresh.load_state()
    new_id = fresh.positions[SYMBOL].meta.get("stop_order")
    assert new_id and new_id != stop_id
    assert (await rig.ledger.get_order(new_id)).state is OrderState.OPEN  # type: ignore[union-attr]


# --- recovery: an unlinked stop, a refused stop, a remainder too small to sell ---------------------


async def test_a_stop_left_unlinked_by_a_crash_is_adopted_not_doubled(rig: Rig) -> None:
    """A kill between the stop's answer and saving its id leaves the stop open on the exchange and the
    position without a link. The restarted engine must adopt it (a second stop would be refused: the
    first holds the coins) and a take-profit must cancel it before selling."""
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    assert await rig.ledger.update_position("spot", SYMBOL, meta={})  # the link never got saved
    fresh = SpotEngine(rig.ctx)
    fresh.symbols = [SYMBOL]
    await fresh.load_state()
    assert fresh.positions[SYMBOL].meta.get("stop_order") == stop_id
    assert (await rig.ledger.positions("spot"))[0].meta.get("stop_order") == stop_id, "the link is saved"
    assert rig.sells == [OrderType.STOP_MARKET], "no second stop was sent"
    rig.engine = fresh
    rig.feed.set_price("103")
    await rig.settle()
    await rig.step()
    await rig.settle()
    assert await rig.ledger.positions("spot") == []
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET]
    assert not [o for o in await rig.ledger.recent_orders(20) if o.state is OrderState.REJECTED]


async def test_a_refused_stop_is_placed_again_with_backoff_while_running(rig: Rig) -> None:
    refusals = 2
    original = rig.exchange.create_order

    async def flaky(request):  # type: ignore[no-untyped-def]
        nonlocal refusals
        if request.order_type is OrderType.STOP_MARKET and refusals > 0:
            refusals -= 1
            raise DependencyError("exchange refused the stop (test)")
        return await original(request)

    rig.exchange.create_order = flaky  # type: ignore[method-assign]
    ticker = rig.feed.ticker(SYMBOL)
    assert ticker is not None
    await rig.engine.enter(SYMBOL, ticker, "test entry")
    assert not rig.engine.positions[SYMBOL].meta.get("stop_order")
    clock = rig.ctx.clock
    assert isinstance(clock, SimClock)
    await rig.step()
    assert refusals == 1, "not retried before the backoff has passed"
    clock.set(clock.now() + spot_module.STOP_RETRY_SECONDS)
    await rig.step()
    assert refusals == 0, "retried once the backoff passed, refused again"
    assert not rig.engine.positions[SYMBOL].meta.get("stop_order")
    clock.set(clock.now() + spot_module.STOP_RETRY_SECONDS)
    await rig.step()
    assert not rig.engine.positions[SYMBOL].meta.get("stop_order"), "the backoff doubled after a second refusal"
    clock.set(clock.now() + spot_module.STOP_RETRY_SECONDS)
    await rig.step()
    stop_id = rig.engine.positions[SYMBOL].meta.get("stop_order")
    assert stop_id, "placed at last"
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None and stop.state is OrderState.OPEN and stop.amount == rig.engine.positions[SYMBOL].amount
    for _ in range(3):
        clock.set(clock.now() + 60)
        await rig.step()
    stops = [o for o in await rig.ledger.recent_orders(20) if o.order_type is OrderType.STOP_MARKET]
    assert [o.state for o in stops].count(OrderState.OPEN) == 1, "a live stop is never doubled"


async def _dust_position(rig: Rig) -> None:
    """A round trip with the buy's fee taken in BTC (Binance's default) and the sale rounded down to
    the market's step: a tenth of a step is left over."""
    market = rig.exchange.market(SYMBOL)
    step = market.amount_step
    bought = step * 1000
    fee = step / 10  # the fee leaves the position at 999.9 steps
    buy = Fill(client_order_id="buy-1", trade_id="t1", engine="spot", market=MarketType.SPOT, symbol=SYMBOL,
               side=Side.BUY, amount=bought, price=Decimal(100), fee=fee, fee_asset="BTC", ts=rig.ctx.clock.now())
    await rig.ledger.record_fill(buy)
    held = bought - fee
    sold = (held // step) * step
    sell = Fill(client_order_id="sell-1", trade_id="t2", engine="spot", market=MarketType.SPOT, symbol=SYMBOL,
                side=Side.SELL, amount=sold, price=Decimal(110), fee=Decimal("0.01"), fee_asset="USDT",
                ts=rig.ctx.clock.now(), reduce_only=True)
    result = await rig.ledger.record_fill(sell)
    assert result.position is not None and 0 < result.position.amount < step, "the fee left a sub-step remainder"


async def test_a_remainder_below_the_minimum_is_written_off_and_frees_the_symbol(rig: Rig) -> None:
    await _dust_position(rig)
    remainder = (await rig.ledger.positions("spot"))[0]
    await rig.engine.refresh_positions()
    await rig.step()
    assert await rig.ledger.positions("spot") == [], "the remainder no longer counts as a position"
    assert SYMBOL not in rig.engine.positions
    trade = (await rig.ledger.closed_trades("spot"))[0]
    # The round trip's P&L is its cash P&L: sales in, buys and fees out; the unsold remainder's cost
    # is a loss.
    cash = (await rig.ledger.fills("spot"))
    buy, sell = cash
    expected = sell.amount * sell.price - buy.amount * buy.price - sell.fee
    assert trade.realized_pnl == expected
    assert await rig.ledger.realized_pnl("spot") == expected
    journal = await rig.ledger.read_journal("PositionWrittenOff")
    assert journal and journal[0]["payload"]["amount"] == str(remainder.amount)
    # The symbol trades again: a fresh entry is neither blocked nor stacked on the remainder.
    await enter(rig)
    assert rig.engine.positions[SYMBOL].amount > remainder.amount * 1000


async def test_a_remainder_found_at_start_up_is_written_off_before_protecting(rig: Rig) -> None:
    await _dust_position(rig)
    fresh = SpotEngine(rig.ctx)
    fresh.symbols = [SYMBOL]
    await fresh.load_state()
    assert fresh.positions == {} and await rig.ledger.positions("spot") == []
    assert rig.sells == [], "no stop was tried for coins that cannot be sold"


async def test_a_stop_whose_send_stayed_unknown_is_settled_and_adopted_not_doubled(rig: Rig) -> None:
    """A stop whose send never got a clear answer (the exchange stopped answering long enough for the
    order manager to give up) may be resting on the exchange: it is asked for, then adopted."""
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    await rig.ledger.update_order(stop_id, state=OrderState.UNKNOWN)
    assert await rig.ledger.update_position("spot", SYMBOL, meta={})
    rig.engine.positions[SYMBOL].meta = {}
    await rig.engine.protect(rig.engine.positions[SYMBOL], force=True)
    assert rig.engine.positions[SYMBOL].meta.get("stop_order") == stop_id
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.OPEN  # type: ignore[union-attr]
    assert rig.sells == [OrderType.STOP_MARKET], "no second stop was sent"


async def test_a_stop_that_does_not_fit_the_position_is_replaced_not_adopted(rig: Rig) -> None:
    await enter(rig)
    old_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    old = await rig.ledger.get_order(old_id)
    assert old is not None
    # The ledger's position shrank (part of it sold elsewhere, adopted as a foreign fill) while the
    # resting stop still covers the first amount: adopting it would sell more than the position.
    await rig.ledger.record_fill(Fill(client_order_id="by-hand", trade_id="hand-1", engine="spot",
                                      market=MarketType.SPOT, symbol=SYMBOL, side=Side.SELL, amount=Decimal("5"),
                                      price=Decimal(100), fee=Decimal(0), fee_asset="USDT", ts=rig.ctx.clock.now()))
    await rig.engine.refresh_positions()
    await rig.ledger.update_position("spot", SYMBOL, meta={})
    position = rig.engine.positions[SYMBOL]
    position.meta = {}
    await rig.engine.protect(position, force=True)
    new_id = rig.engine.positions[SYMBOL].meta.get("stop_order")
    assert new_id and new_id != old_id
    assert (await rig.ledger.get_order(old_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    new = await rig.ledger.get_order(new_id)
    assert new is not None and new.state is OrderState.OPEN and new.amount == rig.engine.positions[SYMBOL].amount


async def test_a_remainder_is_not_written_off_while_an_order_still_works_on_it(rig: Rig) -> None:
    """A partly filled stop goes on selling: writing the position off under it would turn its next
    fill into a phantom short."""
    await _dust_position(rig)
    now = rig.ctx.clock.now()
    await rig.ledger.insert_order(Order(
        client_order_id="stop-working", engine="spot", market=MarketType.SPOT, symbol=SYMBOL, side=Side.SELL,
        order_type=OrderType.STOP_MARKET, amount=Decimal("0.01"), price=None, stop_price=Decimal(90),
        reduce_only=True, state=OrderState.PARTIALLY_FILLED, created_at=now, updated_at=now))
    await rig.engine.refresh_positions()
    await rig.step()
    assert len(await rig.ledger.positions("spot")) == 1
    await rig.ledger.update_order("stop-working", state=OrderState.CANCELED)
    await rig.step()
    assert await rig.ledger.positions("spot") == []


async def test_a_position_worth_less_than_the_minimum_notional_is_written_off(rig: Rig) -> None:
    market = rig.exchange.market(SYMBOL)
    steps = market.amount_step * 2  # sellable by amount, but far below 5 USDT at 100
    await rig.ledger.record_fill(Fill(client_order_id="tiny", trade_id="tiny-1", engine="spot",
                                      market=MarketType.SPOT, symbol=SYMBOL, side=Side.BUY, amount=steps,
                                      price=Decimal(100), fee=Decimal(0), fee_asset="USDT", ts=rig.ctx.clock.now()))
    assert steps * 100 < market.min_notional
    await rig.engine.refresh_positions()
    await rig.step()
    assert await rig.ledger.positions("spot") == []
    assert rig.sells == [], "no order below the minimum was tried"


async def test_a_new_position_does_not_inherit_an_old_stop_backoff(rig: Rig) -> None:
    refusals = 1
    original = rig.exchange.create_order

    async def refuse_once(request):  # type: ignore[no-untyped-def]
        nonlocal refusals
        if request.order_type is OrderType.STOP_MARKET and refusals > 0:
            refusals -= 1
            raise DependencyError("exchange refused the stop (test)")
        return await original(request)

    rig.exchange.create_order = refuse_once  # type: ignore[method-assign]
    rig.engine._stop_backoff[SYMBOL] = spot_module.STOP_RETRY_MAX_SECONDS  # earned by an earlier position
    ticker = rig.feed.ticker(SYMBOL)
    assert ticker is not None
    await rig.engine.enter(SYMBOL, ticker, "test entry")
    assert refusals == 0 and not rig.engine.positions[SYMBOL].meta.get("stop_order")
    clock = rig.ctx.clock
    assert isinstance(clock, SimClock)
    clock.set(clock.now() + spot_module.STOP_RETRY_SECONDS)
    await rig.step()
    assert rig.engine.positions[SYMBOL].meta.get("stop_order"), "retried after the first backoff, not 5 min"


async def test_while_halted_the_engine_leaves_the_stop_to_the_flattening(rig: Rig) -> None:
    """HALTED refuses the engine's own sell and any new stop: cancelling the stop for a take-profit
    would leave the position with none until the Orchestrator's flattening got to it."""
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    monitor = rig.ctx.gate._monitor
    monitor.kill(rig.ctx.clock.now(), "kill by test")
    rig.feed.set_price("103")  # past the take-profit
    await rig.settle()
    await rig.step()
    await rig.settle()
    assert len(await rig.ledger.positions("spot")) == 1
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.OPEN  # type: ignore[union-attr]
    assert rig.sells == [OrderType.STOP_MARKET]


async def test_an_entry_filled_after_its_answer_gets_levels_and_a_stop(rig: Rig) -> None:
    """The exchange may answer a market buy as accepted and fill it a moment later: `enter` sees no
    fill, and the position arrives through the order poll without exit levels. The next step gives it
    levels from its entry price and puts its stop on the exchange."""
    original = rig.exchange.create_order

    async def accepted_only(request):  # type: ignore[no-untyped-def]
        update = await original(request)
        if request.order_type is OrderType.MARKET and request.side is Side.BUY:
            return dataclasses.replace(update, state=OrderState.OPEN, filled=Decimal(0), avg_price=None,
                                       fills=())
        return update

    rig.exchange.create_order = accepted_only  # type: ignore[method-assign]
    ticker = rig.feed.ticker(SYMBOL)
    assert ticker is not None
    await rig.engine.enter(SYMBOL, ticker, "test entry")
    assert rig.engine.positions == {}
    assert await rig.ctx.orders.poll_open_orders() == 1  # the fill reaches the ledger
    [position] = await rig.ledger.positions("spot")
    assert position.stop_loss is None
    await rig.step()
    [position] = await rig.ledger.positions("spot")
    assert position.stop_loss is not None and position.take_profit is not None
    assert position.stop_loss < position.entry_price < position.take_profit
    stop = await rig.ledger.get_order(position.meta["stop_order"])
    assert stop is not None and stop.state is OrderState.OPEN and stop.stop_price == position.stop_loss
    assert rig.sells == [OrderType.STOP_MARKET]


async def test_while_halted_a_stop_that_does_not_fit_is_not_cancelled(rig: Rig) -> None:
    """Replacing a stop that no longer fits the position cancels it first; while HALTED the replacement
    would be refused, so the engine leaves the stop as it is (the flattening deals with the position)."""
    await enter(rig)
    old_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    # Part of the position sold by hand (a foreign fill): the resting stop no longer fits.
    await rig.ledger.record_fill(Fill(client_order_id="by-hand", trade_id="hand-1", engine="spot",
                                      market=MarketType.SPOT, symbol=SYMBOL, side=Side.SELL, amount=Decimal("5"),
                                      price=Decimal(100), fee=Decimal(0), fee_asset="USDT",
                                      ts=rig.ctx.clock.now()))
    await rig.engine.refresh_positions()
    await rig.ledger.update_position("spot", SYMBOL, meta={})
    rig.engine.positions[SYMBOL].meta = {}
    rig.ctx.gate._monitor.kill(rig.ctx.clock.now(), "kill by test")
    await rig.engine.protect(rig.engine.positions[SYMBOL], force=True)
    assert (await rig.ledger.get_order(old_id)).state is OrderState.OPEN  # type: ignore[union-attr]
    assert rig.sells == [OrderType.STOP_MARKET]
    assert SYMBOL not in rig.engine._stop_backoff, "no backoff earned by a refusal that outlives the halt"


async def test_an_entry_left_unknown_blocks_another_entry_until_it_settles(rig: Rig) -> None:
    """A buy whose send got no answer may have filled: a second buy of the symbol would double the
    position once both did. Entries of the symbol wait until the first one is settled."""
    original = rig.exchange.create_order
    buys: list[str] = []

    async def answer_lost(request):  # type: ignore[no-untyped-def]
        update = await original(request)  # placed and filled on the exchange...
        if request.order_type is OrderType.MARKET and request.side is Side.BUY:
            buys.append(request.client_order_id)
            raise TimeoutError("answer lost (test)")  # ...but the answer never arrives
        return update

    async def unreachable(symbol, client_order_id):  # type: ignore[no-untyped-def]
        raise TemporaryError("exchange unreachable (test)")

    real_fetch = rig.exchange.fetch_order
    rig.exchange.create_order = answer_lost  # type: ignore[method-assign]
    rig.exchange.fetch_order = unreachable  # type: ignore[method-assign]
    rig.ctx.orders.max_resolve_seconds = 0.0  # the resolution gives up at its first unanswered question
    ticker = rig.feed.ticker(SYMBOL)
    assert ticker is not None
    await rig.engine.enter(SYMBOL, ticker, "test entry")
    assert await rig.engine.entry_in_doubt(SYMBOL)
    rig.exchange.fetch_order = real_fetch  # type: ignore[method-assign]
    assert await rig.ctx.orders.poll_open_orders() == 1  # settled: it had filled
    assert not await rig.engine.entry_in_doubt(SYMBOL)
    assert len(buys) == 1
