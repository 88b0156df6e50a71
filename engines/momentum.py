"""The spot engine's momentum strategy: a pure function of closed candles, so live, replay, backtest
and tests all evaluate exactly the same rule.

Enter long when the trend is up (fast EMA above slow EMA, close above the fast EMA), momentum over
the lookback is at least the minimum, RSI sits in the band that means strength without exhaustion,
and the last candle's volume is at least `volume_factor` times its recent average.

`evaluate` sits on the tick-to-order path, so it does not build whole indicator arrays: it needs
only the newest EMA(fast), EMA(slow) and RSI values and one average, and computes just those with
plain float loops over a Python list of the window (a hundred-odd small numpy calls cost several
times the arithmetic at these sizes). The loops repeat `engines.indicators`' floating-point
operations in `engines.indicators`' order, so the values are bit-identical to `ema(close, p)[-1]`
and `rsi(close, p)[-1]` wherever that module runs its recursions bar by bar (a recursion of at most
256 bars, so any window of at most 256 bars; see `_last_indicators`, which runs the three in one
pass, and `_last_ema` / `_last_rsi`), and the average volume is the same bits as `np.mean`.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

import numpy as np
import numpy.typing as npt

from core.types import CandleSeries
from core.values import value_type

VOLUME_AVERAGE_BARS = 20

# Arrays whose .tolist() already gives the float64 values the indicators module would compute with.
_FLOAT64 = np.dtype(np.float64)
# numpy's pairwise summation sums runs of up to this many elements with 8 accumulators.
_PAIRWISE_BLOCK = 128


@value_type
class MomentumParams:
    ema_fast: int = 9
    ema_slow: int = 21
    rsi_period: int = 14
    rsi_min: float = 50.0
    rsi_max: float = 75.0
    lookback: int = 6
    min_momentum_pct: float = 0.3
    volume_factor: float = 1.0
    # Derived once here rather than as properties: every reading on the order path asks for both.
    # Bars needed before the rule can say anything (slow EMA seed plus a margin for RSI).
    warmup_bars: int = field(init=False, repr=False, compare=False)
    # The closes a reading computes its indicators over (the newest ones): what a caller fetches.
    window: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        warmup = max(self.ema_slow, self.rsi_period + 1, self.lookback + 1, VOLUME_AVERAGE_BARS) + 2
        object.__setattr__(self, "warmup_bars", warmup)
        object.__setattr__(self, "window", max(warmup * 4, 100))


@value_type
class MomentumReading:
    enter: bool
    reason: str
    momentum_pct: float
    rsi: float
    close: float


@value_type
class NextBar:
    """The rule's work for a symbol's next candle, done one bar ahead (see `prepare`).

    The window the rule reads slides by one bar at each close, so every recursion restarts from a
    new seed: nothing of the last reading carries over. But all of the next window except its newest
    bar is known a whole bar early. Running the recursions over it then, off the order path, leaves
    one step for the tick that closes the bar. `closes` and `volumes` are what that window must
    start with for the work to apply; `evaluate` checks them, bit for bit (their float64 bytes, which
    it compares without turning the arrays into lists first), so a revised or missing bar only costs
    the full computation, never a different reading.
    """

    params: MomentumParams
    closes: list[float]  # the next window's closes but its newest one
    volumes: list[float]  # the volumes the next reading averages
    state: tuple[float, float, float, float]  # EMA fast, EMA slow, RSI gain and loss after `closes`
    avg_volume: float
    closes_raw: bytes  # `closes` as float64 bytes
    volumes_raw: bytes  # `volumes` as float64 bytes


def evaluate(candles: CandleSeries, p: MomentumParams, ahead: NextBar | None = None) -> MomentumReading:
    """Read the newest closed candle. Not enough or non-finite data is a 'no', with the reason.

    The EMAs and the RSI are those of `engines.indicators` over the last `p.window` closes, computed
    for the newest bar only (see `_last_indicators`). For windows of up to 256 bars (every
    configuration with warmup_bars <= 64) they are bit-identical to `ema(close, p)[-1]` and
    `rsi(close, p)[-1]`. For longer windows that module switches to a blocked algorithm that rounds
    differently, and its arrays differ from the values here by ~1e-12 relative; this function
    stays the one rule for live, replay and backtest, which all call it.

    `ahead`, what `prepare` made of the previous candles, is used when this window is exactly that
    one plus a newer bar (same closes, same volumes, same parameters): one recursion step then
    replaces the whole window's, with the same floating-point operations, so the reading is the same
    bits either way.

    A NaN or infinite close in the window, or volume in the average or on the newest bar, gives
    'non-finite data' (a NaN newest volume used to pass the volume test, since it was only compared).
    """
    n = len(candles)
    warmup = p.warmup_bars
    if n < warmup:
        return MomentumReading(False, f"warming up ({n}/{warmup} bars)", math.nan, math.nan, math.nan)
    close_arr = candles.close[-p.window:]
    volume_arr = candles.volume[-VOLUME_AVERAGE_BARS - 1 :]
    if (
        ahead is not None
        and (ahead.params is p or ahead.params == p)
        and close_arr.dtype is _FLOAT64
        and volume_arr.dtype is _FLOAT64
        and close_arr[:-1].tobytes() == ahead.closes_raw
        and volume_arr[:-1].tobytes() == ahead.volumes_raw
    ):
        # The same values, bit for bit, as `_floats` of the arrays would give (`.item()` is what
        # `.tolist()` does per element), without converting the 99 known ones again.
        close = [*ahead.closes, close_arr[-1].item()]
        volume = [*ahead.volumes, volume_arr[-1].item()]
        fast, slow, strength = _finish_indicators(
            _joint_steps(ahead.state, close, len(close) - 1, p.ema_fast, p.ema_slow, p.rsi_period),
            close, p.ema_fast, p.ema_slow, p.rsi_period,
        )
        avg_volume = ahead.avg_volume
    else:
        close = _floats(close_arr)
        volume = _floats(volume_arr)
        fast, slow, strength = _last_indicators(close, p.ema_fast, p.ema_slow, p.rsi_period)
        avg_volume = _numpy_mean(volume[:-1])
    last = close[-1]
    base = close[-1 - p.lookback]
    # All seven finite, in one expression rather than seven calls: x * 0.0 is (+-)0.0 for a finite x
    # and NaN for an infinite or NaN one, and a NaN anywhere makes the sum NaN, never 0.0.
    all_finite = (fast * 0.0 + slow * 0.0 + strength * 0.0 + last * 0.0 + base * 0.0 + avg_volume * 0.0
                  + volume[-1] * 0.0) == 0.0
    if not all_finite or base <= 0:
        return MomentumReading(False, "non-finite data", math.nan, math.nan, last)
    momentum = (last / base - 1.0) * 100.0
    if not (fast > slow and last > fast):
        return MomentumReading(False, "no uptrend", momentum, strength, last)
    if momentum < p.min_momentum_pct:
        return MomentumReading(False, "momentum too weak", momentum, strength, last)
    if not (p.rsi_min <= strength <= p.rsi_max):
        return MomentumReading(False, "rsi outside band", momentum, strength, last)
    if volume[-1] < p.volume_factor * avg_volume:
        return MomentumReading(False, "volume too low", momentum, strength, last)
    return MomentumReading(True, "momentum entry", momentum, strength, last)


def prepare(candles: CandleSeries, p: MomentumParams) -> NextBar | None:
    """The work for the reading of the candle after `candles`' newest, for `evaluate(..., ahead=)`.

    None when that reading needs no recursion (still warming up) or has too short a window for the
    one-pass loop; `evaluate` then computes it whole, as it always can.
    """
    warmup = p.warmup_bars
    if len(candles) + 1 < warmup:
        return None  # (as `evaluate` answers 'warming up' before it looks at the periods)
    if p.ema_fast < 1 or p.ema_slow < 1 or p.rsi_period < 1:
        _check_period(min(p.ema_fast, p.ema_slow, p.rsi_period))
    close_arr = np.asarray(candles.close[-(p.window - 1) :], dtype=np.float64)
    closes: list[float] = close_arr.tolist()
    if max(p.ema_fast, p.ema_slow, p.rsi_period + 1) > len(closes):
        return None
    volume_arr = np.asarray(candles.volume[-VOLUME_AVERAGE_BARS:], dtype=np.float64)
    volumes: list[float] = volume_arr.tolist()
    return NextBar(p, closes, volumes, _indicator_state(closes, p.ema_fast, p.ema_slow, p.rsi_period),
                   _numpy_mean(volumes), close_arr.tobytes(), volume_arr.tobytes())


def _floats(arr: npt.NDArray[Any]) -> list[float]:
    """The array's values as Python floats, i.e. as the float64 values the indicators compute with
    (a float32 or integer series is converted first, as `engines.indicators` converts it)."""
    if arr.dtype is not _FLOAT64:
        arr = np.asarray(arr, dtype=np.float64)
    values: list[float] = arr.tolist()
    return values


# --------------------------------------------------------------------------- newest indicator values
#
# `engines.indicators` evaluates a recursion of at most 256 bars as `_sequential` does: Python
# floats, `y = alpha*x + beta*y` bar by bar from the seed, each output then added to a zeroed array
# (`0.0 + y`, which only turns -0.0 into 0.0). Its seeds are `np.cumsum(...)[-1]` (a left-to-right
# sum starting with the first element) divided by the period. The helpers below repeat those
# operations in that order, for the newest bar only, so their results are the same bits. Longer
# recursions there run in blocks through matrix products, which round differently (a few ulps).
# From the first NaN or infinite input of a recursion on, that module outputs NaN; a non-finite
# input leaves the scalar recursions here non-finite too (inf and NaN never turn finite again
# through y = alpha*x + beta*y), and the `_*_finish` helpers then answer NaN as it does.


def _check_period(p: int) -> None:
    """A period below 1 is a programming error, as in `engines.indicators`."""
    if p < 1:
        raise ValueError(f"period must be >= 1, got {p}")


def _ema_seed(values: list[float], p: int) -> float:
    """TA-Lib's EMA seed: the mean of the first p values, summed left to right (needs p values)."""
    total = values[0]
    for x in values[1:p]:
        total += x
    return total / p


