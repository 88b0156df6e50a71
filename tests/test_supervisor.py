"""Supervision on a simulated clock: a stall warns once then restarts, a crash restarts with backoff,
too many restarts mark the engine FAILED, and whatever one engine does — raise, hang, get cancelled —
the other engine's heartbeats stay on time."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from core.clock import SimClock
from core.events import EngineFailed, EngineRestarted, EngineStalled, EngineStarted, Event, EventBus
from engines.supervisor import SlotState, Supervisor
from monitoring.health import HealthMonitor, RestartPolicy

WARN, RESTART, TICK = 60.0, 300.0, 5.0


class FakeEngine:
    """Beats every `beat` simulated seconds; `behaviour` decides what goes wrong and when."""

    def __init__(self, name: str, clock: SimClock, health: HealthMonitor, behaviour: str = "ok",
                 fail_after: float = 30.0, beat: float = 1.0) -> None:
        self.name = name
        self.clock = clock
        self.health = health
        self.behaviour = behaviour
        self.fail_after = fail_after
        self.beat = beat
        self.stopped = False
        self.beats: list[float] = []

    async def start(self) -> None:
        started = self.clock.now()
        while not self.stopped:
            self.health.heartbeat(self.name)
            self.beats.append(self.clock.now())
            if self.clock.now() - started >= self.fail_after:
                if self.behaviour == "raise":
                    raise RuntimeError("strategy blew up")
                if self.behaviour == "hang":
                    await asyncio.Event().wait()  # stuck forever, but cancellable
            await self.clock.sleep(self.beat)

    def stop(self) -> None:
        self.stopped = True


class Harness:
    def __init__(self, behaviours: dict[str, str], *, max_restarts: int = 3, window: float = 3600.0) -> None:
        self.clock = SimClock()
        self.bus = EventBus()
        self.events = self.bus.subscribe("test", maxsize=100_000)
        self.health = HealthMonitor(self.clock, WARN, RESTART)
        self.policy = RestartPolicy(max_restarts, window, 1.0, 60.0)
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop_task: asyncio.Task[None] | None = None
        self.instances: dict[str, list[FakeEngine]] = {n: [] for n in behaviours}
        self.sup = Supervisor(self.clock, self.bus, self.health, self.policy, stop_timeout=10.0,
                              spawn=self._spawn)
        for name, behaviour in behaviours.items():
            self.sup.add(name, self._factory(name, behaviour))

    def _factory(self, name: str, behaviour: str) -> Callable[[], Any]:
        def make() -> FakeEngine:
            engine = FakeEngine(name, self.clock, self.health, behaviour)
            self.instances[name].append(engine)
            return engine
        return make

    def _spawn(self, name: str, engine: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self.sup.guard(name, engine))
        self.tasks.add(task)
        return task

    async def _supervise(self) -> None:
        while True:
            await self.sup.tick()
            await self.clock.sleep(TICK)

    async def run_for(self, seconds: float) -> None:
        """Run the supervisor loop as its own task, as the Orchestrator does, while the simulated clock
        moves in one-second steps (bounded by `seconds`)."""
        if self.loop_task is None:
            self.loop_task = asyncio.ensure_future(self._supervise())
        for _ in range(int(seconds)):
            await self.clock.advance(1)

    def drained(self) -> list[Event]:
        out = []
        while not self.events.queue.empty():
            out.append(self.events.queue.get_nowait())
        return out

    async def close(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
        stop = asyncio.ensure_future(self.sup.stop_all())
        for _ in range(40):  # engines sleep on the simulated clock: move it so they can notice
            if stop.done():
                break
            await self.clock.advance(1)
        await asyncio.wait_for(stop, 5)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def max_gap(beats: list[float], since: float) -> float:
    times = [b for b in beats if b >= since]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.mark.parametrize("fault", ["raise", "hang", "cancel"])
async def test_one_engine_fault_never_delays_the_other(fault: str) -> None:
    h = Harness({"spot": "ok", "futures": "raise" if fault == "raise" else "hang" if fault == "hang" else "ok"})
    for name in ("spot", "futures"):
        h.sup.start(name)
    if fault == "cancel":
        await h.run_for(20)
        h.sup.slots["futures"].task.cancel()  # type: ignore[union-attr]
    await h.run_for(900)
    spot_beats = [b for e in h.instances["spot"] for b in e.beats]
    assert len(h.instances["spot"]) == 1, "the healthy engine must never be restarted"
    assert max_gap(spot_beats, h.clock.now() - 900 + 1) <= 1.0 + 1e-9
    assert h.sup.slots["spot"].state is SlotState.RUNNING
    assert len(h.instances["futures"]) >= 2, "the faulty engine must have been restarted"
    await h.close()


async def test_stall_warns_once_then_restarts_at_threshold() -> None:
    h = Harness({"futures": "hang"})
    h.sup.start("futures")
    await h.run_for(30 + WARN + 10)  # hangs at t=30; WARN at age 60
    events = h.drained()
    stalled = [e for e in events if isinstance(e, EngineStalled)]
    assert len(stalled) == 1
    assert not [e for e in events if isinstance(e, EngineRestarted)]
    await h.run_for(RESTART)  # past the restart threshold: exactly one restart
    events = h.drained()
    restarts = [e for e in events if isinstance(e, EngineRestarted)]
    assert len(restarts) == 1 and "stalled" in restarts[0].reason
    assert [e for e in events if isinstance(e, EngineStarted)], "a fresh instance starts after backoff"
    assert h.instances["futures"][0].stopped, "the stalled instance was asked to stop"
    await h.close()


async def test_restart_threshold_is_exact() -> None:
    """No restart at an age just below health_restart_seconds; restart once it is reached."""
    h = Harness({"spot": "hang"})
    h.sup.start("spot")
    # Hangs at t=30 (last beat at 30). Ticks happen every 5 s starting at t=0.
    await h.run_for(30 + RESTART - 1)  # now t=329; last tick at t=325 saw age 295 < 300
    assert len(h.instances["spot"]) == 1
    assert h.sup.slots["spot"].state is SlotState.RUNNING
    await h.run_for(1)  # tick at t=330: age 300 -> RESTART (stopping the hung instance takes a few seconds)
    assert h.sup.slots["spot"].state is SlotState.RESTARTING
    await h.run_for(2 * TICK)
    assert any(isinstance(e, EngineRestarted) for e in h.drained())
    await h.close()


async def test_crash_loop_backs_off_then_fails_and_other_engine_trades_on() -> None:
    h = Harness({"spot": "ok", "futures": "raise"}, max_restarts=3, window=3600)
    h.sup.start("spot")
    h.sup.start("futures")
    await h.run_for(600)
    events = h.drained()
    restarts = [e for e in events if isinstance(e, EngineRestarted) and e.engine == "futures"]
    failed = [e for e in events if isinstance(e, EngineFailed)]
    assert [r.backoff_seconds for r in restarts] == [1.0, 2.0, 4.0]
    assert len(failed) == 1 and failed[0].engine == "futures"
    assert h.sup.slots["futures"].state is SlotState.FAILED
    assert len(h.instances["futures"]) == 4  # the first run and three restarts, then no more
    assert h.sup.slots["spot"].state is SlotState.RUNNING
    spot_beats = h.instances["spot"][0].beats
    assert max_gap(spot_beats, 0) <= 1.0 + 1e-9
    await h.close()


async def test_graceful_stop_all_lets_engines_finish() -> None:
    h = Harness({"spot": "ok", "futures": "ok"})
    h.sup.start("spot")
    h.sup.start("futures")
    await h.run_for(20)
    stop = asyncio.ensure_future(h.sup.stop_all())
    await h.clock.advance(2)
    await asyncio.wait_for(stop, 5)
    assert all(s.state is SlotState.STOPPED for s in h.sup.slots.values())
    assert all(t.done() and not t.cancelled() for t in h.tasks), "engines returned on their own"
    await h.close()


class SteppedWallClock(SimClock):
    """Monotonic time as SimClock; wall time may be stepped independently."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> float:
        return self._now + self.offset


