"""Everything the owner uses to watch and steer the daemon, started after the engines and stopped
before them: systemd notify (READY, STATUS, WATCHDOG, STOPPING), the loop-lag watchdog thread, the
optional /healthz + /metrics listener, and Telegram (commands and alerts).

None of it may stop trading: each part that fails to start is logged and left off, and its tasks are
owned here and cancelled at shutdown. The Orchestrator passes itself as `Control`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from config import Settings
from core.clock import Clock
from core.events import EventBus, Subscription
from monitoring.alerts import ALERT_QUEUE, AlertSender, AlertSettings
from monitoring.control import Control, StatusReport
from monitoring.looplag import LoopLagMonitor
from monitoring.systemd import SystemdNotifier
from monitoring.telegram import TelegramBot

if TYPE_CHECKING:
    from monitoring.http import HealthServer
    from monitoring.metrics import Metrics

log = structlog.get_logger("operations")


class Operations:
    def __init__(self, settings: Settings, clock: Clock, bus: EventBus,
                 notifier: SystemdNotifier | None = None, telegram_base_url: str | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.bus = bus
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.telegram_base_url = telegram_base_url
        # Only /metrics reads these: without the listener (the default) nothing is built or kept up to
        # date (prometheus_client's registry alone is ~1 MB).
        self.metrics: Metrics | None = None
        if settings.http_enabled:
            from monitoring.metrics import Metrics

            self.metrics = Metrics()
            self.metrics.watch_bus(bus)
        self.looplag: LoopLagMonitor | None = None
        self.http: HealthServer | None = None
        self.bot: TelegramBot | None = None
        self.alerts: AlertSender | None = None
        # Alerts are listened for from here on, before the first start-up stage: the risk state stage
        # may trip the breaker or the kill switch (a loss while the daemon was down), and the
        # reconciliation reports what it found, long before Telegram is up to send it.
        self._alert_sub: Subscription | None = None
        if settings.telegram_bot_token is not None:
            self._alert_sub = AlertSender.subscribe_to(bus, AlertSettings.from_settings(settings), ALERT_QUEUE)
        self._tasks: set[asyncio.Task[Any]] = set()

    def _own(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("operations task died; trading goes on without it", task=task.get_name(),
                      error=repr(task.exception()), exc_info=task.exception())

    def starting(self, stage: str) -> None:
        self.notifier.status(f"starting: {stage}")

    async def start(self, control: Control) -> None:
        """Bring up the watchers; called once start-up and reconciliation are done."""
        s = self.settings
        interval = self.notifier.watchdog_interval()
        if interval is not None and interval < s.health_check_interval_seconds:
            log.warning("systemd watchdog is shorter than the supervisor tick: a healthy daemon would be "
                        "killed", watchdog_ping_seconds=interval,
                        health_check_interval_seconds=s.health_check_interval_seconds)
        if s.looplag_enabled:
            self.looplag = LoopLagMonitor(asyncio.get_running_loop(), s.looplag_threshold_seconds,
                                          s.looplag_check_seconds)
            self.looplag.start()
        if s.http_enabled:
            # Imported only when wanted: aiohttp's server side adds ~1.6 MB to a daemon that by default
            # (HTTP_ENABLED=false) never listens.
            from monitoring.http import HealthServer

            assert self.metrics is not None  # built with the settings when HTTP is on
            server = HealthServer(control, self.metrics, s.http_host, s.http_port,
                                  warning_seconds=s.health_warning_seconds, clock=self.clock)
            try:
                await server.start()
                self.http = server
            except OSError as exc:
                log.error("health endpoint could not start; going on without it", error=str(exc))
        if self._alert_sub is None:  # set exactly when TELEGRAM_BOT_TOKEN is
            log.info("telegram disabled: no TELEGRAM_BOT_TOKEN set")
        else:
            bot = TelegramBot.from_settings(s, control, self.clock, self.bus, base_url=self.telegram_base_url)
            self.bot = bot
            await bot.start()  # never raises: retries in the background when Telegram is unreachable
            sender = AlertSender(bot.send_message, s.telegram_chat_ids, self.clock,
                                 settings=AlertSettings.from_settings(s), max_queue=ALERT_QUEUE)
            self.alerts = sender
            self._own(sender.run(self._alert_sub), "alerts")
            self._own(sender.run_daily_summary(control), "daily-summary")

    def ready(self, status: str) -> None:
        self.notifier.ready(status=status)

    def tick(self, report: StatusReport | None) -> None:
        """From the supervisor loop only: a frozen loop stops these pings and systemd restarts us."""
        self.notifier.watchdog()
        if report is not None:
            states = ", ".join(f"{e.name} {e.state}" for e in report.engines)
            self.notifier.status(f"{report.trading_state.value}: {states}; equity {report.equity:.2f}")
        metrics = self.metrics
        if metrics is None:
            return
        if report is not None:
            metrics.update_from_status(report)
        if self.looplag is not None:
            metrics.set_loop_lag(self.looplag.last_lag, self.looplag.episodes)
        if self.alerts is not None:
            metrics.set_alerts_dropped(self.alerts.dropped)

    def stopping(self) -> None:
        self.notifier.stopping(status="stopping")

    async def stop(self) -> None:
        """Let the last alerts (final portfolio) go out within a bound, then stop everything."""
        if self.alerts is not None:
            await self.alerts.drain(5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.bot is not None:
            await self.bot.stop()
        if self.http is not None:
            await self.http.stop()
        if self.looplag is not None:
            self.looplag.stop()
        if self._alert_sub is not None and self.alerts is None:
            self.bus.unsubscribe(self._alert_sub)  # start-up ended before Telegram: nobody reads it
