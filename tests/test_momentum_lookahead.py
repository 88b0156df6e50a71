"""The momentum rule's look-ahead: the work for a symbol's next candle, done one bar early.

`engines.momentum.prepare` runs the recursions over every bar of the next window but its newest, and
`evaluate(candles, p, ahead)` then adds one step instead of running the whole window. The contract
pinned here: the reading is the same bits with or without it, whatever the next candles turn out to
be (the bar expected, a revised history, other parameters, non-finite values); it is used whenever
the window is exactly the prepared one plus a bar; and the spot engine keeps it one bar ahead of
every symbol, so its readings on a market that closes bar after bar all take the one step, with the
same decisions as without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engines.momentum as mom
from core.types import CandleSeries
from engines import spot as spot_module
from engines.momentum import MomentumParams, MomentumReading, evaluate, prepare
from exchange.candles import load_candles
from tests.test_momentum_scalar import assert_same_reading, momentum_params, price_series, series
from tests.test_spot_protective_stop import SYMBOL, Rig, rig

__all__ = ["rig"]  # the protective-stop tests' fixture

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "binance_BTC_USDT-5m.csv.gz"


@contextmanager
def full_window_runs() -> Iterator[list[int]]:
    """Counts the readings that ran the recursions over a whole window (not the one step)."""
    calls: list[int] = []
    real = mom._last_indicators

    def counting(values: list[float], fast: int, slow: int, period: int) -> tuple[float, float, float]:
        calls.append(len(values))
        return real(values, fast, slow, period)

    with mock.patch.object(mom, "_last_indicators", counting):
        yield calls


def upto(candles: CandleSeries, k: int) -> CandleSeries:
    """The first k bars, as a feed shows them once the k-th has closed."""
    return CandleSeries(candles.symbol, candles.timeframe, candles.ts[:k], candles.open[:k], candles.high[:k],
                        candles.low[:k], candles.close[:k], candles.volume[:k], float(candles.ts[k - 1]))


@st.composite
def market(draw: st.DrawFn) -> tuple[MomentumParams, CandleSeries]:
    p = draw(momentum_params(st.integers(3, 40)))
    n = draw(st.integers(p.warmup_bars + 1, max(p.warmup_bars * 4, 100) + 30))
    close = price_series(n, draw(st.integers(0, 2**32 - 1)), flat=draw(st.sampled_from([0.0, 0.3])),
                         vol=draw(st.sampled_from([0.002, 0.01])), level=draw(st.sampled_from([1.0, 30_000.0])),
                         tick=draw(st.sampled_from([0.0, 1e-4])))
    if draw(st.booleans()):
        close[-p.lookback - 1 :] *= np.linspace(1.0, 1.03, p.lookback + 1)  # a late rally: entries
    volume = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(50.0, 150.0, n)
    return p, series(close, volume)


@settings(max_examples=60, deadline=None)
@given(case=market())
def test_bar_after_bar_every_reading_takes_one_step_and_is_the_same_bits(
        case: tuple[MomentumParams, CandleSeries]) -> None:
    p, candles = case
    n = len(candles)
    first = p.warmup_bars - 2  # from before the warm-up ends: prepare answers None there
    ahead = prepare(upto(candles, first), p)
    with full_window_runs() as full:
        for k in range(first + 1, n + 1):
            now = upto(candles, k)
            with_ahead = evaluate(now, p, ahead)
            full_before = len(full)
            assert_same_reading(with_ahead, evaluate(now, p))
            assert len(full) == full_before + (k >= p.warmup_bars), "the reading without it runs the window"
            ahead = prepare(now, p)
    # The one full run in each pair is the reading without look-ahead; with it, none after warm-up.
    assert len(full) == n - p.warmup_bars + 1


@settings(max_examples=60, deadline=None)
@given(case=market(), data=st.data())
def test_a_revised_history_or_other_parameters_are_read_whole(
        case: tuple[MomentumParams, CandleSeries], data: st.DataObject) -> None:
    """The work applies to one exact window. A changed close or volume anywhere in it (a feed that
    corrected a bar, a gap refilled), or other parameters, and the window is read whole."""
    p, candles = case
    n = len(candles)
    before = upto(candles, n - 1)
    ahead = prepare(before, p)
    assert ahead is not None
    changed = upto(candles, n)
    what = data.draw(st.sampled_from(["close", "volume", "params"]))
    other = p
    if what == "params":
        other = MomentumParams(p.ema_fast, p.ema_slow, p.rsi_period, p.rsi_min, p.rsi_max, p.lookback,
                               p.min_momentum_pct + 0.05, p.volume_factor)
    else:
        column = changed.close.copy() if what == "close" else changed.volume.copy()
        window = len(ahead.closes) if what == "close" else len(ahead.volumes)
        at = n - 1 - data.draw(st.integers(1, window))
        column[at] *= 1.0 + data.draw(st.sampled_from([1e-12, 0.01]))
        changed = series(column, changed.volume) if what == "close" else series(changed.close, column)
    with full_window_runs() as full:
        got = evaluate(changed, other, ahead)
    assert full, "read whole"
    assert_same_reading(got, evaluate(changed, other))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [-1, -2, -10, -99])
def test_non_finite_values_read_the_same_with_the_look_ahead(value: float, where: int) -> None:
    """The prepared part is compared bit for bit, so a NaN or an infinity in it is carried by the one
    step (a NaN newest close only by the step), and the reading is 'non-finite data' all the same."""
    p = MomentumParams()
    close = price_series(151, seed=5)
    close[where] = value
    candles = series(close)
    ahead = prepare(upto(candles, 150), p)
    assert ahead is not None
    got = evaluate(candles, p, ahead)
    assert (got.enter, got.reason) == (False, "non-finite data")
    assert_same_reading(got, evaluate(candles, p))


def test_prepare_says_none_while_the_next_reading_is_still_warming_up() -> None:
    p = MomentumParams()
    candles = series(price_series(p.warmup_bars - 2, seed=1))
    assert prepare(candles, p) is None
    assert prepare(series(price_series(p.warmup_bars - 1, seed=1)), p) is not None
    with pytest.raises(ValueError, match="period must be >= 1"):
        prepare(series(price_series(100, seed=1)), MomentumParams(ema_fast=0))


# --------------------------------------------------------------------------- the spot engine


class ClosingFeed:
    """The rig's prices, with candles of real BTC/USDT 5m history that close one bar at a time."""

    def __init__(self, rig: Rig, history: CandleSeries) -> None:
        self.rig = rig
        self.history = history
        self.closed = 0
        self.symbols = [SYMBOL]
        self.finished = False
        self.version = 0

    def close_bar(self) -> None:
        self.closed += 1
        bar = self.closed - 1
        self.rig.feed.set_price(str(Decimal(f"{self.history.close[bar]:.2f}")))
        self.version += 1

    def ticker(self, symbol: str) -> Any:
        return self.rig.feed.ticker(symbol)

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None:
        if symbol != SYMBOL or self.closed == 0:
            return None
        shown = upto(self.history, self.closed)
        clock_now = self.rig.feed.clock.now()
        return CandleSeries(shown.symbol, timeframe, shown.ts[-limit:], shown.open[-limit:], shown.high[-limit:],
                            shown.low[-limit:], shown.close[-limit:], shown.volume[-limit:], clock_now)


