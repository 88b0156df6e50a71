"""The futures engine's risk decisions, as pure functions: pre-trade checks, leverage, size, exits.

Nothing here reads a clock, the ledger or the network, so each rule is tested on its own (property
tests) and the engine is only the plumbing around them. Money is Decimal throughout; the only floats
are indicator readings (confidence, ATR %, returns).

Definitions the rest of the engine relies on:

- **Engine equity**: the futures engine's budget, `CapitalAllocator.budget("futures", equity)`, i.e.
  its share of the portfolio. Limits in percent of "the engine's equity" use it.
- **Margin** of a position: notional at entry / leverage. This is what an entry reserves from the
  allocator (`OrderIntent.notional`) and what the engine reports as its exposure, so the allocator's
  budget caps the margin in use, not the leveraged notional.
- **Size**: the loss at the stop is `risk_per_trade_pct` of engine equity, scaled by confidence/100:
  notional = equity x risk% x confidence/100 / stop distance. The *margin* of one position is capped at
  `max_position_pct` (25%) of engine equity. The amount is rounded down to the market's step; below
  the market's minimum amount or notional the trade is skipped, never rounded up.
- **Price moves** (+1.5%, -4%, ...) are percent of the entry price before leverage, as
  `Position.pnl_pct` measures them.
- **Correlation**: Pearson correlation of 1h log returns over the last `correlation_bars` bars the
  two symbols have in common (aligned on open time). A held position counts as correlated with a
  candidate when that correlation is at least the threshold, whatever the two directions (a hedge is
  not assumed). A pair without enough common history is not counted.
- **Daily P&L** of the engine: mark-to-market value now (realized P&L of every trade plus unrealized
  P&L of open positions net of their fees) minus the same at the start of the UTC day, against the
  engine equity at the start of the day (both persisted, so a restart keeps the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal, localcontext

import numpy as np

from core.types import ZERO, FloatArray, MarketInfo, PositionSide
from core.values import value_type
from exchange.base import quantize_down

HUNDRED = Decimal(100)

# Sizing arithmetic: enough digits that products of realistic amounts and prices are exact; the two
# divisions round in the safe direction (amount down, margin up).
_FLOOR = Context(prec=50, rounding=ROUND_FLOOR)
_CEILING = Context(prec=50, rounding=ROUND_CEILING)


def pct(value: float | str | Decimal) -> Decimal:
    """A setting's float as the Decimal a person typed (1.5, not 1.5000000000000000000000001)."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


# --- pre-trade checks -----------------------------------------------------------------------------------


@value_type
class EntryLimits:
    max_positions: int = 12
    max_margin_use_pct: Decimal = Decimal(90)
    max_daily_loss_pct: Decimal = Decimal(5)
    max_correlated: int = 3


@value_type
class BookView:
    """The engine's book as the checks see it. `correlated` are the held symbols correlated with the
    candidate (see `correlated_symbols`)."""

    open_positions: int
    margin_used: Decimal
    equity: Decimal
    day_pnl: Decimal
    day_start_equity: Decimal
    correlated: tuple[str, ...] = ()


@value_type
class CheckResult:
    reasons: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "ok"


def daily_loss_reached(day_pnl: Decimal, base: Decimal, limit_pct: Decimal) -> bool:
    """Loss of at least `limit_pct` of `base`. Cross-multiplied (no division), so the limit trips
    exactly at the threshold. Without a positive base nothing can be measured: not reached."""
    if base <= 0:
        return False
    return -day_pnl * HUNDRED >= limit_pct * base


def pre_trade_checks(book: BookView, new_margin: Decimal, limits: EntryLimits) -> CheckResult:
    """Every check runs and reports on its own, so a denial lists all the limits in the way."""
    reasons: list[str] = []
    if book.open_positions >= limits.max_positions:
        reasons.append(f"max positions reached ({book.open_positions}/{limits.max_positions})")
    if book.equity <= 0:
        reasons.append("no engine equity to trade with")
    elif (book.margin_used + new_margin) * HUNDRED >= limits.max_margin_use_pct * book.equity:
        use = (book.margin_used + new_margin) / book.equity * HUNDRED
        reasons.append(f"margin use would be {use:.1f}% (limit: under {limits.max_margin_use_pct}%)")
    if daily_loss_reached(book.day_pnl, book.day_start_equity, limits.max_daily_loss_pct):
        loss = -book.day_pnl / book.day_start_equity * HUNDRED
        reasons.append(f"daily loss {loss:.2f}% reached the limit of {limits.max_daily_loss_pct}%")
    if len(book.correlated) >= limits.max_correlated:
        reasons.append(f"{len(book.correlated)} correlated positions already held "
                       f"({', '.join(book.correlated)}; limit {limits.max_correlated})")
    return CheckResult(tuple(reasons))


