"""Past-tense events and the in-process bus that carries them.

Publishers never wait: each subscriber has its own bounded queue, a full queue drops the event and
counts it, so a slow Telegram or a busy journal can never slow an engine down.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import field
from decimal import Decimal
from typing import Any

import structlog

from core.types import MarketType, OrderType, PositionSide, Side, TradingState
from core.values import value_type

log = structlog.get_logger("bus")


@value_type(kw_only=True)
class Event:
    ts: float

    @property
    def kind(self) -> str:
        return type(self).__name__

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Decimal) else v
        return out


@value_type(kw_only=True)
class DaemonStarted(Event):
    mode: str
    engines: tuple[str, ...]
    equity: Decimal
    # The breaker as start-up left it: a restart may come up REDUCING or HALTED, which the owner must see.
    trading_state: TradingState = TradingState.ACTIVE
    state_reason: str = ""


@value_type(kw_only=True)
class DaemonStopping(Event):
    reason: str


@value_type(kw_only=True)
class PortfolioReported(Event):
    """The final (or periodic) portfolio: equity, P&L and positions per engine."""

    equity: Decimal
    realized_pnl: Decimal
    unrealized_pnl: Decimal
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    final: bool = False


@value_type(kw_only=True)
class OrderPlaced(Event):
    engine: str
    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    amount: Decimal
    price: Decimal | None
    reduce_only: bool


@value_type(kw_only=True)
class OrderFilled(Event):
    engine: str
    client_order_id: str
    symbol: str
    side: Side
    amount: Decimal
    price: Decimal
    fee: Decimal
    reduce_only: bool


@value_type(kw_only=True)
class OrderCanceled(Event):
    engine: str
    client_order_id: str
    symbol: str
    reason: str


@value_type(kw_only=True)
class OrderRejectedByExchange(Event):
    engine: str
    client_order_id: str
    symbol: str
    reason: str


@value_type(kw_only=True)
class OrderDenied(Event):
    """The risk gate said no. Not an error: the engine goes on."""

    engine: str
    symbol: str
    side: Side
    reason: str


@value_type(kw_only=True)
class PositionOpened(Event):
    engine: str
    market: MarketType
    symbol: str
    side: PositionSide
    amount: Decimal
    entry_price: Decimal


@value_type(kw_only=True)
class PositionClosed(Event):
    engine: str
    market: MarketType
    symbol: str
    side: PositionSide
    amount: Decimal
    entry_price: Decimal
    exit_price: Decimal
    realized_pnl: Decimal
    reason: str


@value_type(kw_only=True)
class DataStale(Event):
    engine: str
    symbol: str
    age_seconds: float


@value_type(kw_only=True)
class EngineStarted(Event):
    engine: str
    attempt: int


@value_type(kw_only=True)
class EngineStopped(Event):
    engine: str
    reason: str


@value_type(kw_only=True)
class EngineStalled(Event):
    """Heartbeat older than the warning threshold (once per episode)."""

    engine: str
    heartbeat_age: float


@value_type(kw_only=True)
class EngineRestarted(Event):
    engine: str
    reason: str
    attempt: int
    backoff_seconds: float


@value_type(kw_only=True)
class EngineFailed(Event):
    engine: str
    reason: str
    restarts: int


@value_type(kw_only=True)
class EnginePaused(Event):
    engine: str
    paused: bool
    by: str


@value_type(kw_only=True)
class TradingStateChanged(Event):
    old: TradingState
    new: TradingState
    reason: str
    until: float | None


@value_type(kw_only=True)
class BreakerBlind(Event):
    """The breaker has had no complete figure to judge for `seconds` (`blind`), or has one again: while
    blind, no daily-loss, drawdown or kill-switch limit is checked."""

    blind: bool
    detail: str
    seconds: float


@value_type(kw_only=True)
class FlattenStuck(Event):
    """A flattening has gone on for `seconds` and its last pass still left `positions` positions and
    `orders` orders of unknown outcome (`stuck`); or, after such an alert, it has ended (`stuck` False,
    with what it left, nothing unless trading was resumed first). `left` is one (engine, symbol, reason)
    per symbol: why the last pass could not close it, which often needs a person (coins gone from the
    account, a position the exchange no longer has, an order nobody can settle)."""

    stuck: bool
    seconds: float
    positions: int
    orders: int
    left: tuple[tuple[str, str, str], ...] = ()


@value_type(kw_only=True)
class RiskRebased(Event):
    """The breaker's baselines started again from `equity` for a reason other than a person's command
    (the set of engines changed between runs)."""

    reason: str
    equity: Decimal


@value_type(kw_only=True)
class ReconciliationFinding(Event):
    engine: str
    finding: str
    detail: str


@value_type(kw_only=True)
class CommandReceived(Event):
    command: str
    args: str
    chat_id: int
    user_id: int
    authorized: bool


class Subscription:
    """One subscriber's bounded queue. `dropped` counts what a full queue had to refuse."""

    def __init__(self, name: str, maxsize: int, kinds: frozenset[type[Event]] | None) -> None:
        self.name = name
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self.kinds = kinds
        self.dropped = 0

    def wants(self, event: Event) -> bool:
        return self.kinds is None or isinstance(event, tuple(self.kinds))

    async def get(self) -> Event:
        return await self.queue.get()


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self.published = 0

    def subscribe(
        self, name: str, maxsize: int = 10_000, kinds: frozenset[type[Event]] | None = None
    ) -> Subscription:
        sub = Subscription(name, maxsize, kinds)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, event: Event) -> None:
        """Hand the event to every subscriber without waiting; never raises into the publisher."""
        self.published += 1
        for sub in self._subs:
            if not sub.wants(event):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.dropped += 1
                if sub.dropped == 1 or sub.dropped % 1000 == 0:
                    log.warning("event dropped", subscriber=sub.name, dropped=sub.dropped)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)
