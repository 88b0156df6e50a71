"""/healthz and /metrics over real HTTP on 127.0.0.1 (random port), driven by a fake Control."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.clock import SimClock, settle
from core.events import DaemonStarted, EventBus
from core.types import OrderState, TradingState
from monitoring.control import Control, EngineStatus, StatusReport
from monitoring.http import HealthServer, assess
from monitoring.metrics import Metrics

WARNING = 60.0


def engine(name: str = "spot", state: str = "running", age: float | None = 3.0, **kw: Any) -> EngineStatus:
    base: dict[str, Any] = {
        "name": name,
        "state": state,
        "heartbeat_age": age,
        "paused": state == "paused",
        "restarts": 0,
        "equity": Decimal("6000.50"),
        "open_positions": 2,
        "realized_pnl": Decimal("12.25"),
        "unrealized_pnl": Decimal("-3.5"),
    }
    base.update(kw)
    return EngineStatus(**base)


def report(*engines: EngineStatus, trading: TradingState = TradingState.ACTIVE) -> StatusReport:
    return StatusReport(
        mode="paper",
        trading_state=trading,
        engines=engines or (engine(),),
        equity=Decimal("10000.75"),
        day_pnl=Decimal("-40"),
        day_pnl_pct=Decimal("-0.4"),
        drawdown_pct=Decimal("1.5"),
        uptime_seconds=123.0,
    )


class FakeControl:
    """Only `status()` is reached by the health endpoint; it answers, fails or hangs on demand."""

    def __init__(self) -> None:
        self.report = report()
        self.fail: Exception | None = None
        self.hang = False
        self.calls = 0

    async def status(self) -> StatusReport:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()
        return self.report


@pytest.fixture
async def server() -> AsyncIterator[tuple[HealthServer, FakeControl, Metrics, SimClock]]:
    control, metrics, clock = FakeControl(), Metrics(), SimClock()
    srv = HealthServer(cast(Control, control), metrics, "127.0.0.1", 0, warning_seconds=WARNING,
                       status_timeout_seconds=5.0, clock=clock)
    await srv.start()
    try:
        yield srv, control, metrics, clock
    finally:
        await srv.stop()


async def get(srv: HealthServer, path: str) -> tuple[int, str, str]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(srv.url + path) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def get_json(srv: HealthServer, path: str) -> tuple[int, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(srv.url + path) as resp:
        return resp.status, await resp.json()


# --- /healthz ------------------------------------------------------------------------------------


async def test_healthz_ok_when_every_enabled_engine_is_beating(server: Any) -> None:
    srv, control, _, _ = server
    control.report = report(engine("spot", "running", 3.2), engine("futures", "disabled", None))
    status, body = await get_json(srv, "/healthz")
    assert status == 200
    assert body["healthy"] is True
    assert body["trading_state"] == "active"
    assert body["mode"] == "paper"
    assert body["engines"]["spot"] == {"state": "running", "heartbeat_age": 3.2, "healthy": True, "problem": None}
    assert body["engines"]["futures"]["state"] == "disabled"  # a disabled engine is shown, not judged


@pytest.mark.parametrize(
    ("spot", "problem"),
    [
        (engine("spot", "failed", 400.0), "engine is failed"),
        (engine("spot", "restarting", None), "engine is restarting"),
        (engine("spot", "stopped", 1.0), "engine is stopped"),
        (engine("spot", "running", WARNING), "heartbeat 60s old"),
        (engine("spot", "running", 299.0), "heartbeat 299s old"),
        (engine("spot", "running", None), "no heartbeat yet"),
    ],
)
async def test_healthz_503_names_the_unhealthy_engine(server: Any, spot: EngineStatus, problem: str) -> None:
    srv, control, _, _ = server
    control.report = report(spot, engine("futures", "running", 1.0))
    status, body = await get_json(srv, "/healthz")
    assert status == 503
    assert body["healthy"] is False
    assert body["engines"]["spot"]["healthy"] is False
    assert body["engines"]["spot"]["problem"].startswith(problem)
    assert body["engines"]["futures"]["healthy"] is True  # the other engine is judged on its own


async def test_a_paused_engine_and_a_halted_portfolio_are_still_healthy(server: Any) -> None:
    """Pausing and halting are decisions a person or the risk monitor made, not faults."""
    srv, control, _, _ = server
    control.report = report(engine("spot", "paused", 2.0), trading=TradingState.HALTED)
    status, body = await get_json(srv, "/healthz")
    assert status == 200
    assert body["trading_state"] == "halted"


async def test_healthz_503_when_status_fails(server: Any) -> None:
    srv, control, _, _ = server
    control.fail = RuntimeError("orchestrator not ready")
    status, body = await get_json(srv, "/healthz")
    assert status == 503
    assert body == {"healthy": False, "problem": "status unavailable"}


async def test_healthz_503_when_status_hangs(server: Any) -> None:
    srv, control, _, clock = server
    control.hang = True
    request = asyncio.create_task(get_json(srv, "/healthz"))
    for _ in range(2000):  # bounded: wait for the handler to reach its timeout sleep
        if clock.pending_sleeps():
            break
        await asyncio.sleep(0)
    assert clock.pending_sleeps() == 1
    await clock.advance(5.0)
    status, body = await asyncio.wait_for(request, 5)
    assert status == 503
    assert body["problem"] == "status unavailable"


def test_a_blind_circuit_breaker_is_unhealthy() -> None:
    """Engines beating while no loss limit can be checked (a balance unanswered for minutes)."""
    blind = dataclasses.replace(report(), breaker_blind="no balance from spot")
    health = assess(blind, WARNING)
    assert not health.healthy
    assert health.body["problem"] == "circuit breaker blind: no balance from spot"
    assert assess(report(), WARNING).healthy


def test_no_enabled_engine_is_unhealthy() -> None:
    health = assess(report(engine("spot", "disabled", None)), WARNING)
    assert not health.healthy
    assert health.body["problem"] == "no enabled engine"


# --- /metrics ------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_is_prometheus_text_refreshed_on_each_scrape(server: Any) -> None:
    srv, control, metrics, _ = server
    control.report = report(engine("spot", "running", 4.0, restarts=2), trading=TradingState.REDUCING)
    metrics.observe_request("spot", "fetch_ticker", 0.042)
    metrics.observe_request("spot", "create_order", 10.0, error_kind="temporary")
    metrics.set_orders_by_state({OrderState.OPEN: 3, "filled": 17})
    metrics.set_alerts_dropped(4)

    status, ctype, text = await get(srv, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    values = samples(text)
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "kinetic_engine_equity", "kinetic_equity_total", "kinetic_engine_realized_pnl",
        "kinetic_engine_unrealized_pnl", "kinetic_engine_open_positions", "kinetic_orders",
        "kinetic_engine_heartbeat_age_seconds", "kinetic_engine_restarts", "kinetic_engine_state",
        "kinetic_trading_state", "kinetic_exchange_request_seconds", "kinetic_exchange_errors",
        "kinetic_alerts_dropped", "kinetic_events_published",
    ):
        assert name in families, name
    assert values[("kinetic_engine_equity", (("engine", "spot"),))] == 6000.5
    assert values[("kinetic_equity_total", ())] == 10000.75
    assert values[("kinetic_engine_unrealized_pnl", (("engine", "spot"),))] == -3.5
    assert values[("kinetic_engine_heartbeat_age_seconds", (("engine", "spot"),))] == 4.0
    assert values[("kinetic_engine_restarts_total", (("engine", "spot"),))] == 2
    assert values[("kinetic_engine_state", (("engine", "spot"), ("state", "running")))] == 1
    assert values[("kinetic_engine_state", (("engine", "spot"), ("state", "failed")))] == 0
    assert values[("kinetic_trading_state", (("state", "reducing"),))] == 1
    assert values[("kinetic_trading_state", (("state", "active"),))] == 0
    assert values[("kinetic_orders", (("state", "open"),))] == 3
    assert values[("kinetic_orders", (("state", "unknown"),))] == 0  # every state is always exposed
    latency = (("endpoint", "fetch_ticker"), ("engine", "spot"))
    assert values[("kinetic_exchange_request_seconds_count", latency)] == 1
    assert values[("kinetic_exchange_request_seconds_bucket", (*latency, ("le", "0.05")))] == 1
    assert values[("kinetic_exchange_request_seconds_bucket", (*latency, ("le", "0.025")))] == 0
    assert values[("kinetic_exchange_errors_total", (("engine", "spot"), ("kind", "temporary")))] == 1
    assert values[("kinetic_alerts_dropped_total", ())] == 4
    assert values[("kinetic_status_ok", ())] == 1

    control.report = report(engine("spot", "failed", None, restarts=5, equity=Decimal("5000")))
    _, _, text = await get(srv, "/metrics")
    values = samples(text)
    assert values[("kinetic_engine_equity", (("engine", "spot"),))] == 5000
    assert values[("kinetic_engine_restarts_total", (("engine", "spot"),))] == 5
    assert values[("kinetic_engine_state", (("engine", "spot"), ("state", "failed")))] == 1
    assert ("kinetic_engine_heartbeat_age_seconds", (("engine", "spot"),)) not in values
    assert control.calls == 2


async def test_metrics_keeps_serving_when_status_fails(server: Any) -> None:
    srv, control, _, _ = server
    await get(srv, "/metrics")
    control.fail = RuntimeError("boom")
    status, _, text = await get(srv, "/metrics")
    values = samples(text)
    assert status == 200
    assert values[("kinetic_status_ok", ())] == 0
    assert values[("kinetic_equity_total", ())] == 10000.75  # last known figure, flagged stale


async def test_stop_releases_the_port() -> None:
    srv = HealthServer(cast(Control, FakeControl()), Metrics(), "127.0.0.1", 0, clock=SimClock())
    await srv.start()
    port = srv.port
    assert port > 0
    await srv.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# --- Metrics without HTTP --------------------------------------------------------------------------


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_running_totals_become_counters_that_never_go_back() -> None:
    metrics = Metrics()
    seen = []
    for total in (5, 5, 3, 7, 0, 2):  # 3 and 0: the source restarted its tally
        metrics.set_alerts_dropped(total)
        seen.append(value(metrics, "kinetic_alerts_dropped_total"))
    assert seen == [5, 5, 8, 12, 12, 14]


async def test_bus_totals_are_read_at_render() -> None:
    metrics, bus = Metrics(), EventBus()
    metrics.watch_bus(bus)
    bus.subscribe("alerts", maxsize=1)
    for i in range(3):
        bus.publish(DaemonStarted(ts=float(i), mode="paper", engines=("spot",), equity=Decimal(1)))
    await settle()
    values = samples(metrics.render().decode())
    assert values[("kinetic_events_published_total", ())] == 3
    assert values[("kinetic_events_dropped_total", (("subscriber", "alerts"),))] == 2


def test_a_failing_refresher_does_not_break_the_scrape() -> None:
    metrics = Metrics()

    def broken() -> None:
        raise RuntimeError("alert queue gone")

    metrics.add_refresher(broken)
    metrics.add_refresher(lambda: metrics.set_loop_lag(0.25, 1))
    values = samples(metrics.render().decode())
    assert values[("kinetic_event_loop_lag_seconds", ())] == 0.25
    assert values[("kinetic_event_loop_stalls_total", ())] == 1


def test_status_report_with_unexpected_engine_state_is_exposed() -> None:
    metrics = Metrics()
    metrics.update_from_status(report(dataclasses.replace(engine(), state="draining")))
    assert value(metrics, "kinetic_engine_state", engine="spot", state="draining") == 1
    assert value(metrics, "kinetic_engine_state", engine="spot", state="running") == 0
