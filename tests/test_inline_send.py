"""Sends to an exchange that answers inline (paper): the order manager calls `create_order` in the
submitting task, once the row is in the intent log, and records the answer in a task of its own.

What a user cares about: the order is in the ledger (its intent log) before it reaches the exchange,
it is sent exactly once, and every outcome is recorded as it would be from a task of its own: a fill,
a refusal, and, should such an exchange await after all, an answer that arrives after its caller was
cancelled, or no answer within the send timeout (UNKNOWN, then settled by asking, never resent). A
network client keeps its own task for the send.
"""

from __future__ import annotations

import asyncio
import contextvars
from decimal import Decimal
from pathlib import Path

import pytest

from core.clock import LiveClock, SimClock
from core.errors import OrderNotFound, OrderRejected
from core.events import EventBus
from core.types import OrderState
from exchange.base import OrderRequest, OrderUpdate
from exchange.ccxt_client import CcxtExchange
from exchange.orders import OrderManager
from exchange.paper import PaperExchange
from exchange.paper_futures import PaperFuturesExchange
from storage.ledger import Ledger
from tests.test_intent_log import BOUND, T0, buy

D = Decimal


class InlineExchange:
    """An exchange that says it answers inline. It notes, at each send, whether the order's row was in
    the intent log and whether it was committed; `hold` makes it await (as a test's wrapper may)."""

    answers_inline = True

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.sent: list[str] = []
        self.logged_at_send: list[bool] = []
        self.committed_at_send: list[bool] = []
        self.refuse: str | None = None
        self.hold: asyncio.Event | None = None
        self.cut_off = 0  # awaits that ended in a cancellation (a timeout) instead of the answer
        self.placed: dict[str, OrderUpdate] = {}

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        cid = request.client_order_id
        self.sent.append(cid)
        self.logged_at_send.append(self.ledger._intents.in_use() == 1)  # this test's only order in flight
        self.committed_at_send.append(cid in self.ledger._mirror.orders)
        if self.refuse is not None:
            raise OrderRejected(self.refuse)
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cut_off += 1
                raise
        update = OrderUpdate(
            client_order_id=cid, exchange_order_id=f"x-{len(self.sent)}", symbol=request.symbol,
            side=request.side, order_type=request.order_type, amount=request.amount, filled=D(0),
            avg_price=None, state=OrderState.OPEN, ts=T0,
        )
        self.placed[cid] = update
        return update

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        if client_order_id not in self.placed:
            raise OrderNotFound(client_order_id)
        return self.placed[client_order_id]


async def manager(ledger: Ledger, exchange: InlineExchange, clock: SimClock | LiveClock | None = None,
                  **kwargs: float) -> OrderManager:
    om = OrderManager("spot", exchange, ledger, EventBus(), clock or SimClock(T0), **kwargs)  # type: ignore[arg-type]
    await om.reserve_ids()  # as the Orchestrator does after reconciliation
    return om


def test_the_paper_exchanges_answer_inline_and_the_live_client_does_not() -> None:
    assert PaperExchange.answers_inline and PaperFuturesExchange.answers_inline
    assert not CcxtExchange.answers_inline


async def test_the_order_is_logged_before_it_is_sent_and_recorded_after(tmp_path: Path) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        om = await manager(ledger, exchange)
        submitting = asyncio.ensure_future(om.submit(buy()))
        await asyncio.sleep(0)  # the submitting task's first turn: the send happens in it
        assert exchange.sent and exchange.logged_at_send == [True] and exchange.committed_at_send == [False]
        result = await asyncio.wait_for(submitting, BOUND)
        assert exchange.sent == [result.order.client_order_id], "sent once"
        stored = await ledger.get_order(result.order.client_order_id)
        assert stored is not None and stored.state is OrderState.OPEN and stored.exchange_order_id == "x-1"
        assert ledger._intents.in_use() == 0, "committed, so the log slot was given back"


async def test_a_refusal_inline_is_recorded_as_rejected(tmp_path: Path) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        exchange.refuse = "Account has insufficient balance"
        om = await manager(ledger, exchange)
        result = await asyncio.wait_for(om.submit(buy()), BOUND)
        assert result.error == "Account has insufficient balance"
        stored = await ledger.get_order(result.order.client_order_id)
        assert stored is not None and stored.state is OrderState.REJECTED


async def test_a_send_that_awaits_after_all_survives_its_callers_cancellation(tmp_path: Path) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        exchange.hold = asyncio.Event()
        om = await manager(ledger, exchange)
        caller = asyncio.ensure_future(om.submit(buy()))
        await asyncio.sleep(0)
        assert len(exchange.sent) == 1
        caller.cancel()  # an engine restart, a shutdown, a Telegram timeout
        with pytest.raises(asyncio.CancelledError):
            await caller
        exchange.hold.set()  # the exchange answers after all
        assert await om.drain(BOUND), "the send and its record finished in their own task"
        stored = await ledger.get_order(exchange.sent[0])
        assert stored is not None and stored.state is OrderState.OPEN and stored.exchange_order_id == "x-1"
        assert exchange.cut_off == 0 and len(exchange.sent) == 1


