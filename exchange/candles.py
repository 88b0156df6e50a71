"""Candle history as numpy arrays: loading the bundled CSV files, rejecting bad rows, resampling.

The replay feed and the backtest read the same files through this module, so both see the same
validated history. Bad rows are dropped and counted rather than repaired: a repaired price would be an
invented one. Gaps (exchange maintenance) are kept as they are, never filled with made-up bars.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import math
import re
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog

from core.errors import DependencyError
from core.types import CandleSeries, FloatArray
from core.values import value_type

log = structlog.get_logger("feed")

CSV_COLUMNS = ("timestamp_ms", "open", "high", "low", "close", "volume")

IntArray = npt.NDArray[np.int64]

_TIMEFRAME_RE = re.compile(r"^(\d+)([mhd])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86_400}

# Open times a candle file may hold, in epoch seconds: 2000-01-01 to 2100-01-01 UTC. Read as milliseconds,
# epoch seconds fall in January 1970 and epoch microseconds tens of thousands of years ahead.
_EARLIEST_TS = 946_684_800.0
_LATEST_TS = 4_102_444_800.0
_STEP_BLOCK = 8192


def timeframe_seconds(timeframe: str) -> int:
    """`"5m"` -> 300. Weeks are not supported: Binance aligns them to Monday, the epoch to Thursday."""
    match = _TIMEFRAME_RE.match(timeframe)
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"unsupported timeframe {timeframe!r} (use e.g. 5m, 1h, 4h, 1d)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Feeds hand out slices of these arrays; read-only keeps one consumer from corrupting another's view."""
    a.flags.writeable = False
    return a


@value_type
class CandleArrays:
    """One symbol's candles of one timeframe, oldest first, strictly increasing open times.

    `ts` is the open time in epoch seconds, as `CandleSeries` carries it. Only it is stored: `ts_ms`,
    the same in UTC milliseconds as exact integers for bucketing, is worked out from it when asked for
    (one array in seven of the replay's history otherwise; issue: daemon memory).
    """

    ts: FloatArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def ts_ms(self) -> IntArray:
        """Open times in UTC milliseconds: a new array on each call, so not for hot paths. Exact: `ts`
        is a whole number of milliseconds / 1000 rounded once, well within float64's 53 bits."""
        return np.rint(self.ts * 1000.0).astype(np.int64)

    @classmethod
    def build(
        cls,
        ts_ms: npt.ArrayLike,
        open_: npt.ArrayLike,
        high: npt.ArrayLike,
        low: npt.ArrayLike,
        close: npt.ArrayLike,
        volume: npt.ArrayLike,
    ) -> CandleArrays:
        return cls(
            ts=_readonly(np.divide(np.asarray(ts_ms, dtype=np.int64), 1000.0)),
            open=_readonly(np.ascontiguousarray(open_, dtype=np.float64)),
            high=_readonly(np.ascontiguousarray(high, dtype=np.float64)),
            low=_readonly(np.ascontiguousarray(low, dtype=np.float64)),
            close=_readonly(np.ascontiguousarray(close, dtype=np.float64)),
            volume=_readonly(np.ascontiguousarray(volume, dtype=np.float64)),
        )

    def series(self, symbol: str, timeframe: str, start: int, stop: int, observed_at: float) -> CandleSeries:
        """Rows [start, stop) as a CandleSeries of views (no copy: this runs on every engine tick)."""
        return CandleSeries(
            symbol=symbol,
            timeframe=timeframe,
            ts=self.ts[start:stop],
            open=self.open[start:stop],
            high=self.high[start:stop],
            low=self.low[start:stop],
            close=self.close[start:stop],
            volume=self.volume[start:stop],
            observed_at=observed_at,
        )


def _adopt(
    ts_ms: npt.NDArray[np.float64],
    open_: FloatArray,
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    volume: FloatArray,
) -> CandleArrays:
    """CandleArrays made of the columns themselves (the caller gives them up): no copy of the prices,
    and the float timestamps, divided in place, become the epoch seconds that build() would allocate
    anew. Same values as build(): the float column holds whole milliseconds, exactly as int64 would."""
    if ts_ms.dtype == np.float64 and ts_ms.flags.c_contiguous and ts_ms.flags.writeable:
        ts = np.divide(ts_ms, 1000.0, out=ts_ms)
    else:
        ts = np.divide(ts_ms, 1000.0)
    return CandleArrays(
        ts=_readonly(ts),
        open=_readonly(np.ascontiguousarray(open_, dtype=np.float64)),
        high=_readonly(np.ascontiguousarray(high, dtype=np.float64)),
        low=_readonly(np.ascontiguousarray(low, dtype=np.float64)),
        close=_readonly(np.ascontiguousarray(close, dtype=np.float64)),
        volume=_readonly(np.ascontiguousarray(volume, dtype=np.float64)),
    )


