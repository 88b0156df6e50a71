"""What the path from a price update to an order may and may not do: the spot engine reloads positions
that a fill changed behind its back while it is idle (not between the next update and its order), and
a take-profit asks the ledger only what it needs before selling, yet still settles a stop whose send
never got an answer and never sells coins a stop still holds."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from core.types import OrderState, OrderType
from tests.test_spot_protective_stop import SYMBOL, Rig, enter, rig

__all__ = ["rig"]  # the fixture, shared with the protective-stop tests


class BlockingFeed:
    """The rig's prices behind a wait that only a new version ends, as a live feed's does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.version = 0
        self._bumped = asyncio.Event()
        self.symbols = inner.symbols
        self.finished = False

    def ticker(self, symbol: str) -> Any:
        return self.inner.ticker(symbol)

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> Any:
        return self.inner.candles(symbol, timeframe, limit)

    def bump(self) -> None:
        self.version += 1
        self._bumped.set()
        self._bumped = asyncio.Event()

    async def wait_update(self, after: int, timeout: float) -> int:
        if self.version <= after:
            await self._bumped.wait()
        return self.version


async def turn_until(predicate: Any, what: str, turns: int = 5000) -> None:
    """Bounded wait for work that crosses the ledger thread: loop turns of up to 1 ms each (a loaded
    machine can take far more than a bare loop turn to answer), at most about 5 s."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"not within {turns} turns of 1 ms: {what}")


async def test_a_fill_while_idle_is_reloaded_before_the_next_price_update(rig: Rig) -> None:
    await enter(rig)
    feed = BlockingFeed(rig.feed)
    rig.ctx.feed = feed  # type: ignore[assignment]
    engine = rig.engine
    task = asyncio.ensure_future(engine.start())
    try:
        await turn_until(lambda: engine._idle, "the engine waiting for prices")
        steps = engine.counters.steps
        rig.feed.set_price("97")  # through the stop: the exchange's stop sells, the engine sees no update
        await rig.settle()
        await turn_until(lambda: engine._reload is None and SYMBOL not in engine.positions,
                         "the engine reloading its positions")
        assert engine.counters.steps == steps, "no step ran: the reload happened while idle"
        assert engine._seen_changes == rig.ctx.position_changes
        assert rig.sells == [OrderType.STOP_MARKET]
    finally:
        engine.stop()
        feed.bump()
        await asyncio.wait_for(task, 5)
    assert rig.ctx.on_position_change is None, "a stopped engine no longer listens"


async def test_a_fill_during_a_step_is_left_for_the_loop(rig: Rig) -> None:
    await enter(rig)
    engine = rig.engine
    assert not engine._idle
    rig.ctx.on_position_change = engine._position_changed
    rig.ctx.note_position_change(SYMBOL)
    assert engine._reload is None, "no reload runs beside a step"
    assert engine._seen_changes != rig.ctx.position_changes, "the loop reloads before the next step"


async def test_a_failed_idle_reload_leaves_the_reload_to_the_loop(rig: Rig) -> None:
    engine = rig.engine
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise OSError("disk gone")

    engine.refresh_positions = failing  # type: ignore[method-assign]
    engine._idle = True
    rig.ctx.on_position_change = engine._position_changed
    rig.ctx.note_position_change(SYMBOL)
    reload = engine._reload
    assert reload is not None
    await reload
    assert calls == 1 and engine._reload is None
    assert engine._seen_changes == -1, "start() reloads (and meets the error) before the next step"


async def test_a_take_profit_asks_the_ledger_only_what_it_needs(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    rig.engine._seen_changes = rig.ctx.position_changes  # as the running loop has it: nothing to reload
    calls: Counter[str] = Counter()
    for name in ("get_order", "orders_in_states", "positions", "position", "insert_order", "log_order", "update_order"):
        inner = getattr(rig.ledger, name)

        def counted(*args: Any, _inner: Any = inner, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _inner(*args, **kwargs)

        setattr(rig.ledger, name, counted)
    original = rig.exchange.create_order
    before_sell: Counter[str] = Counter()

    async def snapshot(request: Any) -> Any:
        if not before_sell:
            before_sell.update(calls)
        return await original(request)

    rig.exchange.create_order = snapshot  # type: ignore[method-assign]
    rig.feed.set_price("103")  # past the take-profit
    await rig.settle()
    await rig.step()
    await rig.settle()
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET]
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    # The resting stops (one read), the held amount under the trade lock, the order row (into the
    # intent log: the sell does not wait for its commit). The cancel's record is deferred (see
    # `BaseEngine.cancel_stop`), and the paper exchange answers inline, so the sell goes out before the
    # record's task has even run; the record is there afterwards (the CANCELED state above).
    assert before_sell == Counter(orders_in_states=1, position=1, log_order=1)
    assert calls["update_order"] >= 1


async def test_a_take_profit_settles_a_stop_left_unknown_then_cancels_it_and_sells_once(rig: Rig) -> None:
    await enter(rig)
    stop_id = rig.engine.positions[SYMBOL].meta["stop_order"]
    await rig.ledger.update_order(stop_id, state=OrderState.UNKNOWN)  # resting on the exchange, all the same
    rig.feed.set_price("103")
    await rig.settle()
    await rig.step()
    await rig.settle()
    assert (await rig.ledger.get_order(stop_id)).state is OrderState.CANCELED  # type: ignore[union-attr]
    assert rig.sells == [OrderType.STOP_MARKET, OrderType.MARKET], "one stop, one market sell"
    assert await rig.ledger.positions("spot") == []
    assert await rig.exchange.fetch_open_orders([SYMBOL]) == []
