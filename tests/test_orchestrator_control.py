"""The Orchestrator in-process on the bundled replay: the control commands Telegram uses (pause, resume,
kill, breaker reset, restart) do what they say, and pause and kill survive a restart on the same ledger."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config import load_settings
from core.clock import LiveClock
from core.types import Position, TradingState
from engines.orchestrator import Orchestrator
from storage.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent


def make(tmp_path: Path, **overrides: object) -> Orchestrator:
    settings = load_settings(
        env_file=None, data_dir=tmp_path, health_check_interval_seconds=0.05, looplag_enabled=False,
        **overrides,
    )
    return Orchestrator(settings, LiveClock(), replay_path=ROOT / "data", speed=20_000)


@contextlib.asynccontextmanager
async def running(orch: Orchestrator) -> AsyncIterator[Orchestrator]:
    task = asyncio.ensure_future(orch.run())
    try:
        await asyncio.wait_for(orch.ready.wait(), 30)
        yield orch
    finally:
        orch.request_stop("test over")
        await asyncio.wait_for(task, 30)


async def until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def first_spot_position(orch: Orchestrator, timeout: float = 30.0) -> Position:
    """The spot engine's first position, once the replay has made it enter."""
    ledger = orch.ledger
    assert ledger is not None

    async def held() -> bool:
        return bool(await ledger.positions("spot"))

    await until(held, timeout=timeout)
    return (await ledger.positions("spot"))[0]


async def test_pause_blocks_entries_and_survives_restart(tmp_path: Path) -> None:
    async with running(make(tmp_path)) as orch:
        result = await orch.pause("spot", by="test:1")
        assert result.ok
        status = await orch.status()
        assert status.engines[0].paused and status.engines[0].state == "paused"
        entries_before = orch.supervisor.slots["spot"].engine.counters.entries  # type: ignore[union-attr]
        await asyncio.sleep(1.5)  # ~100 replayed bars
        assert orch.supervisor.slots["spot"].engine.counters.entries == entries_before  # type: ignore[union-attr]
        assert not (await orch.pause("options", by="test:1")).ok
    async with running(make(tmp_path)) as orch:
        assert orch.gate is not None and orch.gate.is_paused("spot"), "pause persisted"
        assert (await orch.resume("spot", by="test:1")).ok
        assert not orch.gate.is_paused("spot")


async def test_kill_flattens_halts_and_survives_restart_until_resume_all(tmp_path: Path) -> None:
    async with running(make(tmp_path)) as orch:
        assert orch.ledger is not None
        ledger = orch.ledger

        async def holding() -> bool:
            return len(await ledger.positions()) > 0

        await until(holding)
        result = await orch.kill(by="telegram:42")
        assert result.ok and "HALTED" in result.message
        assert orch.trading_state is TradingState.HALTED
        assert await ledger.positions() == [], "kill flattens every position"
        await asyncio.sleep(1.0)
        assert await ledger.positions() == [], "nothing is bought while HALTED"
        assert not (await orch.resume("spot", by="telegram:42")).ok, "only /resume all lifts a kill"
    async with running(make(tmp_path)) as orch:
        assert orch.trading_state is TradingState.HALTED, "kill persisted across restart"
        breaker = await orch.breaker()
        assert breaker.state is TradingState.HALTED and "telegram:42" in breaker.reason
        assert not (await orch.breaker_reset(by="x")).ok, "a kill is not a breaker trip"
        assert (await orch.resume("all", by="telegram:42")).ok
        assert orch.trading_state is TradingState.ACTIVE
    async with await Ledger.open(tmp_path / "ledger.sqlite3", LiveClock()) as ledger:
        kinds = [row["kind"] for row in await ledger.read_journal(limit=10_000)]
    assert "TradingStateChanged" in kinds and "OrderFilled" in kinds


