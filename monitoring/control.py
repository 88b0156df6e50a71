"""The small control protocol through which Telegram (and the health endpoint) drive the daemon.

`monitoring` never imports `engines`; the Orchestrator implements `Control`, and the bot only knows
this page. Every mutating call names who asked (`by`), so the journal records it.
"""

from __future__ import annotations

from dataclasses import field
from decimal import Decimal
from typing import Protocol

from core.types import Position, TradingState
from core.values import value_type

ENGINE_TARGETS = ("spot", "futures", "all")


@value_type
class EngineStatus:
    name: str
    state: str  # running | paused | restarting | failed | stopped | disabled
    heartbeat_age: float | None
    paused: bool
    restarts: int
    equity: Decimal
    open_positions: int
    realized_pnl: Decimal
    unrealized_pnl: Decimal


@value_type
class StatusReport:
    mode: str
    trading_state: TradingState
    engines: tuple[EngineStatus, ...]
    equity: Decimal
    day_pnl: Decimal
    day_pnl_pct: Decimal
    drawdown_pct: Decimal
    uptime_seconds: float
    # What keeps the breaker from judging, once that has lasted long enough to alert (BreakerBlind);
    # None while it sees the whole account.
    breaker_blind: str | None = None


@value_type
class BreakerReport:
    state: TradingState
    reason: str
    until: float | None
    day_start_equity: Decimal | None  # None until the risk monitor has seen its first equity
    peak_equity: Decimal | None


@value_type
class DailyPnl:
    day: str  # YYYY-MM-DD (UTC)
    engine: str
    realized_pnl: Decimal
    trades: int


@value_type
class TradeRecord:
    ts: float
    engine: str
    symbol: str
    side: str
    amount: Decimal
    price: Decimal
    fee: Decimal
    realized_pnl: Decimal | None = None


@value_type
class BalanceReport:
    engine: str
    free: dict[str, Decimal] = field(default_factory=dict)
    total: dict[str, Decimal] = field(default_factory=dict)
    equity: Decimal = Decimal(0)


@value_type
class CommandResult:
    ok: bool
    message: str


class Control(Protocol):
    async def status(self) -> StatusReport: ...

    async def positions(self) -> list[Position]: ...

    async def balance(self) -> list[BalanceReport]: ...

    async def pnl(self, days: int) -> list[DailyPnl]: ...

    async def trades(self, n: int) -> list[TradeRecord]: ...

    async def pause(self, target: str, by: str) -> CommandResult: ...

    async def resume(self, target: str, by: str) -> CommandResult: ...

    async def restart(self, engine: str, by: str) -> CommandResult: ...

    async def breaker(self) -> BreakerReport: ...

    async def breaker_reset(self, by: str) -> CommandResult: ...

    async def kill(self, by: str) -> CommandResult: ...
