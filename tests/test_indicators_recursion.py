"""The blocked recursion behind EMA, RSI, ATR and MACD against the plain bar-by-bar recursion.

The indicators evaluate y[i] = alpha*x[i] + beta*y[i-1] as matrix products over blocks of bars,
with the values before the blocks carried by a recursion of their own (itself blocked). These
tests pin that machinery on its own: every length (short series, partial last blocks, several
levels of carries), summed recursions, in-place use, non-finite inputs, and the size of each BLAS
call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import engines.indicators as ind


def _reference(x: np.ndarray, recursions: list[tuple[float, float, float]]) -> np.ndarray:
    """The recursions bar by bar, summed, with Python floats."""
    total = np.zeros(len(x))
    for alpha, beta, seed in recursions:
        y = seed
        for i, xi in enumerate(x.tolist()):
            y = alpha * xi + beta * y
            total[i] += y
    return total


def _prices(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 20_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short series take the blocked path and chunks are tiny: every level and boundary is hit."""
    monkeypatch.setattr(ind, "_SEQ_MAX", 20)
    monkeypatch.setattr(ind, "_CHUNK", 48)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("n", [0, 1, 15, 20, 21, 32, 33, 47, 300, 1000, 5003])
@pytest.mark.parametrize(("alpha", "beta"), [(2 / 21, 19 / 21), (1 / 14, 13 / 14), (1.0, 0.0), (0.5, 0.5)])
def test_blocked_recursion_matches_bar_by_bar(n: int, alpha: float, beta: float) -> None:
    x = _prices(n, seed=n)
    seed = 19_000.0
    dst = np.full(n, -1.0)
    ind._recursion_into(dst, x, [(alpha, beta, seed)])
    # Positive terms only: every output is accurate to a few ulps of itself.
    np.testing.assert_allclose(dst, _reference(x, [(alpha, beta, seed)]), rtol=1e-13, atol=0.0)


def test_long_series_uses_several_levels_and_stays_accurate() -> None:
    """At the real sizes (no monkeypatching): 300k bars give three levels of carries."""
    x = _prices(300_007, seed=1)
    dst = np.empty(len(x))
    ind._recursion_into(dst, x, [(2 / 27, 25 / 27, 20_000.0)])
    np.testing.assert_allclose(dst, _reference(x, [(2 / 27, 25 / 27, 20_000.0)]), rtol=1e-13, atol=0.0)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("n", [10, 37, 500, 4099])
def test_summed_recursions_give_the_difference_of_two_emas(n: int) -> None:
    """MACD's line: the fast EMA plus the negated slow one, evaluated together."""
    x = _prices(n, seed=3)
    fast, slow = 2 / 13, 2 / 27
    recursions = [(fast, 1 - fast, 20_100.0), (-slow, 1 - slow, -20_000.0)]
    dst = np.empty(n)
    ind._recursion_into(dst, x, recursions)
    # A difference of price-sized values: accurate to a few ulps of the price, not of the line.
    np.testing.assert_allclose(dst, _reference(x, recursions), rtol=0.0, atol=1e-14 * float(np.max(x)))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("n", [7, 100, 777])
def test_in_place_use_gives_the_same_bits(n: int) -> None:
    """RSI and ATR lay their inputs out in the output array and smooth them there."""
    x = _prices(n, seed=5)
    recursions = [(1 / 14, 13 / 14, 21_000.0)]
    separate = np.empty(n)
    ind._recursion_into(separate, x, recursions)
    in_place = x.copy()
    ind._recursion_into(in_place, in_place, recursions)
    assert np.array_equal(in_place, separate)


@pytest.mark.usefixtures("small_blocks")
def test_chunks_without_destination_cover_the_series_in_order() -> None:
    x = _prices(1001, seed=6)
    recursions = [(0.2, 0.8, 20_000.0)]
    expected = np.empty(len(x))
    ind._recursion_into(expected, x, recursions)
    pieces: list[np.ndarray] = []
    position = 0
    for lo, hi, y in ind._recursion_chunks(x, recursions):
        assert lo == position and hi > lo and len(y) == hi - lo
        pieces.append(y.copy())  # y is scratch reused by the next chunk
        position = hi
    assert position == len(x)
    assert np.array_equal(np.concatenate(pieces), expected)


