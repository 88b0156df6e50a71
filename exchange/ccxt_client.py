"""The real exchange: Binance spot or USD-M futures through ccxt, for testnet (demo) and live trading.

What this adds to ccxt, and why:

- **Exactly-once orders.** Placing an order is never retried. A send without a clear answer (timeout,
  dropped connection, 5xx, garbage) raises `SendOutcomeUnknown`, and the caller resolves it with
  `fetch_order(client_order_id)`. A "duplicate client order id" answer means an earlier send arrived:
  the existing order is fetched and returned instead.
- **Bounded, retried reads.** Every call has ccxt's own timeout plus an outer one on the project
  clock. Reads retry temporary failures with jittered exponential backoff; a timestamp rejection
  (-1021) is retried only after measuring the clock offset again.
- **Exact money.** Amounts and prices come from the raw exchange strings as `Decimal`, rounded with
  ccxt's precision helpers before they leave; orders below the market's minimum amount or notional
  are refused here, before anything is sent.
- **One parse per answer.** Plain orders are placed and read through ccxt's implicit endpoints, with
  the request built by ccxt's own `create_order_request`: ccxt still rounds, signs, sends and maps
  errors, but skips its float parse into unified structures that this client would throw away. The
  order round trip is timed against bare ccxt by bench/order_roundtrip_bench.py.
- **Fills always travel with their order.** An `OrderUpdate` that reports executions carries every
  fill (trade id, fee), fetched by order id when the exchange's answer did not include them, because
  the ledger builds positions from fills.
- **One weight budget per API** (`exchange.ratelimit`), shared by every client of that API, and
  counters (calls, errors by kind, latency histogram) for the metrics endpoint.

Symbols: spot markets are `BASE/QUOTE`; futures markets are ccxt's `BASE/QUOTE:SETTLE`, and the short
`BASE/QUOTE` is accepted for them too (answers to a call echo the caller's spelling).

Futures conditional orders (STOP_MARKET) go through Binance's algo-order endpoints in ccxt 4.5; the
client remembers which client ids are algo orders and, after a restart, falls back to the algo
endpoints when the regular ones do not know an id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit

import ccxt.async_support as ccxt
import structlog
from ccxt.base.decimal_to_precision import TICK_SIZE

from config import Settings
from core.clock import Clock
from core.errors import (
    ConfigError,
    DependencyError,
    InsufficientFunds,
    InvariantError,
    KineticError,
    OperationalError,
    OrderNotFound,
    OrderRejected,
    TemporaryError,
)
from core.types import (
    ZERO,
    Fill,
    MarketInfo,
    MarketType,
    OrderState,
    OrderType,
    PositionSide,
    Side,
    Ticker,
)
from exchange.base import Balance, ExchangePosition, OrderRequest, OrderUpdate
from exchange.errors import (
    ClockSkew,
    DuplicateClientOrderId,
    MalformedResponse,
    RateLimited,
    SendOutcomeUnknown,
    error_code,
    translate,
)
from exchange.ratelimit import BudgetRegistry, WeightBudget

log = structlog.get_logger("exchange")

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
Mode = Literal["testnet", "live", "public"]
RequestObserver = Callable[[str, float, str | None], None]

# Seconds; the buckets match monitoring/metrics.py so the counters can be exported as they are.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Binance request weight per call (published figures, rounded up where they depend on arguments).
_WEIGHTS: dict[MarketType, dict[str, int]] = {
    MarketType.SPOT: {
        "load_markets": 20, "fetch_time": 1, "fetch_ticker": 2,
        "fetch_balance": 20, "create_order": 1, "fetch_order": 4, "cancel_order": 1,
        "fetch_open_orders": 6, "fetch_open_orders_all": 80, "fetch_my_trades": 20, "fetch_order_trades": 5,
    },
    MarketType.FUTURES: {
        "load_markets": 1, "fetch_time": 1, "fetch_ticker": 3, "fetch_balance": 5, "create_order": 1,
        "fetch_order": 1, "cancel_order": 1, "fetch_open_orders": 1, "fetch_open_orders_all": 40,
        "fetch_my_trades": 5, "fetch_order_trades": 5, "fetch_positions": 6, "leverage_tiers": 1,
        "set_leverage": 1, "set_margin_mode": 1,
    },
}

# ccxt's implicit (raw) endpoints behind its unified calls for plain, non-conditional orders: place, query,
# trades of one order. ccxt builds and signs these requests and maps their errors as for the unified calls;
# what the unified calls add on top is a float parse of the answer into ccxt's order and trade structures,
# which this client never reads (it parses the exchange's own strings into Decimal). That parse costs more
# than this client's own checks (about 50 us per spot order answer with fills, 25 us per order read).
_RAW_ENDPOINTS: dict[MarketType, tuple[str, str, str]] = {
    MarketType.SPOT: ("privatePostOrder", "privateGetOrder", "privateGetMyTrades"),
    MarketType.FUTURES: ("fapiPrivatePostOrder", "fapiPrivateGetOrder", "fapiPrivateGetUserTrades"),
}

_STATUS = {
    "NEW": OrderState.OPEN,
    "PENDING_NEW": OrderState.OPEN,
    "PENDING_CANCEL": OrderState.OPEN,
    "PARTIALLY_FILLED": OrderState.PARTIALLY_FILLED,
    "FILLED": OrderState.FILLED,
    "CANCELED": OrderState.CANCELED,
    "EXPIRED": OrderState.CANCELED,
    "EXPIRED_IN_MATCH": OrderState.CANCELED,
    "REJECTED": OrderState.REJECTED,
}
_ORDER_TYPES = {
    "MARKET": OrderType.MARKET,
    "LIMIT": OrderType.LIMIT,
    "LIMIT_MAKER": OrderType.LIMIT,
    "STOP_MARKET": OrderType.STOP_MARKET,
    "STOP_LOSS": OrderType.STOP_MARKET,
    "STOP_LOSS_LIMIT": OrderType.STOP_MARKET,
    "STOP": OrderType.STOP_MARKET,
}
# Algo (conditional) order life: NEW -> TRIGGERING -> TRIGGERED/FINISHED (an actual order exists).
_ALGO_WAITING = {"NEW", "TRIGGERING"}
_ALGO_DONE = {"CANCELED": OrderState.CANCELED, "EXPIRED": OrderState.CANCELED, "REJECTED": OrderState.REJECTED}
_MAX_TRADE_PAGES = 10
# Per-order memos (order id -> client id, algo ids, reduce-only flags) are hints that save a request;
# beyond this many entries the oldest half is forgotten, so a long-running daemon does not grow.
_MEMO_LIMIT = 20_000
_TRADE_PAGE = 1000
# USD-M answers userTrades for at most 7 days per request (ccxt caps an older startTime at startTime + 7
# days by itself), so a longer window is read a week at a time; this many requests at most (about 4 years).
_FUTURES_TRADE_WINDOW_MS = 7 * 86_400_000
_MAX_TRADE_REQUESTS = 200


@dataclass(slots=True)
class ClientStats:
    """Running totals for the metrics endpoint: calls per endpoint, errors per (endpoint, kind), a
    latency histogram (non-cumulative counts per `LATENCY_BUCKETS` bucket, the last one is +Inf)."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    retries: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def errors_by_kind(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, kind), n in self.errors.items():
            out[kind] += n
        return out


