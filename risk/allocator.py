"""How much of the portfolio each engine may put at risk, and reservations so it cannot overspend.

An engine reserves an order's notional before it sends the order and releases it on fill or cancel.
The allocator counts what is held (exposure, set by the caller after every fill) plus what is in
flight (reservations), so two intents that pass the gate at the same time cannot together spend more
than the engine's budget. Every method is synchronous and the daemon has one event loop, so a check
and its reservation cannot be interleaved with another engine's.

Budgets are rounded down (never up): the sum of the engines' budgets never exceeds the equity.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from decimal import ROUND_FLOOR, Context, Decimal

from core.errors import ConfigError
from core.types import ZERO
from core.values import value_type

HUNDRED = Decimal(100)

# Rounds toward minus infinity: shares and budgets come out a hair low rather than a hair high, so
# rounding can never hand out more than the equity.
_FLOOR = Context(prec=34, rounding=ROUND_FLOOR)


@value_type
class Reservation:
    """Notional set aside for one intent until its order fills or is cancelled."""

    id: int
    engine: str
    notional: Decimal


def _validate(allocations: Mapping[str, float], enabled: Collection[str]) -> list[str]:
    problems: list[str] = []
    for engine, pct in allocations.items():
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct <= 100:
            # NaN fails the range test too, since every comparison with NaN is false.
            problems.append(f"{engine.upper()}_ALLOCATION_PCT: {pct!r} must be between 0 and 100")
    if not problems:
        total = sum((_pct(p) for p in allocations.values()), ZERO)
        if total > HUNDRED:
            shown = " + ".join(f"{name.upper()}_ALLOCATION_PCT ({p:g})" for name, p in allocations.items())
            problems.append(f"{shown} = {total.normalize():f}, must be at most 100")
    problems.extend(
        f"{engine.upper()}_ALLOCATION_PCT: engine {engine!r} is enabled but has no allocation"
        for engine in enabled
        if engine not in allocations
    )
    return problems


def _pct(value: float) -> Decimal:
    # Through str so 33.3 is 33.3, not 33.29999999999999715782905696.
    return Decimal(str(value))


class CapitalAllocator:
    """Effective shares per engine, fixed at construction; reservations and exposure change at runtime."""

    def __init__(self, allocations: Mapping[str, float], enabled: Collection[str]) -> None:
        problems = _validate(allocations, enabled)
        if problems:
            raise ConfigError(problems)
        self._configured = {engine: _pct(p) for engine, p in allocations.items()}
        self._enabled = frozenset(enabled)
        self._shares = self._effective_shares()
        # Fraction of equity (share / 100), precomputed because budget() is on the gate's hot path.
        self._fractions = {e: _FLOOR.divide(s, HUNDRED) for e, s in self._shares.items()}
        self._exposure: dict[str, Decimal] = {}
        self._reserved: dict[str, Decimal] = {}
        self._live: dict[int, Reservation] = {}
        self._open: dict[str, int] = {}
        self._ids = itertools.count(1)

    def _effective_shares(self) -> dict[str, Decimal]:
        """A disabled engine's share goes to the enabled ones in proportion to their own pct.

        The unallocated rest (100 - sum) is deliberately not handed out: a user who leaves 20 % free
        means it to stay free whichever engines run.
        """
        enabled = [e for e in self._configured if e in self._enabled]
        shares = dict.fromkeys(self._configured, ZERO)
        if not enabled:
            return shares
        freed = sum((p for e, p in self._configured.items() if e not in self._enabled), ZERO)
        own_total = sum((self._configured[e] for e in enabled), ZERO)
        for engine in enabled:
            own = self._configured[engine]
            if own_total > 0:
                extra = _FLOOR.divide(_FLOOR.multiply(freed, own), own_total)
            else:
                extra = _FLOOR.divide(freed, Decimal(len(enabled)))
            shares[engine] = own + extra
        return shares

    # --- shares and budgets ----------------------------------------------------------------------
    def share_pct(self, engine: str) -> Decimal:
        """Effective percentage of equity for `engine`; 0 for a disabled or unknown engine."""
        return self._shares.get(engine, ZERO)

    def budget(self, engine: str, equity: Decimal) -> Decimal:
        """The most notional `engine` may hold plus have in flight, given the portfolio's equity."""
        fraction = self._fractions.get(engine)
        if fraction is None or not equity.is_finite() or equity <= 0:
            return ZERO
        return _FLOOR.multiply(equity, fraction)

    @property
    def enabled(self) -> frozenset[str]:
        return self._enabled

    # --- exposure and reservations ---------------------------------------------------------------
    def set_exposure(self, engine: str, notional: Decimal) -> None:
        """Notional held in open positions, as the ledger says after every fill."""
        if not notional.is_finite() or notional < 0:
            raise ValueError(f"exposure of {engine!r} must be a finite non-negative amount, got {notional}")
        self._exposure[engine] = notional

    def exposure(self, engine: str) -> Decimal:
        return self._exposure.get(engine, ZERO)

    def reserved(self, engine: str) -> Decimal:
        return self._reserved.get(engine, ZERO)

    def available(self, engine: str, equity: Decimal) -> Decimal:
        """What a new reservation could still take; never negative (an over-exposed engine has 0)."""
        free = self.budget(engine, equity) - self.exposure(engine) - self.reserved(engine)
        return free if free > 0 else ZERO

    def reserve(self, engine: str, notional: Decimal, equity: Decimal) -> Reservation | None:
        """Set `notional` aside, or None when the budget cannot cover it (or it is not a positive amount)."""
        if not notional.is_finite() or notional <= 0:
            return None
        reserved = self._reserved.get(engine, ZERO)
        if self._exposure.get(engine, ZERO) + reserved + notional > self.budget(engine, equity):
            return None
        reservation = Reservation(next(self._ids), engine, notional)
        self._live[reservation.id] = reservation
        self._reserved[engine] = reserved + notional
        self._open[engine] = self._open.get(engine, 0) + 1
        return reservation

    def release(self, reservation: Reservation) -> None:
        """Give the notional back. Idempotent: a fill and a cancel racing for one order release once."""
        live = self._live.pop(reservation.id, None)
        if live is None:
            return
        count = self._open[live.engine] - 1
        self._open[live.engine] = count
        # With nothing left in flight the total is exactly zero, whatever rounding a long run of
        # additions and subtractions might have accumulated.
        self._reserved[live.engine] = self._reserved[live.engine] - live.notional if count else ZERO

    def open_reservations(self, engine: str) -> int:
        return self._open.get(engine, 0)
