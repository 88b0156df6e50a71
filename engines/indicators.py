"""Technical indicators over numpy float64 arrays, numerically equal to TA-Lib.

Strategies and backtests compute these over long histories, and their thresholds were tuned
against TA-Lib, so every function returns an array as long as its input, holds NaN exactly where
TA-Lib has no value (the warm-up), and agrees with TA-Lib to 1e-9 relative everywhere else. TA-Lib
is only a test-time reference; this module needs numpy alone.

How the numbers stay equal:

* Recursive filters (EMA, Wilder smoothing in RSI and ATR, the EMAs of MACD) evaluate TA-Lib's
  first-order recursion with TA-Lib's seeds (summed in TA-Lib's order). Short series (the engines'
  windows) run it bar by bar; long ones in blocks of 16 bars, one matrix product for all blocks plus
  a much shorter recursion for the values carried from block to block (see _recursion_chunks).
  Each output is then a short weighted sum of inputs, accurate to a few ulps of its own size: no
  rounding accumulates along the series, where a bar-by-bar loop is bound by the latency of one
  multiply-add per bar. The MACD line is the sum of two such recursions (the fast EMA and the
  negated slow one), evaluated together.
* Where TA-Lib keeps a running total (the SMA inside STOCH, the money-flow sums of MFI) it leaves
  rounding residue where the exact answer is 0 (e.g. 5e-15 for a window of zeros). No relative
  tolerance survives a residue compared with an exact zero, so those totals are reproduced
  operation for operation: TA-Lib's add-then-subtract sequence is laid out in one buffer and
  summed by `np.cumsum`, which rounds after every step exactly as TA-Lib's loop does. Two
  independent totals share one complex cumsum (real and imaginary parts), at the cost of one.
* Other window statistics are built by doubling: sums (and Chan's pairwise mean/variance updates)
  of runs of 1, 2, 4, ... bars, combined along the binary expansion of the period. That takes
  log2(period) vectorised passes, never forms a sum of squares at the price level (so a variance
  cannot cancel), and gives exactly 0 for a flat window, as TA-Lib does.
* CCI divides by the distance of today's price from the window mean. Where that distance is a few
  ulps of the price, TA-Lib's own summation order decides its leading digits, so there the mean is
  recomputed in that order (a circular buffer summed slot by slot).
* Degenerate windows (flat prices, no money flow) answer what TA-Lib answers.

One limit: MACD's line, signal and histogram are differences of price-sized EMAs. Near a crossing
TA-Lib's own rounding (a few ulps of the price, from a recursion that no vectorised form rounds
identically) is their leading digit, so there they agree to ~1e-15 of the price, not 1e-9 of the
value.

Work runs in cache-sized chunks written straight into the output arrays, and a recursion's computed
input (gains, true ranges) is laid out in its output array and smoothed there: at a million bars
every whole-array pass and every fresh whole-array temporary costs about as much as the arithmetic.

Every function raises ValueError for a period below 1, a non-1-D input or inputs of different
lengths: those are programming errors in the caller, not market conditions. Market conditions (flat
prices, gaps, a series shorter than the warm-up, an empty series) never raise. Inputs are expected
NaN-free; a NaN (or infinity) makes every later value of a recursive indicator NaN, and the windows
that contain it NaN for the others.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

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

# Bars per chunk: the few chunk-sized temporaries of a step stay in L2.
_CHUNK = 1 << 15
# TA-Lib's scale-aware zero (TA_IS_ZERO_SCALED): |v| <= 1e-14 * scale. TA-Lib uses it to decide
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
    """Output array: NaN before `first`; the caller fills the rest."""
    out = np.empty(n)
    out[: min(first, n)] = np.nan
    return out


def _spans(lo: int, hi: int, size: int = 0) -> Iterator[tuple[int, int]]:
    """[lo, hi) cut into chunks of `size` bars (default _CHUNK, read at call time)."""
    step = size or _CHUNK
    for start in range(lo, hi, step):
        yield start, min(start + step, hi)


# --------------------------------------------------------------------------- numeric building blocks


# Recursions (EMA, Wilder) are evaluated in blocks of this many bars, one matrix product for all
# blocks: a (blocks x 17) @ (17 x 16) product runs at BLAS speed, where a bar-by-bar loop (scipy's
# lfilter included) is bound by the latency of one multiply-add per bar.
_BLOCK = 16
# Up to this many bars a recursion runs as a plain Python loop: the engines evaluate windows of a
# few hundred bars, where setting up the blocks costs as much as the loop.
_SEQ_MAX = 256
# OpenBLAS hands a matrix product of more than 4*65536 multiply-adds (a matrix-vector product of
# more than 9216 elements) to its thread pool; on a busy machine the wait for a second core costs
# up to 100x the product itself (measured at 1M bars: 1-2 ms on the calling thread, outliers of
# 20-200 ms threaded), so the products here are cut to stay under both.
_GEMM_MNK = 4 * 65536
_GEMV_ROWS = 512

# One first-order recursion y[i] = alpha*x[i] + beta*y[i-1], started from y[-1] = seed.
Recursion = tuple[float, float, float]


def _block_weights(alpha: float, beta: float) -> FloatArray:
    """What a block's inputs and the value before it contribute to the block's outputs.

    Rows 0.._BLOCK-1: W[m, j] = alpha*beta**(j-m) for input m and output j (0 for m > j); row
    _BLOCK: beta**(j+1) for the value before the block.
    """
    lag = np.arange(_BLOCK)[None, :] - np.arange(_BLOCK)[:, None]
    weights = np.empty((_BLOCK + 1, _BLOCK))
    weights[:_BLOCK] = np.where(lag >= 0, alpha * beta ** np.maximum(lag, 0).astype(np.float64), 0.0)
    weights[_BLOCK] = beta ** np.arange(1, _BLOCK + 1, dtype=np.float64)
    return weights


_WEIGHTS: dict[tuple[tuple[float, float], ...], tuple[FloatArray, FloatArray, tuple[float, ...]]] = {}


def _weights_for(
    coefficients: tuple[tuple[float, float], ...],
) -> tuple[FloatArray, FloatArray, tuple[float, ...]]:
    """For summed recursions with these (alpha, beta): what each block's inputs contribute to its
    last output (one column per recursion); [summed W; one decay row per recursion], the weights
    of [block | values before it]; and each recursion's beta**_BLOCK. Cached (read-only arrays):
    a backtest asks for the same few periods over and over."""
    cached = _WEIGHTS.get(coefficients)
    if cached is None:
        parts = [_block_weights(alpha, beta) for alpha, beta in coefficients]
        to_end = np.stack([w[:_BLOCK, -1] for w in parts], axis=1)
        weights = np.concatenate([np.sum([w[:_BLOCK] for w in parts], axis=0), *(w[_BLOCK:] for w in parts)])
        to_end.flags.writeable = weights.flags.writeable = False
        cached = to_end, weights, tuple(float(w[-1, -1]) for w in parts)
        if len(_WEIGHTS) >= 256:  # bounded: periods come from configuration, but never trust that
            _WEIGHTS.clear()
        _WEIGHTS[coefficients] = cached
    return cached


def _sequential(src: FloatArray, recursions: list[Recursion]) -> FloatArray:
    """The summed recursions bar by bar: for short series and the last partial block."""
    total = np.zeros(len(src))
    values = src.tolist()
    for alpha, beta, seed in recursions:
        y = seed
        out = []
        for xn in values:
            y = alpha * xn + beta * y
            out.append(y)
        total += out
    return total


def _recursion_chunks(
    src: FloatArray, recursions: list[Recursion], dst: FloatArray | None = None
) -> Iterator[tuple[int, int, FloatArray]]:
    """The sum of the recursions over src, chunk by chunk, in order.

    Yields (lo, hi, y): y holds the outputs of bars lo..hi-1. With `dst` (contiguous, as long as
    src) y is the view dst[lo:hi], and all of dst is written; without, y is scratch that the next
    chunk reuses. src may be dst itself: each chunk of input is read before its outputs are written.

    Blocked: one row of a matrix product, [block | values before it] @ weights, gives a whole
    block's outputs. The values before the blocks follow a recursion of their own, one value per
    block with beta**_BLOCK per step, evaluated the same way from each block's own part of its last
    output. Every output is then one short weighted sum of inputs and carries, accurate to a few
    ulps of the sum of its terms: no rounding builds up along the series.

    From the first NaN or infinite input on, the outputs are NaN (a block product would otherwise
    smear a NaN over the earlier bars of its block).
    """
    n = len(src)
    if dst is not None and not (dst.flags.c_contiguous and len(dst) == n):
        raise ValueError("dst must be contiguous and as long as src")  # a reshaped copy would swallow outputs
    count = len(recursions)
    blocks = n // _BLOCK if n > _SEQ_MAX else 0
    valid = n  # bars before the first non-finite input
    lasts = [seed for _, _, seed in recursions]  # each recursion's value before bar blocks*_BLOCK
    if blocks:
        to_end, weights, carry_decays = _weights_for(tuple((alpha, beta) for alpha, beta, _ in recursions))
        x = src[: blocks * _BLOCK].reshape(blocks, _BLOCK)  # one block a row
        # Each block's own part of its last output (as if the value before it were 0) ...
        own_ends = np.empty((blocks, count))
        for lo, hi in _spans(0, blocks, _GEMV_ROWS):
            np.matmul(x[lo:hi], to_end, out=own_ends[lo:hi])
        if not np.isfinite(own_ends).all():
            first_bad = int(np.flatnonzero(~np.isfinite(own_ends))[0]) // count
            bad = np.flatnonzero(~np.isfinite(x[first_bad]))
            if len(bad):  # (else a finite input overflowed: let it run)
                blocks, valid = first_bad, first_bad * _BLOCK + int(bad[0])
        # ... gives the value before each block, by a recursion over blocks.
        before = np.empty((blocks + 1, count))
        for i, ((_, _, seed), decay) in enumerate(zip(recursions, carry_decays, strict=True)):
            ends = np.empty(blocks + 1)
            ends[0] = seed
            _recursion_into(ends[1:], np.ascontiguousarray(own_ends[:blocks, i]), [(1.0, decay, seed)])
            before[:, i] = ends
            lasts[i] = float(ends[-1])
        # Then [block | values before it] @ weights is a whole block's outputs. Blocks per chunk:
        # 4*_CHUNK bars, measured best (a chunk costs a dozen calls; the products stream anyway).
        rows = min(max(4 * _CHUNK // _BLOCK, 1), blocks)
        augmented = np.empty((rows, _BLOCK + count))
        scratch = np.empty((rows if dst is None else 0, _BLOCK))  # the outputs, without dst
        for lo, hi in _spans(0, blocks, rows):
            inputs = augmented[: hi - lo]
            inputs[:, :_BLOCK] = x[lo:hi]
            inputs[:, _BLOCK:] = before[lo:hi]
            # (dst is contiguous: its reshape is a view)
            y = scratch[: hi - lo] if dst is None else dst[lo * _BLOCK : hi * _BLOCK].reshape(hi - lo, _BLOCK)
            for a, b in _spans(0, hi - lo, _GEMM_MNK // weights.size):
                np.matmul(inputs[a:b], weights, out=y[a:b])
            yield lo * _BLOCK, hi * _BLOCK, y.reshape(-1)
    head = blocks * _BLOCK
    if head < valid:
        tail = src[head:valid]
        bad = np.flatnonzero(~np.isfinite(tail))
        if len(bad):
            valid = head + int(bad[0])
        y = _sequential(src[head:valid], [(a, b, last) for (a, b, _), last in zip(recursions, lasts, strict=True)])
        if dst is not None:
            dst[head:valid] = y
            y = dst[head:valid]
        yield head, valid, y
    if valid < n:
        y = np.full(n - valid, np.nan)
        if dst is not None:
            dst[valid:] = y
            y = dst[valid:]
        yield valid, n, y


def _recursion_into(dst: FloatArray, src: FloatArray, recursions: list[Recursion]) -> None:
    """dst[:] = the sum of the recursions over src (see _recursion_chunks); dst contiguous."""
    for _ in _recursion_chunks(src, recursions, dst):
        pass


def _seq_sum(values: npt.NDArray[Any]) -> Any:
    """Left-to-right sum from 0.0, the order TA-Lib accumulates in (np.sum is pairwise)."""
    return np.cumsum(values)[-1] if len(values) else values.dtype.type(0)


def _ema_into(dst: FloatArray, src: FloatArray, p: int, start: int) -> None:
    """TA-Lib EMA of src seeded with the mean of src[start : start+p]; fills dst from the seed on."""
    first = start + p - 1
    if first >= len(src):
        return
    k = 2.0 / (p + 1)
    seed = float(_seq_sum(src[start : first + 1])) / p
    dst[first] = seed
    _recursion_into(dst[first + 1 :], src[first + 1 :], [(k, 1.0 - k, seed)])


def _rolling(x: npt.NDArray[Any], p: int, op: Callable[..., Any]) -> npt.NDArray[Any]:
    """Idempotent op (maximum, minimum, logical_and) over every p-window, by doubling.

    Length len(x) - p + 1; log2(p) passes.
    """
    if p == 1:
        return x
    run = x
    width = 1
    while 2 * width <= p:
        run = op(run[:-width], run[width:])  # run[i] now covers x[i : i + 2*width]
        width *= 2
    m = len(x) - p + 1
    if width == p:
        return run[:m]
    result: npt.NDArray[Any] = op(run[:m], run[p - width : p - width + m])
    return result


def _window_sum(x: FloatArray, p: int) -> FloatArray:
    """Sum of every p-window, length len(x) - p + 1, in about 2*log2(p) vectorised passes.

    Sums of power-of-two runs are built by doubling and each window is assembled from the runs
    of p's binary expansion: a pairwise sum of its own values, accurate to a few ulps and exactly
    0.0 for a window of zeros, with no running total to drift.
    """
    m = len(x) - p + 1
    out: FloatArray | None = None
    owned = False  # out is a buffer of this call, not a view of a run (or of x)
    offset = 0
    run = x
    width = 1
    while True:
        if p & width:
            part = run[offset : offset + m]
            if out is None:
                out = part
            elif owned:
                out += part
            else:
                out, owned = out + part, True
            offset += width
        if 2 * width > p:
            break
        run = run[:-width] + run[width:]  # run[i] now covers x[i : i + 2*width]
        width *= 2
    assert out is not None
    return out  # may be a view of x: read it, do not write it


def _window_mean_m2(x: FloatArray, p: int, mean: FloatArray) -> FloatArray:
    """Mean (into `mean`) and M2, the sum of squared deviations, of every p-window; returns M2.
    Both of length len(x) - p + 1.

    Built like _window_sum but carrying (sum, M2) of runs of 1, 2, 4, ... bars, where two runs of
    w bars merge with M2 = M2a + M2b + (Sb - Sa)^2/(2w), and the runs of p's binary expansion with
    Chan et al.'s update M2 = M2a + M2b + (mean_b - mean_a)^2 * na*nb/(na+nb). No sum of squares at
    the price level is formed, so nothing cancels: M2 is as precise as a two-pass one, and a window
    of identical values has an M2 of exactly 0.0 (sums of 2^k equal values, and their means, are
    exact).
    """
    m = len(x) - p + 1
    m2: FloatArray | None = None  # None: no spread (yet)
    count = 0
    offset = 0
    run_sum = x
    run_m2: FloatArray | None = None  # runs of one bar have no spread
    width = 1
    while True:
        if p & width:
            part_m2 = None if run_m2 is None else run_m2[offset : offset + m]
            if not count:
                np.multiply(run_sum[offset : offset + m], 1.0 / width, out=mean)  # exact: width = 2^k
                m2 = part_m2
            else:
                total = count + width
                delta = run_sum[offset : offset + m] * (1.0 / width)
                delta -= mean
                spread = delta * delta
                spread *= count * width / total
                for known in (m2, part_m2):
                    if known is not None:
                        spread += known
                m2 = spread
                delta *= width / total
                mean += delta
            count += width
            offset += width
        if 2 * width > p:
            break
        left, right = run_sum[:-width], run_sum[width:]
        merged = right - left
        run_sum = left + right
        merged *= merged
        merged *= 0.5 / width
        if run_m2 is not None:
            merged += run_m2[:-width]
            merged += run_m2[width:]
        run_m2 = merged
        width *= 2
    return np.zeros(m) if m2 is None else m2  # scratch of this call: the caller may overwrite it


# --------------------------------------------------------------------------- moving averages


def sma(x: npt.ArrayLike, period: int) -> FloatArray:
    """Simple moving average (TA-Lib SMA): NaN for the first period-1 values.

    Raises ValueError if period < 1 (a programming error).
    """
    values = _series(x, "x")
    p = _period(period, "period")
    n = len(values)
    out = _warmup(n, p - 1)
    for lo, hi in _spans(p - 1, n, max(_CHUNK, 4 * p)):
        np.divide(_window_sum(values[lo - p + 1 : hi], p), p, out=out[lo:hi])
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
    # The line is the sum of two recursions over the price, the fast EMA and the negated slow
    # one, evaluated together: one block product gives the line, neither EMA is stored.
    k_fast, k_slow = 2.0 / (f + 1), 2.0 / (s + 1)
    seed_fast = float(_seq_sum(values[s - f : s])) / f
    seed_slow = float(_seq_sum(values[:s])) / s
    line[start] = seed_fast - seed_slow
    fast_ema = (k_fast, 1.0 - k_fast, seed_fast)
    negated_slow_ema = (-k_slow, 1.0 - k_slow, -seed_slow)
    _recursion_into(line[start + 1 :], values[start + 1 :], [fast_ema, negated_slow_ema])
    # The signal: an EMA of the line seeded on its first `sig` values, as TA-Lib does; the histogram
    # is taken from each chunk of it while that chunk is in cache.
    k_sig = 2.0 / (sig + 1)
    sig_line[first] = float(_seq_sum(line[start : first + 1])) / sig
    hist[first] = line[first] - sig_line[first]
    signal_ema = [(k_sig, 1.0 - k_sig, float(sig_line[first]))]
    for lo, hi, part in _recursion_chunks(line[first + 1 :], signal_ema, sig_line[first + 1 :]):
        np.subtract(line[first + 1 + lo : first + 1 + hi], part, out=hist[first + 1 + lo : first + 1 + hi])
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
    avg_gain = float(_seq_sum(head_gain)) / p
    avg_loss = float(_seq_sum(head_gain - head)) / p
    total = avg_gain + avg_loss
    out[p] = 100.0 * (avg_gain / total) if total > 0.0 else 0.0
    beta = (p - 1) / p

    # The gains are laid out where the RSI goes and smoothed in place, the losses beside them; then
    # each chunk of smoothed losses turns the smoothed gains into RSI values.
    res = out[p + 1 :]
    losses = np.empty(n - p - 1)
    for lo, hi in _spans(p + 1, n):
        gain, loss = res[lo - p - 1 : hi - p - 1], losses[lo - p - 1 : hi - p - 1]
        np.subtract(values[lo:hi], values[lo - 1 : hi - 1], out=loss)  # the change, for now
        np.maximum(loss, 0.0, out=gain)
        np.subtract(gain, loss, out=loss)  # exactly -change where the price fell, else 0
    _recursion_into(res, res, [(1.0 / p, beta, avg_gain)])
    for lo, hi, avg_losses in _recursion_chunks(losses, [(1.0 / p, beta, avg_loss)], losses):
        if hi == lo:
            continue  # a non-finite first input leaves an empty chunk before the NaN one
        part = res[lo:hi]
        avg_losses += part  # now gains + losses
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(part, avg_losses, out=part)
        part *= 100.0
        if not np.min(avg_losses) > 0.0:
            np.copyto(part, 0.0, where=avg_losses <= 0.0)  # no gain and no loss at all: TA-Lib says 0
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
    lw = _series(low, "low")
    c = _series(close, "close")
    n = _same_length(high=h, low=lw, close=c)
    fk = _period(fastk_period, "fastk_period")
    sk = _period(slowk_period, "slowk_period")
    sd = _period(slowd_period, "slowd_period")
    k_first = fk + sk - 2  # first slow %K: TA-Lib computes sd-1 of them before it outputs any
    first = k_first + sd - 1
    slow_k, slow_d = _warmup(n, first), _warmup(n, first)
    if first >= n:
        return slow_k, slow_d
    # slow_d holds fast %K until slow %K has read it. The running totals of slow %K and slow %D
    # share one complex cumsum, %D one chunk behind the %K values it averages.
    fast_k = slow_d
    _fast_k_into(fast_k, h, lw, c, fk, fk - 1, k_first)
    carry_k = float(_seq_sum(fast_k[fk - 1 : k_first]))
    carry_d = 0.0
    d_started = False
    buf = np.empty(2 * _CHUNK, dtype=np.complex128)
    prev_lo = prev_hi = k_first
    for lo, hi in [*_spans(k_first, n), (n, n)]:
        _fast_k_into(fast_k, h, lw, c, fk, lo, hi)
        d_lo, d_hi = max(prev_lo, first), prev_hi
        k_len, d_len = hi - lo, max(d_hi - d_lo, 0)
        prev_lo, prev_hi = lo, hi
        if d_len and not d_started:
            carry_d = float(_seq_sum(slow_k[k_first:first]))
            d_started = True
        if not (k_len or d_len):
            continue
        z = buf[: 2 * max(k_len, d_len)]
        zk, zd = z.real, z.imag
        zk[2 * k_len :] = 0.0
        zd[2 * d_len :] = 0.0
        if k_len:
            zk[0 : 2 * k_len : 2] = fast_k[lo:hi]
            np.negative(fast_k[lo - sk + 1 : hi - sk + 1], out=zk[1 : 2 * k_len : 2])
        if d_len:
            zd[0 : 2 * d_len : 2] = slow_k[d_lo:d_hi]
            np.negative(slow_k[d_lo - sd + 1 : d_hi - sd + 1], out=zd[1 : 2 * d_len : 2])
        zk[0] += carry_k
        zd[0] += carry_d
        np.cumsum(z, out=z)
        if k_len:
            np.divide(zk[0 : 2 * k_len : 2], sk, out=slow_k[lo:hi])
            carry_k = float(zk[2 * k_len - 1])
        if d_len:
            np.divide(zd[0 : 2 * d_len : 2], sd, out=slow_d[d_lo:d_hi])
            carry_d = float(zd[2 * d_len - 1])
    slow_k[:first] = np.nan
    slow_d[:first] = np.nan
    return slow_k, slow_d


def _fast_k_into(dst: FloatArray, h: FloatArray, lw: FloatArray, c: FloatArray, fk: int, lo: int, hi: int) -> None:
    """TA-Lib's raw %K for bars lo..hi-1: (close - lowest)/(highest - lowest)*100, 0.0 if flat."""
    if hi <= lo:
        return
    highest = _rolling(h[lo - fk + 1 : hi], fk, np.maximum)
    lowest = _rolling(lw[lo - fk + 1 : hi], fk, np.minimum)
    span = highest - lowest
    res = dst[lo:hi]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(c[lo:hi] - lowest, span, out=res)
    res *= 100.0
    flat = span == 0.0
    if flat.any():
        res[flat] = 0.0


