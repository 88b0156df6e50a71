"""SPOT_MAX_POSITIONS counts the entries in doubt: a buy the exchange accepted but has not filled (a market
order answered OPEN with nothing filled), or whose outcome is unknown after a timeout, may still fill and
become a position. Before, only filled positions counted: with a limit of 1 and the entry of BTC in
doubt, ETH entered too, and once BTC filled the engine held two positions (and twice the capital meant).

The rig is the denial tests' (a spot engine on a paper exchange with BTC/USDT and ETH/USDT and a real
ledger), with candles for the engine to read and the momentum rule always saying "enter"."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import pytest

from core.errors import TemporaryError
from core.types import CandleSeries, MarketType, OrderIntent, OrderState, OrderType, Side
from engines import spot as spot_module
from engines.momentum import MomentumParams, MomentumReading, NextBar
from engines.spot import SpotEngine
from exchange.base import OrderRequest, OrderUpdate
from risk.gate import EngineLimits, RiskGate
from tests.test_denial_runs import SYMBOLS, PriceFeed, Rig, buy, rig

__all__ = ["rig"]  # the denial tests' fixture

A, B = SYMBOLS  # BTC/USDT: the entry in doubt; ETH/USDT: the other symbol
RESTING = "accepted, not filled"  # the market buy rests on the exchange (sent there as a limit below the ask)
NEVER_PLACED = "timed out, never placed"  # no answer, and the exchange never got it
ANSWER_LOST = "timed out, filled"  # placed and filled at once, but the answer never arrived


class CandleFeed(PriceFeed):
    """The rig's fixed prices, with flat candles that are always fresh."""

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries:  # type: ignore[override]
        closes = np.full(60, 100.0)
        ts = np.arange(60, dtype=np.float64) * 300
        return CandleSeries(symbol, timeframe, ts, closes, closes, closes, closes, np.ones(60), self.clock.now())


@dataclass
class Book:
    rig: Rig
    engine: SpotEngine
    sent: list[OrderRequest]  # every order that reached the exchange (or was sent towards it)
    doubt: dict[str, str]  # symbol -> how its next entry is answered (RESTING, NEVER_PLACED, ANSWER_LOST)
    unreachable: bool = False  # the exchange answers no question about an order
    signals: set[str] = dataclasses.field(default_factory=lambda: set(SYMBOLS))  # the rule says "enter" here

    def limit(self, max_positions: int) -> None:
        """SPOT_MAX_POSITIONS and the gate's limit for the engine, as the Orchestrator sets both."""
        ctx = self.engine.ctx
        ctx.settings = ctx.settings.model_copy(update={"spot_max_positions": max_positions})
        ctx.gate = RiskGate(self.rig.monitor, ctx.allocator, {"spot": EngineLimits(max_positions=max_positions)})

    def buys(self, symbol: str) -> list[OrderRequest]:
        return [r for r in self.sent if r.symbol == symbol and r.side is Side.BUY]

    async def step(self) -> None:
        """One engine step, with a scan due for every symbol."""
        clock = self.rig.clock
        clock.set(clock.now() + self.engine.scan_interval)
        await self.engine.step()

    def entry_of(self, symbol: str) -> str:
        [request] = self.buys(symbol)
        return request.client_order_id

    async def state_of(self, client_order_id: str) -> OrderState:
        order = await self.engine.ctx.ledger.get_order(client_order_id)
        assert order is not None
        return order.state


@pytest.fixture
async def book(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Book]:
    engine = rig.engine
    ctx = engine.ctx
    ctx.feed = CandleFeed(rig.clock)

    def evaluate(candles: CandleSeries, p: MomentumParams, ahead: NextBar | None = None) -> MomentumReading:
        if candles.symbol in book.signals:
            return MomentumReading(True, "momentum (test signal)", 1.0, 60.0, float(candles.close[-1]))
        return MomentumReading(False, "no uptrend (test)", 0.0, 40.0, float(candles.close[-1]))

    ctx.orders.max_resolve_seconds = 0.0  # a send without an answer stays UNKNOWN at once
    exchange = ctx.exchange
    create, fetch = exchange.create_order, exchange.fetch_order
    book = Book(rig, engine, [], {})
    monkeypatch.setattr(spot_module, "evaluate", evaluate)

    async def create_order(request: OrderRequest) -> OrderUpdate:
        book.sent.append(request)
        how = book.doubt.pop(request.symbol, None) if request.side is Side.BUY else None
        if how == RESTING:
            return await create(dataclasses.replace(request, order_type=OrderType.LIMIT, price=Decimal(90)))
        if how == NEVER_PLACED:
            raise TimeoutError("no answer (test)")
        update = await create(request)
        if how == ANSWER_LOST:
            raise TimeoutError("answer lost (test)")
        return update

    async def fetch_order(symbol: str, client_order_id: str) -> OrderUpdate:
        if book.unreachable:
            raise TemporaryError("exchange unreachable (test)")
        return await fetch(symbol, client_order_id)

    monkeypatch.setattr(exchange, "create_order", create_order)
    monkeypatch.setattr(exchange, "fetch_order", fetch_order)
    await engine.load_state()
    yield book


