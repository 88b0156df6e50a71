"""The real python-telegram-bot against a loopback Bot API: what an operator's phone sees.

Every command is typed into the fake as a user would (a message with a bot_command entity) and the
answer is read back from the fake's sendMessage log. Strangers get silence; the journal gets an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import structlog
from telegram.error import NetworkError

from core.clock import LiveClock, SimClock
from core.events import CommandReceived, EventBus, Subscription
from core.types import MarketType, Position, PositionSide, TradingState
from monitoring.control import (
    BalanceReport,
    BreakerReport,
    CommandResult,
    DailyPnl,
    EngineStatus,
    StatusReport,
    TradeRecord,
)
from monitoring.telegram import KILL_CONFIRM_SECONDS, TelegramBot
from tests.fakes.telegram_api import TOKEN, FakeBotApi

OPERATOR = 1001  # allowed, and their private chat (same id) is configured
SECOND_OPERATOR = 1002  # allowed
STRANGER = 666  # not allowed
GROUP = -100_200  # configured group chat with operators and strangers in it
UNKNOWN_CHAT = -100_999  # a group nobody configured
NOW = 1_704_448_800.0  # 2024-01-05 10:00 UTC


@dataclass
class FakeControl:
    """What the Orchestrator would answer, with a log of every call so tests see what the bot drove."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    kill_result: CommandResult = field(default_factory=lambda: CommandResult(True, "trading HALTED"))

    async def status(self) -> StatusReport:
        self.calls.append(("status", ()))
        return StatusReport(
            mode="paper",
            trading_state=TradingState.ACTIVE,
            engines=(
                EngineStatus("spot", "running", 3.2, False, 1, Decimal("6123.4"), 2, Decimal("45.5"),
                              Decimal("-3.25")),
                EngineStatus("futures", "disabled", None, False, 0, Decimal(0), 0, Decimal(0), Decimal(0)),
            ),
            equity=Decimal("10234.5612"),
            day_pnl=Decimal("34.56"),
            day_pnl_pct=Decimal("0.3389"),
            drawdown_pct=Decimal("1.2"),
            uptime_seconds=3 * 3600 + 12 * 60,
        )

    async def positions(self) -> list[Position]:
        self.calls.append(("positions", ()))
        return [
            Position("spot", MarketType.SPOT, "BTC/USDT", PositionSide.LONG, Decimal("0.01500"),
                     Decimal("43210.5"), NOW - 7200, stop_loss=Decimal("42500"), take_profit=Decimal("44100")),
            Position("spot", MarketType.SPOT, "SOL/USDT", PositionSide.LONG, Decimal("12"), Decimal("98.765432"),
                     NOW - 90),
        ]

    async def balance(self) -> list[BalanceReport]:
        self.calls.append(("balance", ()))
        return [BalanceReport("spot", free={"USDT": Decimal("4000.25")},
                              total={"USDT": Decimal("5500.25"), "BTC": Decimal("0.015")},
                              equity=Decimal("6123.4"))]

    async def pnl(self, days: int) -> list[DailyPnl]:
        self.calls.append(("pnl", (days,)))
        return [
            DailyPnl("2024-01-05", "spot", Decimal("12.3"), 4),
            DailyPnl("2024-01-04", "spot", Decimal("-7.5"), 2),
        ]

    async def trades(self, n: int) -> list[TradeRecord]:
        self.calls.append(("trades", (n,)))
        return [TradeRecord(NOW - 60, "spot", "BTC/USDT", "sell", Decimal("0.015"), Decimal("43500"),
                            Decimal("0.65"), Decimal("4.35"))][:n]

    async def pause(self, target: str, by: str) -> CommandResult:
        self.calls.append(("pause", (target, by)))
        return CommandResult(True, f"{target} paused")

    async def resume(self, target: str, by: str) -> CommandResult:
        self.calls.append(("resume", (target, by)))
        return CommandResult(True, f"{target} resumed")

    async def restart(self, engine: str, by: str) -> CommandResult:
        self.calls.append(("restart", (engine, by)))
        return CommandResult(False, f"{engine} is disabled")

    async def breaker(self) -> BreakerReport:
        self.calls.append(("breaker", ()))
        return BreakerReport(TradingState.REDUCING, "daily loss 5.2% >= 5%", NOW + 3600, Decimal("10500"),
                             Decimal("11000"))

    async def breaker_reset(self, by: str) -> CommandResult:
        self.calls.append(("breaker_reset", (by,)))
        return CommandResult(True, "breaker reset; trading ACTIVE")

    async def kill(self, by: str) -> CommandResult:
        self.calls.append(("kill", (by,)))
        return self.kill_result

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeBotApi]:
    api = FakeBotApi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@dataclass
