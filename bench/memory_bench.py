"""Memory: peak RSS (VmHWM) of the daemon after N seconds of replay, against a bare interpreter that
only imports the same big libraries.

The daemon runs as `python main.py --replay` in a fresh temporary DATA_DIR (LOG_FORMAT=json, logs to a
file there, no .env). During start-up its log is followed and /proc/<pid>/status read every 20 ms, so
each start-up stage (ledger, market connection with the replay files, engines, ...) shows the VmRSS
and VmHWM reached by then; after that VmRSS and VmHWM are read every `--sample` seconds, so the output
shows whether the peak comes from start-up or from growth while trading. After `--duration` seconds
the final VmHWM is read and SIGINT stops the daemon (exit 0 expected).

The bare figure is a fresh interpreter that imports the five live-mode libraries, ccxt.async_support,
telegram.ext, pandas (which brings numpy), structlog and pydantic_settings, and then waits: the daemon
imports exactly these (scipy, which the project no longer uses, must stay unloaded; the bench says so
if it is not).

Like with like: the libraries load from the bytecode pip compiled at install, while the project has
no __pycache__ and PYTHONDONTWRITEBYTECODE=1 (here and in deploy/kinetic-empire.service), so as things
are every daemon start compiles the whole project from source, which leaves more in its peak than
loading bytecode would (~2.5 MB once imported, ~1 MB of it still in the final peak). By default every
process here (bare, imports, daemon) therefore runs with PYTHONPYCACHEPREFIX at a temporary folder,
warmed by one unmeasured import and daemon start, as `python -m compileall` at install time would
give (as bench/startup_bench.py's "bytecode cached"; nothing is written into the repository).
`--no-precompile` measures the environment as it is.

Targets: daemon VmHWM <= 200 MB, and <= 30 MB above the bare figure.

Run from the repository root:
    .venv/bin/python bench/memory_bench.py [DURATION (60 s)] [--sample 5] [--runs 1] [--bare-runs 3]
        [--no-precompile]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
BARE_IMPORTS = ("ccxt.async_support", "telegram.ext", "pandas", "structlog", "pydantic_settings")
DAEMON_IMPORTS = ("main", "monitoring.logging", "engines.orchestrator")
STOP_TIMEOUT = 30.0
STARTUP_POLL = 0.02
STARTUP_LIMIT = 60.0
STARTUP_EVENTS = ("start-up stage", "start-up stage done", "replay data loaded", "replay started",
                  "daemon started")
MB = 1024 * 1024


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (and the rest of the Vm*/Rss* lines) in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


@dataclass
class DaemonRun:
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, VmRSS, VmHWM)
    # (seconds, log line, VmRSS, VmHWM, RssAnon)
    stages: list[tuple[float, str, int, int, int]] = field(default_factory=list)
    final: dict[str, int] = field(default_factory=dict)
    threads: int = 0
    exit_code: int | None = None
    events: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    scipy_loaded: bool = False


def stage_label(record: dict[str, object]) -> str:
    label = str(record.get("event", ""))
    for key in ("stage", "symbol"):
        if key in record:
            label += f" {record[key]}"
    return label


def follow_startup(proc: subprocess.Popen[bytes], reader: TextIO, run: DaemonRun, t0: float, limit: float,
                   log_path: Path) -> None:
    """Until the daemon logs "daemon started" (or `limit` seconds): pair each start-up log line with
    the memory read right after it appeared (within STARTUP_POLL), so the stage that makes the peak
    shows."""
    pending = ""
    while time.perf_counter() - t0 < limit:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"daemon exited early with code {code}; see its log in {log_path}")
        pending += reader.read()
        *lines, pending = pending.split("\n")
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("event") not in STARTUP_EVENTS:
                continue
            status = proc_status(proc.pid)
            run.stages.append((time.perf_counter() - t0, stage_label(record), status["VmRSS"], status["VmHWM"],
                               status.get("RssAnon", 0)))
            if record.get("event") == "daemon started":
                return
        time.sleep(STARTUP_POLL)


def run_daemon(duration: float, sample: float, base_env: dict[str, str]) -> DaemonRun:
    run = DaemonRun()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        log_path = Path(tmp) / "daemon.log"
        env = {k: v for k, v in base_env.items() if not k.startswith(("TELEGRAM_", "HTTP_"))}
        env.update(DATA_DIR=str(Path(tmp) / "var"), LOG_FORMAT="json")
        with open(log_path, "w") as log, open(log_path) as reader:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [PYTHON, "main.py", "--replay", "--env-file", os.devnull],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
            try:
                follow_startup(proc, reader, run, t0, min(duration, STARTUP_LIMIT), log_path)
                elapsed = time.perf_counter() - t0
                while elapsed < duration:
                    # Waiting on the child paces the samples and notices at once if the daemon dies.
                    try:
                        code = proc.wait(timeout=min(sample, duration - elapsed))
                        raise RuntimeError(f"daemon exited early with code {code}; see its log in {log_path}")
                    except subprocess.TimeoutExpired:
                        pass
                    elapsed = time.perf_counter() - t0
                    status = proc_status(proc.pid)
                    run.samples.append((elapsed, status["VmRSS"], status["VmHWM"]))
                run.final = proc_status(proc.pid)
                run.threads = len(os.listdir(f"/proc/{proc.pid}/task"))
                run.scipy_loaded = scipy_mapped(proc.pid)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                try:
                    run.exit_code = proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    run.exit_code = proc.wait()
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            event = str(record.get("event", ""))
            run.events[event] = run.events.get(event, 0) + 1
            if record.get("level") in ("error", "critical"):
                run.errors.append(event)
    return run


def scipy_mapped(pid: int) -> bool:
    """Whether any of scipy's shared libraries is mapped into the process: scipy must stay unloaded."""
    with open(f"/proc/{pid}/maps") as f:
        return any("/scipy/" in line for line in f)