# --- correlation ----------------------------------------------------------------------------------------


@value_type
class Closes:
    """1h closes of one symbol with their open times (seconds)."""

    ts: FloatArray
    close: FloatArray


def aligned_log_returns(a: Closes, b: Closes, bars: int) -> tuple[FloatArray, FloatArray] | None:
    """Log returns of both over their last `bars` common bars, or None without enough clean data."""
    common, ia, ib = np.intersect1d(a.ts, b.ts, assume_unique=True, return_indices=True)
    if len(common) < bars + 1:
        return None
    ia, ib = ia[-bars - 1 :], ib[-bars - 1 :]
    ca, cb = a.close[ia], b.close[ib]
    if not (np.isfinite(ca).all() and np.isfinite(cb).all() and (ca > 0).all() and (cb > 0).all()):
        return None
    return np.diff(np.log(ca)), np.diff(np.log(cb))


def pearson(x: FloatArray, y: FloatArray) -> float | None:
    """Pearson correlation, or None when either side does not vary (no correlation to speak of)."""
    if len(x) != len(y) or len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    if den == 0.0 or not math.isfinite(den):
        return None
    return max(-1.0, min(1.0, float(np.dot(dx, dy)) / den))


def correlation(a: Closes, b: Closes, bars: int) -> float | None:
    pair = aligned_log_returns(a, b, bars)
    return None if pair is None else pearson(*pair)


def correlated_symbols(candidate: Closes | None, held: Mapping[str, Closes | None], bars: int,
                       threshold: float) -> tuple[str, ...]:
    """Held symbols whose correlation with the candidate is at least `threshold` (sorted)."""
    if candidate is None:
        return ()
    out = []
    for symbol, closes in held.items():
        if closes is None:
            continue
        rho = correlation(candidate, closes, bars)
        if rho is not None and rho >= threshold:
            out.append(symbol)
    return tuple(sorted(out))


# --- leverage -------------------------------------------------------------------------------------------


@value_type
class LeverageTier:
    min_confidence: float
    leverage: int


@value_type
class LeveragePolicy:
    """Tiers from the highest confidence down; below every tier, `floor` (low confidence -> 3x)."""

    tiers: tuple[LeverageTier, ...] = (LeverageTier(85, 10), LeverageTier(75, 7), LeverageTier(65, 5))
    floor: int = 3
    max_leverage: int = 10
    high_volatility_atr_pct: float = 3.0

    def __post_init__(self) -> None:
        if self.floor < 1 or self.max_leverage < 1 or any(t.leverage < 1 for t in self.tiers):
            raise ValueError("leverage must be at least 1")
        confidences = [t.min_confidence for t in self.tiers]
        if confidences != sorted(confidences, reverse=True):
            raise ValueError("leverage tiers must go from the highest confidence down")


def leverage_for(confidence: float, atr_pct: float, policy: LeveragePolicy,
                 market_max: int | None = None) -> int:
    """The tier's leverage, capped at the configured (and the market's) maximum, then halved (rounded
    down, at least 1) when the ATR is above the high-volatility threshold. An ATR that cannot be
    read counts as high volatility."""
    leverage = policy.floor
    for tier in policy.tiers:
        if confidence >= tier.min_confidence:
            leverage = tier.leverage
            break
    cap = policy.max_leverage if market_max is None else min(policy.max_leverage, market_max)
    leverage = min(leverage, cap)
    if not math.isfinite(atr_pct) or atr_pct > policy.high_volatility_atr_pct:
        leverage //= 2
    return max(1, min(leverage, cap))


# --- size -----------------------------------------------------------------------------------------------


@value_type
class SizingParams:
    risk_per_trade_pct: Decimal = Decimal(1)
    max_position_pct: Decimal = Decimal(25)


@value_type
class Sizing:
    amount: Decimal
    notional: Decimal
    margin: Decimal
    leverage: int
    capped: bool


@value_type
class Skip:
    reason: str


def max_margin(equity: Decimal, params: SizingParams) -> Decimal:
    with localcontext(_FLOOR):
        return equity * params.max_position_pct / HUNDRED


