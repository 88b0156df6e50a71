"""The portfolio-wide circuit breaker: daily loss, drawdown and the kill switch.

Pure on purpose: the caller feeds it equity and a time, gets back the transitions to publish, and
persists `state.to_dict()` after each one, so a restart forgets neither a trip nor the day's baseline.
No clock is read here, which is also what lets a backtest drive it with simulated time.

Percentages are compared by cross-multiplying (`loss * 100 >= limit * base`) instead of dividing, so
"trip exactly at the threshold, not a cent before" holds without division rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from config import Settings
from core.clock import start_of_utc_day
from core.types import ZERO, TradingState
from core.values import value_type

HUNDRED = Decimal(100)

TRIP_DAILY_LOSS = "daily_loss"
TRIP_DRAWDOWN = "drawdown"
TRIP_KILL_SWITCH = "kill_switch"
TRIP_MANUAL = "manual"


@value_type
class RiskLimits:
    max_daily_loss_pct: Decimal
    max_drawdown_pct: Decimal
    cooldown_seconds: float
    kill_switch_loss_pct: Decimal
    flatten_on_trip: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RiskLimits:
        return cls(
            max_daily_loss_pct=Decimal(str(settings.global_max_daily_loss_pct)),
            max_drawdown_pct=Decimal(str(settings.global_max_drawdown_pct)),
            cooldown_seconds=settings.global_circuit_breaker_cooldown_minutes * 60.0,
            kill_switch_loss_pct=Decimal(str(settings.global_kill_switch_loss_pct)),
            flatten_on_trip=settings.global_flatten_on_trip,
        )


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _names(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(sorted(str(v) for v in value))


@dataclass(slots=True)
class RiskState:
    """Everything the breaker must remember across a restart.

    Equity baselines are None until the first `update()`: a fresh daemon has not measured anything.
    `trip` says why the breaker is open (daily_loss, drawdown, kill_switch, manual), because what
    happens when the cooldown ends depends on it.
    """

    trading_state: TradingState = TradingState.ACTIVE
    reason: str = ""
    until: float | None = None
    initial_equity: Decimal | None = None
    day_start: float | None = None
    day_start_equity: Decimal | None = None
    peak_equity: Decimal | None = None
    tripped_at: float | None = None
    trip: str = ""
    # The engines whose equity the baselines add up (None: not known, a snapshot from before it was kept).
    engines: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: Decimals as strings (exact), the state as its value."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Decimal):
                value = str(value)
            elif isinstance(value, TradingState):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiskState:
        """Inverse of to_dict; keys missing from an older snapshot take their defaults."""
        return cls(
            trading_state=TradingState(data.get("trading_state", TradingState.ACTIVE.value)),
            reason=str(data.get("reason", "")),
            until=_float(data.get("until")),
            initial_equity=_dec(data.get("initial_equity")),
            day_start=_float(data.get("day_start")),
            day_start_equity=_dec(data.get("day_start_equity")),
            peak_equity=_dec(data.get("peak_equity")),
            tripped_at=_float(data.get("tripped_at")),
            trip=str(data.get("trip", "")),
            engines=_names(data.get("engines")),
        )


@value_type
class Transition:
    """A change the caller must publish (TradingStateChanged) and persist.

    `old == new == REDUCING` means the cooldown was extended. `flatten` asks the caller to close every
    position: on a trip when flatten_on_trip is set, and always for the kill switch.
    """

    old: TradingState
    new: TradingState
    reason: str
    until: float | None
    flatten: bool = False


def _check_base(equity: Decimal) -> None:
    """A re-base needs a real account value: with a base of zero or less no loss ever reaches a limit, so
    the daily limit (for the day) or the kill switch (until the next resume) would be off in silence."""
    if not equity.is_finite() or equity <= 0:
        raise ValueError(f"equity must be a positive number to re-base the breaker on, got {equity}")


def _reached(loss: Decimal, limit_pct: Decimal, base: Decimal | None) -> bool:
    """loss / base * 100 >= limit_pct, exactly. A base of zero or less has no percentage to lose."""
    if base is None or base <= 0:
        return False
    return loss * HUNDRED >= limit_pct * base


def _pct(part: Decimal, base: Decimal | None) -> Decimal:
    if base is None or base <= 0:
        return ZERO
    return part * HUNDRED / base


class GlobalRiskMonitor:
    def __init__(self, limits: RiskLimits, state: RiskState | None = None) -> None:
        self._limits = limits
        self._s = dataclasses.replace(state) if state is not None else RiskState()

    # --- read-only views -------------------------------------------------------------------------
    @property
    def limits(self) -> RiskLimits:
        return self._limits

    @property
    def state(self) -> RiskState:
        """A copy to persist or show; changing it does not change the monitor."""
        return dataclasses.replace(self._s)

    @property
    def trading_state(self) -> TradingState:
        return self._s.trading_state

    def daily_pnl(self, equity: Decimal) -> Decimal:
        base = self._s.day_start_equity
        return ZERO if base is None else equity - base

    def daily_pnl_pct(self, equity: Decimal) -> Decimal:
        return _pct(self.daily_pnl(equity), self._s.day_start_equity)

    def drawdown_pct(self, equity: Decimal) -> Decimal:
        peak = self._s.peak_equity
        if peak is None or equity >= peak:
            return ZERO
        return _pct(peak - equity, peak)

    # --- the breaker -----------------------------------------------------------------------------
    def update(self, now: float, equity_by_engine: Mapping[str, Decimal]) -> list[Transition]:
        """Measure the combined equity at `now`; returns the transitions it caused (often none).

        An empty mapping measures nothing and decides nothing: no engine reporting is not a loss.
        """
        if not equity_by_engine:
            return []
        equity = sum(equity_by_engine.values(), ZERO)
        if not equity.is_finite():
            raise ValueError(f"equity must be finite, got {equity}")
        if not self._rebase_on_engine_change(now, equity_by_engine):
            return []  # another set of engines, with nothing to measure it from yet: nothing to judge
        self._track(now, equity)
        s = self._s
        if s.trading_state is TradingState.HALTED:
            return []  # only a person ends a halt (resume)
        total_loss = self._loss(s.initial_equity, equity)
        kill_pct = self._limits.kill_switch_loss_pct
        if _reached(total_loss, kill_pct, s.initial_equity):
            shown = _pct(total_loss, s.initial_equity)
            reason = f"kill switch: total loss {shown:.2f}% reached {kill_pct}%"
            return [self._halt(now, reason, TRIP_KILL_SWITCH)]
        if s.trading_state is TradingState.REDUCING:
            return self._after_cooldown(now, equity)
        trip = self._breach(equity)
        if trip is None:
            return []
        kind, reason = trip
        return [self._trip(now, kind, reason, flatten=self._limits.flatten_on_trip)]

    def engine_change(self, equity_by_engine: Mapping[str, Decimal]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(before, now) when these engines are not the ones the baselines were measured on, which the
        next `update` re-bases for; None otherwise. For the caller to tell the owner."""
        names = tuple(sorted(equity_by_engine))
        before = self._s.engines
        if before is None or not self._other_engines(names) or sum(equity_by_engine.values(), ZERO) <= 0:
            return None  # the same engines, or no base to start again from yet (see below)
        return before, names

    def _other_engines(self, names: tuple[str, ...]) -> bool:
        """The baselines were measured on another set of engines (not known for an older snapshot)."""
        s = self._s
        return s.engines is not None and s.engines != names and s.initial_equity is not None

    def _rebase_on_engine_change(self, now: float, equity_by_engine: Mapping[str, Decimal]) -> bool:
        """An engine turned off (or on) takes its wallet out of (or into) the measured equity. That is
        neither a loss nor a gain: left alone, turning futures off would read as losing its share and
        could fire the kill switch and flatten everything. The baselines start again from this equity,
        as a resume does; the trading state, a cooldown and a halt stay as they are. Not on an equity of
        zero or less (an empty wallet at the restart): that base would switch the limits off, so the old
        engines and baselines stay until the new set has a positive figure, and until then nothing is
        judged (the old baselines measure other wallets). False in that case."""
        names = tuple(sorted(equity_by_engine))
        if self._other_engines(names):
            equity = sum(equity_by_engine.values(), ZERO)
            if equity <= 0:
                return False
            self._rebase(now, equity)
            self._s.initial_equity = equity
        self._s.engines = names
        return True

    def _track(self, now: float, equity: Decimal) -> None:
        s = self._s
        day = start_of_utc_day(now)
        if s.initial_equity is None:
            s.initial_equity = equity
        if s.day_start is None or s.day_start_equity is None or day > s.day_start:
            s.day_start = day
            s.day_start_equity = equity
        if s.peak_equity is None or equity > s.peak_equity:
            s.peak_equity = equity

    @staticmethod
    def _loss(base: Decimal | None, equity: Decimal) -> Decimal:
        return ZERO if base is None else base - equity

    def _breach(self, equity: Decimal) -> tuple[str, str] | None:
        """Which limit the equity is at or beyond. Daily loss wins a tie: it is the stricter trip,
        since it does not end with the cooldown while the same day's loss persists."""
        s, lim = self._s, self._limits
        day_loss = self._loss(s.day_start_equity, equity)
        if _reached(day_loss, lim.max_daily_loss_pct, s.day_start_equity):
            pct = _pct(day_loss, s.day_start_equity)
            return TRIP_DAILY_LOSS, f"daily loss {pct:.2f}% reached limit {lim.max_daily_loss_pct}%"
        drawdown = self._loss(s.peak_equity, equity)
        if _reached(drawdown, lim.max_drawdown_pct, s.peak_equity):
            pct = _pct(drawdown, s.peak_equity)
            return TRIP_DRAWDOWN, f"drawdown {pct:.2f}% reached limit {lim.max_drawdown_pct}%"
        return None

    def _after_cooldown(self, now: float, equity: Decimal) -> list[Transition]:
        """End of a REDUCING cooldown.

        A drawdown trip re-bases the peak to today's equity and trading resumes: the drawdown has been
        taken and acknowledged by sitting out the cooldown. A daily-loss trip is the careful case: while
        the same UTC day's loss is still at or beyond the limit, trading stays REDUCING for another
        cooldown (the day's budget for losses is spent; a new UTC day rolls the baseline and frees it).
        If a limit is still breached after that, the breaker stays open for another cooldown.
        """
        s = self._s
        if s.until is not None and now < s.until:
            return []
        if s.trip == TRIP_DRAWDOWN:
            s.peak_equity = equity
        still = self._breach(equity)
        if still is not None:
            kind, reason = still
            s.trip = kind
            s.reason = f"{reason}; cooldown extended"
            s.until = now + self._limits.cooldown_seconds
            return [Transition(TradingState.REDUCING, TradingState.REDUCING, s.reason, s.until, False)]
        return [self._activate(f"cooldown over after {s.trip or 'trip'}")]

    def _trip(self, now: float, kind: str, reason: str, *, flatten: bool) -> Transition:
        s = self._s
        old = s.trading_state
        s.trading_state = TradingState.REDUCING
        s.reason = reason
        s.until = now + self._limits.cooldown_seconds
        s.tripped_at = now
        s.trip = kind
        return Transition(old, TradingState.REDUCING, reason, s.until, flatten)

    def _halt(self, now: float, reason: str, kind: str) -> Transition:
        s = self._s
        old = s.trading_state
        s.trading_state = TradingState.HALTED
        s.reason = reason
        s.until = None
        s.tripped_at = now
        s.trip = kind
        return Transition(old, TradingState.HALTED, reason, None, True)

    def _activate(self, reason: str) -> Transition:
        s = self._s
        old = s.trading_state
        s.trading_state = TradingState.ACTIVE
        s.reason = reason
        s.until = None
        s.trip = ""
        return Transition(old, TradingState.ACTIVE, reason, None, False)

    def _rebase(self, now: float, equity: Decimal) -> None:
        s = self._s
        s.day_start = start_of_utc_day(now)
        s.day_start_equity = equity
        s.peak_equity = equity

    # --- commands from a person ------------------------------------------------------------------
    def kill(self, now: float, reason: str) -> Transition:
        """/kill: HALTED and flatten, also when already halted (a second /kill flattens again)."""
        return self._halt(now, reason or "killed", TRIP_MANUAL)

    def resume(self, now: float, equity: Decimal) -> Transition | None:
        """A person resumes trading from HALTED or REDUCING; None when already ACTIVE.

        The peak, the day's baseline and the kill switch's base all start again from `equity`: the
        person has seen the losses and accepted them, and without the re-base the very next update
        would trip again on the same loss.
        """
        if self._s.trading_state is TradingState.ACTIVE:
            return None
        _check_base(equity)
        self._rebase(now, equity)
        self._s.initial_equity = equity
        return self._activate("resumed manually")

    def reset_breaker(self, now: float, equity: Decimal) -> Transition | None:
        """/breaker_reset: REDUCING -> ACTIVE before the cooldown ends. A halt needs resume().

        Re-bases the peak and the day's baseline (not the kill switch's base, which only resume moves).
        """
        if self._s.trading_state is not TradingState.REDUCING:
            return None
        _check_base(equity)
        self._rebase(now, equity)
        return self._activate("breaker reset manually")
