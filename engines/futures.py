"""The futures engine: scan the USDT perpetuals, analyse the movers on 4h/1h/15m, enter with leverage
sized to a fixed risk, and manage every position every few seconds until it is out.

It reads only `futures_*` settings and trades only through `BaseEngine.trade` (risk gate, allocator,
order manager). The decisions are pure functions in `engines.futures_risk`, `engines.scanner` and
`engines.analysis`; this module is the plumbing: data in, intents out, state to and from the ledger.

Each step (every `futures_monitor_interval_seconds`, or sooner on new data):

0. Positions are read from the ledger again, so a fill the engine did not make itself (a liquidation,
   the Orchestrator's flattening) never leaves it managing a position that is gone.
1. The day's baseline (UTC): at the first step of a day the engine's equity and mark-to-market value
   are persisted; the day's P&L is the mark now minus the mark then. A loss of
   `futures_emergency_close_pct` of the day's starting equity closes every position and stops entries
   until the next UTC day.
2. Exits, for every position, stale data or not: force-close at -4%, stop-loss, trailing stop
   (from +1.5%, tighter from +3%), take-profit, partial take-profits (40% at +1.5%, 30% at +2.5%).
   All exits are reduce-only market orders, so they pass the gate while trading is REDUCING.
3. Entries, when a scan is due (`futures_scan_interval_seconds`, or a new 15m bar): scan, analyse the
   top candidates, and for each signal that is confident enough and on fresh data: leverage, size,
   pre-trade checks, then the order. `OrderIntent.notional` is the position's margin, and the engine's
   allocator exposure is the margin of its open positions, so the allocator budgets margin. A symbol
   is entered at most once per 15m bar of its signal: a position stopped out is not re-entered at once
   on the very data that opened it (kept in memory: a restart forgets it).

Partial take-profits are marked in the ledger position's `meta` *before* their order is sent and
unmarked only if the order is refused, so a crash between the two can never repeat a partial: at
worst one is skipped.

Protective stops live on the exchange, so a crashed or frozen daemon leaves no position unprotected:
after an entry fills, a reduce-only STOP_MARKET for the whole position rests at its stop-loss (its
client order id in `meta["stop_order"]`). When the trailing stop moves or a partial take-profit shrinks
the position, a new stop is placed *before* the old one is cancelled: for a moment both rest, which is
safe because both are reduce-only (the exchange cuts them to the position), whereas the reverse order
would leave a gap with no stop at all. Before the engine closes a position itself, every resting stop
of that symbol is cancelled first; a cancel that reports the stop already filled means the exchange
closed the position, and the engine does not sell again. A stop-loss is the exchange's: normally its
stop has fired by the time the engine sees the price through the level, and the cancel reports that
fill; only a stop that has not fired (the exchange triggers on its last price, the engine looks at the
bid or ask; or the stop was refused) is cancelled and the position closed by the engine, so either way
it is closed exactly once. A restart re-places every missing stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from config import Settings
from config import futures_problems as settings_problems
from core.clock import utc_datetime
from core.errors import ConfigError, DependencyError, TemporaryError
from core.types import (
    ZERO,
    CandleSeries,
    MarketInfo,
    MarketType,
    Order,
    OrderIntent,
    OrderState,
    OrderType,
    Position,
    PositionSide,
    Ticker,
)
from core.values import value_type
from engines.analysis import (
    ENTRY_TF,
    SIGNAL_TF,
    AnalysisParams,
    Analyzer,
    CandleCache,
    CandleSource,
    Signal,
)
from engines.base import BaseEngine, EngineContext
from engines.futures_risk import (
    HUNDRED,
    BookView,
    Closes,
    DayBaseline,
    EntryLimits,
    ExitParams,
    ExitState,
    LeveragePolicy,
    LeverageTier,
    OpenMark,
    PartialRule,
    SizingParams,
    Skip,
    correlated_symbols,
    daily_loss_reached,
    decide_exit,
    leverage_for,
    margin_in_use,
    mark_value,
    pct,
    position_size,
    pre_trade_checks,
    stop_towards_entry,
    target_towards_entry,
)
from engines.scanner import Scanner, ScanParams, ScanResult, TickerSource
from exchange.base import quantize_down

META_STOP_DISTANCE = "stop_distance_pct"
DAY_STATE_KEY = "futures_day:{engine}"
META_STOP_ORDER = "stop_order"
# A trailing stop is moved on the exchange only once the level moved by at least this fraction of the
# resting stop's price (0.1%): a tick storm must not turn into a replace per tick, and a 0.1% lag
# costs less than the exchange's request-weight budget is worth. An amount change always re-places.
STOP_REPLACE_MIN_FRACTION = Decimal("0.001")
# After a stop is refused (below the minimum, would trigger at once, exchange down) the engine retries
# this much later, and meanwhile stops the position out itself.
STOP_RETRY_SECONDS = 60.0
_LIVE = (OrderState.OPEN, OrderState.PARTIALLY_FILLED)


@value_type
class FuturesParams:
    """Every `futures_*` setting the engine uses, grouped by the pure function that takes it."""

    scan: ScanParams
    analysis: AnalysisParams
    leverage: LeveragePolicy
    sizing: SizingParams
    limits: EntryLimits
    exits: ExitParams
    min_confidence: float
    correlation_threshold: float
    correlation_bars: int
    emergency_close_pct: Decimal
    scan_interval: float
    monitor_interval: float
    max_data_age: float
    fetch_timeout: float
    concurrency: int
    candle_limit: int

    @classmethod
    def from_settings(cls, s: Settings) -> FuturesParams:
        return cls(
            scan=ScanParams(volume_factor=s.futures_volume_factor, volume_bars=s.futures_volume_average_bars,
                            min_change_pct=s.futures_min_change_pct, top_n=s.futures_scan_top_n),
            analysis=AnalysisParams(
                ema_fast=s.futures_ema_fast, ema_slow=s.futures_ema_slow, rsi_period=s.futures_rsi_period,
                rsi_long_min=s.futures_rsi_long_min, rsi_long_max=s.futures_rsi_long_max,
                macd_fast=s.futures_macd_fast, macd_slow=s.futures_macd_slow,
                macd_signal=s.futures_macd_signal, macd_cross_bars=s.futures_macd_cross_bars,
                atr_period=s.futures_atr_period, volume_factor=s.futures_volume_factor,
                volume_bars=s.futures_volume_average_bars, stop_atr_multiple=s.futures_stop_atr_multiple,
                max_stop_pct=s.futures_max_stop_pct, reward_risk=s.futures_reward_risk_ratio,
            ),
            leverage=LeveragePolicy(
                tiers=(LeverageTier(s.futures_leverage_high_confidence, s.futures_leverage_high),
                       LeverageTier(s.futures_leverage_mid_confidence, s.futures_leverage_mid),
                       LeverageTier(s.futures_leverage_low_confidence, s.futures_leverage_low)),
                floor=s.futures_leverage_min,
                max_leverage=s.futures_max_leverage,
                high_volatility_atr_pct=s.futures_high_volatility_atr_pct,
            ),
            sizing=SizingParams(risk_per_trade_pct=pct(s.futures_risk_per_trade_pct),
                                max_position_pct=pct(s.futures_max_position_pct)),
            limits=EntryLimits(max_positions=s.futures_max_positions,
                               max_margin_use_pct=pct(s.futures_max_margin_use_pct),
                               max_daily_loss_pct=pct(s.futures_max_daily_loss_pct),
                               max_correlated=s.futures_max_correlated_positions),
            exits=ExitParams(
                partials=(PartialRule("tp1", pct(s.futures_partial_1_pct), pct(s.futures_partial_1_size_pct)),
                          PartialRule("tp2", pct(s.futures_partial_2_pct), pct(s.futures_partial_2_size_pct))),
                trail_activation_pct=pct(s.futures_trailing_activation_pct),
                trail_distance_pct=pct(s.futures_trailing_distance_pct),
                trail_tighten_pct=pct(s.futures_trailing_tighten_pct),
                trail_tight_distance_pct=pct(s.futures_trailing_tight_distance_pct),
                force_close_pct=pct(s.futures_force_close_pct),
            ),
            min_confidence=s.futures_min_confidence,
            correlation_threshold=s.futures_correlation_threshold,
            correlation_bars=s.futures_correlation_bars,
            emergency_close_pct=pct(s.futures_emergency_close_pct),
            scan_interval=s.futures_scan_interval_seconds,
            monitor_interval=s.futures_monitor_interval_seconds,
            max_data_age=s.futures_max_data_age_seconds,
            fetch_timeout=s.futures_fetch_timeout_seconds,
            concurrency=s.futures_analysis_concurrency,
            candle_limit=s.futures_candle_limit,
        )


def exit_price(position: Position, ticker: Ticker) -> Decimal:
    """What closing would get: the bid for a long, the ask for a short."""
    return ticker.bid if position.side is PositionSide.LONG else ticker.ask


def _day(ts: float) -> str:
    return utc_datetime(ts).strftime("%Y-%m-%d")


class FuturesEngine(BaseEngine):
    """USD-M futures. `ticker_source` and `candle_source` default to the shared feed; live trading on the
    whole perpetual market passes sources that fetch through the exchange."""

    name = "futures"

    def __init__(self, ctx: EngineContext, *, ticker_source: TickerSource | None = None,
                 candle_source: CandleSource | None = None) -> None:
        super().__init__(ctx)
        problems = settings_problems(ctx.settings)
        if problems:
            raise ConfigError(problems)
        self.params = FuturesParams.from_settings(ctx.settings)
        self._entry_symbols = frozenset(ctx.settings.futures_symbols)
        p = self.params
        self.cache = CandleCache(candle_source or self._feed_candles, self.clock, concurrency=p.concurrency,
                                 timeout=p.fetch_timeout)
        self.scanner = Scanner(ticker_source or self._feed_tickers, self.cache, p.scan, self.clock,
                               timeout=p.fetch_timeout, candle_limit=p.candle_limit)
        self.analyzer = Analyzer(self.cache, p.analysis, limit=p.candle_limit)
        self.baseline: DayBaseline | None = None
        self.day_pnl = ZERO
        self.emergency_day: str | None = None
        self.last_signals: tuple[Signal, ...] = ()
        self._last_scan_at = -math.inf
        # The 15m bar of each symbol's last entry: the same bar's signal never enters twice, so a
        # position stopped out is not re-entered at once on the very data that opened it.
        self._entry_bar: dict[str, float] = {}
        self._bar_marker: float | None = None
        self._realized: Decimal | None = None
        self._fingerprint: tuple[tuple[str, PositionSide, Decimal, Decimal], ...] = ()
        # When a refused protective stop may be tried again, per symbol (see STOP_RETRY_SECONDS).
        self._stop_retry_at: dict[str, float] = {}
        # The signal's stop distance of an entry the exchange accepted but had not filled yet: its fill
        # arrives later (the order poll), and the position it opens gets its exit levels from this
        # distance, the one it was sized for (kept in memory: a restart falls back to the widest stop).
        self._awaiting_fill: dict[str, Decimal] = {}
        for key in ("blocked", "partials", "skipped_small", "emergency_closes", "stop_replacements"):
            self.counters.extra[key] = 0

    @property
    def wait_seconds(self) -> float:
        return self.params.monitor_interval

    # --- sources -----------------------------------------------------------------------------------
    async def _feed_tickers(self) -> list[Ticker]:
        """The scanner's universe from the feed: the symbols this engine's settings list. The feed may
        carry more (a replay shared with the spot engine, a symbol still held but no longer listed),
        which are not for entries."""
        feed = self.ctx.feed
        return [t for s in feed.symbols if s in self._entry_symbols and (t := feed.ticker(s)) is not None]

    async def _feed_candles(self, symbol: str, timeframe: str, limit: int) -> CandleSeries | None:
        try:
            return self.ctx.feed.candles(symbol, timeframe, limit)
        except ValueError as exc:  # a timeframe the feed cannot build: this symbol's data is unusable
            raise DependencyError(str(exc)) from exc

    # --- state -------------------------------------------------------------------------------------
    async def refresh_positions(self) -> None:
        """Positions from the ledger; the allocator's exposure is their margin (see the module doc).

        Every fill changes some position's amount or realized P&L, so the all-time realized P&L (a sum
        over every closed trade) is asked for again only when the positions changed. A position that is
        gone marks the trade metrics stale, as `BaseEngine.refresh_positions` does: one the exchange's
        stop closed is seen only here, and would otherwise never reach the metrics.
        """
        rows = await self.ctx.ledger.positions(self.ctx.name)
        closed = set(self.positions) - {p.symbol for p in rows}
        self.positions = {p.symbol: p for p in rows}
        if closed:
            self._metrics_stale = True
        self.ctx.allocator.set_exposure(self.ctx.name, margin_in_use(self._marks(prices=False)))
        fingerprint = tuple((p.symbol, p.side, p.amount, p.realized_pnl) for p in rows)
        if self._realized is None or fingerprint != self._fingerprint:
            self._realized = await self.ctx.ledger.realized_pnl(self.ctx.name)
            self._fingerprint = fingerprint

    async def load_state(self) -> None:
        """Positions, their exit levels (restored at the widest allowed stop if a crash lost them), a
        protective stop on the exchange for each that has none live, the day's baseline and the trade
        metrics."""
        await super().load_state()
        for position in list(self.positions.values()):
            await self._restore_exit_levels(position)
        for symbol in list(self.positions):
            current = self.positions.get(symbol)
            if current is not None:
                await self.protect(current)
        saved = await self.ctx.ledger.get_state(self._day_key)
        self.baseline = DayBaseline.from_dict(saved) if saved else None
        if saved and saved.get("emergency") and self.baseline is not None:
            self.emergency_day = self.baseline.day
        await self.refresh_metrics()

    async def _restore_exit_levels(self, position: Position) -> bool:
        """Give a position without a stop-loss or take-profit its levels: at the distance its entry was
        sized for when known, else the widest allowed stop. Without them `protective_level` is None and
        no stop is ever placed: a crash between the fill and `_set_exit_levels`, or an entry the
        exchange filled only after answering (the fill reaches the ledger later, through the order
        poll). True when the levels had to be restored."""
        if position.stop_loss is not None and position.take_profit is not None:
            return False
        saved = position.meta.get(META_STOP_DISTANCE)
        remembered = self._awaiting_fill.pop(position.symbol, None)
        if saved:
            distance = Decimal(saved)
        elif remembered is not None:
            distance = remembered
        else:
            distance = Decimal(str(self.params.analysis.max_stop_pct))
        await self._set_exit_levels(position, distance)
        self.log.warning("exit levels restored", symbol=position.symbol, distance_pct=str(distance),
                         stop_loss=str(position.stop_loss), take_profit=str(position.take_profit))
        return True

    @property
    def _day_key(self) -> str:
        return DAY_STATE_KEY.format(engine=self.ctx.name)

    def engine_equity(self) -> Decimal:
        """The engine's share of the portfolio: the base of every percentage limit."""
        return self.ctx.allocator.budget(self.ctx.name, self.ctx.equity())

    def _marks(self, *, prices: bool = True) -> list[OpenMark]:
        marks = []
        for p in self.positions.values():
            ticker = self.ctx.feed.ticker(p.symbol) if prices else None
            marks.append(OpenMark(p.side, p.amount, p.entry_price, p.fees,
                                  exit_price(p, ticker) if ticker is not None else None, p.leverage))
        return marks

    # --- the loop ----------------------------------------------------------------------------------
    async def step(self) -> None:
        # From the ledger every step: fills this engine did not ask for (a liquidation, the
        # Orchestrator's flattening) must not leave it managing a position that is gone.
        await self.refresh_positions()
        # A position can appear without exit levels between two steps (an entry filled after the
        # exchange answered it): levels and a stop on the exchange first, whatever else this step does.
        for symbol in list(self.positions):
            position = self.positions.get(symbol)
            if position is not None and await self._restore_exit_levels(position):
                await self.protect(position)
        await self.update_day()
        if await self.emergency_check():
            return
        for symbol in list(self.positions):
            position = self.positions.get(symbol)
            ticker = self.ctx.feed.ticker(symbol)
            if position is not None and ticker is not None:
                await self.manage_position(position, ticker)
        self.heartbeat()
        if self._scan_due():
            await self.scan_and_enter()

    # --- the day -----------------------------------------------------------------------------------
    async def update_day(self) -> None:
        now = self.clock.now()
        day = _day(now)
        if self._realized is None:
            await self.refresh_positions()
        mark = mark_value(self._realized or ZERO, self._marks())
        base = self.baseline
        if base is None or base.day != day:
            base = DayBaseline(day, self.engine_equity(), mark)
            await self._save_day(base)
            self.log.info("futures day baseline", day=day, equity=str(base.equity), mark=str(mark))
        elif base.equity <= 0 < self.engine_equity():
            # The equity was not known yet when the day began: measure the limits from the first figure.
            base = DayBaseline(day, self.engine_equity(), base.mark)
            await self._save_day(base)
        self.baseline = base
        self.day_pnl = mark - base.mark

    async def _save_day(self, base: DayBaseline) -> None:
        data: dict[str, Any] = base.to_dict()
        if self.emergency_day == base.day:
            data["emergency"] = True
        await self.ctx.ledger.set_state(self._day_key, data)

    async def emergency_check(self) -> bool:
        """Close everything once the day's loss reaches the emergency limit; True while it holds."""
        base = self.baseline
        if base is None or not daily_loss_reached(self.day_pnl, base.equity, self.params.emergency_close_pct):
            return False
        if self.emergency_day != base.day:
            self.emergency_day = base.day
            await self._save_day(base)
            self.log.error("futures emergency: closing every position", day_pnl=str(self.day_pnl),
                           day_start_equity=str(base.equity), limit_pct=str(self.params.emergency_close_pct))
        if self.positions:
            loss = -self.day_pnl / base.equity * HUNDRED
            for position in list(self.positions.values()):
                if await self.close(position, f"emergency: futures day loss {loss:.2f}%"):
                    self.counters.extra["emergency_closes"] += 1
        return True

    # --- exits -------------------------------------------------------------------------------------
    async def manage_position(self, position: Position, ticker: Ticker) -> None:
        """Exits and the exchange's stop for one position. Nothing while trading is HALTED: the gate
        then refuses every engine order, so an exit would cancel the stop and be denied its close and
        the stop's replacement alike; the Orchestrator's flattening owns the positions then."""
        if not self.ctx.gate.engine_exits_pass():
            return
        market = self.ctx.exchange.market(position.symbol)
        state = ExitState.from_meta(position.meta, position.amount)
        decision = decide_exit(
            side=position.side, entry=position.entry_price, amount=position.amount,
            price=exit_price(position, ticker), stop_loss=position.stop_loss,
            take_profit=position.take_profit, state=state, params=self.params.exits,
            amount_step=market.amount_step, min_amount=market.min_amount,
        )
        if decision.close_reason is not None:
            await self.close(position, decision.close_reason)
            return
        new_state = decision.state
        if new_state != state:
            await self._save_meta(position, new_state.to_meta(position.meta))
        for take in decision.partials:
            current = self.positions.get(position.symbol)
            if current is None:
                return
            await self.take_partial(current, take.rule.label, take.amount, decision.pnl_pct)
        # The trailing level may have moved, a partial may have shrunk the position, or an earlier stop
        # was refused: bring the exchange's stop in line (throttled, new before old).
        current = self.positions.get(position.symbol)
        if current is not None:
            await self.protect(current)

    async def take_partial(self, position: Position, label: str, amount: Decimal, move: Decimal) -> None:
        """Mark, send, and unmark only if nothing was filled (see the module docstring)."""
        state = ExitState.from_meta(position.meta, position.amount)
        marked = ExitState(state.initial_amount, state.partials_taken | {label}, state.best_price,
                           state.trailing_stop)
        if not await self._save_meta(position, marked.to_meta(position.meta)):
            return
        if amount <= 0:
            self.counters.extra["skipped_small"] += 1
            self.log.info("partial take-profit skipped: below the market minimum", symbol=position.symbol,
                          partial=label)
            return
        reason = f"partial take-profit {label} at {move:.2f}%"
        step = self.ctx.exchange.market(position.symbol).amount_step
        if amount >= quantize_down(position.amount, step):
            # Everything left (sizes adding up to 100%, or a remainder below the minimum folded in):
            # a full close, so the exchange's stops are cancelled first like any engine close.
            filled = position.amount if await self.close(position, reason) else ZERO
        else:
            filled = await self._exit_order(position, amount, reason)
        if filled > 0:
            self.counters.extra["partials"] += 1
            return
        current = self.positions.get(position.symbol)
        if current is not None:
            back = ExitState.from_meta(current.meta, current.amount)
            await self._save_meta(current, ExitState(back.initial_amount, back.partials_taken - {label},
                                                     back.best_price, back.trailing_stop).to_meta(current.meta))

    async def close(self, position: Position, reason: str) -> bool:
        """Close the whole position with a reduce-only market order, after the exchange's stops are
        gone (see the module doc). If the close does not go through, the stop is put back. Not while
        trading is HALTED (see `manage_position`): the stop would be cancelled and the close denied."""
        if not self.ctx.gate.engine_exits_pass():
            return False
        if not await self._clear_protective_stops(position):
            return False
        current = self.positions.get(position.symbol)
        if current is None:
            return False
        market = self.ctx.exchange.market(current.symbol)
        amount = quantize_down(current.amount, market.amount_step)
        if amount <= 0:
            return False
        if await self._exit_order(current, amount, reason) > 0:
            return True
        left = self.positions.get(current.symbol)
        if left is not None:
            await self.protect(left)
        return False

    async def _exit_order(self, position: Position, amount: Decimal, reason: str) -> Decimal:
        intent = OrderIntent(
            engine=self.ctx.name, market=MarketType.FUTURES, symbol=position.symbol,
            side=position.side.exit_side, amount=amount, order_type=OrderType.MARKET,
            reduce_only=True, reason=reason,
        )
        result = await self.trade(intent)
        if result is None or result.filled <= 0:
            self.log.warning("exit not filled", symbol=position.symbol, reason=reason,
                             error=None if result is None else result.error)
            return ZERO
        self.counters.exits += 1
        left = self.positions.get(position.symbol)
        self.log.info("exit", symbol=position.symbol, side=str(position.side), reason=reason,
                      amount=str(result.filled), price=str(result.order.avg_price),
                      left=str(left.amount) if left is not None else "0")
        if left is None:
            # Gone, however it came to be (the exit capped to a smaller ledger position): a reduce-only
            # stop left resting would have nothing to protect.
            await self._cancel_stops(position.symbol, keep=None)
            await self.refresh_metrics()
        return result.filled

    async def _save_meta(self, position: Position, meta: dict[str, str]) -> bool:
        if meta == position.meta:
            return True
        if not await self.ctx.ledger.update_position(self.ctx.name, position.symbol, meta=meta):
            return False  # closed meanwhile
        position.meta = meta
        return True

    # --- entries -----------------------------------------------------------------------------------
    def _newest_entry_bar(self) -> float | None:
        newest: float | None = None
        for symbol in self.ctx.feed.symbols:
            if symbol not in self._entry_symbols:
                continue
            try:
                series = self.ctx.feed.candles(symbol, ENTRY_TF, limit=1)
            except ValueError:
                return None
            if series is not None and len(series):
                ts = float(series.ts[-1])
                newest = ts if newest is None else max(newest, ts)
        return newest

    def _scan_due(self) -> bool:
        """Every scan interval, and whenever a new 15m bar has closed (a replay moves through bars much
        faster than the clock, and a scan on an unchanged market finds nothing new)."""
        marker = self._newest_entry_bar()
        new_bar = marker is not None and marker != self._bar_marker
        self._bar_marker = marker
        return new_bar or self.clock.now() - self._last_scan_at >= self.params.scan_interval

    async def scan_and_enter(self) -> ScanResult:
        self._last_scan_at = self.clock.now()
        result = await self.scanner.scan()
        self.heartbeat()
        if self.emergency_day is not None and self.baseline is not None and self.emergency_day == self.baseline.day:
            return result
        if self.ctx.gate.is_paused(self.ctx.name):
            return result
        if len(self.positions) >= self.params.limits.max_positions:
            return result
        symbols = [c.symbol for c in result.candidates if c.symbol not in self.positions]
        if not symbols:
            return result
        analysis = await self.analyzer.analyze(symbols)
        self.heartbeat()
        self.last_signals = analysis.signals
        for symbol, why in analysis.skipped.items():
            self.log.debug("no signal", symbol=symbol, reason=why)
        for signal in analysis.signals:
            if signal.confidence < self.params.min_confidence:
                self.log.debug("signal below the confidence threshold", symbol=signal.symbol,
                               confidence=signal.confidence)
                continue
            if signal.symbol in self.positions:
                continue
            await self.consider_entry(signal)
        return result

    def _market(self, symbol: str) -> MarketInfo | None:
        try:
            return self.ctx.exchange.market(symbol)
        except DependencyError as exc:
            self.log.info("entry skipped: no such market", symbol=symbol, error=str(exc))
            return None

    async def _closes(self, symbols: Sequence[str]) -> dict[str, Closes | None]:
        keys = [(s, SIGNAL_TF) for s in symbols]
        data = await self.cache.get_many(keys, self.analyzer.limit)
        out: dict[str, Closes | None] = {}
        for symbol in symbols:
            series = data.get((symbol, SIGNAL_TF))
            out[symbol] = None if series is None else Closes(series.ts, series.close)
        return out

    async def book_view(self, symbol: str) -> BookView:
        held = [s for s in self.positions if s != symbol]
        closes = await self._closes([symbol, *held])
        correlated = correlated_symbols(closes.get(symbol), {s: closes.get(s) for s in held},
                                        self.params.correlation_bars, self.params.correlation_threshold)
        base = self.baseline
        return BookView(
            open_positions=self.open_position_count(),
            margin_used=margin_in_use(self._marks(prices=False)),
            equity=self.engine_equity(),
            day_pnl=self.day_pnl,
            day_start_equity=base.equity if base is not None else ZERO,
            correlated=correlated,
        )

    async def consider_entry(self, signal: Signal) -> bool:
        symbol = signal.symbol
        if signal.bar_ts <= self._entry_bar.get(symbol, -math.inf):
            self.log.debug("no second entry on the same bar", symbol=symbol, bar_ts=signal.bar_ts)
            return False
        if await self.entry_in_doubt(symbol):
            return False
        # Entries in doubt in other symbols count as positions (see BaseEngine.open_position_count),
        # before the symbol's margin mode and leverage are set on the exchange for an entry that cannot go.
        if self._entries_in_doubt and not await self.room_for_entry(self.params.limits.max_positions):
            return False
        ticker = self.ctx.feed.ticker(symbol)
        candles = self.cache.cached(symbol, ENTRY_TF)
        if not self.fresh_enough(symbol, ticker, candles, self.params.max_data_age) or ticker is None:
            return False
        market = self._market(symbol)
        if market is None:
            return False
        long = signal.direction is PositionSide.LONG
        price = ticker.ask if long else ticker.bid
        leverage = leverage_for(signal.confidence, signal.atr_pct, self.params.leverage, market.max_leverage)
        sizing = position_size(
            equity=self.engine_equity(), confidence=signal.confidence, entry=price,
            stop_distance=price * signal.stop_distance_pct / HUNDRED, leverage=leverage,
            params=self.params.sizing, market=market,
        )
        if isinstance(sizing, Skip):
            self.log.info("entry skipped", symbol=symbol, reason=sizing.reason)
            return False
        checks = pre_trade_checks(await self.book_view(symbol), sizing.margin, self.params.limits)
        if not checks.allowed:
            self.counters.extra["blocked"] += 1
            self.log.info("entry blocked by pre-trade checks", symbol=symbol, reasons=list(checks.reasons))
            return False
        if not await self._set_up_symbol(symbol, leverage):
            return False
        intent = OrderIntent(
            engine=self.ctx.name, market=MarketType.FUTURES, symbol=symbol,
            side=signal.direction.entry_side, amount=sizing.amount, order_type=OrderType.MARKET,
            leverage=leverage, notional=sizing.margin,
            reason=f"{signal.direction} {signal.confidence:.0f}: {'+'.join(signal.reasons)}",
        )
        result = await self.trade(intent)
        if result is None:
            return False
        self.note_entry(symbol, result)
        if result.filled <= 0:
            if symbol in self._entries_in_doubt:
                # Resting, or sent without a clear answer: it may still fill, through the order poll,
                # and the next step then gives the position its levels and stop at the distance it was
                # sized for (`_restore_exit_levels`). No other entry of the symbol meanwhile.
                self._awaiting_fill[symbol] = signal.stop_distance_pct
                self._entry_bar[symbol] = signal.bar_ts
            return False
        self.counters.entries += 1
        self._entry_bar[symbol] = signal.bar_ts
        self._awaiting_fill.pop(symbol, None)  # an earlier accepted entry's distance, superseded
        position = self.positions.get(symbol)
        if position is None or position.side is not signal.direction:
            return True
        await self._set_exit_levels(position, signal.stop_distance_pct)
        self.log.info("entry", symbol=symbol, side=str(position.side), amount=str(position.amount),
                      price=str(position.entry_price), leverage=leverage, margin=str(sizing.margin),
                      confidence=signal.confidence, stop_loss=str(position.stop_loss),
                      take_profit=str(position.take_profit))
        await self.protect(position)
        return True

    async def _set_up_symbol(self, symbol: str, leverage: int) -> bool:
        """Isolated margin and this leverage on the exchange before the entry. The live client does not
        apply `OrderRequest.leverage` by itself (Binance keeps leverage per symbol), so without this an
        entry would trade at whatever leverage the account last had. An exchange without the call
        relies on the order's leverage alone."""
        setup = getattr(self.ctx.exchange, "ensure_symbol_setup", None)
        if setup is None:
            return True
        try:
            await self.clock.wait_for(setup(symbol, leverage, "isolated"), self.params.fetch_timeout)
        except (TimeoutError, TemporaryError, DependencyError) as exc:
            self.log.warning("entry skipped: leverage not set", symbol=symbol, leverage=leverage,
                             error=str(exc) or type(exc).__name__)
            return False
        return True

    async def _set_exit_levels(self, position: Position, distance_pct: Decimal) -> None:
        """Stop and target from the real entry price, at the signal's distance, rounded towards the
        entry; the exit state starts with the position's amount as its initial amount."""
        market = self.ctx.exchange.market(position.symbol)
        entry = position.entry_price
        distance = entry * distance_pct / HUNDRED
        reward = distance * Decimal(str(self.params.analysis.reward_risk))
        if position.side is PositionSide.LONG:
            stop, target = entry - distance, entry + reward
        else:
            stop, target = entry + distance, entry - reward
        stop = stop_towards_entry(stop, position.side, market.price_step)
        target = target_towards_entry(target, position.side, market.price_step)
        meta = ExitState.from_meta(position.meta, position.amount).to_meta(position.meta)
        meta[META_STOP_DISTANCE] = str(distance_pct)
        if await self.ctx.ledger.update_position(self.ctx.name, position.symbol, stop_loss=stop,
                                                 take_profit=target, meta=meta):
            position.stop_loss, position.take_profit, position.meta = stop, target, meta

    # --- protective stops on the exchange ----------------------------------------------------------
    def protective_level(self, position: Position) -> Decimal | None:
        """Where the exchange's stop belongs: the tighter of the stop-loss and the trailing stop, rounded
        to the price step towards the entry (rounding never widens the risk)."""
        levels = [x for x in (position.stop_loss, ExitState.from_meta(position.meta, position.amount).trailing_stop)
                  if x is not None]
        if not levels:
            return None
        level = max(levels) if position.side is PositionSide.LONG else min(levels)
        return stop_towards_entry(level, position.side, self.ctx.exchange.market(position.symbol).price_step)

    async def _resting_stops(self, symbol: str) -> list[Order]:
        """Every stop of this engine the ledger holds live for the symbol: the recorded one and any an
        interrupted replacement left behind."""
        orders = await self.ctx.ledger.orders_in_states(_LIVE, engine=self.ctx.name)
        return [o for o in orders
                if o.symbol == symbol and o.order_type is OrderType.STOP_MARKET and o.reduce_only]

    async def _live_stop(self, position: Position) -> Order | None:
        cid = position.meta.get(META_STOP_ORDER)
        if not cid:
            return None
        order = await self.ctx.ledger.get_order(cid)
        if order is None or order.state not in _LIVE:
            return None
        return order

    async def protect(self, position: Position) -> None:
        """Make the exchange's stop match the position: placed when missing, re-placed when the trailing
        level moved by at least STOP_REPLACE_MIN_FRACTION or the amount changed. The new stop is placed
        first and the old one cancelled after, so the position is never without a stop; if the new one
        is refused the old one stays. Nothing while trading is HALTED: the gate refuses the stop then,
        and a refusal would only be logged as the engine's to handle and delay the retry past the end
        of the halt; a stop already resting stays."""
        if not self.ctx.gate.engine_exits_pass():
            return
        level = self.protective_level(position)
        if level is None or level <= 0:
            return
        market = self.ctx.exchange.market(position.symbol)
        amount = quantize_down(position.amount, market.amount_step)
        if amount <= 0:
            return
        old = await self._live_stop(position)
        if old is not None and old.amount == amount and old.stop_price is not None and old.stop_price > 0:
            moved = abs(level - old.stop_price) / old.stop_price
            if moved < STOP_REPLACE_MIN_FRACTION:
                return
        if self.clock.now() < self._stop_retry_at.get(position.symbol, -math.inf):
            return
        intent = OrderIntent(
            engine=self.ctx.name, market=MarketType.FUTURES, symbol=position.symbol,
            side=position.side.exit_side, amount=amount, order_type=OrderType.STOP_MARKET, stop_price=level,
            reduce_only=True, reason="protective stop",
        )
        result = await self.trade(intent)
        if result is None or result.order.state not in _LIVE:
            self._stop_retry_at[position.symbol] = self.clock.now() + STOP_RETRY_SECONDS
            self.log.warning("protective stop not placed; the engine stops the position out itself",
                             symbol=position.symbol, stop_price=str(level), amount=str(amount),
                             kept=None if old is None else old.client_order_id,
                             error=None if result is None else result.error)
            return
        self._stop_retry_at.pop(position.symbol, None)
        new_id = result.order.client_order_id
        # trade() reloaded the positions: the fresh copy carries the meta saved so far (partials,
        # trailing); only the stop's id is added to it.
        current = self.positions.get(position.symbol)
        if current is None:  # closed while the stop was being placed: nothing left to protect
            await self._cancel_stops(position.symbol, keep=None)
            return
        meta = {**current.meta, META_STOP_ORDER: new_id}
        if await self.ctx.ledger.update_position(self.ctx.name, position.symbol, meta=meta):
            for copy in (position, current):
                copy.meta = dict(meta)
        if old is not None:
            self.counters.extra["stop_replacements"] += 1
        self.log.info("protective stop placed", symbol=position.symbol, stop_price=str(level),
                      amount=str(amount), client_order_id=new_id,
                      replaces=None if old is None else old.client_order_id)
        await self._cancel_stops(position.symbol, keep=new_id)

    async def _cancel_stops(self, symbol: str, keep: str | None) -> tuple[bool, bool]:
        """Cancel every resting stop of the symbol but `keep`. Returns (all gone, any filled): a stop
        that could not be cancelled (the exchange did not answer) is still there; one that filled
        changed the position."""
        all_gone, filled = True, False
        for order in await self._resting_stops(symbol):
            if order.client_order_id == keep:
                continue
            settled = await self.cancel_stop(order)
            if settled is None:
                all_gone = False
                continue
            state = settled.state
            if settled.filled > 0:
                filled = True
            if state in _LIVE or state in (OrderState.PENDING, OrderState.UNKNOWN):
                all_gone = False
            self.log.info("protective stop cancelled" if state is OrderState.CANCELED else
                          "protective stop not cancelled", symbol=symbol,
                          client_order_id=order.client_order_id, state=str(state), filled=str(settled.filled))
        return all_gone, filled

    async def _clear_protective_stops(self, position: Position) -> bool:
        """Before the engine closes a position, the exchange's stops must be gone, or both could close
        it. True when the engine may send its order now; False when a stop could not be cancelled (retry
        at the next step) or already filled (the exchange closed it: positions are reloaded, nothing is
        sent again)."""
        all_gone, filled = await self._cancel_stops(position.symbol, keep=None)
        if filled:
            await self.refresh_positions()
            self.log.info("protective stop had already filled: no engine exit", symbol=position.symbol,
                          left=str(self.positions[position.symbol].amount)
                          if position.symbol in self.positions else "0")
            if position.symbol not in self.positions:
                await self.refresh_metrics()
            return False
        return all_gone

    # --- status ------------------------------------------------------------------------------------
    def get_status(self) -> dict[str, Any]:
        status = super().get_status()
        base = self.baseline
        last = self.scanner.last
        status.update({
            "day_pnl": str(self.day_pnl),
            "day_start_equity": None if base is None else str(base.equity),
            "emergency_today": base is not None and self.emergency_day == base.day,
            "last_scan_at": self.scanner.last_at,
            "candidates": [] if last is None else [c.symbol for c in last.candidates],
            "signals": [{"symbol": s.symbol, "direction": str(s.direction), "confidence": s.confidence}
                        for s in self.last_signals],
            "blocked": self.counters.extra["blocked"],
            "partials": self.counters.extra["partials"],
            "stop_replacements": self.counters.extra["stop_replacements"],
            "emergency_closes": self.counters.extra["emergency_closes"],
            "metrics": self.metrics.as_dict(),
            "candle_cache": {"fetches": self.cache.stats.fetches, "hits": self.cache.stats.hits,
                             "errors": self.cache.stats.errors, "rejected": self.cache.stats.rejected},
        })
        return status
