"""How cheap the replay feed and the paper exchange are per call, on the bundled data.

Engines call `candles()` and `ticker()` on every step for every symbol, and a backtest steps the
replay tens of thousands of times, so these must stay in the microseconds. Prints medians and
percentiles; run with `.venv/bin/python bench/feed_bench.py`.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from core.clock import SimClock
from core.types import MarketInfo, MarketType, OrderType, Side
from exchange.base import OrderRequest
from exchange.feeds import ReplayFeed, discover_replay_files
from exchange.paper import PaperExchange

DATA = Path(__file__).resolve().parent.parent / "data"


def percentiles(samples_ns: list[int]) -> str:
    s = sorted(samples_ns)
    p99 = s[min(len(s) - 1, int(0.99 * len(s)))] / 1000
    return f"p50 {statistics.median(s) / 1000:8.2f} us   p99 {p99:8.2f} us   max {s[-1] / 1000:9.2f} us"


def timed(fn: Callable[[], object], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    files = discover_replay_files(DATA)
    clock = SimClock()
    loads = []
    for _ in range(3):
        feed = ReplayFeed(files, clock, warmup_bars=20_000)
        t0 = time.perf_counter()
        await feed.load()
        loads.append(time.perf_counter() - t0)
    print(f"load {len(files)} files (read, validate, merge): median {statistics.median(loads):.3f} s")
    await feed.start()
    sym = "BTC/USDT"
    for tf, limit in (("5m", 500), ("1h", 500), ("4h", 200)):
        samples = timed(functools.partial(feed.candles, sym, tf, limit), 50_000)
        print(f"candles({tf}, limit={limit}):        {percentiles(samples)}")
    print(f"ticker():                        {percentiles(timed(lambda: feed.ticker(sym), 50_000))}")
    print(f"step() (3 symbols, new tickers): {percentiles(timed(feed.step, 20_000))}")

    market = MarketInfo(sym, "BTC", "USDT", MarketType.SPOT, Decimal("0.00001"), Decimal("0.01"),
                        Decimal("0.00001"), Decimal("5"))
    paper = PaperExchange(MarketType.SPOT, feed, clock, {sym: market}, {"USDT": Decimal("1e9")},
                          taker_fee_pct=Decimal("0.1"), maker_fee_pct=Decimal("0.1"), slippage_bps=Decimal(5))
    samples = []
    for i in range(5_000):
        request = OrderRequest(f"b{i}", sym, Side.BUY if i % 2 == 0 else Side.SELL, OrderType.MARKET,
                               Decimal("0.01"))
        t0 = time.perf_counter_ns()
        await paper.create_order(request)
        samples.append(time.perf_counter_ns() - t0)
    print(f"paper market order:              {percentiles(samples)}")
    last = feed.ticker(sym)
    assert last is not None
    for i in range(200):
        await paper.create_order(OrderRequest(f"l{i}", sym, Side.BUY, OrderType.LIMIT, Decimal("0.01"),
                                              price=last.last * Decimal("0.5")))
    print(f"process_prices() 200 resting:    {percentiles(timed(paper.process_prices, 2_000))}")
    await feed.stop()


if __name__ == "__main__":
    asyncio.run(main())