class Rig:
    api: FakeBotApi
    bot: TelegramBot
    control: FakeControl
    clock: SimClock
    bus: EventBus
    commands: Subscription

    async def ask(self, text: str, chat_id: int = OPERATOR, user_id: int = OPERATOR) -> str:
        """Send a command as a user and return the bot's reply (bounded wait)."""
        before = len(self.api.sent(chat_id))
        self.api.inject_command(text, chat_id=chat_id, user_id=user_id)
        sent = await self.api.wait_sent(chat_id, before + 1, timeout=5)
        return sent[before]

    def events(self) -> list[CommandReceived]:
        out: list[CommandReceived] = []
        while not self.commands.queue.empty():
            ev = self.commands.queue.get_nowait()
            assert isinstance(ev, CommandReceived)
            out.append(ev)
        return out


def make_bot(api: FakeBotApi, control: FakeControl, clock: SimClock, bus: EventBus, **kw: Any) -> TelegramBot:
    return TelegramBot(TOKEN, [OPERATOR, GROUP], [OPERATOR, SECOND_OPERATOR], control, clock, bus,
                       base_url=api.base_url, poll_timeout=1, **kw)


@pytest.fixture
async def rig(fake_api: FakeBotApi) -> AsyncIterator[Rig]:
    clock = SimClock(NOW)
    bus = EventBus()
    commands = bus.subscribe("test", kinds=frozenset({CommandReceived}))
    control = FakeControl()
    bot = make_bot(fake_api, control, clock, bus, request_timeout=2.0)
    assert await bot.start()
    try:
        yield Rig(fake_api, bot, control, clock, bus, commands)
    finally:
        await asyncio.wait_for(bot.stop(), 10)


async def test_start_registers_the_command_menu(rig: Rig) -> None:
    (call,) = rig.api.calls_of("setMyCommands")
    names = {c["command"] for c in call.params["commands"]}
    assert names == {"status", "positions", "balance", "pnl", "trades", "pause", "resume", "restart",
                     "breaker", "kill", "help"}
    assert rig.bot.connected


@pytest.mark.parametrize(
    ("text", "expected_call", "must_contain"),
    [
        ("/status", ("status", ()), ["ACTIVE", "paper", "Equity 10,234.56", "day +34.56 (+0.34%)",
                                    "drawdown 1.20%", "spot: running", "heartbeat 3s", "futures: disabled",
                                    "P&L r +45.50 u -3.25"]),
        ("/positions", ("positions", ()), ["2 open positions", "BTC/USDT long 0.015 @ 43,210.50",
                                          "SL 42,500.00", "TP 44,100.00", "2h00m old", "SOL/USDT long 12 @ 98.7654"]),
        ("/balance", ("balance", ()), ["spot: equity 6,123.40", "USDT 5500.25 (free 4000.25)", "BTC 0.015"]),
        ("/pnl", ("pnl", (7,)), ["last 7 days", "2024-01-05: spot +12.30 (4)", "2024-01-04: spot -7.50 (2)",
                                "Total +4.80 over 6 trades"]),
        ("/pnl 3", ("pnl", (3,)), ["last 3 days"]),
        ("/trades", ("trades", (10,)), ["SELL 0.015 BTC/USDT @ 43,500.00", "fee 0.65", "P&L +4.35"]),
        ("/trades 1", ("trades", (1,)), ["Last 1 trade:"]),
        ("/pause spot", ("pause", ("spot", f"telegram:{OPERATOR}")), ["✅ spot paused"]),
        ("/pause ALL", ("pause", ("all", f"telegram:{OPERATOR}")), ["✅ all paused"]),
        ("/resume futures", ("resume", ("futures", f"telegram:{OPERATOR}")), ["✅ futures resumed"]),
        ("/restart futures", ("restart", ("futures", f"telegram:{OPERATOR}")), ["❌ futures is disabled"]),
        ("/breaker", ("breaker", ()), ["REDUCING", "daily loss 5.2% >= 5%", "2024-01-05 11:00 UTC",
                                      "peak 11,000.00"]),
        ("/breaker reset", ("breaker_reset", (f"telegram:{OPERATOR}",)), ["✅ breaker reset"]),
    ],
)
async def test_authorized_command_gets_the_answer(
    rig: Rig, text: str, expected_call: tuple[str, tuple[Any, ...]], must_contain: list[str]
) -> None:
    reply = await rig.ask(text)
    for fragment in must_contain:
        assert fragment in reply, f"{fragment!r} missing from {reply!r}"
    assert rig.control.calls == [expected_call]
    (event,) = rig.events()
    assert event.authorized and event.user_id == OPERATOR and event.chat_id == OPERATOR
    assert event.command == text.split()[0][1:].lower()


