"""The paper exchange: Binance spot simulated against the market feed, behind the `Exchange` interface.

Paper trading is the default mode, so it has to be trustworthy in the ways that matter: deterministic
(a fixed fee and slippage model, ids derived from client order ids, no randomness), conservative
(market orders pay the spread plus slippage; resting orders fill only once the book has crossed them)
and recoverable. It keeps no file of its own: after a restart it is rebuilt from the ledger with
`restore()`, and a fill moves balances through one function (`apply_fill`) whether it happens now or
is replayed from the ledger, so the two can never disagree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Context, Decimal, localcontext
from typing import TYPE_CHECKING

import structlog

from core.clock import Clock
from core.errors import (
    DependencyError,
    InsufficientFunds,
    OperationalError,
    OrderNotFound,
    OrderRejected,
)
from core.types import ZERO, Fill, MarketInfo, MarketType, OrderState, OrderType, Side, Ticker
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
from exchange.paper_history import SettledHistory

log = structlog.get_logger("paper")
# The stdlib logger behind `log`. A filtered structlog call still binds and builds its arguments
# (measured 12-14 us cold on the order path); asking the level first costs well under one.
_debug_enabled = logging.getLogger("paper").isEnabledFor

# Money arithmetic here must be exact: a product of an 8-decimal amount, a price and a fee rate can
# exceed the default 28 significant digits, and a rounded sum would let restore() drift from live.
_PRECISION = 60
# The same precision as a context of its own, for the order path: calling its methods gives exactly
# what `with localcontext(prec=_PRECISION)` gives (the default context otherwise, which nothing here
# changes) without building and entering a fresh context per operation (~0.7 us each, 5-6 per fill).
_EXACT = Context(prec=_PRECISION)

FillCallback = Callable[[OrderUpdate], None]


def _split_symbol(symbol: str) -> tuple[str, str]:
    base, _, rest = symbol.partition("/")
    quote = rest.split(":", 1)[0]
    if not base or not quote:
        raise DependencyError(f"cannot tell base and quote apart in symbol {symbol!r}")
    return base, quote


def spot_fill_deltas(fill: Fill, base: str, quote: str) -> dict[str, Decimal]:
    """How one spot fill changes each asset's total balance. The fee is paid in `fill.fee_asset`."""
    notional = _EXACT.multiply(fill.amount, fill.price)
    deltas: dict[str, Decimal] = {base: ZERO, quote: ZERO}
    if fill.side is Side.BUY:
        deltas[base] = _EXACT.add(deltas[base], fill.amount)
        deltas[quote] = _EXACT.subtract(deltas[quote], notional)
    else:
        deltas[base] = _EXACT.subtract(deltas[base], fill.amount)
        deltas[quote] = _EXACT.add(deltas[quote], notional)
    deltas[fill.fee_asset] = _EXACT.subtract(deltas.get(fill.fee_asset, ZERO), fill.fee)
    return deltas


def apply_fill(balances: dict[str, Decimal], fill: Fill, base: str, quote: str) -> None:
    """The one place a fill moves money, used by live fills and by restore() alike."""
    for asset, delta in spot_fill_deltas(fill, base, quote).items():
        balances[asset] = _EXACT.add(balances.get(asset, ZERO), delta)


def taker_price(side: Side, ticker: Ticker, slippage: Decimal, price_step: Decimal) -> Decimal:
    """What a market order pays: the far side of the book, moved against us by the fixed slippage."""
    if side is Side.BUY:
        raw = _EXACT.multiply(ticker.ask, _EXACT.add(1, slippage))
    else:
        raw = _EXACT.multiply(ticker.bid, _EXACT.subtract(1, slippage))
    return quantize_price(raw, price_step)


def fee_for(amount: Decimal, price: Decimal, fee_pct: Decimal) -> Decimal:
    return _EXACT.divide(_EXACT.multiply(_EXACT.multiply(amount, price), fee_pct), 100)


