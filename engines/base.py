"""What every engine shares: the loop with its heartbeat, graceful stop, state reloaded from the ledger,
and the one way to trade (risk gate, then the allocator's reservation, then the order manager).

An engine instance lives for one run: after a restart the Orchestrator builds a fresh one, which
reloads positions from the ledger, so nothing an engine holds in memory is ever the only copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog

from config import Settings
from core.clock import Clock
from core.errors import DependencyError, TemporaryError
from core.events import DataStale, EventBus, OrderDenied
from core.types import ZERO, CandleSeries, Order, OrderIntent, OrderState, OrderType, Position, Side, Ticker
from engines.trade_metrics import MetricsReport, load_report, report
from exchange.base import Exchange, MarketFeed, quantize_down
from exchange.orders import OrderManager, SubmitResult
from monitoring.health import HealthMonitor
from risk.allocator import CapitalAllocator
from risk.gate import RiskGate
from storage.ledger import Ledger

METRICS_EVERY = 10.0  # seconds between trade-metrics refreshes after positions closed
# An order that has not filled but may still: resting, or sent without a clear answer.
_IN_DOUBT = (OrderState.PENDING, OrderState.UNKNOWN, OrderState.OPEN, OrderState.PARTIALLY_FILLED)


@dataclass
class EngineContext:
    """Everything an engine may touch, built once by the Orchestrator and shared across restarts."""

    name: str
    settings: Settings
    clock: Clock
    bus: EventBus
    ledger: Ledger
    exchange: Exchange
    feed: MarketFeed
    gate: RiskGate
    allocator: CapitalAllocator
    health: HealthMonitor
    orders: OrderManager
    equity: Callable[[], Decimal]
    trade_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Bumped whenever a fill changes a position outside the engine's own calls (a protective stop or a
    # resting order filling on the exchange); the engine reloads its positions when it sees it move.
    position_changes: int = 0
    # Set by the running engine, so that it hears of such a fill at once and reloads while idle rather
    # than between the next price update and the order it triggers.
    on_position_change: Callable[[], None] | None = None

    def note_position_change(self, _symbol: str = "") -> None:
        self.position_changes += 1
        if self.on_position_change is not None:
            self.on_position_change()


@dataclass
class DenialRun:
    """Identical denials of one symbol and side in a row: the gate's rule, its latest reason and how
    many. A tripped breaker refuses every entry signal for its whole cooldown, so only a run's first
    denial is logged; the run's end (an order of that symbol and side passing, or another rule
    refusing it) is logged with the count."""

    rule: str
    reason: str
    count: int = 1


@dataclass
class EngineCounters:
    steps: int = 0
    entries: int = 0
    exits: int = 0
    denied: int = 0
    rejected: int = 0
    stale_blocks: int = 0
    last_step_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BaseEngine:
    """Subclasses implement `step()`; `run()` owns the loop, the heartbeat and the stop flag."""

    name = "base"

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.clock = ctx.clock
        self.log = structlog.get_logger("engine").bind(engine=ctx.name)
        self.positions: dict[str, Position] = {}
        self.counters = EngineCounters()
        self._stopping = False
        self._running = False
        self._feed_version = 0
        self._stale: set[str] = set()
        self._seen_changes = -1
        self._idle = False  # waiting for the feed, between two steps
        self._reload: asyncio.Task[None] | None = None
        self._denials: dict[tuple[str, Side], DenialRun] = {}
        self.metrics: MetricsReport = report([])
        self._metrics_stale = False
        self._metrics_due = 0.0
        # Symbols with an entry whose outcome is not known yet (see `entry_in_doubt`).
        self._entries_in_doubt: set[str] = set()

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def wait_seconds(self) -> float:
        """Longest wait for new data before the loop turns anyway (and beats)."""
        return 5.0

    async def load_state(self) -> None:
        """Settle this engine's orders that a previous instance left pending or unknown (a restart after
        a stall or crash), then load positions: a fresh instance never trades on a stale picture."""
        self.ctx.orders.on_wait = self.heartbeat
        unsettled = await self.ctx.ledger.orders_in_states([OrderState.PENDING, OrderState.UNKNOWN],
                                                           engine=self.ctx.name)
        for order in unsettled:
            await self.ctx.orders.resolve_unknown(order)
        self._entries_in_doubt = {o.symbol for o in await self._doubtful_entries()}
        await self.refresh_positions()
        await self.refresh_metrics()

    async def _doubtful_entries(self) -> list[Order]:
        """This engine's entry orders (not reduce-only, not stops) that are neither filled nor settled."""
        orders = await self.ctx.ledger.orders_in_states(_IN_DOUBT, engine=self.ctx.name)
        return [o for o in orders if not o.reduce_only and o.order_type is not OrderType.STOP_MARKET]

    def note_entry(self, symbol: str, result: SubmitResult | None) -> None:
        """After an entry's send: one that did not come back filled, yet may still fill (resting, or its
        outcome unknown after a timeout), blocks further entries of the symbol until it settles."""
        if result is not None and result.filled <= 0 and result.order.state in _IN_DOUBT:
            self._entries_in_doubt.add(symbol)
            self.log.info("entry not filled yet: no other entry of the symbol until it settles", symbol=symbol,
                          client_order_id=result.order.client_order_id, state=str(result.order.state))

    async def entry_in_doubt(self, symbol: str) -> bool:
        """True while an earlier entry of the symbol may still fill: a second one would double the
        position once both did (an exchange that timed out had placed the first after all). The ledger is
        asked only for symbols noted so, so the usual entry costs a set lookup."""
        if symbol not in self._entries_in_doubt:
            return False
        if any(o.symbol == symbol for o in await self._doubtful_entries()):
            return True
        self._entries_in_doubt.discard(symbol)
        return False

    def open_position_count(self) -> int:
        """Positions held, plus entries in doubt in symbols not held: each may still fill and become a
        position, so the max-positions rule counts it as one (an entry of a held symbol adds to its
        position). No I/O: it may count an entry that has settled since (see `room_for_entry`)."""
        doubtful = self._entries_in_doubt
        if not doubtful:
            return len(self.positions)
        return len(self.positions) + len(doubtful.difference(self.positions))

    async def prune_entries_in_doubt(self) -> None:
        """Forget the entries noted in doubt that have settled since (filled, cancelled, rejected, never
        placed), which `entry_in_doubt` does only for the symbol it is asked about: one ledger read."""
        if self._entries_in_doubt:
            self._entries_in_doubt &= {o.symbol for o in await self._doubtful_entries()}

    async def room_for_entry(self, max_positions: int) -> bool:
        """Whether a new position fits under `max_positions`, entries in doubt counted (see
        `open_position_count`). The ledger is asked only when such entries are what fills the room, to
        forget those that have settled: a stale one must not block entries in other symbols."""
        if self.open_position_count() < max_positions:
            return True
        if len(self.positions) >= max_positions or not self._entries_in_doubt:
            return False
        await self.prune_entries_in_doubt()
        return self.open_position_count() < max_positions

    async def start(self) -> None:
        """The engine's task. Returns when stop() was called; raises on a fault (the supervisor decides)."""
        self._running = True
        self.heartbeat()
        self.ctx.on_position_change = self._position_changed
        try:
            await self.load_state()
            self.log.info("engine started", positions=len(self.positions))
            while not self._stopping:
                self.heartbeat()
                self._idle = True
                try:
                    self._feed_version = await self.ctx.feed.wait_update(self._feed_version, self.wait_seconds)
                finally:
                    self._idle = False
                if self._stopping:
                    break
                self.heartbeat()
                if self._reload is not None:
                    await self._reload  # a reload begun while idle: the step waits for its answer
                if self._seen_changes != self.ctx.position_changes:
                    self._seen_changes = self.ctx.position_changes
                    await self.refresh_positions()
                await self.step()
                self.counters.steps += 1
                if self._metrics_stale and self.clock.now() >= self._metrics_due:
                    # After the step and at most every METRICS_EVERY seconds: reading every closed trade
                    # must never sit between a price update and the order it triggers.
                    self._metrics_stale = False
                    self._metrics_due = self.clock.now() + METRICS_EVERY
                    await self.refresh_metrics()
                self.counters.last_step_at = self.clock.now()
        finally:
            self._running = False
            if self.ctx.on_position_change == self._position_changed:  # not a successor's
                self.ctx.on_position_change = None
            if self._reload is not None:
                self._reload.cancel()
            for symbol, side in list(self._denials):
                self._end_denials(symbol, side, "engine stopped")
        self.log.info("engine stopped", steps=self.counters.steps)

    def _position_changed(self) -> None:
        """A fill the engine did not make changed its positions: reload now if the engine is idle, so the
        next price update finds them current; during a step the loop reloads before the next one."""
        if self._idle and self._reload is None:
            self._reload = asyncio.ensure_future(self._reload_positions())

    async def _reload_positions(self) -> None:
        done = False
        try:
            while self._seen_changes != self.ctx.position_changes:
                self._seen_changes = self.ctx.position_changes
                await self.refresh_positions()
            done = True
        except Exception as exc:
            # start() reloads before the next step and meets the error itself; logged here too, in
            # case it has cleared by then.
            self.log.warning("idle position reload failed; the next step reloads", error=repr(exc))
        finally:
            self._reload = None
            if not done:
                self._seen_changes = -1  # whatever stopped this reload, the positions are not current

    def stop(self) -> None:
        """Ask the loop to finish its current step and return."""
        self._stopping = True

    def heartbeat(self) -> None:
        self.ctx.health.heartbeat(self.ctx.name)

    async def step(self) -> None:
        raise NotImplementedError

    # --- state -----------------------------------------------------------------------------------
    async def refresh_positions(self) -> None:
        rows = await self.ctx.ledger.positions(self.ctx.name)
        closed = set(self.positions) - {p.symbol for p in rows}
        self.positions = {p.symbol: p for p in rows}
        self.ctx.allocator.set_exposure(self.ctx.name, sum((p.notional() for p in rows), ZERO))
        if closed:
            self._metrics_stale = True

    async def refresh_metrics(self) -> None:
        """Trades, win rate, profit factor, average P&L and largest loss, per engine and per symbol, from
        the ledger's closed trades; kept in the ledger too (`metrics:<engine>`) for whoever reads it."""
        self.metrics = await load_report(self.ctx.ledger, self.ctx.name)
        await self.ctx.ledger.set_state(f"metrics:{self.ctx.name}", self.metrics.as_dict())

    def get_status(self) -> dict[str, Any]:
        return {
            "engine": self.ctx.name,
            "running": self._running,
            "stopping": self._stopping,
            "positions": len(self.positions),
            "stale_symbols": sorted(self._stale),
            "steps": self.counters.steps,
            "entries": self.counters.entries,
            "exits": self.counters.exits,
            "denied": self.counters.denied,
            "rejected": self.counters.rejected,
            "last_step_at": self.counters.last_step_at,
            "metrics": self.metrics.as_dict(),
        }

    # --- data freshness --------------------------------------------------------------------------
    def fresh_enough(self, symbol: str, ticker: Ticker | None, candles: CandleSeries | None,
                     max_age: float, now: float | None = None) -> bool:
        """False when the price or the candles have stopped arriving: entries wait, exits still run.
        `now`: the caller's reading of the clock, if it has one.

        Logged and published once per stale episode per symbol, not on every tick.
        """
        if now is None:
            now = self.clock.now()
        ticker_age = now - ticker.ts if ticker is not None else math.inf
        candles_age = now - candles.observed_at if candles is not None else math.inf
        age = candles_age if candles_age > ticker_age else ticker_age  # max(), NaN included
        if age <= max_age:
            if symbol in self._stale:
                self._stale.discard(symbol)
                self.log.info("data fresh again", symbol=symbol)
            return True
        self.counters.stale_blocks += 1
        if symbol not in self._stale:
            self._stale.add(symbol)
            self.log.warning("stale data: entries blocked", symbol=symbol, age_seconds=round(age, 1),
                             max_age_seconds=max_age)
            self.ctx.bus.publish(DataStale(ts=now, engine=self.ctx.name, symbol=symbol, age_seconds=age))
        return False

    # --- trading ---------------------------------------------------------------------------------
    async def cancel_stop(self, order: Order, records: list[Awaitable[object]] | None = None) -> Order | None:
        """Cancel one protective stop under the trade lock (so no exit of the engine's own runs beside
        it). Returns the order as the exchange settled it (cancelled, filled, never placed), or None when
        the exchange did not answer: the stop may still rest there, and the caller retries later.

        With `records`, a plain cancel's ledger write is left running and appended there for the caller
        to await (`OrderManager.cancel(defer_record=True)`): the exit that follows writes its own order
        row and goes out at once, the cancel's record running beside it, instead of waiting a whole
        ledger round trip for the record before it."""
        try:
            async with self.ctx.trade_lock:
                result = await self.ctx.orders.cancel(order, defer_record=records is not None)
        except (TimeoutError, TemporaryError, DependencyError) as exc:
            self.log.warning("protective stop not cancelled: will retry", symbol=order.symbol,
                             client_order_id=order.client_order_id, error=str(exc) or type(exc).__name__)
            return None
        if records is not None and result.recorded is not None:
            records.append(result.recorded)
        return result.order

    @staticmethod
    async def await_records(records: list[Awaitable[object]]) -> None:
        """Wait for every deferred ledger write (see `cancel_stop`), all of them even when one fails;
        the first failure is raised. Shielded: cancelling the engine meanwhile must not cut a record
        short (its events would never be published); the order manager owns them and drain() waits."""
        if not records:
            return
        outcomes = await asyncio.gather(*(asyncio.shield(r) for r in records), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _note_denial(self, intent: OrderIntent, rule: str, reason: str) -> None:
        """Log a denial unless it repeats the run of its symbol and side (see `DenialRun`); every denial
        is still counted and published as an event."""
        key = (intent.symbol, intent.side)
        run = self._denials.get(key)
        if run is not None and run.rule == rule:
            run.count += 1
            run.reason = reason
            return
        if run is not None:
            self._end_denials(intent.symbol, intent.side, "another rule denies")
        self._denials[key] = DenialRun(rule, reason)
        self.log.info("order denied", symbol=intent.symbol, side=str(intent.side), reason=reason,
                      note="repeats of this denial are counted, not logged, until it ends")

    def _end_denials(self, symbol: str, side: Side, why: str) -> None:
        run = self._denials.pop((symbol, side), None)
        if run is not None and run.count > 1:
            self.log.info("order denials ended", symbol=symbol, side=str(side), rule=run.rule, denied=run.count,
                          last_reason=run.reason, ended_by=why)

    async def trade(self, intent: OrderIntent) -> SubmitResult | None:
        """Gate, reserve, send, release. Returns None when the gate denied the intent.

        The trade lock is shared with the Orchestrator's flattening, so a kill and an engine exit
        can never both sell the same position. (The body is written under the lock, not in a coroutine of
        its own: this is on the order path, where every coroutine made costs.)
        """
        async with self.ctx.trade_lock:
            if intent.reduce_only:
                # The position may have changed while waiting for the lock (a stop filled, a flatten ran):
                # never sell more than the ledger says is held, and nothing when it is gone.
                held = await self.ctx.ledger.position(self.ctx.name, intent.symbol)
                if held is None or held.side.exit_side is not intent.side:
                    self.log.info("reduce-only order dropped: no position to reduce", symbol=intent.symbol)
                    await self.refresh_positions()
                    return None
                if intent.amount > held.amount:
                    step = self.ctx.exchange.market(intent.symbol).amount_step
                    intent = dataclasses.replace(intent, amount=quantize_down(held.amount, step))
                    if intent.amount <= 0:
                        return None
            # An entry counts the entries in doubt too (see `open_position_count`; the engines have pruned
            # the settled ones in `room_for_entry` before deciding to enter); an exit never needs to.
            open_positions = len(self.positions) if intent.reduce_only else self.open_position_count()
            decision = self.ctx.gate.check(
                intent, equity=self.ctx.equity(), open_positions=open_positions,
                has_position=intent.symbol in self.positions,
            )
            if not decision.allowed:
                self.counters.denied += 1
                self._note_denial(intent, decision.rule, decision.reason)
                self.ctx.bus.publish(
                    OrderDenied(ts=self.clock.now(), engine=self.ctx.name, symbol=intent.symbol,
                                side=intent.side, reason=decision.reason)
                )
                return None
            if self._denials:
                self._end_denials(intent.symbol, intent.side, "order passed the gate")
            try:
                result = await self.ctx.orders.submit(intent)
            finally:
                if decision.reservation is not None:
                    self.ctx.allocator.release(decision.reservation)
            if result.error is not None:
                self.counters.rejected += 1
            await self.refresh_positions()
            return result
