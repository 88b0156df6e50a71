"""How long RiskGate.check takes: p50 and p99 in microseconds over 100k intents.

The gate runs synchronously in the order path right before submission; the target is p99 <= 20 us.
The mix is three entries to one exit, across both engines, with some denials (paused engine, max
positions) on the way; every granted reservation is released at once so the budget never runs out
and every entry goes the full way to the allocator.

Run: .venv/bin/python bench/gate_bench.py [--n 100000] [--seed 7]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.types import MarketType, OrderIntent, Side
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits


def build_intents(n: int, rng: random.Random) -> list[tuple[OrderIntent, int, bool]]:
    symbols = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    out: list[tuple[OrderIntent, int, bool]] = []
    for _ in range(n):
        engine = rng.choice(["spot", "futures"])
        market = MarketType.SPOT if engine == "spot" else MarketType.FUTURES
        exit_ = rng.random() < 0.25
        amount = Decimal(rng.randint(1, 10_000)) / Decimal(1000)
        price = Decimal(rng.randint(10_000, 70_000))
        intent = OrderIntent(
            engine=engine,
            market=market,
            symbol=rng.choice(symbols),
            side=Side.SELL if exit_ else Side.BUY,
            amount=amount,
            reduce_only=exit_,
            leverage=rng.choice([None, 2, 5]) if engine == "futures" else None,
            notional=Decimal(0) if exit_ else (amount * price / 1000).quantize(Decimal("0.01")),
        )
        out.append((intent, rng.randint(0, 3), rng.random() < 0.3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    monitor = GlobalRiskMonitor(RiskLimits(Decimal(5), Decimal(15), 3600.0, Decimal(25)))
    equity = Decimal("100000")
    monitor.update(1_700_000_000.0, {"spot": equity * 6 / 10, "futures": equity * 4 / 10})
    allocator = CapitalAllocator({"spot": 60, "futures": 40}, {"spot", "futures"})
    allocator.set_exposure("spot", Decimal("12000"))
    gate = RiskGate(
        monitor,
        allocator,
        {"spot": EngineLimits(max_positions=3), "futures": EngineLimits(max_positions=3, max_leverage=5)},
    )
    intents = build_intents(args.n, rng)

    for intent, open_positions, has_position in intents[:2000]:  # warm up
        d = gate.check(intent, equity=equity, open_positions=open_positions, has_position=has_position)
        if d.reservation is not None:
            allocator.release(d.reservation)

    samples: list[int] = []
    allowed = reserved = 0
    clock = time.perf_counter_ns
    gc.disable()  # a collection pause is the collector's cost, not the gate's
    try:
        for i, (intent, open_positions, has_position) in enumerate(intents):
            gate.set_paused("futures", i % 50 == 0)
            t0 = clock()
            d = gate.check(intent, equity=equity, open_positions=open_positions, has_position=has_position)
            samples.append(clock() - t0)
            if d.allowed:
                allowed += 1
            if d.reservation is not None:
                reserved += 1
                allocator.release(d.reservation)
    finally:
        gc.enable()

    samples.sort()
    us = [s / 1000 for s in samples]
    p50 = us[len(us) // 2]
    p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
    print(f"RiskGate.check over {len(us)} intents ({allowed} allowed, {reserved} reservations made)")
    print(f"  p50   {p50:7.2f} us")
    print(f"  p99   {p99:7.2f} us   (target <= 20 us: {'met' if p99 <= 20 else 'NOT met'})")
    print(f"  mean  {statistics.fmean(us):7.2f} us")
    print(f"  max   {us[-1]:7.2f} us")


if __name__ == "__main__":
    main()
