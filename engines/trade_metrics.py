"""Trade statistics per engine and per symbol, from the ledger's closed trades.

One pure function over `ClosedTrade`s, so the spot and futures engines (and Telegram, a backtest)
report the same figures the same way. A trade's P&L is the ledger's `realized_pnl`: net of every fee
paid on it, so a trade that made 0.01 before fees and paid 0.02 is a loss here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from decimal import Decimal, localcontext
from typing import Any, Protocol

from core.types import ZERO
from core.values import value_type
from storage.ledger import Ledger

_PRECISION = 40


class TradeLike(Protocol):
    @property
    def symbol(self) -> str: ...

    @property
    def realized_pnl(self) -> Decimal: ...


@value_type
class Metrics:
    """`profit_factor` is gross profit / gross loss; None when there is no loss to divide by.
    `largest_loss` is the most negative trade P&L (zero when no trade lost)."""

    trades: int = 0
    wins: int = 0
    losses: int = 0
    win_rate_pct: Decimal = ZERO
    profit_factor: Decimal | None = None
    average_pnl: Decimal = ZERO
    total_pnl: Decimal = ZERO
    gross_profit: Decimal = ZERO
    gross_loss: Decimal = ZERO
    largest_loss: Decimal = ZERO

    def as_dict(self) -> dict[str, Any]:
        """Text for every Decimal (exact in JSON, Telegram, logs); profit factor None as None."""
        return {
            "trades": self.trades,
            "wins": self.wins,
            "losses": self.losses,
            "win_rate_pct": str(self.win_rate_pct),
            "profit_factor": None if self.profit_factor is None else str(self.profit_factor),
            "average_pnl": str(self.average_pnl),
            "total_pnl": str(self.total_pnl),
            "largest_loss": str(self.largest_loss),
        }


@value_type
class MetricsReport:
    overall: Metrics
    by_symbol: dict[str, Metrics] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.as_dict(),
                "by_symbol": {s: m.as_dict() for s, m in sorted(self.by_symbol.items())}}


def _round(value: Decimal, places: str) -> Decimal:
    """Rounded to `places`, whatever its size: quantize needs every digit down to `places`, more than
    the context holds for a huge ratio (a profit factor over a loss of a few satoshi), and would raise."""
    exponent = Decimal(places).as_tuple().exponent
    assert isinstance(exponent, int)
    digits = max(1, value.adjusted() - exponent + 2)
    with localcontext(prec=max(_PRECISION, digits)):
        return value.quantize(Decimal(places))


def metrics(pnls: Iterable[Decimal]) -> Metrics:
    """Statistics of a list of trade P&Ls. A trade at exactly zero is neither a win nor a loss, but it
    counts as a trade (it lowers the win rate: it did not win)."""
    values = list(pnls)
    if not values:
        return Metrics()
    with localcontext(prec=_PRECISION):
        wins = [v for v in values if v > 0]
        losses = [v for v in values if v < 0]
        gross_profit = sum(wins, ZERO)
        gross_loss = -sum(losses, ZERO)
        total = gross_profit - gross_loss
        n = len(values)
        win_rate = _round(Decimal(len(wins)) * 100 / n, "0.01")
        factor = _round(gross_profit / gross_loss, "0.0001") if gross_loss > 0 else None
        average = total / n
    return Metrics(
        trades=n,
        wins=len(wins),
        losses=len(losses),
        win_rate_pct=win_rate,
        profit_factor=factor,
        average_pnl=average,
        total_pnl=total,
        gross_profit=gross_profit,
        gross_loss=gross_loss,
        largest_loss=min(losses) if losses else ZERO,
    )


def report(trades: Iterable[TradeLike]) -> MetricsReport:
    """Overall and per-symbol metrics of an engine's closed trades."""
    all_pnls: list[Decimal] = []
    per_symbol: dict[str, list[Decimal]] = {}
    for t in trades:
        all_pnls.append(t.realized_pnl)
        per_symbol.setdefault(t.symbol, []).append(t.realized_pnl)
    return MetricsReport(metrics(all_pnls), {s: metrics(p) for s, p in per_symbol.items()})


async def load_report(ledger: Ledger, engine: str, *, limit: int = 100_000) -> MetricsReport:
    """The report for `engine` from the ledger (its latest `limit` closed trades)."""
    return report(await ledger.closed_trades(engine, limit=limit))
