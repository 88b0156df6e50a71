"""The order path: intent before action, exactly once.

Every order is written to the ledger with its client order id before it is sent. A send whose outcome
is unknown (timeout, dropped connection, crash) leaves the order UNKNOWN, and is resolved by asking the
exchange for that client order id — never by sending again. A send the exchange refused outright
(rate limit, timestamp outside recvWindow) is no unknown outcome: Binance did nothing, so the order is
rejected at once instead of holding the engine's trade lock through the grace period. The ledger is
reached through the small `OrderStore` protocol so that `exchange` does not import `storage` (they are
siblings in DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal
from typing import Protocol

import structlog

from core.clock import Clock
from core.coroutines import Done, first_step
from core.errors import (
    DependencyError,
    InsufficientFunds,
    OperationalError,
    OrderNotFound,
    OrderRejected,
    TemporaryError,
)
from core.events import (
    EventBus,
    OrderCanceled,
    OrderFilled,
    OrderPlaced,
    OrderRejectedByExchange,
    PositionClosed,
    PositionOpened,
)
from core.types import Fill, Order, OrderIntent, OrderState, Position, PositionSide
from core.values import value_type
from exchange.base import Exchange, OrderRequest, OrderUpdate
from exchange.errors import ClockSkew, RateLimited

log = structlog.get_logger("orders")

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
ID_BLOCK = 1000


def base36(n: int) -> str:
    if n < 0:
        raise ValueError("negative")
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def client_order_id_prefix(engine: str, boot: int) -> str:
    """`ke<engine initial><boot>-`: what every client order id of one order manager starts with (the
    boot stamp is fixed for its life, so it makes this once)."""
    return f"ke{engine[:1]}{base36(boot)}-"


def make_client_order_id(prefix: str, seq: int) -> str:
    """`<prefix><seq>`: unique across restarts (persistent sequence, boot stamp in the prefix) and
    valid for Binance (`^[.A-Z:/a-z0-9_-]{1,36}$`)."""
    cid = prefix + base36(seq)
    if len(cid) > 36:
        raise ValueError(f"client order id too long: {cid}")
    return cid


class ClosedTradeLike(Protocol):
    @property
    def exit_price(self) -> Decimal: ...

    @property
    def entry_price(self) -> Decimal: ...

    @property
    def amount(self) -> Decimal: ...

    @property
    def realized_pnl(self) -> Decimal: ...

    @property
    def side(self) -> PositionSide: ...


class FillOutcome(Protocol):
    @property
    def new(self) -> bool: ...

    @property
    def position(self) -> Position | None: ...

    @property
    def realized_pnl(self) -> Decimal: ...

    @property
    def closed(self) -> ClosedTradeLike | None: ...


class OrderStore(Protocol):
    def insert_order(self, order: Order) -> Awaitable[None]: ...

    def log_order(self, order: Order) -> Callable[[], Awaitable[None]] | None:
        """The row made durable now (the order may be sent at once). Returns `commit`, which starts
        the row's commit on its first call and returns it on every call; None when the store cannot
        do that for this row (then `insert_order`, awaited before sending)."""

    async def update_order(
        self,
        client_order_id: str,
        *,
        state: OrderState,
        filled: Decimal | None = None,
        avg_price: Decimal | None = None,
        exchange_order_id: str | None = None,
    ) -> None: ...

    async def get_order(self, client_order_id: str) -> Order | None: ...

    async def orders_in_states(
        self, states: Iterable[OrderState], engine: str | None = None
    ) -> list[Order]: ...

    async def record_fill(self, fill: Fill, *, leverage: int = 1) -> FillOutcome: ...

    async def next_sequence(self, name: str) -> int: ...


@value_type
class _Started:
    """An order whose row `submit` has begun to write: either in the store's intent log (`commit`:
    durable already, so send, then commit) or queued for the store (`inserting`: await it, then
    send)."""

    order: Order
    inserting: Awaitable[None] | None
    commit: Callable[[], Awaitable[None]] | None


@value_type
class _Inline:
    """An exchange call made in the caller's task (an exchange that `answers_inline`, see `_call_inline`):
    the exchange's answer, or what it raised, or, had it awaited after all, the rest of the call."""

    update: OrderUpdate | None = None
    error: BaseException | None = None
    rest: Awaitable[OrderUpdate] | None = None