async def run_bars(rig: Rig, bars: int, history: CandleSeries) -> list[tuple[MomentumReading, CandleSeries]]:
    """Close `bars` bars one after another, a step each (with the exchange working its stops), and
    return every reading the engine took, with the candles it read."""
    feed = ClosingFeed(rig, history)
    rig.ctx.feed = feed  # type: ignore[assignment]
    readings: list[tuple[MomentumReading, CandleSeries]] = []
    real = spot_module.evaluate

    def recording(candles: CandleSeries, p: MomentumParams, ahead: Any = None) -> MomentumReading:
        reading = real(candles, p, ahead)
        readings.append((reading, candles))
        return reading

    with mock.patch.object(spot_module, "evaluate", recording):
        for _ in range(bars):
            feed.close_bar()
            await rig.settle()
            await rig.step()
            await rig.settle()
    return readings


async def test_the_engine_reads_each_new_bar_with_one_step_and_the_same_decisions(rig: Rig) -> None:
    bars = 600
    arrays = load_candles(BUNDLED)
    history = upto(arrays.series(SYMBOL, "5m", 0, len(arrays), 0.0), bars)
    p = rig.engine.params
    with full_window_runs() as full:
        readings = await run_bars(rig, bars, history)
    assert sum(r.enter for r, _ in readings) >= 2, "the sample enters, and after an exit enters again"
    assert len(readings) < bars - p.warmup_bars, "and bars closed while a position was held"
    # No reading ran a whole window: the engine prepared each one a bar ahead, from the last bar of
    # the warm-up on, whether it held a position then or not.
    assert full == []
    # Each reading is the one the rule gives those candles read whole, bit for bit: the same trades.
    for reading, candles in readings:
        assert_same_reading(reading, evaluate(candles, p))