async def test_breaker_trip_and_reset(tmp_path: Path) -> None:
    async with running(make(tmp_path, global_max_drawdown_pct=0.01)) as orch:
        async def reducing() -> bool:
            return orch.trading_state is TradingState.REDUCING

        await until(reducing)
        report = await orch.breaker()
        assert report.until is not None and "drawdown" in report.reason.lower()
        result = await orch.breaker_reset(by="telegram:42")
        assert result.ok and orch.trading_state is TradingState.ACTIVE


async def test_restart_command_goes_through_the_supervisor(tmp_path: Path) -> None:
    async with running(make(tmp_path)) as orch:
        sup = orch.supervisor
        assert sup is not None
        first = sup.slots["spot"].engine
        result = await orch.restart("spot", by="telegram:42")
        assert result.ok

        async def replaced() -> bool:
            engine = sup.slots["spot"].engine
            return engine is not None and engine is not first and sup.slots["spot"].state.value == "running"

        await until(replaced)
        assert not (await orch.restart("futures", by="x")).ok


@pytest.mark.parametrize("target", ["spot", "all"])
async def test_status_reports_what_the_owner_needs(tmp_path: Path, target: str) -> None:
    async with running(make(tmp_path)) as orch:
        status = await orch.status()
        assert status.mode.startswith("paper")
        assert status.trading_state is TradingState.ACTIVE
        assert [e.name for e in status.engines] == ["spot"]
        assert status.engines[0].heartbeat_age is not None and status.engines[0].heartbeat_age < 5
        assert status.equity > 0
        assert (await orch.pause(target, by="t")).ok


@pytest.mark.parametrize(
    ("spot", "futures", "expected"),
    [(True, False, ["spot"]), (False, True, ["futures"]), (True, True, ["spot", "futures"])],
)
async def test_engines_spawn_as_the_toggles_say(tmp_path: Path, spot: bool, futures: bool,
                                                expected: list[str]) -> None:
    async with running(make(tmp_path, spot_enabled=spot, futures_enabled=futures)) as orch:
        assert orch.supervisor is not None
        assert sorted(orch.supervisor.slots) == sorted(expected)
        tasks = {t.get_name() for t in asyncio.all_tasks()}
        for name in ("spot", "futures"):
            assert (f"engine:{name}" in tasks) == (name in expected)
        status = await orch.status()
        assert [e.name for e in status.engines] == expected


async def test_both_engines_trade_the_replay_and_futures_exits_are_reduce_only(tmp_path: Path) -> None:
    async with running(make(tmp_path, futures_enabled=True, global_max_daily_loss_pct=25)) as orch:
        ledger = orch.ledger
        assert ledger is not None

        async def futures_closed_a_trade() -> bool:
            return bool(await ledger.closed_trades("futures", limit=1))

        await until(futures_closed_a_trade, timeout=40)
        orders = {o.client_order_id: o for o in await ledger.recent_orders(10_000)}
        closed = await ledger.closed_trades("futures", limit=1000)
        assert closed
        for trade in closed:
            order = orders.get(trade.close_order_id)
            # every exit of the futures engine is reduce-only (so it passes a tripped breaker); a
            # liquidation would have no order row of ours
            assert order is None or order.reduce_only, order
        positions = await ledger.positions("futures")
        assert all(p.leverage >= 1 for p in positions)


async def test_a_failing_shutdown_step_still_closes_the_ledger(tmp_path: Path) -> None:
    """An exchange whose close raises must not keep the ledger from being closed (its queued writes
    committed, the WAL checkpointed) nor the DATA_DIR lock from being released."""
    orch = make(tmp_path)
    async with running(orch):
        for part in orch.parts.values():
            async def broken_close() -> None:
                raise RuntimeError("connector already gone (test)")

            part.exchange.close = broken_close  # type: ignore[method-assign]
        ledger = orch.ledger
        assert ledger is not None
    assert ledger.closed
    async with running(make(tmp_path)) as again:  # the lock was released: a new daemon starts
        assert again.ledger is not None