def _ema_finish(y: float, values: list[float], p: int) -> float:
    """The recursion's output as `engines.indicators` stores it (there was at least one step)."""
    y = 0.0 + y
    if not math.isfinite(y) and not all(map(math.isfinite, values[p:])):
        return math.nan  # a non-finite input: that module stops the recursion there, NaN from there on
    return y


def _last_ema(values: list[float], p: int) -> float:
    """The last value of `engines.indicators.ema(values, p)` (TA-Lib EMA, k = 2/(p+1)), without the
    array: bit-identical while the recursion covers at most 256 bars (len(values) - p <= 256)."""
    _check_period(p)
    n = len(values)
    if n < p:
        return math.nan
    y = _ema_seed(values, p)
    if n == p:
        return y
    k = 2.0 / (p + 1)
    beta = 1.0 - k
    for x in values[p:]:
        y = k * x + beta * y
    return _ema_finish(y, values, p)


def _rsi_seeds(values: list[float], p: int) -> tuple[float, float]:
    """TA-Lib's RSI seeds, the mean gain and mean loss of the first p changes (needs p+1 values).

    A change is x[i] - x[i-1], its gain `np.maximum(change, 0.0)` (0.0 for a zero of either sign or
    a fall, NaN for NaN: `0.0 if change <= 0.0 else change`), its loss gain - change; both summed
    left to right as np.cumsum does.
    """
    prev = values[1]
    change = prev - values[0]
    gain = 0.0 if change <= 0.0 else change
    gains = gain
    losses = gain - change
    for x in values[2 : p + 1]:
        change = x - prev
        prev = x
        gain = 0.0 if change <= 0.0 else change
        gains += gain
        losses += gain - change
    return gains / p, losses / p