@pytest.mark.parametrize("n", [100, 5000])  # the bar-by-bar path and the blocked one
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 1, 37, 99])
def test_from_the_first_non_finite_input_on_the_output_is_nan(n: int, bad: float, where: int) -> None:
    x = _prices(n, seed=7)
    x[where] = bad
    x[where + 1 :: 50] = np.nan  # later gaps change nothing
    recursions = [(2 / 21, 19 / 21, 20_000.0)]
    dst = np.empty(n)
    ind._recursion_into(dst, x, recursions)
    assert np.all(np.isnan(dst[where:]))
    np.testing.assert_allclose(dst[:where], _reference(x[:where], recursions), rtol=1e-13, atol=0.0)


def test_every_blas_call_stays_below_openblas_threading_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A threaded OpenBLAS call on a busy machine waits for a second core: keep each product small
    enough (m*n*k <= 4*65536, matrix-vector <= 9216 elements) to run on the calling thread."""
    sizes: list[tuple[int, int, int]] = []
    real_matmul: Callable[..., np.ndarray] = np.matmul

    def recording_matmul(a: np.ndarray, b: np.ndarray, **kwargs: object) -> np.ndarray:
        columns = 1 if b.ndim == 1 else b.shape[1]
        sizes.append((a.shape[0], a.shape[1], columns))
        return real_matmul(a, b, **kwargs)

    monkeypatch.setattr(np, "matmul", recording_matmul)
    close = _prices(200_000, seed=8)
    ind.ema(close, 20)
    ind.macd(close)
    ind.rsi(close, 14)
    ind.atr(close * 1.001, close * 0.999, close, 14)
    assert sizes
    for m, k, columns in sizes:
        if columns <= 2:  # matrix-vector (or nearly): OpenBLAS's gemv threshold
            assert m * k <= 9216, (m, k, columns)
        else:
            assert m * k * columns <= 4 * 65536, (m, k, columns)


def test_long_rsi_stays_within_0_and_100_and_hits_the_bounds_exactly() -> None:
    close = _prices(100_000, seed=9)
    out = ind.rsi(close, 14)[14:]
    assert np.all((out >= 0.0) & (out <= 100.0))
    rising = 100.0 + np.arange(5000, dtype=np.float64) * 0.25
    assert np.all(ind.rsi(rising, 14)[14:] == 100.0)
    assert np.all(ind.rsi(rising[::-1].copy(), 14)[14:] == 0.0)
    assert np.all(ind.rsi(np.full(5000, 123.45), 14)[14:] == 0.0)


def test_long_constant_series_keeps_its_value() -> None:
    out = ind.ema(np.full(50_000, 20_001.37), 20)
    np.testing.assert_allclose(out[19:], 20_001.37, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("n", [200, 60_000])
def test_a_gap_in_a_long_series_makes_the_recursive_indicators_nan_from_there(n: int) -> None:
    close = _prices(n, seed=10)
    high, low = close * 1.002, close * 0.998
    gap = n // 2 + 3
    for arr in (close, high, low):
        arr[gap] = np.nan
    clean = slice(None, gap)
    outputs = {
        "ema": (ind.ema(close, 20), ind.ema(close[clean], 20)),
        "rsi": (ind.rsi(close, 14), ind.rsi(close[clean], 14)),
        "atr": (ind.atr(high, low, close, 14), ind.atr(high[clean], low[clean], close[clean], 14)),
        "macd": (ind.macd(close)[0], ind.macd(close[clean])[0]),
    }
    for name, (full, truncated) in outputs.items():
        assert np.all(np.isnan(full[gap:])), name
        np.testing.assert_allclose(full[:gap], truncated, rtol=1e-12, atol=1e-12, err_msg=name)


def test_a_destination_that_is_not_contiguous_is_refused() -> None:
    """Outputs are written through reshaped views of dst; a strided dst would silently get none."""
    x = _prices(600, seed=11)
    with pytest.raises(ValueError):
        ind._recursion_into(np.empty(1200)[::2], x, [(0.1, 0.9, 20_000.0)])
