"""Alert burst benchmark: 1,000 events published at once, delivered through the real bot to the fake
Bot API. Prints publish latency, how many messages reached each chat, their sizes, the per-chat
message rate (on the sender's simulated clock, so Telegram's 1/s and 20/min limits are checked
without waiting minutes), and that every event arrived or was counted as dropped.

Run: .venv/bin/python bench/alerts_bench.py
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.clock import LiveClock, SimClock
from core.events import EventBus, OrderFilled, PositionClosed
from core.types import MarketType, PositionSide, Side
from monitoring.alerts import TELEGRAM_MAX_CHARS, AlertSender
from monitoring.telegram import TelegramBot
from tests.fakes.telegram_api import TOKEN, FakeBotApi
from tests.test_telegram import FakeControl

EVENTS = 1000
CHAT = 1001
GROUP = -100_200
NOW = 1_704_448_800.0


def event(i: int) -> OrderFilled | PositionClosed:
    """Alternate fills (short lines) and closes (long lines); each names a unique symbol to find later."""
    symbol = f"X{i:04d}/USDT"
    if i % 2:
        return PositionClosed(ts=NOW, engine="spot", market=MarketType.SPOT, symbol=symbol, side=PositionSide.LONG,
                              amount=Decimal("0.25"), entry_price=Decimal("101.5"), exit_price=Decimal("103.25"),
                              realized_pnl=Decimal("0.4375"), reason="take_profit")
    return OrderFilled(ts=NOW, engine="spot", client_order_id=f"ke-{i}", symbol=symbol, side=Side.BUY,
                       amount=Decimal("0.25"), price=Decimal("101.5"), fee=Decimal("0.025"), reduce_only=False)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(name: str, max_queue: int, inject_429: bool) -> None:
    live = LiveClock()
    sim = SimClock(NOW)
    api = FakeBotApi()
    await api.start()
    bot = TelegramBot(TOKEN, [CHAT, GROUP], [CHAT], FakeControl(), live, EventBus(), base_url=api.base_url,
                      poll_timeout=1, request_timeout=5.0)
    assert await bot.start()
    stamps: dict[int, list[float]] = {CHAT: [], GROUP: []}
    inflight = 0

    async def send(chat_id: int, text: str) -> None:
        nonlocal inflight
        inflight += 1
        try:
            await bot.send_message(chat_id, text)
            stamps[chat_id].append(sim.now())
        finally:
            inflight -= 1

    bus = EventBus()
    sender = AlertSender(send, [CHAT, GROUP], sim, max_queue=max_queue)
    sub = sender.subscribe(bus)
    task = asyncio.ensure_future(sender.run(sub))
    if inject_429:
        api.fail("sendMessage", 429, retry_after=7)

    publish_us: list[float] = []
    gc.collect()  # start each burst from a clean heap so one scenario's garbage does not time the next
    for i in range(EVENTS):
        t0 = live.monotonic()
        bus.publish(event(i))
        publish_us.append((live.monotonic() - t0) * 1e6)

    wall0 = live.monotonic()
    expected = EVENTS * 2  # every line to both chats
    for _ in range(200_000):
        if sender.lines_sent + sender.dropped >= expected:
            break
        if inflight:
            await live.sleep(0.001)  # a real HTTP request is on its way to the fake
        else:
            await sim.advance(0.1)
    wall = live.monotonic() - wall0
    sim_span = sim.now() - NOW
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bot.stop()
    await api.stop()

    print(f"\n== {name} (max_queue={max_queue}, 429 injected={inject_429})")
    print(f"publish latency: p50 {pct(publish_us, 0.5):.1f} us, p99 {pct(publish_us, 0.99):.1f} us, "
          f"max {max(publish_us):.1f} us")
    for chat in (CHAT, GROUP):
        texts = api.sent(chat)
        times = stamps[chat]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        per_min = max((sum(1 for t in times if s <= t < s + 60) for s in times), default=0)
        found = sum(1 for i in range(EVENTS) if any(f"X{i:04d}/USDT" in t for t in texts))
        kind = "group" if chat < 0 else "private"
        print(f"chat {chat} ({kind}): {len(texts)} messages, longest {max(map(len, texts), default=0)} chars "
              f"(limit {TELEGRAM_MAX_CHARS}), min gap {min(gaps, default=0):.2f} s, max in any 60 s: {per_min}, "
              f"events present {found}/{EVENTS}")
    lost = expected - sender.lines_sent - sender.dropped
    print(f"lines delivered {sender.lines_sent}/{expected}, dropped (counted) {sender.dropped} "
          f"[queue refused {sub.dropped} events, x2 chats], unaccounted {lost}")
    print(f"429 waits {sender.retry_after_waits}; drained in {sim_span:.0f} s of sender time, "
          f"{wall:.2f} s wall time; fake saw {len(api.calls_of('sendMessage'))} sendMessage calls")


async def main() -> None:
    await scenario("burst, everything fits the queue", max_queue=1000, inject_429=False)
    await scenario("burst with a 429 (retry_after=7) on the first send", max_queue=1000, inject_429=True)
    await scenario("burst into a 200-slot queue", max_queue=200, inject_429=False)


if __name__ == "__main__":
    asyncio.run(main())
