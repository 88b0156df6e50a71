"""Multi-timeframe analysis: indicator correctness against plain references, the scoring rules (the same
inputs always give the same score; turning a bullish rule on never lowers the bullish score), the 3%
stop bound, and the candle cache (one fetch per bar, bounded concurrency, one bad symbol skipped)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.errors import TemporaryError
from core.types import CandleSeries, PositionSide
from engines.analysis import (
    TIMEFRAMES,
    WEIGHTS,
    AnalysisParams,
    Analyzer,
    CandleCache,
    Reading,
    Rules,
    Signal,
    evaluate,
    exit_levels,
    rule_score,
    rules_for,
    score,
)
from engines.indicators import ema, rsi
from exchange.candles import timeframe_seconds

D = Decimal
PARAMS = AnalysisParams()


# --- synthetic markets (also used by the engine's integration test) ----------------------------------------


def zigzag(n: int, start: float, up_pct: float, down_pct: float) -> list[float]:
    """Closes that alternate a rise and a smaller (or larger) fall: a trend with an RSI inside a band."""
    closes = [start]
    for i in range(1, n):
        move = up_pct if i % 2 else -down_pct
        closes.append(closes[-1] * (1 + move / 100))
    return closes


def series(symbol: str, timeframe: str, closes: list[float], end: float, *,
           last_volume: float = 100.0, volume: float = 100.0, observed_at: float | None = None) -> CandleSeries:
    """Closed candles ending with the bar that opened at `end - timeframe` (the one before `end`)."""
    tf = timeframe_seconds(timeframe)
    n = len(closes)
    ts = np.array([end - (n - i) * tf for i in range(n)], dtype=np.float64)
    c = np.array(closes, dtype=np.float64)
    o = np.concatenate(([c[0]], c[:-1]))
    hi = np.maximum(o, c) * 1.002
    lo = np.minimum(o, c) * 0.998
    v = np.full(n, volume, dtype=np.float64)
    v[-1] = last_volume
    return CandleSeries(symbol, timeframe, ts, o, hi, lo, c, v, end if observed_at is None else observed_at)


def trending(symbol: str, end: float, direction: PositionSide, *, price: float = 100.0,
             n: int = 200) -> dict[str, CandleSeries]:
    """4h, 1h and 15m candles of a steady trend with a volume surge on the last hour, ending at `price`."""
    up, down = (1.0, 0.6) if direction is PositionSide.LONG else (0.6, 1.0)
    out = {}
    for tf in TIMEFRAMES:
        closes = zigzag(n, 1.0, up, down)
        scale = price / closes[-1]
        closes = [c * scale for c in closes]
        out[tf] = series(symbol, tf, closes, end - end % timeframe_seconds(tf),
                         last_volume=300.0 if tf == "1h" else 100.0, observed_at=end)
    return out


# --- indicators against plain references --------------------------------------------------------------------


def reference_ema(values: list[float], period: int) -> list[float]:
    out = [math.nan] * len(values)
    if len(values) < period:
        return out
    k = 2.0 / (period + 1)
    prev = sum(values[:period]) / period
    out[period - 1] = prev
    for i in range(period, len(values)):
        prev = values[i] * k + prev * (1 - k)
        out[i] = prev
    return out


def reference_rsi(values: list[float], period: int) -> list[float]:
    out = [math.nan] * len(values)
    if len(values) <= period:
        return out
    changes = [values[i] - values[i - 1] for i in range(1, len(values))]
    gain = sum(max(c, 0.0) for c in changes[:period]) / period
    loss = sum(max(-c, 0.0) for c in changes[:period]) / period

    def value(g: float, lo: float) -> float:
        return 100.0 * g / (g + lo) if g + lo > 0 else 0.0

    out[period] = value(gain, loss)
    for i in range(period + 1, len(values)):
        c = changes[i - 1]
        gain = (gain * (period - 1) + max(c, 0.0)) / period
        loss = (loss * (period - 1) + max(-c, 0.0)) / period
        out[i] = value(gain, loss)
    return out


prices = st.lists(st.floats(min_value=1.0, max_value=1e5, allow_nan=False, allow_infinity=False),
                  min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(values=prices, period=st.integers(min_value=1, max_value=40))
def test_ema_matches_the_plain_recursion(values: list[float], period: int) -> None:
    got = ema(np.array(values), period)
    want = np.array(reference_ema(values, period))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    mask = ~np.isnan(want)
    assert np.allclose(got[mask], want[mask], rtol=1e-9, atol=0.0)


@settings(max_examples=150, deadline=None)
@given(values=prices, period=st.integers(min_value=2, max_value=30))
def test_rsi_matches_wilders_definition(values: list[float], period: int) -> None:
    got = rsi(np.array(values), period)
    want = np.array(reference_rsi(values, period))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    mask = ~np.isnan(want)
    assert np.allclose(got[mask], want[mask], rtol=1e-9, atol=1e-9)
    assert ((got[mask] >= 0) & (got[mask] <= 100)).all()


# --- scoring ----------------------------------------------------------------------------------------------

rules_strategy = st.builds(Rules, *[st.booleans() for _ in WEIGHTS])


@settings(max_examples=200, deadline=None)
@given(long=rules_strategy, short=rules_strategy)
def test_same_rules_same_score(long: Rules, short: Rules) -> None:
    assert score(long, short) == score(long, short)
    s = score(long, short)
    assert 0 <= s.confidence <= 100
    if s.direction is PositionSide.LONG:
        assert s.confidence == rule_score(long) > rule_score(short)
    elif s.direction is PositionSide.SHORT:
        assert s.confidence == rule_score(short) > rule_score(long)
    else:
        assert rule_score(long) == rule_score(short) and s.confidence == 0


@settings(max_examples=200, deadline=None)
@given(long=rules_strategy, short=rules_strategy, rule=st.sampled_from(list(WEIGHTS)))
def test_turning_a_bullish_rule_on_never_lowers_the_bullish_score(long: Rules, short: Rules, rule: str) -> None:
    off = dataclasses.replace(long, **{rule: False})
    on = dataclasses.replace(long, **{rule: True})
    assert rule_score(on) == rule_score(off) + WEIGHTS[rule]
    before, after = score(off, short), score(on, short)
    assert after.long_score >= before.long_score
    if before.direction is PositionSide.LONG:
        assert after.direction is PositionSide.LONG and after.confidence >= before.confidence


def test_all_bullish_rules_give_full_confidence() -> None:
    everything = Rules(**dict.fromkeys(WEIGHTS, True))
    assert score(everything, Rules()) .confidence == 100.0


def reading(**kw: object) -> Reading:
    base = dict(ema_fast_4h=101.0, ema_slow_4h=100.0, ema_fast_1h=101.0, ema_slow_1h=100.0, close_1h=102.0,
                ema_fast_15m=101.0, ema_slow_15m=100.0, rsi_1h=60.0, macd_hist=(-0.1, 0.2, 0.3, 0.4),
                volume_1h=200.0, avg_volume_1h=100.0, atr_1h=1.0, entry=102.0, bar_ts=0.0)
    base.update(kw)
    return Reading(**base)  # type: ignore[arg-type]


def test_each_rule_reads_its_own_indicator() -> None:
    long, short = rules_for(reading(), PARAMS)
    assert long == Rules(True, True, True, True, True, True, True)
    assert short == Rules(False, False, False, False, False, False, True)  # volume confirms either side
    long, _ = rules_for(reading(close_1h=100.5), PARAMS)
    assert not long.trend_1h  # price below the fast EMA: the 1h trend rule wants both
    long, short = rules_for(reading(rsi_1h=75.0), PARAMS)
    assert not long.rsi_zone and not short.rsi_zone  # overbought: neither side's zone
    _, short = rules_for(reading(rsi_1h=35.0), PARAMS)
    assert short.rsi_zone
    long, _ = rules_for(reading(macd_hist=(0.1, 0.2, 0.3, 0.4)), PARAMS)
    assert long.macd_side and not long.macd_cross  # above the signal for a while: no fresh cross
    long, _ = rules_for(reading(volume_1h=150.0), PARAMS)
    assert not long.volume  # exactly 1.5x is not a surge


def test_evaluate_reads_a_rising_market_as_long_and_a_falling_one_as_short() -> None:
    end = 1_700_000_000.0
    up = trending("UP/USDT", end, PositionSide.LONG)
    down = trending("DOWN/USDT", end, PositionSide.SHORT)
    long = evaluate("UP/USDT", up["4h"], up["1h"], up["15m"], PARAMS)
    short = evaluate("DOWN/USDT", down["4h"], down["1h"], down["15m"], PARAMS)
    assert isinstance(long, Signal) and isinstance(short, Signal)
    assert long.direction is PositionSide.LONG and long.confidence >= 80
    assert short.direction is PositionSide.SHORT and short.confidence >= 80
    assert long.stop < long.entry < long.take_profit
    assert short.take_profit < short.entry < short.stop
    again = evaluate("UP/USDT", up["4h"], up["1h"], up["15m"], PARAMS)
    assert again == long


def test_evaluate_says_why_there_is_no_signal() -> None:
    end = 1_700_000_000.0
    data = trending("UP/USDT", end, PositionSide.LONG, n=15)
    assert "warming up" in str(evaluate("UP/USDT", data["4h"], data["1h"], data["15m"], PARAMS))
    flat = {tf: series("F/USDT", tf, [100.0] * 200, end) for tf in TIMEFRAMES}
    got = evaluate("F/USDT", flat["4h"], flat["1h"], flat["15m"], PARAMS)
    assert isinstance(got, str) or got.confidence <= 10  # a flat market: nothing near a tradable score


# --- stop-loss bounds ---------------------------------------------------------------------------------------

money = st.decimals(min_value=D("0.0001"), max_value=D("100000"), places=4, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(entry=money, atr=money, side=st.sampled_from(list(PositionSide)),
       multiple=st.floats(min_value=0.5, max_value=5.0), max_stop=st.floats(min_value=0.1, max_value=10.0),
       rr=st.floats(min_value=0.5, max_value=5.0))
def test_stop_is_never_beyond_the_cap_and_target_is_reward_times_risk(
        entry: Decimal, atr: Decimal, side: PositionSide, multiple: float, max_stop: float, rr: float) -> None:
    p = AnalysisParams(stop_atr_multiple=multiple, max_stop_pct=max_stop, reward_risk=rr)
    stop, target, distance = exit_levels(entry, atr, side, p)
    cap = entry * D(repr(max_stop)) / 100
    assert 0 < distance <= cap
    assert distance == min(atr * D(repr(multiple)), cap)
    assert abs(abs(stop - entry) - distance) <= entry * D("1e-20")  # 28-digit Decimal rounding
    assert abs(abs(target - entry) - distance * D(repr(rr))) <= entry * D("1e-20")  # 28-digit rounding
    if side is PositionSide.LONG:
        assert stop < entry < target
    else:
        assert target < entry < stop


def test_default_stop_caps_at_three_percent() -> None:
    stop, target, _ = exit_levels(D(100), D(5), PositionSide.LONG, PARAMS)  # 2 x ATR would be 10%
    assert stop == D("97.00") and target == D("104.500")
    stop, target, _ = exit_levels(D(100), D("0.5"), PositionSide.SHORT, PARAMS)  # 2 x ATR = 1%
    assert stop == D("101.0") and target == D("98.50")
    with pytest.raises(ValueError):
        exit_levels(D(100), D(0), PositionSide.LONG, PARAMS)


# --- the candle cache -------------------------------------------------------------------------------------


class Source:
    """A candle source with latency on the sim clock; counts requests and the most in flight at once."""

    def __init__(self, clock: SimClock, data: dict[tuple[str, str], CandleSeries], latency: float = 0.05) -> None:
        self.clock = clock
        self.data = data
        self.latency = latency
        self.calls: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak = 0
        self.fail: dict[str, BaseException] = {}
        self.hang: set[str] = set()

    async def __call__(self, symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        self.calls.append((symbol, timeframe))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.clock.sleep(3600.0 if symbol in self.hang else self.latency)
            if symbol in self.fail:
                raise self.fail[symbol]
            got = self.data.get((symbol, timeframe))
            return None if got is None else got.tail(limit)
        finally:
            self.in_flight -= 1


async def run_with_clock(clock: SimClock, coro: asyncio.Future[object] | object, seconds: float = 30.0) -> object:
    task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
    for _ in range(int(seconds / 0.05) + 10):
        if task.done():
            break
        await clock.advance(0.05)
    return await task


async def test_concurrent_fetches_respect_the_semaphore_and_one_failure_skips_one_symbol() -> None:
    clock = SimClock(start=1_700_000_000.0)
    symbols = [f"S{i}/USDT" for i in range(12)]
    data = {}
    for s in symbols:
        for tf, ser in trending(s, clock.now(), PositionSide.LONG).items():
            data[(s, tf)] = ser
    source = Source(clock, data)
    source.fail["S3/USDT"] = TemporaryError("429")
    source.hang.add("S4/USDT")
    cache = CandleCache(source, clock, concurrency=5, timeout=2.0)
    analyzer = Analyzer(cache, PARAMS)
    result = await run_with_clock(clock, analyzer.analyze(symbols))
    assert source.peak == 5
    assert {"S3/USDT", "S4/USDT"} <= set(result.skipped)  # type: ignore[attr-defined]
    assert len(result.signals) == 10  # type: ignore[attr-defined]
    assert cache.stats.errors == 6  # 3 timeframes each of the failing and of the hanging symbol


async def test_cache_serves_until_the_next_bar_closes() -> None:
    clock = SimClock(start=1_700_000_000.0)
    data = {("A/USDT", tf): ser for tf, ser in trending("A/USDT", clock.now(), PositionSide.LONG).items()}
    source = Source(clock, data, latency=0.0)
    cache = CandleCache(source, clock, concurrency=2, timeout=2.0)
    await cache.get_many([("A/USDT", tf) for tf in TIMEFRAMES], 100)
    assert len(source.calls) == 3
    newest_15m = float(data[("A/USDT", "15m")].ts[-1])
    await clock.advance(newest_15m + 2 * 900 - clock.now() - 1)  # one second before the next 15m close
    await cache.get_many([("A/USDT", tf) for tf in TIMEFRAMES], 100)
    assert len(source.calls) == 3
    await clock.advance(1)
    await cache.get_many([("A/USDT", tf) for tf in TIMEFRAMES], 100)
    assert source.calls[3:] == [("A/USDT", "15m")]  # only the 15m bar is due; 1h and 4h still cached


async def test_bad_candles_are_rejected_not_cached() -> None:
    clock = SimClock(start=1_700_000_000.0)
    good = trending("A/USDT", clock.now(), PositionSide.LONG)["1h"]
    close = good.close.copy()
    close[-3] = math.nan
    bad = dataclasses.replace(good, close=close)
    source = Source(clock, {("A/USDT", "1h"): bad}, latency=0.0)
    cache = CandleCache(source, clock)
    assert await cache.get("A/USDT", "1h", 100) is None
    assert await cache.get("A/USDT", "1h", 100) is None
    assert len(source.calls) == 2 and cache.stats.rejected == 2
