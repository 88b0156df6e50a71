"""The optional /healthz and /metrics listener (off by default: HTTP_ENABLED=false).

/healthz answers the question a load balancer, an uptime checker or a person with curl asks: is every
enabled engine actually trading? A process that is up but whose engines are stalled, restarting or
FAILED is not healthy, and systemd's watchdog alone cannot tell that (the loop still turns). The
trading state (ACTIVE / REDUCING / HALTED) is reported but does not make the daemon unhealthy: a halt
is a deliberate decision, not a fault.

/metrics refreshes from `Control.status()` on each scrape, so nothing is computed between scrapes.
It binds 127.0.0.1 by default: the figures say how much money is where, so exposing them beyond the
machine is a deliberate choice (HTTP_HOST), best made behind a firewall or a reverse proxy.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import structlog
from aiohttp import web

from core.clock import Clock, LiveClock
from core.values import value_type
from monitoring.control import Control, StatusReport
from monitoring.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger("http")

HEALTHY_STATES = frozenset({"running", "paused"})


@value_type
class Health:
    healthy: bool
    body: dict[str, Any]


def assess(report: StatusReport, warning_seconds: float) -> Health:
    """Healthy when every enabled engine is running or paused with a heartbeat younger than the
    warning threshold, and the circuit breaker can judge the account (`breaker_blind`). No enabled engine at
    all is unhealthy: such a daemon does nothing."""
    engines: dict[str, dict[str, Any]] = {}
    all_ok = True
    enabled = 0
    for eng in report.engines:
        if eng.state == "disabled":
            engines[eng.name] = {"state": eng.state, "heartbeat_age": None, "healthy": None, "problem": None}
            continue
        enabled += 1
        problem: str | None = None
        if eng.state not in HEALTHY_STATES:
            problem = f"engine is {eng.state}"
        elif eng.heartbeat_age is None:
            problem = "no heartbeat yet"
        elif not math.isfinite(eng.heartbeat_age) or eng.heartbeat_age >= warning_seconds:
            problem = f"heartbeat {eng.heartbeat_age:.0f}s old (warning at {warning_seconds:g}s)"
        all_ok = all_ok and problem is None
        engines[eng.name] = {
            "state": eng.state,
            "heartbeat_age": None if eng.heartbeat_age is None else round(eng.heartbeat_age, 3),
            "healthy": problem is None,
            "problem": problem,
        }
    # Engines beating while no loss limit can be checked is not a healthy daemon either.
    healthy = all_ok and enabled > 0 and report.breaker_blind is None
    body: dict[str, Any] = {
        "healthy": healthy,
        "mode": report.mode,
        "trading_state": report.trading_state.value,
        "uptime_seconds": round(report.uptime_seconds, 3),
        "engines": engines,
    }
    if enabled == 0:
        body["problem"] = "no enabled engine"
    elif report.breaker_blind is not None:
        body["problem"] = f"circuit breaker blind: {report.breaker_blind}"
    return Health(healthy, body)


class HealthServer:
    """aiohttp server for /healthz and /metrics; `start()` binds, `port` is the bound port."""

    def __init__(
        self,
        control: Control,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9108,
        *,
        warning_seconds: float = 60.0,
        status_timeout_seconds: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self._control = control
        self._metrics = metrics
        self._host = host
        self._requested_port = port
        self._warning = warning_seconds
        self._status_timeout = status_timeout_seconds
        self._clock: Clock = clock if clock is not None else LiveClock()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("HealthServer is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics_handler)
        # Scrapes are short; a stop must not wait aiohttp's default 60 s for idle keep-alive clients.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("health endpoint listening", url=self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("health endpoint stopped")

    async def _status(self) -> StatusReport | None:
        try:
            return await self._clock.wait_for(self._control.status(), self._status_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("status for the health endpoint failed", error=repr(exc))
            return None

    async def _healthz(self, _request: web.Request) -> web.Response:
        report = await self._status()
        if report is None:
            return web.json_response({"healthy": False, "problem": "status unavailable"}, status=503)
        health = assess(report, self._warning)
        return web.json_response(health.body, status=200 if health.healthy else 503)

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        report = await self._status()
        if report is None:
            self._metrics.status_failed()
        else:
            self._metrics.update_from_status(report)
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})
