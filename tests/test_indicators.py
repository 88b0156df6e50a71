"""Golden tests of engines.indicators against TA-Lib, edge cases, and properties.

The contract a strategy relies on: same length as the input, NaN exactly where TA-Lib has no value,
and TA-Lib's value to 1e-9 relative everywhere else. TA-Lib is the oracle here (a dev dependency);
the indicators never import it.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engines.indicators as ind

talib = pytest.importorskip("talib")

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = sorted((ROOT / "data").glob("binance_*_USDT-5m.csv.gz")) + sorted(
    (ROOT.parent / "shared" / "data").glob("binance_*_USDT-1h.csv.gz")
)
RTOL = 1e-9

Candles = dict[str, np.ndarray]


def _load(path: Path) -> Candles:
    frame = pd.read_csv(path)
    return {col: frame[col].to_numpy(dtype=np.float64) for col in ("open", "high", "low", "close", "volume")}


@pytest.fixture(scope="module", params=DATA_FILES, ids=lambda p: p.name.removesuffix(".csv.gz"))
def candles(request: pytest.FixtureRequest) -> Candles:
    return _load(request.param)


def assert_matches(ours: np.ndarray, ref: np.ndarray, *, atol: float = 0.0) -> None:
    """Same length, NaN exactly where TA-Lib has none, and |ours - ref| <= 1e-9*|ref| + atol."""
    assert ours.dtype == np.float64
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg="warm-up NaNs differ")
    valid = ~np.isnan(ref)
    np.testing.assert_allclose(ours[valid], ref[valid], rtol=RTOL, atol=atol)


def macd_atol(close: np.ndarray) -> float:
    """MACD line, signal and histogram are differences of two EMAs of the price.

    Near a crossing they are tiny differences of price-sized numbers, where TA-Lib's own rounding
    (a few ulps of the price) is the leading digit and no relative tolerance means anything.
    There the comparison allows 1e-13 of the price level: ~500 ulps, far below anything a
    strategy could act on, and still 1e-9 relative for any MACD value above 1e-4 of the price.
    """
    return 1e-13 * float(np.max(np.abs(close))) if len(close) else 0.0


def test_data_files_are_present() -> None:
    assert len(DATA_FILES) >= 3, DATA_FILES


# --------------------------------------------------------------------------- golden: real candles


@pytest.mark.parametrize("period", [1, 2, 5, 14, 20, 50, 200])
def test_ema_sma_match_talib(candles: Candles, period: int) -> None:
    close = candles["close"]
    assert_matches(ind.ema(close, period), talib.EMA(close, period))
    assert_matches(ind.sma(close, period), talib.SMA(close, period))


@pytest.mark.parametrize("period", [2, 5, 14, 30])
def test_rsi_matches_talib(candles: Candles, period: int) -> None:
    assert_matches(ind.rsi(candles["close"], period), talib.RSI(candles["close"], period))


@pytest.mark.parametrize(("fast", "slow", "signal"), [(12, 26, 9), (5, 35, 5), (3, 10, 16), (26, 12, 9)])
def test_macd_matches_talib(candles: Candles, fast: int, slow: int, signal: int) -> None:
    close = candles["close"]
    ours = ind.macd(close, fast, slow, signal)
    ref = talib.MACD(close, fast, slow, signal)
    for mine, theirs in zip(ours, ref, strict=True):
        assert_matches(mine, theirs, atol=macd_atol(close))


@pytest.mark.parametrize("period", [1, 5, 14, 30])
def test_atr_matches_talib(candles: Candles, period: int) -> None:
    h, lo, c = candles["high"], candles["low"], candles["close"]
    assert_matches(ind.atr(h, lo, c, period), talib.ATR(h, lo, c, period))


@pytest.mark.parametrize(("period", "up", "dn"), [(5, 2.0, 2.0), (20, 2.0, 2.0), (20, 1.5, 2.5), (50, 1.0, 1.0)])
def test_bollinger_matches_talib(candles: Candles, period: int, up: float, dn: float) -> None:
    close = candles["close"]
    ours = ind.bollinger(close, period, up, dn)
    ref = talib.BBANDS(close, period, up, dn, 0)
    for mine, theirs in zip(ours, ref, strict=True):
        assert_matches(mine, theirs)


@pytest.mark.parametrize(("fk", "sk", "sd"), [(5, 3, 3), (14, 3, 3), (9, 1, 1), (21, 7, 9)])
def test_stochastic_matches_talib(candles: Candles, fk: int, sk: int, sd: int) -> None:
    h, lo, c = candles["high"], candles["low"], candles["close"]
    ours = ind.stochastic(h, lo, c, fk, sk, sd)
    ref = talib.STOCH(h, lo, c, fk, sk, 0, sd, 0)
    for mine, theirs in zip(ours, ref, strict=True):
        assert_matches(mine, theirs)


@pytest.mark.parametrize("period", [5, 14, 20, 50])
def test_cci_matches_talib(candles: Candles, period: int) -> None:
    h, lo, c = candles["high"], candles["low"], candles["close"]
    assert_matches(ind.cci(h, lo, c, period), talib.CCI(h, lo, c, period))


@pytest.mark.parametrize("period", [5, 14, 30])
def test_mfi_matches_talib(candles: Candles, period: int) -> None:
    h, lo, c, v = candles["high"], candles["low"], candles["close"], candles["volume"]
    assert_matches(ind.mfi(h, lo, c, v, period), talib.MFI(h, lo, c, v, period))


# --------------------------------------------------------------------------- every indicator, one table


def _all_pairs(
    h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray
) -> Iterator[tuple[str, tuple[np.ndarray, ...], tuple[np.ndarray, ...], float]]:
    """(name, ours, TA-Lib's, atol) for every indicator at its usual settings."""

    def tup(x: np.ndarray | tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return x if isinstance(x, tuple) else (x,)

    cases: list[tuple[str, Callable[[], object], Callable[[], object], float]] = [
        ("ema", lambda: ind.ema(c, 20), lambda: talib.EMA(c, 20), 0.0),
        ("sma", lambda: ind.sma(c, 20), lambda: talib.SMA(c, 20), 0.0),
        ("rsi", lambda: ind.rsi(c, 14), lambda: talib.RSI(c, 14), 0.0),
        ("macd", lambda: ind.macd(c), lambda: talib.MACD(c), macd_atol(c)),
        ("atr", lambda: ind.atr(h, lo, c, 14), lambda: talib.ATR(h, lo, c, 14), 0.0),
        ("bollinger", lambda: ind.bollinger(c), lambda: talib.BBANDS(c, 20, 2.0, 2.0, 0), 0.0),
        ("stochastic", lambda: ind.stochastic(h, lo, c), lambda: talib.STOCH(h, lo, c, 5, 3, 0, 3, 0), 0.0),
        ("cci", lambda: ind.cci(h, lo, c, 14), lambda: talib.CCI(h, lo, c, 14), 0.0),
        ("mfi", lambda: ind.mfi(h, lo, c, v, 14), lambda: talib.MFI(h, lo, c, v, 14), 0.0),
    ]
    for name, ours, ref, atol in cases:
        yield name, tup(ours()), tup(ref()), atol  # type: ignore[arg-type]


def _assert_all_match(h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
    for name, ours, ref, atol in _all_pairs(h, lo, c, v):
        assert len(ours) == len(ref), name
        for mine, theirs in zip(ours, ref, strict=True):
            try:
                assert_matches(mine, theirs, atol=atol)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None


def _random_walk(n: int, seed: int, start: float = 20_000.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    close = start * np.exp(np.cumsum(rng.normal(0.0, 0.001, n)))
    spread = np.abs(rng.normal(0.0, 0.002, n))
    high = np.maximum(close * (1 + spread), np.roll(close, 1))
    low = np.minimum(close * (1 - spread), np.roll(close, 1))
    high[0], low[0] = close[0] * (1 + spread[0]), close[0] * (1 - spread[0])
    volume = rng.lognormal(3.0, 1.0, n)
    return high, low, close, volume


def test_chunk_boundaries_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long inputs are processed in chunks whose carried state (filter state, running totals,
    restarts of MFI's sums) must cross boundaries exactly: force tiny, odd-sized chunks."""
    candles = _load(DATA_FILES[0])
    h, lo, c, v = (candles[k][:6000].copy() for k in ("high", "low", "close", "volume"))
    # flat stretches with and without volume straddle chunk edges
    for start, length in ((1000, 40), (2203, 25), (3100, 60)):
        h[start : start + length] = lo[start : start + length] = c[start : start + length] = c[start]
    v[3100:3160] = 0.0
    v[4000:4030] = 0.0
    monkeypatch.setattr(ind, "_CHUNK", 37)
    _assert_all_match(h, lo, c, v)
    # %D's running total starts several chunks after %K's
    for mine, theirs in zip(ind.stochastic(h, lo, c, 14, 20, 60), talib.STOCH(h, lo, c, 14, 20, 0, 60, 0), strict=True):
        assert_matches(mine, theirs)


def test_long_jumpy_series_matches_talib() -> None:
    """Gaps: a NaN-free series with price jumps of +-30% and spikes, over several chunks."""
    h, lo, c, v = _random_walk(150_000, seed=7)
    rng = np.random.default_rng(8)
    jumps = np.sort(rng.choice(len(c), 300, replace=False))
    factor = np.ones(len(c))
    factor[jumps[0::2]] = 1.3  # each gap up is followed by a gap down: the level stays in a band
    factor[jumps[1::2]] = 1 / 1.3
    scale = np.cumprod(factor)
    _assert_all_match(h * scale, lo * scale, c * scale, v)


# --------------------------------------------------------------------------- edge cases


def _ohlcv(close: np.ndarray, volume: float = 10.0) -> tuple[np.ndarray, ...]:
    return close, close, close, np.full(len(close), volume)


def test_flat_prices_match_talib_and_stay_defined() -> None:
    close = np.full(120, 20_001.37)
    h, lo, c, v = _ohlcv(close)
    _assert_all_match(h, lo, c, v)
    assert np.all(ind.rsi(c, 14)[14:] == 0.0)  # TA-Lib answers 0 for "no gain and no loss"
    assert np.all(ind.cci(h, lo, c, 14)[13:] == 0.0)  # zero mean deviation
    assert np.all(ind.mfi(h, lo, c, v, 14)[14:] == 0.0)  # no money flow at all
    upper, middle, lower = ind.bollinger(c, 20)
    assert np.array_equal(upper[19:], lower[19:])  # band width exactly 0
    assert np.array_equal(upper[19:], middle[19:])
    assert np.all(ind.atr(h, lo, c, 14)[14:] == 0.0)
    slow_k, slow_d = ind.stochastic(h, lo, c)
    assert np.all(slow_k[8:] == 0.0) and np.all(slow_d[8:] == 0.0)


def test_flat_window_inside_moving_prices() -> None:
    close = np.concatenate([np.linspace(100.0, 120.0, 50), np.full(40, 117.5), np.linspace(117.5, 90.0, 50)])
    rng = np.random.default_rng(3)
    close[:50] += rng.normal(0, 0.3, 50)
    h, lo, c, v = _ohlcv(close)
    _assert_all_match(h, lo, c, v)
    upper, _, lower = ind.bollinger(c, 10)
    assert np.all((upper - lower)[59:90] == 0.0)
    assert np.all((upper - lower)[:59][~np.isnan(upper[:59])] > 0.0)


def test_all_gains_and_all_losses() -> None:
    up = 100.0 + np.arange(60, dtype=np.float64) * 0.5
    down = up[::-1].copy()
    assert np.all(ind.rsi(up, 14)[14:] == 100.0)
    assert np.all(ind.rsi(down, 14)[14:] == 0.0)
    h_up, lo_up, c_up, v_up = _ohlcv(up)
    assert np.all(ind.mfi(h_up, lo_up, c_up, v_up, 14)[14:] == 100.0)
    h_dn, lo_dn, c_dn, v_dn = _ohlcv(down)
    assert np.all(ind.mfi(h_dn, lo_dn, c_dn, v_dn, 14)[14:] == 0.0)
    _assert_all_match(h_up, lo_up, c_up, v_up)
    _assert_all_match(h_dn, lo_dn, c_dn, v_dn)


def test_zero_volume_and_tiny_prices_match_talib() -> None:
    """Scale-aware zero tests: a coin quoted at 1e-8 still moves, zero volume carries no flow."""
    h, lo, c, v = _random_walk(3000, seed=11, start=3e-8)
    v[500:700] = 0.0
    _assert_all_match(h, lo, c, v)
    flow = ind.mfi(h, lo, c, v, 14)
    assert np.all(flow[513:700] == 0.0)  # a whole window without volume
    assert np.all((flow[14:500] > 0.0) & (flow[14:500] < 100.0))  # tiny prices still carry flow


@pytest.mark.parametrize("n", [0, 1, 5, 13])
def test_series_shorter_than_the_warmup_is_all_nan(n: int) -> None:
    h, lo, c, v = _random_walk(n, seed=1) if n else (np.empty(0),) * 4
    outputs = [
        ind.ema(c, 14),
        ind.sma(c, 14),
        ind.rsi(c, 14),
        ind.atr(h, lo, c, 14),
        ind.cci(h, lo, c, 14),
        ind.mfi(h, lo, c, v, 14),
        *ind.macd(c),
        *ind.bollinger(c, 14),
        *ind.stochastic(h, lo, c, 14, 3, 3),
    ]
    for out in outputs:
        assert out.shape == (n,)
        assert out.dtype == np.float64
        assert np.all(np.isnan(out))


def test_first_value_appears_exactly_at_the_warmup_boundary() -> None:
    h, lo, c, v = _random_walk(40, seed=2)
    firsts = {
        "ema": (ind.ema(c, 10), 9),
        "sma": (ind.sma(c, 10), 9),
        "rsi": (ind.rsi(c, 10), 10),
        "atr": (ind.atr(h, lo, c, 10), 10),
        "cci": (ind.cci(h, lo, c, 10), 9),
        "mfi": (ind.mfi(h, lo, c, v, 10), 10),
        "macd": (ind.macd(c, 5, 12, 4)[0], 14),
        "bollinger": (ind.bollinger(c, 10)[0], 9),
        "stochastic": (ind.stochastic(h, lo, c, 7, 3, 4)[1], 11),
    }
    for name, (out, first) in firsts.items():
        assert np.isnan(out[first - 1]) and not np.isnan(out[first]), name
        assert not np.any(np.isnan(out[first:])), name
    # exactly as long as the warm-up needs: one value
    assert np.count_nonzero(~np.isnan(ind.rsi(c[:11], 10))) == 1


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "14", None])
def test_bad_period_is_a_programming_error(bad: object) -> None:
    c = np.linspace(1.0, 2.0, 50)
    calls: list[Callable[[], object]] = [
        lambda: ind.ema(c, bad),  # type: ignore[arg-type]
        lambda: ind.sma(c, bad),  # type: ignore[arg-type]
        lambda: ind.rsi(c, bad),  # type: ignore[arg-type]
        lambda: ind.atr(c, c, c, bad),  # type: ignore[arg-type]
        lambda: ind.cci(c, c, c, bad),  # type: ignore[arg-type]
        lambda: ind.mfi(c, c, c, c, bad),  # type: ignore[arg-type]
        lambda: ind.bollinger(c, bad),  # type: ignore[arg-type]
        lambda: ind.macd(c, bad, 26, 9),  # type: ignore[arg-type]
        lambda: ind.macd(c, 12, bad, 9),  # type: ignore[arg-type]
        lambda: ind.macd(c, 12, 26, bad),  # type: ignore[arg-type]
        lambda: ind.stochastic(c, c, c, bad, 3, 3),  # type: ignore[arg-type]
        lambda: ind.stochastic(c, c, c, 5, bad, 3),  # type: ignore[arg-type]
        lambda: ind.stochastic(c, c, c, 5, 3, bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_mismatched_or_multidimensional_inputs_are_programming_errors() -> None:
    c = np.linspace(1.0, 2.0, 50)
    with pytest.raises(ValueError):
        ind.atr(c, c[:-1], c, 14)
    with pytest.raises(ValueError):
        ind.mfi(c, c, c, c[:10], 14)
    with pytest.raises(ValueError):
        ind.ema(c.reshape(5, 10), 3)


def test_inputs_are_not_modified_and_lists_are_accepted() -> None:
    h, lo, c, v = _random_walk(500, seed=4)
    copies = [a.copy() for a in (h, lo, c, v)]
    _assert_all_match(h, lo, c, v)
    for before, after in zip(copies, (h, lo, c, v), strict=True):
        assert np.array_equal(before, after)
    assert_matches(ind.ema(c.tolist(), 10), talib.EMA(c, 10))


def test_indicators_module_does_not_import_talib() -> None:
    tree = ast.parse(Path(ind.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "talib" not in imported
    assert imported <= {"__future__", "operator", "collections", "typing", "numpy"}  # no scipy either


# --------------------------------------------------------------------------- properties

PRICES = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
PERIODS = st.integers(min_value=1, max_value=40)


def _reference_ema(values: list[float], period: int) -> list[float]:
    """TA-Lib's EMA written out in plain Python."""
    out = [math.nan] * len(values)
    if len(values) < period:
        return out
    total = 0.0
    for value in values[:period]:
        total += value
    prev = total / period
    out[period - 1] = prev
    k = 2.0 / (period + 1)
    for i in range(period, len(values)):
        prev = (values[i] - prev) * k + prev
        out[i] = prev
    return out


@settings(max_examples=150, deadline=None)
@given(value=PRICES, period=PERIODS, n=st.integers(min_value=0, max_value=120))
def test_ema_of_a_constant_is_that_constant(value: float, period: int, n: int) -> None:
    out = ind.ema(np.full(n, value), period)
    assert np.all(np.isnan(out[: period - 1]))
    # the seed is TA-Lib's sum/period, itself exact only to an ulp or two
    np.testing.assert_allclose(out[period - 1 :], value, rtol=1e-14, atol=0.0)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(PRICES, min_size=0, max_size=150), period=PERIODS)
def test_ema_matches_the_reference_recursion(values: list[float], period: int) -> None:
    ours = ind.ema(np.array(values, dtype=np.float64), period)
    ref = np.array(_reference_ema(values, period), dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    # The two forms round differently by an ulp of the running level; after a fall of several
    # orders of magnitude that ulp is no longer small next to the value, hence the absolute term.
    level = max(values, default=0.0)
    np.testing.assert_allclose(ours[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12, atol=1e-13 * level)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(PRICES, min_size=2, max_size=150), period=PERIODS)
def test_rsi_stays_within_0_and_100(values: list[float], period: int) -> None:
    out = ind.rsi(np.array(values, dtype=np.float64), period)
    valid = out[~np.isnan(out)]
    assert np.all((valid >= 0.0) & (valid <= 100.0))


@settings(max_examples=150, deadline=None)
@given(
    start=PRICES,
    steps=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=120),
    period=PERIODS,
)
def test_rsi_of_a_strictly_rising_series_is_100(start: float, steps: list[float], period: int) -> None:
    close = start + np.cumsum(np.array([0.0, *steps]))
    assert np.all(np.diff(close) > 0)
    out = ind.rsi(close, period)
    assert np.all(np.isnan(out[:period]))
    assert np.all(out[period:] == 100.0)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(PRICES, min_size=1, max_size=150),
    period=PERIODS,
    up=st.floats(min_value=0.0, max_value=4.0),
    dn=st.floats(min_value=0.0, max_value=4.0),
)
def test_bollinger_bands_are_ordered(values: list[float], period: int, up: float, dn: float) -> None:
    upper, middle, lower = ind.bollinger(np.array(values, dtype=np.float64), period, up, dn)
    valid = ~np.isnan(middle)
    assert np.array_equal(valid, ~np.isnan(upper)) and np.array_equal(valid, ~np.isnan(lower))
    assert np.all(upper[valid] >= middle[valid])
    assert np.all(middle[valid] >= lower[valid])
