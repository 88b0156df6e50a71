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


def queued_writes(ledger: Ledger) -> list[str]:
    """The write transactions handed to the ledger thread from now on, in queue order, by name."""
    seen: list[str] = []
    thread = ledger._thread
    original = thread.call

    def call(fn: Any, *args: Any) -> Any:
        name = getattr(fn, "__name__", "")
        if name == "_insert_order_row":  # the order row: one statement of its own
            seen.append("Ledger.insert_order")
        elif name == "_transact" and args[1]:
            work = args[0]
            seen.append(getattr(work, "__qualname__", "") or getattr(getattr(work, "func", None), "__qualname__", "?"))
        return original(fn, *args)

    thread.call = call  # type: ignore[method-assign]
    return seen


async def test_the_sells_row_is_queued_before_the_cancel_record(rig: Rig) -> None:
    """The point of deferring: the take-profit's own order row does not wait behind the stop's record."""
    await enter(rig)
    seen = queued_writes(rig.ledger)
    rig.feed.set_price("103")
    await rig.step()
    inserts = [i for i, name in enumerate(seen) if name.startswith("Ledger.insert_order")]
    updates = [i for i, name in enumerate(seen) if name.startswith("Ledger.update_order")]
    assert inserts and updates, seen
    assert inserts[0] < updates[0], f"the sell's row should reach the ledger thread first: {seen}"


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