async def test_a_send_that_awaits_and_never_answers_times_out_into_unknown_then_is_settled(
        tmp_path: Path) -> None:
    """The send timeout applies to the rest of the call: it is cut off, the order goes UNKNOWN and is
    settled by asking the exchange for it (it never got it: rejected after the grace), never resent."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        exchange.hold = asyncio.Event()  # never set
        om = await manager(ledger, exchange, LiveClock(), send_timeout=0.05, unknown_grace_seconds=0.0)
        result = await asyncio.wait_for(om.submit(buy()), BOUND)
        assert exchange.cut_off == 1, "the timeout reached the exchange call"
        assert result.error == "never reached the exchange"
        stored = await ledger.get_order(exchange.sent[0])
        assert stored is not None and stored.state is OrderState.REJECTED
        assert len(exchange.sent) == 1, "never sent again"


async def test_a_network_client_is_sent_to_from_a_task_of_its_own(tmp_path: Path) -> None:
    """An exchange that does not answer inline: the submitting task has not sent anything after its
    first turn; the order manager's own task sends (and a cancelled caller cannot cut it off)."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        exchange.answers_inline = False
        om = await manager(ledger, exchange)
        submitting = asyncio.ensure_future(om.submit(buy()))
        await asyncio.sleep(0)
        assert exchange.sent == []
        result = await asyncio.wait_for(submitting, BOUND)
        assert exchange.sent == [result.order.client_order_id]



async def test_a_wrapper_that_raises_before_any_coroutine_exists_is_recorded_too(tmp_path: Path) -> None:
    """A plain function standing in for `create_order` (a test's wrapper) that raises at once: the
    refusal is recorded and the row committed, as for any refusal, and submit does not raise."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        om = await manager(ledger, exchange)

        def refuse_now(request: OrderRequest) -> OrderUpdate:
            exchange.sent.append(request.client_order_id)
            raise OrderRejected("Filter failure: LOT_SIZE")

        exchange.create_order = refuse_now  # type: ignore[assignment,method-assign]
        result = await asyncio.wait_for(om.submit(buy()), BOUND)
        assert result.error == "Filter failure: LOT_SIZE"
        stored = await ledger.get_order(exchange.sent[0])
        assert stored is not None and stored.state is OrderState.REJECTED
        assert ledger._intents.in_use() == 0


SEEN_BY_SEND: contextvars.ContextVar[str] = contextvars.ContextVar("seen_by_send", default="caller")


async def test_the_inline_call_runs_in_the_tasks_context_not_the_callers(tmp_path: Path) -> None:
    """What the exchange call sets in its context stays with the order's task, as when the task made
    the call, and the caller's context is left as it was."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        om = await manager(ledger, exchange)
        original = exchange.create_order

        async def marking(request: OrderRequest) -> OrderUpdate:
            SEEN_BY_SEND.set("send")
            return await original(request)

        seen_when_recorded: list[str] = []
        real_apply = om.apply_update

        async def apply_update(*args: object, **kwargs: object) -> object:
            seen_when_recorded.append(SEEN_BY_SEND.get())
            return await real_apply(*args, **kwargs)  # type: ignore[arg-type]

        exchange.create_order = marking  # type: ignore[method-assign]
        om.apply_update = apply_update  # type: ignore[method-assign,assignment]
        async with asyncio.timeout(BOUND):  # (not wait_for: its task would have a context of its own)
            await om.submit(buy())
        assert SEEN_BY_SEND.get() == "caller"
        assert seen_when_recorded == ["send"], "the task that records the answer has the call's context"


async def test_cancels_settle_as_before_and_a_lost_order_is_asked_for(tmp_path: Path) -> None:
    """Cancels of an exchange that answers inline (awaited in the caller, as from any exchange): a
    resting order is cancelled and recorded; one the exchange does not know (it filled, or never
    arrived) is settled by asking for it, never assumed."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        om = await manager(ledger, exchange, unknown_grace_seconds=0.0)
        cancelled: list[str] = []

        async def cancel_order(symbol: str, client_order_id: str) -> OrderUpdate:
            if client_order_id not in exchange.placed:
                raise OrderNotFound(client_order_id)
            cancelled.append(client_order_id)
            placed = exchange.placed[client_order_id]
            exchange.placed[client_order_id] = OrderUpdate(
                client_order_id=client_order_id, exchange_order_id=placed.exchange_order_id, symbol=symbol,
                side=placed.side, order_type=placed.order_type, amount=placed.amount, filled=D(0),
                avg_price=None, state=OrderState.CANCELED, ts=T0)
            return exchange.placed[client_order_id]

        exchange.cancel_order = cancel_order  # type: ignore[attr-defined]
        resting = await asyncio.wait_for(om.submit(buy()), BOUND)
        result = await asyncio.wait_for(om.cancel(resting.order), BOUND)
        assert cancelled == [resting.order.client_order_id] and result.order.state is OrderState.CANCELED
        stored = await ledger.get_order(resting.order.client_order_id)
        assert stored is not None and stored.state is OrderState.CANCELED

        exchange.refuse = "no"  # the next order never reaches the exchange
        lost = await asyncio.wait_for(om.submit(buy()), BOUND)
        settled = await asyncio.wait_for(om.cancel(lost.order), BOUND)
        assert settled.order.state is OrderState.REJECTED and cancelled == [resting.order.client_order_id]


async def test_a_row_the_intent_log_cannot_take_is_committed_before_the_send(tmp_path: Path) -> None:
    """No inline send without the row in the intent log: when the log declines it (full, too long,
    or after a refused commit), the row is committed first and the task sends after, as for any
    exchange."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = InlineExchange(ledger)
        om = await manager(ledger, exchange)
        ledger.log_order = lambda order: None  # type: ignore[method-assign]  # the log declines every row
        submitting = asyncio.ensure_future(om.submit(buy()))
        await asyncio.sleep(0)
        assert exchange.sent == [], "not sent from the caller"
        result = await asyncio.wait_for(submitting, BOUND)
        assert exchange.committed_at_send == [True]
        assert exchange.sent == [result.order.client_order_id]
