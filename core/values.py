"""`value_type`: the decorator for the program's value types (prices, intents, orders' requests and
answers, fills, events, readings): immutable to the type checker, plain slotted dataclasses at run time.

Why not `@dataclass(frozen=True)`: a frozen dataclass blocks assignment with a `__setattr__` of its
own, so its `__init__` has to set every field through `object.__setattr__`, a global lookup and a call
per field. A 12-field value costs about 0.9 us to build that way against 0.15 us for a plain slotted
one (measured here), and one order builds some forty values (candles, the intent, the request, the
answer, fills, events, results): about a tenth of the path from a price update to the order
(bench/tick_to_order_bench.py). So assignment is refused where it costs nothing, before the program
runs: `dataclass_transform(frozen_default=True)` makes mypy treat every field as read-only, and the
test suite runs mypy over the whole program (tests/test_static_checks.py), so code that assigns to a
value's field does not pass CI. `dataclasses.replace` is the way to a changed copy, as before.

What stays as with `frozen=True, slots=True`: equality by fields, a hash from the fields (so values
can be dict keys and set members, and one holding a list is unhashable), `__slots__`, `replace`,
`fields`, `asdict`, keyword-only fields on request. What goes: `del value.field` raising (mypy does
not flag it either, and a `__delattr__` of our own would take the fast assignment away again, since
CPython routes setting and deleting through one slot; the suite checks that the program deletes no
attribute anywhere), and pickling with the ancient protocols 0 and 1. Subclass a value type only with
`value_type`: a frozen dataclass cannot inherit from it, and mypy would not say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass, field
from typing import Any, TypeVar, dataclass_transform, overload

T = TypeVar("T")


@overload
def value_type(cls: type[T], /) -> type[T]: ...


@overload
def value_type(*, kw_only: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def value_type(cls: type[T] | None = None, /, *, kw_only: bool = False) -> Any:
    """`@value_type` or `@value_type(kw_only=True)` on a class with annotated fields, as `@dataclass`."""

    def make(c: type[T]) -> type[T]:
        return dataclass(slots=True, unsafe_hash=True, kw_only=kw_only)(c)

    return make if cls is None else make(cls)


__all__ = ["value_type"]
