"""The paper exchange: exact fill arithmetic (fees, slippage, rounding), the rejections a live exchange
would give, resting orders worked by price, and the promise that matters after a crash: state rebuilt
from the ledger's fills is the state the live run had, to the last digit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.errors import DependencyError, InsufficientFunds, OperationalError, OrderNotFound, OrderRejected
from core.types import CandleSeries, MarketInfo, MarketType, OrderState, OrderType, Side, Ticker
from exchange.base import Exchange, OrderRequest, OrderUpdate
from exchange.feed_signal import UpdateSignal
from exchange.paper import PaperExchange

D = Decimal
TAKER = D("0.1")
MAKER = D("0.02")
SLIP_BPS = D("5")
SLIP = SLIP_BPS / 10_000

MARKETS = {
    "BTC/USDT": MarketInfo("BTC/USDT", "BTC", "USDT", MarketType.SPOT, amount_step=D("0.00001"),
                           price_step=D("0.01"), min_amount=D("0.0001"), min_notional=D("5")),
    "ETH/USDT": MarketInfo("ETH/USDT", "ETH", "USDT", MarketType.SPOT, amount_step=D("0.0001"),
                           price_step=D("0.01"), min_amount=D("0.0001"), min_notional=D("5")),
}


class FakeFeed:
    """Tickers set by the test; every change moves the version, as a real feed's would."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.signal = UpdateSignal(clock)
        self.tickers: dict[str, Ticker] = {}

    def set(self, symbol: str, bid: str, ask: str, last: str | None = None) -> None:
        b, a = D(bid), D(ask)
        self.tickers[symbol] = Ticker(symbol, b, a, D(last) if last is not None else (b + a) / 2,
                                      self.clock.now())
        self.signal.bump()

    @property
    def version(self) -> int:
        return self.signal.version

    @property
    def symbols(self) -> list[str]:
        return list(self.tickers)

    @property
    def finished(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def ticker(self, symbol: str) -> Ticker | None:
        return self.tickers.get(symbol)

    def candles(self, symbol: str, timeframe: str, limit: int = 500) -> CandleSeries | None:
        return None

    async def wait_update(self, after: int, timeout: float) -> int:
        return await self.signal.wait(after, timeout)

    def on_update(self, listener: Any) -> Any:
        return self.signal.add_listener(listener)


def make(clock: SimClock | None = None, feed: FakeFeed | None = None, usdt: str = "10000",
         **kw: Any) -> tuple[PaperExchange, FakeFeed, SimClock]:
    clock = clock or SimClock()
    feed = feed or FakeFeed(clock)
    ex = PaperExchange(MarketType.SPOT, feed, clock, MARKETS, {"USDT": D(usdt)},
                       taker_fee_pct=TAKER, maker_fee_pct=MAKER, slippage_bps=SLIP_BPS, **kw)
    return ex, feed, clock


def req(cid: str, side: Side, amount: str, *, symbol: str = "BTC/USDT", otype: OrderType = OrderType.MARKET,
        price: str | None = None, stop: str | None = None) -> OrderRequest:
    return OrderRequest(cid, symbol, side, otype, D(amount), D(price) if price else None,
                        D(stop) if stop else None)


async def balances(ex: PaperExchange) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    b = await ex.fetch_balance()
    return b.free, b.total


# --- market orders --------------------------------------------------------------------------------


async def test_market_buy_pays_ask_plus_slippage_rounded_and_taker_fee_in_quote() -> None:
    ex, feed, clock = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    up = await ex.create_order(req("b1", Side.BUY, "0.1"))
    # 30001 * 1.0005 = 30016.0005 -> 30016.00 at a 0.01 step
    assert up.state is OrderState.FILLED and up.filled == D("0.1") and up.avg_price == D("30016.00")
    (fill,) = up.fills
    assert fill.price == D("30016.00")
    assert fill.fee == D("3.0016") and fill.fee_asset == "USDT"  # 0.1 * 30016 * 0.1%
    assert fill.trade_id == "paper-b1-1" and fill.ts == clock.now()
    free, total = await balances(ex)
    assert total["USDT"] == D("10000") - D("3001.6") - D("3.0016") == D("6995.3984")
    assert total["BTC"] == D("0.1") and free == total


async def test_market_sell_gets_bid_minus_slippage() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("b1", Side.BUY, "0.1"))
    feed.set("BTC/USDT", "31000.00", "31001.00")
    up = await ex.create_order(req("s1", Side.SELL, "0.1"))
    # 31000 * 0.9995 = 30984.5
    assert up.fills[0].price == D("30984.50") and up.fills[0].fee == D("3.09845")
    _, total = await balances(ex)
    assert total["BTC"] == 0
    assert total["USDT"] == D("6995.3984") + D("3098.45") - D("3.09845")


