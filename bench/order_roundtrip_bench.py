"""Order round trip (create a market order, then fetch it by client id) through `CcxtExchange`, and the
same two calls with bare ccxt, against the loopback Binance fake in one run.

The difference is what the project adds per round trip: the weight budget, the outer timeout, error
translation, Decimal parsing and validation of every answer. Target: under 10% at the median.

Run from the repository root:  .venv/bin/python bench/order_roundtrip_bench.py [--orders 300]

Both sides run interleaved, alternating which goes first, so drift in the machine's load hits both
alike. The client gets a roomy weight budget: the default one would (rightly) start pacing a burst of
hundreds of orders, which is throttling, not overhead. USD-M orders (`--market futures`) also read
their fills by order id after placing (the answer carries none), one request more than bare ccxt.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
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


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def bare_client(market: MarketType, url: str) -> Any:
    cls = ccxt.binance if market is MarketType.SPOT else ccxt.binanceusdm
    types = ["spot"] if market is MarketType.SPOT else ["linear"]
    ex = cls({
        "apiKey": API_KEY, "secret": API_SECRET, "enableRateLimit": False, "timeout": 10_000,
        "options": {"fetchCurrencies": False, "fetchMargins": False, "fetchMarkets": {"types": types}},
    })
    ex.enable_demo_trading(True)
    for key, value in list(ex.urls["api"].items()):
        ex.urls["api"][key] = url + urlsplit(value).path
    ex.timeout_on_exit = 0
    return ex


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
            project: list[float] = []
            raw: list[float] = []
            async def through_project(i: int) -> float:
                cid = f"bench-p-{i}"
                start = CLOCK.monotonic()
                request = OrderRequest(cid, symbol, Side.BUY, OrderType.MARKET, Decimal(amount),
                                       price=Decimal("60000"))
                await client.create_order(request)
                await client.fetch_order(symbol, cid)
                return CLOCK.monotonic() - start

            async def through_ccxt(i: int) -> float:
                cid = f"bench-b-{i}"
                start = CLOCK.monotonic()
                await bare.create_order(symbol, "market", "buy", amount, None, {"newClientOrderId": cid})
                await bare.fetch_order(None, symbol, {"origClientOrderId": cid})
                return CLOCK.monotonic() - start

            for i in range(warmup + orders):
                # Alternate who goes first, so neither side always runs on a freshly idle loop.
                if i % 2:
                    took_project, took_bare = await through_project(i), await through_ccxt(i)
                else:
                    took_bare, took_project = await through_ccxt(i), await through_project(i)
                if i >= warmup:
                    project.append(took_project)
                    raw.append(took_bare)
        finally:
            await client.close()
            await bare.close()
    report(market, orders, project, raw)


def report(market: MarketType, orders: int, project: list[float], raw: list[float]) -> None:
    def row(name: str, samples: list[float]) -> str:
        return (f"{name:<14} p50 {percentile(samples, 50) * 1000:7.3f} ms   "
                f"p99 {percentile(samples, 99) * 1000:7.3f} ms   mean {statistics.fmean(samples) * 1000:7.3f} ms")

    print(f"order round trip (create market + fetch by client id), {market.value}, {orders} orders each")
    print(row("CcxtExchange", project))
    print(row("bare ccxt", raw))
    for pct in (50, 99):
        base = percentile(raw, pct)
        extra = (percentile(project, pct) - base) / base * 100
        print(f"overhead p{pct}: {extra:+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--market", choices=["spot", "futures"], default="spot")
    args = parser.parse_args()
    asyncio.run(run(args.orders, args.warmup, MarketType(args.market)))


if __name__ == "__main__":
    main()
