"""Running a coroutine's first step by hand, and awaiting the rest of it.

Awaiting a coroutine runs it at once, in the awaiting task, up to its first suspension; many of the
program's calls never get that far (the paper exchanges answer without awaiting anything). Wrapping
such a call in machinery that only matters once it suspends costs time on the order path: a timeout
scope is about 3.3 us here, a task of its own a turn of the event loop. So a caller may step the
coroutine itself (`first_step`) and pay for that machinery only when it did suspend, awaiting
the `CarryOn` it returns for the rest, which behaves exactly as the `await` it replaces would have from that point.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, Generic, TypeGuard, TypeVar

from core.values import value_type

T = TypeVar("T")


class CarryOn(Generic[T]):
    """The rest of a coroutine that was stepped by hand and suspended where it yielded `yielded`:
    awaited, it is what `yield from coro` would have been from that point on. The first resume hands
    the event loop what the coroutine yielded; later ones send the loop's answers in; a cancellation or
    timeout is thrown into the coroutine, and closing closes it. (A class rather than a generator, so
    that what the coroutine raises while handling a thrown exception is not chained to it, as with
    `yield from`.)"""

    def __init__(self, coro: Coroutine[Any, Any, T], yielded: Any) -> None:
        self._coro = coro
        self._pending: list[Any] = [yielded]

    def __await__(self) -> Generator[Any, Any, T]:
        return self  # an iterator with send/throw/close, as a generator is

    def __iter__(self) -> CarryOn[T]:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        if self._pending:
            return self._pending.pop()
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:
        self._pending.clear()
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._pending.clear()
        self._coro.close()


@value_type
class Done(Generic[T]):
    """A call that finished in its first step, with its result (see `first_step`)."""

    value: T


def is_unstarted(aw: object) -> TypeGuard[Coroutine[Any, Any, Any]]:
    """A native coroutine that has not run yet, so `first_step` may run it: not one already suspended
    or running (stepping it would resume it out of turn), nor any other awaitable (a future, a task,
    an object with `__await__`), which is left to `await`."""
    return (type(aw) is types.CoroutineType and aw.cr_frame is not None and not aw.cr_running
            and not aw.cr_suspended)


def first_step(aw: Awaitable[T]) -> Done[T] | Awaitable[T]:
    """Run `aw` up to its first suspension, as awaiting it would: `Done` with its result when it
    finished without suspending; else what to await (in the same task) for the rest, a `CarryOn`.
    An awaitable that cannot be stepped by hand (see `is_unstarted`) comes back as it is, unrun.
    Whatever the step raises propagates, as from `await`."""
    if not is_unstarted(aw):
        return aw
    try:
        yielded = aw.send(None)
    except StopIteration as done:
        return Done(done.value)
    return CarryOn(aw, yielded)


__all__ = ["CarryOn", "Done", "first_step", "is_unstarted"]
