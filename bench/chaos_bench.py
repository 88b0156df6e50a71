"""The chaos run at scale: the daemon SIGKILLed N times (default 500) at seeded random moments of its
order flow — before the send, during it, right after a fill, during reconciliation — restarted on the
same ledger each time, then checked against the fake exchange's own record.

Run from the repository root:  .venv/bin/python bench/chaos_bench.py [--kills 500] [--lanes 8] [--seed 1]

Prints kills, restarts, duplicates, lost fills, unprotected positions (target 0 for all three),
per-phase kill counts, how long a kill cycle and a restart take (start to "daemon started",
reconciliation included), the wall time, and every problem found with the lane's DATA_DIR (its
ledger and one log per daemon run are kept there for reproduction: `--keep` keeps the folder).
See tests/chaos/harness.py for how the kills are landed and what is checked. About 1 s of wall time
per kill with 8 lanes on 2 cores: a kill that leaves an order the exchange never saw costs its lane
the order manager's 30 s grace period at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.harness import PHASES, ChaosConfig, ChaosReport, run_chaos


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def spread(samples: list[float]) -> str:
    if not samples:
        return "n/a"
    return (f"p50 {statistics.median(samples):6.2f} s  p99 {percentile(samples, 99):6.2f} s  "
            f"max {max(samples):6.2f} s  (n={len(samples)})")


def print_report(report: ChaosReport, problems_shown: int) -> None:
    s = report.summary()
    print(f"kills                {s['kills']}  (lanes {s['lanes']}, seed {s['seed']})")
    print(f"restarts             {s['restarts']}")
    for name in ("duplicates", "lost_fills", "unprotected"):
        verdict = "met" if s[name] == 0 else "MISSED"
        print(f"{name:20s} {s[name]}  (target 0: {verdict})")
    hits, misses = report.phase_hits(), report.phase_misses()
    durations: dict[str, list[float]] = defaultdict(list)
    for kill in report.kills:
        durations[kill.phase].append(kill.seconds)
    print("per phase            hit / missed   kill cycle")
    for phase in PHASES:
        print(f"  {phase:18s} {hits[phase]:4d} / {misses[phase]:<6d}  {spread(durations[phase])}")
    variants: dict[str, int] = defaultdict(int)
    for kill in report.kills:
        if kill.hit and kill.phase == "during_send":
            variants[kill.detail] += 1
    print(f"  during_send detail {dict(variants)}")
    print(f"restart to ready     {spread([t for lane in report.lanes for t in lane.ready_seconds])}")
    print(f"orders {s['orders']}, fills {s['fills']}, orders the kills stopped before the exchange "
          f"{s['never_sent_orders']}, open positions at the end {s['open_positions_at_end']}")
    print(f"tracebacks {s['tracebacks']}, daemon exits nobody asked for {s['crash_exits']}, "
          f"error log lines {s['error_events']}")
    print(f"consistency: stops the ledger does not link {s['unlinked_stops']}, dust positions "
          f"{s['dust_positions']}, orders refused for lack of funds {s['refused_orders']}")
    print(f"wall time            {s['wall_seconds']} s")
    problems = report.problems() + report.consistency_findings()
    for line in problems[:problems_shown]:
        print("  " + line)
    if len(problems) > problems_shown:
        print(f"  ... and {len(problems) - problems_shown} more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--lanes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the lanes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (ledgers and daemon logs)")
    parser.add_argument("--problems", type=int, default=40, help="how many problem lines to print")
    args = parser.parse_args()
    if args.kills < 1 or args.lanes < 1:
        parser.error("--kills and --lanes must be positive")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"chaos: {args.kills} kills over {args.lanes} lanes, seed {args.seed}, in {workdir}", flush=True)
    try:
        report = asyncio.run(run_chaos(ChaosConfig(kills=args.kills, seed=args.seed, lanes=args.lanes), workdir))
        print_report(report, args.problems)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
