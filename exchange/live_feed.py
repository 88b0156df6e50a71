"""Live market data: Binance's public REST API through ccxt, polled, no keys needed.

Polling (not websockets) keeps the failure modes few and visible: every request has a timeout,
temporary errors are retried with jittered backoff, and whatever comes back is validated before an
engine can see it. A symbol whose data is bad this round is skipped, not guessed at; its data ages,
and the engine's staleness check refuses to trade on it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import ccxt.async_support as ccxt_async
import numpy as np
import structlog
from ccxt.base.errors import BaseError, DDoSProtection, NetworkError, RateLimitExceeded

from core.clock import Clock
from core.errors import DependencyError, OperationalError, TemporaryError
from core.types import CandleSeries, MarketType, Ticker
from exchange.candles import CandleArrays, clean_rows, timeframe_seconds
from exchange.errors import RateLimited
from exchange.feed_signal import UpdateSignal, task_failure

log = structlog.get_logger("feed")

T = TypeVar("T")

OFFLINE_HINT = "to run offline use: python main.py --replay"

# After Binance says "too many requests" (429, or the 418 ban that follows a client ignoring 429s), the
# feed sends nothing for at least this long, doubling while it keeps happening, or for as long as the
# answer's Retry-After asks if that is longer.
RATE_LIMIT_PAUSE_SECONDS = 10.0
RATE_LIMIT_PAUSE_MAX_SECONDS = 600.0


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (Binance sends whole seconds), or None."""
    if not isinstance(headers, Mapping):
        return None
    for key, value in headers.items():
        if str(key).lower() == "retry-after":
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


def _exchange_class(market_type: MarketType) -> Any:
    return ccxt_async.binanceusdm if market_type is MarketType.FUTURES else ccxt_async.binance


def _ccxt_config(market_type: MarketType, timeout_seconds: float, rate_limit: bool) -> dict[str, Any]:
    # Public data only: skip the currency and margin endpoints load_markets would call with keys.
    options: dict[str, Any] = {"fetchCurrencies": False, "fetchMargins": False}
    options["fetchMarkets"] = {"types": ["linear" if market_type is MarketType.FUTURES else "spot"]}
    return {"enableRateLimit": rate_limit, "timeout": int(timeout_seconds * 1000), "options": options}


