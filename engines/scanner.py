"""The futures scanner: which USDT perpetuals are moving on unusual volume right now.

A cheap first pass over the whole market, so that the expensive multi-timeframe analysis only runs on a
handful of symbols. The rules are pure functions of a few numbers per symbol (`SymbolStats`), so the
property tests and the benchmark exercise exactly what the engine runs; `Scanner` is the async shell
that gathers those numbers.

Where the numbers come from, and why:

- **Volume.** The latest closed 1h bar's volume against the mean of the `volume_bars` (20) 1h bars
  before it. A ticker only carries one rolling 24h volume, which has no history to average against,
  so the volume rule always reads 1h candles (cached until the next 1h bar, so a live scan costs one
  kline request per symbol per hour, not per scan).
- **24h change.** The ticker's own 24h change where it reports one (Binance's `priceChangePercent`).
  A ticker that does not (zero, the `Ticker` default; the replay and paper feeds may leave it so) gets
  it from 1h candles: the last close against the close 24 bars earlier.
- **Rank.** volume ratio x |24h change|: relative volume, so that BTC's sheer size does not win every
  scan, times the size of the move.

Bad data (NaN, None, zero, missing candles) skips that symbol for this scan only, with the reason in
`ScanResult.skipped` and one log line per scan.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import field
from decimal import Decimal

import structlog

from core.clock import Clock
from core.errors import DependencyError, TemporaryError
from core.types import CandleSeries, Ticker
from core.values import value_type
from engines.analysis import SIGNAL_TF, CandleCache

log = structlog.get_logger("scanner")

CHANGE_BARS = 24  # 1h bars in the 24h change
SCAN_TIMEFRAME = SIGNAL_TF  # "1h"

TickerSource = Callable[[], Awaitable[Sequence[Ticker]]]


@value_type
class ScanParams:
    volume_factor: float = 1.5
    volume_bars: int = 20
    min_change_pct: float = 1.0
    top_n: int = 5

    @property
    def candle_bars(self) -> int:
        """1h bars one symbol needs: the volume window plus the latest bar, or 24h of closes."""
        return max(self.volume_bars + 1, CHANGE_BARS + 1)


@value_type
class SymbolStats:
    """What the rules read for one symbol. `change_source` says where the 24h change came from."""

    symbol: str
    volume: float
    avg_volume: float
    change_pct: float
    change_source: str = "ticker"


@value_type
class Candidate:
    symbol: str
    score: float
    volume_ratio: float
    change_pct: float


@value_type
class ScanResult:
    """`passed` counts every symbol through both filters, before the top-N cut."""

    candidates: tuple[Candidate, ...]
    scanned: int
    passed: int
    skipped: dict[str, str] = field(default_factory=dict)


# --- the rules (pure) --------------------------------------------------------------------------------


def passes_volume(volume: float, avg_volume: float, factor: float) -> bool:
    """Strictly more than `factor` times the average: exactly 1.5x is not a surge."""
    return volume > factor * avg_volume


def passes_momentum(change_pct: float, min_change_pct: float) -> bool:
    """A move of more than `min_change_pct` either way: shorts are traded too."""
    return abs(change_pct) > min_change_pct


def bad_data(stats: SymbolStats) -> str | None:
    """Why these numbers cannot be ranked, or None. A zero or negative average would make any volume
    look like a surge, so it is bad data, not a pass."""
    isfinite = math.isfinite
    if not (isfinite(stats.volume) and isfinite(stats.avg_volume) and isfinite(stats.change_pct)):
        return "non-finite volume or change"
    if stats.volume <= 0:
        return "zero volume"
    if stats.avg_volume <= 0:
        return "zero average volume"
    return None


def rank(stats: Iterable[SymbolStats], params: ScanParams) -> ScanResult:
    """Filter on volume and momentum, rank by volume ratio x |change|, keep the top N.

    Ties are broken by symbol, so the same market always gives the same candidates.
    """
    passed: list[Candidate] = []
    skipped: dict[str, str] = {}
    scanned = 0
    for s in stats:
        scanned += 1
        problem = bad_data(s)
        if problem is not None:
            skipped[s.symbol] = problem
            continue
        if not passes_volume(s.volume, s.avg_volume, params.volume_factor):
            continue
        if not passes_momentum(s.change_pct, params.min_change_pct):
            continue
        ratio = s.volume / s.avg_volume
        passed.append(Candidate(s.symbol, ratio * abs(s.change_pct), ratio, s.change_pct))
    passed.sort(key=lambda c: (-c.score, c.symbol))
    return ScanResult(tuple(passed[: params.top_n]), scanned, len(passed), skipped)


def is_usdt_perpetual(symbol: str) -> bool:
    """`BTC/USDT:USDT` (ccxt's USD-M perpetual) or `BTC/USDT` (the replay and paper spelling); not a
    dated contract (`BTC/USDT:USDT-250328`) and not another quote."""
    base, _, rest = symbol.partition("/")
    quote, _, settle = rest.partition(":")
    return bool(base) and quote == "USDT" and settle in ("", "USDT")


def ticker_change_pct(ticker: Ticker | None) -> float | None:
    """The ticker's 24h change, or None when it does not report one (zero is the 'not reported'
    default of `Ticker`, and a market that moved exactly 0.0000% is no candidate anyway)."""
    if ticker is None:
        return None
    change: Decimal = ticker.change_pct_24h
    if not change.is_finite() or change == 0:
        return None
    return float(change)


@value_type
class CandleFigures:
    """What the 1h candles say, fixed until the next 1h bar: the volume rule's inputs and the 24h
    change from closes (None, with `change_problem`, when the candles cannot give it)."""

    volume: float
    avg_volume: float
    change_pct: float | None
    change_problem: str = ""


def candle_figures(candles: CandleSeries | None, params: ScanParams) -> CandleFigures | str:
    if candles is None:
        return "no 1h candles"
    n = int(candles.close.shape[0])
    if n < params.volume_bars + 1:
        return f"too few 1h candles ({n}/{params.volume_bars + 1})"
    # Plain floats: for 20 values a Python sum is several times cheaper than a numpy reduction, and the
    # scan does this for every perpetual on the exchange.
    window: list[float] = candles.volume[-params.volume_bars - 1 :].tolist()
    volume = window[-1]
    avg_volume = math.fsum(window[:-1]) / params.volume_bars
    if n < CHANGE_BARS + 1:
        return CandleFigures(volume, avg_volume, None, f"too few 1h candles for the 24h change ({n}/{CHANGE_BARS + 1})")
    then = float(candles.close[-CHANGE_BARS - 1])
    now = float(candles.close[-1])
    if not (math.isfinite(then) and math.isfinite(now)) or then <= 0 or now <= 0:
        return CandleFigures(volume, avg_volume, None, "non-finite or zero close")
    return CandleFigures(volume, avg_volume, (now / then - 1.0) * 100.0)


def combine(symbol: str, ticker: Ticker | None, figures: CandleFigures) -> SymbolStats | str:
    """The ticker's 24h change where it reports one, else the candles'."""
    change = ticker_change_pct(ticker)
    if change is not None:
        return SymbolStats(symbol, figures.volume, figures.avg_volume, change, "ticker")
    if figures.change_pct is None:
        return figures.change_problem
    return SymbolStats(symbol, figures.volume, figures.avg_volume, figures.change_pct, "candles")


def stats_from(symbol: str, ticker: Ticker | None, candles: CandleSeries | None,
               params: ScanParams) -> SymbolStats | str:
    """The rules' inputs for one symbol, or the reason there are none."""
    figures = candle_figures(candles, params)
    return figures if isinstance(figures, str) else combine(symbol, ticker, figures)


