"""Supervision: how long from an engine's stall to its restart, and whether restarts disturb the
other engine's ticks.

The real `Supervisor`, `HealthMonitor` and `RestartPolicy` run on a `LiveClock` with the thresholds
scaled down (default: warn 0.2 s, restart 0.5 s, check every 0.05 s, stop timeout 0.1 s, no backoff),
driven by a copy of the Orchestrator's supervisor loop (tick, then wait for the interval, the next
due restart or a wake-up). Two engines:

* "healthy" beats and ticks every 10 ms; every tick's time is recorded.
* "staller" beats every 10 ms for a while (`--baseline` s for the first instance, `--beat-for` s for
  each later one, plus a random fraction of the check interval), then stops beating and waits
  forever: it ignores `stop()` but stays cancellable, so the supervisor cancels it after half the
  stop timeout.

Per stall: stall (its last beat) -> restart decided (`restart_now` entered; the instance method is
wrapped) -> old task finished -> the new instance's first beat. The floor is the restart threshold;
everything above it is detection granularity, the stop timeout, backoff and scheduling.

Healthy tick intervals are reported before the first stall (baseline), during the stall phase, and
for the intervals that overlap a restart (from the decision to the new instance's first beat).

Run from the repository root:
    .venv/bin/python bench/supervisor_bench.py [--stalls 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.clock import LiveClock
from core.events import EngineRestarted, EngineStalled, EngineStarted, EventBus
from engines.supervisor import SlotState, Supervisor
from monitoring.health import HealthMonitor, RestartPolicy
from monitoring.logging import configure_logging

TICK = 0.010


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Stall:
    """perf_counter_ns marks of one stall and its restart (0 = not reached)."""

    last_beat: int = 0
    decided: int = 0
    old_done: int = 0
    new_first_beat: int = 0


@dataclass
class Record:
    healthy_ticks: list[int] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    staller_instances: int = 0
    healthy_instances: int = 0
    events: dict[str, int] = field(default_factory=dict)


class HealthyEngine:
    """Beats and ticks every 10 ms on the clock, like an engine whose loop turns quickly."""

    def __init__(self, name: str, clock: LiveClock, health: HealthMonitor, record: Record) -> None:
        self.name, self.clock, self.health, self.record = name, clock, health, record
        self._stopping = False

    async def start(self) -> None:
        while not self._stopping:
            self.health.heartbeat(self.name)
            self.record.healthy_ticks.append(time.perf_counter_ns())
            await self.clock.sleep(TICK)

    def stop(self) -> None:
        self._stopping = True


class StallingEngine:
    """Beats every 10 ms for `beat_for` seconds, then hangs: deaf to stop(), but cancellable."""

    def __init__(self, name: str, clock: LiveClock, health: HealthMonitor, record: Record, beat_for: float) -> None:
        self.name, self.clock, self.health, self.record = name, clock, health, record
        self.beat_for = beat_for

    async def start(self) -> None:
        first = time.perf_counter_ns()
        if self.record.stalls and self.record.stalls[-1].new_first_beat == 0:
            self.record.stalls[-1].new_first_beat = first
        deadline = first + int(self.beat_for * 1e9)
        last = first
        while True:
            self.health.heartbeat(self.name)
            last = time.perf_counter_ns()
            if last >= deadline:
                break
            await self.clock.sleep(TICK)
        self.record.stalls.append(Stall(last_beat=last))
        await asyncio.Event().wait()  # the stall: no more beats, until cancelled

    def stop(self) -> None:
        """Ignored on purpose: a hung engine does not notice that it was asked to stop."""


async def supervise(sup: Supervisor, clock: LiveClock, interval: float) -> None:
    """The Orchestrator's `_supervise` loop, without its bookkeeping (books, risk, systemd)."""
    while True:
        await sup.tick()
        due = sup.next_restart_due()
        wait = interval if due is None else max(0.0, min(interval, due - clock.monotonic()))
        sup.wake.clear()
        with contextlib.suppress(TimeoutError):
            await clock.wait_for(sup.wake.wait(), wait)