def _call_inline(call: Callable[[OrderRequest], Awaitable[OrderUpdate]], request: OrderRequest) -> _Inline:
    """Make the exchange call here, up to its answer or its first await. Whatever it raises is kept
    for `OrderManager._answer` to raise again, so it is handled where the call would have been
    awaited. Anything but a native coroutine not yet started (an exchange wrapped by a test, say) is
    left to be awaited in the task, under the send timeout."""
    try:
        step = first_step(call(request))
    except BaseException as exc:  # raised again by _answer, in the task, after the row's commit
        return _Inline(error=exc)
    return _Inline(update=step.value) if isinstance(step, Done) else _Inline(rest=step)


def _start_commit(commit: Callable[[], Awaitable[None]]) -> None:
    """A loop callback: start a logged row's commit. What refuses it is raised where the order manager
    awaits `commit()` after the send, not here."""
    with contextlib.suppress(Exception):
        commit()


@value_type
class SubmitResult:
    """What happened to one intent. `order` is the ledger's row after the exchange answered (with a
    deferred record, what that row will say once `recorded` is done)."""

    order: Order
    update: OrderUpdate | None
    outcomes: tuple[FillOutcome, ...] = ()
    error: str | None = None
    # A cancel asked to `defer_record`: the ledger write of its outcome, still running. The caller
    # awaits it (it raises what the write raised).
    recorded: asyncio.Future[SubmitResult] | None = None

    @property
    def filled(self) -> Decimal:
        return self.order.filled


