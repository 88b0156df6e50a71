"""The momentum rule's scalar indicators against `engines.indicators`, and the rule against its old form.

`engines.momentum.evaluate` computes only the newest EMA(fast), EMA(slow) and RSI values with plain
float loops instead of building the arrays. The contract pinned here: for every recursion the
indicators module runs bar by bar (at most 256 bars, so every window of at most 256 bars) the
scalars are the same bits as `ema(...)[-1]` and `rsi(...)[-1]`, non-finite inputs included; the
average volume is the same bits as `np.mean`; and `evaluate` gives the same reading as the old
implementation built on the arrays (kept below as `reference_evaluate`) - bit for bit for windows
of at most 256 bars, within 1e-9 relative (same decision) for longer ones, where the module's
blocked algorithm rounds differently.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engines.indicators as ind
import engines.momentum as mom
from core.types import CandleSeries
from engines.momentum import VOLUME_AVERAGE_BARS, MomentumParams, MomentumReading, evaluate

FloatArray = npt.NDArray[np.float64]

PROPERTY = settings(max_examples=200, deadline=None)
READINGS = {"no uptrend", "momentum too weak", "rsi outside band", "volume too low", "momentum entry"}


def reference_evaluate(candles: CandleSeries, p: MomentumParams) -> MomentumReading:
    """`evaluate` as it was before the scalar loops: the arrays of `engines.indicators`."""
    n = len(candles)
    if n < p.warmup_bars:
        return MomentumReading(False, f"warming up ({n}/{p.warmup_bars} bars)", math.nan, math.nan, math.nan)
    window = max(p.warmup_bars * 4, 100)
    close = candles.close[-window:]
    volume = candles.volume[-window:]
    fast = ind.ema(close, p.ema_fast)[-1]
    slow = ind.ema(close, p.ema_slow)[-1]
    strength = ind.rsi(close, p.rsi_period)[-1]
    last = float(close[-1])
    base = float(close[-1 - p.lookback])
    avg_volume = float(np.mean(volume[-VOLUME_AVERAGE_BARS - 1 : -1]))
    values = (fast, slow, strength, last, base, avg_volume, float(volume[-1]))  # (the newest volume: new)
    if not all(math.isfinite(v) for v in values) or base <= 0:
        return MomentumReading(False, "non-finite data", math.nan, math.nan, last)
    momentum = (last / base - 1.0) * 100.0
    if not (fast > slow and last > fast):
        return MomentumReading(False, "no uptrend", momentum, strength, last)
    if momentum < p.min_momentum_pct:
        return MomentumReading(False, "momentum too weak", momentum, strength, last)
    if not (p.rsi_min <= strength <= p.rsi_max):
        return MomentumReading(False, "rsi outside band", momentum, strength, last)
    if float(volume[-1]) < p.volume_factor * avg_volume:
        return MomentumReading(False, "volume too low", momentum, strength, last)
    return MomentumReading(True, "momentum entry", momentum, strength, last)


# --------------------------------------------------------------------------- helpers


def bits(x: float) -> bytes:
    """The float's bits, every NaN alike: equal bits means the same value, sign of zero included."""
    return b"nan" if math.isnan(x) else struct.pack("<d", float(x))


def module_rsi_last(x: FloatArray, p: int) -> float:
    return float(ind.rsi(x, p)[-1])


def assert_same_bits(ours: float, theirs: float) -> None:
    assert bits(ours) == bits(theirs), f"{ours!r} != {float(theirs)!r}"


def assert_same_reading(ours: MomentumReading, ref: MomentumReading, *, rel: float = 0.0) -> None:
    assert (ours.enter, ours.reason) == (ref.enter, ref.reason)
    for name in ("momentum_pct", "rsi", "close"):
        a, b = float(getattr(ours, name)), float(getattr(ref, name))
        if rel == 0.0:
            assert bits(a) == bits(b), f"{name}: {a!r} != {b!r}"
        elif math.isnan(b):
            assert math.isnan(a), f"{name}: {a!r} != nan"
        else:
            assert a == pytest.approx(b, rel=rel, abs=1e-12), name


