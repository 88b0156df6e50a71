"""The daemon under a (fake) systemd: READY=1 only after start-up and reconciliation, STATUS lines,
WATCHDOG=1 pings from the supervisor tick, STOPPING=1 at SIGTERM, and exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import Settings

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def pings_after_ready(messages: list[str]) -> int:
    """WATCHDOG=1 pings after READY=1: the supervisor starts ticking (and pinging) during start-up, and
    a ping may come before READY, which systemd ignores."""
    lines = [line for m in messages for line in m.splitlines()]
    return lines[lines.index("READY=1"):].count("WATCHDOG=1") if "READY=1" in lines else 0


def test_notify_protocol_from_the_real_daemon(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update({"NOTIFY_SOCKET": str(sock_path), "DATA_DIR": str(tmp_path / "data"), "LOG_FORMAT": "json",
                "PYTHONPATH": str(ROOT), "HEALTH_CHECK_INTERVAL_SECONDS": "0.2", "LOOPLAG_ENABLED": "false"})
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--replay", "--speed", "3000"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pings_after_ready(messages) < 5:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        rc = proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
        sock.close()
    assert rc == 0
    lines = [line for m in messages for line in m.splitlines()]
    assert "READY=1" in lines
    ready_at = lines.index("READY=1")
    # Start-up progress is reported before READY, reconciliation among it.
    assert any(line.startswith("STATUS=starting: reconciliation") for line in lines[:ready_at])
    assert sum(line == "WATCHDOG=1" for line in lines[ready_at:]) >= 5
    assert any(line.startswith("STATUS=active") for line in lines[ready_at:])
    assert "STOPPING=1" in lines[ready_at:]
