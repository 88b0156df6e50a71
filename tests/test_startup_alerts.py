"""What start-up decides reaches the owner's phone. The breaker is judged in the risk-state stage and
the reconciliation reports in its own, both before Telegram is up: the alerts are listened for from
the start, and the "started" message says how trading stands."""

from __future__ import annotations

import asyncio
from pathlib import Path

from config import load_settings
from core.clock import LiveClock, start_of_utc_day
from core.types import TradingState
from engines.orchestrator import RISK_KEY, Orchestrator
from storage.ledger import Ledger
from tests import test_daemon_telegram as daemon_telegram_tests
from tests.bounded import bounded
from tests.fakes.telegram_api import TOKEN, FakeBotApi

ROOT = Path(__file__).resolve().parent.parent
OWNER, CHAT = 4242, -100777


fake = daemon_telegram_tests.fake  # the fixture: the loopback Bot API of tests/test_daemon_telegram.py


@bounded(60)
async def test_a_kill_switch_tripped_at_restart_is_alerted(tmp_path: Path, fake: FakeBotApi) -> None:
    # The previous run counted from 20,000 of equity; the paper account now holds 10,000: a 50 % total
    # loss, past the 25 % kill switch. The restart halts, and must say so.
    clock = LiveClock()
    now = clock.now()
    async with await Ledger.open(tmp_path / "ledger.sqlite3", clock) as ledger:
        await ledger.set_state(RISK_KEY, {
            "trading_state": "active", "initial_equity": "20000", "day_start": start_of_utc_day(now),
            "day_start_equity": "10000", "peak_equity": "10000",
        })
    settings = load_settings(
        env_file=None, data_dir=tmp_path, telegram_bot_token=TOKEN, telegram_chat_ids=[CHAT],
        telegram_allowed_user_ids=[OWNER], health_check_interval_seconds=0.05, looplag_enabled=False,
    )
    orch = Orchestrator(settings, clock, replay_path=ROOT / "data", speed=50, telegram_base_url=fake.base_url)
    task = asyncio.ensure_future(orch.run())
    try:
        await asyncio.wait_for(orch.ready.wait(), 30)
        assert orch.trading_state is TradingState.HALTED
        texts: list[str] = []
        for _ in range(100):  # bounded: 10 s
            texts = fake.sent(CHAT)
            if any("KILL" in t for t in texts) and any("started" in t for t in texts):
                break
            await asyncio.sleep(0.1)
        kill = [t for t in texts if "🛑 KILL" in t]
        started = [t for t in texts if "started" in t]
        assert kill and "kill switch" in kill[0], texts
        assert started and "Trading HALTED" in started[0], texts
    finally:
        orch.request_stop("test over")
        await asyncio.wait_for(task, 30)
