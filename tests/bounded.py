"""A bound on an async test's whole run, so a hang fails the test instead of the CI job."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def bounded(seconds: float) -> Callable[[F], F]:
    """Fail a test that runs longer than `seconds` instead of hanging the suite."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)
        return run  # type: ignore[return-value]
    return deco