def cci(high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike, period: int = 14) -> FloatArray:
    """Commodity Channel Index (TA-Lib CCI) on the typical price (high+low+close)/3.

    CCI = (tp - mean)/(0.015 * mean absolute deviation) over `period` bars, NaN before index
    period-1. Where the deviation or the numerator is zero at the precision of the prices (a flat
    window, or today's price at the mean) the value is 0.0, as TA-Lib does. Raises ValueError if
    period < 1 (a programming error).
    """
    h = _series(high, "high")
    lw = _series(low, "low")
    c = _series(close, "close")
    n = _same_length(high=h, low=lw, close=c)
    p = _period(period, "period")
    out = _warmup(n, p - 1)
    for lo, hi in _spans(p - 1, n, max(_CHUNK, 4 * p)):
        m = hi - lo
        a = lo - p + 1
        tp = h[a:hi] + lw[a:hi]
        tp += c[a:hi]
        tp /= 3.0
        total = _window_sum(tp, p)
        mean = total / p
        # sum|tp_k - mean| = 2 * (sum max(tp_k, mean) - sum tp_k): two passes per bar of the
        # window instead of three. The subtraction costs a few ulps of period*price, under 1e-11
        # of any deviation a traded market shows.
        above = np.maximum(tp[:m], mean)
        buf = np.empty(m)
        for k in range(1, p):
            np.maximum(tp[k : k + m], mean, out=buf)
            above += buf
        above -= total
        above *= 2.0 * 0.015 / p  # now 0.015 * mean absolute deviation
        num = tp[p - 1 :] - mean
        scale = np.abs(mean)
        _exact_near_mean(num, tp, lo, a, p, scale)
        scale *= _TA_EPSILON
        valid = np.abs(num) > scale
        scale *= 0.015  # TA-Lib's zero test on the deviation, in the units of `above`
        valid &= above > scale
        res = out[lo:hi]
        res.fill(0.0)
        np.divide(num, above, out=res, where=valid)
    return out


