"""A loopback fake of Binance's spot and USD-M futures REST API, good enough for the real ccxt to trade on.

It keeps its own authoritative record (every order with its client id, every fill, balances,
positions), so tests and the chaos harness can check what the exchange *really* did, not what the
client believes. Faults are injected per request from a queue: each fault is consumed by the first
request it matches (method, path suffix, market). A fault can act before the request is processed
(the exchange never saw it) or after (the order exists, but the client gets a timeout, a dropped
connection or garbage) — the case that decides whether the daemon duplicates orders.

Private endpoints check the API key header, the HMAC-SHA256 signature of the urlencoded parameters and
the timestamp against recvWindow, as Binance does; `server_time_offset_ms` skews the fake's clock to
produce real -1021 answers.

Waiting goes through a `Clock` (a `LiveClock` by default): the fake is a network peer, so its delays
run on real time even when the code under test uses a `SimClock`.

Standalone, for a daemon running as a subprocess: `python -m tests.fakes.binance --port N` prints its
URL; `/_fake/state` (GET), `/_fake/faults` and `/_fake/price` (POST, JSON) drive it from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import signal
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from core.clock import Clock, LiveClock

API_KEY = "fake-binance-api-key-0123456789"
API_SECRET = "fake-binance-api-secret-9876543210"

Market = Literal["spot", "futures"]
FaultKind = Literal["delay", "drop", "http", "error", "duplicate", "partial", "malformed"]

SPOT_TAKER_FEE = Decimal("0.001")
FUTURES_TAKER_FEE = Decimal("0.0005")
FUTURES_MAKER_FEE = Decimal("0.0002")
RECV_WINDOW_DEFAULT = 5000


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """Real-looking filters for one symbol (values as Binance lists them for these pairs)."""

    symbol: str
    base: str
    quote: str
    spot_tick: str
    spot_step: str
    spot_min_notional: str
    spot_order_types: tuple[str, ...]
    fut_tick: str
    fut_step: str
    fut_min_notional: str
    max_leverage: int
    price: str


_SPOT_TYPES_FULL = ("LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT",
                    "TAKE_PROFIT_LIMIT")
# SOLUSDT is listed without STOP_LOSS, as some Binance pairs are: a stop there has to be STOP_LOSS_LIMIT.
_SPOT_TYPES_NO_STOP_MARKET = ("LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT")
_FUT_TYPES = ("LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET",
              "TRAILING_STOP_MARKET")

SYMBOLS: dict[str, SymbolSpec] = {
    s.symbol: s
    for s in (
        SymbolSpec("BTCUSDT", "BTC", "USDT", "0.01", "0.00001", "5", _SPOT_TYPES_FULL,
                   "0.10", "0.001", "100", 125, "60000.00"),
        SymbolSpec("ETHUSDT", "ETH", "USDT", "0.01", "0.0001", "5", _SPOT_TYPES_FULL,
                   "0.01", "0.001", "20", 100, "3000.00"),
        SymbolSpec("SOLUSDT", "SOL", "USDT", "0.01", "0.001", "5", _SPOT_TYPES_NO_STOP_MARKET,
                   "0.0100", "1", "5", 75, "150.00"),
    )
}


def exchange_symbol(symbol: str) -> str:
    """'BTC/USDT', 'BTC/USDT:USDT' or 'BTCUSDT' -> 'BTCUSDT'."""
    return symbol.split(":")[0].replace("/", "").upper()


def _s(value: Decimal) -> str:
    return format(value.normalize(), "f") if value != 0 else "0"


def _on_step(value: Decimal, step: Decimal) -> bool:
    return (value / step) == (value / step).to_integral_value()


class ApiError(Exception):
    """A Binance error answer: HTTP status plus {"code", "msg"}."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status


@dataclass(slots=True)
class Fault:
    """One injected fault, consumed by the first `count` requests it matches.

    `process`: for delay/drop/malformed, whether the request is carried out before the fault (an order
    is placed, then the answer is late, lost or garbage) or not at all.
    """

    kind: FaultKind
    path: str | None = None
    method: str | None = None
    market: Market | None = None
    seconds: float = 0.0
    status: int = 500
    code: int = 0
    msg: str = ""
    ratio: str = "0.5"
    process: bool = True
    count: int = 1

    def matches(self, method: str, path: str, market: Market) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.market is not None and self.market != market:
            return False
        return self.path is None or path == self.path or path.endswith(self.path)


@dataclass(slots=True)
class Trade:
    market: Market
    trade_id: int
    order_id: int
    symbol: str
    side: str
    price: Decimal
    qty: Decimal
    commission: Decimal
    commission_asset: str
    time_ms: int
    maker: bool = False
    realized_pnl: Decimal = Decimal(0)


@dataclass(slots=True)
class FakeOrder:
    market: Market
    order_id: int
    client_order_id: str
    symbol: str
    side: str
    type: str
    quantity: Decimal
    price: Decimal
    stop_price: Decimal
    reduce_only: bool
    time_in_force: str
    status: str
    time_ms: int
    update_ms: int
    executed: Decimal = Decimal(0)
    cum_quote: Decimal = Decimal(0)
    quote_order_qty: Decimal = Decimal(0)
    algo: bool = False
    actual_order_id: int | None = None
    trades: list[Trade] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.status in ("NEW", "PARTIALLY_FILLED")

    @property
    def avg_price(self) -> Decimal:
        return self.cum_quote / self.executed if self.executed else Decimal(0)


@dataclass(slots=True)
class FakePosition:
    amount: Decimal = Decimal(0)  # signed: long > 0, short < 0
    entry: Decimal = Decimal(0)
    update_ms: int = 0


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    params: dict[str, str]
    market: Market
    status: int = 0


Handler = Callable[["FakeBinance", dict[str, str], Market], Awaitable[Any]]


