"""The loop-lag monitor names the code that froze the event loop, once per episode, and notices the
recovery. Real (short) time on purpose: a blocked loop is a real-time phenomenon."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from structlog.testing import capture_logs

from core.clock import LiveClock
from monitoring.looplag import LoopLagMonitor

THRESHOLD = 0.1
CHECK = 0.02


def parse_huge_exchange_info_synchronously(seconds: float) -> None:
    """Stands in for the classic culprit: a CPU-bound or blocking call made inside a coroutine."""
    time.sleep(seconds)


async def wait_until(condition: Callable[[], bool], rounds: int = 200) -> bool:
    clock = LiveClock()
    for _ in range(rounds):
        if condition():
            return True
        await clock.sleep(0.01)
    return condition()


def await_condition(condition: Callable[[], bool], rounds: int = 200) -> bool:
    """Outside any loop: poll with a thread-friendly wait (bounded to ~2 s)."""
    pause = threading.Event()
    for _ in range(rounds):
        if condition():
            return True
        pause.wait(0.01)
    return condition()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_blocked_loop_logs_the_blocking_stack_once_per_episode() -> None:
    monitor = LoopLagMonitor(asyncio.get_running_loop(), threshold_seconds=THRESHOLD, check_seconds=CHECK)
    with capture_logs() as logs:
        monitor.start()
        try:
            await LiveClock().sleep(0.1)
            parse_huge_exchange_info_synchronously(0.6)  # six thresholds long: still one episode
            assert await wait_until(lambda: len(events(logs, "event loop turning again")) == 1)
            parse_huge_exchange_info_synchronously(0.3)  # a second, separate episode
            assert await wait_until(lambda: len(events(logs, "event loop turning again")) == 2)
        finally:
            monitor.stop()

    blocked = events(logs, "event loop blocked")
    assert len(blocked) == 2
    for entry in blocked:
        assert entry["log_level"] == "error"
        assert entry["blocked_in"].startswith("parse_huge_exchange_info_synchronously")
        assert "parse_huge_exchange_info_synchronously" in entry["stack"]
        # The stack leads back to the coroutine that made the blocking call.
        assert "test_blocked_loop_logs_the_blocking_stack_once_per_episode" in entry["stack"]
    recovered = events(logs, "event loop turning again")
    assert recovered[0]["blocked_seconds"] >= 0.5
    assert recovered[0]["log_level"] == "warning"
    assert monitor.episodes == 2
    assert monitor.max_lag >= 0.5
    assert not monitor.stalled


async def test_a_responsive_loop_logs_nothing() -> None:
    monitor = LoopLagMonitor(asyncio.get_running_loop(), threshold_seconds=0.5, check_seconds=CHECK)
    with capture_logs() as logs:
        monitor.start()
        try:
            for _ in range(20):
                await LiveClock().sleep(0.01)
        finally:
            monitor.stop()
    assert logs == []
    assert monitor.episodes == 0
    assert monitor.max_lag < 0.5


async def test_stop_joins_the_thread_even_while_the_loop_is_blocked() -> None:
    monitor = LoopLagMonitor(asyncio.get_running_loop(), threshold_seconds=0.05, check_seconds=CHECK)
    with capture_logs():
        monitor.start()
        parse_huge_exchange_info_synchronously(0.3)
        watchers = [t for t in threading.enumerate() if t.name == "looplag"]
        monitor.stop(timeout=1.0)  # called from the loop thread before the loop has turned again
    assert len(watchers) == 1
    assert not watchers[0].is_alive()
    assert monitor.episodes == 1


def test_monitor_of_a_closed_loop_ends_by_itself() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    monitor = LoopLagMonitor(loop, threshold_seconds=0.05, check_seconds=CHECK)
    monitor.start()
    assert await_condition(lambda: not monitor.running)
    monitor.stop()