def _exact_near_mean(num: FloatArray, tp: FloatArray, lo: int, a: int, p: int, scale: FloatArray) -> None:
    """Redo tp - mean in TA-Lib's own summation order where today's price sits near the mean.

    There the numerator is a difference of nearly equal numbers and the last-bit difference
    between any two ways of summing the window becomes its leading digit. TA-Lib sums a circular
    buffer in slot order (slot j holds the bar whose index is j mod p), so the window ending at
    bar t is summed from the bar t - (t mod p) onwards and wraps around; reproduce that sum.
    Elsewhere (|num| > 1e-5 of the price) the ordinary mean is within 1e-10 relative.
    """
    near = np.flatnonzero(np.abs(num) <= 1e-5 * scale)
    if not len(near):
        return
    t = near + lo
    acc = np.zeros(len(t))
    for j in range(p):
        acc += tp[t - (t - j) % p - a]
    acc /= p
    num[near] = tp[t - a] - acc


# --------------------------------------------------------------------------- volatility and volume


def atr(high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike, period: int = 14) -> FloatArray:
    """Average True Range (TA-Lib ATR, Wilder smoothing, no unstable period).

    True range needs the previous close, so the first value, at index `period`, is the plain mean
    of the true ranges of bars 1..period; later values follow Wilder's recursion. Raises ValueError
    if period < 1 (a programming error).
    """
    h = _series(high, "high")
    lw = _series(low, "low")
    c = _series(close, "close")
    n = _same_length(high=h, low=lw, close=c)
    p = _period(period, "period")
    out = _warmup(n, p)
    if n <= p:
        return out

    def true_range_into(dst: FloatArray, lo: int, hi: int) -> None:
        """dst[:] = true ranges of bars lo..hi-1 (lo >= 1), a chunk at a time."""
        scratch = np.empty(min(hi - lo, _CHUNK))
        for a, b in _spans(lo, hi):
            part, prev, hi_, lo_ = dst[a - lo : b - lo], c[a - 1 : b - 1], h[a:b], lw[a:b]
            if np.all(hi_ >= lo_):
                # With high >= low, TA-Lib's greatest of high-low, |prev-high| and |prev-low| is the
                # very same subtraction as max(high, prev) - min(low, prev): identical bits, fewer passes.
                np.maximum(hi_, prev, out=part)
                part -= np.minimum(lo_, prev, out=scratch[: b - a])
                continue
            np.subtract(hi_, lo_, out=part)
            np.maximum(part, np.abs(prev - hi_), out=part)
            np.maximum(part, np.abs(prev - lo_), out=part)

    beta = (p - 1) / p
    alpha = 1.0 - beta  # as TA-Lib: alpha derived from beta, so that alpha + beta == 1 exactly
    true_range_into(out[1 : p + 1], 1, p + 1)
    seed = float(_seq_sum(out[1 : p + 1])) / p
    out[1 : p + 1] = np.nan
    out[p] = seed
    # The true ranges are laid out where their averages go; the recursion replaces them in place.
    true_range_into(out[p + 1 :], p + 1, n)
    _recursion_into(out[p + 1 :], out[p + 1 :], [(alpha, beta, seed)])
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
    for lo, hi in _spans(p - 1, n, max(_CHUNK, 4 * p)):
        mean = middle[lo:hi]
        deviation = _window_mean_m2(values[lo - p + 1 : hi], p, mean)
        if up == dn >= 0.0:  # the usual symmetric bands: one deviation serves both
            deviation *= up * up / p
            np.sqrt(deviation, out=deviation)
            np.add(mean, deviation, out=upper[lo:hi])
            np.subtract(mean, deviation, out=lower[lo:hi])
            continue
        deviation *= 1.0 / p
        np.sqrt(deviation, out=deviation)
        np.multiply(deviation, up, out=upper[lo:hi])
        upper[lo:hi] += mean
        np.multiply(deviation, -dn, out=lower[lo:hi])
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
    lw = _series(low, "low")
    c = _series(close, "close")
    v = _series(volume, "volume")
    n = _same_length(high=h, low=lw, close=c, volume=v)
    p = _period(period, "period")
    out = _warmup(n, p)
    if n <= p:
        return out

    def flows(lo: int, hi: int) -> tuple[FloatArray, FloatArray]:
        """Positive and negative money flow of bars lo..hi-1 (lo >= 1)."""
        tp = h[lo - 1 : hi] + lw[lo - 1 : hi]
        tp += c[lo - 1 : hi]
        tp /= 3.0
        cur, prev = tp[1:], tp[:-1]
        move = cur - prev
        size = np.abs(tp)
        scale = size[1:] + size[:-1]
        scale *= _TA_EPSILON
        np.abs(move, out=size[1:])
        money = cur * v[lo:hi]
        np.copyto(money, 0.0, where=size[1:] <= scale)
        # Split by direction with arithmetic, not masks: a rise or fall is a coin flip, and a
        # masked copy mispredicts on every other bar. money - neg is exact (x - x or x - 0).
        neg = money * (move < 0.0)
        money -= neg
        return money, neg

    def emit(total_pos: FloatArray, total_neg: FloatArray, dst: FloatArray) -> None:
        """100 * pos/(pos+neg), with pos clamped into [0, pos+neg] and 0.0 for an empty window."""
        total = total_pos + total_neg
        if len(total) and np.min(total) > 0.0:  # (a NaN fails the test)
            # Every window has flow: clamping pos into [0, total] is clamping the ratio into
            # [0, 1], done only where a residue took it out (a window without rises or falls).
            np.divide(total_pos, total, out=dst)
            dst *= 100.0
            if np.min(dst) < 0.0:
                np.maximum(dst, 0.0, out=dst)
            if np.max(dst) > 100.0:
                np.minimum(dst, 100.0, out=dst)
            return
        clamped = np.maximum(total_pos, 0.0)
        np.minimum(clamped, total, out=clamped)  # only matters where total > 0
        dst.fill(0.0)
        np.divide(clamped, total, out=dst, where=total > 0.0)
        dst *= 100.0

    # TA-Lib restarts both sums at exactly 0.0 as soon as `period` consecutive bars carried no
    # flow; from there they stay 0.0 (only zeros enter and leave) until flow returns. Only the
    # first bar of each such stretch needs the restart.
    head_pos, head_neg = flows(1, p + 1)
    was_empty = not (np.any(head_pos) or np.any(head_neg))
    carry = 0j if was_empty else complex(float(_seq_sum(head_pos)), float(_seq_sum(head_neg)))
    emit(np.array([carry.real]), np.array([carry.imag]), out[p : p + 1])
    buf = np.empty(2 * _CHUNK, dtype=np.complex128)
    for lo, hi in _spans(p + 1, n):
        pos, neg = flows(lo - p, hi)  # bars lo-p .. hi-1: the leaving and entering bar of each step
        steps = hi - lo
        nothing = pos == 0.0
        nothing &= neg == 0.0
        if nothing[1:].any():
            empty = _rolling(nothing[1:], p, np.logical_and)  # window ending at each step's bar is empty
            restarts = np.flatnonzero(empty[1:] & ~empty[:-1]) + 1
            if empty[0] and not was_empty:
                restarts = np.concatenate(([0], restarts))
            was_empty = bool(empty[-1])
        else:  # every bar carried flow: no window is empty
            restarts = np.empty(0, dtype=np.intp)
            was_empty = False
        # Step j subtracts the leaving bar, then adds the entering one (TA-Lib's order): in the
        # float view of z that is -pos, -neg, +pos, +neg for each step.
        z = buf[: 2 * steps]
        zf = z.view(np.float64)
        np.negative(pos[:steps], out=zf[0::4])
        np.negative(neg[:steps], out=zf[1::4])
        zf[2::4] = pos[p:]
        zf[3::4] = neg[p:]
        seg_lo = 0
        for stop in [*restarts.tolist(), steps]:
            seg = z[2 * seg_lo : 2 * stop + (2 if stop < steps else 0)]
            if len(seg):
                seg[0] += carry
                np.cumsum(seg, out=seg)
                carry = complex(seg[-1])
            if stop < steps:
                z[2 * stop + 1] = 0.0
                carry = 0j
            seg_lo = stop + 1
        emit(zf[2::4], zf[3::4], out[lo:hi])
    return out