def price_series(n: int, seed: int, *, flat: float = 0.0, vol: float = 0.01, level: float = 100.0,
                 tick: float = 0.0) -> FloatArray:
    """A positive random walk; a `flat` share of the steps are no move at all, and with `tick` the
    prices are rounded to it (exact repeats and ties, as on an exchange)."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, vol, n)
    steps[rng.random(n) < flat] = 0.0
    prices = level * np.exp(np.cumsum(steps))
    if tick > 0.0:
        prices = np.maximum(np.round(prices / tick) * tick, tick)
    return prices


@st.composite
def closes(draw: st.DrawFn, min_len: int, max_len: int) -> FloatArray:
    n = draw(st.integers(min_len, max_len))
    return price_series(
        n,
        draw(st.integers(0, 2**32 - 1)),
        flat=draw(st.sampled_from([0.0, 0.0, 0.3, 0.8, 1.0])),
        vol=draw(st.sampled_from([0.0005, 0.01, 0.05])),
        level=draw(st.sampled_from([0.0123, 1.0, 97.5, 30_000.0, 4.2e6])),
        tick=draw(st.sampled_from([0.0, 0.0, 1e-4, 0.01])),
    )


def series(close: FloatArray, volume: FloatArray | None = None) -> CandleSeries:
    n = len(close)
    ts = 1_700_000_000.0 + 300.0 * np.arange(n, dtype=np.float64)
    vol = np.full(n, 100.0) if volume is None else volume
    return CandleSeries("BTC/USDT", "5m", ts, close, close * 1.001, close * 0.999, close, vol, ts[-1] if n else 0.0)


# --------------------------------------------------------------------------- the scalar indicators


@PROPERTY
@given(data=st.data(), p=st.integers(2, 60))
def test_last_ema_is_the_same_bits_as_ema(data: st.DataObject, p: int) -> None:
    x = data.draw(closes(p, 256))
    assert_same_bits(mom._last_ema(x.tolist(), p), ind.ema(x, p)[-1])


@PROPERTY
@given(data=st.data(), p=st.integers(2, 30))
def test_last_rsi_is_the_same_bits_as_rsi(data: st.DataObject, p: int) -> None:
    x = data.draw(closes(p + 1, 256))
    assert_same_bits(mom._last_rsi(x.tolist(), p), ind.rsi(x, p)[-1])


@PROPERTY
@given(data=st.data(), p=st.integers(2, 60))
def test_exact_up_to_a_recursion_of_256_bars_not_only_a_window_of_256(data: st.DataObject, p: int) -> None:
    """The module runs a recursion bar by bar while it covers <= 256 bars: len - p for the EMA and
    len - p - 1 for the RSI, so windows a little longer than 256 are exact too."""
    x = data.draw(closes(257, 256 + p))
    assert_same_bits(mom._last_ema(x.tolist(), p), ind.ema(x, p)[-1])
    r = min(p, 30)
    if len(x) - r - 1 <= ind._SEQ_MAX:
        assert_same_bits(mom._last_rsi(x.tolist(), r), ind.rsi(x, r)[-1])


@PROPERTY
@given(data=st.data(), fast=st.integers(2, 60), slow=st.integers(2, 60), period=st.integers(2, 30))
def test_fused_loop_gives_the_same_bits_as_each_indicator(data: st.DataObject, fast: int, slow: int,
                                                         period: int) -> None:
    """evaluate's one-pass loop, including windows too short for some recursion (its fallback)."""
    x = data.draw(closes(2, 256))
    got = mom._last_indicators(x.tolist(), fast, slow, period)
    assert_same_bits(got[0], ind.ema(x, fast)[-1])
    assert_same_bits(got[1], ind.ema(x, slow)[-1])
    assert_same_bits(got[2], ind.rsi(x, period)[-1])


@pytest.mark.parametrize("p", [1, 2, 5, 14, 30])
@pytest.mark.parametrize("n_extra", [0, 1, 2, 50])
def test_edge_lengths_and_period_one(p: int, n_extra: int) -> None:
    """A series exactly as long as the seed (no recursion step), one bar more, and period 1."""
    x = price_series(p + n_extra, seed=p * 100 + n_extra)
    assert_same_bits(mom._last_ema(x.tolist(), p), ind.ema(x, p)[-1])
    if len(x) > p:
        assert_same_bits(mom._last_rsi(x.tolist(), p), ind.rsi(x, p)[-1])
    assert math.isnan(mom._last_ema(x[: p - 1].tolist(), p))
    assert math.isnan(mom._last_rsi(x[:p].tolist(), p))


