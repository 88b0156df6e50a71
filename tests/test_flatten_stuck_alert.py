"""A flattening that cannot finish tells the owner (FlattenStuck) after FLATTEN_STUCK_ALERT_SECONDS, with
each symbol left and why, again only every FLATTEN_STUCK_REPEAT_SECONDS, and once more when it ends.

The scripted spot account and helpers of test_flatten_races; the flattening's own timing runs on a
SimClock, so minutes of passes cost milliseconds. (The order manager keeps the live clock those helpers
give it: the fake exchange answers at once, so it never waits on it.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from core.clock import SimClock
from core.events import FlattenStuck, Subscription
from core.types import OrderState, OrderType, Side, TradingState
from engines.orchestrator import FLATTEN_STUCK_ALERT_SECONDS, FLATTEN_STUCK_REPEAT_SECONDS, Orchestrator
from monitoring.alerts import AlertSender, AlertSettings, format_event
from tests.bounded import bounded
from tests.test_alerts import Recorder, advance_until, running
from tests.test_flatten_races import OWNERS_OWN, POS, SYM, FakeSpot, bare_orchestrator, hold, order

INTERVAL = 10.0  # seconds between passes (health_check_interval_seconds)
REAL_WAIT_STEPS = 5000  # ~5 real seconds one pass may take (ledger round trips) before the test fails


@dataclass
class Rig:
    orch: Orchestrator
    clock: SimClock
    ex: FakeSpot
    alerts: Subscription  # the alert sender's own subscription, as the daemon makes it
    task: asyncio.Task[object] | None = None

    def stuck_events(self) -> list[FlattenStuck]:
        """Everything FlattenStuck the alert subscription has received so far (drained)."""
        seen: list[FlattenStuck] = []
        while not self.alerts.queue.empty():
            event = self.alerts.queue.get_nowait()
            if isinstance(event, FlattenStuck):
                seen.append(event)
        return seen

    def kill(self) -> None:
        self.orch.monitor.kill(self.clock.now(), "kill by test")  # type: ignore[union-attr]
        assert self.orch.trading_state is TradingState.HALTED
        self.task = self.orch._request_flatten(system=True, reason="kill by test")

    async def settled(self) -> None:
        """Wait (real time, bounded) until the pass under way is done: the flattening sleeps on the
        simulated clock again, or has ended. (A pass waits on the ledger's thread, which no simulated
        time moves along.)"""
        task = self.task
        assert task is not None
        for _ in range(REAL_WAIT_STEPS):
            if self.clock.pending_sleeps() or task.done():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("a flattening pass did not end within the real time allowed")

    async def run_for(self, seconds: float) -> None:
        """Let `seconds` of simulated time pass, one pass at a time, and end with the last pass done."""
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            await self.settled()
            await self.clock.advance(min(INTERVAL, end - self.clock.monotonic()))
        await self.settled()


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, ex: FakeSpot) -> AsyncIterator[Rig]:
    orch = await bare_orchestrator(tmp_path, ex)
    orch.settings = orch.settings.model_copy(update={"health_check_interval_seconds": INTERVAL})
    clock = SimClock()
    orch.clock = clock  # the flattening's passes, its timing and the alert's clock
    r = Rig(orch, clock, ex, AlertSender.subscribe_to(orch.bus, AlertSettings()))
    try:
        yield r
        assert not orch.crashed
    finally:
        if r.task is not None:
            r.task.cancel()
            await asyncio.wait({r.task})
        await orch.ledger.close()  # type: ignore[union-attr]


async def exit_sale_in_doubt(r: Rig) -> None:
    """A held position whose exit sale went out just before the kill, its answer lost (UNKNOWN): no pass
    may sell again until the order poll learns what became of the sale."""
    await hold(r.orch, POS)
    await r.orch.ledger.insert_order(order("exit1", Side.SELL, OrderType.MARKET, POS,  # type: ignore[union-attr]
                                           OrderState.UNKNOWN, reduce_only=True))


@bounded(30)
async def test_coins_gone_from_the_account_alert_once_after_the_delay_naming_symbol_and_reason(
        tmp_path: Path) -> None:
    """The ledger holds 0.1 BTC the account no longer has: every sale is refused (insufficient funds).
    The owner hears of it once the flattening has lasted FLATTEN_STUCK_ALERT_SECONDS, not before."""
    async with rig(tmp_path, FakeSpot(btc=Decimal(0))) as r:
        await hold(r.orch, POS)
        r.kill()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS - 1)
        assert r.stuck_events() == []
        assert len([s for s in r.ex.sent if s.side is Side.SELL]) >= 10  # it did keep trying meanwhile
        await r.run_for(1)
        [stuck] = r.stuck_events()
        assert stuck.stuck and stuck.seconds == FLATTEN_STUCK_ALERT_SECONDS
        assert (stuck.positions, stuck.orders) == (1, 0)
        [(engine, symbol, why)] = stuck.left
        assert (engine, symbol) == ("spot", SYM)
        assert why.startswith("the exchange refused: insufficient funds"), why
        await r.run_for(INTERVAL * 5)
        assert r.stuck_events() == []  # told once, not every pass


@bounded(30)
async def test_an_order_in_doubt_is_named_with_its_id(tmp_path: Path) -> None:
    async with rig(tmp_path, FakeSpot(btc=OWNERS_OWN)) as r:
        await exit_sale_in_doubt(r)
        r.kill()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS)
        [stuck] = r.stuck_events()
        assert (stuck.positions, stuck.orders) == (1, 1)
        assert stuck.left == (("spot", SYM, "no outcome known for order exit1"),)
        assert [s for s in r.ex.sent if s.order_type is OrderType.MARKET] == []


@bounded(60)
async def test_the_alert_is_repeated_only_after_the_repeat_interval(tmp_path: Path) -> None:
    async with rig(tmp_path, FakeSpot(btc=OWNERS_OWN)) as r:
        await exit_sale_in_doubt(r)
        r.kill()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS)
        assert len(r.stuck_events()) == 1
        await r.run_for(FLATTEN_STUCK_REPEAT_SECONDS - INTERVAL)
        assert r.stuck_events() == []
        await r.run_for(INTERVAL)
        [again] = r.stuck_events()
        assert again.stuck and again.seconds == FLATTEN_STUCK_ALERT_SECONDS + FLATTEN_STUCK_REPEAT_SECONDS
        assert again.left == (("spot", SYM, "no outcome known for order exit1"),)


@bounded(30)
async def test_a_flattening_that_ends_in_time_never_alerts_and_the_next_one_counts_from_its_own_start(
        tmp_path: Path) -> None:
    """The sale in doubt settles after 100 s: that flattening ends quietly. A second one (a new
    position in doubt, a new kill) alerts FLATTEN_STUCK_ALERT_SECONDS after its own start, not the
    first one's."""
    async with rig(tmp_path, FakeSpot(btc=OWNERS_OWN)) as r:
        await exit_sale_in_doubt(r)
        r.kill()
        await r.run_for(100)
        r.ex.orders["exit1"] = r.ex.fill("exit1", Side.SELL, POS, reduce_only=True)  # the answer, at last
        await r.orch.parts["spot"].orders.poll_open_orders()
        await r.run_for(INTERVAL)
        assert r.task is not None and r.task.done()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS)
        assert r.stuck_events() == []

        await hold(r.orch, POS, entry_cid="entry2")
        await r.orch.ledger.insert_order(order("exit2", Side.SELL, OrderType.MARKET, POS,  # type: ignore[union-attr]
                                               OrderState.UNKNOWN, reduce_only=True))
        r.kill()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS - INTERVAL)
        assert r.stuck_events() == []
        await r.run_for(INTERVAL)
        [stuck] = r.stuck_events()
        assert stuck.seconds == FLATTEN_STUCK_ALERT_SECONDS and "exit2" in stuck.left[0][2]


