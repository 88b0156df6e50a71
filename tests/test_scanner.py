"""The futures scanner: which symbols pass the volume and momentum filters, how they are ranked, and
what happens to bad data (that symbol is skipped and logged, the scan goes on)."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from core.clock import SimClock
from core.errors import DependencyError, TemporaryError
from core.types import CandleSeries, Ticker
from engines.analysis import CandleCache
from engines.scanner import (
    CHANGE_BARS,
    Candidate,
    Scanner,
    ScanParams,
    SymbolStats,
    is_usdt_perpetual,
    passes_momentum,
    passes_volume,
    rank,
    stats_from,
)

D = Decimal
HOUR = 3600.0

finite = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)
changes = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False, allow_infinity=False)


def hourly(symbol: str, closes: list[float], volumes: list[float], end: float) -> CandleSeries:
    n = len(closes)
    ts = np.array([end - (n - i) * HOUR for i in range(n)], dtype=np.float64)
    c = np.array(closes, dtype=np.float64)
    return CandleSeries(symbol, "1h", ts, c, c * 1.001, c * 0.999, c, np.array(volumes, dtype=np.float64), end)


def ticker(symbol: str, price: str = "100", change: str = "0") -> Ticker:
    p = D(price)
    return Ticker(symbol, p, p, p, 0.0, change_pct_24h=D(change))


# --- filters -------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(volume=finite, avg=finite, factor=st.floats(min_value=0.1, max_value=10.0))
def test_volume_filter_is_strictly_more_than_factor_times_average(volume: float, avg: float,
                                                                   factor: float) -> None:
    assert passes_volume(volume, avg, factor) == (volume > factor * avg)


def test_volume_filter_at_the_boundary() -> None:
    assert not passes_volume(30.0, 20.0, 1.5)  # exactly 1.5x is not a surge
    assert passes_volume(30.000001, 20.0, 1.5)


@settings(max_examples=200, deadline=None)
@given(change=changes, minimum=st.floats(min_value=0.0, max_value=10.0))
def test_momentum_filter_takes_moves_either_way(change: float, minimum: float) -> None:
    assert passes_momentum(change, minimum) == (abs(change) > minimum)
    assert passes_momentum(change, minimum) == passes_momentum(-change, minimum)


stats_strategy = st.builds(
    SymbolStats,
    symbol=st.sampled_from([f"S{i}/USDT" for i in range(40)]),
    volume=st.one_of(finite, st.just(math.nan), st.just(0.0)),
    avg_volume=st.one_of(finite, st.just(math.nan), st.just(0.0)),
    change_pct=st.one_of(changes, st.just(math.nan)),
)


@settings(max_examples=200, deadline=None)
@given(stats=st.lists(stats_strategy, max_size=40, unique_by=lambda s: s.symbol),
       top_n=st.integers(min_value=1, max_value=10))
def test_rank_matches_a_plain_reference(stats: list[SymbolStats], top_n: int) -> None:
    params = ScanParams(volume_factor=1.5, min_change_pct=1.0, top_n=top_n)
    result = rank(stats, params)
    expected: list[Candidate] = []
    for s in stats:
        good = all(math.isfinite(v) for v in (s.volume, s.avg_volume, s.change_pct))
        if not good or s.volume <= 0 or s.avg_volume <= 0:
            assert s.symbol in result.skipped
            continue
        assert s.symbol not in result.skipped
        if s.volume > 1.5 * s.avg_volume and abs(s.change_pct) > 1.0:
            ratio = s.volume / s.avg_volume
            expected.append(Candidate(s.symbol, ratio * abs(s.change_pct), ratio, s.change_pct))
    expected.sort(key=lambda c: (-c.score, c.symbol))
    assert result.passed == len(expected)
    assert list(result.candidates) == expected[:top_n]
    assert result.scanned == len(stats)


def test_rank_orders_by_volume_ratio_times_move() -> None:
    stats = [
        SymbolStats("BIG/USDT", volume=2_000.0, avg_volume=1_000.0, change_pct=2.0),   # 2 x 2 = 4
        SymbolStats("HOT/USDT", volume=300.0, avg_volume=100.0, change_pct=-5.0),      # 3 x 5 = 15
        SymbolStats("MID/USDT", volume=400.0, avg_volume=100.0, change_pct=1.5),       # 4 x 1.5 = 6
        SymbolStats("FLAT/USDT", volume=900.0, avg_volume=100.0, change_pct=0.5),      # no momentum
        SymbolStats("QUIET/USDT", volume=140.0, avg_volume=100.0, change_pct=9.0),     # no volume surge
    ]
    result = rank(stats, ScanParams(top_n=2))
    assert [c.symbol for c in result.candidates] == ["HOT/USDT", "MID/USDT"]
    assert result.passed == 3
    assert result.candidates[0].change_pct == -5.0  # a falling market is a (short) candidate too


@pytest.mark.parametrize(("symbol", "ok"), [
    ("BTC/USDT:USDT", True), ("BTC/USDT", True), ("ETH/BUSD:BUSD", False), ("BTC/USDT:USDT-250328", False),
    ("BTC/USDC:USDC", False), ("/USDT", False),
])
def test_only_usdt_perpetuals_are_scanned(symbol: str, ok: bool) -> None:
    assert is_usdt_perpetual(symbol) is ok


# --- where the numbers come from ---------------------------------------------------------------------------


def test_change_comes_from_the_ticker_when_it_reports_one() -> None:
    closes = [100.0] * 30
    volumes = [10.0] * 29 + [40.0]
    got = stats_from("A/USDT", ticker("A/USDT", change="-3.5"), hourly("A/USDT", closes, volumes, 1e6),
                     ScanParams())
    assert isinstance(got, SymbolStats)
    assert got.change_pct == -3.5 and got.change_source == "ticker"
    assert got.volume == 40.0 and got.avg_volume == 10.0


def test_change_and_volume_derived_from_1h_candles_without_ticker_figures() -> None:
    closes = [100.0] * 5 + [100.0 + i for i in range(25)]  # last close 124, 24 bars earlier 100
    volumes = [5.0] * 9 + [10.0] * 20 + [33.0]
    got = stats_from("A/USDT", ticker("A/USDT"), hourly("A/USDT", closes, volumes, 1e6), ScanParams())
    assert isinstance(got, SymbolStats)
    assert got.change_source == "candles"
    assert got.change_pct == pytest.approx((closes[-1] / closes[-1 - CHANGE_BARS] - 1) * 100)
    assert got.volume == 33.0
    assert got.avg_volume == pytest.approx(10.0)  # the 20 bars before the last, not the older ones


@pytest.mark.parametrize(("closes", "volumes", "why"), [
    ([100.0] * 10, [1.0] * 10, "too few"),
    ([100.0] * 20 + [math.nan] * 10, [1.0] * 30, "non-finite"),
    ([0.0] * 6 + [100.0] * 24, [1.0] * 30, "zero close"),
])
def test_candle_problems_are_reasons_not_numbers(closes: list[float], volumes: list[float], why: str) -> None:
    got = stats_from("A/USDT", ticker("A/USDT"), hourly("A/USDT", closes, volumes, 1e6), ScanParams())
    assert isinstance(got, str) and why in got


# --- the async scanner -------------------------------------------------------------------------------------


class Market:
    """Tickers and 1h candles a test scripts; counts candle requests."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.tickers: list[Ticker] = []
        self.series: dict[str, CandleSeries] = {}
        self.requests = 0
        self.fail_tickers: Exception | None = None
        self.fail_candles: dict[str, Exception] = {}

    async def get_tickers(self) -> list[Ticker]:
        if self.fail_tickers is not None:
            raise self.fail_tickers
        return list(self.tickers)

    async def get_candles(self, symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        self.requests += 1
        if symbol in self.fail_candles:
            raise self.fail_candles[symbol]
        series = self.series.get(symbol)
        return None if series is None else series.tail(limit)


def surge(symbol: str, end: float, last_volume: float, move_pct: float) -> CandleSeries:
    closes = [100.0] * 6 + [100.0 + move_pct * i / 24 for i in range(25)]
    return hourly(symbol, closes, [10.0] * 30 + [last_volume], end)


def make_scanner(clock: SimClock, market: Market, top_n: int = 5) -> Scanner:
    cache = CandleCache(market.get_candles, clock, concurrency=4, timeout=5.0)
    return Scanner(market.get_tickers, cache, ScanParams(top_n=top_n), clock, timeout=5.0)


async def test_scan_ranks_the_market_and_skips_bad_data_with_a_log_line() -> None:
    clock = SimClock(start=1_700_000_000.0)
    end = clock.now() - clock.now() % HOUR
    market = Market(clock)
    market.tickers = [ticker("HOT/USDT:USDT"), ticker("WARM/USDT:USDT"), ticker("COLD/USDT:USDT"),
                      ticker("BAD/USDT:USDT"), ticker("NAN/USDT:USDT"), ticker("ETH/BTC"),
                      ticker("GONE/USDT:USDT"), Ticker("ZERO/USDT:USDT", D(0), D(0), D(0), 0.0)]
    market.series = {
        "HOT/USDT:USDT": surge("HOT/USDT:USDT", end, 50.0, -4.0),
        "WARM/USDT:USDT": surge("WARM/USDT:USDT", end, 20.0, 2.0),
        "COLD/USDT:USDT": surge("COLD/USDT:USDT", end, 12.0, 2.0),
        "BAD/USDT:USDT": surge("BAD/USDT:USDT", end, 0.0, 3.0),
        "NAN/USDT:USDT": surge("NAN/USDT:USDT", end, math.nan, 3.0),
    }
    market.fail_candles = {"GONE/USDT:USDT": DependencyError("bad symbol")}
    with capture_logs() as logs:
        result = await make_scanner(clock, market).scan()
    assert [c.symbol for c in result.candidates] == ["HOT/USDT:USDT", "WARM/USDT:USDT"]
    assert result.scanned == 7  # the USDT perpetuals; ETH/BTC is not one
    assert set(result.skipped) == {"BAD/USDT:USDT", "NAN/USDT:USDT", "GONE/USDT:USDT", "ZERO/USDT:USDT"}
    assert "zero volume" in result.skipped["BAD/USDT:USDT"]
    assert any(e["event"] == "scan skipped symbols with bad data" for e in logs)


async def test_a_failing_ticker_source_gives_an_empty_scan_not_an_error() -> None:
    clock = SimClock()
    market = Market(clock)
    market.fail_tickers = TemporaryError("503")
    result = await make_scanner(clock, market).scan()
    assert result.candidates == () and result.scanned == 0


async def test_hourly_candles_are_fetched_once_per_bar() -> None:
    clock = SimClock(start=1_700_000_000.0)
    end = clock.now() - clock.now() % HOUR  # open time of the bar still forming
    market = Market(clock)
    market.tickers = [ticker("HOT/USDT:USDT")]
    market.series = {"HOT/USDT:USDT": surge("HOT/USDT:USDT", end, 50.0, 3.0)}
    scanner = make_scanner(clock, market)
    for _ in range(5):
        await scanner.scan()
        await clock.advance(60)
    assert market.requests == 1
    await clock.advance(HOUR)  # the next bar has closed: fetched again
    await scanner.scan()
    assert market.requests == 2
