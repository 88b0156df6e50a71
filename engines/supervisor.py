"""Engine supervision: one slot per engine, a guard that keeps an engine's failure inside its slot, and
the restart policy of DESIGN.md (warn once per stall, restart on RESTART or death, back off, FAILED
after too many restarts in the window).

`asyncio.TaskGroup` is one-for-all: its first failing child cancels every sibling. The guard catches
`Exception` (never `BaseException`), so one engine raising never takes down the other engine, the
supervisor, Telegram or the ledger.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from core.clock import Clock
from core.events import EngineFailed, EngineRestarted, EngineStalled, EngineStarted, EngineStopped, EventBus
from engines.base import BaseEngine
from monitoring.health import HealthMonitor, RestartPolicy, Verdict

log = structlog.get_logger("supervisor")


class SlotState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class EngineSlot:
    name: str
    factory: Callable[[], BaseEngine]
    state: SlotState = SlotState.STARTING
    engine: BaseEngine | None = None
    task: asyncio.Task[None] | None = None
    attempt: int = 0
    warned: bool = False
    restart_at: float | None = None  # on the monotonic clock
    restart_reason: str = ""
    last_error: str | None = None
    orphans: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    """Owns the engine tasks (through the Orchestrator's TaskGroup) and applies the restart policy."""

    def __init__(
        self,
        clock: Clock,
        bus: EventBus,
        health: HealthMonitor,
        policy: RestartPolicy,
        *,
        stop_timeout: float,
        spawn: Callable[[str, BaseEngine], asyncio.Task[None]],
    ) -> None:
        self.clock = clock
        self.bus = bus
        self.health = health
        self.policy = policy
        self.stop_timeout = stop_timeout
        self._spawn_task = spawn
        self.slots: dict[str, EngineSlot] = {}
        self.wake = asyncio.Event()
        self.stopping = False

    def add(self, name: str, factory: Callable[[], BaseEngine]) -> EngineSlot:
        slot = EngineSlot(name=name, factory=factory)
        self.slots[name] = slot
        return slot

    def start(self, name: str) -> None:
        slot = self.slots[name]
        if self.stopping:
            return
        slot.attempt += 1
        engine = slot.factory()
        slot.engine = engine
        slot.warned = False
        slot.restart_at = None
        slot.state = SlotState.RUNNING
        self.health.register(name)
        slot.task = self._spawn_task(name, engine)
        slot.task.add_done_callback(functools.partial(self._on_task_done, name, engine))
        self.bus.publish(EngineStarted(ts=self.clock.now(), engine=name, attempt=slot.attempt))
        log.info("engine spawned", engine=name, attempt=slot.attempt, task=f"engine:{name}")

    async def guard(self, name: str, engine: BaseEngine) -> None:
        """Run one engine; a raised Exception is reported to the supervisor instead of propagating."""
        try:
            await engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            slot = self.slots[name]
            if slot.engine is not engine or slot.state is not SlotState.RUNNING:
                log.info("stopped engine instance raised", engine=name, error=repr(exc))
                return  # an instance being stopped or already replaced: no news
            slot.last_error = f"{type(exc).__name__}: {exc}"
            log.error("engine crashed", engine=name, error=slot.last_error, exc_info=exc)
            if not self.stopping:
                self._schedule_restart(slot, f"crashed: {slot.last_error}")
            return
        slot = self.slots[name]
        if slot.engine is engine and not self.stopping and slot.state is SlotState.RUNNING:
            # An engine loop should only return when asked to stop; anything else is a fault.
            self._schedule_restart(slot, "engine loop returned unexpectedly")

    def _on_task_done(self, name: str, engine: BaseEngine, task: asyncio.Task[None]) -> None:
        """A task cancelled by someone other than the supervisor is an engine lost: restart it."""
        slot = self.slots[name]
        if task.cancelled() and slot.engine is engine and slot.state is SlotState.RUNNING and not self.stopping:
            log.error("engine task cancelled from outside", engine=name)
            self._schedule_restart(slot, "engine task was cancelled")

    def _schedule_restart(self, slot: EngineSlot, reason: str) -> None:
        if self.stopping:
            return
        # Restart times and the restart window are intervals: monotonic, so a step of the wall clock
        # (NTP) neither delays a restart nor stretches the window.
        decision = self.policy.on_restart(slot.name, self.clock.monotonic())
        if not decision.allowed:
            slot.state = SlotState.FAILED
            slot.restart_at = None
            self.health.unregister(slot.name)
            log.error("engine failed: too many restarts", engine=slot.name, reason=reason,
                      restarts=self.policy.restarts(slot.name))
            self.bus.publish(EngineFailed(ts=self.clock.now(), engine=slot.name, reason=reason,
                                          restarts=self.policy.restarts(slot.name)))
            return
        slot.state = SlotState.RESTARTING
        slot.restart_reason = reason
        slot.restart_at = self.clock.monotonic() + decision.backoff
        log.warning("engine restart scheduled", engine=slot.name, reason=reason,
                    backoff_seconds=decision.backoff, attempt=decision.attempt)
        self.bus.publish(EngineRestarted(ts=self.clock.now(), engine=slot.name, reason=reason,
                                         attempt=decision.attempt, backoff_seconds=decision.backoff))
        self.wake.set()

    async def stop_engine(self, slot: EngineSlot, *, graceful: bool = True) -> bool:
        """Ask the engine to stop, then cancel it; True when its task ended within the stop timeout.

        A task that ignores cancellation is kept in `orphans` (still owned, still awaited at shutdown)
        so that a hung engine never blocks the start of its replacement.
        """
        task = slot.task
        if slot.engine is not None:
            slot.engine.stop()
        if task is None or task.done():
            return True
        # A stalled engine has shown it is not running its loop: waiting for it to notice stop() would only
        # delay its replacement. A graceful stop gives it half the timeout to finish its step.
        done = await self._wait_done(task, self.stop_timeout / 2) if graceful else False
        if not done:
            task.cancel()
            done = await self._wait_done(task, self.stop_timeout / 2)
        if not done:
            log.error("engine did not stop in time; abandoning its task", engine=slot.name,
                      stop_timeout=self.stop_timeout)
            slot.orphans.append(task)
        return done

    async def _wait_done(self, task: asyncio.Task[None], timeout: float) -> bool:
        if task.done():
            return True
        try:
            await self.clock.wait_for(asyncio.wait({task}), timeout)
        except TimeoutError:
            return task.done()
        return task.done()

    async def restart_now(self, name: str, reason: str, *, graceful: bool = True) -> None:
        """Stop the running instance and schedule a fresh one under the restart policy."""
        slot = self.slots[name]
        if slot.state in (SlotState.FAILED, SlotState.STOPPED, SlotState.RESTARTING) or self.stopping:
            return  # already being restarted (a stall and a /restart at once start one engine, not two)
        slot.state = SlotState.RESTARTING
        if slot.engine is not None:
            await self.stop_engine(slot, graceful=graceful)
        slot.engine = None
        self._schedule_restart(slot, reason)

    async def tick(self) -> None:
        """One pass of the supervision policy; called every health_check_interval_seconds."""
        now = self.clock.now()
        mono = self.clock.monotonic()
        for slot in list(self.slots.values()):
            if slot.state is SlotState.RUNNING:
                verdict = self.health.verdict(slot.name)
                age = self.health.age(slot.name) or 0.0
                if verdict is Verdict.OK:
                    slot.warned = False
                elif verdict is Verdict.WARN and not slot.warned:
                    slot.warned = True
                    log.warning("engine heartbeat late", engine=slot.name, heartbeat_age=round(age, 1))
                    self.bus.publish(EngineStalled(ts=now, engine=slot.name, heartbeat_age=age))
                elif verdict is Verdict.RESTART:
                    log.error("engine stalled: restarting", engine=slot.name, heartbeat_age=round(age, 1))
                    await self.restart_now(slot.name, f"heartbeat stalled for {age:.0f}s", graceful=False)
            if slot.state is SlotState.RESTARTING and slot.restart_at is not None and mono >= slot.restart_at:
                self.start(slot.name)
            slot.orphans = [t for t in slot.orphans if not t.done()]

    def next_restart_due(self) -> float | None:
        due = [s.restart_at for s in self.slots.values()
               if s.state is SlotState.RESTARTING and s.restart_at is not None]
        return min(due) if due else None

    async def stop_all(self) -> None:
        self.stopping = True
        results = await asyncio.gather(
            *(self.stop_engine(slot) for slot in self.slots.values() if slot.task is not None and not slot.task.done())
        )
        for slot in self.slots.values():
            if slot.state is not SlotState.FAILED:
                slot.state = SlotState.STOPPED
            self.bus.publish(EngineStopped(ts=self.clock.now(), engine=slot.name, reason="shutdown"))
        if not all(results):
            log.error("some engines did not stop within the stop timeout")

    def orphan_tasks(self) -> list[asyncio.Task[None]]:
        return [t for s in self.slots.values() for t in s.orphans if not t.done()]
