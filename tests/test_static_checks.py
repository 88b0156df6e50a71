"""The type checker is part of the suite: value types (`core.values.value_type`) are read-only only to
mypy, so a field assignment anywhere in the program must fail CI, not slip into a run."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import textwrap
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from core.events import OrderPlaced
from core.types import Fill, MarketType, OrderIntent, OrderType, Side, Ticker
from core.values import value_type
from exchange.base import OrderRequest, OrderUpdate

ROOT = Path(__file__).resolve().parent.parent


def _mypy(*args: str, cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_mypy_passes_on_the_whole_program(tmp_path: Path) -> None:
    """Strict mypy over every package the daemon runs (pyproject's [tool.mypy] files)."""
    result = _mypy("--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_mypy_rejects_assigning_to_a_value_field(tmp_path: Path) -> None:
    """What `frozen=True` refused at run time, mypy refuses before: every assignment below is an error,
    and the one line that makes a changed copy is not."""
    snippet = tmp_path / "mutates.py"
    snippet.write_text(textwrap.dedent("""
        import dataclasses
        from decimal import Decimal
        from core.events import Event, OrderPlaced
        from core.types import OrderIntent, Ticker
        from exchange.base import OrderRequest

        def mutate(t: Ticker, i: OrderIntent, r: OrderRequest, e: OrderPlaced, b: Event) -> OrderIntent:
            t.bid = Decimal(1)
            i.amount = Decimal(2)
            r.client_order_id = "x"
            e.engine = "futures"
            b.ts = 0.0
            return dataclasses.replace(i, amount=Decimal(3))
    """))
    result = _mypy("--strict", "--ignore-missing-imports", "--cache-dir", str(tmp_path / "cache"), str(snippet))
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 5, result.stdout
    assert all("read-only" in line for line in errors), result.stdout
    assert {line.split(":")[1] for line in errors} == {"9", "10", "11", "12", "13"}, result.stdout


def _program_sources() -> list[Path]:
    """Every module the daemon is made of: the packages and top-level modules pyproject installs."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = sorted({pattern.rstrip("*") for pattern in setup["packages"]["find"]["include"]})
    files = [ROOT / f"{module}.py" for module in setup["py-modules"]]
    for package in packages:
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return files


def test_mypy_checks_every_module_of_the_program() -> None:
    """Dropping a package from mypy's files would let the whole-program test above pass unseen."""
    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    checked = {ROOT / entry for entry in configured}

    def covered(path: Path) -> bool:
        return any(path == entry or entry in path.parents for entry in checked)

    sources = _program_sources()
    assert len(sources) > 50
    assert [path for path in sources if not covered(path)] == []


def test_the_program_deletes_no_attribute() -> None:
    """`del value.field` is the one change to a value that neither mypy nor the run time refuses (see
    core/values.py), so the program must not delete attributes at all."""
    found = []
    for path in _program_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Delete):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}" for target in node.targets
                          if isinstance(target, ast.Attribute)]
    assert found == []


def test_a_value_keeps_what_frozen_gave_it() -> None:
    """Equality and hash by fields, slots (no per-instance dict), replace(); keyword-only on request."""
    a = Ticker("BTC/USDT", bid=Decimal("100"), ask=Decimal("101"), last=Decimal("100.5"), ts=1.0)
    b = Ticker("BTC/USDT", bid=Decimal("100"), ask=Decimal("101"), last=Decimal("100.5"), ts=1.0)
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert not hasattr(a, "__dict__")
    moved = dataclasses.replace(a, bid=Decimal("99"))
    assert moved.bid == Decimal("99") and a.bid == Decimal("100") and moved != a
    with pytest.raises(TypeError):
        OrderPlaced(1.0, "spot", "cid", "BTC/USDT", Side.BUY, OrderType.MARKET, Decimal(1), None, False)  # type: ignore[call-arg]


def test_values_on_the_order_path_are_value_types() -> None:
    """The types an order builds are value types, so mypy guards them (a plain dataclass would not be)."""
    for cls in (Ticker, OrderIntent, OrderRequest, OrderUpdate, Fill, OrderPlaced):
        assert dataclasses.is_dataclass(cls)
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.eq and params.unsafe_hash, cls
        assert "__slots__" in vars(cls), cls
    intent = OrderIntent(engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.BUY,
                         amount=Decimal("0.01"), order_type=OrderType.MARKET)
    assert intent == dataclasses.replace(intent)


def test_value_type_with_a_list_field_is_unhashable_as_before() -> None:
    @value_type
    class Basket:
        name: str
        items: list[int] = dataclasses.field(default_factory=list)

    basket = Basket("b")
    assert basket == Basket("b", [])
    with pytest.raises(TypeError):
        hash(basket)
