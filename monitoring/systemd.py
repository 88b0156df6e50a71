"""systemd's notify protocol (sd_notify), spoken directly over a datagram socket.

The protocol is a few newline-separated `KEY=value` lines sent to the AF_UNIX socket named by
NOTIFY_SOCKET; a library would add a dependency for ten lines of code. Notifying must never harm the
daemon: without NOTIFY_SOCKET (a shell, a test) every call is a no-op, and a send that fails is logged
once and otherwise ignored, because a broken notify socket is systemd's problem, not a reason to stop
trading. The socket is non-blocking so a full receive queue can never stall the event loop.

Who sends what (the daemon's contract with deploy/kinetic-empire.service, Type=notify):
READY=1 once start-up and reconciliation are done; STATUS= lines as the daemon changes phase;
WATCHDOG=1 from the supervisor tick and nowhere else, so a frozen event loop stops the pings and
systemd kills and restarts the process; STOPPING=1 when a graceful stop begins.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("systemd")


def _address(socket_path: str) -> str | bytes | None:
    """NOTIFY_SOCKET as a sendto() address: a filesystem path, or '@name' for the abstract namespace."""
    if socket_path.startswith("@"):
        return b"\0" + socket_path[1:].encode()
    if socket_path.startswith("/"):
        return socket_path
    return None


def _one_line(text: str) -> str:
    """A STATUS value ends at the first newline in the protocol, so keep it on one line."""
    return " ".join(text.split())


class SystemdNotifier:
    """Sends sd_notify messages; safe to call anywhere, never raises."""

    def __init__(self, socket_path: str | None = None, *, environ: Mapping[str, str] | None = None) -> None:
        """`socket_path` None means: take NOTIFY_SOCKET from the environment (absent: every call is a
        no-op). `environ` replaces os.environ for NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        self._environ: Mapping[str, str] = environ if environ is not None else os.environ
        path = socket_path if socket_path is not None else self._environ.get("NOTIFY_SOCKET")
        self._path = path or None
        self._address = _address(path) if path else None
        self._sock: socket.socket | None = None
        self._failed = False
        self.send_errors = 0
        if self._path and self._address is None:
            log.warning("NOTIFY_SOCKET is neither an absolute path nor @abstract; not notifying", path=path)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up (or stop) time, e.g. before a slow reconciliation stage, so
        TimeoutStartSec does not kill a start that is merely slow."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog_timeout(self) -> float | None:
        """systemd's WatchdogSec for this process, or None when the watchdog is off or meant for
        another process (WATCHDOG_PID set to a different pid)."""
        raw = self._environ.get("WATCHDOG_USEC", "").strip()
        if not raw:
            return None
        pid = self._environ.get("WATCHDOG_PID", "").strip()
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(raw)
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    def watchdog_interval(self) -> float | None:
        """The recommended ping period: half of WatchdogSec (sd_watchdog_enabled(3)), so one late
        tick does not get the process killed."""
        timeout = self.watchdog_timeout()
        return timeout / 2 if timeout is not None else None

    def notify(self, message: str) -> bool:
        """Send one raw message; True when it was handed to the kernel. Never raises."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            self.send_errors += 1
            if not self._failed:
                # Logged once for the life of the notifier: a tick every few seconds must not spam.
                self._failed = True
                log.warning("systemd notify failed; further failures are not logged",
                            socket=self._path, error=repr(exc), message=message.split("\n", 1)[0])
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
