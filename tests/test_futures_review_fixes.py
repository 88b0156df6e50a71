"""Four futures-engine faults a review found, each pinned by the test that showed it, long and short where
the side matters:

- an entry the exchange filled only after answering it (recorded OPEN, filled later through the order
  poll) got no exit levels and so never a protective stop;
- an exit started while trading is HALTED cancelled the exchange's stop, then had its close and the
  stop's replacement denied, leaving the position with no stop;
- a partial take-profit that took everything left closed the position without cancelling its stop,
  leaving a reduce-only STOP_MARKET resting on the exchange and OPEN in the ledger;
- a position closed by the exchange's stop never reached the trade metrics, because
  `FuturesEngine.refresh_positions` did not mark them stale when a position disappeared.

And one found later: an entry in doubt in another symbol did not count against max positions.
"""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal as D
from typing import Any

import pytest

from core.errors import TemporaryError
from core.types import MarketType, Order, OrderState, OrderType, PositionSide, Side, Ticker, TradingState
from exchange.base import OrderRequest, OrderUpdate
from tests import test_futures_protective_stop as protective
from tests.bounded import bounded
from tests.test_futures_engine import until
from tests.test_futures_protective_stop import SIDES, SYMBOL, Rig, enter

make_rig = protective.make_rig  # the rig fixture: a paper USD-M exchange, a ledger and the engine

# --- an entry filled after its answer ---------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@bounded(30)
async def test_an_entry_that_fills_after_its_answer_still_gets_exit_levels_and_a_stop(
        make_rig: Any, side: PositionSide) -> None:
    rig: Rig = await make_rig(side)
    real_create = rig.exchange.create_order
    answered: list[OrderUpdate] = []

    async def answers_new(request: OrderRequest) -> OrderUpdate:
        update = await real_create(request)
        if request.order_type is OrderType.MARKET and not request.reduce_only:
            answered.append(update)
            # What the venue said at the time (Binance may answer a MARKET order NEW, filled 0): accepted,
            # nothing executed yet.
            return dataclasses.replace(update, state=OrderState.OPEN, filled=D(0), avg_price=None, fills=())
        return update

    rig.exchange.create_order = answers_new  # type: ignore[method-assign]
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    assert len(answered) == 1, "the engine sent its entry, once"
    assert await rig.position() is None, "the ledger has not seen the fill yet"
    # The order poll learns of the execution a few seconds later (the Orchestrator's order poll).
    assert await rig.ctx.orders.poll_open_orders() == 1
    position = await rig.position()
    assert position is not None and position.amount > 0 and position.stop_loss is None
    for move in ("0.1", "0.2", "0.1"):
        await rig.price(move)
        await rig.step()
        await rig.settle()
    position = await rig.position()
    assert position is not None
    assert position.stop_loss is not None and position.take_profit is not None, "no exit levels at all"
    assert await rig.exchange_stops() == 1, "no protective stop rests on the exchange for an open position"
    stop = await rig.the_stop()
    assert stop.stop_price == position.stop_loss and stop.amount == position.amount
    assert len(answered) == 1, "no second entry while the first was waiting for its fill"


# --- no engine exit while HALTED --------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@bounded(30)
async def test_an_exit_due_while_halted_leaves_the_position_and_its_stop_alone(make_rig: Any,
                                                                              side: PositionSide) -> None:
    rig = await enter(make_rig, side)
    stop = await rig.the_stop()
    monitor = rig.ctx.gate._monitor
    monitor.kill(rig.clock.now(), "kill switch")
    assert monitor.trading_state is TradingState.HALTED
    calls = len(rig.calls)
    # The price reaches the take-profit (+4.5%): the engine would close, but HALTED only the system's
    # flattening trades, so it must not even cancel its stop.
    await rig.price("4.6")
    await rig.step()
    await rig.settle()
    assert await rig.position() is not None, "HALTED: the engine does not close by itself"
    assert rig.calls[calls:] == [], "nothing cancelled, nothing sent"
    assert await rig.exchange_stops() == 1, (
        f"stop {stop.client_order_id} was cancelled and could not be put back: position unprotected")
    assert (await rig.the_stop()).client_order_id == stop.client_order_id