class FakeBinance:
    """The fake exchange. `async with FakeBinance() as fake:` serves on 127.0.0.1, a random port."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        api_secret: str = API_SECRET,
        clock: Clock | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.clock: Clock = clock or LiveClock()
        self.host = host
        self.port = port
        self.url = ""
        self.server_time_offset_ms = 0
        self.prices: dict[str, Decimal] = {s: Decimal(spec.price) for s, spec in SYMBOLS.items()}
        self.spot_balances: dict[str, list[Decimal]] = {"USDT": [Decimal("10000"), Decimal(0)]}
        self.futures_wallet = Decimal("10000")
        self.positions: dict[str, FakePosition] = {}
        self.leverage: dict[str, int] = dict.fromkeys(SYMBOLS, 20)
        self.margin_type: dict[str, str] = dict.fromkeys(SYMBOLS, "CROSSED")
        self.orders: dict[tuple[Market, int], FakeOrder] = {}
        self.trades: list[Trade] = []
        self.faults: list[Fault] = []
        self.requests: list[RequestRecord] = []
        self.create_calls: list[tuple[Market, str]] = []
        self._ids = itertools.count(10_000)
        self._trade_ids = itertools.count(500_000)
        self._stopping = asyncio.Event()
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeBinance:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what tests use ---------------------------------------------------------------------------

    def inject(self, kind: FaultKind, **kw: Any) -> Fault:
        fault = Fault(kind=kind, **kw)
        self.faults.append(fault)
        return fault

    @property
    def orders_by_client_id(self) -> dict[str, FakeOrder]:
        return {o.client_order_id: o for o in self.orders.values()}

    def create_count(self, client_order_id: str) -> int:
        return sum(1 for _, cid in self.create_calls if cid == client_order_id)

    def calls(self, path_suffix: str, method: str | None = None) -> list[RequestRecord]:
        return [
            r for r in self.requests
            if r.path.endswith(path_suffix) and (method is None or r.method == method.upper())
        ]

    async def wait_for_request(self, path_suffix: str, method: str | None = None, count: int = 1,
                               timeout: float = 5.0) -> None:
        """Wait (on the fake's clock, bounded) until `count` matching requests have arrived."""
        async def seen() -> None:
            while len(self.calls(path_suffix, method)) < count:
                await self._arrived.wait()

        await self.clock.wait_for(seen(), timeout)

    def set_spot_balance(self, asset: str, free: Decimal | str) -> None:
        self.spot_balances[asset] = [Decimal(free), Decimal(0)]

    def set_price(self, symbol: str, price: Decimal | str) -> None:
        """Move the market; resting limit orders and stops that the move crosses execute."""
        sym = exchange_symbol(symbol)
        self.prices[sym] = Decimal(price)
        for order in list(self.orders.values()):
            if order.symbol == sym and order.is_open:
                self._maybe_trigger(order)

    def fill_order(self, client_order_id: str, qty: Decimal | str | None = None,
                   price: Decimal | str | None = None, market: Market | None = None) -> FakeOrder:
        """Execute (part of) a resting order, as if the book had traded against it."""
        order = next(
            o for o in self.orders.values()
            if o.client_order_id == client_order_id and (market is None or o.market == market)
        )
        remaining = order.quantity - order.executed
        amount = remaining if qty is None else min(Decimal(qty), remaining)
        at = Decimal(price) if price is not None else (order.price or self.prices[order.symbol])
        self._execute(order, amount, at, maker=True)
        return order

    def state(self) -> dict[str, Any]:
        """Everything the fake knows, JSON-friendly (for the chaos harness)."""
        def plain(obj: Any) -> Any:
            if isinstance(obj, Decimal):
                return _s(obj)
            if isinstance(obj, dict):
                return {str(k): plain(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return [plain(v) for v in obj]
            return obj

        out: dict[str, Any] = plain({
            "orders": [asdict(o) for o in self.orders.values()],
            "trades": [asdict(t) for t in self.trades],
            "spot_balances": self.spot_balances,
            "futures_wallet": self.futures_wallet,
            "positions": {s: asdict(p) for s, p in self.positions.items() if p.amount != 0},
            "leverage": self.leverage,
            "margin_type": self.margin_type,
            "create_calls": [list(c) for c in self.create_calls],
            "prices": self.prices,
        })
        return out

    # --- request pipeline -------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000) + self.server_time_offset_ms

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_fake/"):
            return await self._control(request)
        market: Market = "futures" if path.startswith("/fapi/") else "spot"
        raw = (await request.text()) if request.method == "POST" else request.query_string
        params = dict(parse_qsl(raw, keep_blank_values=True))
        record = RequestRecord(request.method, path, dict(params), market)
        self.requests.append(record)
        self._arrived.set()
        self._arrived = asyncio.Event()
        if request.method == "POST" and path.endswith(("/order", "/algoOrder")):
            cid = params.get("newClientOrderId") or params.get("clientAlgoId") or ""
            self.create_calls.append((market, cid))
        fault = self._take_fault(request.method, path, market)
        response = await self._answer(request, path, raw, params, market, fault)
        record.status = response.status
        return response

    def _take_fault(self, method: str, path: str, market: Market) -> Fault | None:
        for fault in self.faults:
            if fault.count > 0 and fault.matches(method, path, market):
                fault.count -= 1
                if fault.count == 0:
                    self.faults.remove(fault)
                return fault
        return None

    async def _answer(self, request: web.Request, path: str, raw: str, params: dict[str, str],
                      market: Market, fault: Fault | None) -> web.StreamResponse:
        if fault is not None and not fault.process:
            if fault.kind == "delay":
                await self._pause(fault.seconds)
            elif fault.kind == "drop":
                return self._drop(request)
            elif fault.kind == "malformed":
                return self._malformed()
        if fault is not None and fault.kind == "http":
            return self._http_error(fault.status)
        if fault is not None and fault.kind == "error":
            return _error(ApiError(fault.code, fault.msg, fault.status))
        route = _ROUTES.get((request.method, path))
        if route is None:
            return _error(ApiError(-1000, f"fake: no route {request.method} {path}", 404))
        handler, signed = route
        try:
            if signed:
                self._authenticate(request, raw, params)
            if fault is not None and fault.kind == "partial":
                params["_partial"] = fault.ratio
            if fault is not None and fault.kind == "duplicate":
                await handler(self, params, market)
                raise _duplicate(market)
            body = await handler(self, params, market)
        except ApiError as exc:
            return _error(exc)
        if fault is not None and fault.process:
            if fault.kind == "delay":
                await self._pause(fault.seconds)
            elif fault.kind == "drop":
                return self._drop(request)
            elif fault.kind == "malformed":
                return self._malformed()
        return web.json_response(body)

    async def _pause(self, seconds: float) -> None:
        """A slow exchange; cut short when the fake stops, so a test's teardown never waits it out."""
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(self._stopping.wait(), seconds)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Nothing reaches the client: the transport is gone before this answer is written.
        return web.Response(status=200, text="")

    @staticmethod
    def _malformed() -> web.Response:
        return web.Response(status=200, text="<html><body>upstream hiccup</body></html>",
                            content_type="text/html")

    @staticmethod
    def _http_error(status: int) -> web.Response:
        if status in (429, 418):
            body = json.dumps({"code": -1003, "msg": "Too many requests; current limit is 6000 weight."})
            return web.Response(status=status, text=body, content_type="application/json",
                                headers={"Retry-After": "1"})
        if status == 504:
            return web.Response(status=504, text="")
        return web.Response(status=status, text=f"<html>{status} upstream error</html>",
                            content_type="text/html")

    def _authenticate(self, request: web.Request, raw: str, params: dict[str, str]) -> None:
        if request.headers.get("X-MBX-APIKEY") != self.api_key:
            raise ApiError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        payload, sep, signature = raw.rpartition("&signature=")
        expected = hmac.new(self.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not sep or not hmac.compare_digest(signature, expected):
            raise ApiError(-1022, "Signature for this request is not valid.")
        params.pop("signature", None)
        try:
            ts = int(params["timestamp"])
        except (KeyError, ValueError):
            raise ApiError(-1102, "Mandatory parameter 'timestamp' was not sent.") from None
        window = int(params.get("recvWindow", RECV_WINDOW_DEFAULT))
        now = self._now_ms()
        if ts >= now + 1000 or now - ts > window:
            raise ApiError(-1021, "Timestamp for this request is outside of the recvWindow.")

    async def _control(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/_fake/state":
            return web.json_response(self.state())
        body = await request.json()
        if request.path == "/_fake/faults":
            for item in body if isinstance(body, list) else [body]:
                self.inject(**item)
            return web.json_response({"faults": len(self.faults)})
        if request.path == "/_fake/price":
            self.set_price(body["symbol"], body["price"])
            return web.json_response({"ok": True})
        return web.json_response({"error": "unknown control path"}, status=404)

    # --- market data --------------------------------------------------------------------------------

    def _spec(self, symbol: str | None) -> SymbolSpec:
        spec = SYMBOLS.get(symbol or "")
        if spec is None:
            raise ApiError(-1121, "Invalid symbol.")
        return spec

    async def time(self, params: dict[str, str], market: Market) -> Any:
        return {"serverTime": self._now_ms()}

    async def exchange_info(self, params: dict[str, str], market: Market) -> Any:
        symbols = [self._spot_symbol(s) if market == "spot" else self._futures_symbol(s)
                   for s in SYMBOLS.values()]
        return {
            "timezone": "UTC",
            "serverTime": self._now_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                 "limit": 6000 if market == "spot" else 2400},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            ],
            "exchangeFilters": [],
            **({"assets": [{"asset": "USDT", "marginAvailable": True}]} if market == "futures" else {}),
            "symbols": symbols,
        }

    @staticmethod
    def _spot_symbol(spec: SymbolSpec) -> dict[str, Any]:
        return {
            "symbol": spec.symbol, "status": "TRADING", "baseAsset": spec.base, "baseAssetPrecision": 8,
            "quoteAsset": spec.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
            "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
            "orderTypes": list(spec.spot_order_types), "icebergAllowed": True, "ocoAllowed": True,
            "otoAllowed": True, "quoteOrderQtyMarketAllowed": True, "allowTrailingStop": True,
            "cancelReplaceAllowed": True, "isSpotTradingAllowed": True, "isMarginTradingAllowed": True,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": spec.spot_tick, "maxPrice": "1000000.00",
                 "tickSize": spec.spot_tick},
                {"filterType": "LOT_SIZE", "minQty": spec.spot_step, "maxQty": "9000.00000000",
                 "stepSize": spec.spot_step},
                {"filterType": "ICEBERG_PARTS", "limit": 10},
                {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000", "maxQty": "100.0",
                 "stepSize": "0.00000000"},
                {"filterType": "TRAILING_DELTA", "minTrailingAboveDelta": 10, "maxTrailingAboveDelta": 2000,
                 "minTrailingBelowDelta": 10, "maxTrailingBelowDelta": 2000},
                {"filterType": "PERCENT_PRICE_BY_SIDE", "bidMultiplierUp": "5", "bidMultiplierDown": "0.2",
                 "askMultiplierUp": "5", "askMultiplierDown": "0.2", "avgPriceMins": 5},
                {"filterType": "NOTIONAL", "minNotional": spec.spot_min_notional, "applyMinToMarket": True,
                 "maxNotional": "9000000.00", "applyMaxToMarket": False, "avgPriceMins": 5},
                {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
            ],
            "permissions": [], "permissionSets": [["SPOT", "MARGIN"]],
            "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
            "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
        }

    @staticmethod
    def _futures_symbol(spec: SymbolSpec) -> dict[str, Any]:
        return {
            "symbol": spec.symbol, "pair": spec.symbol, "contractType": "PERPETUAL",
            "deliveryDate": 4133404800000, "onboardDate": 1569398400000, "status": "TRADING",
            "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000",
            "baseAsset": spec.base, "quoteAsset": spec.quote, "marginAsset": spec.quote,
            "pricePrecision": 2, "quantityPrecision": 3, "baseAssetPrecision": 8, "quotePrecision": 8,
            "underlyingType": "COIN", "underlyingSubType": ["PoW"], "settlePlan": 0,
            "triggerProtect": "0.0500", "liquidationFee": "0.012500", "marketTakeBound": "0.05",
            "maxMoveOrderLimit": 10000,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": "0.10", "maxPrice": "4529764",
                 "tickSize": spec.fut_tick},
                {"filterType": "LOT_SIZE", "minQty": spec.fut_step, "maxQty": "1000",
                 "stepSize": spec.fut_step},
                {"filterType": "MARKET_LOT_SIZE", "minQty": spec.fut_step, "maxQty": "120",
                 "stepSize": spec.fut_step},
                {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
                {"filterType": "MIN_NOTIONAL", "notional": spec.fut_min_notional},
                {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
                 "multiplierDecimal": "4"},
            ],
            "orderTypes": list(_FUT_TYPES),
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
        }

    def _book(self, symbol: str, market: Market) -> tuple[Decimal, Decimal, Decimal]:
        spec = self._spec(symbol)
        tick = Decimal(spec.spot_tick if market == "spot" else spec.fut_tick)
        price = self.prices[symbol]
        return price - tick, price + tick, price

    async def ticker_24hr(self, params: dict[str, str], market: Market) -> Any:
        if "symbol" in params:
            return self._ticker(params["symbol"], market)
        wanted = json.loads(params["symbols"]) if "symbols" in params else list(SYMBOLS)
        return [self._ticker(s, market) for s in wanted]

    def _ticker(self, symbol: str, market: Market) -> dict[str, Any]:
        bid, ask, last = self._book(symbol, market)
        now = self._now_ms()
        open_price = last * Decimal("0.98")
        out: dict[str, Any] = {
            "symbol": symbol, "priceChange": _s(last - open_price), "priceChangePercent": "2.041",
            "weightedAvgPrice": _s(last), "lastPrice": _s(last), "lastQty": "0.01",
            "openPrice": _s(open_price), "highPrice": _s(last * Decimal("1.01")),
            "lowPrice": _s(open_price * Decimal("0.99")), "volume": "12345.678",
            "quoteVolume": _s((last * Decimal("12345.678")).quantize(Decimal("0.01"))),
            "openTime": now - 86_400_000, "closeTime": now, "firstId": 1, "lastId": 1000, "count": 1000,
        }
        if market == "spot":
            out |= {"prevClosePrice": _s(open_price), "bidPrice": _s(bid), "bidQty": "1.5",
                    "askPrice": _s(ask), "askQty": "2.0"}
        return out

    async def book_ticker(self, params: dict[str, str], market: Market) -> Any:
        def one(symbol: str) -> dict[str, Any]:
            bid, ask, _ = self._book(symbol, market)
            return {"symbol": symbol, "bidPrice": _s(bid), "bidQty": "1.5", "askPrice": _s(ask),
                    "askQty": "2.0", "time": self._now_ms()}
        if "symbol" in params:
            return one(params["symbol"])
        return [one(s) for s in SYMBOLS]

    async def klines(self, params: dict[str, str], market: Market) -> Any:
        symbol = self._spec(params.get("symbol")).symbol
        step_ms = _INTERVAL_MS.get(params.get("interval", "5m"), 300_000)
        limit = min(int(params.get("limit", "500")), 1500)
        end = int(params["endTime"]) if "endTime" in params else self._now_ms()
        start = (end // step_ms - limit + 1) * step_ms
        if "startTime" in params:
            start = max(start, int(params["startTime"]) // step_ms * step_ms)
        last = self.prices[symbol]
        rows: list[list[Any]] = []
        for i, t in enumerate(range(start, end + 1, step_ms)):
            if len(rows) >= limit:
                break
            drift = Decimal(1) + Decimal((i % 7) - 3) / Decimal(1000)
            close = (last * drift).quantize(Decimal("0.01"))
            open_ = (close * Decimal("0.999")).quantize(Decimal("0.01"))
            rows.append([t, _s(open_), _s(close * Decimal("1.002")), _s(open_ * Decimal("0.998")),
                         _s(close), "10.5", t + step_ms - 1, "630000.0", 100, "5.0", "300000.0", "0"])
        return rows

    # --- account ----------------------------------------------------------------------------------

    async def spot_account(self, params: dict[str, str], market: Market) -> Any:
        return {
            "makerCommission": 10, "takerCommission": 10, "buyerCommission": 0, "sellerCommission": 0,
            "commissionRates": {"maker": "0.00100000", "taker": "0.00100000", "buyer": "0", "seller": "0"},
            "canTrade": True, "canWithdraw": True, "canDeposit": True, "brokered": False,
            "requireSelfTradePrevention": False, "preventSor": False, "updateTime": self._now_ms(),
            "accountType": "SPOT",
            "balances": [{"asset": a, "free": _s(f), "locked": _s(lk)}
                         for a, (f, lk) in self.spot_balances.items()],
            "permissions": ["SPOT"], "uid": 354937868,
        }

    def _unrealized(self, symbol: str, pos: FakePosition) -> Decimal:
        return (self.prices[symbol] - pos.entry) * pos.amount

    def _initial_margin(self, symbol: str, pos: FakePosition) -> Decimal:
        return abs(pos.amount) * self.prices[symbol] / self.leverage[symbol]

    def _open_order_margin(self) -> Decimal:
        total = Decimal(0)
        for o in self.orders.values():
            if o.market == "futures" and o.is_open and not o.algo and not o.reduce_only:
                total += (o.quantity - o.executed) * o.price / self.leverage[o.symbol]
        return total

    def _futures_available(self) -> Decimal:
        unrealized = sum((self._unrealized(s, p) for s, p in self.positions.items()), Decimal(0))
        used = sum((self._initial_margin(s, p) for s, p in self.positions.items()), Decimal(0))
        return self.futures_wallet + unrealized - used - self._open_order_margin()

    async def futures_account(self, params: dict[str, str], market: Market) -> Any:
        unrealized = sum((self._unrealized(s, p) for s, p in self.positions.items()), Decimal(0))
        used = sum((self._initial_margin(s, p) for s, p in self.positions.items()), Decimal(0))
        available = self._futures_available()
        now = self._now_ms()
        margin_balance = self.futures_wallet + unrealized
        return {
            "totalInitialMargin": _s(used), "totalMaintMargin": _s(used / 10),
            "totalWalletBalance": _s(self.futures_wallet), "totalUnrealizedProfit": _s(unrealized),
            "totalMarginBalance": _s(margin_balance), "totalPositionInitialMargin": _s(used),
            "totalOpenOrderInitialMargin": _s(self._open_order_margin()),
            "totalCrossWalletBalance": _s(self.futures_wallet), "totalCrossUnPnl": _s(unrealized),
            "availableBalance": _s(available), "maxWithdrawAmount": _s(available),
            "assets": [{
                "asset": "USDT", "walletBalance": _s(self.futures_wallet), "unrealizedProfit": _s(unrealized),
                "marginBalance": _s(margin_balance), "maintMargin": _s(used / 10),
                "initialMargin": _s(used), "positionInitialMargin": _s(used),
                "openOrderInitialMargin": _s(self._open_order_margin()),
                "crossWalletBalance": _s(self.futures_wallet), "crossUnPnl": _s(unrealized),
                "availableBalance": _s(available), "maxWithdrawAmount": _s(available), "updateTime": now,
            }],
            "positions": [self._position_row(s, p) for s, p in self.positions.items() if p.amount != 0],
        }

    def _position_row(self, symbol: str, pos: FakePosition) -> dict[str, Any]:
        mark = self.prices[symbol]
        margin = self._initial_margin(symbol, pos)
        isolated = self.margin_type[symbol] == "ISOLATED"
        lev = Decimal(self.leverage[symbol])
        if pos.amount > 0:
            liq = pos.entry * (1 - 1 / lev + Decimal("0.004"))
        else:
            liq = pos.entry * (1 + 1 / lev - Decimal("0.004"))
        unrealized = self._unrealized(symbol, pos)
        return {
            "symbol": symbol, "positionSide": "BOTH", "positionAmt": _s(pos.amount),
            "entryPrice": _s(pos.entry), "breakEvenPrice": _s(pos.entry), "markPrice": _s(mark),
            "unRealizedProfit": _s(unrealized), "liquidationPrice": _s(liq.quantize(Decimal("0.01"))),
            "isolatedMargin": _s(margin + unrealized) if isolated else "0",
            "notional": _s(pos.amount * mark), "marginAsset": "USDT",
            "isolatedWallet": _s(margin) if isolated else "0", "initialMargin": _s(margin),
            "maintMargin": _s(margin / 10), "positionInitialMargin": _s(margin),
            "openOrderInitialMargin": "0", "adl": 1, "bidNotional": "0", "askNotional": "0",
            "updateTime": pos.update_ms,
        }

    async def position_risk(self, params: dict[str, str], market: Market) -> Any:
        wanted = params.get("symbol")
        return [self._position_row(s, p) for s, p in self.positions.items()
                if p.amount != 0 and (wanted is None or s == wanted)]

    async def leverage_bracket(self, params: dict[str, str], market: Market) -> Any:
        def brackets(spec: SymbolSpec) -> dict[str, Any]:
            caps = [(spec.max_leverage, 50_000, 0, "0.004"), (max(spec.max_leverage // 2, 1), 500_000,
                                                               50_000, "0.005"),
                    (10, 10_000_000, 500_000, "0.01")]
            return {"symbol": spec.symbol, "notionalCoef": 1.0, "brackets": [
                {"bracket": i + 1, "initialLeverage": lev, "notionalCap": cap, "notionalFloor": floor,
                 "maintMarginRatio": float(mmr), "cum": 0.0}
                for i, (lev, cap, floor, mmr) in enumerate(caps)]}
        if "symbol" in params:
            return [brackets(self._spec(params["symbol"]))]
        return [brackets(s) for s in SYMBOLS.values()]

    async def set_leverage(self, params: dict[str, str], market: Market) -> Any:
        spec = self._spec(params.get("symbol"))
        lev = int(params["leverage"])
        if not 1 <= lev <= spec.max_leverage:
            raise ApiError(-4028, f"Leverage {lev} is not valid")
        pos = self.positions.get(spec.symbol)
        if (pos is not None and pos.amount != 0 and self.margin_type[spec.symbol] == "ISOLATED"
                and lev < self.leverage[spec.symbol]):
            raise ApiError(-4161, "Leverage reduction is not supported in Isolated Margin Mode with open "
                                  "positions.")
        self.leverage[spec.symbol] = lev
        return {"leverage": lev, "maxNotionalValue": "50000", "symbol": spec.symbol}

    async def set_margin_type(self, params: dict[str, str], market: Market) -> Any:
        spec = self._spec(params.get("symbol"))
        wanted = params.get("marginType", "").upper()
        if wanted not in ("ISOLATED", "CROSSED"):
            raise ApiError(-1116, "Invalid marginType.")
        if self.margin_type[spec.symbol] == wanted:
            raise ApiError(-4046, "No need to change margin type.")
        pos = self.positions.get(spec.symbol)
        if pos is not None and pos.amount != 0:
            raise ApiError(-4048, "Margin type cannot be changed if there exists position.")
        self.margin_type[spec.symbol] = wanted
        return {"code": 200, "msg": "success"}

    # --- orders -----------------------------------------------------------------------------------

    def _find(self, market: Market, params: dict[str, str], *, algo: bool = False) -> FakeOrder | None:
        cid = params.get("origClientOrderId") or params.get("clientAlgoId")
        oid = params.get("orderId") or params.get("algoId")
        symbol = params.get("symbol")
        for order in self.orders.values():
            if order.market != market or order.algo != algo:
                continue
            if symbol is not None and order.symbol != symbol:
                continue
            if (cid is not None and order.client_order_id == cid) or (
                cid is None and oid is not None and str(order.order_id) == oid
            ):
                return order
        return None

    def _check_filters(self, spec: SymbolSpec, market: Market, qty: Decimal, price: Decimal | None,
                       reference: Decimal, reduce_only: bool) -> None:
        step = Decimal(spec.spot_step if market == "spot" else spec.fut_step)
        tick = Decimal(spec.spot_tick if market == "spot" else spec.fut_tick)
        if qty <= 0:
            raise ApiError(-4003 if market == "futures" else -1013, "Quantity less than or equal to zero.")
        if qty < step or not _on_step(qty, step):
            raise ApiError(-1013 if market == "spot" else -1111, "Filter failure: LOT_SIZE")
        if price is not None and (price <= 0 or not _on_step(price, tick)):
            raise ApiError(-1013 if market == "spot" else -1111, "Filter failure: PRICE_FILTER")
        notional = qty * reference
        if market == "spot" and notional < Decimal(spec.spot_min_notional):
            raise ApiError(-1013, "Filter failure: NOTIONAL")
        if market == "futures" and not reduce_only and notional < Decimal(spec.fut_min_notional):
            raise ApiError(-4164, f"Order's notional must be no smaller than {spec.fut_min_notional} "
                                  "(unless you choose reduce only).")

    def _new_order(self, market: Market, spec: SymbolSpec, params: dict[str, str], *, algo: bool,
                   order_type: str, qty: Decimal, price: Decimal, stop: Decimal,
                   cid: str) -> FakeOrder:
        now = self._now_ms()
        order = FakeOrder(
            market=market, order_id=next(self._ids), client_order_id=cid, symbol=spec.symbol,
            side=params.get("side", "").upper(), type=order_type, quantity=qty, price=price,
            stop_price=stop, reduce_only=params.get("reduceOnly", "false").lower() == "true",
            time_in_force=params.get("timeInForce", "GTC"), status="NEW", time_ms=now, update_ms=now,
            algo=algo,
        )
        if order.side not in ("BUY", "SELL"):
            raise ApiError(-1102, "Mandatory parameter 'side' was not sent, was empty/null, or malformed.")
        return order

    async def spot_new_order(self, params: dict[str, str], market: Market) -> Any:
        spec = self._spec(params.get("symbol"))
        order_type = params.get("type", "").upper()
        if order_type not in spec.spot_order_types:
            raise ApiError(-1116, "Invalid orderType.")
        cid = params.get("newClientOrderId") or f"fake-{next(self._ids)}"
        if any(o.market == "spot" and o.client_order_id == cid for o in self.orders.values()):
            raise ApiError(-2010, "Duplicate order sent.")
        price = Decimal(params.get("price", "0"))
        stop = Decimal(params.get("stopPrice", "0"))
        last = self.prices[spec.symbol]
        quote_qty = Decimal(params.get("quoteOrderQty", "0"))
        if order_type == "MARKET" and quote_qty > 0:
            step = Decimal(spec.spot_step)
            qty = (quote_qty / last / step).to_integral_value(rounding=ROUND_DOWN) * step
        else:
            qty = Decimal(params.get("quantity", "0"))
        reference = price if order_type in ("LIMIT", "LIMIT_MAKER", "STOP_LOSS_LIMIT") else last
        self._check_filters(spec, "spot", qty, price if price else None, reference, False)
        order = self._new_order("spot", spec, params, algo=False, order_type=order_type, qty=qty,
                                price=price, stop=stop, cid=cid)
        order.quote_order_qty = quote_qty
        if order_type in ("STOP_LOSS", "STOP_LOSS_LIMIT"):
            hit = last >= stop if order.side == "BUY" else last <= stop
            if stop <= 0 or hit:
                raise ApiError(-2010, "Stop price would trigger immediately.")
        self._reserve_spot(order, spec, reference)
        self.orders[("spot", order.order_id)] = order
        if order_type == "MARKET":
            self._market_fill(order, params)
        else:
            self._maybe_trigger(order)
        return self._spot_response(order, params.get("newOrderRespType", "FULL"))

    def _reserve_spot(self, order: FakeOrder, spec: SymbolSpec, reference: Decimal) -> None:
        if order.side == "BUY":
            asset, need = spec.quote, order.quantity * reference
        else:
            asset, need = spec.base, order.quantity
        free, locked = self.spot_balances.get(asset, [Decimal(0), Decimal(0)])
        if free < need:
            raise ApiError(-2010, "Account has insufficient balance for requested action.")
        if order.type != "MARKET":
            self.spot_balances[asset] = [free - need, locked + need]

    def _release_spot(self, order: FakeOrder, qty: Decimal) -> None:
        spec = SYMBOLS[order.symbol]
        asset, amount = ((spec.quote, qty * (order.price or self.prices[order.symbol]))
                         if order.side == "BUY" else (spec.base, qty))
        free, locked = self.spot_balances.get(asset, [Decimal(0), Decimal(0)])
        amount = min(amount, locked)
        self.spot_balances[asset] = [free + amount, locked - amount]

    def _market_fill(self, order: FakeOrder, params: dict[str, str]) -> None:
        qty = order.quantity
        if "_partial" in params:
            spec = SYMBOLS[order.symbol]
            step = Decimal(spec.spot_step if order.market == "spot" else spec.fut_step)
            qty = (qty * Decimal(params["_partial"]) / step).to_integral_value(rounding=ROUND_DOWN) * step
        if qty > 0:
            self._execute(order, qty, self.prices[order.symbol], maker=False)
        if order.executed < order.quantity:
            # A market order that ran out of liquidity: the rest expires.
            order.status = "EXPIRED"

    def _execute(self, order: FakeOrder, qty: Decimal, price: Decimal, *, maker: bool) -> Trade:
        spec = SYMBOLS[order.symbol]
        now = self._now_ms()
        if order.market == "spot":
            trade = self._spot_trade(order, spec, qty, price, maker, now)
        else:
            trade = self._futures_trade(order, qty, price, maker, now)
        order.executed += qty
        order.cum_quote += qty * price
        order.update_ms = now
        order.status = "FILLED" if order.executed >= order.quantity else "PARTIALLY_FILLED"
        order.trades.append(trade)
        self.trades.append(trade)
        return trade

    def _spot_trade(self, order: FakeOrder, spec: SymbolSpec, qty: Decimal, price: Decimal, maker: bool,
                    now: int) -> Trade:
        cost = qty * price
        base = self.spot_balances.setdefault(spec.base, [Decimal(0), Decimal(0)])
        quote = self.spot_balances.setdefault(spec.quote, [Decimal(0), Decimal(0)])
        resting = order.type != "MARKET"
        if order.side == "BUY":
            fee, fee_asset = qty * SPOT_TAKER_FEE, spec.base
            if resting:
                reserved = min(qty * (order.price or price), quote[1])
                quote[1] -= reserved
                quote[0] += reserved - cost
            else:
                quote[0] -= cost
            base[0] += qty - fee
        else:
            fee, fee_asset = cost * SPOT_TAKER_FEE, spec.quote
            if resting:
                base[1] -= min(qty, base[1])
            else:
                base[0] -= qty
            quote[0] += cost - fee
        return Trade("spot", next(self._trade_ids), order.order_id, order.symbol, order.side, price, qty,
                     fee, fee_asset, now, maker)

    def _futures_trade(self, order: FakeOrder, qty: Decimal, price: Decimal, maker: bool,
                       now: int) -> Trade:
        pos = self.positions.setdefault(order.symbol, FakePosition())
        signed = qty if order.side == "BUY" else -qty
        realized = Decimal(0)
        if pos.amount == 0 or (pos.amount > 0) == (signed > 0):
            total = pos.amount + signed
            pos.entry = (pos.entry * abs(pos.amount) + price * qty) / abs(total)
            pos.amount = total
        else:
            closing = min(abs(signed), abs(pos.amount))
            direction = Decimal(1) if pos.amount > 0 else Decimal(-1)
            realized = (price - pos.entry) * closing * direction
            rest = abs(signed) - closing
            pos.amount += signed
            if pos.amount == 0:
                pos.entry = Decimal(0)
            elif rest > 0:
                pos.entry = price
        pos.update_ms = now
        fee = qty * price * (FUTURES_MAKER_FEE if maker else FUTURES_TAKER_FEE)
        self.futures_wallet += realized - fee
        return Trade("futures", next(self._trade_ids), order.order_id, order.symbol, order.side, price,
                     qty, fee, "USDT", now, maker, realized)

    def _maybe_trigger(self, order: FakeOrder) -> None:
        """Execute what the current price crosses: resting limits, and stops (which become market
        orders, or limit orders at their price for STOP_LOSS_LIMIT)."""
        last = self.prices[order.symbol]
        remaining = order.quantity - order.executed
        if order.type in ("LIMIT", "LIMIT_MAKER"):
            crossed = last <= order.price if order.side == "BUY" else last >= order.price
            if crossed and remaining > 0:
                self._execute(order, remaining, order.price, maker=True)
            return
        if order.type in ("STOP_LOSS", "STOP_LOSS_LIMIT", "STOP_MARKET"):
            hit = last >= order.stop_price if order.side == "BUY" else last <= order.stop_price
            if not hit:
                return
            fill_price = order.price if order.type == "STOP_LOSS_LIMIT" else last
            if order.algo:
                self._trigger_algo(order, fill_price)
            else:
                self._execute(order, remaining, fill_price, maker=False)

    def _trigger_algo(self, algo: FakeOrder, price: Decimal) -> None:
        """A futures conditional order fires: a MARKET order (carrying the algo's client id) executes."""
        actual = FakeOrder(
            market="futures", order_id=next(self._ids), client_order_id=algo.client_order_id,
            symbol=algo.symbol, side=algo.side, type="MARKET", quantity=algo.quantity, price=Decimal(0),
            stop_price=algo.stop_price, reduce_only=algo.reduce_only, time_in_force="GTC", status="NEW",
            time_ms=self._now_ms(), update_ms=self._now_ms(),
        )
        pos = self.positions.get(algo.symbol, FakePosition())
        qty = actual.quantity
        if actual.reduce_only:
            qty = min(qty, abs(pos.amount)) if (pos.amount > 0) == (actual.side == "SELL") else Decimal(0)
        self.orders[("futures", actual.order_id)] = actual
        if qty > 0:
            self._execute(actual, qty, price, maker=False)
        if actual.executed < actual.quantity:
            actual.status = "EXPIRED"
        algo.status = "FINISHED"
        algo.actual_order_id = actual.order_id
        algo.executed = actual.executed
        algo.cum_quote = actual.cum_quote
        algo.update_ms = self._now_ms()

    def _spot_response(self, order: FakeOrder, resp_type: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "symbol": order.symbol, "orderId": order.order_id, "orderListId": -1,
            "clientOrderId": order.client_order_id, "transactTime": order.update_ms,
        }
        if resp_type == "ACK":
            return out
        out |= {
            "price": _s(order.price), "origQty": _s(order.quantity), "executedQty": _s(order.executed),
            "origQuoteOrderQty": _s(order.quote_order_qty), "cummulativeQuoteQty": _s(order.cum_quote),
            "status": order.status, "timeInForce": order.time_in_force, "type": order.type,
            "side": order.side, "workingTime": order.time_ms, "selfTradePreventionMode": "EXPIRE_MAKER",
        }
        if order.stop_price:
            out["stopPrice"] = _s(order.stop_price)
        if resp_type == "FULL":
            out["fills"] = [{"price": _s(t.price), "qty": _s(t.qty), "commission": _s(t.commission),
                             "commissionAsset": t.commission_asset, "tradeId": t.trade_id}
                            for t in order.trades]
        return out

    @staticmethod
    def _spot_query_row(order: FakeOrder) -> dict[str, Any]:
        return {
            "symbol": order.symbol, "orderId": order.order_id, "orderListId": -1,
            "clientOrderId": order.client_order_id, "price": _s(order.price),
            "origQty": _s(order.quantity), "executedQty": _s(order.executed),
            "cummulativeQuoteQty": _s(order.cum_quote), "status": order.status,
            "timeInForce": order.time_in_force, "type": order.type, "side": order.side,
            "stopPrice": _s(order.stop_price), "icebergQty": "0", "time": order.time_ms,
            "updateTime": order.update_ms, "isWorking": True, "workingTime": order.time_ms,
            "origQuoteOrderQty": _s(order.quote_order_qty), "selfTradePreventionMode": "EXPIRE_MAKER",
        }

    async def spot_get_order(self, params: dict[str, str], market: Market) -> Any:
        order = self._find("spot", params)
        if order is None:
            raise ApiError(-2013, "Order does not exist.")
        return self._spot_query_row(order)

    async def spot_cancel_order(self, params: dict[str, str], market: Market) -> Any:
        order = self._find("spot", params)
        if order is None or not order.is_open:
            raise ApiError(-2011, "Unknown order sent.")
        self._release_spot(order, order.quantity - order.executed)
        order.status = "CANCELED"
        order.update_ms = self._now_ms()
        row = self._spot_query_row(order)
        # Binance answers a cancel with a fresh id for the cancel request in clientOrderId.
        row["origClientOrderId"] = order.client_order_id
        row["clientOrderId"] = f"cancel-{next(self._ids)}"
        row["transactTime"] = order.update_ms
        return row

    async def open_orders(self, params: dict[str, str], market: Market) -> Any:
        symbol = params.get("symbol")
        rows = [o for o in self.orders.values()
                if o.market == market and not o.algo and o.is_open and (symbol is None or o.symbol == symbol)]
        if market == "spot":
            return [self._spot_query_row(o) for o in rows]
        return [self._futures_row(o) for o in rows]

    async def my_trades(self, params: dict[str, str], market: Market) -> Any:
        symbol = self._spec(params.get("symbol")).symbol
        limit = min(int(params.get("limit", "500")), 1000)
        rows = [t for t in self.trades if t.market == market and t.symbol == symbol]
        if "orderId" in params:
            rows = [t for t in rows if str(t.order_id) == params["orderId"]]
        if "fromId" in params:
            rows = [t for t in rows if t.trade_id >= int(params["fromId"])]
        if "startTime" in params:
            rows = [t for t in rows if t.time_ms >= int(params["startTime"])]
        if "endTime" in params:
            rows = [t for t in rows if t.time_ms <= int(params["endTime"])]
        rows = sorted(rows, key=lambda t: t.trade_id)[:limit]
        if market == "spot":
            return [{"symbol": t.symbol, "id": t.trade_id, "orderId": t.order_id, "orderListId": -1,
                     "price": _s(t.price), "qty": _s(t.qty), "quoteQty": _s(t.price * t.qty),
                     "commission": _s(t.commission), "commissionAsset": t.commission_asset,
                     "time": t.time_ms, "isBuyer": t.side == "BUY", "isMaker": t.maker, "isBestMatch": True}
                    for t in rows]
        return [{"buyer": t.side == "BUY", "commission": _s(t.commission),
                 "commissionAsset": t.commission_asset, "id": t.trade_id, "maker": t.maker,
                 "orderId": t.order_id, "price": _s(t.price), "qty": _s(t.qty),
                 "quoteQty": _s(t.price * t.qty), "realizedPnl": _s(t.realized_pnl), "side": t.side,
                 "positionSide": "BOTH", "symbol": t.symbol, "time": t.time_ms} for t in rows]

    # futures orders

    def _futures_row(self, order: FakeOrder) -> dict[str, Any]:
        return {
            "orderId": order.order_id, "symbol": order.symbol, "status": order.status,
            "clientOrderId": order.client_order_id, "price": _s(order.price),
            "avgPrice": _s(order.avg_price), "origQty": _s(order.quantity),
            "executedQty": _s(order.executed), "cumQty": _s(order.executed),
            "cumQuote": _s(order.cum_quote), "timeInForce": order.time_in_force, "type": order.type,
            "reduceOnly": order.reduce_only, "closePosition": False, "side": order.side,
            "positionSide": "BOTH", "stopPrice": _s(order.stop_price), "workingType": "CONTRACT_PRICE",
            "priceProtect": False, "origType": order.type, "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER", "goodTillDate": 0, "time": order.time_ms,
            "updateTime": order.update_ms,
        }

    def _algo_row(self, order: FakeOrder) -> dict[str, Any]:
        return {
            "algoId": order.order_id, "clientAlgoId": order.client_order_id, "algoType": "CONDITIONAL",
            "orderType": order.type, "symbol": order.symbol, "side": order.side, "positionSide": "BOTH",
            "timeInForce": order.time_in_force, "quantity": _s(order.quantity), "algoStatus": order.status,
            "actualOrderId": str(order.actual_order_id or ""), "actualPrice": _s(order.avg_price),
            "triggerPrice": _s(order.stop_price), "price": _s(order.price), "icebergQuantity": None,
            "selfTradePreventionMode": "EXPIRE_MAKER", "workingType": "CONTRACT_PRICE",
            "priceMatch": "NONE", "closePosition": False, "priceProtect": False,
            "reduceOnly": order.reduce_only, "createTime": order.time_ms, "updateTime": order.update_ms,
            "triggerTime": order.update_ms if order.actual_order_id else 0, "goodTillDate": 0,
        }

    def _futures_checks(self, spec: SymbolSpec, order: FakeOrder, reference: Decimal) -> None:
        if any(o.market == "futures" and o.client_order_id == order.client_order_id and o.algo == order.algo
               for o in self.orders.values()):
            raise ApiError(-4116, "ClientOrderId is duplicated.")
        pos = self.positions.get(spec.symbol, FakePosition())
        if order.reduce_only:
            closes = (pos.amount > 0 and order.side == "SELL") or (pos.amount < 0 and order.side == "BUY")
            if not closes or order.quantity > abs(pos.amount):
                raise ApiError(-2022, "ReduceOnly Order is rejected.")
            return
        margin = order.quantity * reference / self.leverage[spec.symbol]
        if margin > self._futures_available():
            raise ApiError(-2019, "Margin is insufficient.")

    async def futures_new_order(self, params: dict[str, str], market: Market) -> Any:
        spec = self._spec(params.get("symbol"))
        order_type = params.get("type", "").upper()
        if order_type in ("STOP_MARKET", "TAKE_PROFIT_MARKET", "STOP", "TAKE_PROFIT", "TRAILING_STOP_MARKET"):
            raise ApiError(-4120, "Order type not supported for this endpoint. Please use the Algo Order "
                                  "API endpoints instead.")
        if order_type not in ("MARKET", "LIMIT"):
            raise ApiError(-1116, "Invalid orderType.")
        qty = Decimal(params.get("quantity", "0"))
        price = Decimal(params.get("price", "0"))
        cid = params.get("newClientOrderId") or f"fake-{next(self._ids)}"
        reference = price if order_type == "LIMIT" else self.prices[spec.symbol]
        order = self._new_order("futures", spec, params, algo=False, order_type=order_type, qty=qty,
                                price=price, stop=Decimal(0), cid=cid)
        self._check_filters(spec, "futures", qty, price if order_type == "LIMIT" else None, reference,
                            order.reduce_only)
        self._futures_checks(spec, order, reference)
        self.orders[("futures", order.order_id)] = order
        if order_type == "MARKET":
            self._market_fill(order, params)
        else:
            self._maybe_trigger(order)
        return self._futures_row(order)

    async def futures_get_order(self, params: dict[str, str], market: Market) -> Any:
        order = self._find("futures", params)
        if order is None:
            raise ApiError(-2013, "Order does not exist.")
        return self._futures_row(order)

    async def futures_cancel_order(self, params: dict[str, str], market: Market) -> Any:
        order = self._find("futures", params)
        if order is None or not order.is_open:
            raise ApiError(-2011, "Unknown order sent.")
        order.status = "CANCELED"
        order.update_ms = self._now_ms()
        return self._futures_row(order)

    async def algo_new_order(self, params: dict[str, str], market: Market) -> Any:
        spec = self._spec(params.get("symbol"))
        if params.get("algoType") != "CONDITIONAL":
            raise ApiError(-1102, "Mandatory parameter 'algoType' was not sent.")
        order_type = params.get("type", "").upper()
        if order_type not in ("STOP_MARKET", "TAKE_PROFIT_MARKET"):
            raise ApiError(-1116, "Invalid orderType.")
        qty = Decimal(params.get("quantity", "0"))
        trigger = Decimal(params.get("triggerPrice", "0"))
        cid = params.get("clientAlgoId") or f"fake-{next(self._ids)}"
        order = self._new_order("futures", spec, params, algo=True, order_type=order_type, qty=qty,
                                price=Decimal(0), stop=trigger, cid=cid)
        self._check_filters(spec, "futures", qty, trigger, trigger, True)
        if any(o.market == "futures" and o.algo and o.client_order_id == cid for o in self.orders.values()):
            raise ApiError(-4116, "ClientOrderId is duplicated.")
        last = self.prices[spec.symbol]
        if (order.side == "SELL" and trigger >= last) or (order.side == "BUY" and trigger <= last):
            raise ApiError(-2021, "Order would immediately trigger.")
        self.orders[("futures", order.order_id)] = order
        return self._algo_row(order)

    async def algo_get_order(self, params: dict[str, str], market: Market) -> Any:
        order = self._find("futures", params, algo=True)
        if order is None:
            raise ApiError(-2013, "Order does not exist.")
        return self._algo_row(order)

    async def algo_cancel_order(self, params: dict[str, str], market: Market) -> Any:
        order = self._find("futures", params, algo=True)
        if order is None or not order.is_open:
            raise ApiError(-2011, "Unknown order sent.")
        order.status = "CANCELED"
        order.update_ms = self._now_ms()
        return {"algoId": order.order_id, "clientAlgoId": order.client_order_id, "code": "200",
                "msg": "success"}

    async def open_algo_orders(self, params: dict[str, str], market: Market) -> Any:
        symbol = params.get("symbol")
        return [self._algo_row(o) for o in self.orders.values()
                if o.algo and o.is_open and (symbol is None or o.symbol == symbol)]


def _duplicate(market: Market) -> ApiError:
    if market == "spot":
        return ApiError(-2010, "Duplicate order sent.")
    return ApiError(-4116, "ClientOrderId is duplicated.")


def _error(exc: ApiError) -> web.Response:
    return web.json_response({"code": exc.code, "msg": exc.msg}, status=exc.status)


_INTERVAL_MS = {"1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
                "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}

# (method, path) -> (handler, signed)
_ROUTES: dict[tuple[str, str], tuple[Handler, bool]] = {
    ("GET", "/api/v3/time"): (FakeBinance.time, False),
    ("GET", "/api/v3/exchangeInfo"): (FakeBinance.exchange_info, False),
    ("GET", "/api/v3/ticker/24hr"): (FakeBinance.ticker_24hr, False),
    ("GET", "/api/v3/ticker/bookTicker"): (FakeBinance.book_ticker, False),
    ("GET", "/api/v3/klines"): (FakeBinance.klines, False),
    ("GET", "/api/v3/account"): (FakeBinance.spot_account, True),
    ("POST", "/api/v3/order"): (FakeBinance.spot_new_order, True),
    ("GET", "/api/v3/order"): (FakeBinance.spot_get_order, True),
    ("DELETE", "/api/v3/order"): (FakeBinance.spot_cancel_order, True),
    ("GET", "/api/v3/openOrders"): (FakeBinance.open_orders, True),
    ("GET", "/api/v3/myTrades"): (FakeBinance.my_trades, True),
    ("GET", "/fapi/v1/time"): (FakeBinance.time, False),
    ("GET", "/fapi/v1/exchangeInfo"): (FakeBinance.exchange_info, False),
    ("GET", "/fapi/v1/ticker/24hr"): (FakeBinance.ticker_24hr, False),
    ("GET", "/fapi/v1/ticker/bookTicker"): (FakeBinance.book_ticker, False),
    ("GET", "/fapi/v1/klines"): (FakeBinance.klines, False),
    ("GET", "/fapi/v2/account"): (FakeBinance.futures_account, True),
    ("GET", "/fapi/v3/account"): (FakeBinance.futures_account, True),
    ("POST", "/fapi/v1/order"): (FakeBinance.futures_new_order, True),
    ("GET", "/fapi/v1/order"): (FakeBinance.futures_get_order, True),
    ("DELETE", "/fapi/v1/order"): (FakeBinance.futures_cancel_order, True),
    ("POST", "/fapi/v1/algoOrder"): (FakeBinance.algo_new_order, True),
    ("GET", "/fapi/v1/algoOrder"): (FakeBinance.algo_get_order, True),
    ("DELETE", "/fapi/v1/algoOrder"): (FakeBinance.algo_cancel_order, True),
    ("GET", "/fapi/v1/openOrders"): (FakeBinance.open_orders, True),
    ("GET", "/fapi/v1/openAlgoOrders"): (FakeBinance.open_algo_orders, True),
    ("GET", "/fapi/v1/userTrades"): (FakeBinance.my_trades, True),
    ("GET", "/fapi/v2/positionRisk"): (FakeBinance.position_risk, True),
    ("GET", "/fapi/v3/positionRisk"): (FakeBinance.position_risk, True),
    ("GET", "/fapi/v1/leverageBracket"): (FakeBinance.leverage_bracket, True),
    ("POST", "/fapi/v1/leverage"): (FakeBinance.set_leverage, True),
    ("POST", "/fapi/v1/marginType"): (FakeBinance.set_margin_type, True),
}


async def _serve(host: str, port: int, key: str, secret: str) -> None:
    fake = FakeBinance(api_key=key, api_secret=secret, host=host, port=port)
    url = await fake.start()
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback fake of Binance spot and USD-M futures REST")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--api-secret", default=API_SECRET)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port, args.api_key, args.api_secret))


if __name__ == "__main__":
    main()
