"""DESIGN.md's import direction and ownership rules, enforced so the map cannot drift from the code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_linter_contracts_hold() -> None:
    proc = subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


PACKAGES = ("core", "exchange", "risk", "storage", "monitoring", "engines", "backtest")


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_top_level_modules_keep_their_place() -> None:
    """import-linter only maps packages; config.py and main.py are checked here. config sits just
    above core; nothing imports main; core never imports config."""
    config_imports = imported_roots(ROOT / "config.py") & {*PACKAGES, "main"}
    assert config_imports <= {"core"}, config_imports
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            roots = imported_roots(path)
            assert "main" not in roots, f"{path} imports main"
            if package == "core":
                assert "config" not in roots, f"{path}: core must not import config"


def test_no_direct_clock_calls_outside_core_clock() -> None:
    """One clock: nothing reads the wall clock or sleeps except through core/clock.py."""
    pattern = re.compile(r"time\.time\(|time\.monotonic\(|datetime\.(now|utcnow)\(|asyncio\.sleep\(")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "tests", "bench"} or rel.as_posix() in {
            "core/clock.py",
            "monitoring/looplag.py",  # a watchdog thread measures real time by nature
        }:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