def position_size(*, equity: Decimal, confidence: float, entry: Decimal, stop_distance: Decimal,
                  leverage: int, params: SizingParams, market: MarketInfo) -> Sizing | Skip:
    """Amount for one entry (see the module docstring), or why there is none."""
    if not equity.is_finite() or equity <= 0:
        return Skip("no engine equity")
    if not entry.is_finite() or entry <= 0 or not stop_distance.is_finite() or stop_distance <= 0:
        return Skip("entry and stop distance must be positive")
    if leverage < 1:
        return Skip(f"leverage {leverage} is not valid")
    if not math.isfinite(confidence) or confidence <= 0:
        return Skip("no confidence")
    scale = min(Decimal(1), Decimal(repr(float(confidence))) / HUNDRED)
    cap = max_margin(equity, params)
    with localcontext(_FLOOR):
        risk = equity * params.risk_per_trade_pct / HUNDRED * scale
        notional = risk * entry / stop_distance
        capped = notional > cap * leverage
        if capped:
            notional = cap * leverage
        amount = quantize_down(notional / entry, market.amount_step)
    if amount <= 0 or amount < market.min_amount:
        return Skip(f"amount {amount} below the market minimum {market.min_amount}")
    notional = amount * entry
    if notional < market.min_notional:
        return Skip(f"notional {notional} below the market minimum {market.min_notional}")
    with localcontext(_CEILING):
        margin = notional / leverage
    return Sizing(amount, notional, margin, leverage, capped)


def stop_towards_entry(stop: Decimal, side: PositionSide, step: Decimal) -> Decimal:
    """A stop rounded to the price step towards the entry, so rounding never widens the risk."""
    if step <= 0:
        return stop
    rounding = ROUND_CEILING if side is PositionSide.LONG else ROUND_FLOOR
    return (stop / step).to_integral_value(rounding=rounding) * step


def target_towards_entry(target: Decimal, side: PositionSide, step: Decimal) -> Decimal:
    """A take-profit rounded to the price step towards the entry (it triggers no later than planned)."""
    if step <= 0:
        return target
    rounding = ROUND_FLOOR if side is PositionSide.LONG else ROUND_CEILING
    return (target / step).to_integral_value(rounding=rounding) * step


# --- exits ----------------------------------------------------------------------------------------------


@value_type
class PartialRule:
    """Take `size_pct` of the position's initial amount once the price has moved `trigger_pct` in its
    favour. `label` is what the ledger remembers, so it must never change for a rule."""

    label: str
    trigger_pct: Decimal
    size_pct: Decimal


@value_type
class ExitParams:
    partials: tuple[PartialRule, ...] = (
        PartialRule("tp1", Decimal("1.5"), Decimal(40)),
        PartialRule("tp2", Decimal("2.5"), Decimal(30)),
    )
    trail_activation_pct: Decimal = Decimal("1.5")
    trail_distance_pct: Decimal = Decimal("1.0")
    trail_tighten_pct: Decimal = Decimal("3.0")
    trail_tight_distance_pct: Decimal = Decimal("0.5")
    force_close_pct: Decimal = Decimal("4.0")


# Keys of Position.meta this module owns.
META_INITIAL = "initial_amount"
META_PARTIALS = "partials"
META_BEST = "best_price"
META_TRAIL = "trailing_stop"


@value_type
class ExitState:
    """What the exit rules remember about one position, kept in the ledger position's `meta`."""

    initial_amount: Decimal
    partials_taken: frozenset[str] = frozenset()
    best_price: Decimal | None = None
    trailing_stop: Decimal | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, str], amount: Decimal) -> ExitState:
        """Read back what `to_meta` wrote; a position without it starts from its current amount."""
        initial = Decimal(meta[META_INITIAL]) if meta.get(META_INITIAL) else amount
        taken = frozenset(x for x in meta.get(META_PARTIALS, "").split(",") if x)
        best = Decimal(meta[META_BEST]) if meta.get(META_BEST) else None
        trail = Decimal(meta[META_TRAIL]) if meta.get(META_TRAIL) else None
        return cls(initial, taken, best, trail)

    def to_meta(self, meta: Mapping[str, str] | None = None) -> dict[str, str]:
        out = dict(meta or {})
        out[META_INITIAL] = str(self.initial_amount)
        out[META_PARTIALS] = ",".join(sorted(self.partials_taken))
        for key, value in ((META_BEST, self.best_price), (META_TRAIL, self.trailing_stop)):
            if value is None:
                out.pop(key, None)
            else:
                out[key] = str(value)
        return out


@value_type
class PartialTake:
    rule: PartialRule
    amount: Decimal  # 0: the partial cannot be executed (below the market minimum); mark it taken


@value_type
class ExitDecision:
    close_reason: str | None
    partials: tuple[PartialTake, ...]
    state: ExitState
    pnl_pct: Decimal


def move_pct(side: PositionSide, entry: Decimal, price: Decimal) -> Decimal:
    """Price move in the position's favour, in percent of entry (before leverage)."""
    if entry <= 0:
        return ZERO
    diff = (price - entry) / entry * HUNDRED
    return diff if side is PositionSide.LONG else -diff


def _better(side: PositionSide, a: Decimal, b: Decimal) -> Decimal:
    """The more favourable of two prices for the position."""
    return max(a, b) if side is PositionSide.LONG else min(a, b)


def _hit(side: PositionSide, price: Decimal, level: Decimal | None) -> bool:
    """The price reached a protective level (long: at or below; short: at or above)."""
    if level is None:
        return False
    return price <= level if side is PositionSide.LONG else price >= level