@value_type
class Rejections:
    """How many rows were dropped, by reason (a row counts once, under the first reason it hit)."""

    bad_value: int = 0  # NaN, inf, non-numeric, price <= 0 or volume < 0
    high_below_low: int = 0
    outside_range: int = 0  # open or close outside [low, high]
    duplicate: int = 0
    out_of_order: int = 0

    @property
    def total(self) -> int:
        return self.bad_value + self.high_below_low + self.outside_range + self.duplicate + self.out_of_order

    def as_dict(self) -> dict[str, int]:
        return {
            "bad_value": self.bad_value,
            "high_below_low": self.high_below_low,
            "outside_range": self.outside_range,
            "duplicate": self.duplicate,
            "out_of_order": self.out_of_order,
        }


def clean_rows(
    ts_ms: npt.NDArray[np.float64],
    open_: FloatArray,
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    volume: FloatArray,
    *,
    copy: bool = True,
) -> tuple[CandleArrays, Rejections]:
    """Keep the rows a strategy can trust, in file order; shared by file loading and the live feed.

    A row whose timestamp is not later than every earlier kept row is dropped (duplicate if equal,
    out of order if earlier) — the first occurrence wins, so a re-sent row cannot rewrite history.

    With `copy=False` the caller hands its contiguous float64 columns over: when every row is kept
    they become the result (made read-only) instead of being copied, which saves the file loader a
    second copy of each file at its peak.
    """
    finite_ts = np.isfinite(ts_ms) & (ts_ms > 0) & (np.floor(ts_ms) == ts_ms)
    bad = ~finite_ts | ~np.isfinite(volume) | (volume < 0)
    # Column by column, not on a stacked copy of the four price columns: the replay loads 65k-row
    # files, and every temporary here adds to the daemon's peak memory.
    for prices in (open_, high, low, close):
        bad |= ~np.isfinite(prices) | (prices <= 0)
    hl = ~bad & (high < low)
    outside = ~bad & ~hl & (
        (open_ > high) | (open_ < low) | (close > high) | (close < low)
    )
    valid = ~(bad | hl | outside)
    # Indices only when rows go: a clean file (the usual case) needs no index array at all.
    idx = None if valid.all() else np.flatnonzero(valid)
    kts = ts_ms if idx is None else ts_ms[idx]
    dup = np.zeros(kts.shape, dtype=bool)
    ooo = np.zeros(kts.shape, dtype=bool)
    if not (kts[1:] > kts[:-1]).all():
        # A row must beat the running maximum of the timestamps before it to be in order.
        run_max = np.maximum.accumulate(kts)
        np.equal(kts[1:], run_max[:-1], out=dup[1:])
        np.less(kts[1:], run_max[:-1], out=ooo[1:])
        del run_max
    del kts
    rejections = Rejections(
        bad_value=int(bad.sum()),
        high_below_low=int(hl.sum()),
        outside_range=int(outside.sum()),
        duplicate=int(dup.sum()),
        out_of_order=int(ooo.sum()),
    )
    if rejections.duplicate or rejections.out_of_order:
        in_order = ~(dup | ooo)
        idx = np.flatnonzero(in_order) if idx is None else idx[in_order]
    if idx is not None:
        arrays = CandleArrays.build(
            ts_ms[idx].astype(np.int64), open_[idx], high[idx], low[idx], close[idx], volume[idx]
        )
    elif copy:
        # Every row kept: one copy per column (not an indexed one and then another), and never the
        # caller's own arrays, which build() would make read-only.
        arrays = CandleArrays.build(
            ts_ms.astype(np.int64), *(np.array(c, dtype=np.float64) for c in (open_, high, low, close, volume))
        )
    else:
        arrays = _adopt(ts_ms, open_, high, low, close, volume)
    return arrays, rejections


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


_BLOCK_CHARS = 96 * 1024  # ~1,800 rows of text: their parsed block stays under malloc's mmap threshold


def _open_text(path: Path, gz: bool) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if gz else path.open(encoding="utf-8")