def valid_price(ticker: Ticker) -> bool:
    bid, ask, last = ticker.bid, ticker.ask, ticker.last
    return bid.is_finite() and ask.is_finite() and last.is_finite() and bid > 0 and ask > 0 and last > 0


# --- the async shell ----------------------------------------------------------------------------------


class Scanner:
    """Fetch tickers, keep the USDT perpetuals, read their 1h candles (through the shared cache), rank.

    The engine calls `scan()` every `futures_scan_interval_seconds`. A ticker source that fails this
    time gives an empty result (logged), never an exception: the next scan simply tries again.
    """

    def __init__(self, tickers: TickerSource, candles: CandleCache, params: ScanParams, clock: Clock,
                 *, timeout: float = 10.0, candle_limit: int = 200) -> None:
        self._tickers = tickers
        self._candles = candles
        self.params = params
        self._clock = clock
        self._timeout = timeout
        self._limit = max(candle_limit, params.candle_bars)
        self.last: ScanResult | None = None
        self.last_at: float | None = None
        self.scans = 0
        # Per symbol: the series the figures were computed from (the cache hands out the same object
        # until a new bar), so a steady-state scan recomputes nothing from candles.
        self._figures: dict[str, tuple[CandleSeries, CandleFigures | str]] = {}
        self._perpetual: dict[str, bool] = {}

    async def scan(self) -> ScanResult:
        self.scans += 1
        self.last_at = self._clock.now()
        try:
            tickers = await self._clock.wait_for(self._tickers(), self._timeout)
        except (TimeoutError, TemporaryError, DependencyError) as exc:
            log.warning("scan skipped: tickers unavailable", error=str(exc) or type(exc).__name__)
            self.last = ScanResult((), 0, 0, {})
            return self.last
        skipped: dict[str, str] = {}
        universe: dict[str, Ticker] = {}
        seen = 0
        perpetual = self._perpetual
        for ticker in tickers:
            symbol = ticker.symbol
            ok = perpetual.get(symbol)
            if ok is None:
                ok = perpetual[symbol] = is_usdt_perpetual(symbol)
            if not ok:
                continue
            seen += 1
            if not valid_price(ticker):
                skipped[symbol] = "bad ticker price"
                continue
            universe[symbol] = ticker
        series = await self._candles.get_many([(s, SCAN_TIMEFRAME) for s in universe], self._limit)
        stats: list[SymbolStats] = []
        memo = self._figures
        for symbol, ticker in universe.items():
            candles = series.get((symbol, SCAN_TIMEFRAME))
            known = memo.get(symbol)
            if known is not None and candles is not None and known[0] is candles:
                figures = known[1]
            else:
                figures = candle_figures(candles, self.params)
                if candles is not None:
                    memo[symbol] = (candles, figures)
            got = figures if isinstance(figures, str) else combine(symbol, ticker, figures)
            if isinstance(got, str):
                skipped[symbol] = got
            else:
                stats.append(got)
        result = rank(stats, self.params)
        skipped.update(result.skipped)
        result = ScanResult(result.candidates, seen, result.passed, skipped)
        if skipped:
            log.info("scan skipped symbols with bad data", count=len(skipped),
                     symbols={s: r for s, r in sorted(skipped.items())[:20]})
        log.debug("scan", scanned=result.scanned, passed=result.passed,
                  candidates=[c.symbol for c in result.candidates])
        self.last = result
        return result