def _rsi_steps(values: list[float], lo: int, hi: int, g: float, loss: float, p: int) -> tuple[float, float]:
    """Wilder's recursions for bars lo..hi-1 (lo >= 1): avg = (1/p)*today + ((p-1)/p)*avg.

    Gains and losses are never negative or -0.0 (nor are their seeds), so for a rise (loss =
    change - change = 0.0) the loss update 0.0 + beta*loss is beta*loss, and for a fall or no
    change (gain = 0.0, loss = 0.0 - change) the gain update 0.0 + beta*g is beta*g and
    alpha*(0.0 - change) + beta*loss is beta*loss - alpha*change: the same bits, fewer operations.
    A NaN change takes the second branch and leaves the loss NaN; an infinite one leaves an average
    infinite or NaN: `_rsi_finish` answers NaN for both, as `engines.indicators` does.
    """
    alpha = 1.0 / p
    beta = (p - 1) / p
    prev = values[lo - 1]
    for x in values[lo:hi]:
        change = x - prev
        prev = x
        if change > 0.0:
            g = alpha * change + beta * g
            loss *= beta
        else:
            g *= beta
            loss = beta * loss - alpha * change
    return g, loss


def _rsi_finish(g: float, loss: float, values: list[float], p: int) -> float:
    """The RSI from the smoothed gain and loss (there was at least one recursion step), as
    `engines.indicators.rsi` writes it: g/(l+g), then *100, or 0.0 where l+g <= 0."""
    g = 0.0 + g
    loss = 0.0 + loss
    if not (math.isfinite(g) and math.isfinite(loss)) and not _changes_finite(values, p):
        return math.nan  # a non-finite gain or loss: that module stops the recursion there
    total = loss + g
    if total <= 0.0:
        return 0.0  # no gain and no loss at all (flat prices): TA-Lib says 0
    return (g / total) * 100.0