# --- a partial that takes everything left ------------------------------------------------------------------


@pytest.mark.parametrize(("side", "second_pct"), [
    (PositionSide.LONG, 40.0),     # 30 at 100: 60% = 18, then 40% = 12, exactly what is left
    (PositionSide.LONG, 100.0),    # the second partial asks for more than is left: it gets the rest
    (PositionSide.SHORT, 100.0),   # 26.666: 15.999, then the 10.667 left
], ids=["long-sizes-sum-to-100", "long-rest", "short-rest"])
@bounded(30)
async def test_partials_that_close_the_whole_position_leave_no_stop_behind(make_rig: Any, side: PositionSide,
                                                                          second_pct: float) -> None:
    rig = await enter(make_rig, side, futures_partial_1_size_pct=60.0, futures_partial_2_size_pct=second_pct)
    await rig.the_stop()
    await rig.price("1.5")     # tp1: 60% taken, the stop is resized to the 40% left
    await rig.step()
    await rig.settle()
    assert await rig.position() is not None
    resized = await rig.the_stop()
    await rig.price("2.5")     # tp2: all that is left: the position is closed by the partial
    await rig.step()
    await rig.settle()
    assert await rig.position() is None and await rig.exchange.fetch_positions() == []
    assert await rig.live_stops() == [], "the ledger still holds a live protective stop for a closed position"
    assert await rig.exchange_stops() == 0, "a reduce-only stop still rests on the exchange with no position"
    assert [c[:2] for c in rig.calls[-2:]] == [("cancel", resized.client_order_id), ("create", OrderType.MARKET)], (
        "the stop is cancelled before the last partial closes the position")
    assert rig.engine.get_status()["partials"] == 2


# --- trade metrics after the exchange's stop ------------------------------------------------------------------


@bounded(30)
async def test_a_stop_loss_filled_by_the_exchange_is_counted_in_the_trade_metrics(make_rig: Any) -> None:
    rig = await enter(make_rig, PositionSide.LONG)
    await rig.the_stop()
    engine = rig.engine
    task = asyncio.ensure_future(engine.start())
    try:
        await until(lambda: engine._running and engine._idle)
        # Through the 97 stop. The exchange works its stop before the engine looks (the paper exchange
        # matches inside the feed's update, before any engine wakes): set the price without waking the
        # engine, let the exchange fill the stop, and its late fill reach the ledger.
        rig.feed.tickers[SYMBOL] = Ticker(SYMBOL, D("96.9"), D("96.9"), D("96.9"), rig.clock.now())
        await rig.settle()
        await until(lambda: not engine.positions)
        for _ in range(3):  # let the loop turn past METRICS_EVERY seconds
            await rig.clock.advance(11)
            rig.feed.price(SYMBOL, "96.9")

            def stepped(seen: int = engine.counters.steps) -> bool:
                return engine.counters.steps > seen

            await until(stepped)
        assert rig.closes() == [], "closed by the exchange's stop, not by the engine"
        [trade] = await rig.ledger.closed_trades("futures")
        assert trade.realized_pnl < 0
        metrics = engine.get_status()["metrics"]["overall"]
        assert metrics["trades"] == 1, f"the stopped-out trade is missing from the metrics: {metrics}"
        saved = await rig.ledger.get_state("metrics:futures")
        assert saved is not None and saved["overall"]["trades"] == 1
    finally:
        engine.stop()
        rig.feed.signal.bump()
        await until(task.done)
        await task


