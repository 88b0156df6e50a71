"""Reconciliation at start-up: before any engine trades, make the ledger and the exchange agree.

Resolve every order the ledger left open, pending or unknown (by client order id, never by sending
again); adopt the fills of our orders that happened while the daemon was down; flag — alert and log,
never touch — orders, trades and positions on the account that the ledger does not know. Ends with one
summary line per engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import structlog

from core.clock import Clock
from core.errors import KineticError
from core.events import EventBus, ReconciliationFinding
from core.types import ZERO, MarketType, OrderState
from exchange.base import Exchange
from exchange.orders import OrderManager
from storage.ledger import Ledger

log = structlog.get_logger("reconcile")

# Fetch trades from a little before the newest fill we know, so an execution recorded on the exchange
# but not in the ledger (a crash between the two) is always inside the window. Repeats are harmless:
# the ledger ignores a fill it already has.
TRADE_OVERLAP_SECONDS = 3600.0


@dataclass
class ReconcileReport:
    engine: str
    orders_resolved: int = 0
    fills_adopted: int = 0
    findings: list[str] = field(default_factory=list)


async def reconcile_engine(
    name: str,
    exchange: Exchange,
    orders: OrderManager,
    ledger: Ledger,
    symbols: list[str],
    bus: EventBus,
    clock: Clock,
) -> ReconcileReport:
    report = ReconcileReport(engine=name)

    def finding(kind: str, detail: str) -> None:
        report.findings.append(f"{kind}: {detail}")
        log.warning("reconciliation finding", engine=name, finding=kind, detail=detail)
        bus.publish(ReconciliationFinding(ts=clock.now(), engine=name, finding=kind, detail=detail))

    since = await _trades_since(ledger, name)
    symbols_in_play = sorted({*symbols, *(p.symbol for p in await ledger.positions(name))})

    # 1. Orders the ledger does not consider settled.
    report.orders_resolved = len(await orders.resolve_open_orders())

    # 2. Fills of our orders that the ledger missed; executions of orders we never sent are flagged.
    if since is not None:
        for symbol in symbols_in_play:
            try:
                trades = await exchange.fetch_my_trades(symbol, since=since)
            except KineticError as exc:
                finding("trades unavailable", f"{symbol}: {exc}")
                continue
            for fill in trades:
                order = await ledger.get_order(fill.client_order_id) if fill.client_order_id else None
                if order is None or order.engine != name:
                    finding("unknown trade", f"{symbol} {fill.side} {fill.amount} @ {fill.price} "
                                             f"(order {fill.client_order_id or '?'})")
                    continue
                outcome = await ledger.record_fill(dataclasses.replace(fill, engine=name),
                                                   leverage=order.leverage or 1)
                if outcome.new:
                    report.fills_adopted += 1
                    log.warning("adopted a fill made while the daemon was down", engine=name, symbol=symbol,
                                client_order_id=fill.client_order_id, amount=str(fill.amount),
                                price=str(fill.price))

    # 3. Open orders on the account that the ledger does not know.
    try:
        open_orders = await exchange.fetch_open_orders(symbols_in_play)
    except KineticError as exc:
        finding("open orders unavailable", str(exc))
        open_orders = []
    for update in open_orders:
        known = await ledger.get_order(update.client_order_id)
        if known is None:
            finding("unknown open order", f"{update.symbol} {update.side} {update.amount} "
                                          f"(client id {update.client_order_id})")
        elif known.state.is_terminal:
            finding("order open on exchange but settled in ledger", update.client_order_id)

    # 4. Positions: the exchange's futures positions, or the spot balances behind the ledger's positions.
    ledger_positions = {p.symbol: p for p in await ledger.positions(name)}
    try:
        if exchange.market_type is MarketType.FUTURES:
            theirs = await exchange.fetch_positions()
            for pos in theirs:
                mine = ledger_positions.get(pos.symbol)
                if mine is None:
                    finding("unknown position", f"{pos.symbol} {pos.side} {pos.amount}")
                elif mine.amount != pos.amount or mine.side != pos.side:
                    finding("position differs", f"{pos.symbol}: ledger {mine.side} {mine.amount}, "
                                                f"exchange {pos.side} {pos.amount}")
            # The other way round too: a liquidation or a close by hand while the daemon was down leaves
            # the ledger holding a position the account no longer has.
            present = {pos.symbol for pos in theirs}
            for symbol, mine in ledger_positions.items():
                if symbol not in present:
                    finding("position missing on exchange", f"{symbol}: ledger holds {mine.side} {mine.amount}, "
                                                            f"the exchange has no position")
        else:
            balance = await exchange.fetch_balance()
            for symbol, mine in ledger_positions.items():
                base = exchange.market(symbol).base
                held = balance.total.get(base, ZERO)
                if held < mine.amount:
                    finding("balance below position", f"{symbol}: ledger holds {mine.amount} {base}, "
                                                      f"account has {held}")
    except KineticError as exc:
        finding("positions unavailable", str(exc))

    unsettled = await ledger.orders_in_states([OrderState.PENDING, OrderState.UNKNOWN], engine=name)
    log.info("reconciled", engine=name, orders_resolved=report.orders_resolved,
             fills_adopted=report.fills_adopted, findings=len(report.findings),
             positions=len(await ledger.positions(name)), unsettled_orders=len(unsettled))
    return report


async def _trades_since(ledger: Ledger, engine: str) -> float | None:
    """Start of the trade window: before our newest fill and our oldest unsettled order, or None when
    this engine has never traded (then there is nothing of ours to adopt)."""
    marks: list[float] = []
    last = await ledger.fills(engine=engine, limit=1)
    if last:
        marks.append(last[-1].ts)
    pending = await ledger.orders_in_states(
        [OrderState.PENDING, OrderState.UNKNOWN, OrderState.OPEN, OrderState.PARTIALLY_FILLED], engine=engine
    )
    marks.extend(o.created_at for o in pending)
    if not marks:
        return None
    return max(0.0, min(marks) - TRADE_OVERLAP_SECONDS) if pending else max(marks) - TRADE_OVERLAP_SECONDS