def test_flat_prices_give_rsi_zero_as_talib() -> None:
    x = np.full(100, 123.45)
    assert mom._last_rsi(x.tolist(), 14) == ind.rsi(x, 14)[-1] == 0.0
    assert_same_bits(mom._last_ema(x.tolist(), 9), ind.ema(x, 9)[-1])
    x[-30:] = 200.0  # one step up, then flat again: only gains, RSI 100
    assert_same_bits(mom._last_rsi(x.tolist(), 14), ind.rsi(x, 14)[-1])
    assert mom._last_rsi(x.tolist(), 14) == 100.0


def test_a_period_below_one_is_a_programming_error() -> None:
    values = price_series(50, seed=1).tolist()
    with pytest.raises(ValueError, match="period"):
        mom._last_ema(values, 0)
    with pytest.raises(ValueError, match="period"):
        mom._last_rsi(values, 0)
    with pytest.raises(ValueError, match="period"):
        mom._last_indicators(values, 9, 0, 14)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf - inf
@PROPERTY
@given(
    data=st.data(),
    fast=st.integers(2, 60),
    slow=st.integers(2, 60),
    period=st.integers(2, 30),
    bad=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf])),
                 min_size=1, max_size=3),
)
def test_non_finite_closes_give_what_the_module_gives(data: st.DataObject, fast: int, slow: int, period: int,
                                                      bad: list[tuple[float, float]]) -> None:
    """NaN from the first non-finite recursion input on, and whatever a non-finite seed gives (inf
    for an EMA seeded on +inf and fed finite values), exactly as engines.indicators."""
    x = data.draw(closes(2, 256)).copy()
    for where, value in bad:
        x[int(where * len(x))] = value
    got = mom._last_indicators(x.tolist(), fast, slow, period)
    assert_same_bits(got[0], ind.ema(x, fast)[-1])
    assert_same_bits(got[1], ind.ema(x, slow)[-1])
    assert_same_bits(got[2], module_rsi_last(x, period))
    assert_same_bits(mom._last_ema(x.tolist(), fast), ind.ema(x, fast)[-1])
    if len(x) > period:
        assert_same_bits(mom._last_rsi(x.tolist(), period), module_rsi_last(x, period))


@PROPERTY
@given(values=st.lists(st.floats(0.0, 1e12), min_size=1, max_size=300))
def test_numpy_mean_is_the_same_bits_as_np_mean(values: list[float]) -> None:
    """numpy's pairwise sum, including the 8-accumulator blocks and the split above 128 values."""
    assert_same_bits(mom._numpy_mean(values), float(np.mean(np.array(values))))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 20, 127, 128, 129, 200, 256, 1000])
def test_numpy_mean_on_awkward_values(n: int) -> None:
    rng = np.random.default_rng(n)
    v = np.exp(rng.normal(0.0, 12.0, n)) * rng.choice([-1.0, 1.0], n)  # wide range, cancellation
    assert_same_bits(mom._numpy_mean(v.tolist()), float(np.mean(v)))
    assert_same_bits(mom._numpy_mean(np.full(n, -0.0).tolist()), float(np.mean(np.full(n, -0.0))))


# --------------------------------------------------------------------------- the rule


@st.composite
def momentum_params(draw: st.DrawFn, ema_slow: st.SearchStrategy[int]) -> MomentumParams:
    slow = draw(ema_slow)
    rsi_min = draw(st.floats(0.0, 80.0))
    return MomentumParams(
        ema_fast=draw(st.integers(2, max(2, slow - 1))),
        ema_slow=slow,
        rsi_period=draw(st.integers(2, 30)),
        rsi_min=rsi_min,
        rsi_max=draw(st.floats(rsi_min, 100.0)),
        lookback=draw(st.integers(1, 20)),
        min_momentum_pct=draw(st.sampled_from([0.0, 0.1, 0.3, 1.0])),
        volume_factor=draw(st.sampled_from([0.0, 0.5, 1.0, 1.5])),
    )


