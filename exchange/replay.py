"""Replaying bundled Binance history as if it were arriving live.

The daemon runs offline on this feed (`main.py --replay`) with the very engines, risk code and paper
exchange it uses live, so the feed behaves like a live one: bars arrive one at a time on the clock,
tickers carry the moment a price became current, candles are only ever closed ones, and at the end of
the data it simply stops (the data goes stale, as it would if Binance went quiet).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
import structlog

from core.clock import Clock, utc_datetime
from core.errors import DependencyError
from core.types import CandleSeries, FloatArray, Ticker
from exchange.candles import (
    CandleArrays,
    Resampled,
    find_gaps,
    load_candles,
    resample,
    timeframe_seconds,
    to_decimal_text,
)
from exchange.feed_signal import UpdateSignal, task_failure

log = structlog.get_logger("feed")

_FILE_RE = re.compile(r"^binance_([A-Za-z0-9]+)_([A-Za-z0-9]+)-(\d+[mhd])\.csv(?:\.gz)?$")

DAY_SECONDS = 86_400.0
_MERGE_BLOCK = 8192


def merge_timelines(series: list[FloatArray]) -> FloatArray:
    """The sorted union of strictly increasing timestamp arrays.

    Symbols traded side by side share nearly every bar, so the longest series is taken as it is (no
    copy: it often holds every timestamp, as SOL's does in the bundled data) and each other one only
    adds the few timestamps the union lacks so far, found a block at a time. np.unique over all of
    them concatenated would sort copies of the whole history at the moment the daemon's memory peaks
    (issue: daemon memory).
    """
    longest, *others = sorted(series, key=len, reverse=True)
    timeline = longest
    for other in others:  # none longer than the timeline: an empty timeline means they are empty too
        last = timeline.shape[0] - 1
        extra: list[FloatArray] = []
        for start in range(0, other.shape[0], _MERGE_BLOCK):
            block = other[start:start + _MERGE_BLOCK]
            pos = np.minimum(np.searchsorted(timeline, block), last)
            extra.append(block[timeline[pos] != block])
        missing = np.concatenate(extra) if extra else other[:0]
        if missing.size:
            timeline = np.insert(timeline, np.searchsorted(timeline, missing), missing)
    return timeline


def parse_replay_filename(path: Path) -> tuple[str, str] | None:
    """`binance_BTC_USDT-5m.csv.gz` -> ("BTC/USDT", "5m"); None for any other name."""
    match = _FILE_RE.match(path.name)
    if match is None:
        return None
    return f"{match.group(1).upper()}/{match.group(2).upper()}", match.group(3)


def discover_replay_files(path: Path, timeframe: str | None = None) -> dict[str, Path]:
    """Symbol -> file for a directory of `binance_<BASE>_<QUOTE>-<tf>.csv[.gz]` files, or one such file.

    A directory may hold several timeframes (the shared data has 5m and 1h); without `timeframe` the
    finest is used, because every coarser one can be resampled from it but not the other way round.
    Raises DependencyError when nothing usable is found.
    """
    if path.is_file():
        parsed = parse_replay_filename(path)
        if parsed is None:
            raise DependencyError(
                f"{path}: not a replay file (expected binance_<BASE>_<QUOTE>-<timeframe>.csv[.gz])"
            )
        if timeframe is not None and parsed[1] != timeframe:
            raise DependencyError(f"{path}: holds {parsed[1]} candles, not {timeframe}")
        return {parsed[0]: path}
    if not path.is_dir():
        raise DependencyError(f"replay data not found: {path}")
    by_tf: dict[str, dict[str, Path]] = {}
    for entry in sorted(path.iterdir()):
        parsed = parse_replay_filename(entry)
        if parsed is None or not entry.is_file():
            continue
        symbol, tf = parsed
        previous = by_tf.setdefault(tf, {}).get(symbol)
        # Both a .csv and a .csv.gz of one series: prefer the compressed one, the form the data ships in.
        if previous is None or entry.name.endswith(".gz"):
            by_tf[tf][symbol] = entry
    if not by_tf:
        raise DependencyError(f"no binance_<BASE>_<QUOTE>-<timeframe>.csv[.gz] files in {path}")
    if timeframe is None:
        timeframe = min(by_tf, key=timeframe_seconds)
        if len(by_tf) > 1:
            log.info("replay timeframe chosen", path=str(path), timeframe=timeframe, available=sorted(by_tf))
    if timeframe not in by_tf:
        raise DependencyError(f"no {timeframe} files in {path} (found {', '.join(sorted(by_tf))})")
    return dict(sorted(by_tf[timeframe].items()))


@dataclass(slots=True)
class _Symbol:
    """One symbol's history and where the replay stands in it.

    Only the base bars are kept from load; a coarser timeframe is resampled the first time an engine
    asks for it (a millisecond for the bundled history) and cached, so the memory goes to the
    timeframes in use and not to every one that might be (issue: daemon memory within its target).
    """

    symbol: str
    path: Path
    base: CandleArrays
    resampled: dict[int, Resampled] = field(default_factory=dict)
    visible: int = 0
    observed_at: float | None = None
    ticker: Ticker | None = None


class ReplayFeed:
    """`MarketFeed` over candle files. Symbols share one timeline: each step emits one bar timestamp
    (the bars of every symbol that has one then), after sleeping bar interval / speed on the clock.

    `cursor` is the number of timeline steps already visible; persist it and pass it back as
    `start_cursor` to resume where a replay stopped.
    """

    def __init__(
        self,
        files: Mapping[str, Path],
        clock: Clock,
        *,
        base_timeframe: str = "5m",
        speed: float = 600,
        warmup_bars: int = 200,
        start_cursor: int | None = None,
        spread_bps: Decimal = Decimal(2),
    ) -> None:
        if not files:
            raise ValueError("a replay needs at least one candle file")
        if not (math.isfinite(speed) and speed > 0):  # nan passes `speed <= 0`, and inf would never wait
            raise ValueError(f"speed must be a finite number above 0, got {speed}")
        if warmup_bars < 0:
            raise ValueError(f"warmup_bars must not be negative, got {warmup_bars}")
        if start_cursor is not None and start_cursor < 0:
            raise ValueError(f"start_cursor must not be negative, got {start_cursor}")
        if spread_bps < 0:
            raise ValueError(f"spread_bps must not be negative, got {spread_bps}")
        self._files = dict(files)
        self._clock = clock
        self.base_timeframe = base_timeframe
        self._base_seconds = timeframe_seconds(base_timeframe)
        self._speed = float(speed)
        self._warmup = warmup_bars
        self._start_cursor = start_cursor
        self._half_spread = spread_bps / Decimal(20_000)
        self._signal = UpdateSignal(clock)
        self._data: dict[str, _Symbol] = {}
        self._timeline: FloatArray = np.zeros(0, dtype=np.float64)  # bar open times, epoch seconds
        self._cursor = 0
        self._loaded = False
        self._started = False
        self._finished = False
        self._task: asyncio.Task[None] | None = None
        self._tf_cache: dict[str, int] = {}

    # --- MarketFeed ---------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._signal.version

    @property
    def symbols(self) -> list[str]:
        return list(self._files)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def total_steps(self) -> int:
        """Length of the merged timeline (valid after `load()`)."""
        return int(self._timeline.shape[0])

    @property
    def current_bar_ts(self) -> float | None:
        """Open time (epoch s) of the newest emitted bar: the replay's position in market history."""
        if self._cursor == 0:
            return None
        return float(self._timeline[self._cursor - 1])

    async def load(self) -> None:
        """Read and validate every file and build the timeline, off the loop. Idempotent."""
        if self._loaded:
            return
        # One worker thread reads the files one after another: each parse has its temporaries, and
        # three at once (a thread each, each with its own malloc arena keeping what it freed) would
        # add up in the daemon's peak RSS, which is for good. Nothing else touches this feed's state
        # until load() returns.
        await asyncio.to_thread(self._load_files)

    async def start(self) -> None:
        """Load, make the warm-up history current, and begin emitting on the clock."""
        if self._started:
            return
        await self.load()
        self._started = True
        now = self._clock.now()
        for sym in self._data.values():
            self._refresh_symbol(sym, now)
        self._signal.bump()
        if self._cursor >= self.total_steps:
            self._finish()
        else:
            log.info(
                "replay started", symbols=self.symbols, cursor=self._cursor, steps=self.total_steps,
                speed=self._speed, at=_iso(self._timeline[self._cursor]),
            )
        if not self._finished:
            self._task = asyncio.create_task(self._run(), name="replay-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("replay task had failed", error=repr(task.exception()))

    def ticker(self, symbol: str) -> Ticker | None:
        sym = self._data.get(symbol)
        return sym.ticker if sym is not None else None

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None:
        """Closed candles up to the cursor: never the bar (or the coarser bucket) still forming.

        `observed_at` is when this symbol's data last arrived (its newest base bar's emission), so an
        engine on 1h candles still sees fresh data between hourly closes.
        """
        sym = self._data.get(symbol)
        if sym is None or sym.visible == 0 or sym.observed_at is None or limit <= 0:
            return None
        seconds = self._timeframe(timeframe)
        if seconds == self._base_seconds:
            arrays, count = sym.base, sym.visible
        else:
            res = sym.resampled.get(seconds)
            if res is None:
                res = resample(sym.base, self._base_seconds, seconds)
                sym.resampled[seconds] = res
            arrays = res.arrays
            count = int(np.searchsorted(res.close_after, sym.visible, side="right"))
        if count == 0:
            return None
        return arrays.series(symbol, timeframe, max(0, count - limit), count, sym.observed_at)

    async def wait_update(self, after: int, timeout: float) -> int:
        return await self._signal.wait(after, timeout)

    def on_update(self, listener: Callable[[], None]) -> Callable[[], None]:
        return self._signal.add_listener(listener)

    def failure(self) -> BaseException | None:
        return task_failure(self._task)

    # --- driving ------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Emit the next timeline step now (the background task calls this; a backtest may too).

        Returns False, and marks the feed finished, when there is no more data.
        """
        if not self._loaded:
            raise RuntimeError("ReplayFeed.step() before load()")
        if self._cursor >= self.total_steps:
            self._finish()
            return False
        gap = self._missing_bars_before(self._cursor)
        if gap:
            log.info(
                "gap in replay data", after=_iso(self._timeline[self._cursor - 1]),
                resumes=_iso(self._timeline[self._cursor]), missing_bars=gap,
            )
        self._cursor += 1
        now = self._clock.now()
        emitted = float(self._timeline[self._cursor - 1])
        for sym in self._data.values():
            # Something new for this symbol exactly when its first bar not yet shown is due. Every bar
            # is on the timeline, so that is normally the bar just emitted, and then one more is
            # visible; otherwise (stepping without start()) the count is looked up.
            nxt = sym.visible
            if nxt < len(sym.base) and (due := float(sym.base.ts[nxt])) <= emitted:
                self._refresh_symbol(sym, now, nxt + 1 if due == emitted else None)
        self._signal.bump()
        return True

    def delay_before(self, step: int) -> float:
        """Clock seconds to wait before emitting timeline step `step`: the bar interval / speed, and
        a gap is not waited out (one bar interval at most)."""
        interval = float(self._base_seconds)
        if 0 < step < self.total_steps:
            delta = float(self._timeline[step] - self._timeline[step - 1])
            interval = min(delta, interval)
        return interval / self._speed

    async def _run(self) -> None:
        while not self._finished:
            await self._clock.sleep(self.delay_before(self._cursor))
            self.step()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        log.info("replay finished", cursor=self._cursor, steps=self.total_steps)
        self._signal.wake()

    # --- internals ----------------------------------------------------------------------------------

    def _timeframe(self, timeframe: str) -> int:
        seconds = self._tf_cache.get(timeframe)
        if seconds is None:
            seconds = timeframe_seconds(timeframe)
            if seconds < self._base_seconds or seconds % self._base_seconds:
                raise ValueError(
                    f"timeframe {timeframe} cannot be built from the replay's {self.base_timeframe} data "
                    "(it must be a multiple of it)"
                )
            self._tf_cache[timeframe] = seconds
        return seconds

    def _missing_bars_before(self, step: int) -> int:
        if step == 0 or step >= self.total_steps:
            return 0
        delta = round(float(self._timeline[step] - self._timeline[step - 1]) * 1000)
        return max(0, delta // (self._base_seconds * 1000) - 1)

    def _to_base(self, symbol: str, arrays: CandleArrays) -> CandleArrays:
        """The file's bars at the base timeframe: as they are, or resampled when the file is finer
        (5m files replayed at 1h emit one hourly bar per step). Coarser files cannot be replayed finer."""
        base_ms = self._base_seconds * 1000
        steps = np.diff(arrays.ts_ms)
        spacing = int(steps.min()) if steps.size else base_ms
        if spacing == base_ms:
            return arrays
        # Whole seconds only: resample() works in seconds, and load_candles() has made sure of >= 1 s.
        if spacing < base_ms and spacing % 1000 == 0 and base_ms % spacing == 0:
            log.info("replay data resampled to the base timeframe", symbol=symbol,
                     path=str(self._files[symbol]), file_seconds=spacing // 1000, base=self.base_timeframe)
            return resample(arrays, spacing // 1000, self._base_seconds).arrays
        raise DependencyError(
            f"{self._files[symbol]}: bars are {spacing / 1000:g}s apart; the replay's base timeframe "
            f"{self.base_timeframe} cannot be built from them"
        )

    def _load_files(self) -> None:
        self._setup({symbol: self._to_base(symbol, load_candles(path)) for symbol, path in self._files.items()})

    def _setup(self, loaded: dict[str, CandleArrays]) -> None:
        base_ms = self._base_seconds * 1000
        for symbol, arrays in loaded.items():
            if len(arrays) == 0:
                raise DependencyError(f"{self._files[symbol]}: no complete {self.base_timeframe} bar")
            gaps = find_gaps(arrays.ts_ms, base_ms)
            log.info(
                "replay data loaded", symbol=symbol, path=str(self._files[symbol]), bars=len(arrays),
                first=_iso(arrays.ts[0]), last=_iso(arrays.ts[-1]), gaps=len(gaps),
                missing_bars=sum(n for _, n in gaps),
            )
        self._timeline = merge_timelines([a.ts for a in loaded.values()])
        total = self.total_steps
        start = self._warmup if self._start_cursor is None else self._start_cursor
        self._cursor = min(start, total)
        for symbol, arrays in loaded.items():
            self._data[symbol] = _Symbol(symbol=symbol, path=self._files[symbol], base=arrays)
        self._loaded = True

    def _visible_at(self, sym: _Symbol, cursor: int) -> int:
        """Base bars of `sym` visible once timeline step `cursor` has been emitted (a binary search: a
        per-step table of these for every symbol would cost 8 bytes per step and symbol)."""
        if cursor == 0:
            return 0
        return int(np.searchsorted(sym.base.ts, self._timeline[cursor - 1], side="right"))

    def _refresh_symbol(self, sym: _Symbol, now: float, visible: int | None = None) -> None:
        """Make the symbol's bars up to the cursor current (`visible` of them, when the caller knows):
        its ticker and observation time."""
        if visible is None:
            visible = self._visible_at(sym, self._cursor)
        if visible == sym.visible and sym.ticker is not None:
            return
        sym.visible = visible
        if visible == 0:
            return
        sym.observed_at = now
        sym.ticker = self._make_ticker(sym, visible - 1, now)

    def _make_ticker(self, sym: _Symbol, i: int, now: float) -> Ticker:
        base = sym.base
        close = Decimal(to_decimal_text(float(base.close[i])))
        # 24h statistics as Binance reports them: the bars that opened in the last 24 hours.
        # base.ts[i] - a day is exact (whole seconds, or a float grid the subtraction maps onto itself).
        lo = int(np.searchsorted(base.ts, base.ts[i] - DAY_SECONDS, side="right"))
        # At most a day of bars (288 at 5m): summed here rather than from a stored prefix sum over the
        # whole history, which would cost 8 bytes a bar and lose cents to cancellation.
        quote_volume = float(np.dot(base.close[lo:i + 1], base.volume[lo:i + 1]))
        first_open = float(base.open[lo])
        change_pct = (float(base.close[i]) - first_open) / first_open * 100.0
        return Ticker(
            symbol=sym.symbol,
            bid=close * (1 - self._half_spread),
            ask=close * (1 + self._half_spread),
            last=close,
            ts=now,
            quote_volume_24h=Decimal(to_decimal_text(round(max(quote_volume, 0.0), 2))),
            change_pct_24h=Decimal(to_decimal_text(round(change_pct, 4))),
        )


def _iso(ts: float | np.float64) -> str:
    return utc_datetime(float(ts)).strftime("%Y-%m-%d %H:%M")
