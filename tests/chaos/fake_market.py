"""The fake exchange of the chaos runs: `tests.fakes.binance.FakeBinance` with a market that moves.

The base fake draws synthetic klines around the current price, which the momentum strategy rarely
reads as an uptrend. Here every price the harness sets (along real candles) is kept, and the klines
*are* that path: the newest price is the candle still forming, the ones before it are closed candles,
one per price step. The daemon's ticker and its candles then tell one story, and the strategy enters
and exits as it would on that history.

What else the harness needs to land a SIGKILL, or a fault, at a chosen moment:
- targeted faults: a fault may carry `when` ({parameter: value}), so it hits only e.g. the protective
  stop (`{"type": "STOP_LOSS"}`) or a market order, not whichever order comes first;
- holds: a matching request is parked (before the exchange does anything with it) until released or
  until its time runs out, so the harness can kill the daemon while it waits on exactly that call;
- `/_fake/summary`: a few counters, cheap enough to poll every few milliseconds (`/_fake/state`
  serialises every order and trade).

Fees: Binance takes a spot buy's commission out of the coins bought, unless the account pays fees in
BNB. `fee_asset="BNB"` models the latter (at a fixed BNB price), so a position is exactly the amount
bought and a full exit leaves no sub-step remainder behind.

Standalone: `python -m tests.chaos.fake_market --port 0 [--fee-asset BNB]` prints its URL and serves
until SIGTERM. Control endpoints (POST, JSON) besides the base fake's: `/_fake/prices` (a list of
{symbol, price}, applied in order), `/_fake/hold` (a `Hold`), `/_fake/release`, `/_fake/clear` (drops
pending faults and holds, releases held requests); GET `/_fake/summary`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import signal
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from tests.fakes.binance import (
    API_KEY,
    API_SECRET,
    SPOT_TAKER_FEE,
    SYMBOLS,
    FakeBinance,
    FakeOrder,
    Fault,
    FaultKind,
    Market,
    SymbolSpec,
    Trade,
    exchange_symbol,
)

# Binance interval names the daemon may ask for; one path step is one candle whatever the interval.
INTERVAL_MS = {"1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
               "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}
HISTORY_CAP = 2_000
# Candles served per klines call, whatever the limit asked: a young market. The spot strategy reads
# 100 bars; the daemon's feed asks for 501 several times a second, and parsing them is most of a
# chaos daemon's CPU on a 2-core machine running eight of them.
KLINES_SERVED = 150
# The request log is only for tests that look at recent calls; a long chaos run must not grow it forever.
REQUEST_LOG_CAP = 20_000
BNB_PRICE = Decimal("600")
BNB_DISCOUNT = Decimal("0.75")  # Binance's 25 % off for fees paid in BNB
FeeAsset = Literal["base", "BNB"]

# The parameters of the request being answered, for the fault filter (aiohttp runs each request in a
# task of its own, so concurrent requests never see each other's).
_PARAMS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("chaos_request_params")


def plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value != 0 else "0"


Wanted = dict[str, str | list[str]]


def _wanted(when: Wanted, params: dict[str, str]) -> bool:
    """Every parameter in `when` has the value given (or one of the values listed), case-insensitively."""
    for key, value in when.items():
        allowed = value if isinstance(value, list) else [value]
        if params.get(key, "").upper() not in {str(v).upper() for v in allowed}:
            return False
    return True


@dataclass(slots=True)
class TargetedFault(Fault):
    """A base fault that also requires request parameters (`when`, see `_wanted`)."""

    when: Wanted = field(default_factory=dict)


@dataclass(slots=True)
class Hold:
    """Park the next `count` matching requests until released, at most `seconds` each.

    `when`: only requests carrying these parameter values; a value of "*" means "present, any value"
    (the spot client's one-symbol ticker read, made between writing an order to the ledger and sending
    it, carries `symbol`; the feed's ticker read carries `symbols`).
    """

    path: str
    method: str | None = None
    when: Wanted = field(default_factory=dict)
    seconds: float = 10.0
    count: int = 1

    def matches(self, method: str, path: str, params: dict[str, str]) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if not (path == self.path or path.endswith(self.path)):
            return False
        present = [k for k, v in self.when.items() if v == "*"]
        exact = {k: v for k, v in self.when.items() if v != "*"}
        return all(k in params for k in present) and _wanted(exact, params)


class ChaosMarket(FakeBinance):
    """A fake Binance whose klines follow the price path set through it, with targeted faults, request
    holds and a choice of fee asset."""

    def __init__(self, *, fee_asset: FeeAsset = "base", **kw: Any) -> None:
        super().__init__(**kw)
        self.fee_asset = fee_asset
        if fee_asset == "BNB":
            self.spot_balances["BNB"] = [Decimal("100"), Decimal(0)]
        self.history: dict[str, list[Decimal]] = {s: [] for s in SYMBOLS}
        self.holds: list[Hold] = []
        self.held = 0
        self.hold_hits = 0
        self.requests_total = 0
        # Every fault taken: its kind and the client order id of the request it hit (if any).
        self.fault_log: list[dict[str, str]] = []
        self._release = asyncio.Event()

    # --- prices and candles ------------------------------------------------------------------------

    def set_price(self, symbol: str, price: Decimal | str) -> None:
        sym = exchange_symbol(symbol)
        path = self.history[sym]
        path.append(Decimal(price))
        if len(path) > HISTORY_CAP:
            del path[: len(path) - HISTORY_CAP]
        super().set_price(sym, price)

    def path_klines(self, params: dict[str, str]) -> list[list[Any]]:
        """The last `limit` prices as candles ending with the one forming now (which the daemon's feed
        drops as not yet closed). Open is the previous close; high and low span the two."""
        symbol = self._spec(params.get("symbol")).symbol
        step = INTERVAL_MS.get(params.get("interval", "5m"), 300_000)
        limit = max(1, min(int(params.get("limit", "500")), KLINES_SERVED))
        path = self.history[symbol][-limit:] or [self.prices[symbol]]
        newest = self._now_ms() // step * step
        rows: list[list[Any]] = []
        for i, close in enumerate(path):
            open_ = path[i - 1] if i > 0 else close
            t = newest - (len(path) - 1 - i) * step
            rows.append([t, plain(open_), plain(max(open_, close)), plain(min(open_, close)), plain(close),
                         "10", t + step - 1, plain(close * 10), 100, "5", plain(close * 5), "0"])
        return rows

    # --- fees --------------------------------------------------------------------------------------

    def _spot_trade(self, order: FakeOrder, spec: SymbolSpec, qty: Decimal, price: Decimal, maker: bool,
                    now: int) -> Trade:
        trade = super()._spot_trade(order, spec, qty, price, maker, now)
        if self.fee_asset != "BNB":
            return trade
        # Undo the commission the base fake took in base (buy) or quote (sell); charge it in BNB.
        if order.side == "BUY":
            self.spot_balances[spec.base][0] += trade.commission
        else:
            self.spot_balances[spec.quote][0] += trade.commission
        bnb = (qty * price * SPOT_TAKER_FEE * BNB_DISCOUNT / BNB_PRICE).quantize(Decimal("0.00000001"))
        self.spot_balances["BNB"][0] -= bnb
        trade.commission = bnb
        trade.commission_asset = "BNB"
        return trade

    # --- request pipeline --------------------------------------------------------------------------

    def inject(self, kind: FaultKind, **kw: Any) -> Fault:
        fault = TargetedFault(kind=kind, **kw)
        self.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str, market: Market) -> Fault | None:
        params = _PARAMS.get({})
        for fault in self.faults:
            when = fault.when if isinstance(fault, TargetedFault) else {}
            if fault.count > 0 and fault.matches(method, path, market) and _wanted(when, params):
                fault.count -= 1
                if fault.count == 0:
                    self.faults.remove(fault)
                cid = params.get("newClientOrderId") or params.get("origClientOrderId") or ""
                self.fault_log.append({"kind": fault.kind, "method": method, "path": path, "client_order_id": cid})
                return fault
        return None

    def order_status(self, client_order_id: str) -> str | None:
        order = next((o for o in reversed(self.orders.values())
                      if o.market == "spot" and o.client_order_id == client_order_id), None)
        return order.status if order is not None else None

    def state(self) -> dict[str, Any]:
        return {**super().state(), "fault_log": list(self.fault_log)}

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith("/_fake/"):
            self.requests_total += 1
            if len(self.requests) > REQUEST_LOG_CAP:
                del self.requests[: REQUEST_LOG_CAP // 2]
            # aiohttp keeps the body once read, so the base fake reads the same text again.
            raw = (await request.text()) if request.method == "POST" else request.query_string
            params = dict(parse_qsl(raw, keep_blank_values=True))
            _PARAMS.set(params)
            hold = self._take_hold(request.method, request.path, params)
            if hold is not None:
                await self._park(hold)
        return await super()._dispatch(request)

    def _take_hold(self, method: str, path: str, params: dict[str, str]) -> Hold | None:
        for hold in self.holds:
            if hold.count > 0 and hold.matches(method, path, params):
                hold.count -= 1
                if hold.count == 0:
                    self.holds.remove(hold)
                return hold
        return None

    async def _park(self, hold: Hold) -> None:
        """Wait for a release (or the hold's time). A client that dies meanwhile cancels this handler
        (the server runs with handler cancellation), so the request is never carried out."""
        self.held += 1
        self.hold_hits += 1
        release = self._release
        try:
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(release.wait(), hold.seconds)
        finally:
            self.held -= 1

    def release(self) -> None:
        self._release.set()
        self._release = asyncio.Event()

    async def _answer(self, request: web.Request, path: str, raw: str, params: dict[str, str],
                      market: Market, fault: Fault | None) -> web.StreamResponse:
        if request.method == "GET" and path.endswith("/klines") and fault is None:
            return web.json_response(self.path_klines(params))
        return await super()._answer(request, path, raw, params, market, fault)

    def summary(self) -> dict[str, Any]:
        """Counters, and the order the newest fault hit (`fault_status`: that spot order's status, or
        None when the exchange refused it or has not carried it out yet)."""
        hit = self.fault_log[-1]["client_order_id"] if self.fault_log else None
        return {
            "fault_order": hit,
            "fault_status": self.order_status(hit) if hit else None,
            "requests": self.requests_total,
            "creates": len(self.create_calls),
            "orders": len(self.orders),
            "trades": len(self.trades),
            "sells": sum(1 for t in self.trades if t.side == "SELL"),
            "held": self.held,
            "hold_hits": self.hold_hits,
            "holds": len(self.holds),
            "faults": len(self.faults),
        }

    async def _control(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/_fake/summary":
            return web.json_response(self.summary())
        if request.path == "/_fake/prices":
            for item in await request.json():
                self.set_price(item["symbol"], item["price"])
            return web.json_response({"ok": True})
        if request.path == "/_fake/hold":
            body = await request.json()
            for item in body if isinstance(body, list) else [body]:
                self.holds.append(Hold(**item))
            return web.json_response({"holds": len(self.holds)})
        if request.path == "/_fake/release":
            self.release()
            return web.json_response({"ok": True})
        if request.path == "/_fake/clear":
            self.faults.clear()
            self.holds.clear()
            self.release()
            return web.json_response({"ok": True})
        return await super()._control(request)


async def serve(host: str, port: int, key: str, secret: str, fee_asset: FeeAsset) -> None:
    fake = ChaosMarket(api_key=key, api_secret=secret, host=host, port=port, fee_asset=fee_asset)
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
    parser = argparse.ArgumentParser(description="Fake Binance whose klines follow the prices set through it")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--api-secret", default=API_SECRET)
    parser.add_argument("--fee-asset", choices=["base", "BNB"], default="base")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.api_key, args.api_secret, args.fee_asset))


if __name__ == "__main__":
    main()
