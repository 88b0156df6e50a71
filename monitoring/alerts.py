"""Alerts: what the operator's phone says when something happens, and how it gets there without harm.

Two halves. `format_event` (and the report formatters the Telegram commands share) turn events and
control reports into short plain-text lines a phone shows well. `AlertSender` carries them to
Telegram as a long-lived coroutine with one job: deliver what it can, never slow or break anything
else. It reads its own bounded bus subscription (a full queue drops and counts there, so publishers
never wait), coalesces bursts into few messages, paces itself inside Telegram's flood limits, waits
out `RetryAfter` on the daemon's clock, and counts every line it could not deliver.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, RetryAfter
from telegram.warnings import PTBDeprecationWarning

from core.clock import DAY_SECONDS, Clock, start_of_utc_day, utc_datetime
from core.events import (
    BreakerBlind,
    DaemonStarted,
    DaemonStopping,
    EngineFailed,
    EngineRestarted,
    EngineStalled,
    Event,
    EventBus,
    FlattenStuck,
    OrderFilled,
    PortfolioReported,
    PositionClosed,
    ReconciliationFinding,
    RiskRebased,
    Subscription,
    TradingStateChanged,
)
from core.types import Position, PositionSide, TradingState
from core.values import value_type
from monitoring.control import (
    BalanceReport,
    BreakerReport,
    Control,
    DailyPnl,
    StatusReport,
    TradeRecord,
)

if TYPE_CHECKING:
    from config import Settings

log = structlog.get_logger("alerts")

# Alert-worthy events waiting for the sender at most; beyond it they are counted as dropped.
ALERT_QUEUE = 1000
TELEGRAM_MAX_CHARS = 4096

SendFn = Callable[[int, str], Awaitable[None]]

# --- formatting ------------------------------------------------------------------------------------


def fmt_money(value: Decimal) -> str:
    """Balances and equity: two decimals and thousands separators, readable at a glance."""
    return f"{value:,.2f}"


# An equity figure the risk monitor has not taken yet (right after a first start).
NOT_YET = "not taken yet"


def fmt_signed(value: Decimal) -> str:
    """P&L always carries its sign, so a loss is never mistaken for a gain on a small screen."""
    return f"{value:+,.2f}"


def fmt_pct(value: Decimal, signed: bool = False) -> str:
    return f"{value:+.2f}%" if signed else f"{value:.2f}%"


def fmt_price(value: Decimal) -> str:
    """Six significant digits (at least two decimals): 43,210.50, 1.23457, 0.00001234."""
    if value == 0:
        return "0"
    places = min(12, max(2, 5 - value.adjusted()))
    text = f"{value.quantize(Decimal(1).scaleb(-places)):,.{places}f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"{whole}.{frac}"


def fmt_amount(value: Decimal) -> str:
    """Quantities exactly as held, without exponent or trailing zeros (0.015, 1500)."""
    text = f"{value.normalize():f}"
    return text if "." not in text else text.rstrip("0").rstrip(".")


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 2 * 86_400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86_400}d{(s % 86_400) // 3600}h"


def fmt_time(ts: float | None) -> str:
    return "-" if ts is None else utc_datetime(ts).strftime("%Y-%m-%d %H:%M UTC")


def _fmt_value(value: Any) -> str:
    if isinstance(value, Decimal):
        return fmt_money(value)
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def _state_word(state: TradingState) -> str:
    return {
        TradingState.ACTIVE: "ACTIVE",
        TradingState.REDUCING: "REDUCING (breaker tripped: only reduce-only orders)",
        TradingState.HALTED: "HALTED (killed: no orders)",
    }[state]


def _flatten_left(event: FlattenStuck) -> str:
    """'2 positions, 1 order in doubt': what a flattening has not closed yet."""
    parts = [f"{event.positions} position{'s' if event.positions != 1 else ''}"]
    if event.orders:
        parts.append(f"{event.orders} order{'s' if event.orders != 1 else ''} in doubt")
    return ", ".join(parts)


def format_trading_state(event: TradingStateChanged) -> str:
    reason = f": {event.reason}" if event.reason else ""
    if event.new is TradingState.HALTED:
        return f"🛑 KILL: trading HALTED{reason}. Nothing trades until a person resumes it."
    if event.new is TradingState.REDUCING:
        until = f" until {fmt_time(event.until)}" if event.until is not None else ""
        return f"🚨 Circuit breaker tripped{reason}. Only reduce-only orders{until}."
    if event.old is TradingState.HALTED:
        return f"✅ Trading resumed after kill{reason}. State ACTIVE."
    if event.old is TradingState.REDUCING:
        return f"✅ Circuit breaker reset{reason}. State ACTIVE."
    return f"ℹ️ Trading state {event.old.value} → {event.new.value}{reason}"


def format_event(event: Event) -> str | None:
    """The alert line for an event, or None when this kind (or this instance) is not worth a message."""
    match event:
        case DaemonStarted():
            engines = ", ".join(event.engines) or "none"
            line = f"🚀 Kinetic Empire started ({event.mode}) · engines: {engines} · equity {fmt_money(event.equity)}"
            if event.trading_state is TradingState.ACTIVE:
                return line
            reason = f": {event.state_reason}" if event.state_reason else ""
            return f"{line}\n⚠️ Trading {_state_word(event.trading_state)}{reason}"
        case DaemonStopping():
            return f"⏹ Kinetic Empire stopping: {event.reason}"
        case PortfolioReported(final=True):
            lines = [
                f"📊 Final portfolio · equity {fmt_money(event.equity)} · realized "
                f"{fmt_signed(event.realized_pnl)} · unrealized {fmt_signed(event.unrealized_pnl)}"
            ]
            for name, fields in sorted(event.engines.items()):
                detail = ", ".join(f"{k} {_fmt_value(v)}" for k, v in fields.items())
                lines.append(f"  {name}: {detail}" if detail else f"  {name}")
            return "\n".join(lines)
        case EngineStalled():
            return f"⚠️ WARN {event.engine}: no heartbeat for {fmt_age(event.heartbeat_age)}"
        case EngineRestarted():
            backoff = f", after {event.backoff_seconds:g}s backoff" if event.backoff_seconds else ""
            return f"🔁 {event.engine} restarted (attempt {event.attempt}{backoff}): {event.reason}"
        case EngineFailed():
            return (
                f"❌ {event.engine} FAILED after {event.restarts} restarts: {event.reason}. "
                f"It stays stopped; /restart {event.engine} to try again."
            )
        case TradingStateChanged():
            return format_trading_state(event)
        case OrderFilled():
            extra = " reduce-only" if event.reduce_only else ""
            return (
                f"✅ {event.engine} {event.side.value.upper()} {fmt_amount(event.amount)} {event.symbol} "
                f"@ {fmt_price(event.price)} (fee {fmt_amount(event.fee)}){extra}"
            )
        case PositionClosed():
            mark = "💰" if event.realized_pnl >= 0 else "🔻"
            pct = ""
            if event.entry_price:
                move = (event.exit_price - event.entry_price) / event.entry_price * 100
                pct = f" ({fmt_pct(move if event.side is PositionSide.LONG else -move, signed=True)})"
            reason = f" · {event.reason}" if event.reason else ""
            return (
                f"{mark} {event.engine} closed {event.side.value} {fmt_amount(event.amount)} {event.symbol} "
                f"{fmt_price(event.entry_price)} → {fmt_price(event.exit_price)} · "
                f"P&L {fmt_signed(event.realized_pnl)}{pct}{reason}"
            )
        case ReconciliationFinding():
            return f"🔍 Reconciliation {event.engine}: {event.finding} — {event.detail}"
        case RiskRebased():
            return f"⚖️ Circuit breaker re-based: {event.reason}"
        case BreakerBlind(blind=True):
            return (f"⚠️ Circuit breaker blind for {fmt_age(event.seconds)}: {event.detail}. No loss limit is "
                    f"checked until the whole account can be valued again.")
        case BreakerBlind():
            return f"✅ Circuit breaker sees the whole account again (after {fmt_age(event.seconds)})."
        case FlattenStuck(stuck=True):
            return "\n".join([
                f"⚠️ Flattening stuck for {fmt_age(event.seconds)}: {_flatten_left(event)} left. It keeps "
                f"trying; these may need you:",
                *(f"  {engine} {symbol}: {why}" for engine, symbol, why in event.left),
            ])
        case FlattenStuck(positions=0, orders=0):
            return f"✅ Flattening finished after {fmt_age(event.seconds)}: nothing left open."
        case FlattenStuck():
            return (f"ℹ️ Flattening stopped after {fmt_age(event.seconds)} (trading resumed): "
                    f"{_flatten_left(event)} left open.")
    return None


# --- report formatters shared with the Telegram commands -------------------------------------------


def format_status(report: StatusReport) -> str:
    lines = [
        f"{report.mode} · {_state_word(report.trading_state)} · up {fmt_age(report.uptime_seconds)}",
        f"Equity {fmt_money(report.equity)} · day {fmt_signed(report.day_pnl)} "
        f"({fmt_pct(report.day_pnl_pct, signed=True)}) · drawdown {fmt_pct(report.drawdown_pct)}",
    ]
    for eng in report.engines:
        if eng.state == "disabled":
            lines.append(f"{eng.name}: disabled")
            continue
        state = eng.state + (" (paused)" if eng.paused and eng.state != "paused" else "")
        restarts = f" · {eng.restarts} restarts" if eng.restarts else ""
        lines.append(
            f"{eng.name}: {state} · heartbeat {fmt_age(eng.heartbeat_age)} ago · eq {fmt_money(eng.equity)} · "
            f"{eng.open_positions} pos · P&L r {fmt_signed(eng.realized_pnl)} u {fmt_signed(eng.unrealized_pnl)}"
            f"{restarts}"
        )
    return "\n".join(lines)


def format_positions(positions: Sequence[Position], now: float) -> str:
    if not positions:
        return "No open positions."
    lines = [f"{len(positions)} open position{'s' if len(positions) != 1 else ''}:"]
    for p in positions:
        lev = f" {p.leverage}x" if p.leverage > 1 else ""
        sl = f" · SL {fmt_price(p.stop_loss)}" if p.stop_loss is not None else ""
        tp = f" · TP {fmt_price(p.take_profit)}" if p.take_profit is not None else ""
        lines.append(
            f"{p.engine} {p.symbol} {p.side.value}{lev} {fmt_amount(p.amount)} @ {fmt_price(p.entry_price)}"
            f"{sl}{tp} · {fmt_age(now - p.opened_at)} old"
        )
    return "\n".join(lines)


def format_balances(reports: Sequence[BalanceReport]) -> str:
    if not reports:
        return "No balances reported."
    lines: list[str] = []
    for r in reports:
        lines.append(f"{r.engine}: equity {fmt_money(r.equity)}")
        for asset in sorted(set(r.total) | set(r.free)):
            total = r.total.get(asset, Decimal(0))
            free = r.free.get(asset, Decimal(0))
            lines.append(f"  {asset} {fmt_amount(total)} (free {fmt_amount(free)})")
    return "\n".join(lines)


def format_pnl(rows: Sequence[DailyPnl], days: int) -> str:
    title = "today" if days == 1 else f"last {days} days"
    if not rows:
        return f"No realized P&L {title}."
    by_day: dict[str, list[DailyPnl]] = {}
    for row in rows:
        by_day.setdefault(row.day, []).append(row)
    lines = [f"Realized P&L, {title} (UTC):"]
    for day in sorted(by_day, reverse=True):
        parts = [
            f"{r.engine} {fmt_signed(r.realized_pnl)} ({r.trades})"
            for r in sorted(by_day[day], key=lambda r: r.engine)
        ]
        lines.append(f"{day}: " + " · ".join(parts))
    total = sum((r.realized_pnl for r in rows), Decimal(0))
    trades = sum(r.trades for r in rows)
    lines.append(f"Total {fmt_signed(total)} over {trades} trade{'s' if trades != 1 else ''}")
    return "\n".join(lines)


def format_trades(trades: Sequence[TradeRecord]) -> str:
    if not trades:
        return "No trades yet."
    lines = [f"Last {len(trades)} trade{'s' if len(trades) != 1 else ''}:"]
    for t in trades:
        when = utc_datetime(t.ts).strftime("%m-%d %H:%M")
        pnl = f" · P&L {fmt_signed(t.realized_pnl)}" if t.realized_pnl is not None else ""
        lines.append(
            f"{when} {t.engine} {t.side.upper()} {fmt_amount(t.amount)} {t.symbol} @ {fmt_price(t.price)} "
            f"fee {fmt_amount(t.fee)}{pnl}"
        )
    return "\n".join(lines)


def format_breaker(report: BreakerReport) -> str:
    lines = [f"Breaker: {_state_word(report.state)}"]
    if report.reason:
        lines.append(f"Reason: {report.reason}")
    if report.until is not None:
        lines.append(f"Until: {fmt_time(report.until)}")
    day_start, peak = (NOT_YET if v is None else fmt_money(v) for v in (report.day_start_equity, report.peak_equity))
    lines.append(f"Day-start equity {day_start} · peak {peak}")
    return "\n".join(lines)


async def build_daily_summary(control: Control, now: float) -> str:
    """The once-a-day message: status plus today's realized P&L, both read from Control."""
    status = await control.status()
    rows = await control.pnl(1)
    day = utc_datetime(now).strftime("%Y-%m-%d")
    return f"📅 Daily summary {day} (UTC)\n{format_status(status)}\n{format_pnl(rows, 1)}"