def error_kind(err: BaseException) -> str:
    """A short label for metrics and logs, from the most specific error kind."""
    labels: tuple[tuple[type[BaseException], str], ...] = (
        (SendOutcomeUnknown, "send_unknown"), (RateLimited, "rate_limit"), (ClockSkew, "clock_skew"),
        (MalformedResponse, "malformed"), (TemporaryError, "temporary"), (OrderNotFound, "not_found"),
        (InsufficientFunds, "insufficient_funds"), (OrderRejected, "rejected"),
        (DependencyError, "dependency"), (OperationalError, "operational"),
    )
    for cls, label in labels:
        if isinstance(err, cls):
            return label
    return "other"


def _dec(value: Any, what: str) -> Decimal:
    """A Decimal from an exchange string; anything else is a malformed answer, not a crash."""
    if type(value) is not str:
        # Binance sends numbers as strings; a JSON number still parses exactly through its text.
        if value is None or isinstance(value, bool):
            raise MalformedResponse(f"missing {what}")
        value = str(value)
    try:
        out = Decimal(value)
    except InvalidOperation:
        raise MalformedResponse(f"{what} is not a number: {value!r}") from None
    if not out.is_finite():
        raise MalformedResponse(f"{what} is not finite: {value!r}")
    return out


def _dec_or(value: Any, default: Decimal, what: str = "number") -> Decimal:
    if value is None or value == "":
        return default
    return _dec(value, what)


def _info(raw: Any, what: str) -> dict[str, Any]:
    """The raw exchange object behind a ccxt structure (ccxt keeps it in `info`)."""
    info = raw.get("info") if isinstance(raw, dict) else None
    if not isinstance(info, dict):
        raise MalformedResponse(f"{what}: answer is not an object")
    return info


def _answer(raw: Any, what: str) -> dict[str, Any]:
    """An exchange answer taken as it came (from a raw endpoint): it must be an object."""
    if not isinstance(raw, dict):
        raise MalformedResponse(f"{what}: answer is not an object")
    return raw


def _ts(value: Any, default: float) -> float:
    try:
        ms = int(value)
    except (TypeError, ValueError):
        return default
    return ms / 1000 if ms > 0 else default


