"""The paper futures exchange: Binance USD-M perpetuals simulated against the market feed.

Paper is the default mode, so a simulated futures account has to be trustworthy where a user's money
would be at stake live: margin is taken before a position opens, a position that runs out of margin
is liquidated at the price it would be live, funding is charged on Binance's schedule, and nothing is
random (fixed fee and slippage model, ids derived from client order ids and a fill sequence).

Account model (one-way mode, USDT-margined, ISOLATED margin):
- The wallet balance holds every USDT the account owns, isolated margins included. It moves only by
  realized P&L, fees and funding. Available = wallet - position margins - margin locked by resting
  orders that could open a position. Equity = wallet + unrealized P&L at the feed's last price.
- Opening or increasing takes initial margin = notional / leverage (rounded up to 1e-12 USDT) plus
  the fee from the available balance. Reducing releases the reduced share of the margin and realizes
  P&L against the cost basis; closing releases all that is left.
- Liquidation price (simplified Binance formula, no maintenance tiers), mmr = maintenance_margin_pct
  / 100: long = entry * (1 - 1/leverage + mmr), short = entry * (1 + 1/leverage - mmr), rounded to
  the price step towards the entry, so a position is never liquidated later than the formula says.
  When the last price reaches it the position is closed at that price and its whole margin is lost:
  the fill carries what the margin had left over the loss at that price as its fee (Binance's
  liquidation clearance fee), so realized P&L minus fee is exactly minus the margin.
- Funding at every multiple of `funding_interval_hours` since midnight UTC (00:00/08:00/16:00 for 8):
  payment = amount * last price * rate; a long pays a positive rate, a short receives it. Applied to
  the wallet (not to the isolated margin, so liquidation prices do not move with funding).
- Leverage is per symbol (default 1) and fixed while the symbol has a position or a resting order that
  could open one. Binance lets an isolated position's leverage be raised; paper refuses, so that a
  position's margin stays a function of its fills and one leverage per symbol, which restore() has.

It keeps no file: after a restart `restore()` rebuilds it from the ledger's fills, open orders,
funding payments and leverages. A fill moves money through one function (`FuturesAccount.apply_fill`)
live and in restore, and every amount it adds to the wallet has a bounded number of decimals, so the
wallet is exact whatever order the ledger hands the history back in.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, localcontext
from typing import TYPE_CHECKING

import structlog

from core.clock import Clock
from core.errors import DependencyError, InsufficientFunds, OrderNotFound, OrderRejected
from core.types import ZERO, Fill, MarketInfo, MarketType, OrderState, OrderType, PositionSide, Side, Ticker
from core.values import value_type
from exchange.base import (
    Balance,
    Exchange,
    ExchangePosition,
    MarketFeed,
    OrderRequest,
    OrderUpdate,
    quantize_down,
    quantize_price,
)
from exchange.paper import FillCallback, MatchingOnUpdates, fee_for, taker_price
from exchange.paper_history import SettledHistory

log = structlog.get_logger("paper_futures")
# The stdlib logger behind `log`. A filtered structlog call still binds and builds its arguments
# (measured 12-14 us cold on the order path); asking the level first costs well under one.
_debug_enabled = logging.getLogger("paper_futures").isEnabledFor

SETTLE_ASSET = "USDT"

# Exact arithmetic: every product here fits in 60 digits, so nothing is rounded but what is rounded on
# purpose (margin and partial cost shares, to _QUANTUM).
_PRECISION = 60
_QUANTUM_EXPONENT = -12
_QUANTUM = Decimal(1).scaleb(_QUANTUM_EXPONENT)
# Entry prices are a division; shown with the ledger's 40 digits so the two agree on positions.
_DISPLAY_PRECISION = 40


@value_type
class FundingPayment:
    """One funding settlement of one position. `amount` is signed from the account's view (negative:
    paid), `rate` is the funding rate as a fraction (0.0001 = 0.01 %), `ts` the funding time."""

    symbol: str
    amount: Decimal
    rate: Decimal
    ts: float


FundingCallback = Callable[[FundingPayment], None]


# --- account arithmetic (pure) ---------------------------------------------------------------------


def _to_quantum(value: Decimal, rounding: str) -> Decimal:
    """Values with more decimals than the quantum are rounded to it; others are kept as they are (an
    exact 300.15 stays 300.15, not 300.150000000000)."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < _QUANTUM_EXPONENT:
        return value.quantize(_QUANTUM, rounding=rounding)
    return value


def initial_margin(notional: Decimal, leverage: int) -> Decimal:
    """notional / leverage, rounded up to the quantum: never less than Binance would take, and with a
    bounded number of decimals, so sums of margins and wallet changes stay exact."""
    with localcontext(prec=_PRECISION):
        return _to_quantum(notional / leverage, ROUND_CEILING)


def _share(value: Decimal, part: Decimal, whole: Decimal) -> Decimal:
    """`value`'s proportional share for `part` of `whole`; the last part takes exactly what is left."""
    if part >= whole:
        return value
    with localcontext(prec=_PRECISION):
        return _to_quantum(value * part / whole, ROUND_HALF_EVEN)