async def test_amount_rounds_down_to_step_and_price_to_tick() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "100.00", "100.003")  # an ask off the tick
    up = await ex.create_order(req("b1", Side.BUY, "0.123456789"))
    assert up.amount == D("0.12345") and up.filled == D("0.12345")
    # 100.003 * 1.0005 = 100.0530015 -> 100.05
    assert up.avg_price == D("100.05")
    limit = await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="90.004"))
    assert limit.state is OrderState.OPEN
    (open_order,) = await ex.fetch_open_orders(["BTC/USDT"])
    assert open_order.amount == D("0.1")


async def test_below_min_notional_or_amount_is_rejected_with_the_reason() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    with pytest.raises(OrderRejected, match="notional"):
        await ex.create_order(req("small", Side.BUY, "0.00015"))  # ~4.50 USDT < 5
    with pytest.raises(OrderRejected, match=r"minimum 0\.0001"):
        await ex.create_order(req("tiny", Side.BUY, "0.000099"))  # rounds to 0.00009
    free, total = await balances(ex)
    assert total == {"USDT": D("10000")} and free == total
    # A rejected id was never placed: it can be used again.
    with pytest.raises(OrderNotFound):
        await ex.fetch_order("BTC/USDT", "small")


async def test_insufficient_funds_for_buy_and_sell() -> None:
    # 0.0333 BTC at 30016.00 plus 0.1% fee costs exactly 1000.5323328 USDT.
    short, feed, _ = make(usdt="1000.5323327")
    feed.set("BTC/USDT", "30000.00", "30001.00")
    with pytest.raises(InsufficientFunds, match=r"needs 1000\.5323328 USDT"):
        await short.create_order(req("b1", Side.BUY, "0.0333"))
    with pytest.raises(InsufficientFunds):
        await short.create_order(req("s1", Side.SELL, "0.001"))
    exact, _, _ = make(feed=feed, usdt="1000.5323328")
    ok = await exact.create_order(req("b1", Side.BUY, "0.0333"))
    assert ok.state is OrderState.FILLED
    free, total = await balances(exact)
    assert total == {"USDT": D(0), "BTC": D("0.0333")} and free == total


async def test_no_ticker_is_a_dependency_error_and_unknown_market_a_rejection() -> None:
    ex, _, _ = make()
    with pytest.raises(DependencyError, match="no price"):
        await ex.create_order(req("b1", Side.BUY, "0.1"))
    with pytest.raises(OrderRejected, match="unknown market"):
        await ex.create_order(req("b2", Side.BUY, "1", symbol="DOGE/USDT"))


async def test_duplicate_client_order_id_returns_the_existing_order_and_charges_once() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    first = await ex.create_order(req("dup", Side.BUY, "0.1"))
    feed.set("BTC/USDT", "35000.00", "35001.00")
    again = await ex.create_order(req("dup", Side.BUY, "0.1"))
    assert again == first
    _, total = await balances(ex)
    assert total["BTC"] == D("0.1")
    assert len(await ex.fetch_my_trades("BTC/USDT")) == 1


def test_futures_paper_is_refused_for_now() -> None:
    clock = SimClock()
    with pytest.raises(OperationalError, match="paper futures not available"):
        PaperExchange(MarketType.FUTURES, FakeFeed(clock), clock, MARKETS, {"USDT": D(1)},
                      taker_fee_pct=TAKER, maker_fee_pct=MAKER, slippage_bps=SLIP_BPS)


# --- resting orders -------------------------------------------------------------------------------


