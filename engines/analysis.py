"""Multi-timeframe analysis of the scanner's candidates: a direction, a confidence and exit levels.

Three parts, kept apart on purpose:

- `CandleCache`: candles per (symbol, timeframe), kept until that timeframe's next bar is due to
  close, fetched concurrently under an `asyncio.Semaphore` (the bound on requests in flight; the
  source itself waits on the shared request-weight budget when it talks to Binance). The source is
  an async callable, so live can fetch through the exchange and replay reads the feed.
- `read_indicators` / `rules_for` / `score`: pure functions of closed candles, so the same inputs
  always give the same score, and tests can check each rule on its own.
- `Analyzer`: fetch, then score, on demand (after a scan).

Scoring (per direction; short mirrors long), weights summing to 100:

| rule | timeframe | long holds when | weight |
|---|---|---|---|
| trend | 4h | EMA fast > EMA slow | 25 |
| trend | 1h | EMA fast > EMA slow and close > EMA fast | 20 |
| trend | 15m | EMA fast > EMA slow | 10 |
| RSI zone | 1h | rsi_long_min <= RSI <= rsi_long_max (short: 100-max .. 100-min) | 15 |
| MACD side | 1h | MACD line > signal line | 10 |
| MACD cross | 1h | the line crossed above the signal in the last `macd_cross_bars` bars | 10 |
| volume | 1h | last volume > volume_factor x mean of the `volume_bars` before | 10 |

The direction is the side with the higher score (a tie is no signal); the confidence is that score.
Every weight is positive, so turning any rule of a side on never lowers that side's score.

Exit levels: the stop sits 2 x ATR(1h) from the entry, but never more than `max_stop_pct` away; the
take-profit sits `reward_risk` (1.5) times that distance on the other side. Both are Decimal, computed
from the entry exactly, so the 3% bound holds to the last digit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import structlog

from core.clock import Clock
from core.errors import DependencyError, TemporaryError
from core.types import CandleSeries, FloatArray, PositionSide
from core.values import value_type
from engines.indicators import atr, ema, macd, rsi
from exchange.candles import timeframe_seconds

log = structlog.get_logger("analysis")

TREND_TF = "4h"
SIGNAL_TF = "1h"
ENTRY_TF = "15m"
TIMEFRAMES = (TREND_TF, SIGNAL_TF, ENTRY_TF)

_HUNDRED = Decimal(100)

CandleSource = Callable[[str, str, int], Awaitable[CandleSeries | None]]
"""(symbol, timeframe, limit) -> the newest `limit` closed candles, or None when there are none."""

Key = tuple[str, str]


# --- candles -------------------------------------------------------------------------------------------


def candle_problem(series: CandleSeries) -> str | None:
    """Why a series cannot be used, or None. Prices must be finite and positive, volumes finite and not
    negative, open times strictly increasing: anything else is rejected rather than repaired."""
    if len(series) == 0:
        return "no candles"
    prices = (series.open, series.high, series.low, series.close)
    if not all(bool(np.isfinite(a).all()) and bool((a > 0).all()) for a in prices):
        return "non-finite or non-positive price"
    if not bool(np.isfinite(series.volume).all()) or bool((series.volume < 0).any()):
        return "non-finite or negative volume"
    if len(series) > 1 and not bool((np.diff(series.ts) > 0).all()):
        return "candles out of order"
    return None


@dataclass(slots=True)
class _Entry:
    series: CandleSeries
    length: int
    requested: int  # the limit it was fetched with: a shorter series is all the source has
    due: float  # clock time at which the next bar closes; refetch from then on


@dataclass(slots=True)
class CacheStats:
    fetches: int = 0
    hits: int = 0
    errors: int = 0
    rejected: int = 0


class CandleCache:
    """Candles per (symbol, timeframe), valid until the timeframe's next bar is due to close.

    The newest closed bar opened at `ts[-1]`; the next one closes at `ts[-1] + 2 * timeframe`. Until
    then a refetch could only return the same bars, so none is made. From then on every request
    refetches until the new bar shows up. (A replay's bars are history, long before the clock's now,
    so there every request reads the feed again, which costs nothing.)

    A fetch that fails (timeout, temporary or dependency error) or returns bad data gives None for that
    key, is logged and is not cached: that symbol is skipped this time, the others go on.
    """

    def __init__(self, source: CandleSource, clock: Clock, *, concurrency: int = 8,
                 timeout: float = 10.0) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._source = source
        self._clock = clock
        self._timeout = timeout
        self._semaphore = asyncio.Semaphore(concurrency)
        self._entries: dict[Key, _Entry] = {}
        self.stats = CacheStats()

    def cached(self, symbol: str, timeframe: str) -> CandleSeries | None:
        entry = self._entries.get((symbol, timeframe))
        return entry.series if entry is not None else None

    def _fresh(self, key: Key, limit: int, now: float) -> CandleSeries | None:
        entry = self._entries.get(key)
        if entry is None or entry.requested < limit or now >= entry.due:
            return None
        self.stats.hits += 1
        # The very object cached when no trimming is needed: consumers may memoize on its identity.
        return entry.series.tail(limit) if entry.length > limit else entry.series

    async def get(self, symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        key = (symbol, timeframe)
        hit = self._fresh(key, limit, self._clock.now())
        if hit is not None:
            return hit
        return await self._fetch(symbol, timeframe, limit)

    async def _fetch(self, symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        key = (symbol, timeframe)
        async with self._semaphore:
            self.stats.fetches += 1
            try:
                series = await self._clock.wait_for(self._source(symbol, timeframe, limit), self._timeout)
            except (TimeoutError, TemporaryError, DependencyError) as exc:
                self.stats.errors += 1
                log.warning("candles unavailable: symbol skipped", symbol=symbol, timeframe=timeframe,
                            error=str(exc) or type(exc).__name__)
                return None
        if series is None:
            return None
        problem = candle_problem(series)
        if problem is not None:
            self.stats.rejected += 1
            log.warning("bad candles rejected: symbol skipped", symbol=symbol, timeframe=timeframe,
                        problem=problem)
            return None
        due = float(series.ts[-1]) + 2 * timeframe_seconds(timeframe)
        self._entries[key] = _Entry(series, len(series), limit, due)
        return series

    async def get_many(self, keys: Sequence[Key], limit: int) -> dict[Key, CandleSeries | None]:
        """Every key at once, at most `concurrency` requests in flight; one failing key is None.
        Cached keys are answered without a task (a steady-state scan of the whole market is all hits)."""
        now = self._clock.now()
        out: dict[Key, CandleSeries | None] = {}
        missing: list[Key] = []
        for key in dict.fromkeys(keys):
            hit = self._fresh(key, limit, now)
            if hit is None:
                missing.append(key)
            else:
                out[key] = hit
        if missing:
            async with asyncio.TaskGroup() as group:
                tasks = {key: group.create_task(self._fetch(key[0], key[1], limit)) for key in missing}
            out.update((key, task.result()) for key, task in tasks.items())
        return out


# --- indicators and rules (pure) -------------------------------------------------------------------------


@value_type
class AnalysisParams:
    ema_fast: int = 9
    ema_slow: int = 21
    rsi_period: int = 14
    rsi_long_min: float = 50.0
    rsi_long_max: float = 70.0
    macd_fast: int = 12
    macd_slow: int = 26
    macd_signal: int = 9
    macd_cross_bars: int = 3
    atr_period: int = 14
    volume_factor: float = 1.5
    volume_bars: int = 20
    stop_atr_multiple: float = 2.0
    max_stop_pct: float = 3.0
    reward_risk: float = 1.5

    def __post_init__(self) -> None:
        if self.ema_fast >= self.ema_slow:
            raise ValueError(f"ema_fast ({self.ema_fast}) must be below ema_slow ({self.ema_slow})")
        if self.rsi_long_min > self.rsi_long_max:
            raise ValueError("rsi_long_min must not exceed rsi_long_max")
        if self.macd_fast >= self.macd_slow:
            raise ValueError(f"macd_fast ({self.macd_fast}) must be below macd_slow ({self.macd_slow})")

    @property
    def trend_bars(self) -> int:
        """Bars the EMA rules need on any timeframe (the slow EMA's seed plus a margin)."""
        return self.ema_slow + 2

    @property
    def signal_bars(self) -> int:
        """Bars the 1h rules need: MACD (with its cross window), RSI, ATR, the volume window."""
        return max(self.trend_bars, self.macd_slow + self.macd_signal + self.macd_cross_bars,
                   self.rsi_period + 2, self.atr_period + 2, self.volume_bars + 1)


@value_type
class Reading:
    """The indicator values the rules read. `macd_hist` holds the last macd_cross_bars + 1 values."""

    ema_fast_4h: float
    ema_slow_4h: float
    ema_fast_1h: float
    ema_slow_1h: float
    close_1h: float
    ema_fast_15m: float
    ema_slow_15m: float
    rsi_1h: float
    macd_hist: tuple[float, ...]
    volume_1h: float
    avg_volume_1h: float
    atr_1h: float
    entry: float
    bar_ts: float


@value_type
class Rules:
    """Which rules hold for one direction."""

    trend_4h: bool = False
    trend_1h: bool = False
    trend_15m: bool = False
    rsi_zone: bool = False
    macd_side: bool = False
    macd_cross: bool = False
    volume: bool = False


WEIGHTS: dict[str, int] = {
    "trend_4h": 25,
    "trend_1h": 20,
    "trend_15m": 10,
    "rsi_zone": 15,
    "macd_side": 10,
    "macd_cross": 10,
    "volume": 10,
}
assert sum(WEIGHTS.values()) == 100 and set(WEIGHTS) == {f.name for f in dataclasses.fields(Rules)}


@value_type
class Score:
    direction: PositionSide | None
    confidence: float
    long_score: int
    short_score: int


@value_type
class Signal:
    """A trade idea. `entry` is the last 15m close; the engine re-anchors the levels on its real fill
    at the same distance (`stop_distance_pct`)."""

    symbol: str
    direction: PositionSide
    confidence: float
    entry: Decimal
    stop: Decimal
    take_profit: Decimal
    stop_distance_pct: Decimal
    atr_pct: float
    reasons: tuple[str, ...]
    bar_ts: float


def _last(values: FloatArray) -> float:
    return float(values[-1]) if len(values) else math.nan


def read_indicators(c4h: CandleSeries, c1h: CandleSeries, c15m: CandleSeries,
                    p: AnalysisParams) -> Reading | str:
    """The readings, or why there are none (too few bars, non-finite values)."""
    for series, need in ((c4h, p.trend_bars), (c1h, p.signal_bars), (c15m, p.trend_bars)):
        if len(series) < need:
            return f"warming up: {len(series)}/{need} {series.timeframe} bars"
    _, _, hist = macd(c1h.close, p.macd_fast, p.macd_slow, p.macd_signal)
    volume = c1h.volume
    reading = Reading(
        ema_fast_4h=_last(ema(c4h.close, p.ema_fast)),
        ema_slow_4h=_last(ema(c4h.close, p.ema_slow)),
        ema_fast_1h=_last(ema(c1h.close, p.ema_fast)),
        ema_slow_1h=_last(ema(c1h.close, p.ema_slow)),
        close_1h=float(c1h.close[-1]),
        ema_fast_15m=_last(ema(c15m.close, p.ema_fast)),
        ema_slow_15m=_last(ema(c15m.close, p.ema_slow)),
        rsi_1h=_last(rsi(c1h.close, p.rsi_period)),
        macd_hist=tuple(float(v) for v in hist[-p.macd_cross_bars - 1 :]),
        volume_1h=float(volume[-1]),
        avg_volume_1h=float(np.mean(volume[-p.volume_bars - 1 : -1])),
        atr_1h=_last(atr(c1h.high, c1h.low, c1h.close, p.atr_period)),
        entry=float(c15m.close[-1]),
        bar_ts=float(c15m.ts[-1]),
    )
    numbers = [getattr(reading, f.name) for f in dataclasses.fields(Reading) if f.name != "macd_hist"]
    if not all(math.isfinite(v) for v in (*numbers, *reading.macd_hist)):
        return "non-finite indicator values"
    return reading


def _crossed(hist: Sequence[float], up: bool) -> bool:
    """The MACD line crossed the signal (the histogram changed sign) inside the window and stayed."""
    if not hist:
        return False
    now = hist[-1]
    if (now <= 0) if up else (now >= 0):
        return False
    return any((a <= 0 < b) if up else (a >= 0 > b) for a, b in itertools.pairwise(hist))


def rules_for(r: Reading, p: AnalysisParams) -> tuple[Rules, Rules]:
    """(long rules, short rules) for one reading."""
    volume = r.volume_1h > p.volume_factor * r.avg_volume_1h
    long = Rules(
        trend_4h=r.ema_fast_4h > r.ema_slow_4h,
        trend_1h=r.ema_fast_1h > r.ema_slow_1h and r.close_1h > r.ema_fast_1h,
        trend_15m=r.ema_fast_15m > r.ema_slow_15m,
        rsi_zone=p.rsi_long_min <= r.rsi_1h <= p.rsi_long_max,
        macd_side=r.macd_hist[-1] > 0,
        macd_cross=_crossed(r.macd_hist, up=True),
        volume=volume,
    )
    short = Rules(
        trend_4h=r.ema_fast_4h < r.ema_slow_4h,
        trend_1h=r.ema_fast_1h < r.ema_slow_1h and r.close_1h < r.ema_fast_1h,
        trend_15m=r.ema_fast_15m < r.ema_slow_15m,
        rsi_zone=100.0 - p.rsi_long_max <= r.rsi_1h <= 100.0 - p.rsi_long_min,
        macd_side=r.macd_hist[-1] < 0,
        macd_cross=_crossed(r.macd_hist, up=False),
        volume=volume,
    )
    return long, short


def rule_score(rules: Rules) -> int:
    return sum(w for name, w in WEIGHTS.items() if getattr(rules, name))


def score(long: Rules, short: Rules) -> Score:
    """The side with more weight behind it; a tie is no direction (confidence 0)."""
    ls, ss = rule_score(long), rule_score(short)
    if ls > ss:
        return Score(PositionSide.LONG, float(ls), ls, ss)
    if ss > ls:
        return Score(PositionSide.SHORT, float(ss), ls, ss)
    return Score(None, 0.0, ls, ss)


def _reasons(rules: Rules) -> tuple[str, ...]:
    return tuple(name for name in WEIGHTS if getattr(rules, name))


def to_decimal(value: float) -> Decimal:
    """A float indicator value as the Decimal of its shortest repr (what a person would read)."""
    return Decimal(repr(float(value)))


def exit_levels(entry: Decimal, atr_value: Decimal, side: PositionSide,
                p: AnalysisParams) -> tuple[Decimal, Decimal, Decimal]:
    """(stop, take-profit, stop distance): distance = min(multiple x ATR, max_stop_pct of entry).

    Raises ValueError for a non-positive entry or ATR: a stop at the entry is no stop.
    """
    if not entry.is_finite() or entry <= 0 or not atr_value.is_finite() or atr_value <= 0:
        raise ValueError(f"entry ({entry}) and ATR ({atr_value}) must be positive")
    cap = entry * to_decimal(p.max_stop_pct) / _HUNDRED
    distance = min(atr_value * to_decimal(p.stop_atr_multiple), cap)
    reward = distance * to_decimal(p.reward_risk)
    if side is PositionSide.LONG:
        return entry - distance, entry + reward, distance
    return entry + distance, entry - reward, distance


def evaluate(symbol: str, c4h: CandleSeries, c1h: CandleSeries, c15m: CandleSeries,
             p: AnalysisParams) -> Signal | str:
    """A signal for one symbol, or why there is none. Pure: same candles, same answer."""
    reading = read_indicators(c4h, c1h, c15m, p)
    if isinstance(reading, str):
        return reading
    long, short = rules_for(reading, p)
    s = score(long, short)
    if s.direction is None:
        return f"no direction (long {s.long_score} = short {s.short_score})"
    if reading.atr_1h <= 0 or reading.entry <= 0:
        return "no volatility measure (flat prices)"
    entry = to_decimal(reading.entry)
    stop, target, distance = exit_levels(entry, to_decimal(reading.atr_1h), s.direction, p)
    rules = long if s.direction is PositionSide.LONG else short
    return Signal(
        symbol=symbol,
        direction=s.direction,
        confidence=s.confidence,
        entry=entry,
        stop=stop,
        take_profit=target,
        stop_distance_pct=distance / entry * _HUNDRED,
        atr_pct=reading.atr_1h / reading.entry * 100.0,
        reasons=_reasons(rules),
        bar_ts=reading.bar_ts,
    )


# --- the async shell -------------------------------------------------------------------------------------


@value_type
class AnalysisResult:
    """Signals best first (confidence, then symbol); `skipped` says why the others gave none."""

    signals: tuple[Signal, ...]
    skipped: dict[str, str]


class Analyzer:
    def __init__(self, cache: CandleCache, params: AnalysisParams, *, limit: int = 200) -> None:
        self.cache = cache
        self.params = params
        self.limit = max(limit, params.signal_bars * 3)

    async def analyze(self, symbols: Sequence[str]) -> AnalysisResult:
        """Candles for every symbol and timeframe fetched together, then scored one by one."""
        keys = [(s, tf) for s in symbols for tf in TIMEFRAMES]
        data = await self.cache.get_many(keys, self.limit)
        signals: list[Signal] = []
        skipped: dict[str, str] = {}
        for symbol in dict.fromkeys(symbols):
            c4h, c1h, c15m = (data.get((symbol, tf)) for tf in TIMEFRAMES)
            if c4h is None or c1h is None or c15m is None:
                skipped[symbol] = "candles unavailable"
                continue
            got = evaluate(symbol, c4h, c1h, c15m, self.params)
            if isinstance(got, str):
                skipped[symbol] = got
            else:
                signals.append(got)
        signals.sort(key=lambda s: (-s.confidence, s.symbol))
        return AnalysisResult(tuple(signals), skipped)