def liquidation_price(
    side: PositionSide, entry_price: Decimal, leverage: int, maintenance_rate: Decimal, price_step: Decimal
) -> Decimal | None:
    """Isolated-margin liquidation price (see the module docstring), rounded to the price step towards
    the entry. None when the formula gives no positive price (a 1x long with no maintenance margin)."""
    with localcontext(prec=_PRECISION):
        inverse = Decimal(1) / leverage
        if side is PositionSide.LONG:
            raw, rounding = entry_price * (1 - inverse + maintenance_rate), ROUND_CEILING
        else:
            raw, rounding = entry_price * (1 + inverse - maintenance_rate), ROUND_FLOOR
        if price_step > 0:
            raw = (raw / price_step).to_integral_value(rounding=rounding) * price_step
    return raw if raw > 0 else None


@dataclass(slots=True)
class FuturesPosition:
    """One isolated position. `cost` is amount * price of what is held (the P&L basis), `margin` the
    isolated margin set aside for it."""

    symbol: str
    side: PositionSide
    amount: Decimal
    cost: Decimal
    margin: Decimal
    leverage: int

    @property
    def entry_price(self) -> Decimal:
        with localcontext(prec=_DISPLAY_PRECISION):
            return self.cost / self.amount

    def unrealized_pnl(self, price: Decimal) -> Decimal:
        with localcontext(prec=_PRECISION):
            value = self.amount * price
            return value - self.cost if self.side is PositionSide.LONG else self.cost - value

    def loss_at(self, price: Decimal) -> Decimal:
        return -self.unrealized_pnl(price)


@value_type
class FillEffect:
    """What one fill did: amount closed and opened, P&L realized (before the fee), margin moved."""

    closed: Decimal
    opened: Decimal
    realized_pnl: Decimal
    released_margin: Decimal
    added_margin: Decimal


class FuturesAccount:
    """Wallet and positions. The one place fills and funding move money, live and in restore()."""

    def __init__(self, wallet: Decimal) -> None:
        self.wallet = wallet
        self.positions: dict[str, FuturesPosition] = {}

    def copy(self) -> FuturesAccount:
        twin = FuturesAccount(self.wallet)
        twin.positions = {s: replace(p) for s, p in self.positions.items()}
        return twin

    def margin_in_use(self) -> Decimal:
        return sum((p.margin for p in self.positions.values()), ZERO)

    def apply_fill(self, fill: Fill, leverage: int) -> FillEffect:
        """One-way mode: a fill against the position reduces it (realizing P&L on the cost share), the
        rest of it, if any, opens or grows a position on the fill's side at `leverage` (a position that
        is grown keeps its own leverage). The fee always leaves the wallet."""
        with localcontext(prec=_PRECISION):
            direction = PositionSide.LONG if fill.side is Side.BUY else PositionSide.SHORT
            pos = self.positions.get(fill.symbol)
            closed = realized = released = ZERO
            if pos is not None and pos.side is not direction:
                closed = min(fill.amount, pos.amount)
                removed = _share(pos.cost, closed, pos.amount)
                released = _share(pos.margin, closed, pos.amount)
                exit_value = closed * fill.price
                realized = exit_value - removed if pos.side is PositionSide.LONG else removed - exit_value
                pos.amount -= closed
                pos.cost -= removed
                pos.margin -= released
                if pos.amount == 0:
                    del self.positions[fill.symbol]
                    pos = None
            opened = fill.amount - closed
            added = ZERO
            if opened > 0:
                notional = opened * fill.price
                if pos is None:
                    added = initial_margin(notional, leverage)
                    self.positions[fill.symbol] = FuturesPosition(
                        fill.symbol, direction, opened, notional, added, leverage)
                else:
                    added = initial_margin(notional, pos.leverage)
                    pos.amount += opened
                    pos.cost += notional
                    pos.margin += added
            self.wallet += realized - fill.fee
        return FillEffect(closed, opened, realized, released, added)

    def apply_funding(self, payment: FundingPayment) -> None:
        with localcontext(prec=_PRECISION):
            self.wallet += payment.amount


# --- orders ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Order:
    request: OrderRequest  # amount and prices already rounded to the market's steps
    exchange_order_id: str
    state: OrderState
    created_at: float
    updated_at: float
    fills: list[Fill] = field(default_factory=list)
    locked: Decimal = ZERO  # margin and fee reserved while resting (orders that could open only)

    @property
    def filled(self) -> Decimal:
        return sum((f.amount for f in self.fills), ZERO)

    @property
    def remaining(self) -> Decimal:
        return self.request.amount - self.filled

    def update(self) -> OrderUpdate:
        filled = self.filled
        avg: Decimal | None = None
        if filled > 0:
            with localcontext(prec=_PRECISION):
                avg = sum((f.amount * f.price for f in self.fills), ZERO) / filled
        return OrderUpdate(
            client_order_id=self.request.client_order_id,
            exchange_order_id=self.exchange_order_id,
            symbol=self.request.symbol,
            side=self.request.side,
            order_type=self.request.order_type,
            amount=self.request.amount,
            filled=filled,
            avg_price=avg,
            state=self.state,
            ts=self.updated_at,
            fills=tuple(self.fills),
            reduce_only=self.request.reduce_only,
        )