async def test_help_lists_every_command_with_usage(rig: Rig) -> None:
    reply = await rig.ask("/help")
    for usage in ("/status", "/positions", "/balance", "/pnl [days]", "/trades [n]", "/pause <spot|futures|all>",
                  "/resume <spot|futures|all>", "/restart <spot|futures>", "/breaker [reset]", "/kill", "/help"):
        assert usage in reply
    assert rig.control.calls == []


async def test_second_operator_in_group_is_answered_in_the_group(rig: Rig) -> None:
    reply = await rig.ask("/pause futures", chat_id=GROUP, user_id=SECOND_OPERATOR)
    assert "futures paused" in reply
    assert rig.control.called("pause") == [("futures", f"telegram:{SECOND_OPERATOR}")]


@pytest.mark.parametrize(
    ("text", "usage"),
    [
        ("/pnl abc", "Usage: /pnl [days]"),
        ("/pnl 0", "Usage: /pnl [days]"),
        ("/pnl 1000", "Usage: /pnl [days]"),
        ("/trades -3", "Usage: /trades [n]"),
        ("/trades 5 6", "Usage: /trades [n]"),
        ("/pause", "Usage: /pause <spot|futures|all>"),
        ("/pause moon", "Usage: /pause <spot|futures|all>"),
        ("/resume", "Usage: /resume <spot|futures|all>"),
        ("/restart", "Usage: /restart <spot|futures>"),
        ("/restart all", "Usage: /restart <spot|futures>"),
        ("/breaker resett", "Usage: /breaker [reset]"),
        ("/status now", "Usage: /status"),
        ("/kill everything", "Usage: /kill"),
    ],
)
async def test_wrong_arguments_get_the_usage_line_and_do_nothing(rig: Rig, text: str, usage: str) -> None:
    reply = await rig.ask(text)
    assert reply.startswith(usage)
    assert rig.control.calls == []


async def test_unknown_command_from_operator_points_to_help(rig: Rig) -> None:
    reply = await rig.ask("/moon")
    assert "Unknown command /moon" in reply and "/help" in reply


ALL_COMMANDS = ["/status", "/positions", "/balance", "/pnl", "/trades 5", "/pause all", "/resume all",
                "/restart spot", "/breaker", "/breaker reset", "/kill", "/help", "/moon"]


@pytest.mark.parametrize(
    ("chat_id", "user_id"),
    [(UNKNOWN_CHAT, OPERATOR), (GROUP, STRANGER), (STRANGER, STRANGER)],
    ids=["allowed-user-in-unknown-chat", "stranger-in-allowed-group", "stranger-private-chat"],
)
async def test_unauthorized_commands_get_no_reply_and_are_logged_and_published(
    rig: Rig, chat_id: int, user_id: int
) -> None:
    with structlog.testing.capture_logs() as logs:
        for text in ALL_COMMANDS:
            rig.api.inject_command(text, chat_id=chat_id, user_id=user_id)
        # Updates are handled in order: once a later authorized command is answered, the stranger's
        # commands have all been handled, so "no reply" is a fact and not a race.
        await rig.ask("/help", chat_id=GROUP, user_id=OPERATOR)
    assert len(rig.api.sent(chat_id)) == (1 if chat_id == GROUP else 0)  # only the operator's /help
    assert rig.api.calls_of("answerCallbackQuery") == []
    assert rig.control.calls == []
    events = rig.events()
    refused = [e for e in events if not e.authorized]
    assert [e.command for e in refused] == [t.split()[0][1:] for t in ALL_COMMANDS]
    assert all(e.chat_id == chat_id and e.user_id == user_id for e in refused)
    warned = [e for e in logs if e["event"] == "telegram command from unauthorized sender ignored"]
    assert len(warned) == len(ALL_COMMANDS)
    assert all(w["chat_id"] == chat_id and w["user_id"] == user_id for w in warned)