class CrashesOnce:
    def __init__(self, clock: SimClock, health: HealthMonitor, crash: bool) -> None:
        self.clock, self.health, self.crash, self.stopped = clock, health, crash, False

    async def start(self) -> None:
        while not self.stopped:
            self.health.heartbeat("spot")
            if self.crash:
                await self.clock.sleep(1)
                raise RuntimeError("boom")
            await self.clock.sleep(1)

    def stop(self) -> None:
        self.stopped = True


async def test_a_wall_clock_step_back_does_not_delay_a_restart() -> None:
    """Restart times are monotonic, as the heartbeat verdicts are: NTP stepping a VPS's clock back an
    hour right after a crash must not leave the engine down for that hour."""
    clock = SteppedWallClock()
    health = HealthMonitor(clock, 60, 300)
    policy = RestartPolicy(5, 3600, 1.0, 60.0)
    made: list[CrashesOnce] = []
    tasks: list[asyncio.Task[None]] = []

    def factory() -> CrashesOnce:
        e = CrashesOnce(clock, health, crash=not made)  # the first instance crashes, later ones run
        made.append(e)
        return e

    def spawn(name: str, engine: Any) -> asyncio.Task[None]:
        t = asyncio.ensure_future(sup.guard(name, engine))
        tasks.append(t)
        return t

    sup = Supervisor(clock, EventBus(), health, policy, stop_timeout=10, spawn=spawn)
    sup.add("spot", factory)
    sup.start("spot")
    await clock.advance(1)  # crashes; restart scheduled 1 s later
    assert sup.slots["spot"].state is SlotState.RESTARTING
    clock.offset = -3600.0  # NTP steps the wall clock back an hour
    for _ in range(30):  # 30 s of supervisor ticks, one a second
        await sup.tick()
        await clock.advance(1)
    state = sup.slots["spot"].state
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert state is SlotState.RUNNING and len(made) == 2, (
        f"engine still {state} 30 s after a 1 s backoff (restart_at={sup.slots['spot'].restart_at}, "
        f"now={clock.now()})")