@bounded(30)
async def test_an_entry_left_unknown_is_not_sent_again_while_it_may_have_filled(make_rig: Any) -> None:
    side = PositionSide.LONG
    rig = await make_rig(side)
    rig.ctx.orders.max_resolve_seconds = 0.0  # the resolution gives up at its first unanswered question
    real_create, real_fetch = rig.exchange.create_order, rig.exchange.fetch_order
    entries: list[str] = []
    outage = {"on": True}

    async def create(request: OrderRequest) -> OrderUpdate:
        update = await real_create(request)  # it reaches the exchange and fills...
        if request.order_type is OrderType.MARKET and not request.reduce_only:
            entries.append(request.client_order_id)
            if outage["on"]:
                raise TimeoutError("answer lost")  # ...but the answer never comes back
        return update

    async def fetch(symbol: str, cid: str) -> OrderUpdate:
        if outage["on"]:
            raise TemporaryError("exchange unreachable (test)")
        return await real_fetch(symbol, cid)

    rig.exchange.create_order = create  # type: ignore[method-assign]
    rig.exchange.fetch_order = fetch  # type: ignore[method-assign]
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    assert len(entries) == 1
    [order] = await rig.ledger.orders_in_states([OrderState.UNKNOWN], engine="futures")
    bar = rig.engine._entry_bar.get(SYMBOL)
    # The scan interval passes on the same 15m bar; the fill has not reached the ledger yet.
    await rig.clock.advance(rig.engine.params.scan_interval + 1)
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    assert len(entries) == 1, (
        f"a second entry was sent while the first ({order.client_order_id}) is UNKNOWN and filled on the "
        f"exchange (entry bar guard: {bar})")
    # Not on a later bar either, while the first stays in doubt.
    await rig.clock.advance(15 * 60)
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    assert len(entries) == 1
    # The exchange answers again: the order poll brings the fill in, and the next step protects it.
    outage["on"] = False
    assert await rig.ctx.orders.poll_open_orders() == 1
    await rig.step()
    position = await rig.position()
    assert position is not None and position.stop_loss is not None
    assert await rig.exchange_stops() == 1


# --- entries in doubt count against max positions ----------------------------------------------------------

OTHER = "ETH/USDT:USDT"


@bounded(30)
async def test_an_entry_in_doubt_in_another_symbol_fills_the_only_slot(make_rig: Any) -> None:
    """With room for one position and another symbol's entry accepted but not filled (it may still fill),
    a signal is not entered: no order, and not even the symbol's margin and leverage set-up. Once that
    entry settles unfilled, the signal enters."""
    side = PositionSide.LONG
    rig = await make_rig(side, futures_max_positions=1)
    other = Order(client_order_id="kef1-other", engine="futures", market=MarketType.FUTURES, symbol=OTHER,
                  side=Side.BUY, order_type=OrderType.MARKET, amount=D("0.1"), price=None, stop_price=None,
                  reduce_only=False, state=OrderState.PENDING, created_at=rig.clock.now(),
                  updated_at=rig.clock.now(), leverage=3, reason="an earlier entry")
    await rig.ledger.insert_order(other)
    await rig.ledger.update_order(other.client_order_id, state=OrderState.OPEN)
    await rig.engine.load_state()  # as at a start: the entry in doubt is found in the ledger
    set_ups: list[str] = []
    real_set_up = rig.engine._set_up_symbol

    async def counted_set_up(symbol: str, leverage: int) -> bool:
        set_ups.append(symbol)
        return await real_set_up(symbol, leverage)

    rig.engine._set_up_symbol = counted_set_up  # type: ignore[method-assign]
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    assert [c for c in rig.calls if c[0] == "create"] == [], "entered past max_positions=1"
    assert set_ups == [], "the symbol was set up on the exchange for an entry that could not go"
    await rig.ledger.update_order(other.client_order_id, state=OrderState.CANCELED)
    await rig.clock.advance(15 * 60)
    rig.feed.trend(SYMBOL, side)
    await rig.step()
    assert [c[1] for c in rig.calls if c[0] == "create" and not c[2]] == [OrderType.MARKET], (
        "the settled entry still blocks")
