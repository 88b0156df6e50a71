"""The interface every market implements: the paper exchange now, the ccxt client for testnet and live.

Engines and the order manager see only this, so paper trading exercises the same order path as live.
All money is Decimal; every method that talks to a network has a timeout in its implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal
from typing import Protocol

from core.types import (
    ZERO,
    CandleSeries,
    Fill,
    MarketInfo,
    MarketType,
    OrderState,
    OrderType,
    PositionSide,
    Side,
    Ticker,
)
from core.values import value_type


@value_type
class OrderRequest:
    """What is sent to the exchange. `client_order_id` was written to the ledger before this exists."""

    client_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    amount: Decimal
    price: Decimal | None = None
    stop_price: Decimal | None = None
    reduce_only: bool = False
    leverage: int | None = None


@value_type
class OrderUpdate:
    """The exchange's view of one order. `fills` are all executions known for it so far."""

    client_order_id: str
    exchange_order_id: str
    symbol: str
    side: Side
    order_type: OrderType
    amount: Decimal
    filled: Decimal
    avg_price: Decimal | None
    state: OrderState
    ts: float
    fills: tuple[Fill, ...] = ()
    reduce_only: bool = False


@value_type
class ExchangePosition:
    """A futures position as the exchange reports it."""

    symbol: str
    side: PositionSide
    amount: Decimal
    entry_price: Decimal
    leverage: int
    liquidation_price: Decimal | None
    unrealized_pnl: Decimal
    margin: Decimal


@value_type
class Balance:
    """Per asset: free and total. For futures, `equity` is wallet balance plus unrealized P&L."""

    free: dict[str, Decimal] = field(default_factory=dict)
    total: dict[str, Decimal] = field(default_factory=dict)
    equity: Decimal = ZERO


class Exchange(Protocol):
    market_type: MarketType
    # True when `create_order` never awaits (the paper exchanges match against prices in memory). Once
    # the order's row is in the intent log, the order manager then calls it in the submitting task
    # (in a copy of its context) instead of a task of its own: nothing could cancel it halfway, and
    # the order goes out one turn of the event loop sooner. Should it await after all, the order
    # manager's task carries it on under the send timeout, so it must not bind anything to the
    # current task before its first await (an `asyncio.timeout` there would be the caller's). A
    # network client says False: its send must survive the cancellation of whoever asked for it.
    answers_inline: bool

    async def load_markets(self) -> dict[str, MarketInfo]: ...

    def market(self, symbol: str) -> MarketInfo: ...

    async def create_order(self, request: OrderRequest) -> OrderUpdate: ...

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        """Raises core.errors.OrderNotFound when the exchange does not know the id."""
        ...

    async def cancel_order(self, symbol: str, client_order_id: str) -> OrderUpdate: ...

    async def fetch_open_orders(self, symbols: list[str]) -> list[OrderUpdate]: ...

    async def fetch_my_trades(self, symbol: str, since: float | None = None) -> list[Fill]: ...

    async def fetch_balance(self) -> Balance: ...

    async def fetch_positions(self) -> list[ExchangePosition]: ...

    async def close(self) -> None: ...


class MarketFeed(Protocol):
    """Prices and candles for the engines. Live: public ccxt polling. Replay: bundled history.

    Consumers wait with `wait_update(after, timeout)`, which returns the feed's new version number as
    soon as anything changed (or the old one on timeout), so several engines can share one feed.
    """

    @property
    def version(self) -> int: ...

    @property
    def symbols(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ticker(self, symbol: str) -> Ticker | None: ...

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None: ...

    async def wait_update(self, after: int, timeout: float) -> int: ...

    def on_update(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` synchronously on every new version, before any `wait_update` returns it
        (the paper exchanges settle resting orders there). Returns the function that removes it."""
        ...

    def failure(self) -> BaseException | None:
        """The error that ended the feed's own task, if it died: prices have stopped for good, which
        the Orchestrator treats as a crash (the engines alone would only see stale data)."""
        ...

    @property
    def finished(self) -> bool:
        """True when a replay has run out of data (live feeds never finish)."""
        ...


def quantize_down(value: Decimal, step: Decimal) -> Decimal:
    """Round an amount down to the market's step, so an order never asks for more than intended."""
    if step <= 0:
        return value
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step


def quantize_price(value: Decimal, step: Decimal) -> Decimal:
    if step <= 0:
        return value
    return (value / step).to_integral_value(rounding=ROUND_HALF_EVEN) * step
