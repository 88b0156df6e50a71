"""Benchmark: engines.indicators against TA-Lib on the same synthetic bars, in the same run.

Backtests run every indicator over long histories, so the target is the total for all nine
indicators on 1,000,000 bars within 1.5x of TA-Lib's. Each round times ours and TA-Lib's version of
every indicator back to back (so machine noise hits both alike), then each side running all nine in
a row; the table shows medians over the rounds.

    .venv/bin/python bench/indicators_bench.py [--bars 1000000] [--rounds 9] [--seed 42]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import talib  # dev dependency: the reference only, never used by the daemon

from engines import indicators as ind

TARGET = 1.5
SMA = talib.MA_Type.SMA  # type: ignore[attr-defined]  # (missing from the stubs)
Pair = tuple[str, Callable[[], object], Callable[[], object]]


def synthetic_bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded geometric random walk with BTC-like 5m volatility, highs/lows and volumes."""
    rng = np.random.default_rng(seed)
    close = 20_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, n)))
    prev = np.concatenate(([close[0]], close[:-1]))
    wick = np.abs(rng.normal(0.0, 0.001, (2, n)))
    high = np.maximum(close, prev) * (1.0 + wick[0])
    low = np.minimum(close, prev) * (1.0 - wick[1])
    volume = rng.lognormal(3.0, 1.0, n)
    return high, low, close, volume


def pairs(h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray) -> list[Pair]:
    return [
        ("ema(20)", lambda: ind.ema(c, 20), lambda: talib.EMA(c, 20)),
        ("sma(20)", lambda: ind.sma(c, 20), lambda: talib.SMA(c, 20)),
        ("rsi(14)", lambda: ind.rsi(c, 14), lambda: talib.RSI(c, 14)),
        ("macd(12,26,9)", lambda: ind.macd(c), lambda: talib.MACD(c, 12, 26, 9)),
        ("atr(14)", lambda: ind.atr(h, lo, c, 14), lambda: talib.ATR(h, lo, c, 14)),
        ("bollinger(20,2)", lambda: ind.bollinger(c, 20), lambda: talib.BBANDS(c, 20, 2.0, 2.0, SMA)),
        (
            "stochastic(5,3,3)",
            lambda: ind.stochastic(h, lo, c),
            lambda: talib.STOCH(h, lo, c, 5, 3, SMA, 3, SMA),
        ),
        ("cci(14)", lambda: ind.cci(h, lo, c, 14), lambda: talib.CCI(h, lo, c, 14)),
        ("mfi(14)", lambda: ind.mfi(h, lo, c, v, 14), lambda: talib.MFI(h, lo, c, v, 14)),
    ]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_all(fns: list[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for fn in fns:
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    h, lo, c, v = synthetic_bars(args.bars, args.seed)
    table = pairs(h, lo, c, v)
    for _, ours, ref in table:  # warm caches, allocator and lazy imports
        ours()
        ref()

    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in table}
    together_ours: list[float] = []
    together_ref: list[float] = []
    for _ in range(args.rounds):
        for name, ours, ref in table:
            samples[name][0].append(timed(ours))
            samples[name][1].append(timed(ref))
        together_ours.append(run_all([ours for _, ours, _ in table]))
        together_ref.append(run_all([ref for _, _, ref in table]))

    version = talib.__ta_version__.decode()  # type: ignore[attr-defined]
    print(f"{args.bars:,} bars, median of {args.rounds} rounds (ms); numpy {np.__version__}, TA-Lib {version}")
    print(f"{'indicator':<20}{'ours':>10}{'TA-Lib':>10}{'ratio':>8}")
    sum_ours = sum_ref = 0.0
    for name, (ours_s, ref_s) in samples.items():
        ours_ms, ref_ms = statistics.median(ours_s) * 1e3, statistics.median(ref_s) * 1e3
        sum_ours += ours_ms
        sum_ref += ref_ms
        print(f"{name:<20}{ours_ms:>10.2f}{ref_ms:>10.2f}{ours_ms / ref_ms:>8.2f}")
    print(f"{'sum of medians':<20}{sum_ours:>10.2f}{sum_ref:>10.2f}{sum_ours / sum_ref:>8.2f}")
    all_ours, all_ref = statistics.median(together_ours) * 1e3, statistics.median(together_ref) * 1e3
    ratio = all_ours / all_ref
    print(f"{'all nine together':<20}{all_ours:>10.2f}{all_ref:>10.2f}{ratio:>8.2f}")
    verdict = "within" if ratio <= TARGET else "OVER"
    print(f"target: all together within {TARGET}x of TA-Lib -> {ratio:.2f}x, {verdict} target")


if __name__ == "__main__":
    main()
