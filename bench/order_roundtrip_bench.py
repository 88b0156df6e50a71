"""Order round trip (place a market order, then fetch it by client id) through `CcxtExchange`, and the
same requests through bare ccxt, against the loopback Binance fake in one run.

Target (issue): p50 and p99 of the round trip through the real ccxt client, and the project's overhead
over bare ccxt measured in the same run: under 10 % on top.

Run from the repository root:
    .venv/bin/python bench/order_roundtrip_bench.py [--orders 300] [--market spot|futures]

What is compared with what
--------------------------
`CcxtExchange` adds per round trip: the shared weight budget, an outer timeout on the project clock
around every request, counters, error translation, and validation of every answer with amounts and
prices read as exact `Decimal` from the exchange's own strings. For plain (non-conditional) orders it
sends through ccxt's implicit endpoints (`privatePostOrder`, `fapiPrivateGetOrder`, ...) with the
request built by ccxt's own `create_order_request`, so ccxt still rounds, signs, sends and maps errors;
what it skips is ccxt's float parse of the answer into unified structures, which it never read (it
cost about 50 us warm per spot create and 25 us per fetch). So the bench prints two comparisons:

- "vs ccxt unified": bare ccxt's `create_order` / `fetch_order` (/ `fetch_my_trades`), what a ccxt
  user writes. This is the figure the target is about.
- "vs ccxt raw": bare ccxt sending the very requests the project sends, through the same implicit
  endpoints, with no parsing and no checks. The difference is the cost of the project's own layer
  alone (budget, timeout, counters, validation, Decimal), shown so that skipping ccxt's parse cannot
  hide it.

Futures (`--market futures`): a USD-M order answer (newOrderRespType=RESULT, which ccxt sends) has
status, executedQty, avgPrice and cumQuote but no fills: no trade ids, no commissions. The project
reads the order's trades by order id right after placing it, because the ledger records fills keyed
by (client order id, trade id) with their fees, and reconciliation adopts the exchange's trades by
those ids. A fill made up from the order answer would carry a synthetic id and no fee: the fees
would be missing from P&L, and when reconciliation later reads the real trade it would be recorded a
second time. The third request is needed, so the fair baseline is bare ccxt making the same three
requests (create_order, fetch_my_trades for that order id, fetch_order). The plain two-call bare
round trip is printed too, for transparency, with the project's extra request counted against it.

Method: the contenders run interleaved, one round trip each per iteration, rotating who goes first, so
drift in the machine's load hits all alike. After each iteration the fake forgets its orders and
trades (all are filled market orders nobody reads again): its lookups scan them, and a growing scan
would inflate every contender alike and shrink the relative overhead as the run goes on. The client
gets a roomy weight budget: the default one would (rightly) start pacing a burst of hundreds of
orders, which is throttling, not overhead. The heap is collected once after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ccxt.async_support as ccxt
import structlog

from core.clock import LiveClock
from core.types import MarketType, OrderType, Side
from exchange.base import OrderRequest
from exchange.ccxt_client import CcxtExchange
from exchange.ratelimit import WeightBudget
from tests.fakes.binance import API_KEY, API_SECRET, FakeBinance

CLOCK = LiveClock()
TARGET_PCT = 10.0
PROJECT = "CcxtExchange"

RoundTrip = Callable[[int], Awaitable[float]]


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def bare_client(market: MarketType, url: str) -> Any:
    cls = ccxt.binance if market is MarketType.SPOT else ccxt.binanceusdm
    types = ["spot"] if market is MarketType.SPOT else ["linear"]
    ex = cls({
        "apiKey": API_KEY, "secret": API_SECRET, "enableRateLimit": False, "timeout": 10_000,
        "options": {"fetchCurrencies": False, "fetchMarkets": {"types": types}, "fetchMargins": False},
    })
    ex.enable_demo_trading(True)
    for key, value in list(ex.urls["api"].items()):
        ex.urls["api"][key] = url + urlsplit(value).path
    ex.timeout_on_exit = 0
    return ex


def contenders(market: MarketType, client: CcxtExchange, bare: Any, symbol: str, amount: str) -> dict[str, RoundTrip]:
    """Each contender places one market buy and reads it back; returns the seconds it took."""
    futures = market is MarketType.FUTURES
    market_id = bare.market(symbol)["id"]
    post = bare.fapiPrivatePostOrder if futures else bare.privatePostOrder
    query = bare.fapiPrivateGetOrder if futures else bare.privateGetOrder
    trades = bare.fapiPrivateGetUserTrades if futures else bare.privateGetMyTrades

    async def project(i: int) -> float:
        cid = f"bench-p-{i}"
        start = CLOCK.monotonic()
        request = OrderRequest(cid, symbol, Side.BUY, OrderType.MARKET, Decimal(amount), price=Decimal("60000"))
        await client.create_order(request)
        await client.fetch_order(symbol, cid)
        return CLOCK.monotonic() - start

    async def unified(i: int) -> float:
        # The requests the project makes, through ccxt's unified calls (futures: with the fills read).
        cid = f"bench-u-{i}"
        start = CLOCK.monotonic()
        order = await bare.create_order(symbol, "market", "buy", amount, None, {"newClientOrderId": cid})
        if futures:
            await bare.fetch_my_trades(symbol, None, 1000, {"orderId": order["id"]})
        await bare.fetch_order(None, symbol, {"origClientOrderId": cid})
        return CLOCK.monotonic() - start

    async def unified_plain(i: int) -> float:
        cid = f"bench-2-{i}"
        start = CLOCK.monotonic()
        await bare.create_order(symbol, "market", "buy", amount, None, {"newClientOrderId": cid})
        await bare.fetch_order(None, symbol, {"origClientOrderId": cid})
        return CLOCK.monotonic() - start

    async def raw(i: int) -> float:
        cid = f"bench-r-{i}"
        start = CLOCK.monotonic()
        request = bare.create_order_request(symbol, "market", "buy", amount, None, {"newClientOrderId": cid})
        answer = await post(request)
        if futures:
            await trades({"symbol": market_id, "orderId": answer["orderId"], "limit": 1000})
        await query({"symbol": market_id, "origClientOrderId": cid})
        return CLOCK.monotonic() - start

    if futures:
        return {PROJECT: project, "ccxt unified, 3 requests": unified, "ccxt unified, 2 requests": unified_plain,
                "ccxt raw, 3 requests": raw}
    return {PROJECT: project, "ccxt unified": unified, "ccxt raw": raw}


async def run(orders: int, warmup: int, market: MarketType) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    symbol = "BTC/USDT" if market is MarketType.SPOT else "BTC/USDT:USDT"
    amount = "0.001" if market is MarketType.SPOT else "0.002"
    async with FakeBinance() as fake:
        fake.set_spot_balance("USDT", "100000000")
        fake.futures_wallet = Decimal("100000000")
        roomy = WeightBudget(CLOCK, rate_per_second=1e9, burst=1e9)
        client = CcxtExchange(market, CLOCK, api_key=API_KEY, api_secret=API_SECRET, mode="testnet",
                              timeout_seconds=10.0, urls_override=fake.url, budget=roomy)
        bare = bare_client(market, fake.url)
        try:
            await client.load_markets()
            await bare.load_markets()
            if market is MarketType.FUTURES:
                await client.ensure_symbol_setup(symbol, 20)
            runners = contenders(market, client, bare, symbol, amount)
            names = list(runners)
            samples: dict[str, list[float]] = {name: [] for name in names}
            for i in range(warmup + orders):
                if i == warmup:
                    # Start measuring on a clean heap: the garbage of start-up (markets, ccxt's tables)
                    # would otherwise land as one long collection in whichever contender runs then.
                    gc.collect()
                # Rotate who goes first, so no contender always runs on a freshly idle loop.
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    took = await runners[name](i)
                    if i >= warmup:
                        samples[name].append(took)
                fake.orders.clear()
                fake.trades.clear()
        finally:
            await client.close()
            await bare.close()
    report(market, orders, samples)


def report(market: MarketType, orders: int, samples: dict[str, list[float]]) -> None:
    def row(name: str, values: list[float]) -> str:
        return (f"{name:<26} p50 {percentile(values, 50) * 1000:7.3f} ms   "
                f"p99 {percentile(values, 99) * 1000:7.3f} ms   mean {statistics.fmean(values) * 1000:7.3f} ms")

    def extra(base: list[float], pct: float) -> float:
        return (percentile(samples[PROJECT], pct) - percentile(base, pct)) / percentile(base, pct) * 100

    what = "create market + fetch by client id" + (" (+ its fills by order id)" if market is MarketType.FUTURES else "")
    print(f"order round trip ({what}), {market.value}, {orders} orders each")
    for name, values in samples.items():
        print(row(name, values))
    for name, values in samples.items():
        if name != PROJECT:
            print(f"overhead vs {name:<26} p50 {extra(values, 50):+6.1f}%   p99 {extra(values, 99):+6.1f}%")
    headline = "ccxt unified, 3 requests" if market is MarketType.FUTURES else "ccxt unified"
    p50 = extra(samples[headline], 50)
    verdict = "met" if p50 < TARGET_PCT else "NOT met"
    print(f"target: p50 under +{TARGET_PCT:g}% vs {headline}: {verdict} ({p50:+.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--market", choices=["spot", "futures"], default="spot")
    args = parser.parse_args()
    asyncio.run(run(args.orders, args.warmup, MarketType(args.market)))


if __name__ == "__main__":
    main()
