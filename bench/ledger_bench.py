"""How long a ledger call takes as seen from the event loop (thread hand-off plus one transaction).

Run: .venv/bin/python bench/ledger_bench.py [N]
Prints p50/p99/max per operation for synchronous=NORMAL (the default) and FULL, so the cost of an
fsync per commit is visible on the machine the daemon will run on.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.clock import LiveClock
from core.types import Fill, MarketType, Order, OrderState, OrderType, Side
from storage.ledger import Ledger, Synchronous


def _order(i: int) -> Order:
    return Order(
        client_order_id=f"bench-{i}", engine="spot", market=MarketType.SPOT, symbol="BTC/USDT",
        side=Side.BUY if i % 2 == 0 else Side.SELL, order_type=OrderType.MARKET, amount=Decimal("0.001"),
        price=None, stop_price=None, reduce_only=False, state=OrderState.PENDING, created_at=float(i),
        updated_at=float(i),
    )


def _fill(i: int) -> Fill:
    return Fill(
        client_order_id=f"bench-{i}", trade_id=str(i), engine="spot", market=MarketType.SPOT,
        symbol="BTC/USDT", side=Side.BUY if i % 2 == 0 else Side.SELL, amount=Decimal("0.001"),
        price=Decimal(43000 + i % 500) + Decimal("0.25"), fee=Decimal("0.043"), fee_asset="USDT",
        ts=float(i),
    )


async def _time(clock: LiveClock, n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    out: list[float] = []
    for i in range(n):
        t0 = clock.monotonic()
        await call(i)
        out.append((clock.monotonic() - t0) * 1e6)
    return out


def _report(name: str, micros: list[float]) -> None:
    s = sorted(micros)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    print(f"  {name:<22} n={len(s):>5}  p50={statistics.median(s):8.1f} us  p99={p99:8.1f} us  "
          f"max={s[-1]:8.1f} us")


async def run(synchronous: Synchronous, n: int) -> None:
    clock = LiveClock()
    with tempfile.TemporaryDirectory() as tmp:
        async with await Ledger.open(Path(tmp) / "bench.sqlite3", clock, synchronous) as ledger:
            print(f"synchronous={synchronous}")
            _report("insert_order", await _time(clock, n, lambda i: ledger.insert_order(_order(i))))
            _report("record_fill", await _time(clock, n, lambda i: ledger.record_fill(_fill(i))))
            _report("update_order", await _time(
                clock, n, lambda i: ledger.update_order(f"bench-{i}", state=OrderState.FILLED)))
            _report("next_sequence", await _time(clock, n, lambda i: ledger.next_sequence("bench")))
            _report("set_state", await _time(clock, n, lambda i: ledger.set_state("k", {"i": i})))
            _report("journal", await _time(clock, n, lambda i: ledger.journal("e", {"i": i}, float(i))))
            batch = [("e", {"i": j, "price": "43000.25"}, float(j)) for j in range(100)]
            _report("journal_many(100)", await _time(clock, max(1, n // 10),
                                                     lambda i: ledger.journal_many(batch)))
            _report("positions", await _time(clock, n, lambda i: ledger.positions("spot")))
            _report("get_order", await _time(clock, n, lambda i: ledger.get_order(f"bench-{i}")))


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for mode in ("NORMAL", "FULL"):
        await run(mode, n)


if __name__ == "__main__":
    asyncio.run(main())
