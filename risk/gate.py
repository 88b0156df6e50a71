"""The one synchronous pre-trade check every order passes right before it is submitted.

Synchronous and allocation-light on purpose: it runs on the event loop in the order path, so it does
no I/O and no logging (the caller publishes OrderDenied with the reason). A denial is a value, not an
exception, because being told no is a normal outcome for an engine.

Order of the rules matters: exits are decided before anything that could block them, so a paused
engine or a tripped breaker can always still close positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from core.types import OrderIntent, TradingState
from core.values import value_type
from risk.allocator import CapitalAllocator, Reservation
from risk.monitor import GlobalRiskMonitor

_HALTED = TradingState.HALTED
_REDUCING = TradingState.REDUCING


@value_type
class EngineLimits:
    max_positions: int
    max_leverage: int = 1


@value_type
class GateDecision:
    """`reservation` is set only for an allowed entry; the caller releases it on fill or cancel.

    `rule` names the rule that decided, and stays the same while the `reason` text carries figures that
    change from one intent to the next ("budget exhausted: needs ..."): a caller tells a run of the
    same denial (a tripped breaker refusing every entry signal for an hour) by it."""

    allowed: bool
    reason: str
    reservation: Reservation | None = None
    rule: str = "ok"


# Shared instances for the common answers: no allocation on the hot path for them.
_FLATTEN_OK = GateDecision(True, "system flatten", rule="flatten")
_EXIT_OK = GateDecision(True, "reduce-only", rule="reduce-only")
_HALTED_NO = GateDecision(False, "trading halted: only the system's own flattening passes", rule="halted")
_REDUCING_NO = GateDecision(False, "breaker tripped (reducing): only reduce-only orders pass", rule="reducing")
_PAUSED_NO = GateDecision(False, "engine paused", rule="paused")
_NO_LIMITS = GateDecision(False, "no limits configured for this engine", rule="no-limits")
_BAD_AMOUNT = GateDecision(False, "amount must be positive", rule="amount")
_BAD_NOTIONAL = GateDecision(False, "notional must be positive", rule="notional")


class RiskGate:
    def __init__(
        self,
        monitor: GlobalRiskMonitor,
        allocator: CapitalAllocator,
        limits: Mapping[str, EngineLimits],
    ) -> None:
        self._monitor = monitor
        self._allocator = allocator
        self._limits = dict(limits)
        self._paused: set[str] = set()

    def set_paused(self, engine: str, paused: bool) -> None:
        """Paused engines take no new entries; their exits still pass (positions stay managed)."""
        if paused:
            self._paused.add(engine)
        else:
            self._paused.discard(engine)

    def is_paused(self, engine: str) -> bool:
        return engine in self._paused

    def engine_exits_pass(self) -> bool:
        """False while HALTED: only the system's flattening trades then, so an engine must not start an
        exit of its own. Its first step (cancelling the protective stop) would pass, the sell and the
        stop's replacement would not, and the position would be left with no stop at all."""
        return self._monitor.trading_state is not _HALTED

    def check(
        self, intent: OrderIntent, *, equity: Decimal, open_positions: int, has_position: bool
    ) -> GateDecision:
        """Allow or deny `intent`; an allowed entry comes with its capital reservation.

        `open_positions` and `has_position` are the engine's own book: adding to a position it already
        holds is not a new position, so max_positions does not block it.
        """
        state = self._monitor.trading_state
        if state is _HALTED:
            return _FLATTEN_OK if intent.system_flatten else _HALTED_NO
        # The system's flattening is an exit too, whatever the state.
        if intent.reduce_only or intent.system_flatten:
            return _FLATTEN_OK if intent.system_flatten else _EXIT_OK
        if state is _REDUCING:
            return _REDUCING_NO
        engine = intent.engine
        if engine in self._paused:
            return _PAUSED_NO
        limits = self._limits.get(engine)
        if limits is None:
            return _NO_LIMITS
        if not has_position and open_positions >= limits.max_positions:
            return GateDecision(False, f"max positions reached ({open_positions}/{limits.max_positions})",
                                rule="max-positions")
        leverage = 1 if intent.leverage is None else intent.leverage
        if leverage > limits.max_leverage:
            return GateDecision(False, f"leverage {leverage}x above the engine's max {limits.max_leverage}x",
                                rule="leverage")
        if leverage < 1:
            return GateDecision(False, f"leverage {leverage}x is not valid", rule="leverage")
        amount = intent.amount
        if not amount.is_finite() or amount <= 0:
            return _BAD_AMOUNT
        notional = intent.notional
        if not notional.is_finite() or notional <= 0:
            return _BAD_NOTIONAL
        reservation = self._allocator.reserve(engine, notional, equity)
        if reservation is None:
            available = self._allocator.available(engine, equity)
            return GateDecision(False, f"budget exhausted: needs {notional}, {available:.2f} available",
                                rule="budget")
        return GateDecision(True, "ok", reservation)