async def test_editing_an_old_message_into_a_command_does_not_run_it(rig: Rig) -> None:
    rig.api.inject_command("/pause all", chat_id=OPERATOR, user_id=OPERATOR, edited=True)
    await rig.ask("/help")
    assert rig.control.calls == []
    assert len(rig.api.sent(OPERATOR)) == 1


async def test_command_addressed_to_another_bot_is_not_ours(rig: Rig) -> None:
    rig.api.inject_command("/pause@SomeOtherBot all", chat_id=GROUP, user_id=OPERATOR)
    reply = await rig.ask("/pause@kinetic_test_bot spot", chat_id=GROUP, user_id=OPERATOR)
    assert "spot paused" in reply
    assert rig.control.called("pause") == [("spot", f"telegram:{OPERATOR}")]


# --- kill confirmation ---------------------------------------------------------------------------


async def request_kill(r: Rig, chat_id: int = OPERATOR, user_id: int = OPERATOR) -> tuple[str, str]:
    """Send /kill; return the confirm and cancel buttons' callback data."""
    prompt = await r.ask("/kill", chat_id=chat_id, user_id=user_id)
    assert "Kill switch" in prompt and "60 s" in prompt
    call = [c for c in r.api.calls_of("sendMessage") if c.params["chat_id"] == chat_id][-1]
    (row,) = call.params["reply_markup"]["inline_keyboard"]
    confirm, cancel = row[0]["callback_data"], row[1]["callback_data"]
    assert confirm.startswith("kill:") and cancel.startswith("cancel:")
    return confirm, cancel


async def press(r: Rig, data: str, chat_id: int, user_id: int, answers: int) -> str:
    """Press a button and wait for the bot's callback answer number `answers` (the toast text)."""
    r.api.inject_callback(data, chat_id=chat_id, user_id=user_id, message_id=1)
    await r.api.wait_until(lambda: len(r.api.calls_of("answerCallbackQuery")) >= answers, timeout=5)
    return str(r.api.calls_of("answerCallbackQuery")[answers - 1].params.get("text", ""))


async def test_kill_needs_confirmation_and_kills_once(rig: Rig) -> None:
    confirm, _ = await request_kill(rig)
    assert rig.control.called("kill") == []  # asking is not killing
    await press(rig, confirm, OPERATOR, OPERATOR, answers=1)
    await rig.api.wait_until(lambda: any("Kill switch: ✅ trading HALTED" in t for t in rig.api.sent(OPERATOR)))
    assert rig.control.called("kill") == [(f"telegram:{OPERATOR}",)]
    edits = rig.api.calls_of("editMessageText")
    assert edits and "Kill confirmed" in edits[-1].params["text"]
    # A second press of the same button (double tap, or a replayed update) does nothing.
    toast = await press(rig, confirm, OPERATOR, OPERATOR, answers=2)
    assert "not valid" in toast and "Nothing was done" in toast
    assert len(rig.control.called("kill")) == 1
    assert [e.command for e in rig.events()] == ["kill", "kill-confirm", "kill-confirm"]


async def test_kill_confirmation_expires(rig: Rig) -> None:
    confirm, _ = await request_kill(rig)
    await rig.clock.advance(KILL_CONFIRM_SECONDS + 1)
    toast = await press(rig, confirm, OPERATOR, OPERATOR, answers=1)
    assert "expired" in toast.lower() and "Nothing was done" in toast
    await rig.api.wait_until(lambda: len(rig.api.calls_of("editMessageText")) >= 1)
    assert "expired" in rig.api.calls_of("editMessageText")[-1].params["text"]
    assert rig.control.called("kill") == []


async def test_kill_confirmed_just_in_time_counts(rig: Rig) -> None:
    confirm, _ = await request_kill(rig)
    await rig.clock.advance(KILL_CONFIRM_SECONDS - 1)
    await press(rig, confirm, OPERATOR, OPERATOR, answers=1)
    await rig.api.wait_until(lambda: len(rig.control.called("kill")) == 1)


