"""End to end: the daemon as a subprocess in replay mode trades, takes SIGTERM, exits 0 and logs the final
portfolio; started again on the same DATA_DIR it resumes its positions and its breaker state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config import Settings

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


class Daemon:
    def __init__(self, data_dir: Path, env: dict[str, str], speed: float = 3000) -> None:
        self.log_path = data_dir / f"daemon-{time.monotonic_ns()}.log"
        base = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
        base.update({"DATA_DIR": str(data_dir), "LOG_FORMAT": "json", "PYTHONPATH": str(ROOT),
                     "HEALTH_CHECK_INTERVAL_SECONDS": "0.2", "LOOPLAG_ENABLED": "false"})
        base.update(env)
        base.pop("NOTIFY_SOCKET", None)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--replay", "--speed", str(speed)],
            cwd=data_dir, env=base, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.events()
            if predicate(evs):
                return evs
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise AssertionError(f"daemon exited early ({self.proc.returncode}):\n{tail}")
            time.sleep(0.1)
        raise AssertionError(f"condition not met in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._log.close()
        return rc


def named(evs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("event") == event]


def test_replay_trades_stops_on_sigterm_and_resumes_positions(tmp_path: Path) -> None:
    first = Daemon(tmp_path, {})
    try:
        first.wait_for(lambda evs: named(evs, "exit") and named(evs, "entry"), timeout=90)
        # Stop while holding at least one position, so the restart has something to resume.
        first.wait_for(lambda evs: len(named(evs, "entry")) > len(named(evs, "exit")), timeout=90)
    finally:
        rc = first.terminate()
    evs = first.events()
    assert rc == 0, first.log_path.read_text()[-3000:]
    final = named(evs, "final portfolio")
    assert len(final) == 1
    spot = final[0]["engines"]["spot"]
    held = sorted(p["symbol"] for p in spot["positions"])
    assert Settings.model_fields["paper_starting_balance"].default != final[0]["equity"]
    assert named(evs, "stopped"), "the shutdown ran to its end"
    assert not [e for e in evs if e.get("level") in ("error", "critical")], [
        e for e in evs if e.get("level") in ("error", "critical")]

    second = Daemon(tmp_path, {})
    try:
        evs2 = second.wait_for(lambda evs: named(evs, "engine started"), timeout=60)
    finally:
        rc2 = second.terminate()
    assert rc2 == 0
    started = named(evs2, "engine started")[0]
    assert started["positions"] == len(held)
    evs2 = second.events()
    final2 = named(evs2, "final portfolio")[0]["engines"]["spot"]
    held2 = sorted(p["symbol"] for p in final2["positions"])
    # Positions may have been closed by exits in the second run, never invented or lost silently.
    assert set(held2) <= set(held) | {e["symbol"] for e in named(evs2, "entry")}
    # The replay resumed where it stopped instead of starting the history again.
    resumed = named(evs2, "replay started")[0]
    assert resumed["cursor"] > named(evs, "replay started")[0]["cursor"]


def test_breaker_trip_survives_a_restart(tmp_path: Path) -> None:
    env = {"GLOBAL_MAX_DRAWDOWN_PCT": "0.01", "GLOBAL_CIRCUIT_BREAKER_COOLDOWN_MINUTES": "600"}
    first = Daemon(tmp_path, env)
    try:
        first.wait_for(lambda evs: any(e.get("new") == "reducing" for e in named(evs, "trading state changed")),
                       timeout=90)
    finally:
        rc = first.terminate()
    assert rc == 0
    assert named(first.events(), "final portfolio")[0]["trading_state"] == "reducing"

    second = Daemon(tmp_path, env)
    try:
        evs = second.wait_for(lambda evs: named(evs, "daemon started"), timeout=60)
        time.sleep(2)  # let it see a few hundred bars: no entry may pass while REDUCING
    finally:
        rc2 = second.terminate()
    assert rc2 == 0
    evs = second.events()
    assert named(evs, "risk state")[0]["trading_state"] == "reducing"
    assert not named(evs, "entry"), "no new entries while the breaker is tripped"
    assert named(evs, "final portfolio")[0]["trading_state"] == "reducing"
