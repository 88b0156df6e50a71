"""The indicators' short-window recursion (Python, so the daemon never imports scipy) gives exactly the
floats of scipy's C lfilter, so live windows and long backtests agree to the bit."""

from __future__ import annotations

import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import lfilter as scipy_lfilter

from engines.indicators import _PY_FILTER_MAX, lfilter

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    x=st.lists(finite, min_size=1, max_size=300),
    b=st.lists(st.floats(min_value=-2, max_value=2), min_size=1, max_size=3),
    a_tail=st.lists(st.floats(min_value=-0.99, max_value=0.99), min_size=1, max_size=2),
    zi_seed=finite,
)
def test_python_path_equals_scipy_bit_for_bit(x: list[float], b: list[float], a_tail: list[float],
                                              zi_seed: float) -> None:
    a = np.array([1.0, *a_tail])
    bb = np.array(b)
    order = max(len(a), len(bb)) - 1
    zi = np.full(order, zi_seed)
    xs = np.array(x)
    ours, our_state = lfilter(bb, a, xs, zi)
    theirs, their_state = scipy_lfilter(bb, a, xs, zi=zi)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(our_state, their_state)
    assert len(xs) <= _PY_FILTER_MAX  # this test exercises the Python path


def test_the_daemon_does_not_import_scipy() -> None:
    """scipy.signal costs ~1 s of start-up and ~60 MB: the daemon's import graph must not pull it in."""
    import subprocess

    code = "import main, engines.orchestrator, sys; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
