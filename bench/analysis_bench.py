"""Analysis benchmark: 50 symbols x 3 timeframes (4h, 1h, 15m) fetched through ccxt from a loopback
Binance USD-M server that answers every request 50 ms late, then scored. Target: <= 1.0 s.

What is timed is one `Analyzer.analyze()` with an empty candle cache (the worst case: every candle
fetched), exactly as the futures engine runs it after a scan:

- requests in flight are bounded by the cache's semaphore (`--concurrency`, default the setting
  `futures_analysis_concurrency`);
- Binance's request-weight limit is honoured by the project's shared budget
  (`exchange.ratelimit.WeightBudget.for_binance(FUTURES)`: 75% of 2400 weight per minute, a third of
  it as burst), which every kline request waits on with its Binance weight (2 for 100-499 klines).
  ccxt's own throttler is off, as in the daemon: it sleeps on the wall clock and cannot see the other
  clients of the same API. Each run starts with a full bucket, as a scan every 60 s leaves it;
- each request has a timeout (the cache's, and ccxt's own).

The server runs in its own process (so its work is not counted as the client's), binds 127.0.0.1 on
a random port, sleeps on the project's clock (`LiveClock`) and builds each answer once per bar.

Run: .venv/bin/python bench/analysis_bench.py [--symbols 50] [--runs 7] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import ccxt.async_support as ccxt
import numpy as np
import structlog
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Settings
from core.clock import LiveClock
from core.errors import DependencyError, TemporaryError
from core.types import CandleSeries, MarketType
from engines.analysis import TIMEFRAMES, AnalysisParams, Analyzer, CandleCache
from exchange.candles import clean_rows, timeframe_seconds
from exchange.live_feed import loopback_api_urls
from exchange.ratelimit import WeightBudget


def kline_weight(limit: int) -> int:
    """Binance USD-M GET /fapi/v1/klines weight by limit."""
    return 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10


class LoopbackFutures:
    """exchangeInfo and klines for `symbols`, each answer `latency` seconds late."""

    def __init__(self, symbols: int, latency: float) -> None:
        self.names = [f"S{i:03d}USDT" for i in range(symbols)]
        self.latency = latency
        self.clock = LiveClock()
        self.requests = 0
        self.in_flight = 0
        self.peak = 0
        self._runner: web.AppRunner | None = None
        self._bodies: dict[tuple[str, str, int, int], bytes] = {}

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/fapi/v1/exchangeInfo", self.exchange_info)
        app.router.add_get("/fapi/v1/klines", self.klines)
        app.router.add_get("/stats", self.stats)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def exchange_info(self, request: web.Request) -> web.Response:
        symbols = [{
            "symbol": name, "pair": name, "contractType": "PERPETUAL", "status": "TRADING",
            "baseAsset": name[:-4], "quoteAsset": "USDT", "marginAsset": "USDT", "pricePrecision": 4,
            "quantityPrecision": 3, "baseAssetPrecision": 8, "quotePrecision": 8, "onboardDate": 1569398400000,
            "deliveryDate": 4133404800000, "underlyingType": "COIN",
            "filters": [{"filterType": "PRICE_FILTER", "minPrice": "0.0001", "maxPrice": "100000",
                         "tickSize": "0.0001"},
                        {"filterType": "LOT_SIZE", "minQty": "0.001", "maxQty": "100000", "stepSize": "0.001"},
                        {"filterType": "MIN_NOTIONAL", "notional": "5"}],
            "orderTypes": ["LIMIT", "MARKET", "STOP_MARKET"], "timeInForce": ["GTC"],
        } for name in self.names]
        return web.json_response({"timezone": "UTC", "serverTime": int(self.clock.now() * 1000),
                                  "rateLimits": [], "exchangeFilters": [],
                                  "assets": [{"asset": "USDT", "marginAvailable": True}], "symbols": symbols})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "peak": self.peak})

    async def klines(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.clock.sleep(self.latency)
            name = request.query["symbol"]
            step = timeframe_seconds(request.query["interval"]) * 1000
            limit = min(int(request.query.get("limit", "500")), 1500)
            first = (int(self.clock.now() * 1000) // step - limit + 1) * step
            key = (name, request.query["interval"], limit, first)
            body = self._bodies.get(key)
            if body is None:  # the same bar, the same answer: built once, like a server's cache
                body = self._bodies[key] = json.dumps(self._rows(name, step, limit, first)).encode()
            return web.Response(body=body, content_type="application/json")
        finally:
            self.in_flight -= 1

    def _rows(self, name: str, step: int, limit: int, first: int) -> list[list[Any]]:
        index = self.names.index(name)
        rng = np.random.default_rng(index * 7 + step // 60_000)
        close = 100.0 * np.exp(np.cumsum(rng.normal(0.002 if index % 2 else -0.002, 0.01, limit)))
        open_ = np.concatenate(([close[0]], close[:-1]))
        volume = rng.uniform(50, 150, limit)
        return [[first + i * step, f"{open_[i]:.4f}", f"{max(open_[i], close[i]) * 1.003:.4f}",
                 f"{min(open_[i], close[i]) * 0.997:.4f}", f"{close[i]:.4f}", f"{volume[i]:.3f}",
                 first + (i + 1) * step - 1, "0", 100, "0", "0", "0"] for i in range(limit)]


def serve(symbols: int, latency: float, port_out: Connection) -> None:
    """The server's own process (and event loop), so its work is not counted as the client's."""

    async def run() -> None:
        server = LoopbackFutures(symbols, latency)
        port_out.send(await server.start())
        await asyncio.Event().wait()  # until the parent terminates this process

    asyncio.run(run())


class CcxtCandles:
    """A candle source through ccxt (as live would fetch beyond the feed's own symbols): waits on the
    weight budget, asks for one extra kline and drops the one still forming.

    `raw`: ccxt's implicit endpoint method (`fapiPublicGetKlines`: the same URL, signing, timeout and
    error translation) with the rows turned into arrays by numpy; otherwise the unified
    `fetch_ohlcv`, whose per-field parsing in Python costs about 2 ms per 200 klines."""

    def __init__(self, exchange: Any, budget: WeightBudget, clock: LiveClock, *, raw: bool) -> None:
        self.exchange = exchange
        self.budget = budget
        self.clock = clock
        self.raw = raw

    async def __call__(self, symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        await self.budget.acquire(kline_weight(limit + 1))
        try:
            if self.raw:
                market_id = self.exchange.market(symbol)["id"]
                rows = await self.exchange.fapiPublicGetKlines(
                    {"symbol": market_id, "interval": timeframe, "limit": limit + 1})
                rows = [row[:6] for row in rows]
            else:
                rows = await self.exchange.fetch_ohlcv(symbol, timeframe, limit=limit + 1)
        except ccxt.NetworkError as exc:
            raise TemporaryError(f"klines {symbol} {timeframe}: {exc}") from exc
        except ccxt.BaseError as exc:
            raise DependencyError(f"klines {symbol} {timeframe}: {exc}") from exc
        table = np.array(rows, dtype=np.float64)
        arrays, rejected = clean_rows(*(table[:, i] for i in range(6)))
        if rejected.total:
            raise DependencyError(f"klines {symbol} {timeframe}: {rejected.total} bad rows")
        now = self.clock.now()
        closed = int(np.searchsorted(arrays.ts_ms, int((now - timeframe_seconds(timeframe)) * 1000), side="right"))
        start = max(0, closed - limit)
        return arrays.series(symbol, timeframe, start, closed, now)


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.3f} s  p99 {p99:.3f} s  min {ordered[0]:.3f} s  (n={len(ordered)})"


async def server_stats(base: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/stats",
                                                               timeout=aiohttp.ClientTimeout(total=5)) as resp:
        stats: dict[str, int] = await resp.json()
        return stats


async def main(base: str, symbols: int, runs: int, latency: float, concurrency: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    clock = LiveClock()
    exchange = ccxt.binanceusdm({"enableRateLimit": False, "timeout": 10_000, "options": {
        "fetchCurrencies": False, "fetchMargins": False, "fetchMarkets": {"types": ["linear"]}}})
    exchange.urls["api"] = {**exchange.urls["api"], **loopback_api_urls(base, MarketType.FUTURES)}
    try:
        await clock.wait_for(exchange.load_markets(), 10.0)
        names = [f"S{i:03d}/USDT:USDT" for i in range(symbols)]
        params = AnalysisParams()
        limit = Settings(_env_file=None).futures_candle_limit  # type: ignore[call-arg]
        print(f"{symbols} symbols x {len(TIMEFRAMES)} timeframes, {latency * 1000:.0f} ms per request, "
              f"concurrency {concurrency}, {limit} bars each")
        waits = 0.0
        for raw, label in ((True, "fapiPublicGetKlines + numpy"), (False, "fetch_ohlcv (unified)")):
            cold: list[float] = []
            signals = 0
            for _ in range(runs):
                budget = WeightBudget.for_binance(MarketType.FUTURES, clock)
                source = CcxtCandles(exchange, budget, clock, raw=raw)
                cache = CandleCache(source, clock, concurrency=concurrency, timeout=10.0)
                analyzer = Analyzer(cache, params, limit=limit)
                before = (await server_stats(base))["requests"]
                t0 = time.perf_counter()
                result = await analyzer.analyze(names)
                cold.append(time.perf_counter() - t0)
                served = (await server_stats(base))["requests"] - before
                assert served == symbols * len(TIMEFRAMES), f"every candle fetched once, got {served} requests"
                assert not any("candles" in r for r in result.skipped.values()), result.skipped
                waits += budget.stats.waited_seconds
                signals = len(result.signals)
            target = "   target <= 1.0 s" if raw else ""
            print(f"analysis, every candle fetched, {label}: {summary(cold)}, {signals} signals{target}")
        t0 = time.perf_counter()
        await analyzer.analyze(names)  # the same bars again: all from the cache
        print(f"analysis, candles cached: {(time.perf_counter() - t0) * 1000:.1f} ms")
        print(f"requests in flight at most {(await server_stats(base))['peak']}; "
              f"weight budget waited {waits:.3f} s in all")
    finally:
        await exchange.close()


if __name__ == "__main__":
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=defaults.futures_analysis_concurrency)
    args = parser.parse_args()
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=serve, args=(args.symbols, args.latency, send), daemon=True)
    process.start()
    try:
        if not receive.poll(30):
            raise SystemExit("the loopback server did not start within 30 s")
        asyncio.run(main(receive.recv(), args.symbols, args.runs, args.latency, args.concurrency))
    finally:
        process.terminate()
        process.join(10)