@st.composite
def candles_for(draw: st.DrawFn, p: MomentumParams, *, ties: bool = True) -> CandleSeries:
    """Candles around the warm-up and window lengths; `ties` allows flat windows and tick-rounded
    prices, where the rule's comparisons can meet exact equalities."""
    window = max(p.warmup_bars * 4, 100)
    n = draw(st.integers(p.warmup_bars - 2, window + 40))
    close = price_series(
        n,
        draw(st.integers(0, 2**32 - 1)),
        flat=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0] if ties else [0.0, 0.3])),
        vol=draw(st.sampled_from([0.002, 0.01])),
        level=draw(st.sampled_from([1.0, 30_000.0])),
        tick=draw(st.sampled_from([0.0, 1e-4] if ties else [0.0])),
    )
    if n and draw(st.booleans()):
        close[-p.lookback - 1 :] *= np.linspace(1.0, 1.03, min(n, p.lookback + 1))  # a late rally: entries
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    volume = rng.uniform(50.0, 150.0, n)
    return series(close, volume)


@PROPERTY
@given(data=st.data())
def test_evaluate_is_the_old_rule_bit_for_bit_up_to_256_bars(data: st.DataObject) -> None:
    p = data.draw(momentum_params(st.integers(3, 60)))
    assert max(p.warmup_bars * 4, 100) <= 256
    candles = data.draw(candles_for(p))
    assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_evaluate_agrees_with_the_old_rule_on_longer_windows(data: st.DataObject) -> None:
    """ema_slow 65..100 makes the window 268..408 bars: the module's blocked algorithm rounds
    differently there, so the readings agree to 1e-9 relative, with the same decision - on prices
    that move. Where a comparison is an exact tie bar by bar (see the flat-window test below) the
    blocked algorithm's residue of a few ulps can decide it either way."""
    p = data.draw(momentum_params(st.integers(65, 100)))
    assert max(p.warmup_bars * 4, 100) > 256
    candles = data.draw(candles_for(p, ties=False))
    assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p), rel=1e-9)


@pytest.mark.parametrize("level", [1.0, 97.5, 30_000.0])
def test_a_flat_long_window_is_no_uptrend(level: float) -> None:
    """A flat 352-bar window: bar by bar both EMAs are exactly the price, so there is no uptrend.
    (The old rule, over the blocked arrays, read a few ulps of residue there as an uptrend, fast >
    slow and close > fast, and entered on a flat market when the other thresholds were zero.)"""
    p = MomentumParams(ema_fast=10, ema_slow=88, rsi_period=2, rsi_min=0.0, rsi_max=0.0, lookback=1,
                       min_momentum_pct=0.0, volume_factor=0.0)
    candles = series(np.full(400, level))
    ours = evaluate(candles, p)
    assert (ours.enter, ours.reason, ours.momentum_pct, ours.rsi, ours.close) == (
        False, "no uptrend", 0.0, 0.0, level)


def test_evaluate_reaches_every_reading_and_matches_the_old_rule() -> None:
    """Deterministic coverage of every reason, each checked bit for bit against the old rule."""
    seen: set[str] = set()
    rng = np.random.default_rng(7)
    for i in range(600):
        p = MomentumParams(
            ema_fast=int(rng.integers(3, 12)),
            ema_slow=int(rng.integers(13, 40)),
            rsi_period=int(rng.integers(5, 20)),
            rsi_min=float(rng.choice([30.0, 50.0])),
            rsi_max=float(rng.choice([70.0, 90.0])),
            lookback=int(rng.integers(2, 10)),
            min_momentum_pct=float(rng.choice([0.1, 0.3, 1.0])),
            volume_factor=float(rng.choice([0.5, 1.0, 1.5])),
        )
        n = int(rng.integers(p.warmup_bars, 200))
        close = price_series(n, seed=i, vol=0.004)
        close[-p.lookback - 1 :] *= np.linspace(1.0, 1.0 + float(rng.uniform(0.0, 0.03)), p.lookback + 1)
        candles = series(close, rng.uniform(50.0, 150.0, n))
        ours = evaluate(candles, p)
        assert_same_reading(ours, reference_evaluate(candles, p))
        seen.add(ours.reason)
    assert seen == READINGS


