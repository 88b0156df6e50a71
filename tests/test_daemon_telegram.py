"""The whole daemon with Telegram on, against the loopback fake of the Bot API: the owner gets the start-up
alert, commands work from the owner and are ignored from a stranger, /kill with its confirmation halts
trading, the final portfolio goes out at shutdown — and no secret ever reaches the logs."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config import load_settings
from core.clock import LiveClock
from core.types import TradingState
from engines.orchestrator import Orchestrator
from monitoring.logging import configure_logging
from tests.fakes.telegram_api import TOKEN, FakeBotApi

ROOT = Path(__file__).resolve().parent.parent
OWNER, CHAT, STRANGER = 4242, -100777, 666
BINANCE_KEY = "binance-key-that-must-never-print-1234"
BINANCE_SECRET = "binance-secret-that-must-never-print-5678"


@pytest.fixture
async def fake() -> AsyncIterator[FakeBotApi]:
    api = FakeBotApi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


async def test_daemon_with_telegram_end_to_end(tmp_path: Path, fake: FakeBotApi) -> None:
    stream = io.StringIO()
    configure_logging("json", "DEBUG", [TOKEN, BINANCE_KEY, BINANCE_SECRET], stream=stream)
    settings = load_settings(
        env_file=None, data_dir=tmp_path, telegram_bot_token=TOKEN, telegram_chat_ids=[CHAT],
        telegram_allowed_user_ids=[OWNER], binance_api_key=BINANCE_KEY, binance_api_secret=BINANCE_SECRET,
        health_check_interval_seconds=0.05, looplag_enabled=False,
    )
    orch = Orchestrator(settings, LiveClock(), replay_path=ROOT / "data", speed=5000,
                        telegram_base_url=fake.base_url)
    task = asyncio.ensure_future(orch.run())
    try:
        await asyncio.wait_for(orch.ready.wait(), 30)
        started = await fake.wait_sent(CHAT, 1, timeout=10)
        assert any("paper" in m.lower() and "spot" in m.lower() for m in started), started

        fake.inject_command("/status", chat_id=CHAT, user_id=OWNER)
        await fake.wait_until(lambda: any("equity" in m.lower() for m in fake.sent(CHAT)), timeout=10)

        before = len(fake.sent())
        fake.inject_command("/kill", chat_id=CHAT, user_id=STRANGER)
        fake.inject_command("/pause all", chat_id=CHAT, user_id=STRANGER)
        await asyncio.sleep(0.5)
        assert orch.trading_state is TradingState.ACTIVE
        assert orch.gate is not None and not orch.gate.is_paused("spot")
        assert not [m for m in fake.sent()[before:] if "kill" in m.lower() or "paused" in m.lower()]

        fake.inject_command("/kill", chat_id=CHAT, user_id=OWNER)
        await fake.wait_until(lambda: bool(fake.calls_of("sendMessage")) and any(
            c.params.get("reply_markup") for c in fake.calls_of("sendMessage")), timeout=10)
        call = next(c for c in reversed(fake.calls_of("sendMessage")) if c.params.get("reply_markup"))
        buttons = call.params["reply_markup"]["inline_keyboard"]
        confirm = next(b["callback_data"] for row in buttons for b in row
                       if "confirm" in b["callback_data"].lower() or "kill" in b["text"].lower())
        fake.inject_callback(confirm, chat_id=CHAT, user_id=OWNER, message_id=1)

        async def halted() -> None:
            for _ in range(500):
                if orch.trading_state is TradingState.HALTED:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("kill did not halt trading")

        await halted()
        assert orch.ledger is not None
        for _ in range(500):  # flattening runs in its own task once HALTED is persisted
            if await orch.ledger.positions() == []:
                break
            await asyncio.sleep(0.02)
        assert await orch.ledger.positions() == []
    finally:
        orch.request_stop("test over")
        await asyncio.wait_for(task, 30)
    assert any("final" in m.lower() for m in fake.sent(CHAT)), fake.sent(CHAT)[-3:]
    journal = stream.getvalue()
    assert '"event": "daemon started"' in journal
    for secret in (TOKEN, BINANCE_KEY, BINANCE_SECRET, TOKEN.split(":")[1]):
        assert secret not in journal, f"a secret leaked into the logs: {secret[:6]}..."
    assert not re.search(r"bot\d+:[A-Za-z0-9_-]{10,}", journal)
