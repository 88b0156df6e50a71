"""DESIGN.md's import direction and ownership rules, enforced so the map cannot drift from the code."""

from __future__ import annotations

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