class CcxtExchange:
    """`exchange.base.Exchange` over ccxt's async `binance` (spot) or `binanceusdm` (futures)."""

    answers_inline = False  # every call is a network round trip (see exchange.base.Exchange)

    def __init__(
        self,
        market_type: MarketType,
        clock: Clock,
        *,
        api_key: str | None,
        api_secret: str | None,
        mode: Mode,
        timeout_seconds: float,
        urls_override: str | None = None,
        max_retries: int = 4,
        budget: WeightBudget | None = None,
        backoff_base_seconds: float = 0.25,
        backoff_max_seconds: float = 5.0,
        quote_asset: str = "USDT",
        stop_limit_offset_pct: Decimal = Decimal("0.5"),
        rng: random.Random | None = None,
        on_request: RequestObserver | None = None,
    ) -> None:
        if mode not in ("testnet", "live", "public"):
            raise ConfigError([f"exchange mode must be testnet, live or public, got {mode!r}"])
        if mode != "public" and not (api_key and api_secret):
            raise ConfigError([f"BINANCE_API_KEY / BINANCE_API_SECRET: required for {mode} trading"])
        if timeout_seconds <= 0:
            raise ConfigError([f"exchange timeout must be positive, got {timeout_seconds}"])
        self.market_type = market_type
        self.mode: Mode = mode
        self.clock = clock
        self.timeout_seconds = timeout_seconds
        self.max_retries = max(0, max_retries)
        self.budget = budget or WeightBudget.for_binance(market_type, clock)
        self.stats = ClientStats()
        self.quote_asset = quote_asset
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._stop_offset = stop_limit_offset_pct / 100
        self._rng = rng or random.Random()
        self._on_request = on_request
        self._secrets = tuple(s for s in (api_key, api_secret) if s)
        self._private = mode != "public"
        self._weights = _WEIGHTS[market_type]
        self._markets: dict[str, MarketInfo] = {}
        self._amount_steps: dict[str, Decimal] = {}
        self._aliases: dict[str, str] = {}
        self._setup: dict[str, tuple[int | None, str]] = {}
        self._algo_ids: dict[str, bool] = {}
        self._reduce_only: dict[str, bool] = {}
        self._order_ids: dict[str, str] = {}  # exchange order id -> client order id
        self._fills: dict[str, tuple[Fill, ...]] = {}  # client order id -> executions seen
        self._market_ids: dict[str, str] = {}  # ccxt symbol -> exchange symbol (BTC/USDT -> BTCUSDT)
        self._closed = False
        self._ex = self._build(api_key, api_secret, urls_override)
        post, query, trades = _RAW_ENDPOINTS[market_type]
        self._post_order: Callable[[dict[str, Any]], Awaitable[Any]] = getattr(self._ex, post)
        self._get_order: Callable[[dict[str, Any]], Awaitable[Any]] = getattr(self._ex, query)
        self._get_trades: Callable[[dict[str, Any]], Awaitable[Any]] = getattr(self._ex, trades)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        market_type: MarketType,
        clock: Clock,
        *,
        budgets: BudgetRegistry | None = None,
        on_request: RequestObserver | None = None,
    ) -> CcxtExchange:
        """The client the daemon runs: TRADING_MODE testnet or live trades with the keys; paper gets a
        public (market data only) client. Pass one `budgets` registry to every client you build."""
        mode: Mode = "public"
        if settings.trading_mode in ("testnet", "live"):
            mode = "testnet" if settings.trading_mode == "testnet" else "live"
        key = settings.binance_api_key if mode != "public" else None
        secret = settings.binance_api_secret if mode != "public" else None
        registry = budgets or BudgetRegistry(clock, share=settings.exchange_weight_share_pct / 100)
        return cls(
            market_type,
            clock,
            api_key=key.get_secret_value() if key is not None else None,
            api_secret=secret.get_secret_value() if secret is not None else None,
            mode=mode,
            timeout_seconds=settings.exchange_timeout_seconds,
            urls_override=settings.exchange_url_override,
            max_retries=settings.exchange_max_retries,
            budget=registry.for_market(market_type),
            backoff_base_seconds=settings.exchange_backoff_base_seconds,
            backoff_max_seconds=settings.exchange_backoff_max_seconds,
            on_request=on_request,
        )

    # --- construction ------------------------------------------------------------------------------

    def _build(self, api_key: str | None, api_secret: str | None, urls_override: str | None) -> Any:
        options: dict[str, Any] = {
            "fetchCurrencies": False,
            "fetchMargins": False,
            "warnOnFetchOpenOrdersWithoutSymbol": False,
            "adjustForTimeDifference": False,
        }
        if self.market_type is MarketType.SPOT:
            options["fetchMarkets"] = {"types": ["spot"]}
            cls = ccxt.binance
        else:
            options["fetchMarkets"] = {"types": ["linear"]}
            cls = ccxt.binanceusdm
        config: dict[str, Any] = {
            "timeout": int(self.timeout_seconds * 1000),
            # The shared weight budget replaces ccxt's per-instance throttler, which cannot see the other
            # clients and sleeps on the wall clock.
            "enableRateLimit": False,
            "options": options,
        }
        if self._private:
            config["apiKey"] = api_key
            config["secret"] = api_secret
        ex = cls(config)
        if self.mode == "testnet":
            ex.enable_demo_trading(True)
        if urls_override:
            _point_at(ex, urls_override)
        return ex

    @property
    def is_live(self) -> bool:
        return self.mode == "live"

    @property
    def name(self) -> str:
        return f"binance-{self.market_type.value}-{self.mode}"

    # --- the request machinery -----------------------------------------------------------------------

    def _outer_timeout(self, requests: int) -> float:
        # A backstop behind ccxt's own per-request timeout, for calls that make `requests` round trips.
        return self.timeout_seconds * requests + 1.0

    async def _attempt(
        self, endpoint: str, call: Callable[[], Awaitable[T]], *, weight: int | None = None, requests: int = 1
    ) -> T:
        """One try: budget, timeout, counters, and translation of whatever went wrong."""
        cost = self._weights.get(endpoint, 1) if weight is None else weight
        if not self.budget.try_take(cost):
            await self.budget.acquire(cost)
        self.stats.calls[endpoint] += 1
        clock = self.clock
        limit = self._outer_timeout(requests)
        started = clock.monotonic()
        kind: str | None = None
        try:
            return await clock.wait_for(call(), limit)
        except TimeoutError as exc:
            err: KineticError = TemporaryError(f"{endpoint}: no answer within {limit:g}s")
            kind = error_kind(err)
            raise err from exc
        except ccxt.BaseError as exc:
            err = translate(exc, secrets=self._secrets)
            if isinstance(err, RateLimited):
                self.budget.drain()
            kind = error_kind(err)
            raise err from exc
        except KineticError as exc:
            kind = error_kind(exc)
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            # ccxt parsing an answer that is not what the endpoint returns (e.g. an HTML page).
            err = MalformedResponse(f"{endpoint}: unexpected answer ({type(exc).__name__}: {exc})")
            kind = error_kind(err)
            log.warning("malformed exchange answer", endpoint=endpoint, error=str(err), exc_info=True)
            raise err from exc
        finally:
            elapsed = max(0.0, clock.monotonic() - started)
            self.stats.observe(elapsed)
            if kind is not None:
                self.stats.errors[(endpoint, kind)] += 1
            if self._on_request is not None:
                self._on_request(endpoint, elapsed, kind)

    async def _read(
        self, endpoint: str, call: Callable[[], Awaitable[T]], *, weight: int | None = None, requests: int = 1
    ) -> T:
        """A call that is safe to repeat: temporary failures are retried with jittered backoff."""
        attempt = 0
        while True:
            try:
                return await self._attempt(endpoint, call, weight=weight, requests=requests)
            except TemporaryError as exc:
                if attempt >= self.max_retries:
                    if error_code(exc) == -2015:
                        # ccxt reports -2015 as DDoSProtection once a key has worked, since Binance
                        # sends it spuriously now and then; still failing after every retry, it means
                        # the key was revoked or this IP is not whitelisted.
                        raise OperationalError(f"{endpoint}: API key refused ({exc})") from exc
                    raise
                attempt += 1
                self.stats.retries += 1
                if isinstance(exc, ClockSkew):
                    await self._resync_time()
                delay = self._backoff(attempt)
                log.info("exchange read retrying", endpoint=endpoint, attempt=attempt,
                         delay=round(delay, 3), error=str(exc))
                await self.clock.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Equal jitter: half the exponential step for sure, the other half at random, so clients
        that failed together do not retry together."""
        step = min(self._backoff_max, self._backoff_base * 2.0 ** (attempt - 1))
        return step / 2 + self._rng.uniform(0, step / 2)

    async def _resync_time(self) -> None:
        """Measure the offset between our clock and the exchange's (ccxt then signs with it)."""
        try:
            await self._attempt("fetch_time", self._ex.load_time_difference)
        except TemporaryError as exc:
            log.warning("exchange time resync failed", error=str(exc))
        else:
            log.info("exchange time resynced", offset_ms=self._ex.options.get("timeDifference"))

    def _require_private(self, what: str) -> None:
        if not self._private:
            raise OperationalError(f"{what} needs API keys; this client is in public mode")

    # --- markets -----------------------------------------------------------------------------------

    async def load_markets(self) -> dict[str, MarketInfo]:
        async def call() -> dict[str, Any]:
            raw = await self._ex.load_markets(True)
            if not isinstance(raw, dict) or not any(self._wanted(m) for m in raw.values()):
                raise MalformedResponse("load_markets: no markets in the answer")
            return raw

        raw = await self._read("load_markets", call)
        leverage = await self._max_leverage() if self.market_type is MarketType.FUTURES else {}
        markets: dict[str, MarketInfo] = {}
        aliases: dict[str, str] = {}
        for symbol, m in raw.items():
            if not self._wanted(m):
                continue
            try:
                markets[symbol] = self._market_info(symbol, m, leverage.get(symbol, 1))
            except MalformedResponse as exc:
                log.warning("market skipped: incomplete filters", symbol=symbol, error=str(exc))
                continue
            aliases[symbol] = symbol
            aliases.setdefault(symbol.split(":")[0], symbol)
        self._markets = markets
        self._aliases = aliases
        self._market_ids = {symbol: str(raw[symbol]["id"]) for symbol in markets}
        self._amount_steps = self._ccxt_amount_steps(markets)
        log.info("markets loaded", exchange=self.name, markets=len(markets))
        return dict(markets)

    def _wanted(self, m: Any) -> bool:
        if not isinstance(m, dict) or m.get("active") is False:
            return False
        if self.market_type is MarketType.SPOT:
            return bool(m.get("spot"))
        return bool(m.get("swap")) and bool(m.get("linear"))

    async def _max_leverage(self) -> dict[str, int]:
        if not self._private:
            return {}
        async def call() -> dict[str, int]:
            tiers = await self._ex.fetch_leverage_tiers()
            if not isinstance(tiers, dict):
                raise MalformedResponse("leverage brackets: answer is not an object")
            out: dict[str, int] = {}
            for symbol, rows in tiers.items():
                levels = [int(r["maxLeverage"]) for r in rows or [] if r.get("maxLeverage")]
                if levels:
                    out[symbol] = max(levels)
            return out

        return await self._read("leverage_tiers", call)

    def _market_info(self, symbol: str, m: dict[str, Any], max_leverage: int) -> MarketInfo:
        info = _info(m, f"market {symbol}")
        filters = {f.get("filterType"): f for f in info.get("filters", []) if isinstance(f, dict)}
        price = filters.get("PRICE_FILTER") or {}
        lot = filters.get("LOT_SIZE") or {}
        notional = filters.get("NOTIONAL") or filters.get("MIN_NOTIONAL") or {}
        min_notional = notional.get("minNotional", notional.get("notional", "0"))
        return MarketInfo(
            symbol=symbol,
            base=str(m.get("base")),
            quote=str(m.get("quote")),
            market=self.market_type,
            amount_step=_dec(lot.get("stepSize"), f"{symbol} LOT_SIZE stepSize").normalize(),
            price_step=_dec(price.get("tickSize"), f"{symbol} PRICE_FILTER tickSize").normalize(),
            min_amount=_dec(lot.get("minQty"), f"{symbol} LOT_SIZE minQty").normalize(),
            min_notional=_dec(min_notional, f"{symbol} min notional").normalize(),
            max_leverage=max_leverage if self.market_type is MarketType.FUTURES else 1,
        )

    def _resolve(self, symbol: str) -> str:
        if not self._markets:
            raise InvariantError("markets are not loaded: call load_markets() first")
        resolved = self._aliases.get(symbol) or self._aliases.get(symbol.upper())
        if resolved is None:
            raise DependencyError(f"unknown market {symbol} on {self.name}")
        return resolved

    def market(self, symbol: str) -> MarketInfo:
        return self._markets[self._resolve(symbol)]

    @property
    def markets(self) -> dict[str, MarketInfo]:
        return dict(self._markets)

    # --- market data ---------------------------------------------------------------------------------

    async def fetch_ticker(self, symbol: str) -> Ticker:
        """Bid, ask and last of one symbol, validated: a garbled answer is an error, not a ticker of
        None. Futures' 24h ticker has no book, so their bid/ask come from the book ticker."""
        sym = self._resolve(symbol)

        async def call() -> Ticker:
            raw = await self._ex.fetch_ticker(sym)
            info = _info(raw, "fetch_ticker")
            if self.market_type is MarketType.FUTURES:
                book = await self._ex.fapiPublicGetTickerBookTicker({"symbol": info.get("symbol")})
                if not isinstance(book, dict):
                    raise MalformedResponse("book ticker: answer is not an object")
                info = {**info, "bidPrice": book.get("bidPrice"), "askPrice": book.get("askPrice")}
            return Ticker(
                symbol=symbol,
                bid=_positive(info.get("bidPrice"), "bid"),
                ask=_positive(info.get("askPrice"), "ask"),
                last=_positive(info.get("lastPrice"), "last"),
                ts=self.clock.now(),
                quote_volume_24h=_dec_or(info.get("quoteVolume"), ZERO),
                change_pct_24h=_dec_or(info.get("priceChangePercent"), ZERO),
            )

        return await self._read("fetch_ticker", call, requests=2)

    async def _last_prices(self, symbols: list[str]) -> dict[str, Decimal]:
        if not symbols:
            return {}
        # Binance's 24h ticker weighs 2 for up to 20 symbols, 40 up to 100, 80 beyond.
        weight = 2 if len(symbols) <= 20 else 40 if len(symbols) <= 100 else 80

        async def call() -> dict[str, Decimal]:
            raw = await self._ex.fetch_tickers(symbols)
            if not isinstance(raw, dict):
                raise MalformedResponse("fetch_tickers: answer is not an object")
            return {s: _positive(_info(t, "ticker").get("lastPrice"), f"{s} last") for s, t in raw.items()}

        return await self._read("fetch_tickers", call, weight=weight)

    # --- orders --------------------------------------------------------------------------------------

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        """Send one order, once. See the module docstring for what each outcome means."""
        self._require_private("create_order")
        sym = self._resolve(request.symbol)
        info = self._markets[sym]
        prepared = await self._prepare(request, sym, info)
        if self.market_type is MarketType.FUTURES and not request.reduce_only and not self._is_set_up(
            sym, request.leverage, "isolated"
        ):
            await self.ensure_symbol_setup(sym, request.leverage)
        if prepared.conditional:
            _remember(self._algo_ids, request.client_order_id, True)
        _remember(self._reduce_only, request.client_order_id, request.reduce_only)
        if prepared.conditional:
            # ccxt routes conditional orders to the algo endpoints; its unified call does the routing.
            send: Callable[[], Awaitable[Any]] = partial(
                self._ex.create_order,
                sym, prepared.ccxt_type, request.side.value, prepared.amount, prepared.price, prepared.params,
            )
        else:
            send = partial(self._place, sym, request.side.value, prepared)
        try:
            raw = await self._attempt("create_order", send)
        except DuplicateClientOrderId:
            log.warning("order already on the exchange; fetching it instead", symbol=sym,
                        client_order_id=request.client_order_id)
            try:
                return await self.fetch_order(request.symbol, request.client_order_id)
            except KineticError as exc:
                # The order exists: nothing that stops us reading it back (a rate limit, clock skew, a
                # read that lags the send and says -2013, a refused key) may pass for a refusal of the
                # send, which the order manager settles as REJECTED at once, without looking.
                raise self._send_unknown(request, sym, f"placed, but could not be read ({exc})") from exc
        except (RateLimited, ClockSkew) as exc:
            # Refused before anything happened: the order does not exist. Not retried here either;
            # the caller's resolution by client id will find nothing and settle it.
            if isinstance(exc, ClockSkew):
                await self._resync_time()
            raise
        except TemporaryError as exc:
            raise self._send_unknown(request, sym, f"no clear answer ({exc})") from exc
        try:
            if prepared.conditional:
                return self._algo_waiting_update(raw, request.symbol)
            update = self._order_update(_answer(raw, "order"), request.symbol)
            return await self._with_fills(update, request.symbol) if _lacks_fills(update) else update
        except KineticError as exc:
            # The exchange accepted the order, but the answer or its fills could not be read (whatever
            # the reason: a lost answer, a refused read, a read that lags the send): the order exists,
            # so the caller resolves it by client id exactly as for a lost answer, never as a refusal.
            raise self._send_unknown(request, sym, f"answer could not be read ({exc})") from exc

    async def _place(self, sym: str, side: str, prepared: _Prepared) -> Any:
        """Send a plain order: ccxt builds the request exactly as its `create_order` does (precision,
        client id, response type) and signs and sends it; the answer comes back as the exchange wrote it."""
        request = self._ex.create_order_request(
            sym, prepared.ccxt_type, side, prepared.amount, prepared.price, prepared.params
        )
        return await self._post_order(request)

    def _send_unknown(self, request: OrderRequest, sym: str, why: str) -> SendOutcomeUnknown:
        self.stats.errors[("create_order", "send_unknown")] += 1
        log.warning("order send outcome unknown", symbol=sym, client_order_id=request.client_order_id,
                    error=why)
        return SendOutcomeUnknown(
            f"order {request.client_order_id} on {sym}: {why}; resolve it with fetch_order, "
            "do not send it again"
        )

    async def _prepare(self, request: OrderRequest, sym: str, info: MarketInfo) -> _Prepared:
        """Round to the market's precision and check its minimums, so a doomed order is refused here
        with a clear reason instead of by the exchange."""
        if request.amount <= 0:
            raise OrderRejected(f"{sym}: amount must be positive, got {request.amount}")
        amount = self._amount(sym, request.amount)
        if amount < info.min_amount or amount <= 0:
            raise OrderRejected(
                f"{sym}: amount {request.amount} rounds to {amount}, below the minimum {info.min_amount}"
            )
        params: dict[str, Any] = {"newClientOrderId": request.client_order_id}
        if self.market_type is MarketType.FUTURES and request.reduce_only:
            params["reduceOnly"] = True
        price: str | None = None
        ccxt_type = "market"
        conditional = False
        if request.order_type is OrderType.LIMIT:
            if request.price is None or request.price <= 0:
                raise OrderRejected(f"{sym}: a limit order needs a positive price")
            price = self._ex.price_to_precision(sym, str(request.price))
            ccxt_type = "limit"
            reference = Decimal(price)
        elif request.order_type is OrderType.STOP_MARKET:
            if request.stop_price is None or request.stop_price <= 0:
                raise OrderRejected(f"{sym}: a stop order needs a positive stop price")
            stop = self._ex.price_to_precision(sym, str(request.stop_price))
            reference = Decimal(stop)
            # Futures stops are conditional (algo) orders with their own endpoints; spot stops are not.
            conditional = self.market_type is MarketType.FUTURES
            ccxt_type, price = self._stop_shape(sym, request, Decimal(stop), params)
        else:
            # Never pass a price with a market order: ccxt turns a spot market order with a price into
            # quoteOrderQty (spend amount*price), which is not the amount asked for.
            reference = request.price if request.price is not None and request.price > 0 else ZERO
            if reference <= 0:
                reference = (await self.fetch_ticker(sym)).last
        exempt = self.market_type is MarketType.FUTURES and request.reduce_only
        notional = amount * reference
        if not exempt and notional < info.min_notional:
            raise OrderRejected(
                f"{sym}: notional {notional.normalize()} ({amount} x {reference}) is below the minimum "
                f"{info.min_notional}"
            )
        return _Prepared(ccxt_type, str(amount), price, params, conditional)

    def _stop_shape(
        self, sym: str, request: OrderRequest, stop: Decimal, params: dict[str, Any]
    ) -> tuple[str, str | None]:
        """How to send a stop: futures STOP_MARKET (ccxt routes it to the algo endpoint); spot
        STOP_LOSS where the symbol lists it, else STOP_LOSS_LIMIT with a limit just beyond the stop."""
        if self.market_type is MarketType.FUTURES:
            params["stopPrice"] = str(stop)
            return "market", None
        order_types = _info(self._ex.market(sym), f"market {sym}").get("orderTypes") or []
        params["stopLossPrice"] = str(stop)
        if "STOP_LOSS" in order_types:
            return "market", None
        if "STOP_LOSS_LIMIT" in order_types:
            if request.price is not None and request.price > 0:
                limit = request.price
            elif request.side is Side.SELL:
                limit = stop * (1 - self._stop_offset)
            else:
                limit = stop * (1 + self._stop_offset)
            return "limit", self._ex.price_to_precision(sym, str(limit))
        raise OrderRejected(f"{sym}: the exchange offers no stop-loss order type for this symbol")

    def _ccxt_amount_steps(self, markets: dict[str, MarketInfo]) -> dict[str, Decimal]:
        """The amount step ccxt rounds each market's orders to, read once from ccxt's own market
        table. ccxt's `amount_to_precision` truncates to a multiple of that step (TICK_SIZE mode);
        the same truncation in Decimal costs a tenth of a string round trip through ccxt's helper.
        Markets whose precision ccxt does not express as a step are left out and use the helper."""
        if self._ex.precisionMode != TICK_SIZE:
            return {}
        steps: dict[str, Decimal] = {}
        for sym in markets:
            try:
                raw = self._ex.markets[sym]["precision"]["amount"]
                step = Decimal(self._ex.number_to_string(raw))
            except (KeyError, TypeError, InvalidOperation):
                continue
            if step.is_finite() and step > 0:
                steps[sym] = step
        return steps

    def _amount(self, sym: str, amount: Decimal) -> Decimal:
        """`amount` truncated to the market's step, exactly as ccxt will round it when it sends the
        order (it applies `amount_to_precision` again on the way out, to the same result)."""
        step = self._amount_steps.get(sym)
        if step is not None and amount > 0:
            try:
                rounded = amount - amount % step
            except InvalidOperation:
                pass  # the quotient has more digits than the context: let ccxt do it with strings
            else:
                return rounded if rounded > 0 else ZERO
        try:
            return Decimal(self._ex.amount_to_precision(sym, str(amount)))
        except ccxt.InvalidOrder:
            # ccxt refuses amounts that truncate to zero.
            return ZERO

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        """The exchange's view of one order, with every fill. Raises OrderNotFound if unknown."""
        self._require_private("fetch_order")
        sym = self._resolve(symbol)
        if client_order_id in self._algo_ids:
            return await self._fetch_algo(sym, symbol, client_order_id)
        try:
            update = await self._read(
                "fetch_order",
                lambda: self._fetch_regular(sym, symbol, {"origClientOrderId": client_order_id}),
            )
        except OrderNotFound:
            if self.market_type is not MarketType.FUTURES:
                raise
            return await self._fetch_algo(sym, symbol, client_order_id)
        return await self._with_fills(update, symbol) if _lacks_fills(update) else update

    async def _fetch_regular(self, sym: str, symbol: str, params: dict[str, Any]) -> OrderUpdate:
        """One regular order by `orderId` or `origClientOrderId`, parsed inside the attempt (a garbled
        answer is retried like a lost one)."""
        answer = await self._get_order({"symbol": self._market_ids[sym], **params})
        return self._order_update(_answer(answer, "order"), symbol)

    async def _fetch_algo(self, sym: str, symbol: str, client_order_id: str) -> OrderUpdate:
        async def call() -> dict[str, Any]:
            raw = await self._ex.fetch_order(None, sym, {"clientAlgoId": client_order_id, "trigger": True})
            self._algo_waiting_update(raw, symbol)  # validates the answer inside the retried attempt
            return _info(raw, "algo order")

        info = await self._read("fetch_order", call)
        _remember(self._algo_ids, client_order_id, True)
        return await self._algo_update(info, symbol, sym)

    async def cancel_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        """Cancel by client id. Cancelling is safe to repeat, so it is retried like a read; an order
        that can no longer be cancelled (filled, already cancelled) is answered with its current state,
        and OrderNotFound is raised only when the exchange does not know the id at all."""
        self._require_private("cancel_order")
        sym = self._resolve(symbol)
        try:
            if client_order_id in self._algo_ids:
                await self._cancel_algo(sym, client_order_id)
            else:
                try:
                    update = await self._read(
                        "cancel_order", partial(self._cancel_regular, sym, symbol, client_order_id)
                    )
                    return await self._with_fills(update, symbol)
                except OrderNotFound:
                    if self.market_type is not MarketType.FUTURES:
                        raise
                    await self._cancel_algo(sym, client_order_id)
        except OrderNotFound:
            log.info("cancel: order not open; reading its state", symbol=sym, client_order_id=client_order_id)
        return await self.fetch_order(symbol, client_order_id)

    async def _cancel_regular(self, sym: str, symbol: str, client_order_id: str) -> OrderUpdate:
        raw = await self._ex.cancel_order(None, sym, {"origClientOrderId": client_order_id})
        return self._order_update(_info(raw, "order"), symbol)

    async def _cancel_algo(self, sym: str, client_order_id: str) -> None:
        await self._read(
            "cancel_order",
            lambda: self._ex.cancel_order(None, sym, {"clientAlgoId": client_order_id, "trigger": True}),
        )
        _remember(self._algo_ids, client_order_id, True)

    async def fetch_open_orders(self, symbols: list[str]) -> list[OrderUpdate]:
        """Open orders (with fills of partially filled ones). Futures include open conditional orders.
        An empty list asks for every symbol in one heavier call."""
        self._require_private("fetch_open_orders")
        targets: list[tuple[str | None, str | None]] = (
            [(self._resolve(s), s) for s in symbols] if symbols else [(None, None)]
        )
        out: list[OrderUpdate] = []
        for sym, asked in targets:
            endpoint_weight = self._weights["fetch_open_orders" if sym else "fetch_open_orders_all"]
            updates = await self._read(
                "fetch_open_orders", partial(self._open_orders, sym, asked, False), weight=endpoint_weight
            )
            for update in updates:
                out.append(await self._with_fills(update, update.symbol))
            if self.market_type is MarketType.FUTURES:
                algos = await self._read(
                    "fetch_open_orders", partial(self._open_orders, sym, asked, True), weight=endpoint_weight
                )
                for update in algos:
                    _remember(self._algo_ids, update.client_order_id, True)
                out.extend(algos)
        return out

    async def _open_orders(self, sym: str | None, asked: str | None, algo: bool) -> list[OrderUpdate]:
        params = {"trigger": True} if algo else {}
        raws = _as_list(await self._ex.fetch_open_orders(sym, None, None, params), "fetch_open_orders")
        if algo:
            return [self._algo_waiting_update(raw, asked or str(raw.get("symbol"))) for raw in raws]
        return [self._order_update(_info(raw, "order"), asked or str(raw.get("symbol"))) for raw in raws]

    # --- order answers -> OrderUpdate ----------------------------------------------------------------

    def _order_update(self, info: dict[str, Any], symbol: str) -> OrderUpdate:
        """Validate an order as the exchange wrote it and read it exactly. This runs on every order
        round trip, so each field is read once and parsed once."""
        get = info.get
        # A spot cancel answers with a fresh id for the cancel request in clientOrderId; the order's
        # own id is origClientOrderId.
        cid = get("origClientOrderId") or get("clientOrderId")
        oid = get("orderId")
        status = get("status")
        state = _STATUS.get(status) if isinstance(status, str) else None
        if not cid or oid is None or state is None:
            raise MalformedResponse(f"order answer lacks id or status: {sorted(info)[:8]}")
        cid, oid = str(cid), str(oid)
        _remember(self._order_ids, oid, cid)
        side = _side(get("side"))
        amount = _dec(get("origQty"), "origQty")
        filled = _dec_or(get("executedQty"), ZERO, "executedQty")
        reduce_only = bool(get("reduceOnly", self._reduce_only.get(cid, False)))
        ts = _ts(get("updateTime") or get("transactTime") or get("time"), self.clock.now())
        avg: Decimal | None = None
        fills: tuple[Fill, ...] = ()
        if filled > 0:
            avg_price = _dec_or(get("avgPrice"), ZERO, "avgPrice")
            if avg_price <= 0:
                avg_price = _dec_or(get("cummulativeQuoteQty"), ZERO, "cummulativeQuoteQty") / filled
            avg = avg_price if avg_price > 0 else None
            answered = get("fills")
            fills = self._known_fills(
                cid, symbol, filled,
                self._response_fills(answered, cid, symbol, side, ts, reduce_only) if answered else (),
            )
        return OrderUpdate(
            client_order_id=cid,
            exchange_order_id=oid,
            symbol=symbol,
            side=side,
            order_type=_ORDER_TYPES.get(str(get("type") or get("origType")), OrderType.MARKET),
            amount=amount,
            filled=filled,
            avg_price=avg,
            state=state,
            ts=ts,
            fills=fills,
            reduce_only=reduce_only,
        )

    def _known_fills(
        self, cid: str, symbol: str, filled: Decimal, answered: tuple[Fill, ...]
    ) -> tuple[Fill, ...]:
        """For an order that has executed `filled`: the fills in the answer if they cover it; else the
        ones seen before for this order if they do (executions never change once seen, so they need
        not be read again); else what the answer had, and `_with_fills` reads the rest."""
        if answered and _total(answered) >= filled:
            _remember(self._fills, cid, answered)
            return answered
        seen = self._fills.get(cid)
        if seen and _total(seen) >= filled:
            if seen[0].symbol == symbol:  # one order's fills are remembered under one spelling
                return seen
            return tuple(dataclasses.replace(f, symbol=symbol) for f in seen)
        return answered

    def _response_fills(self, rows: Any, cid: str, symbol: str, side: Side, ts: float,
                        reduce_only: bool) -> tuple[Fill, ...]:
        """Spot FULL answers list their executions; turn them into fills."""
        if not isinstance(rows, list):
            raise MalformedResponse(f"order answer: fills is not a list: {type(rows).__name__}")
        market = self.market_type
        out = []
        for f in rows:
            if not isinstance(f, dict):
                raise MalformedResponse("order answer: a fill is not an object")
            out.append(Fill(
                client_order_id=cid, trade_id=str(_require(f.get("tradeId"), "fill tradeId")), engine="",
                market=market, symbol=symbol, side=side, amount=_dec(f.get("qty"), "fill qty"),
                price=_dec(f.get("price"), "fill price"), fee=_dec_or(f.get("commission"), ZERO, "fill fee"),
                fee_asset=str(f.get("commissionAsset") or ""), ts=ts, reduce_only=reduce_only,
            ))
        return tuple(out)

    def _algo_waiting_update(self, raw: Any, symbol: str) -> OrderUpdate:
        """A conditional order as the algo endpoints describe it, before it has fired."""
        info = _info(raw, "algo order")
        cid, oid = info.get("clientAlgoId"), info.get("algoId")
        if not cid or oid is None:
            raise MalformedResponse("algo order answer lacks its ids")
        status = str(info.get("algoStatus") or "NEW")
        state = _ALGO_DONE.get(status, OrderState.OPEN)
        if str(cid) not in self._reduce_only:
            _remember(self._reduce_only, str(cid), bool(info.get("reduceOnly")))
        return OrderUpdate(
            client_order_id=str(cid),
            exchange_order_id=str(oid),
            symbol=symbol,
            side=_side(info.get("side")),
            order_type=OrderType.STOP_MARKET,
            amount=_dec(info.get("quantity"), "quantity"),
            filled=ZERO,
            avg_price=None,
            state=state,
            ts=_ts(info.get("updateTime") or info.get("createTime"), self.clock.now()),
            reduce_only=bool(info.get("reduceOnly")),
        )

    async def _algo_update(self, info: dict[str, Any], symbol: str, sym: str) -> OrderUpdate:
        """A conditional order; once it has fired, its execution is the actual order it created."""
        waiting = self._algo_waiting_update({"info": info}, symbol)
        status = str(info.get("algoStatus") or "NEW")
        actual_id = str(info.get("actualOrderId") or "")
        if status in _ALGO_WAITING or status in _ALGO_DONE or not actual_id:
            return waiting
        actual = await self._read(
            "fetch_order", lambda: self._fetch_regular(sym, symbol, {"orderId": actual_id})
        )
        _remember(self._order_ids, actual.exchange_order_id, waiting.client_order_id)
        merged = OrderUpdate(
            client_order_id=waiting.client_order_id,
            exchange_order_id=waiting.exchange_order_id,
            symbol=symbol,
            side=waiting.side,
            order_type=OrderType.STOP_MARKET,
            amount=waiting.amount,
            filled=actual.filled,
            avg_price=actual.avg_price,
            state=actual.state,
            ts=actual.ts,
            reduce_only=waiting.reduce_only,
        )
        fills = await self._order_fills(symbol, sym, actual.exchange_order_id, merged)
        return dataclasses.replace(merged, fills=fills)

    async def _with_fills(self, update: OrderUpdate, symbol: str) -> OrderUpdate:
        """Attach every execution of the order: the ledger builds positions from fills, so an update
        that reports a filled amount must carry the fills that make it up."""
        if not _lacks_fills(update):
            return update
        fills = await self._order_fills(symbol, self._resolve(symbol), update.exchange_order_id, update)
        _remember(self._fills, update.client_order_id, fills)
        return dataclasses.replace(update, fills=fills)

    async def _order_fills(self, symbol: str, sym: str, order_id: str, update: OrderUpdate) -> tuple[Fill, ...]:
        request = {"symbol": self._market_ids[sym], "orderId": order_id, "limit": _TRADE_PAGE}

        async def call() -> tuple[Fill, ...]:
            rows = _as_list(await self._get_trades(request), "fetch_my_trades")
            fills = tuple(self._trade_fill(t, symbol, update.client_order_id, update.reduce_only) for t in rows)
            if _total(fills) < update.filled:
                # The trade list lags the order's executed amount for a moment: read again.
                raise TemporaryError(f"fills of order {order_id} not all visible yet")
            return fills

        return await self._read("fetch_order_trades", call)

    def _trade_fill(self, info: dict[str, Any], symbol: str, cid: str, reduce_only: bool) -> Fill:
        """One execution as the exchange wrote it (spot myTrades or futures userTrades row)."""
        side = info.get("side")
        if side is None:
            side = "BUY" if info.get("isBuyer") else "SELL"
        return Fill(
            client_order_id=cid,
            trade_id=str(_require(info.get("id"), "trade id")),
            engine="",
            market=self.market_type,
            symbol=symbol,
            side=_side(side),
            amount=_dec(info.get("qty"), "trade qty"),
            price=_dec(info.get("price"), "trade price"),
            fee=_dec_or(info.get("commission"), ZERO),
            fee_asset=str(info.get("commissionAsset") or ""),
            ts=_ts(info.get("time"), self.clock.now()),
            reduce_only=reduce_only,
        )

    # --- trades, balance, positions ------------------------------------------------------------------

    async def fetch_my_trades(self, symbol: str, since: float | None = None) -> list[Fill]:
        """Our executions in `symbol` since `since` (epoch seconds), oldest first, each tied to its
        client order id (looked up by order id when not yet known). `engine` is left empty for the
        caller to fill in."""
        self._require_private("fetch_my_trades")
        sym = self._resolve(symbol)
        if since is not None and self.market_type is MarketType.FUTURES:
            raws = await self._futures_trade_rows(sym, int(since * 1000))
        else:
            raws = await self._trade_rows(sym, None if since is None else int(since * 1000))
        fills: list[Fill] = []
        for raw in raws:
            info = _info(raw, "trade")
            order_id = str(_require(info.get("orderId"), "trade orderId"))
            cid = self._order_ids.get(order_id)
            if cid is None:
                owner = await self._read(
                    "fetch_order", partial(self._fetch_regular, sym, symbol, {"orderId": order_id})
                )
                cid = owner.client_order_id
            fills.append(self._trade_fill(info, symbol, cid, self._reduce_only.get(cid, False)))
        fills.sort(key=lambda f: (f.ts, f.trade_id))
        return fills

    async def _trade_rows(self, sym: str, start: int | None) -> list[dict[str, Any]]:
        """Trades from `start` (ms; the most recent without it), a page after another by trade id."""
        raws: list[dict[str, Any]] = []
        seen: set[int] = set()
        params: dict[str, Any] = {}
        for _ in range(_MAX_TRADE_PAGES):
            page, ids = await self._read("fetch_my_trades", partial(self._trade_page, sym, start, dict(params)))
            fresh = [t for t, i in zip(page, ids, strict=True) if i not in seen]
            seen.update(ids)
            raws.extend(fresh)
            if len(page) < _TRADE_PAGE or not fresh:
                break
            # Next page by trade id: startTime and fromId cannot be combined.
            start = None
            params = {"fromId": max(ids) + 1}
        return raws

    async def _futures_trade_rows(self, sym: str, start: int) -> list[dict[str, Any]]:
        """USD-M trades from `start` (ms) to now, a week at a time (see _FUTURES_TRADE_WINDOW_MS): with
        only a start, a quiet first week would end the walk and every later fill would be missed. Within
        a week a full page is followed from its newest trade's time (repeats are dropped by id)."""
        now = int(self.clock.now() * 1000)
        raws: list[dict[str, Any]] = []
        seen: set[int] = set()
        for _ in range(_MAX_TRADE_REQUESTS):
            if start > now:
                return raws
            end = min(start + _FUTURES_TRADE_WINDOW_MS - 1, now)
            page, ids = await self._read("fetch_my_trades", partial(self._trade_page, sym, start, {"endTime": end}))
            fresh = [t for t, i in zip(page, ids, strict=True) if i not in seen]
            seen.update(ids)
            raws.extend(fresh)
            newest = max((int(_info(t, "trade").get("time") or 0) for t in page), default=start)
            start = newest if len(page) >= _TRADE_PAGE and fresh and newest > start else end + 1
        raise DependencyError(f"{sym}: more trade history since the start than {_MAX_TRADE_REQUESTS} requests read")

    async def _trade_page(
        self, sym: str, start: int | None, params: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[int]]:
        page = _as_list(await self._ex.fetch_my_trades(sym, start, _TRADE_PAGE, params), "fetch_my_trades")
        ids = []
        for t in page:
            info = _info(t, "trade")
            _require(info.get("orderId"), "trade orderId")
            ids.append(int(_require(info.get("id"), "trade id")))
        return page, ids

    async def fetch_balance(self) -> Balance:
        """Free and total per asset. `equity` is in the quote asset: for futures the margin balance
        (wallet plus unrealized P&L); for spot the quote asset plus every other asset valued at its
        last price against the quote (assets without such a market are not counted)."""
        self._require_private("fetch_balance")
        async def call() -> Balance:
            info = _info(await self._ex.fetch_balance(), "fetch_balance")
            if self.market_type is MarketType.FUTURES:
                return self._futures_balance(info)
            return self._spot_holdings(info)

        balance = await self._read("fetch_balance", call)
        if self.market_type is MarketType.FUTURES:
            return balance
        return await self._valued(balance)

    def _spot_holdings(self, info: dict[str, Any]) -> Balance:
        rows = info.get("balances")
        if not isinstance(rows, list):
            raise MalformedResponse("spot account: no balances")
        free: dict[str, Decimal] = {}
        total: dict[str, Decimal] = {}
        for row in rows:
            asset = str(row.get("asset"))
            f = _dec(row.get("free"), f"{asset} free")
            t = f + _dec(row.get("locked"), f"{asset} locked")
            if t > 0:
                free[asset] = f
                total[asset] = t
        return Balance(free=free, total=total)

    async def _valued(self, holdings: Balance) -> Balance:
        free, total = holdings.free, holdings.total
        priced = {a: f"{a}/{self.quote_asset}" for a in total if a != self.quote_asset}
        priced = {a: s for a, s in priced.items() if s in self._markets}
        prices = await self._last_prices(sorted(priced.values()))
        equity = total.get(self.quote_asset, ZERO)
        for asset, sym in priced.items():
            if sym in prices:
                equity += total[asset] * prices[sym]
        return Balance(free=free, total=total, equity=equity)

    def _futures_balance(self, info: dict[str, Any]) -> Balance:
        rows = info.get("assets")
        if not isinstance(rows, list):
            raise MalformedResponse("futures account: no assets")
        free: dict[str, Decimal] = {}
        total: dict[str, Decimal] = {}
        for row in rows:
            asset = str(row.get("asset"))
            wallet = _dec(row.get("walletBalance"), f"{asset} walletBalance")
            if wallet != 0:
                total[asset] = wallet
                free[asset] = _dec(row.get("availableBalance"), f"{asset} availableBalance")
        return Balance(free=free, total=total, equity=_dec(info.get("totalMarginBalance"), "totalMarginBalance"))

    async def fetch_positions(self) -> list[ExchangePosition]:
        """Open futures positions (spot has none)."""
        if self.market_type is not MarketType.FUTURES:
            return []
        self._require_private("fetch_positions")
        return await self._read("fetch_positions", self._positions, requests=2)

    async def _positions(self) -> list[ExchangePosition]:
        out = []
        for raw in _as_list(await self._ex.fetch_positions(), "fetch_positions"):
            info = _info(raw, "position")
            amount = _dec(info.get("positionAmt"), "positionAmt")
            if amount == 0:
                continue
            symbol = str(raw.get("symbol"))
            liq = _dec_or(info.get("liquidationPrice"), ZERO)
            isolated = _dec_or(info.get("isolatedMargin"), ZERO)
            initial = _dec_or(info.get("positionInitialMargin") or info.get("initialMargin"), ZERO)
            out.append(ExchangePosition(
                symbol=symbol,
                side=PositionSide.LONG if amount > 0 else PositionSide.SHORT,
                amount=abs(amount),
                entry_price=_dec(info.get("entryPrice"), "entryPrice"),
                leverage=self._position_leverage(symbol, info, initial),
                liquidation_price=liq if liq > 0 else None,
                unrealized_pnl=_dec_or(info.get("unRealizedProfit"), ZERO),
                margin=isolated if isolated > 0 else initial,
            ))
        return out

    def _position_leverage(self, symbol: str, info: dict[str, Any], initial: Decimal) -> int:
        """positionRisk v3 no longer reports leverage: take it from our own setup, else from the
        position's notional over its initial margin."""
        if info.get("leverage"):
            return int(_dec(info["leverage"], "leverage"))
        configured = self._setup.get(symbol, (None, ""))[0]
        if configured:
            return configured
        notional = abs(_dec_or(info.get("notional"), ZERO))
        if initial > 0 and notional > 0:
            return max(1, int((notional / initial).to_integral_value()))
        return 1

    # --- futures symbol setup -----------------------------------------------------------------------

    async def ensure_symbol_setup(
        self, symbol: str, leverage: int | None, margin_mode: Literal["isolated", "cross"] = "isolated"
    ) -> None:
        """Set margin mode and leverage for a futures symbol before its first order (cached after).
        "Already set" answers are success. A no-op for spot."""
        if self.market_type is not MarketType.FUTURES:
            return
        self._require_private("ensure_symbol_setup")
        sym = self._resolve(symbol)
        if self._is_set_up(sym, leverage, margin_mode):
            return
        cached = self._setup.get(sym)
        info = self._markets[sym]
        if leverage is not None and not 1 <= leverage <= max(info.max_leverage, 1):
            raise OrderRejected(f"{sym}: leverage {leverage} outside 1..{info.max_leverage}")
        if cached is None or cached[1] != margin_mode:
            await self._read("set_margin_mode", lambda: self._set_margin_mode(sym, margin_mode))
        if leverage is not None and (cached is None or cached[0] != leverage):
            await self._read("set_leverage", lambda: self._ex.set_leverage(leverage, sym))
        known = cached[0] if cached is not None else None
        self._setup[sym] = (leverage if leverage is not None else known, margin_mode)
        log.info("futures symbol set up", symbol=sym, leverage=self._setup[sym][0], margin_mode=margin_mode)

    def _is_set_up(self, sym: str, leverage: int | None, margin_mode: str) -> bool:
        cached = self._setup.get(sym)
        return cached is not None and cached[1] == margin_mode and (leverage is None or cached[0] == leverage)

    async def _set_margin_mode(self, sym: str, margin_mode: str) -> None:
        try:
            await self._ex.set_margin_mode(margin_mode, sym)
        except ccxt.NoChange:
            return  # "No need to change margin type.": it already is.

    # --- lifecycle ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close ccxt's HTTP session (bounded: a hung close must not hold up shutdown)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(self._ex.close(), self.timeout_seconds)

    def stats_snapshot(self) -> dict[str, Any]:
        """Counters as plain data (for /metrics and the status report)."""
        return {
            "calls": dict(self.stats.calls),
            "errors": {f"{ep}:{kind}": n for (ep, kind), n in self.stats.errors.items()},
            "errors_by_kind": dict(self.stats.errors_by_kind()),
            "retries": self.stats.retries,
            "latency_buckets": list(LATENCY_BUCKETS),
            "latency_counts": list(self.stats.latency_counts),
            "latency_sum": self.stats.latency_sum,
            "weight_spent": self.budget.stats.spent,
            "weight_waits": self.budget.stats.waits,
        }