@dataclass(slots=True)
class _PaperOrder:
    request: OrderRequest  # amount and prices already rounded to the market's steps
    exchange_order_id: str
    state: OrderState
    created_at: float
    updated_at: float
    fills: list[Fill] = field(default_factory=list)
    locked_asset: str | None = None
    locked: Decimal = ZERO

    @property
    def filled(self) -> Decimal:
        fills = self.fills
        # A new order, or a market order's one fill (on the order path): no generator for sum(), whose
        # result ZERO + amount is.
        if len(fills) <= 1:
            return ZERO + fills[0].amount if fills else ZERO
        return sum((f.amount for f in fills), ZERO)

    @property
    def remaining(self) -> Decimal:
        return self.request.amount - self.filled

    def update(self) -> OrderUpdate:
        filled = self.filled
        avg: Decimal | None = None
        if filled > 0:
            value = ZERO
            for f in self.fills:
                value = _EXACT.add(value, _EXACT.multiply(f.amount, f.price))
            avg = _EXACT.divide(value, filled)
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


class MatchingOnUpdates:
    """A paper venue's matching, run inside each of the feed's updates (`MarketFeed.on_update`) and
    ended by `close()` or by its own error, which goes to the venue's `run()` task, never into the
    feed's: the feed would log it and go on with a half-worked book, where a dead paper task is the
    Orchestrator's crash path and the restart rebuilds the book from the ledger."""

    def __init__(self, match: Callable[[], object]) -> None:
        self._match = match
        self.closed = False
        self.failure: Exception | None = None
        self.ended = asyncio.Event()  # closed, or the matching raised

    def settle(self) -> None:
        if self.closed or self.failure is not None:
            return  # closed, or the book may be half-worked: nothing more until the restart
        try:
            self._match()
        except Exception as exc:
            self.failure = exc
            self.ended.set()

    def close(self) -> None:
        self.closed = True
        self.ended.set()

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


