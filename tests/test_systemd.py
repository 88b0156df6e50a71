"""sd_notify against a fake NOTIFY_SOCKET, and the property the watchdog rests on: a frozen event loop
sends no WATCHDOG=1, so systemd kills it; when the loop turns again the pings resume."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from core.clock import Clock, LiveClock
from monitoring.systemd import SystemdNotifier


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound where systemd's would be. A short directory under /tmp because
    AF_UNIX paths are limited to ~108 bytes, which pytest's tmp_path can exceed."""
    with tempfile.TemporaryDirectory(prefix="sd") as tmp:
        path = str(Path(tmp) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2.0)
        try:
            yield path, sock
        finally:
            sock.close()


@pytest.fixture
def make_notifier() -> Iterator[Callable[..., SystemdNotifier]]:
    """Notifiers that are closed after the test (each one owns a socket once it has sent)."""
    made: list[SystemdNotifier] = []

    def make(*args: Any, **kwargs: Any) -> SystemdNotifier:
        made.append(SystemdNotifier(*args, **kwargs))
        return made[-1]

    yield make
    for notifier in made:
        notifier.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Everything already queued on the receiving socket, without waiting."""
    out: list[bytes] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2.0)


def test_messages_arrive_verbatim(
    notify_socket: tuple[str, socket.socket], make_notifier: Callable[..., SystemdNotifier]
) -> None:
    path, sock = notify_socket
    notifier = make_notifier(path)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("reconciling ledger with exchange")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.ready(status="trading: spot")
    assert notifier.status("two\nlines")
    assert notifier.extend_timeout(90)
    received = [sock.recv(4096) for _ in range(7)]
    assert received == [
        b"READY=1",
        b"STATUS=reconciling ledger with exchange",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"READY=1\nSTATUS=trading: spot",
        b"STATUS=two lines",  # a newline would end the STATUS value and start a bogus key
        b"EXTEND_TIMEOUT_USEC=90000000",
    ]


def test_socket_path_comes_from_the_environment(
    notify_socket: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    make_notifier: Callable[..., SystemdNotifier],
) -> None:
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert make_notifier().watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_missing_notify_socket_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, make_notifier: Callable[..., SystemdNotifier]
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = make_notifier()
    assert not notifier.enabled
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert logs == []
    assert notifier.send_errors == 0


def test_abstract_namespace_socket(make_notifier: Callable[..., SystemdNotifier]) -> None:
    name = f"kinetic-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        notifier = make_notifier(f"@{name}")
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_unreachable_socket_never_raises_and_logs_once(make_notifier: Callable[..., SystemdNotifier]) -> None:
    with tempfile.TemporaryDirectory(prefix="sd") as tmp:
        notifier = make_notifier(str(Path(tmp) / "nobody-listens"))
        with capture_logs() as logs:
            results = [notifier.watchdog() for _ in range(5)] + [notifier.ready(), notifier.stopping()]
    assert results == [False] * 7
    assert notifier.send_errors == 7
    failures = [e for e in logs if e["event"].startswith("systemd notify failed")]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "warning"


def test_relative_socket_path_is_refused_not_used(make_notifier: Callable[..., SystemdNotifier]) -> None:
    with capture_logs() as logs:
        notifier = make_notifier("relative/notify")
    assert not notifier.enabled
    assert notifier.watchdog() is False
    assert any("neither an absolute path" in e["event"] for e in logs)


def test_full_receive_queue_does_not_block_the_sender(
    notify_socket: tuple[str, socket.socket], make_notifier: Callable[..., SystemdNotifier]
) -> None:
    """systemd not reading its socket must not freeze the daemon: the send is non-blocking."""
    path, _unread = notify_socket
    notifier = make_notifier(path)
    outcome: list[bool] = []

    def flood() -> None:
        outcome.extend(notifier.watchdog() for _ in range(5000))

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive(), "sending to a full notify socket blocked"
    assert outcome[0] is True
    assert outcome[-1] is False  # the queue filled up; the notifier said so instead of blocking


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None, make_notifier: Callable[..., SystemdNotifier]
) -> None:
    notifier = make_notifier("", environ=env)
    assert notifier.watchdog_interval() == expected
    if expected is not None:
        assert notifier.watchdog_timeout() == expected * 2


async def supervisor_tick(clock: Clock, notifier: SystemdNotifier, interval: float, ticks: int) -> None:
    """The shape of the real supervisor loop: check health, then ping the watchdog, then sleep."""
    for _ in range(ticks):
        notifier.watchdog()
        await clock.sleep(interval)


def stuck_engine_step(sock: socket.socket, seconds: float) -> list[bytes]:
    """A blocking call made from a coroutine: the whole loop stops here. Returns what arrived on the
    notify socket while it was blocked (read before returning, i.e. still inside the block)."""
    drain(sock)
    time.sleep(seconds)
    return drain(sock)


async def wait_for_pings(clock: Clock, sock: socket.socket, rounds: int = 200) -> list[bytes]:
    for _ in range(rounds):
        got = drain(sock)
        if got:
            return got
        await clock.sleep(0.005)
    return []


async def test_frozen_loop_stops_watchdog_pings_and_they_resume(
    notify_socket: tuple[str, socket.socket], make_notifier: Callable[..., SystemdNotifier]
) -> None:
    # Real time on purpose: the point is that time passes (ticks fall due) while the loop is frozen.
    clock = LiveClock()
    path, sock = notify_socket
    notifier = make_notifier(path)
    ticker = asyncio.create_task(supervisor_tick(clock, notifier, interval=0.01, ticks=400))
    try:
        assert b"WATCHDOG=1" in await wait_for_pings(clock, sock)

        during_block = stuck_engine_step(sock, 0.3)  # ~30 ticks fall due while frozen
        assert during_block == [], "a frozen loop must not ping the watchdog"

        assert b"WATCHDOG=1" in await wait_for_pings(clock, sock), "pings did not resume"
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
