"""A version counter that many consumers can wait on, on the project's clock.

Engines and the paper exchange share one feed; each remembers the last version it saw and waits for
a newer one. An event that is replaced on every bump wakes every waiter at once without any of them
consuming the notification from the others.
"""

from __future__ import annotations

import asyncio

from core.clock import Clock


class UpdateSignal:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._version = 0
        self._wakes = 0
        self._event = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    def bump(self) -> int:
        self._version += 1
        self._release()
        return self._version

    def wake(self) -> None:
        """Release current waiters without a new version (e.g. a replay ran out of data)."""
        self._wakes += 1
        self._release()

    def _release(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, after: int, timeout: float) -> int:
        """The current version as soon as it is past `after`; the unchanged version on timeout or wake."""
        deadline = self._clock.monotonic() + timeout
        wakes = self._wakes
        while self._version <= after and self._wakes == wakes:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                break
            try:
                await self._clock.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                break
        return self._version