class PaperExchange:
    """Spot paper trading. Market orders fill at once; LIMIT and STOP_MARKET orders rest until
    `process_prices()` (driven by `run()` or by the caller) finds them crossed.

    Model: a market order pays ask*(1+slippage) (buy) or bid*(1-slippage) (sell), rounded to the price
    step, plus the taker fee in the quote asset. A limit order that is marketable when placed fills at
    once the same way, but never beyond its limit. A resting limit order fills in full, at its limit
    price with the maker fee, once the book crosses it (buy: ask <= limit; sell: bid >= limit). A
    stop-market order triggers when the last price reaches its stop and then fills as a market order;
    one that would trigger at once is rejected, as Binance does. Resting orders lock the funds they
    need (a buy limit: amount*price plus the maker fee; a buy stop: at the stop plus slippage and fee).
    """

    answers_inline = True  # create_order never awaits (see exchange.base.Exchange)

    def __init__(
        self,
        market_type: MarketType,
        feed: MarketFeed,
        clock: Clock,
        markets: Mapping[str, MarketInfo],
        starting_balances: Mapping[str, Decimal],
        *,
        taker_fee_pct: Decimal,
        maker_fee_pct: Decimal,
        slippage_bps: Decimal,
        on_fill: FillCallback | None = None,
        quote_asset: str | None = None,
    ) -> None:
        if market_type is not MarketType.SPOT:
            raise OperationalError("paper futures not available")
        for name, value in (("taker_fee_pct", taker_fee_pct), ("maker_fee_pct", maker_fee_pct),
                            ("slippage_bps", slippage_bps)):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        self.market_type: MarketType = market_type
        self._feed = feed
        self._clock = clock
        self._markets = dict(markets)
        self._starting = {asset: Decimal(v) for asset, v in starting_balances.items()}
        self._taker_pct = taker_fee_pct
        self._maker_pct = maker_fee_pct
        self._slippage = slippage_bps / Decimal(10_000)
        self.on_fill = on_fill
        self.quote_asset = quote_asset or self._main_quote()
        self._balances: dict[str, Decimal] = dict(self._starting)
        self._locked: dict[str, Decimal] = {}
        # Orders by client order id and trades: settled ones for a retention window (see exchange.paper_history).
        self._history: SettledHistory[_PaperOrder] = SettledHistory()
        self._orders = self._history.orders
        self._resting: dict[str, _PaperOrder] = {}
        self._last_price: dict[str, Decimal] = {}
        self._unpriced_warned: set[str] = set()
        self._matching = MatchingOnUpdates(lambda: self.process_prices())  # late-bound: what process_prices is now

    # --- markets ------------------------------------------------------------------------------------

    async def load_markets(self) -> dict[str, MarketInfo]:
        return dict(self._markets)

    def market(self, symbol: str) -> MarketInfo:
        info = self._markets.get(symbol)
        if info is None:
            raise DependencyError(f"unknown market {symbol}")
        return info

    # --- orders -------------------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        """Place an order. Runs without awaiting anything, so it is atomic on the event loop."""
        existing = self._orders.get(request.client_order_id)
        if existing is not None:
            # Binance answers a reused client id with "Duplicate order sent."; the live client turns
            # that into the existing order, and so does paper.
            log.info("duplicate client order id: returning the existing order",
                     client_order_id=request.client_order_id, state=str(existing.state))
            return existing.update()
        if request.symbol not in self._markets:
            raise OrderRejected(f"unknown market {request.symbol}")
        info = self._markets[request.symbol]
        ticker = self._ticker(request.symbol)
        if ticker is None:
            raise DependencyError(f"no price for {request.symbol}: cannot place an order")
        req = self._normalized(request, info)
        now = self._clock.now()
        self._history.forget_old(now)
        order = _PaperOrder(req, _exchange_order_id(req.client_order_id), OrderState.OPEN, now, now)
        if req.order_type is OrderType.MARKET:
            price = taker_price(req.side, ticker, self._slippage, info.price_step)
            self._check_notional(req, price, info)
            self._check_taker_funds(req, price, info)
            self._fill(order, info, price, self._taker_pct, now)
        elif req.order_type is OrderType.LIMIT:
            assert req.price is not None  # _normalized guarantees it
            self._check_notional(req, req.price, info)
            if self._marketable(req.side, req.price, ticker):
                price = taker_price(req.side, ticker, self._slippage, info.price_step)
                price = min(price, req.price) if req.side is Side.BUY else max(price, req.price)
                self._check_taker_funds(req, price, info)
                self._fill(order, info, price, self._taker_pct, now)
            else:
                self._rest(order, info, check_funds=True)
        else:
            assert req.stop_price is not None
            self._check_notional(req, req.stop_price, info)
            if self._stop_triggered(req.side, req.stop_price, ticker):
                raise OrderRejected(
                    f"stop price {req.stop_price} would trigger immediately (last {ticker.last})"
                )
            self._rest(order, info, check_funds=True)
        self._orders[req.client_order_id] = order
        if _debug_enabled(logging.DEBUG):
            log.debug("paper order", client_order_id=req.client_order_id, symbol=req.symbol, side=str(req.side),
                      type=str(req.order_type), amount=str(req.amount), state=str(order.state))
        return order.update()

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        order = self._orders.get(client_order_id)
        if order is None or order.request.symbol != symbol:
            raise OrderNotFound(f"no paper order {client_order_id} on {symbol}")
        return order.update()

    async def cancel_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        """Cancel a resting order. An order that already filled is returned as it is (with its fills),
        so a cancel that races a fill cannot hide the fill."""
        order = self._orders.get(client_order_id)
        if order is None or order.request.symbol != symbol:
            raise OrderNotFound(f"no paper order {client_order_id} on {symbol}")
        if order.state.is_terminal:
            return order.update()
        self._unrest(order)
        order.state = OrderState.CANCELED
        order.updated_at = self._clock.now()
        self._history.settled(client_order_id, order.updated_at)
        return order.update()

    async def fetch_open_orders(self, symbols: list[str]) -> list[OrderUpdate]:
        """Resting orders of these symbols (of every symbol when the list is empty)."""
        wanted = set(symbols)
        return [o.update() for o in self._resting.values() if not wanted or o.request.symbol in wanted]

    async def fetch_my_trades(self, symbol: str, since: float | None = None) -> list[Fill]:
        """This venue's trades of `symbol` within the retention window (see exchange.paper_history)."""
        return self._history.trades_of(symbol, since)

    async def fetch_balance(self) -> Balance:
        assets = sorted(set(self._balances) | set(self._locked))
        total = {a: self._balances.get(a, ZERO) for a in assets}
        free = {a: total[a] - self._locked.get(a, ZERO) for a in assets}
        return Balance(free=free, total=total, equity=self.equity())

    async def fetch_positions(self) -> list[ExchangePosition]:
        return []  # spot holds assets, not positions

    async def close(self) -> None:
        """Stop matching on price updates and end `run()`; state stays readable."""
        self._matching.close()

    # --- valuation ----------------------------------------------------------------------------------

    def equity(self) -> Decimal:
        """Quote balance plus every other asset at the feed's last price (in the quote asset)."""
        with localcontext(prec=_PRECISION):
            equity = ZERO
            for asset, amount in self._balances.items():
                if asset == self.quote_asset:
                    equity += amount
                    continue
                if amount == 0:
                    continue
                price = self._price_of(asset)
                if price is None:
                    if asset not in self._unpriced_warned:
                        self._unpriced_warned.add(asset)
                        log.warning("asset without a price left out of equity", asset=asset)
                    continue
                equity += amount * price
        return equity

    # --- resting orders -----------------------------------------------------------------------------

    def process_prices(self) -> list[OrderUpdate]:
        """Fill or trigger resting orders against the current tickers; report each change to `on_fill`.

        Orders are worked in the order they were placed, so two orders competing for the same funds
        are always settled the same way.
        """
        updates: list[OrderUpdate] = []
        now = self._clock.now()
        for order in list(self._resting.values()):
            ticker = self._ticker(order.request.symbol)
            if ticker is None:
                continue
            if self._work(order, ticker, now):
                updates.append(order.update())
        for update in updates:
            self._report(update)
        return updates

    async def run(self) -> None:
        """Work resting orders on every price change until closed (the Orchestrator owns this task).

        The work is done inside the feed's update (`MarketFeed.on_update`), before any engine wakes to
        the new price: a stop the price ran through has filled by the time an engine looks, as on a
        real venue, and no task of ours sits between a price update and the engines. An error in
        the matching ends this task with it (see `MatchingOnUpdates`)."""
        remove = self._feed.on_update(self._matching.settle)
        try:
            self.process_prices()
            await self._matching.ended.wait()
            self._matching.raise_failure()
        finally:
            remove()

    # --- restart ------------------------------------------------------------------------------------

    def restore(self, fills: Iterable[Fill], open_orders: Iterable[OrderRequest]) -> None:
        """Rebuild all paper state from the ledger: starting balances plus every fill (in time order,
        through `apply_fill`), and the resting orders re-opened with their funds locked again.

        `open_orders` carry each order as it was placed (its full amount, as the ledger stores it);
        the fills of the same client order id count against that amount here, so a fill recorded just
        before a crash that left the order's row behind cannot be executed twice.

        Orders known only by their fills come back FILLED (as MARKET orders: the fill does not say
        which type it was), so a re-sent client id is still recognized as already placed.
        """
        self._balances = dict(self._starting)
        self._locked = {}
        self._history.clear()
        self._resting = {}
        by_order: dict[str, list[Fill]] = {}
        ordered = sorted(fills, key=lambda f: f.ts)
        for fill in ordered:
            base, quote = self._assets(fill.symbol)
            apply_fill(self._balances, fill, base, quote)
            by_order.setdefault(fill.client_order_id, []).append(fill)
        self._history.restore_trades(ordered)
        now = self._clock.now()
        settled: list[tuple[str, float]] = []  # (client order id, when): not in time order, see below
        for request in open_orders:
            cid = request.client_order_id
            if cid in self._orders:
                continue
            info = self._markets.get(request.symbol)
            if info is None:
                log.error("open order for an unknown market not restored", client_order_id=cid,
                          symbol=request.symbol)
                continue
            try:
                req = self._normalized(request, info, check_minimums=False)
            except OrderRejected as exc:
                log.error("malformed open order not restored", client_order_id=cid, reason=str(exc))
                continue
            order = _PaperOrder(req, _exchange_order_id(cid), OrderState.OPEN, now, now,
                                fills=by_order.pop(cid, []))
            if order.remaining <= 0:
                order.state = OrderState.FILLED
                settled.append((cid, now))
            else:
                if order.fills:
                    order.state = OrderState.PARTIALLY_FILLED
                self._rest(order, info, check_funds=False)
            self._orders[cid] = order
        for cid, order_fills in by_order.items():
            first = order_fills[0]
            amount = sum((f.amount for f in order_fills), ZERO)
            request = OrderRequest(cid, first.symbol, first.side, OrderType.MARKET, amount,
                                   reduce_only=first.reduce_only)
            self._orders[cid] = _PaperOrder(request, _exchange_order_id(cid), OrderState.FILLED,
                                            first.ts, order_fills[-1].ts, fills=list(order_fills))
            settled.append((cid, order_fills[-1].ts))
        # Recorded by order (re-opened ones at `now` first), not by when they settled: the history
        # sorts them, so `forget_old` finds each one as soon as its window has passed.
        self._history.restore_settled(settled)
        self._history.forget_old(now)
        log.info("paper state restored", fills=len(ordered), open_orders=len(self._resting),
                 balances={a: str(v) for a, v in sorted(self._balances.items())})

    # --- internals ----------------------------------------------------------------------------------

    def _main_quote(self) -> str:
        quotes = sorted({m.quote for m in self._markets.values()})
        if len(quotes) == 1:
            return quotes[0]
        for candidate in ("USDT", "USDC", "FDUSD", "BUSD"):
            if candidate in quotes:
                return candidate
        return quotes[0] if quotes else "USDT"

    def _assets(self, symbol: str) -> tuple[str, str]:
        info = self._markets.get(symbol)
        return (info.base, info.quote) if info is not None else _split_symbol(symbol)

    def _ticker(self, symbol: str) -> Ticker | None:
        ticker = self._feed.ticker(symbol)
        if ticker is not None:
            self._last_price[symbol] = ticker.last
        return ticker

    def _price_of(self, asset: str) -> Decimal | None:
        symbol = f"{asset}/{self.quote_asset}"
        ticker = self._ticker(symbol)
        if ticker is not None:
            return ticker.last
        return self._last_price.get(symbol)

    def _normalized(
        self, request: OrderRequest, info: MarketInfo, *, check_minimums: bool = True
    ) -> OrderRequest:
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
                f"amount {request.amount} rounds to {amount}, below the minimum {info.min_amount} "
                f"for {info.symbol}"
            )
        if price is request.price and stop is request.stop_price and str(amount) == str(request.amount):
            return request  # already on the market's steps, as the engines send them (replace() is slow)
        return replace(request, amount=amount, price=price, stop_price=stop)

    @staticmethod
    def _check_notional(req: OrderRequest, price: Decimal, info: MarketInfo) -> None:
        notional = req.amount * price
        if notional < info.min_notional:
            raise OrderRejected(
                f"notional {notional} {info.quote} is below the minimum {info.min_notional} for {info.symbol}"
            )

    def _free(self, asset: str) -> Decimal:
        return self._balances.get(asset, ZERO) - self._locked.get(asset, ZERO)

    def _check_taker_funds(self, req: OrderRequest, price: Decimal, info: MarketInfo) -> None:
        asset, need = self._cost(req.side, req.amount, price, self._taker_pct, info)
        free = self._free(asset)
        if need > free:
            raise InsufficientFunds(f"{req.symbol} {req.side}: needs {need} {asset}, free {free}")

    @staticmethod
    def _cost(side: Side, amount: Decimal, price: Decimal, fee_pct: Decimal, info: MarketInfo
              ) -> tuple[str, Decimal]:
        """What an order consumes: quote for a buy (notional plus fee), base for a sell."""
        if side is Side.SELL:
            return info.base, amount
        return info.quote, amount * price + fee_for(amount, price, fee_pct)

    @staticmethod
    def _marketable(side: Side, limit: Decimal, ticker: Ticker) -> bool:
        return ticker.ask <= limit if side is Side.BUY else ticker.bid >= limit

    @staticmethod
    def _stop_triggered(side: Side, stop: Decimal, ticker: Ticker) -> bool:
        return ticker.last >= stop if side is Side.BUY else ticker.last <= stop

    def _lock_for(self, order: _PaperOrder, info: MarketInfo) -> tuple[str, Decimal]:
        req = order.request
        if req.order_type is OrderType.LIMIT:
            assert req.price is not None
            return self._cost(req.side, order.remaining, req.price, self._maker_pct, info)
        assert req.stop_price is not None
        with localcontext(prec=_PRECISION):
            expected = req.stop_price * (1 + self._slippage)
        return self._cost(req.side, order.remaining, expected, self._taker_pct, info)

    def _rest(self, order: _PaperOrder, info: MarketInfo, *, check_funds: bool) -> None:
        asset, need = self._lock_for(order, info)
        if check_funds and need > self._free(asset):
            raise InsufficientFunds(
                f"{order.request.symbol} {order.request.side}: needs {need} {asset}, free {self._free(asset)}"
            )
        order.locked_asset, order.locked = asset, need
        self._locked[asset] = self._locked.get(asset, ZERO) + need
        self._resting[order.request.client_order_id] = order

    def _unrest(self, order: _PaperOrder) -> None:
        self._resting.pop(order.request.client_order_id, None)
        if order.locked_asset is not None:
            left = self._locked.get(order.locked_asset, ZERO) - order.locked
            if left == 0:
                self._locked.pop(order.locked_asset, None)
            else:
                self._locked[order.locked_asset] = left
        order.locked_asset, order.locked = None, ZERO

    def _fill(self, order: _PaperOrder, info: MarketInfo, price: Decimal, fee_pct: Decimal, now: float) -> Fill:
        req = order.request
        base, quote = info.base, info.quote  # (what _assets answers for a listed market)
        amount = order.remaining
        fill = Fill(
            client_order_id=req.client_order_id,
            trade_id=f"{order.exchange_order_id}-{len(order.fills) + 1}",
            engine="",  # the order manager stamps its engine on the fill
            market=self.market_type,
            symbol=req.symbol,
            side=req.side,
            amount=amount,
            price=price,
            fee=fee_for(amount, price, fee_pct),
            fee_asset=quote,
            ts=now,
            reduce_only=req.reduce_only,
        )
        self._unrest(order)
        apply_fill(self._balances, fill, base, quote)
        order.fills.append(fill)
        order.state = OrderState.FILLED
        order.updated_at = now
        self._history.add_trade(fill)
        self._history.settled(req.client_order_id, now)
        return fill

    def _work(self, order: _PaperOrder, ticker: Ticker, now: float) -> bool:
        """Fill or trigger one resting order if the market reached it; True if its state changed."""
        req = order.request
        info = self._markets[req.symbol]
        if req.order_type is OrderType.LIMIT:
            assert req.price is not None
            if not self._marketable(req.side, req.price, ticker):
                return False
            self._fill(order, info, req.price, self._maker_pct, now)
            return True
        assert req.stop_price is not None
        if not self._stop_triggered(req.side, req.stop_price, ticker):
            return False
        price = taker_price(req.side, ticker, self._slippage, info.price_step)
        asset, need = self._cost(req.side, order.remaining, price, self._taker_pct, info)
        available = self._free(asset) + (order.locked if order.locked_asset == asset else ZERO)
        if need > available:
            # The market ran past the stop further than the locked estimate covers.
            self._unrest(order)
            order.state = OrderState.REJECTED
            order.updated_at = now
            self._history.settled(req.client_order_id, now)
            log.warning(
                "paper stop rejected at trigger: insufficient funds", client_order_id=req.client_order_id,
                needs=str(need), available=str(available), asset=asset,
            )
            return True
        self._fill(order, info, price, self._taker_pct, now)
        return True

    def _report(self, update: OrderUpdate) -> None:
        callback = self.on_fill
        if callback is None:
            return
        try:
            callback(update)
        except Exception:
            # The fill stands either way; the ledger catches up when the order is next fetched.
            log.exception("on_fill callback failed", client_order_id=update.client_order_id)


__all__ = [
    "FillCallback",
    "MatchingOnUpdates",
    "PaperExchange",
    "apply_fill",
    "fee_for",
    "spot_fill_deltas",
    "taker_price",
]

if TYPE_CHECKING:

    def _conforms(ex: PaperExchange) -> Exchange:
        """mypy checks here that PaperExchange satisfies the Exchange protocol."""
        return ex
