"""The daemon never imports scipy: scipy.signal costs ~1 s of start-up and ~60 MB of memory, and the
indicators' recursions (numpy matrix products over blocks of bars, see engines.indicators) need none
of it. (Their accuracy against the bar-by-bar recursion is pinned in test_indicators_recursion.py.)"""

from __future__ import annotations

import sys


def test_the_daemon_does_not_import_scipy() -> None:
    """scipy.signal costs ~1 s of start-up and ~60 MB: the daemon's import graph must not pull it in."""
    import subprocess

    code = "import main, engines.orchestrator, sys; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