class OrderManager:
    """One per engine and exchange. Owns the ledger side of each order it sends."""

    def __init__(
        self,
        engine: str,
        exchange: Exchange,
        store: OrderStore,
        bus: EventBus,
        clock: Clock,
        *,
        send_timeout: float = 10.0,
        unknown_grace_seconds: float = 15.0,
        boot_stamp: int | None = None,
    ) -> None:
        self.engine = engine
        self.exchange = exchange
        self.store = store
        self.bus = bus
        self.clock = clock
        self.send_timeout = send_timeout
        # See `Exchange.answers_inline`. Exchanges of tests and other fakes may not say: they are sent
        # to from a task, which is right for any exchange.
        self._inline = bool(getattr(exchange, "answers_inline", False))
        self.unknown_grace_seconds = unknown_grace_seconds
        # Seconds since epoch at start-up, with the pid folded in: two processes on one ledger would
        # still never share an id, and the persistent sequence makes ids unique within one boot.
        self._boot = boot_stamp if boot_stamp is not None else int(clock.now()) * 64 + os.getpid() % 64
        self._cid_prefix = client_order_id_prefix(engine, self._boot)
        self.on_position_change: Callable[[str], None] | None = None
        # Called while waiting on the exchange (resolving an unknown order), so an engine that is
        # patiently resolving is not mistaken for a stalled one.
        self.on_wait: Callable[[], None] | None = None
        self.max_resolve_seconds = max(4 * unknown_grace_seconds, 120.0)
        self._inflight: set[asyncio.Task[SubmitResult]] = set()
        self._resolving: set[str] = set()  # client order ids a `resolve_unknown` is asking about now
        self._sending: set[str] = set()  # client order ids whose send (and its outcome) is in progress
        self._recording: set[asyncio.Task[SubmitResult]] = set()
        self._seq_next = 0
        self._seq_end = 0

    async def new_client_order_id(self) -> str:
        """Ids come from blocks of the persistent sequence: one ledger round trip per thousand orders
        instead of one per order, and a restart always starts a fresh block, so no id repeats."""
        await self.reserve_ids()
        return self._take_id()

    async def reserve_ids(self) -> None:
        """Make sure a block of ids is at hand. The Orchestrator calls it at start-up, so that even the
        first order of a process has its id without a ledger round trip and goes out on the intent
        log (see `submit`)."""
        if self._seq_next >= self._seq_end:
            block = await self.store.next_sequence(f"coid:{self.engine}")
            self._seq_next, self._seq_end = block * ID_BLOCK, (block + 1) * ID_BLOCK

    def _take_id(self) -> str:
        seq = self._seq_next
        self._seq_next += 1
        return make_client_order_id(self._cid_prefix, seq)

    async def submit(self, intent: OrderIntent) -> SubmitResult:
        """Write the order, send it once, record what came back. Never raises for one order's trouble:
        the outcome is in the result (and the ledger); operational errors propagate to halt the engine.

        The send-and-record runs as its own task behind `asyncio.shield`: cancelling the caller (an
        engine restart, shutdown, a Telegram timeout) never cuts an order off between the exchange's
        answer and the ledger, where its fill would be lost. `drain()` waits for such orphans.

        When the current block still has an id, the order row is written here, before the task is
        created: into the store's intent log when it can take it (durable at once, so the send goes out
        without waiting for the commit), else queued for the ledger thread, which then commits it while
        the loop gets round to the task, which sends once it is committed.

        An exchange that `answers_inline` (paper) is sent to right here once the row is in the intent
        log, without the task's turn of the loop: its `create_order` never awaits, so there is nothing
        a cancellation could cut off, and the task only records the answer. Should it await after all
        (a test's wrapper does), the task carries the rest of the call on, under the send timeout.
        """
        started: _Started | None = None
        request: OrderRequest | None = None
        inline: _Inline | None = None
        context: contextvars.Context | None = None  # None: the task gets a copy of the caller's
        if self._seq_next < self._seq_end:
            order = self._new_order(intent, self._take_id())
            commit = self.store.log_order(order)
            started = _Started(order, self.store.insert_order(order) if commit is None else None, commit)
            if commit is not None and self._inline:
                # In the context the task will have, as if the task had made the call.
                request = self._request(intent, order.client_order_id)
                context = contextvars.copy_context()
                inline = context.run(_call_inline, self.exchange.create_order, request)
        loop = asyncio.get_running_loop()
        # Never cancelled by the daemon (drain() waits for it): an inline send has already gone out.
        task = loop.create_task(self._submit(intent, started, inline, request), context=context)
        if started is not None and started.commit is not None:
            # Started when the loop is next free, i.e. after the task's first step: during a live send,
            # which waits on the network, so the ledger thread writes in parallel with the round trip;
            # after the answer when the exchange answers inline (paper: sent above, before the task
            # exists), so that the ledger thread does not take the GIL from the send. Here, not in the
            # task: it starts even if the task is cancelled before it runs.
            loop.call_soon(_start_commit, started.commit)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def drain(self, timeout: float) -> bool:
        """Wait (bounded) for sends whose callers were cancelled, and for deferred cancel records; True
        when none is left."""
        if not self._inflight and not self._recording:
            return True
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(asyncio.wait({*self._inflight, *self._recording}), timeout)
        return not self._inflight and not self._recording

    def _new_order(self, intent: OrderIntent, cid: str) -> Order:
        now = self.clock.now()
        return Order(
            client_order_id=cid,
            engine=self.engine,
            market=intent.market,
            symbol=intent.symbol,
            side=intent.side,
            order_type=intent.order_type,
            amount=intent.amount,
            price=intent.price,
            stop_price=intent.stop_price,
            reduce_only=intent.reduce_only,
            state=OrderState.PENDING,
            created_at=now,
            updated_at=now,
            leverage=intent.leverage,
            reason=intent.reason,
        )

    @staticmethod
    def _request(intent: OrderIntent, cid: str) -> OrderRequest:
        return OrderRequest(
            client_order_id=cid,
            symbol=intent.symbol,
            side=intent.side,
            order_type=intent.order_type,
            amount=intent.amount,
            price=intent.price,
            stop_price=intent.stop_price,
            reduce_only=intent.reduce_only,
            leverage=intent.leverage,
        )

    async def _submit(self, intent: OrderIntent, started: _Started | None, inline: _Inline | None = None,
                      request: OrderRequest | None = None) -> SubmitResult:
        commit: Callable[[], Awaitable[None]] | None = None  # a logged row's commit, after the send
        if started is None:
            order = self._new_order(intent, await self.new_client_order_id())
        else:
            order, commit = started.order, started.commit
        cid = order.client_order_id
        self._sending.add(cid)  # its PENDING row is this task's until the outcome is recorded
        try:
            if started is None:
                await self.store.insert_order(order)
            elif started.inserting is not None:
                await started.inserting
            return await self._send_and_record(intent, order, request, commit, inline)
        finally:
            self._sending.discard(cid)

    async def _send_and_record(self, intent: OrderIntent, order: Order, request: OrderRequest | None,
                               commit: Callable[[], Awaitable[None]] | None, inline: _Inline | None
                               ) -> SubmitResult:
        cid = order.client_order_id
        if request is None:  # (submit built it when it sent inline)
            request = self._request(intent, cid)
        try:
            update = await self._send(request, commit, inline)
        except (RateLimited, ClockSkew) as exc:
            # Refused before it did anything (Binance places nothing on 429/418/-1003 or -1021), so there
            # is nothing to look for. Not resent either: the engine decides again on fresh prices, and
            # the client has already resynced its clock after a -1021 so that next order can go through.
            return await self._rejected(order, f"refused by the exchange ({type(exc).__name__}): {exc}")
        except (TimeoutError, TemporaryError) as exc:
            # The order may or may not exist on the exchange. Never send again: ask for it by id.
            await self.store.update_order(cid, state=OrderState.UNKNOWN)
            log.warning("order outcome unknown", engine=self.engine, client_order_id=cid, error=str(exc))
            # The grace for the exchange to show the order counts from now, as it does for the row after
            # a restart: from the order's creation, the send timeout would use it up.
            unknown = dataclasses.replace(order, state=OrderState.UNKNOWN, updated_at=self.clock.now())
            return await self.resolve_unknown(unknown)
        except InsufficientFunds as exc:
            return await self._rejected(order, f"insufficient funds: {exc}")
        except OrderRejected as exc:
            return await self._rejected(order, str(exc))
        except DependencyError as exc:
            return await self._rejected(order, str(exc))
        except OperationalError:
            await self.store.update_order(cid, state=OrderState.REJECTED)
            raise
        self.bus.publish(
            OrderPlaced(
                ts=self.clock.now(),
                engine=self.engine,
                client_order_id=cid,
                symbol=intent.symbol,
                side=intent.side,
                order_type=intent.order_type,
                amount=intent.amount,
                price=intent.price,
                reduce_only=intent.reduce_only,
            )
        )
        return await self.apply_update(order, update)

    async def _send(self, request: OrderRequest, commit: Callable[[], Awaitable[None]] | None,
                    inline: _Inline | None = None) -> OrderUpdate:
        """Send once (or take the answer of the send `submit` made inline). A row that went out before
        its commit is committed before anything else about the order is recorded, whatever the send
        did: the commit's own failure (the row stays in the intent log, the ledger's `order_failure`
        stops the daemon so that the next start commits it) outranks the send's. Shielded: cancelling
        this task must not cancel the commit's future, which would drop the error the ledger thread
        delivers to it."""
        try:
            if inline is None:
                return await self.clock.wait_for(self.exchange.create_order(request), self.send_timeout)
            return await self._answer(inline)
        finally:
            if commit is not None:
                await asyncio.shield(commit())

    async def _answer(self, inline: _Inline) -> OrderUpdate:
        """The answer of an exchange call made inline: as it came, or raised, or the rest of the call
        awaited under the send timeout."""
        if inline.rest is not None:
            return await self.clock.wait_for(inline.rest, self.send_timeout)
        if inline.error is not None:
            raise inline.error
        assert inline.update is not None
        return inline.update

    async def _rejected(self, order: Order, reason: str) -> SubmitResult:
        await self.store.update_order(order.client_order_id, state=OrderState.REJECTED)
        order.state = OrderState.REJECTED
        log.info(
            "order rejected", engine=self.engine, client_order_id=order.client_order_id,
            symbol=order.symbol, reason=reason,
        )
        self.bus.publish(
            OrderRejectedByExchange(
                ts=self.clock.now(), engine=self.engine, client_order_id=order.client_order_id,
                symbol=order.symbol, reason=reason,
            )
        )
        return SubmitResult(order=order, update=None, error=reason)

    async def apply_update(self, order: Order, update: OrderUpdate, *, notify: bool = False) -> SubmitResult:
        """Record the exchange's view of an order: its fills (idempotently) and its state. `notify` tells
        the engine its positions changed behind its back (a resting order filled); an engine's own
        orders need no such news, it reloads after trading."""
        outcomes: list[FillOutcome] = []
        for raw in update.fills:
            fill = raw if raw.engine == self.engine else dataclasses.replace(raw, engine=self.engine)
            outcome = await self.store.record_fill(fill, leverage=order.leverage or 1)
            if outcome.new:
                outcomes.append(outcome)
                self._publish_fill(fill, outcome)
        await self.store.update_order(
            order.client_order_id,
            state=update.state,
            filled=update.filled,
            avg_price=update.avg_price,
            exchange_order_id=update.exchange_order_id,
        )
        order.state = update.state
        order.filled = update.filled
        order.avg_price = update.avg_price
        order.exchange_order_id = update.exchange_order_id
        if update.state is OrderState.CANCELED:
            self.bus.publish(
                OrderCanceled(
                    ts=self.clock.now(), engine=self.engine, client_order_id=order.client_order_id,
                    symbol=order.symbol, reason="canceled",
                )
            )
        if notify and outcomes and self.on_position_change is not None:
            self.on_position_change(order.symbol)
        return SubmitResult(order=order, update=update, outcomes=tuple(outcomes))

    async def record_foreign_fills(self, update: OrderUpdate) -> list[FillOutcome]:
        """Fills the exchange made on its own (a liquidation): no order row of ours exists, so they are
        recorded against the engine's position with the position's leverage."""
        log.warning("fills without an order of ours", engine=self.engine, client_order_id=update.client_order_id,
                    symbol=update.symbol, fills=len(update.fills))
        outcomes: list[FillOutcome] = []
        for raw in update.fills:
            fill = dataclasses.replace(raw, engine=self.engine)
            outcome = await self.store.record_fill(fill, leverage=self.leverage_of(update.symbol))
            if outcome.new:
                outcomes.append(outcome)
                self._publish_fill(fill, outcome)
        if outcomes and self.on_position_change is not None:
            self.on_position_change(update.symbol)
        return outcomes

    def leverage_of(self, symbol: str) -> int:
        getter = getattr(self.exchange, "leverage", None)
        return int(getter(symbol)) if callable(getter) else 1

    def _publish_fill(self, fill: Fill, outcome: FillOutcome) -> None:
        now = self.clock.now()
        self.bus.publish(
            OrderFilled(
                ts=now, engine=self.engine, client_order_id=fill.client_order_id, symbol=fill.symbol,
                side=fill.side, amount=fill.amount, price=fill.price, fee=fill.fee,
                reduce_only=fill.reduce_only,
            )
        )
        closed = outcome.closed
        if closed is not None:
            log.info("position closed", engine=self.engine, symbol=fill.symbol, side=str(closed.side),
                     amount=str(closed.amount), entry=str(closed.entry_price), exit=str(closed.exit_price),
                     realized_pnl=str(closed.realized_pnl), client_order_id=fill.client_order_id)
            self.bus.publish(
                PositionClosed(
                    ts=now, engine=self.engine, market=fill.market, symbol=fill.symbol,
                    side=closed.side, amount=closed.amount, entry_price=closed.entry_price,
                    exit_price=closed.exit_price, realized_pnl=closed.realized_pnl,
                    reason=fill.client_order_id,
                )
            )
        pos = outcome.position
        if pos is not None and pos.amount > 0 and pos.opened_at >= fill.ts and closed is None:
            self.bus.publish(
                PositionOpened(
                    ts=now, engine=self.engine, market=pos.market, symbol=pos.symbol, side=pos.side,
                    amount=pos.amount, entry_price=pos.entry_price,
                )
            )

    async def resolve_unknown(self, order: Order) -> SubmitResult:
        """Ask the exchange what became of an order whose send had no clear answer.

        OrderNotFound for longer than the grace period means the order never reached the exchange.
        Temporary errors while asking are retried on the clock; this never sends the order again.
        """
        # Counted from the order's last update: after a restart an old PENDING order that the exchange
        # does not know is settled at once, while a fresh one gets the full grace for the exchange to
        # show it.
        self._resolving.add(order.client_order_id)
        try:
            return await self._resolve_unknown(order)
        finally:
            self._resolving.discard(order.client_order_id)

    async def _resolve_unknown(self, order: Order) -> SubmitResult:
        deadline = max(order.updated_at, order.created_at) + self.unknown_grace_seconds
        give_up = self.clock.now() + self.max_resolve_seconds
        delay = 0.5
        while True:
            if self.on_wait is not None:
                self.on_wait()
            try:
                update = await self.clock.wait_for(
                    self.exchange.fetch_order(order.symbol, order.client_order_id), self.send_timeout
                )
            except OrderNotFound:
                if self.clock.now() >= deadline:
                    log.warning(
                        "unknown order was never placed", engine=self.engine,
                        client_order_id=order.client_order_id,
                    )
                    return await self._rejected(order, "never reached the exchange")
            except (TimeoutError, TemporaryError) as exc:
                if self.clock.now() >= give_up:
                    # Still unknown: leave it UNKNOWN in the ledger (never resend); the next start-up or
                    # resolution pass asks again.
                    log.error("order still unknown; will ask again later", engine=self.engine,
                              client_order_id=order.client_order_id, error=str(exc))
                    return SubmitResult(order=order, update=None, error=f"unresolved: {exc}")
                log.info("resolving unknown order: retrying", client_order_id=order.client_order_id,
                         error=str(exc))
            else:
                log.info("unknown order resolved", engine=self.engine,
                         client_order_id=order.client_order_id, state=str(update.state))
                return await self.apply_update(order, update)
            await self.clock.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def cancel(self, order: Order, *, defer_record: bool = False) -> SubmitResult:
        """Cancel by client order id. Binance answers "unknown order" for an order that already filled,
        so a not-found cancel is settled by asking for the order, never by assuming it was cancelled.

        `defer_record`: a plain cancel (no fills) returns once the exchange has answered, with its
        ledger write still running in `result.recorded`, which the caller must await (an unawaited
        failure would go unseen). A take-profit cancels the position's stop and then sells: the sell's
        own order row goes into the intent log at once and the sell out, the cancel's record running
        beside them, so the sell does not wait a whole ledger round trip for the record. Nothing depends
        on that row before then: the engine decides from the exchange's answer, and a crash in between
        leaves an order the ledger still thinks open, which reconciliation settles by asking the
        exchange. Fills are always recorded before returning."""
        try:
            update = await self.clock.wait_for(
                self.exchange.cancel_order(order.symbol, order.client_order_id), self.send_timeout
            )
        except OrderNotFound:
            return await self.resolve_unknown(order)
        if not defer_record or update.fills:
            return await self.apply_update(order, update)
        task = asyncio.get_running_loop().create_task(self.apply_update(order, update))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        # The caller's copy shows the outcome at once (apply_update sets the same fields when it runs).
        order.state = update.state
        order.filled = update.filled
        order.avg_price = update.avg_price
        order.exchange_order_id = update.exchange_order_id
        return SubmitResult(order=order, update=update, recorded=task)

    async def poll_open_orders(self) -> int:
        """Ask the exchange about every order the ledger holds open (protective stops, resting entries)
        and record what changed. The live exchange tells us nothing by itself; the paper exchange
        reports through its callback instead. Returns how many orders changed.

        Also one question each about orders left UNKNOWN: a resolution that gave up (the exchange did
        not answer for minutes) would otherwise wait for the next start-up, and meanwhile a stop placed
        during the outage could rest on the exchange unseen, or a filled entry miss from the books.
        Orders whose send is still resolving them are left to it. So is a PENDING row while its send is
        in progress; one left PENDING with no send behind it past the grace (a send cut off by an error
        nobody expected) is asked about like an unknown one."""
        changed = 0
        for order in await self.store.orders_in_states(
            [OrderState.OPEN, OrderState.PARTIALLY_FILLED, OrderState.UNKNOWN, OrderState.PENDING],
            engine=self.engine,
        ):
            cid = order.client_order_id
            if order.state is OrderState.PENDING and (
                cid in self._sending
                or self.clock.now() < max(order.updated_at, order.created_at) + self.unknown_grace_seconds
            ):
                continue
            unknown = order.state in (OrderState.UNKNOWN, OrderState.PENDING)
            if unknown and cid in self._resolving:
                continue
            try:
                update = await self.clock.wait_for(
                    self.exchange.fetch_order(order.symbol, order.client_order_id), self.send_timeout
                )
            except OrderNotFound:
                if unknown:
                    if self.clock.now() >= max(order.updated_at, order.created_at) + self.unknown_grace_seconds:
                        log.warning("unknown order was never placed", engine=self.engine,
                                    client_order_id=order.client_order_id)
                        await self._rejected(order, "never reached the exchange")
                        changed += 1
                    continue
                log.warning("open order not found on the exchange", engine=self.engine,
                            client_order_id=order.client_order_id)
                continue
            except (TimeoutError, TemporaryError, DependencyError) as exc:
                log.info("order poll skipped", client_order_id=order.client_order_id, error=str(exc))
                continue
            if update.state is not order.state or update.filled != order.filled:
                await self.apply_update(order, update, notify=True)
                changed += 1
        return changed

    async def resolve_open_orders(self) -> list[SubmitResult]:
        """At start-up: bring every non-terminal order of this engine in the ledger up to date."""
        results: list[SubmitResult] = []
        pending = await self.store.orders_in_states(
            [OrderState.PENDING, OrderState.UNKNOWN, OrderState.OPEN, OrderState.PARTIALLY_FILLED],
            engine=self.engine,
        )
        for order in pending:
            results.append(await self.resolve_unknown(order))
        return results