async def test_limit_buy_rests_locks_funds_and_fills_at_limit_with_maker_fee_when_crossed() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, clock = make(on_fill=seen.append)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    up = await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000"))
    assert up.state is OrderState.OPEN and up.fills == ()
    free, total = await balances(ex)
    locked = D("2900") + D("2900") * MAKER / 100
    assert total["USDT"] == D("10000") and free["USDT"] == D("10000") - locked
    feed.set("BTC/USDT", "29000.50", "29001.00")  # near, not crossed
    assert ex.process_prices() == [] and seen == []
    await clock.advance(60)
    feed.set("BTC/USDT", "28990.00", "28995.00")  # the ask fell through the limit
    (filled,) = ex.process_prices()
    assert filled.state is OrderState.FILLED and filled.avg_price == D("29000")
    assert filled.fills[0].fee == D("0.58") and filled.fills[0].ts == clock.now()
    assert seen == [filled]
    free, total = await balances(ex)
    assert total["USDT"] == D("10000") - D("2900") - D("0.58") and free == total
    assert ex.process_prices() == [] and len(seen) == 1
    assert await ex.fetch_open_orders([]) == []


async def test_limit_sell_fills_when_bid_reaches_it() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("b1", Side.BUY, "0.1"))
    await ex.create_order(req("l1", Side.SELL, "0.1", otype=OrderType.LIMIT, price="31000"))
    free, total = await balances(ex)
    assert free["BTC"] == 0 and total["BTC"] == D("0.1")
    with pytest.raises(InsufficientFunds):  # the base is locked by the resting sell
        await ex.create_order(req("s2", Side.SELL, "0.1"))
    feed.set("BTC/USDT", "31000.00", "31000.50")
    (up,) = ex.process_prices()
    assert up.fills[0].price == D("31000") and up.fills[0].fee == D("0.62")


async def test_marketable_limit_fills_at_once_as_taker_never_beyond_its_limit() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    up = await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="30005"))
    # ask*(1+slippage) = 30016.00 is past the limit: filled at the limit, taker fee.
    assert up.state is OrderState.FILLED and up.avg_price == D("30005")
    assert up.fills[0].fee == D("0.1") * D("30005") * TAKER / 100