def _reached_target(side: PositionSide, price: Decimal, level: Decimal | None) -> bool:
    if level is None:
        return False
    return price >= level if side is PositionSide.LONG else price <= level


def trailing_level(side: PositionSide, entry: Decimal, best: Decimal, params: ExitParams) -> Decimal | None:
    """Where the trail sits for the best price seen: none before the activation move, then
    `trail_distance_pct` behind the best price, `trail_tight_distance_pct` from the tighten move on."""
    best_move = move_pct(side, entry, best)
    if best_move < params.trail_activation_pct:
        return None
    distance = params.trail_tight_distance_pct if best_move >= params.trail_tighten_pct else params.trail_distance_pct
    factor = distance / HUNDRED
    return best * (1 - factor) if side is PositionSide.LONG else best * (1 + factor)


def partial_amounts(state: ExitState, amount: Decimal, move: Decimal, params: ExitParams,
                    amount_step: Decimal, min_amount: Decimal) -> tuple[PartialTake, ...]:
    """The partials due at this move, in order, each once: `size_pct` of the initial amount rounded
    down, never more than what is left. A remainder too small to trade afterwards is included in the
    partial (the position could otherwise never be closed); a partial below the minimum amount is
    returned with amount 0, to be marked taken without an order."""
    out: list[PartialTake] = []
    left = amount
    for rule in params.partials:
        if rule.label in state.partials_taken or move < rule.trigger_pct:
            continue
        want = quantize_down(state.initial_amount * rule.size_pct / HUNDRED, amount_step)
        take = min(want, left)
        if take < min_amount or take <= 0:
            out.append(PartialTake(rule, ZERO))
            continue
        if left - take < min_amount:
            take = left
        out.append(PartialTake(rule, take))
        left -= take
        if left <= 0:
            break
    return tuple(out)


def decide_exit(*, side: PositionSide, entry: Decimal, amount: Decimal, price: Decimal,
                stop_loss: Decimal | None, take_profit: Decimal | None, state: ExitState,
                params: ExitParams, amount_step: Decimal, min_amount: Decimal) -> ExitDecision:
    """What to do with one position at `price` (the price an exit would get: bid for a long, ask for a
    short). A full close wins over partials; its reasons in order of precedence: force-close (the
    backstop against a gap through the stop), stop-loss, trailing stop, take-profit."""
    move = move_pct(side, entry, price)
    best = price if state.best_price is None else _better(side, state.best_price, price)
    trail = trailing_level(side, entry, best, params)
    if state.trailing_stop is not None:
        trail = state.trailing_stop if trail is None else _better(side, state.trailing_stop, trail)
    new_state = ExitState(state.initial_amount, state.partials_taken, best, trail)
    reason: str | None = None
    if move <= -params.force_close_pct:
        reason = "force-close"
    elif _hit(side, price, stop_loss):
        reason = "stop-loss"
    elif _hit(side, price, trail):
        reason = "trailing-stop"
    elif _reached_target(side, price, take_profit):
        reason = "take-profit"
    if reason is not None:
        return ExitDecision(reason, (), new_state, move)
    partials = partial_amounts(new_state, amount, move, params, amount_step, min_amount)
    return ExitDecision(None, partials, new_state, move)


# --- the engine's day -----------------------------------------------------------------------------------


@value_type
class OpenMark:
    """One open position valued at a price (None when there is no price: valued at entry)."""

    side: PositionSide
    amount: Decimal
    entry: Decimal
    fees: Decimal
    price: Decimal | None
    leverage: int = 1


def mark_value(realized_all_time: Decimal, marks: Iterable[OpenMark]) -> Decimal:
    """Realized P&L of everything so far plus the open positions' unrealized P&L net of the fees they
    have paid (which the ledger charges only when they close): the engine's mark-to-market result."""
    total = realized_all_time
    for m in marks:
        price = m.entry if m.price is None else m.price
        diff = price - m.entry if m.side is PositionSide.LONG else m.entry - price
        total += diff * m.amount - m.fees
    return total


def margin_in_use(marks: Iterable[OpenMark]) -> Decimal:
    total = ZERO
    with localcontext(_CEILING):
        for m in marks:
            total += m.amount * m.entry / max(1, m.leverage)
    return total


@value_type
class DayBaseline:
    """The engine's start-of-day figures (UTC day), persisted in the ledger's state."""

    day: str
    equity: Decimal
    mark: Decimal

    def to_dict(self) -> dict[str, str]:
        return {"day": self.day, "equity": str(self.equity), "mark": str(self.mark)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DayBaseline | None:
        try:
            return cls(str(data["day"]), Decimal(str(data["equity"])), Decimal(str(data["mark"])))
        except (KeyError, ArithmeticError, ValueError):
            return None