def _count_newlines(path: Path, gz: bool) -> int:
    with gzip.open(path, "rb") if gz else path.open("rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 16), b""))


def _read_numeric(path: Path) -> list[FloatArray] | None:
    """The six columns of a plain, fully numeric candle file with the expected header, as contiguous
    float64 arrays; None for any other file, which pandas then reads, forgivingly.

    Why not pandas for every file: while it parses, its C tokenizer holds every field of the file,
    several times the size of the result, and the replay's load sets the daemon's peak memory (issue:
    daemon memory). Here the lines are counted first (decompressing twice costs ~20 ms), each column is
    allocated once at its final size, and numpy's reader fills them a block of text at a time, so
    nothing the size of the file is ever held twice or left behind as freed heap. numpy's reader is
    strict (a stray word, an empty cell or a short row is a ValueError, and the file goes to pandas),
    and it rounds each number correctly, like float(); on the bundled files both readers give the same
    floats to the bit (tests/test_replay_memory.py).
    """
    gz = _is_gzip(path)
    capacity = _count_newlines(path, gz) + 1  # at least the data rows: a last line may lack its newline
    columns = [np.empty(capacity, dtype=np.float64) for _ in CSV_COLUMNS]
    rows = 0

    def parse(text: str) -> bool:
        nonlocal rows
        if not text.strip():
            return True  # blank lines only: nothing to add (and loadtxt would warn)
        try:
            block = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, comments=None, ndmin=2)
        except ValueError:
            return False
        end = rows + block.shape[0]
        if block.shape[1] != len(CSV_COLUMNS) or end > capacity:
            return False  # more rows than newlines: lines ending in a bare \r, not for this path
        for column, values in zip(columns, block.T, strict=True):
            column[rows:end] = values
        rows = end
        return True

    with _open_text(path, gz) as fh:
        if tuple(field.strip() for field in fh.readline().split(",")) != CSV_COLUMNS:
            return None
        rest = ""
        while chunk := fh.read(_BLOCK_CHARS):
            text = rest + chunk
            cut = text.rfind("\n") + 1  # whole lines only; the rest goes with the next block
            rest = text[cut:]
            if not parse(text[:cut]):
                return None
        if not parse(rest):
            return None
    if rows == 0:
        return None  # no data row: pandas' path words the error
    # Normally one or two rows short of full (the header, the final newline): views, not copies.
    return [column[:rows] for column in columns]


def _read_frame(path: Path) -> pd.DataFrame:
    compression = "gzip" if _is_gzip(path) else None
    try:
        return pd.read_csv(path, compression=compression, dtype=np.float64)
    except ValueError:
        # A non-numeric cell somewhere: read as text, and let coercion turn it into NaN (then dropped).
        frame = pd.read_csv(path, compression=compression, dtype=str, keep_default_na=False)
        return frame.apply(lambda col: pd.to_numeric(col, errors="coerce")).astype(np.float64)


def _read_columns(path: Path) -> tuple[list[FloatArray], int]:
    """The six columns as float64 and the number of rows read; raises DependencyError for the header."""
    columns = _read_numeric(path)
    if columns is not None:
        return columns, int(columns[0].shape[0])
    frame = _read_frame(path)
    if tuple(str(c).strip() for c in frame.columns) != CSV_COLUMNS:
        raise DependencyError(
            f"candle file {path} has header {','.join(map(str, frame.columns))}; "
            f"expected {','.join(CSV_COLUMNS)}"
        )
    return [frame[c].to_numpy(dtype=np.float64) for c in CSV_COLUMNS], len(frame)


