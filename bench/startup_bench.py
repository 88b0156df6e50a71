"""Start-up: process start to the first engine heartbeat of `python main.py --replay`.

Each run starts the daemon as a subprocess in a fresh temporary DATA_DIR with LOG_FORMAT=json and no
.env file, reads its log lines (stderr) as they arrive, and stops the clock at the spot engine's
"engine started" line. That line is logged by `BaseEngine.start()` right after its first
`heartbeat()` and `load_state()` (one ledger read), so it trails the first beat by about a
millisecond; the figure is therefore process start -> first heartbeat, plus that read, plus the
pipe. Then SIGINT stops the daemon (it must exit 0).

Before the timed runs, one run under `python -X importtime` checks that the libraries live mode
loads (ccxt, telegram, pandas, structlog, pydantic_settings) are all imported by the time the engine
starts, so the replay figure is the live one's too; if one is missing, an extra variant imports them
first. The same run prints what each import cost inside the daemon. The bare import time of those
libraries (a fresh interpreter importing only them) is measured in the same run too.

Two start-up variants: "no bytecode cache" is what the environment gives (this repository has no
`__pycache__`, and PYTHONDONTWRITEBYTECODE=1 here as in deploy/kinetic-empire.service, so the
project's own modules are compiled on every start); "bytecode cached" points PYTHONPYCACHEPREFIX at a
temporary folder warmed by one unmeasured start, as `python -m compileall` at install would give.

Target: median <= 2.5 s. Run from the repository root:
    .venv/bin/python bench/startup_bench.py [--runs 5] [--variants both|inherit|cached]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

LIVE_LIBRARIES = ("ccxt", "ccxt.async_support", "telegram", "telegram.ext", "pandas", "structlog",
                  "pydantic_settings")
BARE_IMPORTS = ("ccxt.async_support", "telegram.ext", "pandas", "structlog", "pydantic_settings")
ALSO_LOADED = ("numpy", "aiohttp", "prometheus_client")
MILESTONES = {
    "first log line": None,
    "market connection stage": "start-up stage:market connection",
    "replay started": "replay started",
    "engine started": "engine started",
    "daemon started": "daemon started",
}
STOP_TIMEOUT = 30.0
START_TIMEOUT = 60.0
IMPORT_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$")


@dataclass
class StartRun:
    seconds: dict[str, float] = field(default_factory=dict)  # milestone -> seconds after spawn
    imported_before_engine: set[str] = field(default_factory=set)
    cumulative_us: dict[str, int] = field(default_factory=dict)  # module -> first import, cumulative
    exit_code: int | None = None


def _reader(stream: object, out: queue.Queue[tuple[int, str | None]]) -> None:
    """Timestamp each line as it arrives (a thread, so a silent daemon cannot block the bench)."""
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        out.put((time.perf_counter_ns(), line))
    out.put((time.perf_counter_ns(), None))


def _milestone(record: dict[str, object]) -> str | None:
    event = record.get("event")
    if event == "start-up stage":
        return f"start-up stage:{record.get('stage')}"
    return event if isinstance(event, str) else None


def start_daemon(env: dict[str, str], *, importtime: bool = False, preimport: bool = False) -> StartRun:
    """One start: spawn, wait for the engine, stop with SIGINT, collect the milestones."""
    run = StartRun()
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        env = {**env, "DATA_DIR": str(Path(tmp) / "var"), "LOG_FORMAT": "json"}
        daemon_args = ["--replay", "--env-file", os.devnull]
        if preimport:
            code = (f"import {', '.join(BARE_IMPORTS)}; import runpy, sys; "
                    f"sys.argv = ['main.py', *{daemon_args!r}]; runpy.run_path('main.py', run_name='__main__')")
            argv = [PYTHON, "-c", code]
        else:
            argv = [PYTHON, *(["-X", "importtime"] if importtime else []), "main.py", *daemon_args]
        lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        t0 = time.perf_counter_ns()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=_reader, args=(proc.stderr, lines), daemon=True)
        reader.start()
        imported: set[str] = set()
        try:
            engine_seen = False
            deadline = time.perf_counter_ns() + int(START_TIMEOUT * 1e9)
            while True:
                try:
                    ts, line = lines.get(timeout=max(0.0, (deadline - time.perf_counter_ns()) / 1e9))
                except queue.Empty:
                    raise RuntimeError(f"no 'engine started' within {START_TIMEOUT:g}s") from None
                if line is None:
                    raise RuntimeError(f"daemon exited before its engine started (code {proc.wait()})")
                match = IMPORT_RE.match(line.rstrip("\n"))
                if match is not None:
                    module = match.group(4)
                    imported.add(module)
                    run.cumulative_us.setdefault(module, int(match.group(2)))
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                name = _milestone(record)
                run.seconds.setdefault("first log line", (ts - t0) / 1e9)
                for label, event in MILESTONES.items():
                    if event is not None and name == event:
                        run.seconds.setdefault(label, (ts - t0) / 1e9)
                if name == "engine started" and not engine_seen:
                    engine_seen = True
                    run.imported_before_engine = set(imported)
                if "daemon started" in run.seconds and "engine started" in run.seconds:
                    break
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                run.exit_code = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                run.exit_code = proc.wait()
            reader.join(timeout=5)
    return run


def bare_imports(env: dict[str, str]) -> dict[str, float]:
    """Seconds per library imported one after another in a fresh interpreter (shared dependencies
    count where first loaded), plus the total, plus interpreter start-up to exit for `-c pass`."""
    code = (
        "import time, json\n"
        "out = {}\n"
        "t_all = time.perf_counter_ns()\n"
        f"for name in {list(BARE_IMPORTS + ALSO_LOADED)!r}:\n"
        "    t = time.perf_counter_ns()\n"
        "    __import__(name)\n"
        "    out[name] = (time.perf_counter_ns() - t) / 1e9\n"
        f"    if name == {BARE_IMPORTS[-1]!r}:\n"
        "        out['total (the five)'] = (time.perf_counter_ns() - t_all) / 1e9\n"
        "out['total (all listed)'] = (time.perf_counter_ns() - t_all) / 1e9\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                          timeout=120)
    result: dict[str, float] = json.loads(done.stdout)
    t0 = time.perf_counter_ns()
    subprocess.run([PYTHON, "-c", "pass"], cwd=ROOT, env=env, check=True, timeout=60)
    result["interpreter start+exit (-c pass)"] = (time.perf_counter_ns() - t0) / 1e9
    return result


def spread(values: list[float]) -> str:
    return (f"median {statistics.median(values):6.3f} s  (min {min(values):.3f}, max {max(values):.3f}, "
            f"n={len(values)})")


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    preimport: bool = False
    results: list[StartRun] = field(default_factory=list)


def measure(variants: list[Variant], runs: int, env: dict[str, str]) -> None:
    """Runs interleaved (A, B, bare imports, A, B, ...) so drift in the shared machine's load hits
    every variant alike."""
    for v in variants:
        start_daemon(v.env, preimport=v.preimport)  # warms any bytecode cache and the OS page cache
    bare: list[dict[str, float]] = []
    for _ in range(runs):
        for v in variants:
            v.results.append(start_daemon(v.env, preimport=v.preimport))
        bare.append(bare_imports(env))
    print(f"\nbare imports in a fresh interpreter, in this order, median of {len(bare)}:")
    for key in bare[0]:
        values = [b[key] for b in bare]
        print(f"  {key:<34} {statistics.median(values):6.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    for v in variants:
        print(f"\n{v.name}:")
        for label in MILESTONES:
            values = [r.seconds[label] for r in v.results if label in r.seconds]
            if values:
                print(f"  {label:<24} {spread(values)}")
        print("  per run (engine started): " + ", ".join(f"{r.seconds['engine started']:.3f}" for r in v.results))
        bad = [r.exit_code for r in v.results if r.exit_code != 0]
        if bad:
            print(f"  WARNING: exit codes after SIGINT {bad} (expected 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed starts per variant (>= 5 recommended)")
    parser.add_argument("--variants", choices=["both", "inherit", "cached"], default="both")
    parser.add_argument("--preimport", action="store_true",
                        help="also time a start that imports the live-mode libraries first")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "HTTP_"))}

    print(f"start-up bench: {PYTHON} main.py --replay, LOG_FORMAT=json, fresh DATA_DIR per run; "
          "clock stops at the 'engine started' line (first heartbeat + one ledger read)")
    print(f"environment: PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}, "
          f"load average {os.getloadavg()[0]:.2f} at start")

    probe = start_daemon(base_env, importtime=True)
    missing = [m for m in LIVE_LIBRARIES if m not in probe.imported_before_engine]
    print("\nlibraries imported before 'engine started' (python -X importtime run):")
    for module in (*LIVE_LIBRARIES, *ALSO_LOADED, "config", "engines.orchestrator"):
        loaded = module in probe.imported_before_engine
        cost = probe.cumulative_us.get(module)
        shown = f"{cost / 1e6:6.3f} s cumulative at first import" if cost is not None else ""
        print(f"  {module:<22} {'yes' if loaded else 'NO ':<4} {shown}")
    print("  (importtime's own overhead inflates these; engines.orchestrator includes most of the others)")

    with tempfile.TemporaryDirectory(prefix="startup-pyc-") as pyc:
        variants: list[Variant] = []
        if args.variants in ("both", "inherit"):
            variants.append(Variant("no bytecode cache for the project (environment as is)", base_env))
        if args.variants in ("both", "cached"):
            env = {k: v for k, v in base_env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = pyc
            variants.append(Variant("bytecode cached (PYTHONPYCACHEPREFIX, warmed)", env))
        if missing or args.preimport:
            if missing:
                print(f"\nnot loaded in replay mode: {', '.join(missing)}; also timing a start that imports "
                      "them first")
            variants.append(Variant("live-mode libraries imported first", base_env, preimport=True))
        measure(variants, args.runs, base_env)

    print()
    for v in variants:
        value = statistics.median(r.seconds["engine started"] for r in v.results)
        print(f"start -> first engine heartbeat, {v.name}: median {value:.3f} s "
              f"(target <= 2.5 s: {'met' if value <= 2.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
