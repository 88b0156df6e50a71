"""The Orchestrator when the exchange misbehaves under it: a kill still flattens (and goes on flattening
after a restart), a failed balance read neither stops the daemon nor silences systemd's watchdog, a
failed cancel at shutdown does not cost the final portfolio, and a stop during start-up is prompt.
In-process on the bundled replay, as tests/test_orchestrator_control.py; exchange faults are made by
replacing one method of the paper exchange."""

from __future__ import annotations

import asyncio
import itertools
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from core.errors import TemporaryError
from core.events import PortfolioReported
from core.types import MarketType, OrderIntent, OrderState, OrderType, Side, TradingState
from engines.orchestrator import FLATTEN_KEY, RISK_KEY, Orchestrator
from exchange.replay import ReplayFeed
from monitoring.systemd import SystemdNotifier
from storage.ledger import Ledger
from tests.test_orchestrator_control import first_spot_position, make, running, until

NO_ANSWER = "no answer within 10s"


class FirstCancelUnanswered:
    """Replaces the exchange's cancel_order: the first call gets no answer, the rest go through."""

    def __init__(self, exchange: Any) -> None:
        self.original = exchange.cancel_order
        self.calls = 0
        exchange.cancel_order = self

    async def __call__(self, symbol: str, cid: str) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise TemporaryError(f"cancel_order: {NO_ANSWER}")
        return await self.original(symbol, cid)


async def hold_with_stop(orch: Orchestrator) -> None:
    """Wait for a position with its protective stop resting, pause new entries, and stop the paper
    exchange from working its resting orders, so the fast replay cannot fill the stops (and close the
    positions) behind the test's back."""
    ledger = orch.ledger
    assert ledger is not None

    async def held() -> bool:
        stops = await ledger.orders_in_states([OrderState.OPEN], engine="spot")
        return bool(await ledger.positions("spot")) and any(o.reduce_only for o in stops)

    await until(held, timeout=30)
    await orch.pause("spot", by="test")
    orch.parts["spot"].exchange.process_prices = list  # type: ignore[method-assign]


async def test_a_kill_flattens_although_one_cancel_is_not_answered(tmp_path: Path) -> None:
    async with running(make(tmp_path)) as orch:
        await hold_with_stop(orch)
        cancels = FirstCancelUnanswered(orch.parts["spot"].exchange)
        result = await orch.kill(by="test")
        assert result.ok

        async def flat() -> bool:
            return await orch.ledger.positions() == []  # type: ignore[union-attr]

        await until(flat, timeout=10)
        assert cancels.calls >= 2  # the unanswered cancel was tried again
        assert not orch.crashed
        assert orch.trading_state is TradingState.HALTED


async def test_a_flattening_cut_short_by_a_stop_goes_on_after_the_restart(tmp_path: Path) -> None:
    async with running(make(tmp_path)) as orch:
        await hold_with_stop(orch)

        async def unanswered(symbol: str, cid: str) -> Any:
            raise TemporaryError(f"cancel_order: {NO_ANSWER}")

        orch.parts["spot"].exchange.cancel_order = unanswered  # type: ignore[method-assign]
        with pytest.raises(TimeoutError):  # (a caller that gives up waiting, as Telegram's timeout does)
            await asyncio.wait_for(orch.kill(by="test"), 0.5)
        await asyncio.sleep(0.3)  # more passes, none of which can cancel the stop
        assert await orch.ledger.positions(), "nothing could be flattened"  # type: ignore[union-attr]
        assert not orch.crashed  # the flattening kept trying; the daemon stayed up
    # Stopped (as systemd would on a deploy, or after a crash) with positions still open: the next start
    # is HALTED and finishes the job, the exchange answering again.
    async with running(make(tmp_path)) as again:
        assert again.trading_state is TradingState.HALTED

        async def flat() -> bool:
            return await again.ledger.positions() == []  # type: ignore[union-attr]

        await until(flat, timeout=10)
        assert again.trading_state is TradingState.HALTED
        assert await flattening_sales(again), "closed by the flattening, not by a stop on the exchange"


async def flattening_sales(orch: Orchestrator) -> list[str]:
    ledger = orch.ledger
    assert ledger is not None
    orders = await ledger.recent_orders(1000)
    return [o.client_order_id for o in orders
            if o.reason.startswith("flatten:") and o.state is OrderState.FILLED]


async def test_a_trip_that_flattens_goes_on_after_a_restart_too(tmp_path: Path) -> None:
    """A drawdown or daily-loss trip with global_flatten_on_trip: REDUCING, with the flattening asked
    for and not finished when the daemon stopped. (Set up in the ledger: the run before held positions.)"""
    async with running(make(tmp_path)) as orch:
        await hold_with_stop(orch)
        risk = orch._monitor().state
        path, clock = orch.settings.ledger_path, orch.clock
    # What the run that tripped left behind: its risk state, and the flattening it had not finished.
    risk.trading_state, risk.reason, risk.trip = TradingState.REDUCING, "drawdown 12% reached limit 10%", "drawdown"
    risk.until, risk.tripped_at = clock.now() + 3600, clock.now()
    async with await Ledger.open(path, clock) as ledger:
        assert await ledger.positions("spot")
        await ledger.set_state(RISK_KEY, risk.to_dict())
        await ledger.set_state(FLATTEN_KEY, {"pending": True, "system": False, "reason": risk.reason})
    async with running(make(tmp_path)) as again:
        assert again.trading_state is TradingState.REDUCING

        async def flat() -> bool:
            return await again.ledger.positions() == []  # type: ignore[union-attr]

        await until(flat, timeout=10)
        assert await flattening_sales(again)
        assert (await again.ledger.get_state(FLATTEN_KEY) or {}).get("pending") is False  # type: ignore[union-attr]