async def enter_in_doubt(book: Book, how: str) -> str:
    """A's entry, answered `how`: it comes back unfilled and may still fill. Returns its client order id."""
    book.doubt[A] = how
    book.unreachable = how != RESTING
    await book.engine.consider_entry(A, book.engine.ctx.feed.ticker(A))
    cid = book.entry_of(A)
    expected = OrderState.OPEN if how == RESTING else OrderState.UNKNOWN
    assert await book.state_of(cid) is expected
    assert book.engine.positions == {}
    assert await book.engine.entry_in_doubt(A)
    book.unreachable = False
    return cid


@pytest.mark.parametrize("how", [RESTING, NEVER_PLACED])
async def test_an_entry_in_doubt_fills_the_only_slot_and_no_other_symbol_enters(book: Book, how: str) -> None:
    book.limit(1)
    await enter_in_doubt(book, how)
    for _ in range(3):
        await book.step()
    assert book.buys(B) == [], "the signal on ETH was sent although BTC's entry may still fill"
    assert len(book.buys(A)) == 1, "and BTC's entry was not sent twice"
    assert book.engine.positions == {}
    # The gate counts it too, for an entry that did not come through the engine's own check.
    assert await book.engine.trade(buy(B)) is None
    [denied] = book.rig.denied_events()
    assert denied.symbol == B and denied.reason == "max positions reached (1/1)"
    assert book.buys(B) == []


@pytest.mark.parametrize("how", [RESTING, NEVER_PLACED])
async def test_once_the_entry_in_doubt_settled_unfilled_another_symbol_enters(book: Book, how: str) -> None:
    book.limit(1)
    cid = await enter_in_doubt(book, how)
    await book.step()
    assert book.buys(B) == []
    ledger = book.engine.ctx.ledger
    if how == RESTING:  # the resting buy is cancelled
        order = await ledger.get_order(cid)
        assert order is not None
        await book.engine.ctx.orders.cancel(order)
        assert await book.state_of(cid) is OrderState.CANCELED
    else:  # the exchange never had it: settled as such once the grace period is over
        book.rig.clock.set(book.rig.clock.now() + book.engine.ctx.orders.unknown_grace_seconds + 1)
        assert await book.engine.ctx.orders.poll_open_orders() == 1
        assert await book.state_of(cid) is OrderState.REJECTED
    book.signals = {B}  # no new signal on BTC (which would enter it again, or ask about it and forget it)
    await book.step()
    assert len(book.buys(B)) == 1, "a settled entry still blocked the other symbol"
    assert set(book.engine.positions) == {B}
    assert book.engine.open_position_count() == 1
    assert A not in book.engine._entries_in_doubt, "forgotten once it mattered"


async def test_once_the_entry_in_doubt_filled_it_counts_once_as_a_position(book: Book) -> None:
    book.limit(1)
    await enter_in_doubt(book, ANSWER_LOST)
    await book.step()
    assert book.buys(B) == []
    assert await book.engine.ctx.orders.poll_open_orders() == 1  # settled: it had filled
    await book.engine.refresh_positions()
    assert set(book.engine.positions) == {A}
    assert book.engine.open_position_count() == 1  # a position now, not also an entry in doubt
    for _ in range(2):
        await book.step()
    assert book.buys(B) == [], "the filled entry is a position: the limit of 1 is reached"
    assert len(book.buys(A)) == 1
    # Counted once: with room for two, ETH enters beside it.
    book.limit(2)
    await book.step()
    assert len(book.buys(B)) == 1
    assert set(book.engine.positions) == {A, B}


async def test_a_filled_entry_whose_position_closed_does_not_block_later(book: Book) -> None:
    """The entry's symbol stays noted until something asks about it; after its position closed, the
    count must not take it for an entry in doubt again (it would block every other symbol for good)."""
    book.limit(1)
    await enter_in_doubt(book, ANSWER_LOST)
    assert await book.engine.ctx.orders.poll_open_orders() == 1
    await book.engine.refresh_positions()
    position = book.engine.positions[A]
    sell = OrderIntent(engine="spot", market=MarketType.SPOT, symbol=A, side=Side.SELL, amount=position.amount,
                       order_type=OrderType.MARKET, reduce_only=True, reason="closed by test")
    result = await book.engine.trade(sell)
    assert result is not None and result.filled == position.amount
    assert book.engine.positions == {}
    assert A in book.engine._entries_in_doubt  # noted still: nothing asked about it since
    book.signals = {B}  # no new signal on BTC (which would ask about it and forget it)
    await book.step()
    assert len(book.buys(B)) == 1
    assert set(book.engine.positions) == {B}


async def test_with_room_for_two_an_entry_in_doubt_leaves_room_for_one_more(book: Book) -> None:
    book.limit(2)
    await enter_in_doubt(book, RESTING)
    await book.step()
    assert len(book.buys(B)) == 1, "one other entry still fits"
    assert set(book.engine.positions) == {B}
    assert book.engine.open_position_count() == 2
    # The room is full now: a third symbol's entry is refused by the gate before reaching the exchange.
    assert await book.engine.trade(buy("SOL/USDT")) is None
    [denied] = book.rig.denied_events()
    assert denied.reason == "max positions reached (2/2)"
    assert book.buys("SOL/USDT") == []