def _changes_finite(values: list[float], p: int) -> bool:
    """Whether every change the RSI recursion reads (bars p+1 on) is finite: only asked on the rare
    non-finite path, where it tells a non-finite input from a non-finite seed."""
    return all(math.isfinite(values[i] - values[i - 1]) for i in range(p + 1, len(values)))


def _last_rsi(values: list[float], p: int) -> float:
    """The last value of `engines.indicators.rsi(values, p)` (TA-Lib RSI, Wilder smoothing), without
    the arrays: bit-identical while the recursion covers at most 256 bars (len(values) - p - 1 <=
    256). A series of exactly p+1 values gives 100*(g/(g+l)) from the seeds, or 0.0 unless g+l > 0.
    """
    _check_period(p)
    n = len(values)
    if n <= p:
        return math.nan
    g, loss = _rsi_seeds(values, p)
    if n == p + 1:
        total = g + loss
        return 100.0 * (g / total) if total > 0.0 else 0.0
    g, loss = _rsi_steps(values, p + 1, n, g, loss, p)
    return _rsi_finish(g, loss, values, p)


def _last_indicators(values: list[float], fast: int, slow: int, period: int) -> tuple[float, float, float]:
    """(`_last_ema(values, fast)`, `_last_ema(values, slow)`, `_last_rsi(values, period)`), the same
    bits, with one loop over the bars all three recursions cover: one pass over the list costs
    less than three (each bar is read once and the interpreter's loop overhead is paid once)."""
    if fast < 1 or slow < 1 or period < 1:
        _check_period(min(fast, slow, period))
    if max(fast, slow, period + 1) >= len(values):  # too short for some recursion (never after warm-up)
        return _last_ema(values, fast), _last_ema(values, slow), _last_rsi(values, period)
    return _finish_indicators(_indicator_state(values, fast, slow, period), values, fast, slow, period)


