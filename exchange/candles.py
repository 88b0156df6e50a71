"""Candle history as numpy arrays: loading the bundled CSV files, rejecting bad rows, resampling.

The replay feed and the backtest read the same files through this module, so both see the same
validated history. Bad rows are dropped and counted rather than repaired: a repaired price would be an
invented one. Gaps (exchange maintenance) are kept as they are, never filled with made-up bars.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog

from core.errors import DependencyError
from core.types import CandleSeries, FloatArray

log = structlog.get_logger("feed")

CSV_COLUMNS = ("timestamp_ms", "open", "high", "low", "close", "volume")

IntArray = npt.NDArray[np.int64]

_TIMEFRAME_RE = re.compile(r"^(\d+)([mhd])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86_400}


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


@dataclass(frozen=True, slots=True)
class CandleArrays:
    """One symbol's candles of one timeframe, oldest first, strictly increasing open times.

    `ts_ms` is the open time in UTC milliseconds (exact integers for bucketing); `ts` the same in
    epoch seconds as `CandleSeries` carries it.
    """

    ts_ms: IntArray
    ts: FloatArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray

    def __len__(self) -> int:
        return int(self.ts_ms.shape[0])

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
        ts_i = np.ascontiguousarray(ts_ms, dtype=np.int64)
        return cls(
            ts_ms=_readonly(ts_i),
            ts=_readonly(ts_i.astype(np.float64) / 1000.0),
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


@dataclass(frozen=True, slots=True)
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
) -> tuple[CandleArrays, Rejections]:
    """Keep the rows a strategy can trust, in file order; shared by file loading and the live feed.

    A row whose timestamp is not later than every earlier kept row is dropped (duplicate if equal,
    out of order if earlier) — the first occurrence wins, so a re-sent row cannot rewrite history.
    """
    prices = np.vstack([open_, high, low, close])
    finite_ts = np.isfinite(ts_ms) & (ts_ms > 0) & (np.floor(ts_ms) == ts_ms)
    bad = (
        ~finite_ts
        | ~np.all(np.isfinite(prices), axis=0)
        | np.any(prices <= 0, axis=0)
        | ~np.isfinite(volume)
        | (volume < 0)
    )
    hl = ~bad & (high < low)
    outside = ~bad & ~hl & (
        (open_ > high) | (open_ < low) | (close > high) | (close < low)
    )
    keep = ~(bad | hl | outside)
    idx = np.flatnonzero(keep)
    kts = ts_ms[idx]
    # Running maximum of the timestamps before each row: a row must beat it to be in order.
    prev_max = np.concatenate(([-np.inf], np.maximum.accumulate(kts)[:-1])) if kts.size else kts
    dup = kts == prev_max
    ooo = kts < prev_max
    idx = idx[~(dup | ooo)]
    rejections = Rejections(
        bad_value=int(bad.sum()),
        high_below_low=int(hl.sum()),
        outside_range=int(outside.sum()),
        duplicate=int(dup.sum()),
        out_of_order=int(ooo.sum()),
    )
    arrays = CandleArrays.build(
        ts_ms[idx].astype(np.int64), open_[idx], high[idx], low[idx], close[idx], volume[idx]
    )
    return arrays, rejections


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _read_frame(path: Path) -> pd.DataFrame:
    compression = "gzip" if _is_gzip(path) else None
    try:
        return pd.read_csv(path, compression=compression, dtype=np.float64)
    except ValueError:
        # A non-numeric cell somewhere: read as text, and let coercion turn it into NaN (then dropped).
        frame = pd.read_csv(path, compression=compression, dtype=str, keep_default_na=False)
        return frame.apply(lambda col: pd.to_numeric(col, errors="coerce")).astype(np.float64)


def load_candles(path: Path) -> CandleArrays:
    """Read and validate one candle file (gzip or plain CSV). Blocking: call it through a thread.

    Raises DependencyError naming the path when the file is missing, unreadable, has the wrong header
    or holds no valid row.
    """
    try:
        frame = _read_frame(path)
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DependencyError(f"cannot read candle file {path}: {exc}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DependencyError(f"candle file {path} is empty") from exc
    if tuple(str(c).strip() for c in frame.columns) != CSV_COLUMNS:
        raise DependencyError(
            f"candle file {path} has header {','.join(map(str, frame.columns))}; "
            f"expected {','.join(CSV_COLUMNS)}"
        )
    cols = [frame[c].to_numpy(dtype=np.float64) for c in CSV_COLUMNS]
    arrays, rejections = clean_rows(*cols)
    if rejections.total:
        log.warning(
            "dropped bad candle rows", path=str(path), rows=len(frame), kept=len(arrays),
            **rejections.as_dict(),
        )
    if len(arrays) == 0:
        raise DependencyError(f"candle file {path} has no valid rows ({len(frame)} rows read)")
    return arrays


async def load_candles_async(path: Path) -> CandleArrays:
    """Load off the event loop: a 65k-row gzip file takes long enough to stall heartbeats."""
    return await asyncio.to_thread(load_candles, path)


def find_gaps(ts_ms: IntArray, interval_ms: int) -> list[tuple[int, int]]:
    """(index of the bar before the gap, number of missing bars) for every gap in the series."""
    steps = np.diff(ts_ms)
    where = np.flatnonzero(steps > interval_ms)
    return [(int(i), int(steps[i] // interval_ms) - 1) for i in where]


@dataclass(frozen=True, slots=True)
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
    if target_seconds % base_seconds:
        raise ValueError(f"{target_seconds}s is not a multiple of the base timeframe {base_seconds}s")
    n = len(base)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return Resampled(base, empty)
    target_ms = target_seconds * 1000
    base_ms = base_seconds * 1000
    bucket = base.ts_ms // target_ms
    starts = np.concatenate(([0], np.flatnonzero(np.diff(bucket)) + 1))
    ends = np.concatenate((starts[1:], [n])) - 1  # index of each bucket's last base bar
    bucket_end_ms = (bucket[starts] + 1) * target_ms
    final_present = base.ts_ms[ends] + base_ms >= bucket_end_ms
    close_after = np.where(final_present, ends + 1, ends + 2).astype(np.int64)
    keep = np.ones(starts.shape[0], dtype=bool)
    keep[0] = bool(base.ts_ms[0] == bucket[0] * target_ms)
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