async def test_stop_market_triggers_on_last_price_and_fills_as_market() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, _ = make(on_fill=seen.append)
    feed.set("BTC/USDT", "30000.00", "30001.00", last="30000.50")
    await ex.create_order(req("b1", Side.BUY, "0.2"))
    with pytest.raises(OrderRejected, match="trigger immediately"):
        await ex.create_order(req("bad", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="30100"))
    stop = await ex.create_order(req("sl", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29500"))
    assert stop.state is OrderState.OPEN
    feed.set("BTC/USDT", "29499.00", "29502.00", last="29500.01")
    assert ex.process_prices() == []
    feed.set("BTC/USDT", "29400.00", "29401.00", last="29400.50")
    (up,) = ex.process_prices()
    # bid 29400 * 0.9995 = 29385.30
    assert up.state is OrderState.FILLED and up.avg_price == D("29385.30")
    assert up.fills[0].fee == D("0.1") * D("29385.30") * TAKER / 100
    assert seen == [up]


async def test_cancel_releases_funds_and_a_filled_order_stays_filled() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000"))
    canceled = await ex.cancel_order("BTC/USDT", "l1")
    assert canceled.state is OrderState.CANCELED
    free, total = await balances(ex)
    assert free["USDT"] == total["USDT"] == D("10000")
    feed.set("BTC/USDT", "28000.00", "28001.00")
    assert ex.process_prices() == []
    m = await ex.create_order(req("m1", Side.BUY, "0.1"))
    assert (await ex.cancel_order("BTC/USDT", "m1")) == m
    with pytest.raises(OrderNotFound):
        await ex.cancel_order("BTC/USDT", "nope")
    with pytest.raises(OrderNotFound):
        await ex.fetch_order("ETH/USDT", "m1")  # wrong symbol
    assert (await ex.fetch_order("BTC/USDT", "m1")) == m


async def test_balance_equity_values_assets_at_last_price() -> None:
    ex, feed, _ = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    feed.set("ETH/USDT", "2000.00", "2000.20")
    await ex.create_order(req("b1", Side.BUY, "0.1"))
    await ex.create_order(req("e1", Side.BUY, "1", symbol="ETH/USDT"))
    feed.set("BTC/USDT", "32000.00", "32002.00", last="32001.00")
    feed.set("ETH/USDT", "2100.00", "2100.20", last="2100.10")
    b = await ex.fetch_balance()
    assert b.equity == b.total["USDT"] + D("0.1") * D("32001.00") + D("1") * D("2100.10")
    assert await ex.fetch_positions() == []


async def test_run_works_resting_orders_on_price_updates_until_closed() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, clock = make(on_fill=seen.append)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000"))
    task = asyncio.create_task(ex.run())
    await clock.advance(1)
    assert seen == []
    feed.set("BTC/USDT", "28900.00", "28950.00")
    await clock.advance(0)
    assert [u.client_order_id for u in seen] == ["l1"] and seen[0].state is OrderState.FILLED
    await ex.close()
    await clock.advance(10)
    assert task.done() and task.exception() is None


async def test_a_failing_callback_does_not_undo_the_fill() -> None:
    def boom(_: OrderUpdate) -> None:
        raise RuntimeError("ledger down")

    ex, feed, _ = make(on_fill=boom)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000"))
    feed.set("BTC/USDT", "28900.00", "28950.00")
    (up,) = ex.process_prices()
    assert (await ex.fetch_order("BTC/USDT", "l1")) == up


def test_paper_exchange_satisfies_the_exchange_protocol() -> None:
    ex, _, _ = make()
    as_protocol: Exchange = ex
    assert as_protocol.market("BTC/USDT") is MARKETS["BTC/USDT"]
    with pytest.raises(DependencyError):
        ex.market("XRP/USDT")


# --- determinism and restore --------------------------------------------------------------------

Op = tuple[Any, ...]

SYMBOLS = st.sampled_from(sorted(MARKETS))
SIDES = st.sampled_from(list(Side))
NOTIONAL = st.decimals(D("3"), D("1500"), places=2)  # in USDT; a few fall below the 5 USDT minimum
PRICE_MOVE = st.tuples(st.just("price"), SYMBOLS, st.integers(-400, 400))  # bps from the base price

ops_strategy = st.lists(
    st.one_of(
        PRICE_MOVE,
        PRICE_MOVE,
        st.tuples(st.just("market"), SYMBOLS, SIDES, NOTIONAL),
        st.tuples(st.just("limit"), SYMBOLS, SIDES, NOTIONAL, st.integers(-300, 300)),
        st.tuples(st.just("stop"), SYMBOLS, SIDES, NOTIONAL, st.integers(1, 300)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    max_size=40,
)

BASE_PRICE = {"BTC/USDT": D("30000"), "ETH/USDT": D("2000")}


@dataclass
class Played:
    exchange: PaperExchange
    feed: FakeFeed
    answers: list[Any]
    requests: dict[str, OrderRequest]  # as sent, before the exchange rounded them (what a ledger keeps)


async def play(ops: list[Op]) -> Played:
    """Apply a script of orders and price moves; return the exchange and everything it answered."""
    ex, feed, clock = make(usdt="5000")
    requests: dict[str, OrderRequest] = {}

    async def send(r: OrderRequest) -> OrderUpdate:
        requests[r.client_order_id] = r
        return await ex.create_order(r)

    for symbol, base in BASE_PRICE.items():
        feed.set(symbol, str(base), str(base + 1))
    # Some base assets to sell from the start, bought through the exchange like any other fill.
    await ex.create_order(req("seed-btc", Side.BUY, "0.05"))
    await ex.create_order(req("seed-eth", Side.BUY, "0.5", symbol="ETH/USDT"))
    answers: list[Any] = []
    placed: list[tuple[str, str]] = []
    for i, op in enumerate(ops):
        await clock.advance(1)
        kind = op[0]
        cid = f"c{i}"
        amount = str(op[3] / BASE_PRICE[op[1]]) if kind in ("market", "limit", "stop") else ""
        try:
            if kind == "price":
                symbol = op[1]
                mid = BASE_PRICE[symbol] * (1 + D(op[2]) / 10_000)
                feed.set(symbol, str(mid - 1), str(mid + 1), last=str(mid))
                answers.append(ex.process_prices())
            elif kind == "market":
                answers.append(await send(req(cid, op[2], amount, symbol=op[1])))
            elif kind == "limit":
                price = BASE_PRICE[op[1]] * (1 + D(op[4]) / 10_000)
                answers.append(await send(
                    req(cid, op[2], amount, symbol=op[1], otype=OrderType.LIMIT, price=str(price))))
            elif kind == "stop":
                last = feed.tickers[op[1]].last
                offset = D(op[4]) / 10_000
                stop = last * (1 + offset) if op[2] is Side.BUY else last * (1 - offset)
                answers.append(await send(
                    req(cid, op[2], amount, symbol=op[1], otype=OrderType.STOP_MARKET, stop=str(stop))))
            elif placed:
                target, symbol = placed[op[1] % len(placed)]
                answers.append(await ex.cancel_order(symbol, target))
            if kind in ("market", "limit", "stop"):
                placed.append((cid, op[1]))
        except (OrderRejected, DependencyError) as exc:
            answers.append(type(exc).__name__)
    return Played(ex, feed, answers, requests)


async def snapshot(ex: PaperExchange) -> tuple[Any, ...]:
    b = await ex.fetch_balance()
    opens = sorted((await ex.fetch_open_orders([])), key=lambda u: u.client_order_id)
    return b.free, b.total, b.equity, [(u.client_order_id, u.amount, u.state) for u in opens]


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy)
def test_restore_from_fills_reproduces_live_balances_exactly(ops: list[Op]) -> None:
    async def scenario() -> None:
        played = await play(ops)
        live = played.exchange
        fills = [f for symbol in MARKETS for f in await live.fetch_my_trades(symbol)]
        resting = [played.requests[u.client_order_id] for u in await live.fetch_open_orders([])]
        rebuilt, feed, _ = make(usdt="5000")
        feed.tickers = dict(played.feed.tickers)
        rebuilt.restore(reversed(fills), resting)  # the order fills arrive in must not matter
        assert await snapshot(rebuilt) == await snapshot(live)
        # The rebuilt exchange knows every order the live one filled: no id can be placed twice.
        for f in fills:
            again = await rebuilt.create_order(OrderRequest(f.client_order_id, f.symbol, f.side,
                                                            OrderType.MARKET, f.amount))
            assert again.filled == sum((x.amount for x in fills if x.client_order_id == f.client_order_id),
                                       D(0))
        assert await snapshot(rebuilt) == await snapshot(live)

    asyncio.run(scenario())


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy)
def test_same_inputs_give_the_same_outputs(ops: list[Op]) -> None:
    async def twice() -> None:
        a, b = await play(ops), await play(ops)
        assert a.answers == b.answers
        assert await snapshot(a.exchange) == await snapshot(b.exchange)

    asyncio.run(twice())


async def test_restore_reopens_resting_orders_which_then_fill_as_before() -> None:
    live, feed, clock = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await live.create_order(req("b1", Side.BUY, "0.1"))
    await live.create_order(req("l1", Side.SELL, "0.05", otype=OrderType.LIMIT, price="31000"))
    await live.create_order(req("l2", Side.BUY, "0.02", otype=OrderType.LIMIT, price="29000.004"))
    fills = await live.fetch_my_trades("BTC/USDT")
    # The ledger keeps the intent's amounts and prices, before rounding: restore rounds them the same way.
    resting = [req("l1", Side.SELL, "0.05", otype=OrderType.LIMIT, price="31000"),
               req("l2", Side.BUY, "0.02", otype=OrderType.LIMIT, price="29000.004")]
    rebuilt, _, _ = make(clock=clock, feed=feed)
    rebuilt.restore(fills, resting)
    assert await snapshot(rebuilt) == await snapshot(live)
    assert (await rebuilt.fetch_order("BTC/USDT", "b1")).state is OrderState.FILLED
    feed.set("BTC/USDT", "31000.00", "31001.00")
    assert [u.fills for u in rebuilt.process_prices()] == [u.fills for u in live.process_prices()]
    assert await snapshot(rebuilt) == await snapshot(live)


async def test_restore_counts_fills_against_an_order_the_ledger_still_shows_open() -> None:
    # A crash between recording the fill and updating the order's row leaves the order "open" in the
    # ledger with its fill already there: restore must not execute it a second time.
    live, feed, clock = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await live.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000"))
    feed.set("BTC/USDT", "28990.00", "28995.00")
    (filled,) = live.process_prices()
    rebuilt, _, _ = make(clock=clock, feed=feed)
    rebuilt.restore(filled.fills, [req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000")])
    assert await rebuilt.fetch_open_orders([]) == []
    assert (await rebuilt.fetch_order("BTC/USDT", "l1")).state is OrderState.FILLED
    assert rebuilt.process_prices() == []
    assert await snapshot(rebuilt) == await snapshot(live)


# --- logging ----------------------------------------------------------------------------------------


async def test_order_debug_line_follows_the_paper_loggers_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-order debug line is skipped cheaply when debug is off, and still written when it is on."""
    import logging

    import exchange.paper as paper

    lines: list[str] = []

    class Recorder:
        def debug(self, event: str, **kw: Any) -> None:
            lines.append(event)

    monkeypatch.setattr(paper, "log", Recorder())
    std = logging.getLogger("paper")
    old_level = std.level
    ex, feed, _ = make()
    feed.set("BTC/USDT", "100", "100.1")
    try:
        std.setLevel(logging.INFO)
        await ex.create_order(req("info-1", Side.BUY, "0.1"))
        assert lines == []
        std.setLevel(logging.DEBUG)
        await ex.create_order(req("debug-1", Side.BUY, "0.1"))
        assert lines == ["paper order"]
    finally:
        std.setLevel(old_level)


async def test_a_stop_fills_inside_the_price_update_before_an_engine_wakes() -> None:
    """run() works resting orders within the feed's update: a consumer woken by the update already
    finds the stop filled (as on a real venue), and after close() prices no longer reach the book."""
    seen: list[OrderUpdate] = []
    ex, feed, clock = make(on_fill=seen.append)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("b1", Side.BUY, "0.1"))
    await ex.create_order(req("s1", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29000"))
    task = asyncio.create_task(ex.run())
    await clock.advance(0)
    found_by_consumer: list[list[str]] = []

    async def consumer() -> None:
        await feed.wait_update(feed.version, 10)
        found_by_consumer.append([u.client_order_id for u in seen])

    waiting = asyncio.create_task(consumer())
    await clock.advance(0)
    feed.set("BTC/USDT", "28900.00", "28950.00", last="28920.00")
    assert [u.client_order_id for u in seen] == ["s1"]  # before anything else ran
    await clock.advance(0)
    assert waiting.done() and found_by_consumer == [["s1"]]

    await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="28000"))
    await ex.close()
    await clock.advance(1)
    assert task.done() and task.exception() is None
    feed.set("BTC/USDT", "27900.00", "27950.00")
    assert [u.client_order_id for u in seen] == ["s1"]  # the book no longer listens


async def test_a_matching_error_ends_run_with_it_and_never_reaches_the_feed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As when the matching ran in its own task: the error ends run() (the Orchestrator's crash path,
    the restart rebuilds the book), the feed's update goes through, and nothing more is matched."""
    ex, feed, clock = make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    task = asyncio.create_task(ex.run())
    await clock.advance(0)
    calls: list[int] = []

    def broken() -> list[OrderUpdate]:
        calls.append(feed.version)
        raise ValueError("matching bug")

    monkeypatch.setattr(ex, "process_prices", broken)
    feed.set("BTC/USDT", "29000.00", "29001.00")  # does not raise here
    feed.set("BTC/USDT", "28000.00", "28001.00")
    await clock.advance(0)
    assert task.done() and isinstance(task.exception(), ValueError)
    assert len(calls) == 1  # the half-worked book is left alone until the restart
    assert feed.signal._listeners == []


async def test_cancelling_run_removes_its_listener_and_close_stops_matching_at_once() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, clock = make(on_fill=seen.append)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000"))
    task = asyncio.create_task(ex.run())
    await clock.advance(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert feed.signal._listeners == []

    second = asyncio.create_task(ex.run())
    await clock.advance(0)
    await ex.close()
    feed.set("BTC/USDT", "28900.00", "28950.00")  # before run() has even seen the close
    assert seen == []
    await clock.advance(0)
    assert second.done() and second.exception() is None