def split_message(lines: Iterable[str], max_chars: int) -> list[str]:
    """Pack lines into as few messages as fit `max_chars`; a longer line is cut into pieces."""
    messages: list[str] = []
    current = ""
    for line in lines:
        pieces = [line[i : i + max_chars] for i in range(0, len(line), max_chars)] or [""]
        for piece in pieces:
            if not current:
                current = piece
            elif len(current) + 1 + len(piece) <= max_chars:
                current = f"{current}\n{piece}"
            else:
                messages.append(current)
                current = piece
    if current:
        messages.append(current)
    return messages


# --- settings --------------------------------------------------------------------------------------

_ALWAYS_ON: frozenset[type[Event]] = frozenset(
    {
        DaemonStarted,
        DaemonStopping,
        PortfolioReported,
        EngineStalled,
        EngineRestarted,
        EngineFailed,
        TradingStateChanged,
        ReconciliationFinding,
        RiskRebased,
        BreakerBlind,
        FlattenStuck,
    }
)


def parse_hhmm(text: str) -> tuple[int, int] | None:
    """'HH:MM' (UTC) as (hour, minute); '' means off. Raises ValueError for anything else."""
    text = text.strip()
    if not text:
        return None
    hour_s, sep, minute_s = text.partition(":")
    if not sep or not hour_s.isdigit() or not minute_s.isdigit() or len(minute_s) != 2:
        raise ValueError(f"expected HH:MM, got {text!r}")
    hour, minute = int(hour_s), int(minute_s)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ValueError(f"expected HH:MM within 00:00-23:59, got {text!r}")
    return hour, minute