def load_candles(path: Path) -> CandleArrays:
    """Read and validate one candle file (gzip or plain CSV). Blocking: call it through a thread.

    Raises DependencyError naming the path when the file is missing, unreadable, has the wrong header
    or holds no valid row.
    """
    try:
        cols, rows = _read_columns(path)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DependencyError(f"cannot read candle file {path}: {exc}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DependencyError(f"candle file {path} is empty") from exc
    arrays, rejections = clean_rows(*cols, copy=False)
    if rejections.total:
        log.warning(
            "dropped bad candle rows", path=str(path), rows=rows, kept=len(arrays), **rejections.as_dict(),
        )
    if len(arrays) == 0:
        raise DependencyError(f"candle file {path} has no valid rows ({rows} rows read)")
    _check_timestamps(path, arrays.ts)
    return arrays


def _check_timestamps(path: Path, ts: FloatArray) -> None:
    """DependencyError naming the file unless its open times are plausible epoch milliseconds.

    A file in epoch seconds (a common export) otherwise loads as bars a few hundred "milliseconds"
    apart in 1970, and resampling them divides by a zero-second timeframe. `ts` is strictly increasing
    (clean_rows), so its ends bound it; the smallest step is looked for a block at a time, without a
    temporary the size of the file (the replay's load sets the daemon's peak memory).
    """
    first, last = float(ts[0]), float(ts[-1])
    if first < _EARLIEST_TS or last > _LATEST_TS:
        raise DependencyError(
            f"candle file {path}: timestamps must be epoch milliseconds (UTC), between 2000 and 2100; "
            f"the file holds {round(first * 1000)} to {round(last * 1000)}"
        )
    step = min(
        (float(np.diff(ts[i:i + _STEP_BLOCK + 1]).min()) for i in range(0, len(ts) - 1, _STEP_BLOCK)),
        default=math.inf,
    )
    if step < 0.9995:  # under 1 s, allowing for ts being milliseconds / 1000 in float64
        raise DependencyError(
            f"candle file {path}: bars only {round(step * 1000)} ms apart; timestamps must be epoch "
            "milliseconds (UTC) of bars at least 1 s apart"
        )


async def load_candles_async(path: Path) -> CandleArrays:
    """Load off the event loop: a 65k-row gzip file takes long enough to stall heartbeats."""
    return await asyncio.to_thread(load_candles, path)


def find_gaps(ts_ms: IntArray, interval_ms: int) -> list[tuple[int, int]]:
    """(index of the bar before the gap, number of missing bars) for every gap in the series."""
    steps = np.diff(ts_ms)
    where = np.flatnonzero(steps > interval_ms)
    return [(int(i), int(steps[i] // interval_ms) - 1) for i in where]


@value_type
class Resampled:
    """A coarser timeframe built from base bars, plus when each bucket becomes known to be closed.

    `close_after[i]` is the number of base bars that must be visible before bucket i is closed: the
    bucket's final base bar when it is present, else the first base bar after the bucket (a
    maintenance gap at the end of an hour closes that hour only when data resumes, as it did live).
    """

    arrays: CandleArrays
    close_after: IntArray


def resample(base: CandleArrays, base_seconds: int, target_seconds: int) -> Resampled:
    """Aggregate into UTC-aligned buckets (epoch-aligned, so 4h buckets start 00:00, 04:00, ... UTC).

    Only complete buckets are kept: the first is dropped when the data starts after its opening (its
    open would be wrong), the last when its final base bar is missing (at the end of the data that bar
    has simply not happened yet). Buckets with bars missing inside a maintenance gap are kept as they
    are, as Binance's own 1h candles keep them.
    """
    if base_seconds <= 0 or target_seconds % base_seconds:
        raise ValueError(f"{target_seconds}s is not a multiple of the base timeframe {base_seconds}s")
    n = len(base)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return Resampled(base, empty)
    target_ms = target_seconds * 1000
    base_ms = base_seconds * 1000
    ts_ms = base.ts_ms
    bucket = ts_ms // target_ms
    starts = np.concatenate(([0], np.flatnonzero(np.diff(bucket)) + 1))
    ends = np.concatenate((starts[1:], [n])) - 1  # index of each bucket's last base bar
    bucket_end_ms = (bucket[starts] + 1) * target_ms
    final_present = ts_ms[ends] + base_ms >= bucket_end_ms
    close_after = np.where(final_present, ends + 1, ends + 2).astype(np.int64)
    keep = np.ones(starts.shape[0], dtype=bool)
    keep[0] = bool(ts_ms[0] == bucket[0] * target_ms)
    keep[-1] = keep[-1] and bool(final_present[-1])
    arrays = CandleArrays.build(
        (bucket[starts] * target_ms)[keep],
        base.open[starts][keep],
        np.maximum.reduceat(base.high, starts)[keep],
        np.minimum.reduceat(base.low, starts)[keep],
        base.close[ends][keep],
        np.add.reduceat(base.volume, starts)[keep],
    )
    return Resampled(arrays, _readonly(close_after[keep]))


def to_decimal_text(value: float) -> str:
    """Shortest text that round-trips the float: 29000.01 gives Decimal('29000.01'), not 29000.01000...2."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite price: {value}")
    return repr(float(value))