async def test_a_balance_read_that_fails_does_not_stop_the_daemon(tmp_path: Path) -> None:
    async with running(make(tmp_path, futures_enabled=True)) as orch:
        exchange: Any = orch.parts["futures"].exchange
        original = exchange.fetch_balance
        calls = 0

        async def fails_twice() -> Any:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise TemporaryError(f"fetch_balance: {NO_ANSWER}")
            return await original()

        exchange.fetch_balance = fails_twice
        with capture_logs() as logs:
            await asyncio.sleep(1.0)  # ~20 supervisor ticks
        assert calls > 3
        assert not orch.crashed and not orch._stop.is_set()
        assert orch._books_complete  # read again, and the breaker judges it again
        said = [entry["event"] for entry in logs]
        # Told once each, not on every tick of the spell.
        assert said.count("balance unavailable: the breaker waits for it") == 1
        assert said.count("balance available again") == 1
        assert [e for e in said if e.startswith("risk check")] == [
            "risk check waits: the books are incomplete (a held symbol without a price, or a balance the "
            "exchange did not give)",
            "risk check resumed: the books are complete again",
        ]


class PingRecorder(SystemdNotifier):
    def __init__(self) -> None:
        super().__init__(None, environ={})
        self.pings: list[float] = []

    def watchdog(self) -> bool:
        self.pings.append(time.monotonic())
        return True


async def test_a_slow_exchange_does_not_silence_the_watchdog(tmp_path: Path) -> None:
    """Live, one balance read can take tens of seconds of timeouts and retries; systemd kills a daemon
    whose pings stop for WatchdogSec. Scaled down: a 0.05 s tick against a 1.5 s read."""
    recorder = PingRecorder()
    orch = make(tmp_path)
    orch.ops.notifier = recorder
    async with running(orch):
        exchange: Any = orch.parts["spot"].exchange
        original = exchange.fetch_balance

        async def slow() -> Any:
            await asyncio.sleep(1.5)
            return await original()

        exchange.fetch_balance = slow
        await asyncio.sleep(0.3)
        start = time.monotonic()
        await asyncio.sleep(2.0)
        pings = [p for p in recorder.pings if p >= start]
        assert len(pings) >= 5
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.5, f"watchdog silent for {max(gaps):.2f}s with a 0.05 s tick"


async def test_a_cancel_that_fails_at_shutdown_does_not_cost_the_final_portfolio(tmp_path: Path) -> None:
    orch = make(tmp_path, spot_rsi_min=99.99, spot_rsi_max=100)  # (no entries of the engine's own)
    task = asyncio.ensure_future(orch.run())
    await asyncio.wait_for(orch.ready.wait(), 30)
    sub = orch.bus.subscribe("probe", maxsize=100_000)
    part = orch.parts["spot"]

    async def priced() -> bool:
        return orch.feeds["spot"].ticker("BTC/USDT") is not None

    await until(priced)
    ticker = orch.feeds["spot"].ticker("BTC/USDT")
    assert ticker is not None
    for _ in range(2):  # two limit entries resting far below the market
        intent = OrderIntent(engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.BUY,
                             amount=Decimal("0.001"), order_type=OrderType.LIMIT,
                             price=(ticker.bid / 2).quantize(Decimal("0.01")), notional=Decimal(20))
        assert (await part.orders.submit(intent)).order.state is OrderState.OPEN
    cancels = FirstCancelUnanswered(part.exchange)
    orch.request_stop("SIGTERM")
    await asyncio.wait_for(task, 30)
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait())
    assert [e for e in events if isinstance(e, PortfolioReported) and e.final], "no final portfolio"
    assert cancels.calls == 2  # the second entry was cancelled all the same


async def test_a_stop_while_start_up_waits_for_prices_is_prompt(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(make(tmp_path)) as orch:
        symbol = (await first_spot_position(orch)).symbol
    real = ReplayFeed.ticker
    monkeypatch.setattr(ReplayFeed, "ticker", lambda self, s: None if s == symbol else real(self, s))
    again = make(tmp_path, startup_stage_timeout_seconds=16)  # start-up waits up to 8 s for the price
    task = asyncio.ensure_future(again.run())
    for _ in range(500):  # until the 'risk state' stage is under way
        if again.monitor is not None:
            break
        await asyncio.sleep(0.01)
    assert again.monitor is not None
    asked = time.monotonic()
    again.request_stop("SIGTERM")
    with pytest.raises(Exception, match="stop requested"):
        await asyncio.wait_for(task, 30)
    assert time.monotonic() - asked < 3.0


async def test_a_stop_during_any_start_up_stage_is_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Live, a stage can take up to STARTUP_STAGE_TIMEOUT_SECONDS (reconciliation against a slow
    exchange); SIGTERM meanwhile must not wait for it."""
    entered = asyncio.Event()

    async def slow_reconciliation(self: Orchestrator) -> None:
        entered.set()
        await asyncio.sleep(60)

    monkeypatch.setattr(Orchestrator, "_reconcile", slow_reconciliation)
    orch = make(tmp_path, startup_stage_timeout_seconds=60)
    task = asyncio.ensure_future(orch.run())
    await asyncio.wait_for(entered.wait(), 30)
    asked = time.monotonic()
    orch.request_stop("SIGTERM")
    with pytest.raises(Exception, match="stop requested during start-up stage 'reconciliation'"):
        await asyncio.wait_for(task, 30)
    assert time.monotonic() - asked < 3.0
    assert not orch.crashed
