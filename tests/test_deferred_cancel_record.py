"""A take-profit cancels the position's stop and sells without waiting for the cancel's ledger row first
(`OrderManager.cancel(defer_record=True)`). These tests pin down what that may and may not change: the
row is still written (before the exit returns), in the ledger thread's order behind nothing the sell
needs; a failure to write it still surfaces; a cancel that found fills records them before returning;
and shutdown's drain waits for such a write."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from typing import Any

import pytest

from core.clock import SimClock
from core.errors import InvariantError
from core.events import OrderCanceled
from core.types import OrderState, OrderType
from storage.ledger import Ledger
from tests.test_spot_protective_stop import SYMBOL, Rig, enter, rig

__all__ = ["rig"]  # the fixture, shared with the protective-stop tests


def block_ledger_thread(ledger: Ledger) -> tuple[threading.Event, asyncio.Future[None]]:
    """Occupy the ledger thread until the event is set, so every later call waits in its queue."""
    release = threading.Event()
    held = ledger._thread.call(release.wait, 5.0)
    return release, held


async def test_deferred_cancel_returns_before_its_row_is_written(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None
    release, held = block_ledger_thread(rig.ledger)
    try:
        result = await asyncio.wait_for(rig.ctx.orders.cancel(stop, defer_record=True), 1.0)
        assert result.order.state is OrderState.CANCELED, "the caller learns the outcome at once"
        assert result.recorded is not None and not result.recorded.done()
        mirrored = await rig.ledger.get_order(stop_id)
        assert mirrored is not None and mirrored.state is OrderState.OPEN, "nothing committed yet"
    finally:
        release.set()
    await asyncio.wait_for(held, 5.0)
    await asyncio.wait_for(result.recorded, 5.0)
    recorded = await rig.ledger.get_order(stop_id)
    assert recorded is not None and recorded.state is OrderState.CANCELED


async def test_a_cancel_that_found_fills_records_them_before_returning(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    rig.feed.set_price("97")  # the exchange's stop fires
    rig.exchange.process_prices()
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None
    for task in list(rig.late):  # the late-fill path would record it; cancel() must do it itself
        task.cancel()
    await asyncio.gather(*rig.late, return_exceptions=True)
    result = await rig.ctx.orders.cancel(stop, defer_record=True)
    assert result.recorded is None
    assert result.order.state is OrderState.FILLED
    assert await rig.ledger.positions("spot") == [], "the stop's fill closed the position in the ledger"


async def test_take_profit_leaves_the_stop_cancelled_in_the_ledger_and_sells_once(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    rig.feed.set_price("103")
    await rig.step()
    # No settle(): the row must be written by the time the step returns.
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None and stop.state is OrderState.CANCELED
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET]
    assert await rig.ledger.positions("spot") == []
    assert not rig.ctx.orders._recording, "no write left running"


async def test_a_failed_cancel_record_surfaces_after_the_exit(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    real_update = rig.ledger.update_order

    async def failing_update(client_order_id: str, **fields: object) -> None:
        if client_order_id == stop_id:
            raise InvariantError("disk trouble")
        await real_update(client_order_id, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.ledger, "update_order", failing_update)
    rig.feed.set_price("103")
    with pytest.raises(InvariantError, match="disk trouble"):
        await rig.step()
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET], "the exit went out; the error still shows"
    assert not rig.ctx.orders._recording


async def test_drain_waits_for_a_deferred_record(rig: Rig) -> None:
    await enter(rig)
    stop = await rig.ledger.get_order(rig.engine.positions[SYMBOL].meta["stop_order"])
    assert stop is not None
    release, held = block_ledger_thread(rig.ledger)
    result = await rig.ctx.orders.cancel(stop, defer_record=True)
    assert result.recorded is not None
    clock = rig.ctx.clock
    assert isinstance(clock, SimClock)
    draining = asyncio.ensure_future(rig.ctx.orders.drain(1.0))
    await clock.advance(1.0)  # the drain's (simulated) timeout passes with the write still queued
    assert not await asyncio.wait_for(draining, 1.0), "a write still queued: not drained"
    release.set()
    await asyncio.wait_for(held, 5.0)
    assert await rig.ctx.orders.drain(5.0)
    assert result.recorded.done() and result.recorded.exception() is None
    recorded = await rig.ledger.get_order(stop.client_order_id)
    assert recorded is not None and recorded.state is OrderState.CANCELED
    assert recorded.filled == Decimal(0)


async def test_the_sell_goes_out_while_the_ledger_thread_is_still_busy(rig: Rig) -> None:
    """The point of deferring: the take-profit's sell waits for no ledger write, neither the stop's
    cancel record nor its own row's commit (the row is in the intent log). Both are written after."""
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    release, held = block_ledger_thread(rig.ledger)
    sent: list[tuple[OrderType, bool]] = []
    original = rig.exchange.create_order

    async def watch(request: Any) -> Any:
        sent.append((request.order_type, release.is_set()))
        return await original(request)

    rig.exchange.create_order = watch  # type: ignore[method-assign]
    rig.feed.set_price("103")
    stepping = asyncio.ensure_future(rig.step())
    try:
        for _ in range(500):
            if sent or stepping.done():
                break
            await asyncio.sleep(0.002)
        assert sent == [(OrderType.MARKET, False)], "the sell went out with the ledger thread still held"
    finally:
        release.set()
    await asyncio.wait_for(held, 5.0)
    await asyncio.wait_for(stepping, 5.0)
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    assert [p.symbol for p in await rig.ledger.positions("spot")] == [], "the sale is recorded"
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET]


async def test_cancelling_the_engine_does_not_cut_a_cancel_record_short(rig: Rig) -> None:
    """The engine task may be cancelled (twice, at shutdown) while it waits for the records: the record
    still finishes, row and event both."""
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    canceled_events: list[str] = []
    real_publish = rig.ctx.bus.publish

    def publish(event: Any) -> None:
        if isinstance(event, OrderCanceled):
            canceled_events.append(event.client_order_id)
        real_publish(event)

    rig.ctx.bus.publish = publish  # type: ignore[method-assign]
    release = threading.Event()
    recording: list[asyncio.Future[Any]] = []
    real_cancel = rig.ctx.orders.cancel

    async def cancel(order: Any, *, defer_record: bool = False) -> Any:
        result = await real_cancel(order, defer_record=defer_record)
        if result.recorded is not None:
            recording.append(result.recorded)
            rig.ledger._thread.call(release.wait, 5.0)  # the record (and the sell's row) now wait in the queue
        return result

    rig.ctx.orders.cancel = cancel  # type: ignore[method-assign]
    rig.feed.set_price("103")
    ticker = rig.feed.ticker(SYMBOL)
    assert ticker is not None
    step = asyncio.ensure_future(rig.engine.manage_exit(rig.engine.positions[SYMBOL], ticker))
    for _ in range(20):
        await asyncio.sleep(0)
    step.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    step.cancel()  # a second cancel lands on the wait for the records
    release.set()
    await asyncio.gather(step, return_exceptions=True)
    assert await asyncio.wait_for(rig.ctx.orders.drain(5.0), 5.0)
    assert recording and not recording[0].cancelled() and recording[0].exception() is None
    stop = await rig.ledger.get_order(stop_id)
    assert stop is not None and stop.state is OrderState.CANCELED
    assert stop_id in canceled_events
