"""Scanner benchmark: one scan and ranking of 500 synthetic USDT perpetuals, in process.

What is timed is `Scanner.scan()` as the engine calls it every 60 s: fetch the tickers (an in-memory
source), read each symbol's 1h candles through the candle cache, derive the volume ratio and the 24h
change, filter and rank. Two figures:

- steady state (the target, <= 5 ms): the 1h candles are cached, as they are for the 59 scans of
  every hour that come after a new bar;
- cold: every symbol's candles are read from the source (an in-memory one, so this is the cost of
  the cache misses themselves, not of a network).

The pure ranking of 500 prepared `SymbolStats` is printed too, to show what the filters cost alone.

Run: .venv/bin/python bench/scanner_bench.py [--symbols 500] [--runs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.clock import SimClock
from core.types import CandleSeries, Ticker
from engines.analysis import CandleCache
from engines.scanner import Scanner, ScanParams, SymbolStats, rank, stats_from

HOUR = 3600.0


def market(n: int, now: float, seed: int = 1) -> tuple[list[Ticker], dict[str, CandleSeries]]:
    """`n` perpetuals with random walks; about a fifth with a volume surge on the last hour. Half the
    tickers report their 24h change, half leave it to the candles (as the replay feed may)."""
    rng = np.random.default_rng(seed)
    end = now - now % HOUR
    ts = end - HOUR * np.arange(200, 0, -1, dtype=np.float64)
    tickers: list[Ticker] = []
    candles: dict[str, CandleSeries] = {}
    for i in range(n):
        symbol = f"C{i:03d}/USDT:USDT"
        close = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, 200)))
        volume = rng.uniform(50, 150, 200)
        if rng.random() < 0.2:
            volume[-1] *= rng.uniform(1.5, 4.0)
        candles[symbol] = CandleSeries(symbol, "1h", ts, close, close * 1.002, close * 0.998, close, volume, now)
        last = Decimal(f"{close[-1]:.4f}")
        change = Decimal(f"{(close[-1] / close[-25] - 1) * 100:.3f}") if i % 2 else Decimal(0)
        tickers.append(Ticker(symbol, last, last, last, now, Decimal(1_000_000), change))
    return tickers, candles


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):.3f} ms  p99 {p99:.3f} ms  (n={len(ms)})"


async def main(symbols: int, runs: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(20))  # INFO, the daemon's default
    clock = SimClock(start=1_700_000_000.0)
    tickers, candles = market(symbols, clock.now())

    async def get_tickers() -> list[Ticker]:
        return tickers

    async def get_candles(symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        return candles[symbol].tail(limit)

    params = ScanParams()
    cache = CandleCache(get_candles, clock, concurrency=16)
    scanner = Scanner(get_tickers, cache, params, clock)
    first = await scanner.scan()
    print(f"{symbols} symbols: {first.passed} passed the filters, top {len(first.candidates)}: "
          f"{', '.join(c.symbol for c in first.candidates)}; skipped {len(first.skipped)}")

    warm: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await scanner.scan()
        warm.append(time.perf_counter() - t0)
    assert cache.stats.fetches == symbols, "steady state must be served from the cache"
    print(f"scan, candles cached (steady state): {percentiles(warm)}   target <= 5 ms")

    cold: list[float] = []
    for _ in range(max(10, runs // 10)):
        fresh = Scanner(get_tickers, CandleCache(get_candles, clock, concurrency=16), params, clock)
        t0 = time.perf_counter()
        await fresh.scan()
        cold.append(time.perf_counter() - t0)
    print(f"scan, every candle fetched (cold):  {percentiles(cold)}")

    by_symbol = {t.symbol: t for t in tickers}
    stats = [s for sym, c in candles.items() if isinstance(s := stats_from(sym, by_symbol[sym], c, params),
                                                          SymbolStats)]
    pure: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rank(stats, params)
        pure.append(time.perf_counter() - t0)
    print(f"rank() of {len(stats)} prepared stats:   {percentiles(pure)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.symbols, args.runs))
