"""The replay's memory diet keeps its behaviour: numpy's streaming reader gives the very floats pandas
gives, odd files still go the forgiving pandas way, the loader holds no second copy of a file, coarser
timeframes are built only when asked for, the merged timeline is the exact union, and the ticker's 24h
figures are those of the last day of bars. (Issue: daemon memory within its target;
bench/memory_bench.py prints the daemon's figures.)"""

from __future__ import annotations

import math
import random
import tracemalloc
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.clock import SimClock
from core.errors import DependencyError
from exchange.candles import CSV_COLUMNS, _read_numeric, clean_rows, load_candles
from exchange.feeds import ReplayFeed
from exchange.replay import merge_timelines

BUNDLED = Path(__file__).resolve().parent.parent / "data"
FILES = sorted(BUNDLED.glob("binance_*_USDT-5m.csv.gz"))
HEADER = ",".join(CSV_COLUMNS)
T0 = 1_609_459_200_000  # 2021-01-01 00:00 UTC, in ms
FIVE_MIN = 300_000


def rows(n: int) -> list[str]:
    return [f"{T0 + i * FIVE_MIN},{100 + i - 0.5},{101 + i},{99 + i},{100 + i},{10 + i}" for i in range(n)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_numpy_reader_gives_pandas_floats_to_the_bit(path: Path) -> None:
    columns = _read_numeric(path)
    assert columns is not None  # the bundled files take the fast path
    frame = pd.read_csv(path, compression="gzip", dtype=np.float64)
    for name, column in zip(CSV_COLUMNS, columns, strict=True):
        assert column.flags.c_contiguous
        assert np.array_equal(column, frame[name].to_numpy(), equal_nan=False), name


@pytest.mark.parametrize(
    ("name", "text", "fast"),
    [
        ("lf", HEADER + "\n" + "\n".join(rows(5)) + "\n", True),
        ("crlf", HEADER + "\r\n" + "\r\n".join(rows(5)) + "\r\n", True),
        ("no-final-newline", HEADER + "\n" + "\n".join(rows(5)), True),
        ("blank-lines", HEADER + "\n" + "\n\n".join(rows(5)) + "\n\n", True),
        ("bare-cr", HEADER + "\r" + "\r".join(rows(5)) + "\r", False),
        ("spaced-header", " timestamp_ms , open,high,low,close,volume\n" + "\n".join(rows(5)) + "\n", True),
        ("word-in-a-cell", HEADER + "\n" + "\n".join([*rows(5), f"{T0 + 5 * FIVE_MIN},x,1,1,1,1"]) + "\n", False),
    ],
)
def test_line_endings_and_odd_files_load_the_same(tmp_path: Path, name: str, text: str, fast: bool) -> None:
    path = tmp_path / f"binance_AAA_USDT-5m-{name}.csv"
    path.write_bytes(text.encode())
    assert (_read_numeric(path) is not None) is fast
    got = load_candles(path)
    assert got.ts_ms.tolist() == [T0 + i * FIVE_MIN for i in range(5)]
    assert got.close.tolist() == [100.0 + i for i in range(5)]
    assert got.volume.tolist() == [10.0 + i for i in range(5)]


def test_a_corrupt_gzip_stream_is_a_dependency_error_naming_the_path(tmp_path: Path) -> None:
    damaged = bytearray((BUNDLED / "binance_BTC_USDT-5m.csv.gz").read_bytes())
    for i in range(5000, 5100):  # past the gzip header: zlib finds it while inflating
        damaged[i] ^= 0xFF
    path = tmp_path / "binance_BTC_USDT-5m.csv.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(DependencyError, match="binance_BTC_USDT-5m"):
        load_candles(path)


def test_loading_holds_no_second_copy_of_the_file() -> None:
    path = BUNDLED / "binance_BTC_USDT-5m.csv.gz"
    load_candles(path)  # first-use allocations (imports, caches) out of the way
    tracemalloc.start()
    try:
        arrays = load_candles(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = sum(getattr(arrays, f).nbytes for f in ("ts", "open", "high", "low", "close", "volume"))
    # The result plus a few blocks of text; pandas' reader peaks above twice the result (traced part
    # only) and the old stored int64 timestamps on top.
    assert peak < 1.5 * kept, (peak, kept)


def test_clean_rows_copies_unless_handed_the_columns() -> None:
    table = np.array([[T0 + i * FIVE_MIN, 100.0, 101.0, 99.0, 100.5, 1.0] for i in range(4)])
    columns = [np.ascontiguousarray(table[:, i]) for i in range(6)]
    copied, _ = clean_rows(*columns)
    assert all(c.flags.writeable for c in columns)
    assert not any(np.shares_memory(getattr(copied, f), c) for f in ("open", "close") for c in columns)
    adopted, rejections = clean_rows(*columns, copy=False)
    assert rejections.total == 0
    assert np.shares_memory(adopted.close, columns[4]) and not adopted.close.flags.writeable
    assert adopted.ts.tolist() == copied.ts.tolist() == [(T0 + i * FIVE_MIN) / 1000 for i in range(4)]
    assert adopted.ts_ms.tolist() == [T0 + i * FIVE_MIN for i in range(4)]


async def test_coarser_timeframes_are_built_when_first_asked_for() -> None:
    feed = ReplayFeed({"BTC/USDT": BUNDLED / "binance_BTC_USDT-5m.csv.gz"}, SimClock(), warmup_bars=2000)
    await feed.start()
    try:
        held = feed._data["BTC/USDT"]
        assert held.resampled == {}  # nothing but the 5m bars after load
        hourly = feed.candles("BTC/USDT", "1h", limit=10)
        assert hourly is not None and len(hourly) == 10
        assert list(held.resampled) == [3600]
        again = feed.candles("BTC/USDT", "1h", limit=10)
        assert again is not None and np.shares_memory(again.close, hourly.close)  # cached, not rebuilt
    finally:
        await feed.stop()


def test_merge_timelines_is_the_sorted_union() -> None:
    rng = random.Random(7)
    for _ in range(300):
        series = [
            np.array(sorted(rng.sample(range(60), rng.randint(1, 40))), dtype=np.float64)
            for _ in range(rng.randint(1, 4))
        ]
        assert np.array_equal(merge_timelines(series), np.unique(np.concatenate(series)))
    # A series that holds every timestamp is used as it is, not copied.
    full = np.arange(10, dtype=np.float64)
    assert merge_timelines([full[::2], full, full[1:4]]) is full


async def test_replay_ticker_carries_the_last_days_figures() -> None:
    path = BUNDLED / "binance_ETH_USDT-5m.csv.gz"
    bars = load_candles(path)
    feed = ReplayFeed({"ETH/USDT": path}, SimClock(), warmup_bars=5000)
    await feed.start()
    try:
        ticker = feed.ticker("ETH/USDT")
        assert ticker is not None
        i = 4999
        day = [j for j in range(i + 1) if bars.ts[j] > bars.ts[i] - 86_400]
        assert len(day) == 288  # no gap in this day: 24h of 5m bars, the newest included
        quote = math.fsum(float(bars.close[j]) * float(bars.volume[j]) for j in day)
        assert abs(ticker.quote_volume_24h - Decimal(repr(round(quote, 2)))) <= Decimal("0.01")
        change = (float(bars.close[i]) - float(bars.open[day[0]])) / float(bars.open[day[0]]) * 100
        assert ticker.change_pct_24h == Decimal(repr(round(change, 4)))
        assert ticker.last == Decimal(repr(float(bars.close[i])))
    finally:
        await feed.stop()