class _Prepared(NamedTuple):
    """An order as ccxt's request builder takes it (a tuple: built once per order, read twice)."""

    ccxt_type: str
    amount: str
    price: str | None
    params: dict[str, Any]
    conditional: bool


def _point_at(ex: Any, base_url: str) -> None:
    """Send every API family to `base_url` (scheme and host), keeping each family's path."""
    target = urlsplit(base_url)
    if not target.scheme or not target.netloc:
        raise ConfigError([f"exchange URL override must look like http://host:port, got {base_url!r}"])
    api = ex.urls.get("api")
    if not isinstance(api, dict):
        raise InvariantError("ccxt exchange has no per-family API URLs")
    for key, value in list(api.items()):
        if isinstance(value, str):
            api[key] = f"{target.scheme}://{target.netloc}{urlsplit(value).path}"
    if target.scheme == "http":
        # ccxt waits 250 ms on close for TLS transports to shut down cleanly; plain HTTP has none.
        ex.timeout_on_exit = 0


def _remember(memo: dict[K, V], key: K, value: V) -> None:
    memo[key] = value
    if len(memo) > _MEMO_LIMIT:
        for old in list(memo)[: _MEMO_LIMIT // 2]:
            del memo[old]


_SIDES = {"BUY": Side.BUY, "SELL": Side.SELL, "buy": Side.BUY, "sell": Side.SELL}


def _side(value: Any) -> Side:
    side = _SIDES.get(value) if isinstance(value, str) else None
    if side is not None:
        return side
    text = str(value or "").lower()
    if text not in ("buy", "sell"):
        raise MalformedResponse(f"unknown side {value!r}")
    return Side(text)


def _positive(value: Any, what: str) -> Decimal:
    out = _dec(value, what)
    if out <= 0:
        raise MalformedResponse(f"{what} must be positive, got {value!r}")
    return out


def _total(fills: tuple[Fill, ...]) -> Decimal:
    """The amount a set of executions adds up to."""
    total = ZERO
    for f in fills:
        total += f.amount
    return total


def _lacks_fills(update: OrderUpdate) -> bool:
    """True when an update reports executions that its fills do not add up to yet."""
    return update.filled > 0 and _total(update.fills) < update.filled


def _require(value: Any, what: str) -> Any:
    if value is None or value == "":
        raise MalformedResponse(f"missing {what}")
    return value


def _as_list(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise MalformedResponse(f"{what}: expected a list, got {type(value).__name__}")
    return [v for v in value if isinstance(v, dict)]