async def test_stranger_cannot_confirm_a_kill(rig: Rig) -> None:
    confirm, _ = await request_kill(rig, chat_id=GROUP, user_id=OPERATOR)
    with structlog.testing.capture_logs() as logs:
        rig.api.inject_callback(confirm, chat_id=GROUP, user_id=STRANGER, message_id=1)
        # The operator's own press right after proves the stranger's was handled, ignored, and did
        # not use up the confirmation.
        await press(rig, confirm, GROUP, OPERATOR, answers=1)
    await rig.api.wait_until(lambda: len(rig.control.called("kill")) == 1)
    assert rig.control.called("kill") == [(f"telegram:{OPERATOR}",)]
    assert len(rig.api.calls_of("answerCallbackQuery")) == 1  # the stranger got no answer at all
    stranger = [e for e in rig.events() if e.user_id == STRANGER]
    assert [(e.command, e.authorized) for e in stranger] == [("kill-confirm", False)]
    assert any(e["event"] == "telegram command from unauthorized sender ignored" and e["user_id"] == STRANGER
               for e in logs)


async def test_stranger_alone_pressing_confirm_kills_nothing(rig: Rig) -> None:
    confirm, _ = await request_kill(rig, chat_id=GROUP, user_id=OPERATOR)
    rig.api.inject_callback(confirm, chat_id=GROUP, user_id=STRANGER, message_id=1)
    await rig.ask("/help", chat_id=GROUP, user_id=OPERATOR)  # handled after the press
    assert rig.control.called("kill") == []
    assert rig.api.calls_of("answerCallbackQuery") == []


async def test_confirmation_from_another_chat_is_refused(rig: Rig) -> None:
    confirm, _ = await request_kill(rig, chat_id=GROUP, user_id=OPERATOR)
    toast = await press(rig, confirm, OPERATOR, OPERATOR, answers=1)  # operator's private chat
    assert "not valid" in toast
    toast = await press(rig, "kill:forgednonce", GROUP, OPERATOR, answers=2)
    assert "not valid" in toast
    assert rig.control.called("kill") == []


async def test_kill_can_be_cancelled(rig: Rig) -> None:
    confirm, cancel = await request_kill(rig)
    toast = await press(rig, cancel, OPERATOR, OPERATOR, answers=1)
    assert "cancelled" in toast.lower()
    toast = await press(rig, confirm, OPERATOR, OPERATOR, answers=2)
    assert "not valid" in toast
    assert rig.control.called("kill") == []


async def test_failed_kill_is_reported_not_hidden(rig: Rig) -> None:
    rig.control.kill_result = CommandResult(False, "ledger unavailable")
    confirm, _ = await request_kill(rig)
    await press(rig, confirm, OPERATOR, OPERATOR, answers=1)
    await rig.api.wait_until(lambda: any("❌ ledger unavailable" in t for t in rig.api.sent(OPERATOR)))


# --- Telegram misbehaving --------------------------------------------------------------------------


async def test_hanging_control_call_answers_timed_out(fake_api: FakeBotApi) -> None:
    clock = SimClock(NOW)
    control = FakeControl()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def stuck_status() -> StatusReport:
        await never
        raise AssertionError("unreachable")

    control.status = stuck_status  # type: ignore[method-assign]
    bot = make_bot(fake_api, control, clock, EventBus(), control_timeout=20)
    assert await bot.start()
    try:
        fake_api.inject_command("/status", chat_id=OPERATOR, user_id=OPERATOR)
        await fake_api.wait_until(lambda: clock.pending_sleeps() > 0)
        await clock.advance(21)
        (reply,) = await fake_api.wait_sent(OPERATOR, 1)
        assert "timed out" in reply
    finally:
        await asyncio.wait_for(bot.stop(), 10)


async def test_start_with_api_unreachable_fails_fast_then_connects_in_background(fake_api: FakeBotApi) -> None:
    port = fake_api.port
    assert port is not None
    await fake_api.stop()  # nothing listens on the port now: connection refused
    clock = SimClock(NOW)
    bot = make_bot(fake_api, FakeControl(), clock, EventBus(), request_timeout=2.0, retry_start_seconds=15)
    live = LiveClock()
    t0 = live.monotonic()
    with structlog.testing.capture_logs() as logs:
        started = await asyncio.wait_for(bot.start(), 10)
    assert started is False and not bot.connected
    assert live.monotonic() - t0 < 3.0
    assert any(e["log_level"] == "error" and "unreachable" in e["event"] for e in logs)
    assert TOKEN.split(":")[1] not in repr(logs)  # the token never reaches a log line
    with pytest.raises(NetworkError):
        await bot.send_message(OPERATOR, "anyone?")
    try:
        await fake_api.start(port=port)  # Telegram comes back
        await clock.advance(15)  # the background retry fires
        await fake_api.wait_until(lambda: bot.connected, timeout=5)
        fake_api.inject_command("/help", chat_id=OPERATOR, user_id=OPERATOR)
        (reply,) = await fake_api.wait_sent(OPERATOR, 1)
        assert "/status" in reply
    finally:
        await asyncio.wait_for(bot.stop(), 10)
    assert not bot.connected


