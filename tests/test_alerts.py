"""Alerts: the lines an operator reads, and a sender that delivers them without ever hurting trading."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from telegram.error import Forbidden, NetworkError, RetryAfter

from config import load_settings
from core.clock import LiveClock, SimClock
from core.events import (
    DaemonStarted,
    DaemonStopping,
    EngineFailed,
    EngineRestarted,
    EngineStalled,
    Event,
    EventBus,
    OrderFilled,
    OrderPlaced,
    PortfolioReported,
    PositionClosed,
    ReconciliationFinding,
    TradingStateChanged,
)
from core.types import MarketType, OrderType, PositionSide, Side, TradingState
from monitoring.alerts import (
    AlertSender,
    AlertSettings,
    fmt_amount,
    fmt_price,
    format_event,
    next_daily_at,
    split_message,
)
from monitoring.telegram import TelegramBot
from tests.fakes.telegram_api import TOKEN, FakeBotApi
from tests.test_telegram import FakeControl

# PTB warns when a RetryAfter is built (its retry_after type is changing); not ours to fix here.
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

NOW = 1_704_448_800.0  # 2024-01-05 10:00:00 UTC
CHAT = 1001
GROUP = -100_200


def fill(i: int, ts: float = NOW) -> OrderFilled:
    return OrderFilled(ts=ts, engine="spot", client_order_id=f"ke-{i:04d}", symbol=f"C{i:04d}/USDT",
                       side=Side.BUY, amount=Decimal("0.5"), price=Decimal("100.25"), fee=Decimal("0.05"),
                       reduce_only=False)


# --- formatting ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("event", "fragments"),
    [
        (DaemonStarted(ts=NOW, mode="paper", engines=("spot",), equity=Decimal("10000")),
         ["started", "paper", "spot", "10,000.00"]),
        (DaemonStopping(ts=NOW, reason="SIGTERM"), ["stopping", "SIGTERM"]),
        (PortfolioReported(ts=NOW, equity=Decimal("10250.5"), realized_pnl=Decimal("300"),
                           unrealized_pnl=Decimal("-49.5"), engines={"spot": {"equity": Decimal("6100"),
                                                                              "positions": 2}}, final=True),
         ["Final portfolio", "10,250.50", "realized +300.00", "unrealized -49.50", "spot: equity 6,100.00",
          "positions 2"]),
        (EngineStalled(ts=NOW, engine="spot", heartbeat_age=75.4), ["WARN", "spot", "75s"]),
        (EngineRestarted(ts=NOW, engine="spot", reason="heartbeat 300s", attempt=2, backoff_seconds=2.0),
         ["spot restarted", "attempt 2", "2s backoff", "heartbeat 300s"]),
        (EngineFailed(ts=NOW, engine="spot", reason="too many restarts", restarts=5),
         ["spot FAILED", "5 restarts", "too many restarts", "/restart spot"]),
        (TradingStateChanged(ts=NOW, old=TradingState.ACTIVE, new=TradingState.REDUCING, reason="daily loss 5.1%",
                             until=NOW + 3600), ["breaker tripped", "daily loss 5.1%", "reduce-only",
                                                 "2024-01-05 11:00 UTC"]),
        (TradingStateChanged(ts=NOW, old=TradingState.REDUCING, new=TradingState.ACTIVE, reason="cooldown over",
                             until=None), ["breaker reset", "cooldown over", "ACTIVE"]),
        (TradingStateChanged(ts=NOW, old=TradingState.ACTIVE, new=TradingState.HALTED, reason="/kill by telegram:1",
                             until=None), ["KILL", "HALTED", "/kill by telegram:1"]),
        (TradingStateChanged(ts=NOW, old=TradingState.HALTED, new=TradingState.ACTIVE, reason="resumed by op",
                             until=None), ["resumed", "ACTIVE"]),
        (OrderFilled(ts=NOW, engine="spot", client_order_id="x", symbol="BTC/USDT", side=Side.SELL,
                     amount=Decimal("0.01500"), price=Decimal("43210.5"), fee=Decimal("0.648"), reduce_only=True),
         ["spot SELL 0.015 BTC/USDT @ 43,210.50", "fee 0.648", "reduce-only"]),
        (PositionClosed(ts=NOW, engine="spot", market=MarketType.SPOT, symbol="ETH/USDT", side=PositionSide.LONG,
                        amount=Decimal("0.5"), entry_price=Decimal("2000"), exit_price=Decimal("2040"),
                        realized_pnl=Decimal("20"), reason="take_profit"),
         ["💰", "closed long 0.5 ETH/USDT", "2,000.00 → 2,040.00", "P&L +20.00", "(+2.00%)", "take_profit"]),
        (PositionClosed(ts=NOW, engine="futures", market=MarketType.FUTURES, symbol="ETH/USDT",
                        side=PositionSide.SHORT, amount=Decimal("1"), entry_price=Decimal("2000"),
                        exit_price=Decimal("2050"), realized_pnl=Decimal("-50"), reason="stop_loss"),
         ["🔻", "closed short", "P&L -50.00", "(-2.50%)", "stop_loss"]),
        (ReconciliationFinding(ts=NOW, engine="spot", finding="unknown order", detail="ke-1 open on exchange"),
         ["Reconciliation", "unknown order", "ke-1 open on exchange"]),
    ],
)
def test_event_alert_says_what_the_operator_needs(event: Event, fragments: list[str]) -> None:
    text = format_event(event)
    assert text is not None
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} missing from {text!r}"


def test_non_alert_events_are_silent() -> None:
    assert format_event(PortfolioReported(ts=NOW, equity=Decimal(1), realized_pnl=Decimal(0),
                                          unrealized_pnl=Decimal(0))) is None
    assert format_event(OrderPlaced(ts=NOW, engine="spot", client_order_id="x", symbol="BTC/USDT", side=Side.BUY,
                                    order_type=OrderType.MARKET, amount=Decimal(1), price=None,
                                    reduce_only=False)) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [("43210.5", "43,210.50"), ("1.23456789", "1.23457"), ("0.00001234", "0.00001234"), ("100", "100.00"),
     ("0", "0")],
)
def test_prices_read_well(value: str, text: str) -> None:
    assert fmt_price(Decimal(value)) == text


@pytest.mark.parametrize(("value", "text"), [("0.01500", "0.015"), ("1.5E+3", "1500"), ("12", "12")])
def test_amounts_are_exact_without_noise(value: str, text: str) -> None:
    assert fmt_amount(Decimal(value)) == text


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.text(min_size=0, max_size=200), max_size=40), limit=st.integers(20, 4096))
def test_split_never_exceeds_limit_and_loses_nothing(lines: list[str], limit: int) -> None:
    messages = split_message(lines, limit)
    assert all(0 < len(m) <= limit for m in messages)
    if all(len(line) <= limit for line in lines) and all(lines):
        assert "\n".join(messages) == "\n".join(lines)
    assert "".join(messages).replace("\n", "") == "".join(lines).replace("\n", "")


# --- settings ------------------------------------------------------------------------------------

def test_settings_switch_fills_and_closes_off() -> None:
    s = load_settings(None, alert_order_fills=False, alert_position_closes=False, alert_daily_summary_utc="07:45")
    alert = AlertSettings.from_settings(s)
    assert OrderFilled not in alert.kinds and PositionClosed not in alert.kinds
    assert EngineFailed in alert.kinds and TradingStateChanged in alert.kinds
    assert alert.daily_summary_at == (7, 45)
    assert AlertSettings.from_settings(load_settings(None)).daily_summary_at is None


@pytest.mark.parametrize("bad", ["7:5", "24:00", "12:60", "noon", "12-30"])
def test_bad_summary_time_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        AlertSettings(daily_summary_utc=bad)


def test_next_daily_time() -> None:
    assert next_daily_at(NOW, 10, 30) == NOW + 1800
    assert next_daily_at(NOW, 10, 0) == NOW + 86_400  # exactly now: the next one is tomorrow
    assert next_daily_at(NOW, 9, 0) == NOW + 23 * 3600


# --- the sender ----------------------------------------------------------------------------------

@dataclass
class Recorder:
    """A send function that records (sim time, chat, text), optionally failing first."""

    clock: SimClock
    sent: list[tuple[float, int, str]] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)

    async def __call__(self, chat_id: int, text: str) -> None:
        self.attempts.append(self.clock.now())
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((self.clock.now(), chat_id, text))


@contextlib.asynccontextmanager
async def running(coro: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


async def advance_until(clock: SimClock, cond: Callable[[], bool], step: float = 0.5, limit: int = 2000) -> None:
    for _ in range(limit):
        if cond():
            return
        await clock.advance(step)
    raise AssertionError("condition not reached within the simulated time allowed")


async def test_burst_is_coalesced_into_few_messages_with_everything_in_them() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT], clock)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)) as task:
        for i in range(50):
            bus.publish(fill(i))
        await advance_until(clock, lambda: sender.lines_sent + sender.dropped >= 50)
        assert not task.done()
        burst_messages = len(rec.sent)
        await clock.advance(10)
        bus.publish(fill(99))  # a lone event later on gets its own message
        await advance_until(clock, lambda: sender.lines_sent >= 51)
    assert sender.dropped == 0
    assert 1 <= burst_messages <= 2
    text = "\n".join(t for _, _, t in rec.sent[:burst_messages])
    for i in range(50):
        assert f"C{i:04d}/USDT" in text
    assert all(len(t) <= 4000 for _, _, t in rec.sent)
    assert len(rec.sent) == burst_messages + 1 and "C0099/USDT" in rec.sent[-1][2]


async def test_events_trickling_in_within_the_window_share_one_message() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT], clock, coalesce_seconds=1.0)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        for i in range(4):
            bus.publish(fill(i))
            await clock.advance(0.2)
        await advance_until(clock, lambda: sender.lines_sent >= 4)
    assert len(rec.sent) == 1
    assert all(f"C{i:04d}/USDT" in rec.sent[0][2] for i in range(4))


async def test_burst_beyond_the_queue_is_counted_as_dropped() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT], clock, max_queue=20)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        for i in range(50):
            bus.publish(fill(i))
        await advance_until(clock, lambda: sender.lines_sent + sender.dropped >= 50)
    text = "\n".join(t for _, _, t in rec.sent)
    delivered = sum(f"C{i:04d}/USDT" in text for i in range(50))
    assert delivered == sender.lines_sent == 20
    assert sender.dropped == 30


async def test_long_bursts_are_split_and_paced_per_chat_and_per_group() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT, GROUP], clock, coalesce_seconds=1.0, max_message_chars=200)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        for i in range(120):  # lines of ~46 chars, 4 to a 200-char message: 30 messages per chat
            bus.publish(fill(i))
        await advance_until(clock, lambda: sender.lines_sent + sender.dropped >= 240, step=1.0)
    assert sender.dropped == 0
    for chat in (CHAT, GROUP):
        times = [t for t, c, _ in rec.sent if c == chat]
        assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    group_times = [t for t, c, _ in rec.sent if c == GROUP]
    assert len(group_times) > 20
    assert all(later - earlier >= 60.0 for earlier, later in zip(group_times, group_times[20:], strict=False))
    assert all(len(t) <= 200 for _, _, t in rec.sent)


async def test_retry_after_is_honoured_with_no_sends_during_the_wait() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock, failures=[RetryAfter(30)])
    sender = AlertSender(rec, [CHAT], clock)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        bus.publish(fill(1))
        await clock.advance(1.0)
        assert len(rec.attempts) == 1
        bus.publish(fill(2))
        await clock.advance(28.0)
        assert len(rec.attempts) == 1  # still waiting out the flood limit
        await advance_until(clock, lambda: sender.lines_sent >= 2)
    first, *rest = rec.attempts
    assert all(t >= first + 30 for t in rest)
    assert sender.retry_after_waits == 1 and sender.dropped == 0


async def test_failing_sends_are_retried_then_dropped_and_counted_never_raised() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock, failures=[NetworkError("down")] * 3 + [Forbidden("bot was kicked")])
    sender = AlertSender(rec, [CHAT], clock, max_attempts=3)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)) as task:
        bus.publish(fill(1))
        await advance_until(clock, lambda: sender.dropped >= 1)
        bus.publish(fill(2))  # Forbidden: retrying cannot help, dropped at once
        await advance_until(clock, lambda: sender.dropped >= 2)
        bus.publish(fill(3))
        await advance_until(clock, lambda: sender.lines_sent >= 1)
        assert not task.done()
    assert len(rec.attempts) == 3 + 1 + 1
    assert sender.dropped == 2 and "C0003/USDT" in rec.sent[0][2]


async def test_an_outage_drops_the_rest_of_a_batch_without_retrying_each_message() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock, failures=[NetworkError("down")] * 100)
    sender = AlertSender(rec, [CHAT], clock, max_attempts=3, max_message_chars=100)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        for i in range(20):  # 20 lines of ~46 chars: 10 messages of 2 lines
            bus.publish(fill(i))
        await advance_until(clock, lambda: sender.dropped >= 20)
    assert len(rec.attempts) == 3  # one retry cycle for the batch, not one per message
    assert sender.dropped == 20 and sender.lines_sent == 0


async def test_drain_waits_until_queued_alerts_are_out() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT], clock)
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        await clock.advance(0)
        assert await sender.drain(5)  # nothing queued: at once
        bus.publish(DaemonStopping(ts=NOW, reason="SIGTERM"))
        drained = asyncio.ensure_future(sender.drain(5))
        await clock.advance(0.5)
        assert not drained.done()
        await clock.advance(1.0)
        assert await asyncio.wait_for(drained, 1) is True
        assert "SIGTERM" in rec.sent[0][2]
        rec.failures = [NetworkError("down")] * 10
        bus.publish(DaemonStopping(ts=NOW, reason="again"))
        stuck = asyncio.ensure_future(sender.drain(2))
        await clock.advance(3)
        assert await asyncio.wait_for(stuck, 1) is False  # bounded: a dead Telegram cannot hold the stop


async def test_switched_off_kinds_are_not_sent() -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT], clock, settings=AlertSettings(order_fills=False))
    sub = sender.subscribe(bus)
    async with running(sender.run(sub)):
        bus.publish(fill(1))
        bus.publish(EngineStalled(ts=NOW, engine="spot", heartbeat_age=61))
        await advance_until(clock, lambda: sender.lines_sent >= 1)
        await clock.advance(5)
    assert len(rec.sent) == 1 and "WARN spot" in rec.sent[0][2] and "C0001" not in rec.sent[0][2]


async def test_daily_summary_at_the_set_utc_time() -> None:
    clock = SimClock(NOW)  # 10:00 UTC
    rec = Recorder(clock)
    sender = AlertSender(rec, [CHAT], clock, settings=AlertSettings(daily_summary_utc="10:30"))
    control = FakeControl()
    async with running(sender.run_daily_summary(control)):
        await clock.advance(29 * 60)
        assert rec.sent == []
        await clock.advance(2 * 60)
        assert len(rec.sent) == 1
        _, chat, text = rec.sent[0]
        assert chat == CHAT and "Daily summary 2024-01-05" in text
        assert "Equity 10,234.56" in text and "today" in text and "spot +12.30" in text
        assert control.called("pnl") == [(1,)]
        await clock.advance(86_400)
        assert len(rec.sent) == 2 and "2024-01-06" in rec.sent[1][2]


async def test_daily_summary_off_returns_at_once() -> None:
    clock = SimClock(NOW)
    sender = AlertSender(Recorder(clock), [CHAT], clock)
    await asyncio.wait_for(sender.run_daily_summary(FakeControl()), 1)


# --- against the fake Bot API through the real bot -----------------------------------------------

@pytest.fixture
async def api() -> AsyncIterator[FakeBotApi]:
    fake = FakeBotApi()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def bot(api: FakeBotApi) -> AsyncIterator[TelegramBot]:
    b = TelegramBot(TOKEN, [CHAT], [CHAT], FakeControl(), SimClock(NOW), EventBus(), base_url=api.base_url,
                    poll_timeout=1, request_timeout=0.25)
    assert await b.start()
    try:
        yield b
    finally:
        await asyncio.wait_for(b.stop(), 10)


async def test_429_from_telegram_is_waited_out(api: FakeBotApi, bot: TelegramBot) -> None:
    clock = SimClock(NOW)
    bus = EventBus()
    sender = AlertSender(bot.send_message, [CHAT], clock)
    sub = sender.subscribe(bus)
    api.fail("sendMessage", 429, retry_after=5)
    async with running(sender.run(sub)):
        bus.publish(fill(1))
        await clock.advance(1.0)
        await api.wait_until(lambda: len(api.calls_of("sendMessage")) == 1 and api.calls[-1].status != 0)
        await clock.advance(4.0)
        with pytest.raises(TimeoutError):  # nothing goes out during the wait
            await api.wait_until(lambda: len(api.calls_of("sendMessage")) > 1, timeout=0.3)
        await clock.advance(1.5)
        await api.wait_until(lambda: len(api.sent(CHAT)) == 1)
    assert api.calls_of("sendMessage")[0].status == 429
    assert "C0001/USDT" in api.sent(CHAT)[0]
    assert sender.retry_after_waits == 1 and sender.dropped == 0


@pytest.mark.parametrize("fault", ["unreachable", "slow"])
async def test_telegram_down_never_slows_the_publisher_or_the_loop(
    api: FakeBotApi, bot: TelegramBot, fault: str
) -> None:
    live = LiveClock()
    sim = SimClock(NOW)
    bus = EventBus()
    sender = AlertSender(bot.send_message, [CHAT], sim, max_queue=100)
    sub = sender.subscribe(bus)
    if fault == "unreachable":
        await api.stop()
    else:
        api.slow("sendMessage", 1.0)  # longer than the bot's 0.25 s request timeout
    gaps: list[float] = []

    async def ticker() -> None:
        last = live.monotonic()
        for _ in range(40):
            await live.sleep(0.01)
            now = live.monotonic()
            gaps.append(now - last)
            last = now

    async with running(sender.run(sub)) as task:
        tick = asyncio.ensure_future(ticker())
        publish_times = []
        for i in range(300):
            t0 = live.monotonic()
            bus.publish(fill(i))
            publish_times.append(live.monotonic() - t0)
            if i % 50 == 0:
                await sim.advance(1.0)  # let the sender try (and fail) while we keep publishing
        await asyncio.wait_for(tick, 10)
        # Let the retries (1 s, 2 s backoff on the sender's clock) run out; each real attempt fails
        # within the bot's 0.25 s request timeout.
        for _ in range(200):  # at most ~10 s of real time
            if sender.dropped >= 300:
                break
            await sim.advance(2.0)
            await live.sleep(0.05)
        assert not task.done()  # nothing raised out of the sender
    assert max(publish_times) < 0.005
    assert max(gaps) < 0.2, f"loop stalled for {max(gaps):.3f}s"
    assert sender.lines_sent == 0
    assert sender.dropped == 300  # every event accounted for: queue overflow plus failed deliveries


def test_breaker_report_before_the_first_equity_reads_not_taken_yet() -> None:
    """Right after a first start the risk monitor has no day-start or peak equity yet: /breaker must
    still answer (it used to fail formatting None), and say so instead of showing a number."""
    from monitoring.alerts import format_breaker
    from monitoring.control import BreakerReport

    early = format_breaker(BreakerReport(TradingState.ACTIVE, "", None, None, None))
    assert "Day-start equity not taken yet · peak not taken yet" in early
    later = format_breaker(BreakerReport(TradingState.REDUCING, "drawdown 12% >= 10%", None,
                                         Decimal("10500"), Decimal("12000.5")))
    assert "Day-start equity 10,500.00 · peak 12,000.50" in later
    assert "drawdown 12% >= 10%" in later