@value_type
class AlertSettings:
    """Which alerts go out. Fills and closes can be noisy, so each can be switched off; the
    operational ones (stalls, restarts, breaker, kill) cannot."""

    order_fills: bool = True
    position_closes: bool = True
    daily_summary_utc: str = ""

    def __post_init__(self) -> None:
        parse_hhmm(self.daily_summary_utc)

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertSettings:
        return cls(
            order_fills=settings.alert_order_fills,
            position_closes=settings.alert_position_closes,
            daily_summary_utc=settings.alert_daily_summary_utc,
        )

    @property
    def kinds(self) -> frozenset[type[Event]]:
        """Event kinds to subscribe to, so switched-off kinds never even take queue space."""
        kinds = set(_ALWAYS_ON)
        if self.order_fills:
            kinds.add(OrderFilled)
        if self.position_closes:
            kinds.add(PositionClosed)
        return frozenset(kinds)

    def wants(self, event: Event) -> bool:
        return isinstance(event, tuple(self.kinds))

    @property
    def daily_summary_at(self) -> tuple[int, int] | None:
        return parse_hhmm(self.daily_summary_utc)


def next_daily_at(now: float, hour: int, minute: int) -> float:
    """The next HH:MM UTC strictly after `now` (epoch seconds)."""
    target = start_of_utc_day(now) + hour * 3600 + minute * 60
    return target if target > now else target + DAY_SECONDS