async def test_start_against_a_hanging_api_fails_fast(fake_api: FakeBotApi) -> None:
    fake_api.slow("getMe", 1.0)
    clock = SimClock(NOW)
    bot = make_bot(fake_api, FakeControl(), clock, EventBus(), request_timeout=0.3)
    live = LiveClock()
    t0 = live.monotonic()
    try:
        assert await asyncio.wait_for(bot.start(), 10) is False
        assert live.monotonic() - t0 < 2.0
    finally:
        await asyncio.wait_for(bot.stop(), 5)


async def test_rejected_token_turns_telegram_off_without_retrying(fake_api: FakeBotApi) -> None:
    clock = SimClock(NOW)
    bot = TelegramBot("999:not-the-fakes-token", [OPERATOR], [OPERATOR], FakeControl(), clock, EventBus(),
                      base_url=fake_api.base_url, request_timeout=2.0)
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(bot.start(), 10) is False
    assert any("rejected the bot token" in e["event"] for e in logs)
    assert clock.pending_sleeps() == 0  # no background retry: a wrong token will not fix itself
    await asyncio.wait_for(bot.stop(), 5)


async def test_stop_while_still_retrying_in_background(fake_api: FakeBotApi) -> None:
    await fake_api.stop()
    clock = SimClock(NOW)
    bot = make_bot(fake_api, FakeControl(), clock, EventBus(), request_timeout=1.0)
    assert await asyncio.wait_for(bot.start(), 10) is False
    await clock.advance(15)  # one more failed attempt, then waiting again
    await asyncio.wait_for(bot.stop(), 5)
    assert clock.pending_sleeps() == 0  # the retry task is gone, not left behind


async def test_slow_reply_does_not_stall_command_handling_forever(fake_api: FakeBotApi) -> None:
    clock = SimClock(NOW)
    control = FakeControl()
    bot = make_bot(fake_api, control, clock, EventBus(), request_timeout=0.3)
    assert await bot.start()
    try:
        fake_api.slow("sendMessage", 1.0)
        fake_api.inject_command("/pause spot", chat_id=OPERATOR, user_id=OPERATOR)
        await fake_api.wait_until(lambda: len(fake_api.calls_of("sendMessage")) >= 1, timeout=5)
        fake_api.slow("sendMessage", 0)
        # The reply timed out after 0.3 s (logged); the next command is handled and answered.
        fake_api.inject_command("/resume spot", chat_id=OPERATOR, user_id=OPERATOR)
        await fake_api.wait_until(lambda: any("spot resumed" in t for t in fake_api.sent(OPERATOR)), timeout=5)
        assert [n for n, _ in control.calls] == ["pause", "resume"]
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bot.stop(), 10)


async def test_send_message_raises_telegram_errors_for_the_caller(rig: Rig) -> None:
    rig.api.fail("sendMessage", 502)
    with pytest.raises(NetworkError):
        await rig.bot.send_message(OPERATOR, "alert")
    await rig.bot.send_message(OPERATOR, "alert again")
    assert rig.api.sent(OPERATOR) == ["alert again"]


async def test_stop_passes_on_its_own_cancellation(fake_api: FakeBotApi) -> None:
    """stop() cancels the reconnecting task and waits for it; a cancel of stop() itself during that wait
    (the shutdown's own bound running out) must reach its caller, not be taken for the task's."""
    bot = make_bot(fake_api, FakeControl(), SimClock(NOW), EventBus())
    released = asyncio.Event()

    async def slow_to_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await released.wait()  # cleanup that takes a while
            raise

    bot._connect_task = asyncio.create_task(slow_to_cancel())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(bot.stop())
    await asyncio.sleep(0.05)
    stopping.cancel()
    released.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopping, 5)