def _exchange_order_id(client_order_id: str) -> str:
    """Derived from the client id, so it is the same after a restart rebuilds the order."""
    return f"paper-{client_order_id}"


def _fill_sequence(trade_id: str) -> int:
    """The exchange-wide fill number at the end of a paper trade id (-1 for a foreign one): it orders
    fills that share a timestamp, so restore() replays them as they happened."""
    tail = trade_id.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def _liquidation_number(client_order_id: str, symbol: str) -> int:
    prefix = f"liq-{symbol}-"
    if not client_order_id.startswith(prefix):
        return 0
    tail = client_order_id[len(prefix):]
    return int(tail) if tail.isdigit() else 0


class PaperFuturesExchange:
    """USD-M perpetuals on paper. MARKET orders fill at once at ask*(1+slippage) (buy) or
    bid*(1-slippage) (sell), rounded to the price step, with the taker fee. A LIMIT order that is
    marketable when placed fills the same way but never beyond its limit; otherwise it rests and fills
    in full at its limit with the maker fee once the book crosses it. A STOP_MARKET order triggers when
    the last price reaches its stop and fills as a market order; one that would trigger at once is
    rejected, as Binance does. Reduce-only orders never open or grow a position: they are rejected
    when there is nothing to reduce, cut to the position when larger, and exempt from the minimum
    notional (Binance: "unless you choose reduce only"); a resting one that finds no position when it
    executes is canceled (Binance expires it). Resting orders that could open a position lock their
    initial margin and fee (a stop at stop*(1+slippage) with the taker fee).

    `process_prices()` (driven by `run()` or by the caller) charges due funding, works resting orders
    in the order they were placed, then liquidates positions whose price was reached.
    """

    answers_inline = True  # create_order never awaits (see exchange.base.Exchange)

    def __init__(
        self,
        feed: MarketFeed,
        clock: Clock,
        markets: Mapping[str, MarketInfo],
        starting_balance: Decimal,
        *,
        taker_fee_pct: Decimal = Decimal("0.05"),
        maker_fee_pct: Decimal = Decimal("0.02"),
        slippage_bps: Decimal = Decimal(5),
        funding_rate_pct: Decimal = Decimal("0.01"),
        funding_interval_hours: int = 8,
        maintenance_margin_pct: Decimal = Decimal("0.5"),
        on_fill: FillCallback | None = None,
        on_funding: FundingCallback | None = None,
        idle_wait_seconds: float = 5.0,
    ) -> None:
        for name, value in (("taker_fee_pct", taker_fee_pct), ("maker_fee_pct", maker_fee_pct),
                            ("slippage_bps", slippage_bps), ("starting_balance", starting_balance)):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if not 0 <= maintenance_margin_pct < 100:
            raise ValueError(f"maintenance_margin_pct must be in [0, 100), got {maintenance_margin_pct}")
        if funding_interval_hours < 1 or 24 % funding_interval_hours != 0:
            raise ValueError(f"funding_interval_hours must divide 24, got {funding_interval_hours}")
        for symbol, info in markets.items():
            if info.market is not MarketType.FUTURES or info.quote != SETTLE_ASSET:
                raise ValueError(f"{symbol}: paper futures trades USDT-margined futures markets only")
        self.market_type: MarketType = MarketType.FUTURES
        self._feed = feed
        self._clock = clock
        self._markets = dict(markets)
        self._starting = Decimal(starting_balance)
        self._taker_pct = taker_fee_pct
        self._maker_pct = maker_fee_pct
        self._slippage = slippage_bps / Decimal(10_000)
        self._funding_rate = funding_rate_pct / Decimal(100)
        self._interval = float(funding_interval_hours * 3600)
        self._mmr = maintenance_margin_pct / Decimal(100)
        self.on_fill = on_fill
        self.on_funding = on_funding
        self._idle_wait = idle_wait_seconds
        self._account = FuturesAccount(self._starting)
        self._leverage: dict[str, int] = {}
        # Orders by client order id and trades: settled ones for a retention window (see exchange.paper_history).
        self._history: SettledHistory[_Order] = SettledHistory()
        self._orders = self._history.orders
        self._resting: dict[str, _Order] = {}
        self._funding: list[FundingPayment] = []
        self._liquidations: dict[str, int] = {}
        self._seq = 0
        self._last_price: dict[str, Decimal] = {}
        self._funded_until = self._boundary(clock.now())
        self._matching = MatchingOnUpdates(lambda: self.process_prices())  # late-bound: what process_prices is now

    # --- markets and leverage -------------------------------------------------------------------------

    async def load_markets(self) -> dict[str, MarketInfo]:
        return dict(self._markets)

    def market(self, symbol: str) -> MarketInfo:
        info = self._markets.get(symbol)
        if info is None:
            raise DependencyError(f"unknown market {symbol}")
        return info

    def leverage(self, symbol: str) -> int:
        return self._leverage.get(symbol, 1)

    async def set_leverage(self, symbol: str, leverage: int) -> None:
        """Set a symbol's leverage for positions opened from now on (refused while one is open)."""
        info = self._markets.get(symbol)
        if info is None:
            raise OrderRejected(f"unknown market {symbol}")
        self._check_leverage_range(info, leverage)
        if leverage != self.leverage(symbol):
            self._check_leverage_free(symbol)
            self._leverage[symbol] = leverage
            log.info("paper leverage set", symbol=symbol, leverage=leverage)

    async def ensure_symbol_setup(self, symbol: str, leverage: int | None, margin_mode: str = "isolated") -> None:
        """The live client's set-up call, so engines can call the same method on both."""
        if margin_mode != "isolated":
            raise OrderRejected("paper futures simulates isolated margin only")
        if leverage is not None:
            await self.set_leverage(symbol, leverage)

    # --- orders ---------------------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        """Place an order. Runs without awaiting anything, so it is atomic on the event loop; a
        rejection changes nothing (beyond funding that was due anyway)."""
        existing = self._orders.get(request.client_order_id)
        if existing is not None:
            log.info("duplicate client order id: returning the existing order",
                     client_order_id=request.client_order_id, state=str(existing.state))
            return existing.update()
        info = self._markets.get(request.symbol)
        if info is None:
            raise OrderRejected(f"unknown market {request.symbol}")
        ticker = self._ticker(request.symbol)
        if ticker is None:
            raise DependencyError(f"no price for {request.symbol}: cannot place an order")
        now = self._clock.now()
        self._history.forget_old(now)
        # Funding due before this order is charged on the position as it was at the funding time.
        self._settle_funding(now)
        leverage = self._order_leverage(request, info)
        req = self._normalized(request, info)
        if req.reduce_only:
            self._check_reduces(req)
        order = _Order(req, _exchange_order_id(req.client_order_id), OrderState.OPEN, now, now)
        if req.order_type is OrderType.MARKET:
            price = taker_price(req.side, ticker, self._slippage, info.price_step)
            self._check_notional(req, price, info)
            self._execute(order, price, self._taker_pct, now, leverage)
        elif req.order_type is OrderType.LIMIT:
            assert req.price is not None  # _normalized guarantees it
            self._check_notional(req, req.price, info)
            if self._marketable(req.side, req.price, ticker):
                price = taker_price(req.side, ticker, self._slippage, info.price_step)
                price = min(price, req.price) if req.side is Side.BUY else max(price, req.price)
                self._execute(order, price, self._taker_pct, now, leverage)
            else:
                self._rest(order, leverage, check_funds=True)
        else:
            assert req.stop_price is not None
            self._check_notional(req, req.stop_price, info)
            if self._stop_triggered(req.side, req.stop_price, ticker):
                raise OrderRejected(f"stop price {req.stop_price} would trigger immediately (last {ticker.last})")
            self._rest(order, leverage, check_funds=True)
        if leverage != self.leverage(req.symbol):
            self._leverage[req.symbol] = leverage
        self._orders[req.client_order_id] = order
        if _debug_enabled(logging.DEBUG):
            log.debug("paper futures order", client_order_id=req.client_order_id, symbol=req.symbol,
                      side=str(req.side), type=str(req.order_type), amount=str(req.amount), state=str(order.state))
        return order.update()

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        order = self._orders.get(client_order_id)
        if order is None or order.request.symbol != symbol:
            raise OrderNotFound(f"no paper order {client_order_id} on {symbol}")
        return order.update()

    async def cancel_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        """Cancel a resting order. One that already filled is returned as it is (with its fills), so a
        cancel that races a fill cannot hide the fill."""
        order = self._orders.get(client_order_id)
        if order is None or order.request.symbol != symbol:
            raise OrderNotFound(f"no paper order {client_order_id} on {symbol}")
        if order.state.is_terminal:
            return order.update()
        self._finish(order, OrderState.CANCELED, self._clock.now())
        return order.update()

    async def fetch_open_orders(self, symbols: list[str]) -> list[OrderUpdate]:
        """Resting orders of these symbols (of every symbol when the list is empty)."""
        wanted = set(symbols)
        return [o.update() for o in self._resting.values() if not wanted or o.request.symbol in wanted]

    async def fetch_my_trades(self, symbol: str, since: float | None = None) -> list[Fill]:
        """This venue's trades of `symbol` within the retention window (see exchange.paper_history)."""
        return self._history.trades_of(symbol, since)

    async def fetch_balance(self) -> Balance:
        return Balance(free={SETTLE_ASSET: self.available()}, total={SETTLE_ASSET: self._account.wallet},
                       equity=self.equity())

    async def fetch_positions(self) -> list[ExchangePosition]:
        out: list[ExchangePosition] = []
        for symbol in sorted(self._account.positions):
            pos = self._account.positions[symbol]
            out.append(ExchangePosition(
                symbol=symbol, side=pos.side, amount=pos.amount, entry_price=pos.entry_price,
                leverage=pos.leverage, liquidation_price=self._liquidation_price(pos),
                unrealized_pnl=pos.unrealized_pnl(self._mark(pos)), margin=pos.margin,
            ))
        return out

    async def close(self) -> None:
        """Stop matching on price updates and end `run()`; state stays readable."""
        self._matching.close()

    # --- account views --------------------------------------------------------------------------------

    def wallet(self) -> Decimal:
        return self._account.wallet

    def available(self) -> Decimal:
        """Wallet less isolated margins and what resting orders have locked."""
        with localcontext(prec=_PRECISION):
            return self._account.wallet - self._account.margin_in_use() - self._locked()

    def equity(self) -> Decimal:
        with localcontext(prec=_PRECISION):
            unrealized = sum((p.unrealized_pnl(self._mark(p)) for p in self._account.positions.values()), ZERO)
            return self._account.wallet + unrealized

    def funding_history(self) -> list[FundingPayment]:
        return list(self._funding)

    # --- the price-driven side ------------------------------------------------------------------------

    def process_prices(self) -> list[OrderUpdate]:
        """Charge due funding, fill or trigger resting orders, then liquidate what has reached its
        liquidation price; report each order change to `on_fill` and return them.

        Orders are worked in the order they were placed and positions in symbol order, so the same
        prices always settle the same way. Stops run before liquidations: a protective stop that the
        price passed on its way to the liquidation price closes the position first, as it would live.
        """
        now = self._clock.now()
        self._settle_funding(now)
        updates: list[OrderUpdate] = []
        for order in list(self._resting.values()):
            ticker = self._ticker(order.request.symbol)
            if ticker is not None and self._work(order, ticker, now):
                updates.append(order.update())
        for symbol in sorted(self._account.positions):
            ticker = self._ticker(symbol)
            if ticker is None:
                continue
            liquidated = self._check_liquidation(self._account.positions[symbol], ticker, now)
            if liquidated is not None:
                updates.append(liquidated)
        for update in updates:
            self._report(update)
        return updates

    async def run(self) -> None:
        """Work orders, liquidations and funding on every price change, and at each funding time even
        when prices are quiet, until closed (the Orchestrator owns this task). Price changes are worked
        inside the feed's update, before any engine wakes (see `PaperExchange.run`, also for how an
        error in the matching ends this task); this task only keeps the funding times."""
        matching = self._matching
        remove = self._feed.on_update(matching.settle)
        try:
            self.process_prices()
            while not matching.closed:
                until_funding = self._funded_until + self._interval - self._clock.now()
                wait = min(self._idle_wait, max(until_funding, 0.0))
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await self._clock.wait_for(matching.ended.wait(), wait)
                else:
                    await self._clock.sleep(0)  # funding is due now: still let the loop breathe first
                matching.raise_failure()
                if matching.closed:
                    break
                self.process_prices()
        finally:
            remove()

    # --- restart --------------------------------------------------------------------------------------

    def restore(
        self,
        fills: Iterable[Fill],
        open_orders: Iterable[OrderRequest],
        funding: Iterable[FundingPayment],
        leverage: Mapping[str, int],
    ) -> None:
        """Rebuild all paper state from the ledger: the starting balance plus every fill (through
        `FuturesAccount.apply_fill`, in the order they happened) and every funding payment; the
        resting orders re-opened with their margin locked again; each symbol's leverage.

        `open_orders` carry each order as it was placed (as the ledger stores it); fills of the same
        client order id count against it, so a fill recorded just before a crash that left the order's
        row open cannot execute twice. Orders known only by their fills (liquidations included) come
        back FILLED, so a re-sent client id is still recognized as already placed. Funding continues
        after the newest restored event: a funding time the previous run had not yet charged while a
        position was open is charged at the next `process_prices()`, one it had charged never again.

        `leverage` must name every symbol with a position or a resting order (a missing one is 1x):
        margins and locks are computed at it, which is exact because leverage cannot change while a
        position is open.
        """
        levels: dict[str, int] = {}
        for symbol, lev in leverage.items():
            info = self._markets.get(symbol)
            if info is None:
                log.error("leverage for an unknown market not restored", symbol=symbol)
                continue
            if lev < 1:
                raise ValueError(f"{symbol}: leverage {lev} must be at least 1")
            if lev > info.max_leverage:
                log.warning("restored leverage above the market's maximum", symbol=symbol, leverage=lev,
                            max_leverage=info.max_leverage)
            if lev != 1:
                levels[symbol] = lev
        self._leverage = levels
        self._account = FuturesAccount(self._starting)
        self._history.clear()
        self._resting, self._funding = {}, []
        self._liquidations, self._seq = {}, 0
        ordered = sorted(enumerate(fills), key=lambda item: (item[1].ts, _fill_sequence(item[1].trade_id),
                                                              item[0]))
        by_order: dict[str, list[Fill]] = {}
        latest: float | None = None
        for _, fill in ordered:
            self._account.apply_fill(fill, self.leverage(fill.symbol))
            self._history.add_trade(fill)
            by_order.setdefault(fill.client_order_id, []).append(fill)
            self._seq = max(self._seq, _fill_sequence(fill.trade_id))
            n = _liquidation_number(fill.client_order_id, fill.symbol)
            if n:
                self._liquidations[fill.symbol] = max(self._liquidations.get(fill.symbol, 0), n)
            latest = fill.ts if latest is None else max(latest, fill.ts)
        for payment in sorted(funding, key=lambda p: (p.ts, p.symbol)):
            self._account.apply_funding(payment)
            self._funding.append(payment)
            latest = payment.ts if latest is None else max(latest, payment.ts)
        now = self._clock.now()
        self._funded_until = self._boundary(latest if latest is not None else now)
        for request in open_orders:
            self._restore_open_order(request, by_order, now)
        settled: list[tuple[str, float]] = []  # (client order id, when), by order rather than by time
        for cid, order_fills in by_order.items():
            first = order_fills[0]
            amount = sum((f.amount for f in order_fills), ZERO)
            known = OrderRequest(cid, first.symbol, first.side, OrderType.MARKET, amount,
                                 reduce_only=first.reduce_only)
            self._orders[cid] = _Order(known, _exchange_order_id(cid), OrderState.FILLED, first.ts,
                                       order_fills[-1].ts, fills=list(order_fills))
            settled.append((cid, order_fills[-1].ts))
        # Merged in time order with the re-opened orders' settles at `now` (`_restore_open_order`), so
        # `forget_old` finds each one as soon as its window has passed.
        self._history.restore_settled(settled)
        self._history.forget_old(now)
        log.info("paper futures state restored", fills=len(ordered), funding=len(self._funding),
                 open_orders=len(self._resting), positions=len(self._account.positions),
                 wallet=str(self._account.wallet))

    def _restore_open_order(self, request: OrderRequest, by_order: dict[str, list[Fill]], now: float) -> None:
        cid = request.client_order_id
        if cid in self._orders:
            return
        info = self._markets.get(request.symbol)
        if info is None:
            log.error("open order for an unknown market not restored", client_order_id=cid, symbol=request.symbol)
            return
        try:
            req = self._normalized(request, info, check_minimums=False)
        except OrderRejected as exc:
            log.error("malformed open order not restored", client_order_id=cid, reason=str(exc))
            return
        order = _Order(req, _exchange_order_id(cid), OrderState.OPEN, now, now, fills=by_order.pop(cid, []))
        if order.remaining <= 0:
            order.state = OrderState.FILLED
            self._history.settled(cid, now)
        else:
            if order.fills:
                order.state = OrderState.PARTIALLY_FILLED
            self._rest(order, self.leverage(req.symbol), check_funds=False)
        self._orders[cid] = order

    # --- internals: checks ----------------------------------------------------------------------------

    @staticmethod
    def _check_leverage_range(info: MarketInfo, leverage: int) -> None:
        if not 1 <= leverage <= max(info.max_leverage, 1):
            raise OrderRejected(f"{info.symbol}: leverage {leverage} outside 1..{info.max_leverage}")

    def _check_leverage_free(self, symbol: str) -> None:
        if symbol in self._account.positions:
            raise OrderRejected(f"{symbol}: leverage cannot change while a position is open (isolated margin)")
        if any(o.request.symbol == symbol and not o.request.reduce_only for o in self._resting.values()):
            raise OrderRejected(f"{symbol}: leverage cannot change while orders that could open a position rest")

    def _order_leverage(self, request: OrderRequest, info: MarketInfo) -> int:
        """The leverage this order opens at: the request's, when given, else the symbol's. A reduce-only
        order opens nothing, so its leverage is checked but never applied."""
        current = self.leverage(request.symbol)
        if request.leverage is None:
            return current
        self._check_leverage_range(info, request.leverage)
        if request.reduce_only or request.leverage == current:
            return current
        self._check_leverage_free(request.symbol)
        return request.leverage

    def _normalized(self, request: OrderRequest, info: MarketInfo, *, check_minimums: bool = True) -> OrderRequest:
        amount = quantize_down(request.amount, info.amount_step)
        price = request.price
        stop = request.stop_price
        if request.order_type is OrderType.LIMIT:
            if price is None or price <= 0:
                raise OrderRejected("a limit order needs a positive price")
            price = quantize_price(price, info.price_step)
        if request.order_type is OrderType.STOP_MARKET:
            if stop is None or stop <= 0:
                raise OrderRejected("a stop-market order needs a positive stop price")
            stop = quantize_price(stop, info.price_step)
        if check_minimums and (amount <= 0 or amount < info.min_amount):
            raise OrderRejected(
                f"amount {request.amount} rounds to {amount}, below the minimum {info.min_amount} for {info.symbol}"
            )
        return replace(request, amount=amount, price=price, stop_price=stop)

    @staticmethod
    def _check_notional(req: OrderRequest, price: Decimal, info: MarketInfo) -> None:
        if req.reduce_only:
            return  # Binance: "notional must be no smaller than ... (unless you choose reduce only)"
        notional = req.amount * price
        if notional < info.min_notional:
            raise OrderRejected(
                f"notional {notional} {info.quote} is below the minimum {info.min_notional} for {info.symbol}"
            )

    def _check_reduces(self, req: OrderRequest) -> None:
        pos = self._account.positions.get(req.symbol)
        if pos is None:
            raise OrderRejected("reduce-only order would open a position")
        if pos.side.entry_side is req.side:
            raise OrderRejected("reduce-only order would increase the position")

    @staticmethod
    def _marketable(side: Side, limit: Decimal, ticker: Ticker) -> bool:
        return ticker.ask <= limit if side is Side.BUY else ticker.bid >= limit

    @staticmethod
    def _stop_triggered(side: Side, stop: Decimal, ticker: Ticker) -> bool:
        return ticker.last >= stop if side is Side.BUY else ticker.last <= stop

    # --- internals: execution -------------------------------------------------------------------------

    def _locked(self) -> Decimal:
        return sum((o.locked for o in self._resting.values()), ZERO)

    def _rest(self, order: _Order, leverage: int, *, check_funds: bool) -> None:
        req = order.request
        lock = ZERO
        if not req.reduce_only:
            with localcontext(prec=_PRECISION):
                if req.order_type is OrderType.LIMIT:
                    assert req.price is not None
                    price, fee_pct = req.price, self._maker_pct
                else:
                    assert req.stop_price is not None
                    price, fee_pct = req.stop_price * (1 + self._slippage), self._taker_pct
                lock = initial_margin(order.remaining * price, leverage) + fee_for(order.remaining, price, fee_pct)
            available = self.available()
            if check_funds and lock > available:
                raise InsufficientFunds(
                    f"{req.symbol} {req.side}: needs {lock} {SETTLE_ASSET} margin and fee, available {available}"
                )
        order.locked = lock
        self._resting[req.client_order_id] = order

    def _finish(self, order: _Order, state: OrderState, now: float) -> None:
        self._resting.pop(order.request.client_order_id, None)
        order.locked = ZERO
        order.state = state
        order.updated_at = now
        self._history.settled(order.request.client_order_id, now)

    def _new_fill(self, order: _Order, amount: Decimal, price: Decimal, fee: Decimal, now: float) -> Fill:
        return Fill(
            client_order_id=order.request.client_order_id,
            trade_id=f"{order.exchange_order_id}-{self._seq + 1}",
            engine="",  # the order manager stamps its engine on the fill
            market=MarketType.FUTURES,
            symbol=order.request.symbol,
            side=order.request.side,
            amount=amount,
            price=price,
            fee=fee,
            fee_asset=SETTLE_ASSET,
            ts=now,
            reduce_only=order.request.reduce_only,
        )

    def _commit(self, order: _Order, fill: Fill, leverage: int, now: float) -> None:
        self._resting.pop(order.request.client_order_id, None)
        order.locked = ZERO
        self._account.apply_fill(fill, leverage)
        self._seq += 1
        order.fills.append(fill)
        order.state = OrderState.FILLED
        order.updated_at = now
        self._history.add_trade(fill)
        self._history.settled(order.request.client_order_id, now)

    def _execute(self, order: _Order, price: Decimal, fee_pct: Decimal, now: float, leverage: int) -> Fill | None:
        """Fill the order's remainder at `price`, or raise InsufficientFunds without changing anything.
        None: a reduce-only order that finds nothing to reduce."""
        req = order.request
        amount = order.remaining
        if req.reduce_only:
            pos = self._account.positions.get(req.symbol)
            if pos is None or pos.side.entry_side is req.side:
                return None
            amount = min(amount, pos.amount)
        fill = self._new_fill(order, amount, price, fee_for(amount, price, fee_pct), now)
        trial = self._account.copy()
        effect = trial.apply_fill(fill, leverage)
        if effect.opened > 0:
            with localcontext(prec=_PRECISION):
                others = self._locked() - order.locked
                after = trial.wallet - trial.margin_in_use() - others
                if after < 0:
                    raise InsufficientFunds(
                        f"{req.symbol} {req.side}: needs {effect.added_margin + fill.fee} {SETTLE_ASSET} "
                        f"(margin {effect.added_margin} + fee {fill.fee}), available {self.available() + order.locked}"
                    )
        if amount != order.remaining:
            order.request = replace(req, amount=order.filled + amount)  # a reduce-only order cut to the position
        self._commit(order, fill, leverage, now)
        return fill

    def _work(self, order: _Order, ticker: Ticker, now: float) -> bool:
        """Fill or trigger one resting order if the market reached it; True if its state changed."""
        req = order.request
        info = self._markets[req.symbol]
        if req.order_type is OrderType.LIMIT:
            assert req.price is not None
            if not self._marketable(req.side, req.price, ticker):
                return False
            price, fee_pct = req.price, self._maker_pct
        else:
            assert req.stop_price is not None
            if not self._stop_triggered(req.side, req.stop_price, ticker):
                return False
            price, fee_pct = taker_price(req.side, ticker, self._slippage, info.price_step), self._taker_pct
        try:
            fill = self._execute(order, price, fee_pct, now, self.leverage(req.symbol))
        except InsufficientFunds as exc:
            self._finish(order, OrderState.REJECTED, now)
            log.warning("paper futures order rejected at execution", client_order_id=req.client_order_id,
                        reason=str(exc))
            return True
        if fill is None:
            self._finish(order, OrderState.CANCELED, now)
            log.info("reduce-only order canceled: no position left to reduce", client_order_id=req.client_order_id,
                     symbol=req.symbol)
        return True

    # --- internals: liquidation and funding -----------------------------------------------------------

    def _liquidation_price(self, pos: FuturesPosition) -> Decimal | None:
        with localcontext(prec=_PRECISION):
            entry = pos.cost / pos.amount
        return liquidation_price(pos.side, entry, pos.leverage, self._mmr, self._markets[pos.symbol].price_step)

    def _check_liquidation(self, pos: FuturesPosition, ticker: Ticker, now: float) -> OrderUpdate | None:
        price = self._liquidation_price(pos)
        if price is None:
            return None
        reached = ticker.last <= price if pos.side is PositionSide.LONG else ticker.last >= price
        if not reached:
            return None
        n = self._liquidations.get(pos.symbol, 0) + 1
        cid = f"liq-{pos.symbol}-{n}"
        request = OrderRequest(cid, pos.symbol, pos.side.exit_side, OrderType.MARKET, pos.amount, reduce_only=True)
        order = _Order(request, _exchange_order_id(cid), OrderState.OPEN, now, now)
        with localcontext(prec=_PRECISION):
            # What the margin has left over the loss at the liquidation price goes with the position.
            fee = max(ZERO, pos.margin - pos.loss_at(price))
        margin, amount = pos.margin, pos.amount
        self._commit(order, self._new_fill(order, amount, price, fee, now), pos.leverage, now)
        self._liquidations[pos.symbol] = n
        self._orders[cid] = order
        log.warning("paper position liquidated", symbol=pos.symbol, side=str(pos.side), amount=str(amount),
                    liquidation_price=str(price), last=str(ticker.last), margin_lost=str(margin))
        return order.update()

    def _boundary(self, ts: float) -> float:
        """The latest funding time at or before `ts` (funding times are multiples of the interval
        since the epoch, which is midnight UTC)."""
        return math.floor(ts / self._interval) * self._interval

    def _settle_funding(self, now: float) -> None:
        """Charge every funding time up to `now` not charged yet, once, on the positions held."""
        due = self._funded_until + self._interval
        if due > now:
            return
        if not self._account.positions:
            self._funded_until = self._boundary(now)
            return
        payments: list[FundingPayment] = []
        while due <= now:
            for symbol in sorted(self._account.positions):
                pos = self._account.positions[symbol]
                with localcontext(prec=_PRECISION):
                    owed = pos.amount * self._mark(pos) * self._funding_rate
                    amount = -owed if pos.side is PositionSide.LONG else owed
                if amount == 0:
                    continue
                payment = FundingPayment(symbol, amount, self._funding_rate, due)
                self._account.apply_funding(payment)
                self._funding.append(payment)
                payments.append(payment)
            self._funded_until = due
            due += self._interval
        for payment in payments:
            log.info("paper funding", symbol=payment.symbol, amount=str(payment.amount), ts=payment.ts)
            self._report_funding(payment)

    # --- internals: prices and callbacks --------------------------------------------------------------

    def _ticker(self, symbol: str) -> Ticker | None:
        ticker = self._feed.ticker(symbol)
        if ticker is not None:
            self._last_price[symbol] = ticker.last
        return ticker

    def _mark(self, pos: FuturesPosition) -> Decimal:
        """The feed's last price (the paper mark price); the last one seen, or the entry, without one."""
        ticker = self._ticker(pos.symbol)
        if ticker is not None:
            return ticker.last
        return self._last_price.get(pos.symbol, pos.entry_price)

    def _report(self, update: OrderUpdate) -> None:
        callback = self.on_fill
        if callback is None:
            return
        try:
            callback(update)
        except Exception:
            # The fill stands either way; the ledger catches up when the order is next fetched.
            log.exception("on_fill callback failed", client_order_id=update.client_order_id)

    def _report_funding(self, payment: FundingPayment) -> None:
        callback = self.on_funding
        if callback is None:
            return
        try:
            callback(payment)
        except Exception:
            log.exception("on_funding callback failed", symbol=payment.symbol, ts=payment.ts)


__all__ = [
    "SETTLE_ASSET",
    "FillEffect",
    "FundingCallback",
    "FundingPayment",
    "FuturesAccount",
    "FuturesPosition",
    "PaperFuturesExchange",
    "initial_margin",
    "liquidation_price",
]

if TYPE_CHECKING:

    def _conforms(ex: PaperFuturesExchange) -> Exchange:
        """mypy checks here that PaperFuturesExchange satisfies the Exchange protocol."""
        return ex