@bounded(30)
async def test_the_end_of_a_stuck_flattening_is_told_too(tmp_path: Path) -> None:
    async with rig(tmp_path, FakeSpot(btc=OWNERS_OWN)) as r:
        await exit_sale_in_doubt(r)
        r.kill()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS + 60)
        [stuck] = r.stuck_events()
        assert stuck.stuck
        r.ex.orders["exit1"] = r.ex.fill("exit1", Side.SELL, POS, reduce_only=True)
        await r.orch.parts["spot"].orders.poll_open_orders()
        await r.run_for(INTERVAL)
        assert r.task is not None and r.task.done()
        [done] = r.stuck_events()
        assert not done.stuck and (done.positions, done.orders, done.left) == (0, 0, ())
        assert done.seconds == FLATTEN_STUCK_ALERT_SECONDS + 60 + INTERVAL
        text = format_event(done)
        assert text is not None and "Flattening finished" in text and "nothing left" in text
        await r.run_for(FLATTEN_STUCK_REPEAT_SECONDS)
        assert r.stuck_events() == []


@bounded(30)
async def test_the_telegram_alert_names_the_symbol_and_the_reason(tmp_path: Path) -> None:
    """What the alert sender would send, from the subscription the daemon gives it."""
    async with rig(tmp_path, FakeSpot(btc=Decimal(0))) as r:
        await hold(r.orch, POS)
        r.kill()
        await r.run_for(FLATTEN_STUCK_ALERT_SECONDS)
        task = r.task
        assert task is not None
        task.cancel()  # nothing more on the bus while the sender reads it
        await asyncio.wait({task})
        sender_clock = SimClock()
        rec = Recorder(sender_clock)
        sender = AlertSender(rec, [1001], sender_clock)
        async with running(sender.run(r.alerts)):
            await advance_until(sender_clock, lambda: sender.lines_sent >= 1)
        [(_, chat, text)] = rec.sent
        assert chat == 1001
        assert "Flattening stuck for 2m" in text, text
        assert f"spot {SYM}: the exchange refused: insufficient funds" in text, text
        assert "1 position left" in text, text
