"""Safety rails around the daemon: one process per DATA_DIR, a dying service task exits 1 (so systemd
restarts us), an order send survives its caller being cancelled, and a reduce-only exit never sells
more than the ledger holds."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from config import load_settings
from core.clock import LiveClock
from core.errors import ConfigError, OperationalError
from core.types import MarketType, OrderIntent, OrderState, OrderType, Side
from engines.orchestrator import Orchestrator, StartupError, lock_data_dir
from storage.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent


def make(tmp_path: Path, **overrides: object) -> Orchestrator:
    settings = load_settings(env_file=None, data_dir=tmp_path, health_check_interval_seconds=0.05,
                             looplag_enabled=False, **overrides)
    return Orchestrator(settings, LiveClock(), replay_path=ROOT / "data", speed=20_000)


def test_data_dir_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first = lock_data_dir(tmp_path)
    with pytest.raises(OperationalError, match="already running"):
        lock_data_dir(tmp_path)
    first.close()
    lock_data_dir(tmp_path).close()


async def test_second_daemon_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    one = make(tmp_path)
    task = asyncio.ensure_future(one.run())
    try:
        await asyncio.wait_for(one.ready.wait(), 30)
        two = make(tmp_path)
        with pytest.raises(StartupError, match="already running"):
            await asyncio.wait_for(two.run(), 30)
    finally:
        one.request_stop("test over")
        await asyncio.wait_for(task, 30)


async def test_a_dying_service_task_stops_the_daemon_as_a_crash(tmp_path: Path) -> None:
    orch = make(tmp_path)
    task = asyncio.ensure_future(orch.run())
    await asyncio.wait_for(orch.ready.wait(), 30)

    async def broken() -> None:
        raise RuntimeError("invariant broken")

    orch._own(broken(), "test-service")
    await asyncio.wait_for(task, 30)
    assert orch.crashed, "main turns this into exit code 1"


async def test_a_dead_market_feed_stops_the_daemon_as_a_crash(tmp_path: Path) -> None:
    """The replay's stepping task is the feed's own: if it dies, no price comes again, and engines alone
    would only warn of stale data. The supervisor sees it and stops as a crash."""
    orch = make(tmp_path)
    task = asyncio.ensure_future(orch.run())
    await asyncio.wait_for(orch.ready.wait(), 30)
    feed = orch.feeds["spot"]
    assert feed.failure() is None

    def broken() -> bool:
        raise RuntimeError("replay data corrupt")

    feed.step = broken  # type: ignore[attr-defined]
    await asyncio.wait_for(task, 30)
    assert orch.crashed, "main turns this into exit code 1"
    assert orch._stop_reason == "market feed died"


async def test_a_sent_order_whose_row_the_database_refuses_stops_the_daemon_and_is_recovered(
        tmp_path: Path) -> None:
    """The order went out on its intent-log row; then the commit failed (disk full). The daemon must
    not trade on with an order the database does not know: it stops as a crash, and the next start
    finds the order, pending, for reconciliation to look up by client order id."""
    orch = make(tmp_path, spot_rsi_min=99.99, spot_rsi_max=100)  # the strategy itself never enters
    task = asyncio.ensure_future(orch.run())
    try:
        await asyncio.wait_for(orch.ready.wait(), 30)
        await orch.pause("spot", by="test")
        part, ledger = orch.parts["spot"], orch.ledger
        assert ledger is not None
        for _ in range(200):  # the replay feed prices BTC within a few steps
            if orch.feeds["spot"].ticker("BTC/USDT") is not None:
                break
            await asyncio.sleep(0.02)
        buy = OrderIntent(engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.BUY,
                          amount=Decimal("0.01"), order_type=OrderType.MARKET, notional=Decimal(300))
        write = ledger._write_order_row

        def disk_full(row, written, slot):  # type: ignore[no-untyped-def]
            if slot is not None:
                raise sqlite3.OperationalError("database or disk is full")
            return write(row, written, slot)

        ledger._write_order_row = disk_full  # type: ignore[method-assign]
        sent: list[str] = []
        original = part.exchange.create_order

        async def counting(request):  # type: ignore[no-untyped-def]
            sent.append(request.client_order_id)
            return await original(request)

        part.exchange.create_order = counting  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            await part.orders.submit(buy)
        assert len(sent) == 1
        await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
    assert orch.crashed, "main turns this into exit code 1"
    assert orch._stop_reason == "ledger refused a sent order's row"
    async with await Ledger.open(tmp_path / "ledger.sqlite3", LiveClock()) as again:
        recovered = await again.get_order(sent[0])
        assert recovered is not None and recovered.state is OrderState.PENDING


async def test_a_row_refused_while_stopping_still_makes_the_exit_a_crash(tmp_path: Path) -> None:
    """A graceful stop (SIGTERM) during which a sent order's row was refused must not exit 0: systemd
    restarts only a failed exit, and only the next open commits the row from the intent log."""
    orch = make(tmp_path)
    task = asyncio.ensure_future(orch.run())
    await asyncio.wait_for(orch.ready.wait(), 30)
    assert orch.ledger is not None
    orch.request_stop("signal SIGTERM")
    orch.ledger._order_failure = sqlite3.OperationalError("database or disk is full")
    await asyncio.wait_for(task, 30)
    assert orch.crashed and orch._stop_reason == "signal SIGTERM"


async def test_order_send_outlives_a_cancelled_caller_and_reduce_only_is_clamped(tmp_path: Path) -> None:
    orch = make(tmp_path, spot_rsi_min=99.99, spot_rsi_max=100)  # the strategy itself never enters
    task = asyncio.ensure_future(orch.run())
    try:
        await asyncio.wait_for(orch.ready.wait(), 30)
        await orch.pause("spot", by="test")  # keep the engine out of the way
        part = orch.parts["spot"]
        ledger = orch.ledger
        assert ledger is not None
        for _ in range(200):  # the replay feed prices BTC within a few steps
            if orch.feeds["spot"].ticker("BTC/USDT") is not None:
                break
            await asyncio.sleep(0.02)
        original = part.exchange.create_order

        async def slow_create(request):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.3)
            return await original(request)

        part.exchange.create_order = slow_create  # type: ignore[method-assign]
        buy = OrderIntent(engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.BUY,
                          amount=Decimal("0.01"), order_type=OrderType.MARKET, notional=Decimal(300))
        caller = asyncio.ensure_future(part.orders.submit(buy))
        await asyncio.sleep(0.1)
        caller.cancel()  # e.g. the engine restarted by the supervisor mid-send
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await part.orders.drain(5)
        part.exchange.create_order = original  # type: ignore[method-assign]
        orders = await ledger.recent_orders(5)
        assert orders[0].state is OrderState.FILLED, "the fill reached the ledger although the caller was gone"
        held = [p for p in await ledger.positions("spot") if p.symbol == "BTC/USDT"]
        assert held and held[0].amount == Decimal("0.01")

        engine = orch.supervisor.slots["spot"].engine  # type: ignore[union-attr]
        assert engine is not None
        sell_too_much = OrderIntent(engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.SELL,
                                    amount=Decimal("0.05"), order_type=OrderType.MARKET, reduce_only=True)
        result = await engine.trade(sell_too_much)
        assert result is not None and result.order.amount == Decimal("0.01")
        assert [p for p in await ledger.positions("spot") if p.symbol == "BTC/USDT"] == []
        assert await engine.trade(sell_too_much) is None, "nothing left to reduce: nothing is sent"
    finally:
        orch.request_stop("test over")
        await asyncio.wait_for(task, 30)


def test_a_data_dir_that_cannot_be_used_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "var"
    not_a_dir.write_text("a file where DATA_DIR should be")
    with pytest.raises(OperationalError, match=r"DATA_DIR=.*cannot be used"):
        lock_data_dir(not_a_dir)


@pytest.mark.parametrize("mode", ["testnet", "live"])
def test_a_replay_never_runs_against_a_real_exchange(tmp_path: Path, mode: str) -> None:
    """Recorded prices and real orders: the Orchestrator refuses the pair whoever builds it."""
    with pytest.raises(ConfigError, match=r"TRADING_MODE=.*paper"):
        make(tmp_path, trading_mode=mode, binance_api_key="k" * 16, binance_api_secret="s" * 16)
