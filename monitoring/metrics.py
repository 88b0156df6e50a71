"""Prometheus metrics for the daemon, in a registry of its own.

A private CollectorRegistry (not the process-global default) keeps tests independent of each other
and keeps library metrics out of what the daemon promises to expose. Gauges are refreshed from the
Orchestrator's `StatusReport` at scrape time rather than pushed on every change, so trading code never
pays for metrics. Counts that other components keep as running totals (events published, alerts
dropped, engine restarts) are turned into Prometheus counters by adding only the increase, so a
counter never goes backwards even if a component restarts its own tally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.events import EventBus
from core.types import OrderState, TradingState
from monitoring.control import StatusReport

log = structlog.get_logger("metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST

ENGINE_STATES = ("running", "paused", "restarting", "failed", "stopped", "disabled")

# Exchange round trips: from a fast cached answer to a request that hits the client timeout.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Totals:
    """Feeds a running total into a Counter: only increases are added; a drop is a reset of the source."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], float] = {}

    def increase(self, key: tuple[str, ...], total: float) -> float:
        last = self._last.get(key, 0.0)
        self._last[key] = total
        return total - last if total >= last else total


def _f(value: Decimal | float | int) -> float:
    return float(value)


class Metrics:
    """Every figure the daemon exposes on /metrics; `render()` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        per_engine = ("engine",)
        self.equity = self._gauge("kinetic_engine_equity", "Equity per engine (quote currency)", per_engine)
        self.equity_total = self._gauge("kinetic_equity_total", "Portfolio equity (quote currency)")
        self.realized_pnl = self._gauge("kinetic_engine_realized_pnl", "Realized P&L per engine", per_engine)
        self.unrealized_pnl = self._gauge("kinetic_engine_unrealized_pnl", "Unrealized P&L", per_engine)
        self.day_pnl = self._gauge("kinetic_day_pnl", "P&L since the start of the UTC day")
        self.drawdown_pct = self._gauge("kinetic_drawdown_pct", "Drawdown from peak equity, percent")
        self.open_positions = self._gauge("kinetic_engine_open_positions", "Open positions", per_engine)
        self.orders = self._gauge("kinetic_orders", "Orders in the ledger by state", ("state",))
        self.heartbeat_age = self._gauge(
            "kinetic_engine_heartbeat_age_seconds", "Seconds since the engine's last heartbeat", per_engine
        )
        self.engine_state = self._gauge(
            "kinetic_engine_state", "1 for the engine's current state, 0 otherwise", ("engine", "state")
        )
        self.restarts = self._counter("kinetic_engine_restarts", "Engine restarts", per_engine)
        self.trading_state = self._gauge(
            "kinetic_trading_state", "1 for the current trading state, 0 otherwise", ("state",)
        )
        self.uptime = self._gauge("kinetic_uptime_seconds", "Seconds since the daemon started")
        self.status_ok = self._gauge(
            "kinetic_status_ok", "1 when the last status refresh succeeded, 0 when it failed"
        )
        self.request_seconds = Histogram(
            "kinetic_exchange_request_seconds", "Exchange request latency", ["engine", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.request_errors = self._counter(
            "kinetic_exchange_errors", "Exchange request errors by kind", ("engine", "kind")
        )
        self.alerts_dropped = self._counter("kinetic_alerts_dropped", "Alerts dropped by a full queue")
        self.events_published = self._counter("kinetic_events_published", "Events published on the bus")
        self.events_dropped = self._counter(
            "kinetic_events_dropped", "Events a subscriber's full queue refused", ("subscriber",)
        )
        self.loop_lag = self._gauge("kinetic_event_loop_lag_seconds", "Last measured event-loop lag")
        self.loop_stalls = self._counter("kinetic_event_loop_stalls", "Episodes of a blocked event loop")
        self._totals = _Totals()
        self._bus: EventBus | None = None
        self._refreshers: list[Callable[[], None]] = []
        for state in TradingState:
            self.trading_state.labels(state=state.value).set(0)
        self.set_orders_by_state({})

    # --- updates --------------------------------------------------------------------------------

    def update_from_status(self, report: StatusReport) -> None:
        self.status_ok.set(1)
        self.equity_total.set(_f(report.equity))
        self.day_pnl.set(_f(report.day_pnl))
        self.drawdown_pct.set(_f(report.drawdown_pct))
        self.uptime.set(report.uptime_seconds)
        for state in TradingState:
            self.trading_state.labels(state=state.value).set(1 if report.trading_state == state else 0)
        for eng in report.engines:
            name = eng.name
            self.equity.labels(engine=name).set(_f(eng.equity))
            self.realized_pnl.labels(engine=name).set(_f(eng.realized_pnl))
            self.unrealized_pnl.labels(engine=name).set(_f(eng.unrealized_pnl))
            self.open_positions.labels(engine=name).set(eng.open_positions)
            if eng.heartbeat_age is None:
                # No beat yet (or not running): no series rather than a made-up age.
                self.heartbeat_age.remove(name)
            else:
                self.heartbeat_age.labels(engine=name).set(eng.heartbeat_age)
            known = ENGINE_STATES if eng.state in ENGINE_STATES else (*ENGINE_STATES, eng.state)
            for st in known:
                self.engine_state.labels(engine=name, state=st).set(1 if eng.state == st else 0)
            self._add_total(self.restarts.labels(engine=name), ("restarts", name), eng.restarts)

    def status_failed(self) -> None:
        """The last refresh could not get a status: keep the old figures, flag them as stale."""
        self.status_ok.set(0)

    def observe_request(
        self, engine: str, endpoint: str, seconds: float, error_kind: str | None = None
    ) -> None:
        """One exchange round trip; `error_kind` e.g. 'temporary', 'rate_limit', 'operational'."""
        self.request_seconds.labels(engine=engine, endpoint=endpoint).observe(max(0.0, seconds))
        if error_kind is not None:
            self.request_errors.labels(engine=engine, kind=error_kind).inc()

    def set_orders_by_state(self, counts: Mapping[str, int]) -> None:
        """Counts per order state; states missing from `counts` are zero (every state is always exposed)."""
        known = {s.value for s in OrderState}
        for state in known | {str(k) for k in counts}:
            self.orders.labels(state=state).set(counts.get(state, 0))

    def set_alerts_dropped(self, total: int) -> None:
        """The alert queue's running total of dropped alerts."""
        self._add_total(self.alerts_dropped, ("alerts_dropped",), total)

    def set_events_published(self, total: int) -> None:
        self._add_total(self.events_published, ("events_published",), total)

    def set_loop_lag(self, last_lag_seconds: float, stall_episodes: int) -> None:
        self.loop_lag.set(last_lag_seconds)
        self._add_total(self.loop_stalls, ("loop_stalls",), stall_episodes)

    def watch_bus(self, bus: EventBus) -> None:
        """Read the bus's published and per-subscriber dropped totals at every render."""
        self._bus = bus

    def add_refresher(self, refresh: Callable[[], None]) -> None:
        """A cheap synchronous callback run before each render (e.g. reading the alert queue's
        counters or the loop-lag monitor); a failing refresher is logged, never breaks a scrape."""
        self._refreshers.append(refresh)

    # --- output ---------------------------------------------------------------------------------

    def render(self) -> bytes:
        self._refresh()
        return generate_latest(self.registry)

    def _refresh(self) -> None:
        if self._bus is not None:
            self.set_events_published(self._bus.published)
            for sub in self._bus.subscriptions:
                dropped = self.events_dropped.labels(subscriber=sub.name)
                self._add_total(dropped, ("dropped", sub.name), sub.dropped)
        for refresh in self._refreshers:
            try:
                refresh()
            except Exception:
                name = getattr(refresh, "__qualname__", repr(refresh))
                log.exception("metrics refresher failed", refresher=name)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _add_total(self, counter: Counter, key: tuple[str, ...], total: float) -> None:
        delta = self._totals.increase(key, float(total))
        if delta > 0:
            counter.inc(delta)
