"""Technical indicators over numpy float64 arrays, numerically equal to TA-Lib.

Strategies and backtests compute these over long histories, and their thresholds were tuned
against TA-Lib, so every function returns an array as long as its input, holds NaN exactly where
TA-Lib has no value (the warm-up), and agrees with TA-Lib to 1e-9 relative everywhere else. TA-Lib
is only a test-time reference; this module needs numpy and scipy.

How the numbers stay equal:

* Recursive filters (EMA, Wilder smoothing in RSI and ATR) run in C through `scipy.signal.lfilter`,
  which evaluates the same first-order recursion TA-Lib does; seeds are summed in TA-Lib's order.
* Where TA-Lib keeps a running total (the SMA inside STOCH, the money-flow sums of MFI) it leaves
  rounding residue where the exact answer is 0 (e.g. 5e-15 for a window of zeros). No tolerance
  is "relative" to a residue, so those totals are reproduced operation for operation: the
  add-then-subtract sequence is laid out as one array and summed by `np.cumsum`, which rounds
  after every step exactly as TA-Lib's loop does.
* Plain moving sums of prices use short shifted adds, or for long windows prefix sums restarted
  every `_BLOCK` bars relative to a local anchor price. A single prefix sum over a million BTC bars
  would carry ~1e-6 of absolute error, and a variance from sums of squares would lose most of its
  digits; anchored short blocks keep both near machine precision, as TA-Lib's own shifted-data
  variance does.
* Degenerate windows (flat prices, no money flow) are detected exactly and answer what TA-Lib
  answers.

Work is done in cache-sized chunks written straight into the output arrays: at a million bars a
whole-array temporary costs more in page faults than the arithmetic on it.

Every function raises ValueError for a period below 1, a non-1-D input or inputs of different
lengths: those are programming errors in the caller, not market conditions. Market conditions (flat
prices, gaps, a series shorter than the warm-up, an empty series) never raise. Inputs are expected
NaN-free; a NaN propagates to every later value of a recursive indicator and to the windows that
contain it for the others.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import lfilter

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

__all__ = [
    "FloatArray",
    "atr",
    "bollinger",
    "cci",
    "ema",
    "macd",
    "mfi",
    "rsi",
    "sma",
    "stochastic",
]

# Elements per chunk: a handful of chunk-sized temporaries stay inside L2.
_CHUNK = 1 << 15
# Up to this window length a moving sum is a chain of shifted adds over a cached chunk: cheaper
# than prefix sums, exact to a few ulps, and with no anchor involved.
_SHIFT_ADD_MAX = 32
# Longer windows use prefix sums restarted every _BLOCK bars (or the next power of two >= the
# window, if larger), each block taken relative to its first value.
_BLOCK = 64
# TA-Lib's scale-aware zero (TA_IS_ZERO_SCALED): |v| <= 1e-14 * scale. Used where TA-Lib decides
# that a difference of comparable magnitudes is "no change" (CCI, MFI).
_TA_EPSILON = 1e-14


# --------------------------------------------------------------------------- validation helpers


def _series(values: Any, name: str) -> FloatArray:
    arr = np.ascontiguousarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _same_length(**arrays: FloatArray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _period(value: Any, name: str) -> int:
    if isinstance(value, bool | float):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        period = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if period < 1:
        raise ValueError(f"{name} must be >= 1, got {period}")
    return period


def _warmup(n: int, first: int) -> FloatArray:
    """Output array: NaN before `first`, uninitialised after (the caller fills it)."""
    out = np.empty(n)
    out[: min(first, n)] = np.nan
    return out


def _spans(lo: int, hi: int, size: int = _CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(lo, hi, size):
        yield start, min(start + size, hi)


# --------------------------------------------------------------------------- numeric building blocks


def _seq_sum(values: FloatArray) -> float:
    """Left-to-right sum from 0.0: the order TA-Lib accumulates in (np.sum is pairwise)."""
    return float(np.cumsum(values)[-1]) if len(values) else 0.0


def _recursive_into(dst: FloatArray, src: FloatArray, alpha: float, beta: float, seed: float) -> None:
    """dst[i] = alpha*src[i] + beta*dst[i-1] with dst[-1] = seed, in C (lfilter), chunk by chunk."""
    b = np.array([alpha])
    a = np.array([1.0, -beta])
    state = np.array([beta * seed])
    for lo, hi in _spans(0, len(src)):
        y, state = lfilter(b, a, src[lo:hi], zi=state)
        dst[lo:hi] = y


def _ema_into(dst: FloatArray, src: FloatArray, p: int, start: int) -> int:
    """TA-Lib EMA of src seeded with the mean of src[start : start+p]; fills dst from the seed on.

    Returns the index of the first value, or len(src) if there is none.
    """
    first = start + p - 1
    if first >= len(src):
        return len(src)
    k = 2.0 / (p + 1)
    seed = _seq_sum(src[start : first + 1]) / p
    dst[first] = seed
    _recursive_into(dst[first + 1 :], src[first + 1 :], k, 1.0 - k, seed)
    return first


def _shift_sum_into(dst: FloatArray, x: FloatArray, p: int) -> None:
    """dst[i] = x[i] + x[i+1] + ... + x[i+p-1], oldest first; len(dst) == len(x) - p + 1."""
    m = len(dst)
    np.copyto(dst, x[:m])
    for k in range(1, p):
        dst += x[k : k + m]


def _rolling_extreme(x: npt.NDArray[Any], p: int, op: Callable[..., Any]) -> npt.NDArray[Any]:
    """op (maximum, minimum, logical_and) over every p-window by doubling. Length len(x) - p + 1."""
    if p == 1:
        return x
    cur = x
    width = 1
    while 2 * width <= p:
        cur = op(cur[:-width], cur[width:])  # cur[i] now covers x[i : i + 2*width]
        width *= 2
    m = len(x) - p + 1
    if width == p:
        return cur[:m]
    result: npt.NDArray[Any] = op(cur[:m], cur[p - width : p - width + m])
    return result


def _anchored_moments(
    x: FloatArray, p: int, *, second: bool
) -> tuple[FloatArray, FloatArray | None]:
    """Mean (and population variance) of every p-window of a price-like series. Length len(x)-p+1.

    Each block of `width` bars is shifted by its first value before its prefix sums are taken, so
    sums and sums of squares stay at the scale of the local spread, not of the price level; a
    window starting in the previous block has that block's tail re-anchored by the shift
    identities sum(x-b) = sum(x-a) - m(b-a) and sum((x-b)^2) = sum((x-a)^2) - 2(b-a)sum(x-a) +
    m(b-a)^2.
    """
    n = len(x)
    width = max(_BLOCK, 1 << (p - 1).bit_length())
    blocks = -(-n // width)
    grid = np.empty((blocks, width))
    flat = grid.reshape(-1)
    flat[:n] = x
    flat[n:] = x[-1]
    anchor = grid[:, 0].copy()
    grid -= anchor[:, None]
    prefix1 = np.cumsum(grid, axis=1)
    s1 = prefix1.copy()
    if width > p:
        s1[:, p:] -= prefix1[:, : width - p]
    s2: FloatArray | None = None
    prefix2: FloatArray | None = None
    if second:
        grid *= grid
        prefix2 = np.cumsum(grid, axis=1)
        s2 = prefix2.copy()
        if width > p:
            s2[:, p:] -= prefix2[:, : width - p]
    if p > 1 and blocks > 1:
        # The window ending at offset o < p-1 takes its first m = p-1-o values from the end of
        # the previous block.
        m = np.arange(p - 1, 0, -1, dtype=np.float64)
        delta = (anchor[1:] - anchor[:-1])[:, None]
        q1 = prefix1[:-1, width - 1 : width] - prefix1[:-1, width - p : width - 1]
        s1[1:, : p - 1] += q1 - m * delta
        if s2 is not None and prefix2 is not None:
            q2 = prefix2[:-1, width - 1 : width] - prefix2[:-1, width - p : width - 1]
            s2[1:, : p - 1] += q2 - 2.0 * delta * q1 + m * (delta * delta)
    lo, hi = p - 1, n
    mean_dev = s1.reshape(-1)[lo:hi] / p
    mean = np.repeat(anchor, width)[lo:hi] + mean_dev
    if s2 is None:
        return mean, None
    var = s2.reshape(-1)[lo:hi] / p - mean_dev * mean_dev
    np.maximum(var, 0.0, out=var)
    return mean, var


def _window_mean(x: FloatArray, p: int) -> FloatArray:
    """Mean of every p-window of a price-like series (chunk-sized input). Length len(x) - p + 1."""
    if p <= _SHIFT_ADD_MAX:
        out = np.empty(len(x) - p + 1)
        _shift_sum_into(out, x, p)
        out /= p
        return out
    return _anchored_moments(x, p, second=False)[0]


def _talib_sma_into(dst: FloatArray, src: FloatArray, p: int, start: int) -> int:
    """TA-Lib's SMA of src[start:] bit for bit, written to dst from its first value on.

    TA-Lib keeps one running total: add the newest value, emit total/p, subtract the oldest. The
    whole add/subtract sequence is interleaved into one buffer and summed by np.cumsum, which
    rounds after each step as the C loop does, so window sums that should be 0 carry the same
    residue TA-Lib's do. Returns the index of the first value (len(src) if none).
    """
    n = len(src)
    first = start + p - 1
    if first >= n:
        return n
    carry = _seq_sum(src[start:first])
    buf = np.empty(2 * _CHUNK)
    for lo, hi in _spans(first, n):
        z = buf[: 2 * (hi - lo)]
        z[0::2] = src[lo:hi]
        np.negative(src[lo - p + 1 : hi - p + 1], out=z[1::2])
        z[0] += carry
        np.cumsum(z, out=z)
        np.divide(z[0::2], p, out=dst[lo:hi])
        carry = float(z[-1])
    return first


# --------------------------------------------------------------------------- moving averages


def sma(x: npt.ArrayLike, period: int) -> FloatArray:
    """Simple moving average (TA-Lib SMA): NaN for the first period-1 values.

    Raises ValueError if period < 1 (a programming error).
    """
    values = _series(x, "x")
    p = _period(period, "period")
    n = len(values)
    out = _warmup(n, p - 1)
    for lo, hi in _spans(p - 1, n):
        window = values[lo - p + 1 : hi]
        if p <= _SHIFT_ADD_MAX:
            _shift_sum_into(out[lo:hi], window, p)
            out[lo:hi] /= p
        else:
            out[lo:hi] = _anchored_moments(window, p, second=False)[0]
    return out


def ema(x: npt.ArrayLike, period: int) -> FloatArray:
    """Exponential moving average (TA-Lib EMA), k = 2/(period+1).

    Seeded with the simple mean of the first `period` values, so the first value is at index
    period-1 and everything before it is NaN. Raises ValueError if period < 1 (a programming error).
    """
    values = _series(x, "x")
    p = _period(period, "period")
    out = _warmup(len(values), p - 1)
    _ema_into(out, values, p, 0)
    return out


def macd(
    close: npt.ArrayLike, fast: int = 12, slow: int = 26, signal: int = 9
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """MACD line, signal line and histogram (TA-Lib MACD).

    As in TA-Lib, the fast EMA is seeded on the `fast` bars that end where the slow EMA's seed
    ends, so both start together at index slow-1 and the line is their difference; the signal is
    an EMA of the line seeded the same way. All three are NaN before index slow+signal-2 (TA-Lib
    withholds the early line values too, keeping the three aligned). If fast > slow the two are
    swapped, as TA-Lib does. Raises ValueError if any period < 1 (a programming error).
    """
    values = _series(close, "close")
    f = _period(fast, "fast")
    s = _period(slow, "slow")
    sig = _period(signal, "signal")
    if f > s:
        f, s = s, f
    n = len(values)
    first = s + sig - 2
    line, sig_line, hist = _warmup(n, first), _warmup(n, first), _warmup(n, first)
    if first >= n:
        return line, sig_line, hist
    start = s - 1
    # sig_line and hist serve as scratch for the two price EMAs until the line exists.
    _ema_into(sig_line, values, s, 0)
    _ema_into(hist, values, f, s - f)
    np.subtract(hist[start:], sig_line[start:], out=line[start:])
    _ema_into(sig_line, line, sig, start)
    np.subtract(line[first:], sig_line[first:], out=hist[first:])
    line[:first] = np.nan
    sig_line[:first] = np.nan
    hist[:first] = np.nan
    return line, sig_line, hist


# --------------------------------------------------------------------------- oscillators


def rsi(close: npt.ArrayLike, period: int = 14) -> FloatArray:
    """Relative Strength Index (TA-Lib RSI, Wilder smoothing, no unstable period).

    The first value, at index `period`, uses the plain means of the first `period` gains and
    losses; later ones Wilder's recursion avg = (avg*(period-1) + today)/period. Only gains give
    100, only losses 0, and a stretch with neither (flat prices) gives 0.0, as TA-Lib does.
    Raises ValueError if period < 1 (a programming error).
    """
    values = _series(close, "close")
    p = _period(period, "period")
    n = len(values)
    out = _warmup(n, p)
    if n <= p:
        return out
    head = np.diff(values[: p + 1])
    head_gain = np.maximum(head, 0.0)
    avg_gain = _seq_sum(head_gain) / p
    avg_loss = _seq_sum(head_gain - head) / p
    total = avg_gain + avg_loss
    out[p] = 100.0 * (avg_gain / total) if total > 0.0 else 0.0
    beta = (p - 1) / p
    b = np.array([1.0 / p])
    a = np.array([1.0, -beta])
    state_gain = np.array([beta * avg_gain])
    state_loss = np.array([beta * avg_loss])
    for lo, hi in _spans(p + 1, n):
        diff = values[lo:hi] - values[lo - 1 : hi - 1]
        gain = np.maximum(diff, 0.0)
        diff -= gain
        np.negative(diff, out=diff)  # the loss: exactly -diff where diff < 0, else 0.0
        g, state_gain = lfilter(b, a, gain, zi=state_gain)
        lo_, state_loss = lfilter(b, a, diff, zi=state_loss)
        lo_ += g
        res = out[lo:hi]
        res.fill(0.0)
        np.divide(g, lo_, out=res, where=lo_ > 0.0)
        res *= 100.0
    return out


def stochastic(
    high: npt.ArrayLike,
    low: npt.ArrayLike,
    close: npt.ArrayLike,
    fastk_period: int = 5,
    slowk_period: int = 3,
    slowd_period: int = 3,
) -> tuple[FloatArray, FloatArray]:
    """Slow stochastic %K and %D (TA-Lib STOCH with SMA smoothing for both).

    fast %K = (close - lowest low)/(highest high - lowest low)*100 over fastk_period bars, 0.0 when
    that range is zero; slow %K is its SMA over slowk_period, slow %D the SMA of slow %K over
    slowd_period. Both are NaN before index fastk_period+slowk_period+slowd_period-3, where TA-Lib
    starts them together. Raises ValueError if any period < 1 (a programming error).
    """
    h = _series(high, "high")
    lo_ = _series(low, "low")
    c = _series(close, "close")
    n = _same_length(high=h, low=lo_, close=c)
    fk = _period(fastk_period, "fastk_period")
    sk = _period(slowk_period, "slowk_period")
    sd = _period(slowd_period, "slowd_period")
    first = fk + sk + sd - 3
    slow_k, slow_d = _warmup(n, first), _warmup(n, first)
    if first >= n:
        return slow_k, slow_d
    # slow_d holds fast %K until slow %K has consumed it.
    for lo, hi in _spans(fk - 1, n):
        highest = _rolling_extreme(h[lo - fk + 1 : hi], fk, np.maximum)
        lowest = _rolling_extreme(lo_[lo - fk + 1 : hi], fk, np.minimum)
        span = highest - lowest
        res = slow_d[lo:hi]
        res.fill(0.0)
        np.divide(c[lo:hi] - lowest, span, out=res, where=span != 0.0)
        res *= 100.0
    k_start = _talib_sma_into(slow_k, slow_d, sk, fk - 1)
    _talib_sma_into(slow_d, slow_k, sd, k_start)
    slow_k[:first] = np.nan
    slow_d[:first] = np.nan
    return slow_k, slow_d


def cci(
    high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike, period: int = 14
) -> FloatArray:
    """Commodity Channel Index (TA-Lib CCI) on the typical price (high+low+close)/3.

    CCI = (tp - mean)/(0.015 * mean absolute deviation) over `period` bars, NaN before index
    period-1. Where the deviation or the numerator is zero at the precision of the prices (a flat
    window, or today's price at the mean) the value is 0.0, as TA-Lib does. Raises ValueError if
    period < 1 (a programming error).
    """
    h = _series(high, "high")
    lo_ = _series(low, "low")
    c = _series(close, "close")
    n = _same_length(high=h, low=lo_, close=c)
    p = _period(period, "period")
    out = _warmup(n, p - 1)
    for lo, hi in _spans(p - 1, n):
        m = hi - lo
        a = lo - p + 1
        tp = h[a:hi] + lo_[a:hi]
        tp += c[a:hi]
        tp /= 3.0
        mean = _window_mean(tp, p)
        dev = np.abs(tp[:m] - mean)
        buf = np.empty(m)
        for k in range(1, p):
            np.subtract(tp[k : k + m], mean, out=buf)
            np.abs(buf, out=buf)
            dev += buf
        num = tp[p - 1 :] - mean
        scale = np.abs(mean)
        valid = np.abs(num) > _TA_EPSILON * scale
        scale *= _TA_EPSILON * p
        valid &= dev > scale
        dev *= 0.015 / p
        res = out[lo:hi]
        res.fill(0.0)
        np.divide(num, dev, out=res, where=valid)
    return out


# --------------------------------------------------------------------------- volatility and volume


def atr(
    high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike, period: int = 14
) -> FloatArray:
    """Average True Range (TA-Lib ATR, Wilder smoothing, no unstable period).

    True range needs the previous close, so the first value, at index `period`, is the plain mean
    of the true ranges of bars 1..period; later values follow Wilder's recursion. Raises ValueError
    if period < 1 (a programming error).
    """
    h = _series(high, "high")
    lo_ = _series(low, "low")
    c = _series(close, "close")
    n = _same_length(high=h, low=lo_, close=c)
    p = _period(period, "period")
    out = _warmup(n, p)
    if n <= p:
        return out

    def true_range(lo: int, hi: int) -> FloatArray:
        prev = c[lo - 1 : hi - 1]
        tr = h[lo:hi] - lo_[lo:hi]
        np.maximum(tr, np.abs(prev - h[lo:hi]), out=tr)
        np.maximum(tr, np.abs(prev - lo_[lo:hi]), out=tr)
        return tr

    beta = (p - 1) / p
    alpha = 1.0 - beta  # as TA-Lib: alpha derived from beta, so alpha + beta == 1 exactly
    seed = _seq_sum(true_range(1, p + 1)) / p
    out[p] = seed
    b = np.array([alpha])
    a = np.array([1.0, -beta])
    state = np.array([beta * seed])
    for lo, hi in _spans(p + 1, n):
        y, state = lfilter(b, a, true_range(lo, hi), zi=state)
        out[lo:hi] = y
    return out


def bollinger(
    close: npt.ArrayLike, period: int = 20, nbdev_up: float = 2.0, nbdev_dn: float = 2.0
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Bollinger Bands (TA-Lib BBANDS with an SMA middle band): upper, middle, lower.

    The deviation is the population standard deviation of the window, so a flat window gives
    bands of width exactly 0. NaN before index period-1. Raises ValueError if period < 1 (a
    programming error).
    """
    values = _series(close, "close")
    p = _period(period, "period")
    up = float(nbdev_up)
    dn = float(nbdev_dn)
    n = len(values)
    upper, middle, lower = _warmup(n, p - 1), _warmup(n, p - 1), _warmup(n, p - 1)
    for lo, hi in _spans(p - 1, n):
        window = values[lo - p + 1 : hi]
        mean, var = _anchored_moments(window, p, second=True)
        assert var is not None
        if p > 1:
            flat = _rolling_extreme(window[1:] == window[:-1], p - 1, np.logical_and)
            var[flat] = 0.0
        else:
            var.fill(0.0)
        np.sqrt(var, out=var)
        middle[lo:hi] = mean
        np.multiply(var, up, out=upper[lo:hi])
        upper[lo:hi] += mean
        np.multiply(var, -dn, out=lower[lo:hi])
        lower[lo:hi] += mean
    return upper, middle, lower


def mfi(
    high: npt.ArrayLike,
    low: npt.ArrayLike,
    close: npt.ArrayLike,
    volume: npt.ArrayLike,
    period: int = 14,
) -> FloatArray:
    """Money Flow Index (TA-Lib MFI), first value at index `period`.

    A bar's money flow (typical price x volume) is positive when the typical price rose or held
    and negative when it fell; a move within TA-Lib's scale-aware epsilon of the two prices is no
    move and carries no flow. A window with no money flow at all (flat prices or zero volume) gives
    0.0, as TA-Lib does. Raises ValueError if period < 1 (a programming error).
    """
    h = _series(high, "high")
    lo_ = _series(low, "low")
    c = _series(close, "close")
    v = _series(volume, "volume")
    n = _same_length(high=h, low=lo_, close=c, volume=v)
    p = _period(period, "period")
    out = _warmup(n, p)
    if n <= p:
        return out

    def flows(lo: int, hi: int) -> npt.NDArray[np.complex128]:
        """Money flow of bars lo..hi-1 (lo >= 1) as positive + 1j*negative."""
        tp = h[lo - 1 : hi] + lo_[lo - 1 : hi]
        tp += c[lo - 1 : hi]
        tp /= 3.0
        cur = tp[1:]
        prev = tp[:-1]
        move = cur - prev
        scale = np.abs(cur) + np.abs(prev)
        scale *= _TA_EPSILON
        money = cur * v[lo:hi]
        money[np.abs(move) <= scale] = 0.0
        w = np.zeros(hi - lo, dtype=np.complex128)
        falling = move < 0.0
        w.real = money
        w.real[falling] = 0.0
        w.imag[falling] = money[falling]
        return w

    def emit(sums: npt.NDArray[np.complex128], dst: FloatArray) -> None:
        pos = sums.real
        total = pos + sums.imag
        clamped = np.clip(pos, 0.0, np.maximum(total, 0.0))
        dst.fill(0.0)
        np.divide(clamped, total, out=dst, where=total > 0.0)
        dst *= 100.0

    # TA-Lib restarts both sums at exactly 0.0 once `period` consecutive bars carried no flow;
    # after that they stay 0.0 (only zeros enter and leave) until flow returns.
    head = flows(1, p + 1)
    total = np.cumsum(head)[-1] if not np.all(head == 0.0) else 0j
    first_sum = np.array([total])
    emit(first_sum, out[p : p + 1])
    carry = complex(first_sum[0])
    empty_run = int(np.all(head == 0.0))  # 1 while the current window is known to be empty
    buf = np.empty(2 * _CHUNK, dtype=np.complex128)
    for lo, hi in _spans(p + 1, n):
        w = flows(lo - p, hi)  # bars lo-p .. hi-1: leaving and entering bars of every step
        entering = w[p:]
        leaving = w[: hi - lo]
        # window ending at bar t is empty iff bars t-p+1..t all carried nothing
        empty = _rolling_extreme(w[1:] == 0.0, p, np.logical_and)
        starts = np.flatnonzero(empty & ~np.concatenate(([bool(empty_run)], empty[:-1])))
        z = buf[: 2 * (hi - lo)]
        z[0::2] = -leaving
        z[1::2] = entering
        seg_lo = 0
        for stop in [*starts.tolist(), hi - lo]:
            seg = z[2 * seg_lo : 2 * stop + (2 if stop < hi - lo else 0)]
            if len(seg):
                seg[0] += carry
                np.cumsum(seg, out=seg)
                carry = complex(seg[-1])
            if stop < hi - lo:
                z[2 * stop + 1] = 0.0
                carry = 0j
                seg_lo = stop + 1
        empty_run = int(empty[-1])
        emit(z[1::2], out[lo:hi])
    return out