def retry_after_seconds(exc: RetryAfter) -> float:
    """RetryAfter.retry_after is int seconds or a timedelta depending on PTB_TIMEDELTA; accept both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value: int | float | timedelta = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


# --- pacing ----------------------------------------------------------------------------------------


class _Pacer:
    """Telegram's flood limits, kept on our side so we rarely meet a 429: about one message per
    second per chat, 20 per minute per group, 30 per second overall; plus a global pause after a
    RetryAfter, during which nothing at all is sent."""

    def __init__(self, clock: Clock, per_chat_interval: float, group_per_minute: int, global_per_second: int):
        self._clock = clock
        self._per_chat_interval = per_chat_interval
        self._group_per_minute = group_per_minute
        self._global_per_second = global_per_second
        self._last: dict[int, float] = {}
        self._group_window: dict[int, deque[float]] = {}
        self._global_window: deque[float] = deque()
        self._blocked_until = float("-inf")

    def block(self, seconds: float) -> None:
        self._blocked_until = max(self._blocked_until, self._clock.monotonic() + seconds)

    def _wait_needed(self, chat_id: int, now: float) -> float:
        waits = [self._blocked_until - now]
        last = self._last.get(chat_id)
        if last is not None:
            waits.append(last + self._per_chat_interval - now)
        window = self._group_window.get(chat_id)
        if window is not None:
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= self._group_per_minute:
                waits.append(window[0] + 60.0 - now)
        while self._global_window and self._global_window[0] <= now - 1.0:
            self._global_window.popleft()
        if len(self._global_window) >= self._global_per_second:
            waits.append(self._global_window[0] + 1.0 - now)
        return max(waits)

    async def turn(self, chat_id: int) -> None:
        """Wait until a message to `chat_id` is within limits, then claim the slot."""
        while True:  # each wait ends at a free slot; senders share one lock, so nobody steals it
            now = self._clock.monotonic()
            wait = self._wait_needed(chat_id, now)
            if wait <= 0:
                break
            await self._clock.sleep(wait)
        self._last[chat_id] = now
        if chat_id < 0:
            self._group_window.setdefault(chat_id, deque()).append(now)
        self._global_window.append(now)


# --- the sender ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    text: str
    events: int


class AlertSender:
    """Delivers alert lines to every configured chat; owned by the Orchestrator's TaskGroup.

    `run(subscription)` never returns and never raises (except CancelledError): a formatting bug,
    Telegram being down or rate limiting costs alerts, counted in `dropped`, never the daemon.
    A send that timed out is retried, so Telegram may occasionally show a line twice; losing a
    kill or breaker alert would be worse.
    """

    def __init__(
        self,
        send: SendFn,
        chat_ids: Sequence[int],
        clock: Clock,
        *,
        max_queue: int = ALERT_QUEUE,
        coalesce_seconds: float = 1.0,
        max_message_chars: int = 4000,
        settings: AlertSettings | None = None,
        per_chat_interval: float = 1.0,
        group_per_minute: int = 20,
        global_per_second: int = 25,
        max_attempts: int = 3,
        max_retry_after: int = 10,
        send_timeout: float = 30.0,
        control_timeout: float = 30.0,
    ) -> None:
        if not 1 <= max_message_chars <= TELEGRAM_MAX_CHARS:
            raise ValueError(f"max_message_chars must be within 1..{TELEGRAM_MAX_CHARS}")
        self._send = send
        self._chat_ids = tuple(dict.fromkeys(chat_ids))
        self._clock = clock
        self._max_queue = max_queue
        self._coalesce = coalesce_seconds
        self._max_chars = max_message_chars
        self.settings = settings or AlertSettings()
        self._pacer = _Pacer(clock, per_chat_interval, group_per_minute, global_per_second)
        self._max_attempts = max(1, max_attempts)
        self._max_retry_after = max_retry_after
        self._send_timeout = send_timeout
        self._control_timeout = control_timeout
        self._lock = asyncio.Lock()
        self._subscription: Subscription | None = None
        self._idle = True
        self._progress = asyncio.Event()
        self._dropped = 0
        self.messages_sent = 0
        self.lines_sent = 0
        self.retry_after_waits = 0

    def subscribe(self, bus: EventBus) -> Subscription:
        """The bounded subscription `run()` reads: only wanted kinds, at most `max_queue` waiting."""
        return self.subscribe_to(bus, self.settings, self._max_queue)

    @staticmethod
    def subscribe_to(bus: EventBus, settings: AlertSettings, max_queue: int = ALERT_QUEUE) -> Subscription:
        """The same subscription before the sender exists (the daemon listens from its first start-up
        stage, Telegram comes up in its last)."""
        return bus.subscribe("alerts", maxsize=max_queue, kinds=settings.kinds)

    @property
    def dropped(self) -> int:
        """Alert deliveries lost, one per chat: lines that could not be sent, plus the events the full
        queue refused (each would have gone to every chat). So `lines_sent + dropped` accounts for
        every alert-worthy event times the number of chats."""
        refused = self._subscription.dropped if self._subscription is not None else 0
        return self._dropped + refused * len(self._chat_ids)

    async def drain(self, timeout: float) -> bool:
        """Wait (bounded) until everything queued has been delivered or dropped; for a graceful stop,
        so the final portfolio and 'stopping' alerts go out before the sender is cancelled."""

        async def _until_idle() -> None:
            while not (self._idle and (self._subscription is None or self._subscription.queue.empty())):
                self._progress.clear()
                await self._progress.wait()

        try:
            await self._clock.wait_for(_until_idle(), timeout)
        except TimeoutError:
            return False
        return True

    async def run(self, subscription: Subscription) -> None:
        self._subscription = subscription
        while True:
            self._idle = True
            self._progress.set()
            try:
                first = await subscription.get()
            finally:
                self._idle = False
            try:
                if self._coalesce > 0:
                    await self._clock.sleep(self._coalesce)
                events = [first]
                while len(events) < self._max_queue:
                    try:
                        events.append(subscription.queue.get_nowait())
                    except asyncio.QueueEmpty:
                        break
                await self._deliver_events(events)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alert batch failed; going on")

    async def _deliver_events(self, events: list[Event]) -> None:
        lines: list[str] = []
        for event in events:
            if not self.settings.wants(event):
                continue
            try:
                line = format_event(event)
            except Exception:
                log.exception("alert formatting failed", kind=event.kind)
                self._dropped += max(1, len(self._chat_ids))
                continue
            if line is not None:
                lines.append(line)
        if lines:
            await self._deliver_lines(lines)

    async def send_text(self, text: str) -> None:
        """Deliver one text (e.g. the daily summary) through the same pacing; never raises."""
        try:
            await self._deliver_lines([text])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("alert text failed")

    async def _deliver_lines(self, lines: list[str]) -> None:
        batches = self._pack(lines)
        async with self._lock:
            failed: set[int] = set()
            for batch in batches:
                for chat_id in self._chat_ids:
                    # Once a chat failed all its attempts, the rest of this batch is dropped for it at
                    # once: a long outage then costs one retry cycle per batch, not one per message.
                    if chat_id not in failed and await self._deliver(chat_id, batch.text):
                        self.messages_sent += 1
                        self.lines_sent += batch.events
                    else:
                        failed.add(chat_id)
                        self._dropped += batch.events

    def _pack(self, lines: list[str]) -> list[_Batch]:
        """Split into messages, remembering how many alert lines each carries (for drop counts)."""
        batches: list[_Batch] = []
        current: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                batches.append(_Batch("\n".join(current), len(current)))
            current, size = [], 0

        for line in lines:
            if len(line) > self._max_chars:
                flush()
                pieces = split_message([line], self._max_chars)
                batches.extend(_Batch(p, 0) for p in pieces[:-1])
                batches.append(_Batch(pieces[-1], 1))
                continue
            if current and size + 1 + len(line) > self._max_chars:
                flush()
            size += len(line) + (1 if current else 0)
            current.append(line)
        flush()
        return batches

    async def _deliver(self, chat_id: int, text: str) -> bool:
        attempts = 0
        flood_waits = 0
        while True:
            await self._pacer.turn(chat_id)
            try:
                await self._clock.wait_for(self._send(chat_id, text), self._send_timeout)
                return True
            except asyncio.CancelledError:
                raise
            except RetryAfter as exc:
                wait = retry_after_seconds(exc)
                flood_waits += 1
                self.retry_after_waits += 1
                self._pacer.block(wait)
                if flood_waits > self._max_retry_after:
                    log.error("telegram keeps rate limiting; alert dropped", chat_id=chat_id, retry_after=wait)
                    return False
                log.warning("telegram rate limit; waiting", chat_id=chat_id, retry_after=wait)
            except ChatMigrated as exc:
                log.error("alert chat migrated; update TELEGRAM_CHAT_IDS", chat_id=chat_id,
                          new_chat_id=exc.new_chat_id)
                return False
            except (BadRequest, Forbidden, InvalidToken) as exc:
                # Retrying cannot help: the bot was removed, the chat is wrong, or the text is refused.
                log.error("telegram refused alert", chat_id=chat_id, error=f"{type(exc).__name__}: {exc}")
                return False
            except Exception as exc:
                attempts += 1
                if attempts >= self._max_attempts:
                    log.warning("alert not delivered; dropped", chat_id=chat_id, attempts=attempts,
                                error=f"{type(exc).__name__}: {exc}")
                    return False
                backoff = min(30.0, 2.0 ** (attempts - 1))
                log.info("alert send failed; retrying", chat_id=chat_id, attempt=attempts, backoff=backoff,
                         error=f"{type(exc).__name__}: {exc}")
                await self._clock.sleep(backoff)

    async def run_daily_summary(self, control: Control) -> None:
        """At the configured HH:MM UTC each day, send status and today's P&L. Returns at once if off."""
        at = self.settings.daily_summary_at
        if at is None:
            return
        hour, minute = at
        while True:
            now = self._clock.now()
            target = next_daily_at(now, hour, minute)
            await self._clock.sleep(target - now)
            if self._clock.now() < target:
                continue  # woke early (clock adjusted): sleep the rest
            try:
                text = await self._clock.wait_for(
                    build_daily_summary(control, self._clock.now()), self._control_timeout
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("daily summary could not be built", error=f"{type(exc).__name__}: {exc}")
                text = f"📅 Daily summary unavailable: {type(exc).__name__}"
            await self.send_text(text)