async def one_run(args: argparse.Namespace) -> Record:
    clock = LiveClock()
    bus = EventBus()
    events = bus.subscribe("bench", maxsize=100_000)
    health = HealthMonitor(clock, args.warn, args.restart)
    policy = RestartPolicy(max_restarts=10_000, window_seconds=3600.0, backoff_base=args.backoff,
                           backoff_max=max(args.backoff, 60.0))
    record = Record()
    rng = random.Random(args.seed)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(name: str, engine: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(sup.guard(name, engine))
        task.set_name(f"engine:{name}")
        tasks.add(task)
        if name == "staller":
            def done(_: asyncio.Task[None]) -> None:
                if record.stalls and record.stalls[-1].old_done == 0:
                    record.stalls[-1].old_done = time.perf_counter_ns()
            task.add_done_callback(done)
        return task

    def make_healthy() -> Any:
        record.healthy_instances += 1
        return HealthyEngine("healthy", clock, health, record)

    def make_staller() -> Any:
        record.staller_instances += 1
        # Jitter of one check interval, so stalls start at every phase of the supervisor's tick
        # instead of one fixed phase (restarts happen on a tick, and would otherwise align them).
        jitter = rng.uniform(0.0, args.interval)
        beat_for = (args.baseline if record.staller_instances == 1 else args.beat_for) + jitter
        return StallingEngine("staller", clock, health, record, beat_for)

    sup = Supervisor(clock, bus, health, policy, stop_timeout=args.stop_timeout, spawn=spawn)
    restart_now = sup.restart_now

    async def timed_restart_now(name: str, reason: str, *, graceful: bool = True) -> None:
        if name == "staller" and record.stalls and record.stalls[-1].decided == 0:
            record.stalls[-1].decided = time.perf_counter_ns()
        await restart_now(name, reason, graceful=graceful)

    sup.restart_now = timed_restart_now  # type: ignore[method-assign]
    sup.add("healthy", make_healthy)
    sup.add("staller", make_staller)
    sup.start("healthy")
    sup.start("staller")
    loop_task = asyncio.ensure_future(supervise(sup, clock, args.interval))
    try:
        limit = args.baseline + args.stalls * (args.beat_for + args.restart + 5 * args.stop_timeout + 1.0) + 10
        deadline = time.perf_counter_ns() + int(limit * 1e9)
        while not (len(record.stalls) > args.stalls or
                   (len(record.stalls) == args.stalls and record.stalls[-1].new_first_beat)):
            if time.perf_counter_ns() > deadline:
                raise SystemExit(f"only {len(record.stalls)} stalls within {limit:.0f} s")
            if loop_task.done():
                loop_task.result()
            await clock.sleep(0.05)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        await sup.stop_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if sup.slots["healthy"].state is not SlotState.STOPPED:
        raise SystemExit(f"healthy engine ended {sup.slots['healthy'].state}")
    while not events.queue.empty():
        event = events.queue.get_nowait()
        if isinstance(event, EngineStalled | EngineRestarted | EngineStarted):
            key = f"{event.kind}:{getattr(event, 'engine', '')}"
            record.events[key] = record.events.get(key, 0) + 1
    return record


def ms(ns: float) -> float:
    return ns / 1e6


def intervals(ticks: list[int], start: int, end: int) -> list[float]:
    """Tick-to-tick intervals (ms) whose end lies in [start, end)."""
    return [ms(b - a) for a, b in itertools.pairwise(ticks) if start <= b < end]


def describe(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<26} (no samples)"
    return (f"  {name:<26} n={len(values):<5} p50 {percentile(values, 50):6.2f} ms   "
            f"p99 {percentile(values, 99):6.2f} ms   max {max(values):6.2f} ms")


def report(args: argparse.Namespace, records: list[Record]) -> None:
    print(f"supervisor bench: warn {args.warn:g} s, restart {args.restart:g} s, check every {args.interval:g} s, "
          f"stop timeout {args.stop_timeout:g} s, backoff base {args.backoff:g} s, LiveClock, "
          f"healthy tick {TICK * 1000:g} ms")
    all_latency: list[float] = []
    p99_base: list[float] = []
    p99_during: list[float] = []
    for i, rec in enumerate(records, 1):
        stalls = [s for s in rec.stalls if s.new_first_beat and s.decided and s.old_done][: args.stalls]
        latency = [ms(s.new_first_beat - s.last_beat) for s in stalls]
        detect = [ms(s.decided - s.last_beat) for s in stalls]
        stop = [ms(s.old_done - s.decided) for s in stalls]
        start = [ms(s.new_first_beat - s.old_done) for s in stalls]
        all_latency.extend(latency)
        print(f"\nrun {i}: {len(stalls)} stalls, staller instances {rec.staller_instances}, healthy instances "
              f"{rec.healthy_instances}, events {dict(sorted(rec.events.items()))}")
        print(f"  stall -> restart (new instance's first beat): median {statistics.median(latency):6.1f} ms  "
              f"(min {min(latency):.1f}, max {max(latency):.1f})")
        print(f"    stall -> restart decided        median {statistics.median(detect):6.1f} ms  "
              f"(min {min(detect):.1f}, max {max(detect):.1f}; threshold {args.restart * 1000:g})")
        print(f"    decided -> old task finished    median {statistics.median(stop):6.1f} ms  "
              f"(min {min(stop):.1f}, max {max(stop):.1f}; stop timeout / 2 = {args.stop_timeout * 500:g})")
        print(f"    old task -> new first beat      median {statistics.median(start):6.1f} ms  "
              f"(min {min(start):.1f}, max {max(start):.1f})")
        first_stall = rec.stalls[0].last_beat
        end = rec.healthy_ticks[-1] + 1
        base = intervals(rec.healthy_ticks, rec.healthy_ticks[0], first_stall)
        during = intervals(rec.healthy_ticks, first_stall, end)
        around: list[float] = []
        for s in stalls:
            around.extend(intervals(rec.healthy_ticks, s.decided, s.new_first_beat + int(TICK * 2e9)))
        print("  healthy engine tick interval:")
        print(describe("before any stall", base))
        print(describe("during the stall phase", during))
        print(describe("overlapping a restart", around))
        p99_base.append(percentile(base, 99))
        p99_during.append(percentile(during, 99))
    print(f"\nover {len(records)} run(s): stall -> restart median {statistics.median(all_latency):.1f} ms "
          f"(n={len(all_latency)}, min {min(all_latency):.1f}, max {max(all_latency):.1f}); "
          f"healthy tick p99 before {statistics.median(p99_base):.2f} ms "
          f"(range {min(p99_base):.2f}-{max(p99_base):.2f}), during {statistics.median(p99_during):.2f} ms "
          f"(range {min(p99_during):.2f}-{max(p99_during):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stalls", type=int, default=10, help="stalls (and restarts) per run")
    parser.add_argument("--repeat", type=int, default=3, help="independent runs")
    parser.add_argument("--warn", type=float, default=0.2, help="HEALTH_WARNING_SECONDS, scaled down")
    parser.add_argument("--restart", type=float, default=0.5, help="HEALTH_RESTART_SECONDS, scaled down")
    parser.add_argument("--interval", type=float, default=0.05, help="HEALTH_CHECK_INTERVAL_SECONDS")
    parser.add_argument("--stop-timeout", type=float, default=0.1, help="HEALTH_STOP_TIMEOUT_SECONDS")
    parser.add_argument("--backoff", type=float, default=0.0, help="HEALTH_BACKOFF_BASE_SECONDS")
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds before the first stall")
    parser.add_argument("--beat-for", type=float, default=0.3, help="seconds a restarted staller beats")
    parser.add_argument("--seed", type=int, default=1, help="seed of the stall-phase jitter")
    args = parser.parse_args()
    if args.stalls < 1 or args.repeat < 1 or not 0 < args.warn < args.restart:
        parser.error("need --stalls >= 1, --repeat >= 1 and 0 < --warn < --restart")
    with open(os.devnull, "w") as sink:
        configure_logging("json", "INFO", stream=sink)  # the daemon's log pipeline, lines discarded
        records = [asyncio.run(one_run(args)) for _ in range(args.repeat)]
    report(args, records)


if __name__ == "__main__":
    main()
