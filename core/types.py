"""Domain types shared by every layer.

Money (prices, amounts, balances, fees, P&L) is `Decimal` here; candles are float64 arrays because
indicators are numpy. The strategy converts once, when it turns a signal into an `OrderIntent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from core.values import value_type

ZERO = Decimal(0)

FloatArray = npt.NDArray[np.float64]


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class PositionSide(StrEnum):
    LONG = "long"
    SHORT = "short"

    @property
    def entry_side(self) -> Side:
        return Side.BUY if self is PositionSide.LONG else Side.SELL

    @property
    def exit_side(self) -> Side:
        return Side.SELL if self is PositionSide.LONG else Side.BUY


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"
    STOP_MARKET = "stop_market"


class OrderState(StrEnum):
    """Life of an order. PENDING: written to the ledger, not yet sent. UNKNOWN: sent, outcome not known
    (timeout, disconnect, crash); resolved by asking the exchange for the client order id, never by
    sending again."""

    PENDING = "pending"
    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    REJECTED = "rejected"
    UNKNOWN = "unknown"

    @property
    def is_terminal(self) -> bool:
        return self in (OrderState.FILLED, OrderState.CANCELED, OrderState.REJECTED)


class TradingState(StrEnum):
    """ACTIVE: everything may pass the gate. REDUCING: breaker tripped, only reduce-only intents.
    HALTED: killed, nothing passes but the system's own flattening."""

    ACTIVE = "active"
    REDUCING = "reducing"
    HALTED = "halted"


class MarketType(StrEnum):
    SPOT = "spot"
    FUTURES = "futures"


@value_type
class Ticker:
    """The latest price of a symbol. `ts` is when it was observed, on the daemon's clock (epoch s)."""

    symbol: str
    bid: Decimal
    ask: Decimal
    last: Decimal
    ts: float
    quote_volume_24h: Decimal = ZERO
    change_pct_24h: Decimal = ZERO

    @property
    def mid(self) -> Decimal:
        return (self.bid + self.ask) / 2


@value_type
class Candle:
    ts: float  # open time, epoch seconds UTC
    open: float
    high: float
    low: float
    close: float
    volume: float


@value_type
class CandleSeries:
    """Closed candles of one symbol and timeframe, oldest first, as float64 arrays.

    `observed_at` is when the feed received the newest of them (daemon clock): an engine uses it to
    refuse entries on data that has stopped arriving.
    """

    symbol: str
    timeframe: str
    ts: FloatArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray
    observed_at: float

    def __len__(self) -> int:
        return int(self.close.shape[0])

    def tail(self, n: int) -> CandleSeries:
        return CandleSeries(
            self.symbol,
            self.timeframe,
            self.ts[-n:],
            self.open[-n:],
            self.high[-n:],
            self.low[-n:],
            self.close[-n:],
            self.volume[-n:],
            self.observed_at,
        )


@value_type
class OrderIntent:
    """What an engine wants to do, before the risk gate has seen it.

    `reduce_only` intents can only shrink a position; they pass while trading is REDUCING.
    `system_flatten` marks the system's own flattening, the one thing that passes while HALTED.
    `notional` is the quote-currency value the engine will reserve from its budget (entries only).
    """

    engine: str
    market: MarketType
    symbol: str
    side: Side
    amount: Decimal
    order_type: OrderType = OrderType.MARKET
    price: Decimal | None = None
    stop_price: Decimal | None = None
    reduce_only: bool = False
    system_flatten: bool = False
    leverage: int | None = None
    notional: Decimal = ZERO
    reason: str = ""


@dataclass(slots=True)
class Order:
    """An order as the ledger knows it."""

    client_order_id: str
    engine: str
    market: MarketType
    symbol: str
    side: Side
    order_type: OrderType
    amount: Decimal
    price: Decimal | None
    stop_price: Decimal | None
    reduce_only: bool
    state: OrderState
    created_at: float
    updated_at: float
    filled: Decimal = ZERO
    avg_price: Decimal | None = None
    exchange_order_id: str | None = None
    leverage: int | None = None
    reason: str = ""


@value_type
class Fill:
    """One execution. `trade_id` is the exchange's; (client_order_id, trade_id) is unique."""

    client_order_id: str
    trade_id: str
    engine: str
    market: MarketType
    symbol: str
    side: Side
    amount: Decimal
    price: Decimal
    fee: Decimal
    fee_asset: str
    ts: float
    reduce_only: bool = False


@dataclass(slots=True)
class Position:
    """An engine's open position in one symbol, kept in the ledger and updated with every fill."""

    engine: str
    market: MarketType
    symbol: str
    side: PositionSide
    amount: Decimal
    entry_price: Decimal
    opened_at: float
    leverage: int = 1
    realized_pnl: Decimal = ZERO
    fees: Decimal = ZERO
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def unrealized_pnl(self, price: Decimal) -> Decimal:
        diff = price - self.entry_price
        if self.side is PositionSide.SHORT:
            diff = -diff
        return diff * self.amount

    def notional(self, price: Decimal | None = None) -> Decimal:
        return self.amount * (price if price is not None else self.entry_price)

    def pnl_pct(self, price: Decimal) -> Decimal:
        """Price move in the position's favour, in percent of entry (before leverage)."""
        if self.entry_price == 0:
            return ZERO
        diff = (price - self.entry_price) / self.entry_price * 100
        return diff if self.side is PositionSide.LONG else -diff


@value_type
class MarketInfo:
    """Precision and limits of one market, as loaded from the exchange."""

    symbol: str
    base: str
    quote: str
    market: MarketType
    amount_step: Decimal
    price_step: Decimal
    min_amount: Decimal
    min_notional: Decimal
    max_leverage: int = 1