def _indicator_state(values: list[float], fast: int, slow: int, period: int) -> tuple[float, float, float, float]:
    """The three recursions' raw state (EMA fast, EMA slow, RSI gain, RSI loss) after every bar of
    `values`, which must reach the first bar they all step over (max(fast, slow, period + 1) <=
    len(values)). Each recursion performs exactly the operations of its own loop in `_last_ema` /
    `_rsi_steps`, so stepping this state on by `_joint_steps` gives the same bits as running
    over the longer list."""
    start = max(fast, slow, period + 1)  # the first bar every recursion steps over
    kf = 2.0 / (fast + 1)
    bf = 1.0 - kf
    f = _ema_seed(values, fast)
    for x in values[fast:start]:
        f = kf * x + bf * f
    ks = 2.0 / (slow + 1)
    bs = 1.0 - ks
    s = _ema_seed(values, slow)
    for x in values[slow:start]:
        s = ks * x + bs * s
    g, loss = _rsi_seeds(values, period)
    g, loss = _rsi_steps(values, period + 1, start, g, loss, period)
    return _joint_steps((f, s, g, loss), values, start, fast, slow, period)


def _joint_steps(state: tuple[float, float, float, float], values: list[float], lo: int, fast: int, slow: int,
                 period: int) -> tuple[float, float, float, float]:
    """The three recursions side by side over bars lo.. of `values` (lo >= 1), each exactly as in its
    own loop (`_last_ema`, `_rsi_steps`): the rest of `_indicator_state`, and the one step `evaluate`
    adds to a `NextBar`."""
    f, s, g, loss = state
    kf = 2.0 / (fast + 1)
    bf = 1.0 - kf
    ks = 2.0 / (slow + 1)
    bs = 1.0 - ks
    alpha = 1.0 / period
    beta = (period - 1) / period
    prev = values[lo - 1]
    for x in values[lo:]:
        f = kf * x + bf * f
        s = ks * x + bs * s
        change = x - prev
        prev = x
        if change > 0.0:
            g = alpha * change + beta * g
            loss *= beta
        else:
            g *= beta
            loss = beta * loss - alpha * change
    return f, s, g, loss


def _finish_indicators(state: tuple[float, float, float, float], values: list[float], fast: int, slow: int,
                       period: int) -> tuple[float, float, float]:
    """The newest EMA fast, EMA slow and RSI from the raw state after all of `values` (every
    recursion having stepped at least once), as `engines.indicators` stores them."""
    f, s, g, loss = state
    return _ema_finish(f, values, fast), _ema_finish(s, values, slow), _rsi_finish(g, loss, values, period)


def _numpy_sum(values: list[float]) -> float:
    """numpy's pairwise sum of a contiguous float64 array, operation for operation: up to 7 values
    left to right from 0.0; up to 128 in 8 interleaved accumulators, combined as a tree, then the
    remainder; longer runs split in two (the first half a multiple of 8) and summed recursively."""
    n = len(values)
    if n < 8:
        res = 0.0
        for x in values:
            res += x
        return res
    if n <= _PAIRWISE_BLOCK:
        r0, r1, r2, r3, r4, r5, r6, r7 = values[:8]
        stop = n - n % 8
        for i in range(8, stop, 8):
            r0 += values[i]
            r1 += values[i + 1]
            r2 += values[i + 2]
            r3 += values[i + 3]
            r4 += values[i + 4]
            r5 += values[i + 5]
            r6 += values[i + 6]
            r7 += values[i + 7]
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for x in values[stop:]:
            res += x
        return res
    half = n // 2
    half -= half % 8
    return _numpy_sum(values[:half]) + _numpy_sum(values[half:])


def _numpy_mean(values: list[float]) -> float:
    """`float(np.mean(values))` for a contiguous float64 array, bit for bit, without the array: the
    reduction starts from 0.0 and adds the pairwise sum, then divides by the count. Cheaper than
    np.mean's dispatch for the 20 volumes the rule averages."""
    if not values:
        return math.nan
    return (0.0 + _numpy_sum(values)) / len(values)