def bytecode_env(pyc: str) -> dict[str, str]:
    """The environment with Python reading and writing bytecode under `pyc` instead of __pycache__."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pyc
    return env


def import_peak(modules: tuple[str, ...], env: dict[str, str]) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """A fresh interpreter imports `modules` one by one and waits: its /proc status once they are all
    loaded, and its VmRSS after each import (so the heavy ones show)."""
    code = (
        "import sys, json\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "steps = [['(interpreter)', rss()]]\n"
        f"for name in {list(modules)!r}:\n"
        "    __import__(name)\n"
        "    steps.append([name, rss()])\n"
        "sys.stdout.write(json.dumps(steps) + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"interpreter failed to import {modules}")
        steps = [(str(name), int(value)) for name, value in json.loads(line)]
        status = proc_status(proc.pid)
        proc.stdin.close()
        proc.wait(timeout=STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, steps


def print_imports(title: str, runs: list[tuple[dict[str, int], list[tuple[str, int]]]]) -> float:
    hwm = statistics.median(status["VmHWM"] for status, _ in runs)
    print(f"{title}:")
    print(f"  VmHWM median {hwm / MB:6.1f} MB  (runs: " + ", ".join(f"{s['VmHWM'] / MB:.1f}" for s, _ in runs) + ")")
    steps = runs[0][1]
    previous = 0
    parts = []
    for name, rss in steps:
        parts.append(f"{name} {(rss - previous) / MB:+.1f}")
        previous = rss
    print("  VmRSS added by each import, in order (first run, MB): " + ", ".join(parts))
    return hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("duration", nargs="?", type=float, default=60.0, help="seconds of replay (default 60)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--runs", type=int, default=1, help="daemon runs")
    parser.add_argument("--bare-runs", type=int, default=3, help="bare-interpreter runs")
    parser.add_argument("--no-precompile", action="store_true",
                        help="no warmed bytecode folder: measure the environment as it is (here the "
                             "project compiles from source at every start, PYTHONDONTWRITEBYTECODE=1)")
    args = parser.parse_args()
    if args.duration <= 0 or args.sample <= 0 or args.runs < 1 or args.bare_runs < 1:
        parser.error("duration and sample must be positive, runs at least 1")

    with tempfile.TemporaryDirectory(prefix="memory-bench-pyc-") as pyc:
        measure(args, dict(os.environ) if args.no_precompile else bytecode_env(pyc))


def measure(args: argparse.Namespace, env: dict[str, str]) -> None:
    if "PYTHONPYCACHEPREFIX" in env:
        print("bytecode: every process loads it from a warmed PYTHONPYCACHEPREFIX folder, libraries and "
              "project alike (as after python -m compileall)")
        import_peak(BARE_IMPORTS + DAEMON_IMPORTS, env)
        run_daemon(min(3.0, args.duration), min(3.0, args.duration), env)
    else:
        print("bytecode: environment as is (--no-precompile); PYTHONDONTWRITEBYTECODE="
              f"{env.get('PYTHONDONTWRITEBYTECODE', '(unset)')}")

    bare_hwm = print_imports(f"bare interpreter importing {', '.join(BARE_IMPORTS)}",
                             [import_peak(BARE_IMPORTS, env) for _ in range(args.bare_runs)])
    print_imports("the daemon's own imports, not running (main, monitoring.logging, engines.orchestrator)",
                  [import_peak(DAEMON_IMPORTS, env) for _ in range(args.bare_runs)])

    peaks: list[int] = []
    for i in range(1, args.runs + 1):
        run = run_daemon(args.duration, args.sample, env)
        peaks.append(run.final["VmHWM"])
        print(f"\ndaemon run {i}: python main.py --replay for {args.duration:g} s "
              f"(exit code after SIGINT {run.exit_code}, {run.threads} threads)")
        print("  start-up, as each stage's log line appeared:")
        print("  t (s)   VmRSS (MB)   VmHWM (MB)   RssAnon (MB)   log line")
        for t, label, rss, peak, anon in run.stages:
            print(f"  {t:5.2f}   {rss / MB:10.1f}   {peak / MB:10.1f}   {anon / MB:12.1f}   {label}")
        print("  then every --sample seconds:")
        print("  t (s)   VmRSS (MB)   VmHWM (MB)")
        for t, rss, peak in run.samples:
            print(f"  {t:5.1f}   {rss / MB:10.1f}   {peak / MB:10.1f}")
        print(f"  final: VmHWM {run.final['VmHWM'] / MB:.1f} MB, VmRSS {run.final['VmRSS'] / MB:.1f} MB "
              f"(RssAnon {run.final.get('RssAnon', 0) / MB:.1f}, RssFile {run.final.get('RssFile', 0) / MB:.1f})")
        kinds = ("entry", "exit", "position closed", "order denied", "order rejected")
        trading = {k: run.events.get(k, 0) for k in kinds}
        print(f"  log: {trading}; error lines: {len(run.errors)} {sorted(set(run.errors))[:5]}")
        print(f"  scipy loaded: {'YES (it should stay unloaded)' if run.scipy_loaded else 'no'}")

    hwm = float(statistics.median(peaks))
    over = hwm - bare_hwm
    print(f"\ndaemon VmHWM median {hwm / MB:.1f} MB over {len(peaks)} run(s) "
          f"(target <= 200 MB: {'met' if hwm <= 200 * MB else 'NOT met'})")
    print(f"above the bare interpreter: {over / MB:+.1f} MB "
          f"(target <= 30 MB: {'met' if over <= 30 * MB else 'NOT met'})")


if __name__ == "__main__":
    main()