def test_bench_series_enters_with_the_same_reading() -> None:
    """The tick-to-order bench's zig-zag uptrend (150 bars, default parameters)."""
    n = 150
    close = np.empty(n)
    price = 30_000.0
    for i in range(n):
        price *= 1.004 if (n - 1 - i) % 2 == 0 else 0.998
        close[i] = price
    candles = series(close)
    ours = evaluate(candles, MomentumParams())
    assert ours.enter and ours.reason == "momentum entry"
    assert_same_reading(ours, reference_evaluate(candles, MomentumParams()))


def test_warming_up_reading_is_unchanged() -> None:
    p = MomentumParams()
    candles = series(price_series(p.warmup_bars - 1, seed=3))
    ours = evaluate(candles, p)
    assert ours.reason == f"warming up ({p.warmup_bars - 1}/{p.warmup_bars} bars)"
    assert_same_reading(ours, reference_evaluate(candles, p))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf - inf
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [-1, -2, -7, -50, -83, -84, -87, -99, -100])
def test_non_finite_closes_read_as_non_finite_data(value: float, where: int) -> None:
    """Anywhere in the window: in an EMA seed, in the RSI head, in the recursions, the newest bar."""
    p = MomentumParams()
    close = price_series(150, seed=11)
    close[where] = value
    candles = series(close)
    ours = evaluate(candles, p)
    assert (ours.enter, ours.reason) == (False, "non-finite data")
    assert math.isnan(ours.momentum_pct) and math.isnan(ours.rsi)
    assert_same_reading(ours, reference_evaluate(candles, p))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf - inf
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("bar", [14, 15])
def test_non_finite_close_where_the_old_rule_raised(value: float, bar: int) -> None:
    """A non-finite close at window bar rsi_period or rsi_period+1 (so the first change of the RSI
    recursion is non-finite): `ind.rsi` used to raise ValueError there (an empty chunk of smoothed
    losses reached np.min); both now give NaN, as everywhere else in the recursion, and the reading
    is 'non-finite data'."""
    p = MomentumParams()  # window of 100 bars, RSI 14
    close = price_series(150, seed=16)
    close[-100 + bar] = value
    candles = series(close)
    assert math.isnan(ind.rsi(close[-100:], p.rsi_period)[-1])
    assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p))
    ours = evaluate(candles, p)
    assert (ours.enter, ours.reason) == (False, "non-finite data")
    assert math.isnan(ours.momentum_pct) and math.isnan(ours.rsi)
    assert ours.close == close[-1]


def test_non_finite_data_outside_the_window_is_not_read() -> None:
    p = MomentumParams()  # window of 100 bars
    close = price_series(150, seed=12)
    close[-101] = math.nan
    candles = series(close)
    assert evaluate(candles, p).reason != "non-finite data"
    assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_average_volume_reads_as_non_finite_data(value: float) -> None:
    p = MomentumParams()
    close = price_series(150, seed=13)
    volume = np.full(150, 100.0)
    volume[-5] = value
    candles = series(close, volume)
    assert evaluate(candles, p).reason == "non-finite data"
    assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p))


def test_non_positive_base_reads_as_non_finite_data() -> None:
    p = MomentumParams()
    close = price_series(150, seed=14)
    close[-1 - p.lookback] = 0.0
    candles = series(close)
    assert evaluate(candles, p).reason == "non-finite data"
    assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p))


def test_float32_and_integer_series_are_read_as_the_module_reads_them() -> None:
    """A series that is not float64 is converted first, as engines.indicators converts it."""
    p = MomentumParams()
    base = price_series(150, seed=15, level=30_000.0)
    volume: npt.NDArray[np.int64] = np.arange(150, dtype=np.int64) % 7 + 100
    for close in (base.astype(np.float32), np.round(base).astype(np.int64)):
        candles = CandleSeries("X", "5m", base, base, base, base, close, volume, 0.0)  # type: ignore[arg-type]
        assert_same_reading(evaluate(candles, p), reference_evaluate(candles, p))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_newest_volume_is_non_finite_data(value: float) -> None:
    """It used to be only compared, so a NaN passed the volume test and the rule could enter on it."""
    p = MomentumParams()
    close = price_series(150, seed=3)
    candles = series(close)
    candles.volume[-1] = value
    reading = evaluate(candles, p)
    assert (reading.enter, reading.reason) == (False, "non-finite data")