def loopback_api_urls(base_url: str, market_type: MarketType = MarketType.SPOT) -> dict[str, str]:
    """ccxt's Binance API urls with scheme and host replaced by `base_url`, paths kept, so one local
    server can answer every endpoint (PROTOCOL_NOTES.md, "Pointing ccxt at a loopback server")."""
    target = urlsplit(base_url)
    exchange = _exchange_class(market_type)({})
    api: dict[str, str] = dict(exchange.urls["api"])
    out: dict[str, str] = {}
    for key, url in api.items():
        parts = urlsplit(url)
        out[key] = urlunsplit((target.scheme, target.netloc, parts.path, parts.query, parts.fragment))
    return out


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _decimal(value: Any) -> Decimal | None:
    """A positive finite price as Decimal, or None (ccxt hands out floats, None or, rarely, strings)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            if not math.isfinite(value):
                return None
            dec = Decimal(repr(float(value)))
        else:
            dec = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not dec.is_finite() or dec <= 0:
        return None
    return dec


def _optional_decimal(value: Any) -> Decimal:
    """24h statistics are informative only: anything unusable becomes zero instead of rejecting a price."""
    if value is None or isinstance(value, bool):
        return Decimal(0)
    try:
        dec = Decimal(repr(float(value))) if isinstance(value, int | float) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return Decimal(0)
    return dec if dec.is_finite() else Decimal(0)


class LiveFeed:
    """`MarketFeed` over Binance's public API. Owns one polling task, started in `start()` and
    cancelled and awaited in `stop()`.

    Tickers are polled every `poll_seconds`; closed candles of each (symbol, timeframe) every
    `candle_poll_seconds`. `ts`/`observed_at` are the daemon clock's time of reception.
    """

    def __init__(
        self,
        clock: Clock,
        symbols: Iterable[str],
        timeframes: Iterable[str],
        *,
        market_type: MarketType = MarketType.SPOT,
        poll_seconds: float = 5.0,
        candle_poll_seconds: float = 60.0,
        timeout_seconds: float = 10.0,
        urls: Mapping[str, str] | None = None,
        candle_limit: int = 500,
        max_attempts: int = 3,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 10.0,
        rng: random.Random | None = None,
        enable_rate_limit: bool = True,
    ) -> None:
        self._clock = clock
        self._symbols = list(dict.fromkeys(symbols))
        self._ccxt: dict[str, str] = {}
        self._timeframes = list(dict.fromkeys(timeframes))
        if not self._symbols:
            raise ValueError("a live feed needs at least one symbol")
        self._tf_seconds = {tf: timeframe_seconds(tf) for tf in self._timeframes}
        if poll_seconds <= 0 or candle_poll_seconds <= 0 or timeout_seconds <= 0:
            raise ValueError("poll_seconds, candle_poll_seconds and timeout_seconds must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.market_type = market_type
        self._poll_seconds = poll_seconds
        self._candle_poll_seconds = candle_poll_seconds
        self._timeout = timeout_seconds
        self._urls = dict(urls) if urls is not None else None
        self._candle_limit = candle_limit
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._rng = rng if rng is not None else random.Random()
        # ccxt's own request pacing (Binance weights); only a loopback test server may do without it.
        self._rate_limit = enable_rate_limit
        self._signal = UpdateSignal(clock)
        self._paused_until = -math.inf  # monotonic: no request before this (a rate limit)
        self._pause = 0.0  # the last pause, doubled while rate limits keep coming
        self._tickers: dict[str, Ticker] = {}
        self._candles: dict[tuple[str, str], tuple[CandleArrays, float]] = {}
        self._exchange: Any = None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # completed polling rounds, for health reporting and tests

    # --- MarketFeed ---------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._signal.version

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    @property
    def finished(self) -> bool:
        return False

    async def start(self) -> None:
        """Check that Binance answers (markets load within the timeout), then start polling.

        Raises OperationalError with one line a person can act on when it does not.
        """
        if self._task is not None:
            return
        exchange = _exchange_class(self.market_type)(
            _ccxt_config(self.market_type, self._timeout, self._rate_limit)
        )
        if self._urls:
            exchange.urls["api"] = {**exchange.urls["api"], **self._urls}
        self._exchange = exchange
        try:
            markets: dict[str, Any] = await self._clock.wait_for(exchange.load_markets(), self._timeout)
        except TimeoutError as exc:
            await self._close_exchange()
            raise OperationalError(
                f"cannot reach Binance public API (no answer within {self._timeout:g}s); {OFFLINE_HINT}"
            ) from exc
        except Exception as exc:  # any failure here means we cannot trade on this feed
            await self._close_exchange()
            raise OperationalError(
                f"cannot reach Binance public API ({_one_line(exc)}); {OFFLINE_HINT}"
            ) from exc
        # Futures markets are `BTC/USDT:USDT` in ccxt; the engines say `BTC/USDT`. Keep our names and
        # remember ccxt's for the requests.
        for s in self._symbols:
            if s not in markets and ":" not in s and f"{s}:{s.split('/')[-1]}" in markets:
                self._ccxt[s] = f"{s}:{s.split('/')[-1]}"
        missing = [s for s in self._symbols if self._ccxt.get(s, s) not in markets]
        if missing:
            await self._close_exchange()
            raise OperationalError(
                f"Binance {self.market_type.value} has no market {', '.join(missing)}; "
                "check the symbols setting"
            )
        log.info("live feed connected", market=self.market_type.value, symbols=self._symbols,
                 timeframes=self._timeframes)
        self._task = asyncio.create_task(self._poll_loop(), name=f"live-feed-{self.market_type.value}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("live feed task had failed", error=repr(task.exception()))
        await self._close_exchange()

    def ticker(self, symbol: str) -> Ticker | None:
        return self._tickers.get(symbol)

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None:
        entry = self._candles.get((symbol, timeframe))
        if entry is None or limit <= 0:
            return None
        arrays, observed_at = entry
        n = len(arrays)
        return arrays.series(symbol, timeframe, max(0, n - limit), n, observed_at)

    async def wait_update(self, after: int, timeout: float) -> int:
        return await self._signal.wait(after, timeout)

    def on_update(self, listener: Callable[[], None]) -> Callable[[], None]:
        return self._signal.add_listener(listener)

    def failure(self) -> BaseException | None:
        return task_failure(self._task)

    # --- polling ------------------------------------------------------------------------------------

    async def poll_once(self, *, candles: bool = True) -> bool:
        """One polling round (tickers, and candles if asked). True if anything new was accepted."""
        changed = await self._poll_tickers()
        if candles:
            for symbol in self._symbols:
                for tf in self._timeframes:
                    changed = await self._poll_candles(symbol, tf) or changed
        if changed:
            self._signal.bump()
        self.rounds += 1
        return changed

    async def _poll_loop(self) -> None:
        next_candles = self._clock.monotonic()
        while True:
            due = self._clock.monotonic() >= next_candles
            try:
                await self.poll_once(candles=due)
            except (TemporaryError, DependencyError) as exc:
                log.warning("live feed round failed", error=str(exc))
            except Exception:
                # Never let one odd response end the feed: the data would silently stop.
                log.exception("live feed round crashed")
            if due:
                next_candles = self._clock.monotonic() + self._candle_poll_seconds
            # A rate-limit pause is waited out here rather than skipped round by round.
            await self._clock.sleep(max(self._poll_seconds, self._paused_until - self._clock.monotonic()))

    async def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run one request with a timeout; retry temporary failures with jittered exponential backoff."""
        delay = self._backoff_base
        for attempt in range(1, self._max_attempts + 1):
            if self._clock.monotonic() < self._paused_until:
                raise RateLimited(f"{what}: not sent, the feed pauses for Binance's rate limit")
            try:
                result = await self._clock.wait_for(make(), self._timeout)
            except (DDoSProtection, RateLimitExceeded) as exc:
                # Retrying a 429 at once is what turns it into an IP ban (418) for every engine on this
                # host: pause the whole feed instead, as long as Binance asks and at least the backoff.
                self._pause_for_rate_limit(what, exc)
                raise RateLimited(f"{what}: {_one_line(exc)}") from exc
            except (TimeoutError, NetworkError) as exc:
                if attempt == self._max_attempts:
                    raise TemporaryError(f"{what}: {_one_line(exc)} (after {attempt} attempts)") from exc
                pause = delay * self._rng.uniform(0.5, 1.5)
                log.info("live feed retry", request=what, attempt=attempt, error=_one_line(exc),
                         retry_in=round(pause, 3))
                await self._clock.sleep(pause)
                delay = min(delay * 2, self._backoff_max)
            except BaseError as exc:  # an answer, but not a usable one: skip it this round
                raise DependencyError(f"{what}: {_one_line(exc)}") from exc
            else:
                self._pause = 0.0
                return result
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _pause_for_rate_limit(self, what: str, exc: BaseException) -> None:
        asked = _retry_after(getattr(self._exchange, "last_response_headers", None))
        self._pause = min(RATE_LIMIT_PAUSE_MAX_SECONDS, max(RATE_LIMIT_PAUSE_SECONDS, self._pause * 2))
        pause = max(self._pause, asked or 0.0)
        self._paused_until = self._clock.monotonic() + pause
        log.warning("Binance rate limit: the live feed pauses", request=what, error=_one_line(exc),
                    retry_after=asked, pause_seconds=pause)

    async def _poll_tickers(self) -> bool:
        ex = self._exchange
        try:
            wanted = [self._ccxt.get(s, s) for s in self._symbols]
            raw: dict[str, Any] = await self._call(
                "fetch_tickers", lambda: ex.fetch_tickers(wanted)
            )
            if self.market_type is MarketType.FUTURES:
                # USD-M 24h tickers carry no bid/ask: take them from the book ticker.
                book: dict[str, Any] = await self._call(
                    "fetch_bids_asks", lambda: ex.fetch_bids_asks(wanted)
                )
                raw = {
                    s: {**t, "bid": book.get(s, {}).get("bid"), "ask": book.get(s, {}).get("ask")}
                    for s, t in raw.items()
                }
        except (TemporaryError, DependencyError) as exc:
            log.warning("tickers skipped this round", error=str(exc))
            return False
        now = self._clock.now()
        changed = False
        for symbol in self._symbols:
            ticker = self._validate_ticker(symbol, raw.get(self._ccxt.get(symbol, symbol)), now)
            if ticker is not None:
                self._tickers[symbol] = ticker
                changed = True
        return changed

    def _validate_ticker(self, symbol: str, data: Any, now: float) -> Ticker | None:
        if not isinstance(data, dict):
            log.warning("bad ticker rejected", symbol=symbol, problem="missing")
            return None
        bid, ask, last = _decimal(data.get("bid")), _decimal(data.get("ask")), _decimal(data.get("last"))
        problem = None
        if bid is None or ask is None or last is None:
            problem = "bid, ask or last missing, not a number or not positive"
        elif bid > ask:
            problem = f"crossed book (bid {bid} > ask {ask})"
        if problem is not None or bid is None or ask is None or last is None:
            log.warning("bad ticker rejected", symbol=symbol, problem=problem,
                        bid=data.get("bid"), ask=data.get("ask"), last=data.get("last"))
            return None
        return Ticker(
            symbol=symbol, bid=bid, ask=ask, last=last, ts=now,
            quote_volume_24h=_optional_decimal(data.get("quoteVolume")),
            change_pct_24h=_optional_decimal(data.get("percentage")),
        )

    async def _poll_candles(self, symbol: str, timeframe: str) -> bool:
        ex = self._exchange
        try:
            # One extra: Binance's newest kline is the one still forming, which is dropped below.
            rows: Any = await self._call(
                f"fetch_ohlcv {symbol} {timeframe}",
                lambda: ex.fetch_ohlcv(self._ccxt.get(symbol, symbol), timeframe, limit=self._candle_limit + 1),
            )
        except (TemporaryError, DependencyError) as exc:
            log.warning("candles skipped this round", symbol=symbol, timeframe=timeframe, error=str(exc))
            return False
        now = self._clock.now()
        arrays, problem = self._validate_ohlcv(rows, self._tf_seconds[timeframe], now,
                                               skew_seconds=self._candle_poll_seconds)
        if arrays is None:
            log.warning("bad candles rejected", symbol=symbol, timeframe=timeframe, problem=problem)
            return False
        self._candles[(symbol, timeframe)] = (arrays, now)
        return True

    @staticmethod
    def _validate_ohlcv(
        rows: Any, tf_seconds: int, now: float, *, skew_seconds: float
    ) -> tuple[CandleArrays | None, str]:
        """Closed candles, or None and why. Any bad row rejects the whole answer for this round: a
        series with a hole punched in it by validation would feed indicators a false history.

        Two checks keep Binance's forming kline out. Asked without endTime (as here), Binance answers
        with the kline that holds its own current time as the last row, close and volume partial, and
        the rows carry no flag saying so; our clock alone cannot tell, since a host clock a second or
        two ahead of Binance's (common on a VPS) sees that kline closed before it is. So the newest
        row counts as forming unless, by our clock, it closed at least `skew_seconds` ago: safe for a
        clock up to `skew_seconds` ahead. A newest row that really is closed (a halted market, or no
        new kline yet) is held back only while it closed less than `skew_seconds` ago; with
        `skew_seconds` the candle poll interval, the next poll serves it, as the newest row by then old
        enough or behind a newer one, so a closed bar is never late by more than one poll. The second
        check is the clock itself, for a clock behind Binance's: no row whose interval has not ended.
        """
        if not isinstance(rows, list) or not rows:
            return None, "empty response"
        try:
            table = np.array(
                [[np.nan if v is None else float(v) for v in row[:6]] for row in rows], dtype=np.float64
            )
        except (TypeError, ValueError, IndexError):
            return None, "malformed rows"
        if table.ndim != 2 or table.shape[1] != 6:
            return None, "malformed rows"
        arrays, rejections = clean_rows(*(table[:, i] for i in range(6)))
        if rejections.total:
            bad = ", ".join(f"{k}={v}" for k, v in rejections.as_dict().items() if v)
            return None, f"{rejections.total} bad of {len(rows)} rows ({bad})"
        closed = int(np.searchsorted(arrays.ts_ms, int((now - tf_seconds) * 1000), side="right"))
        if closed == len(arrays) and float(arrays.ts[-1]) + tf_seconds > now - skew_seconds:
            closed -= 1  # presumed forming: see above
        if closed == 0:
            return None, "no closed candle"
        if closed == len(arrays):
            return arrays, ""
        return (
            CandleArrays.build(
                arrays.ts_ms[:closed], arrays.open[:closed], arrays.high[:closed],
                arrays.low[:closed], arrays.close[:closed], arrays.volume[:closed],
            ),
            "",
        )

    async def _close_exchange(self) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        try:
            await self._clock.wait_for(exchange.close(), self._timeout)
        except (TimeoutError, BaseError) as exc:
            log.warning("closing the ccxt session failed", error=_one_line(exc))
