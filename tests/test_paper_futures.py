"""The paper futures exchange: exact margin and P&L arithmetic for longs and shorts, the rejections a
live exchange would give, protective stops, liquidation at exactly the documented price, funding on
the UTC schedule and only once, and a ledger restart that rebuilds the account to the last digit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.errors import DependencyError, InsufficientFunds, OrderNotFound, OrderRejected
from core.types import CandleSeries, MarketInfo, MarketType, OrderState, OrderType, PositionSide, Side, Ticker
from exchange.base import Exchange, ExchangePosition, OrderRequest, OrderUpdate
from exchange.feed_signal import UpdateSignal
from exchange.paper_futures import FundingPayment, PaperFuturesExchange

D = Decimal
BTC = "BTC/USDT:USDT"
ETH = "ETH/USDT:USDT"
TAKER = D("0.05") / 100
MAKER = D("0.02") / 100
MMR = D("0.5") / 100

MARKETS = {
    BTC: MarketInfo(BTC, "BTC", "USDT", MarketType.FUTURES, amount_step=D("0.001"), price_step=D("0.1"),
                    min_amount=D("0.001"), min_notional=D("100"), max_leverage=125),
    ETH: MarketInfo(ETH, "ETH", "USDT", MarketType.FUTURES, amount_step=D("0.001"), price_step=D("0.01"),
                    min_amount=D("0.001"), min_notional=D("20"), max_leverage=100),
}

H = 3600.0
T0 = 1_704_088_800.0  # 2024-01-01 06:00:00 UTC
T_0800 = 1_704_096_000.0  # 2024-01-01 08:00:00 UTC


class FakeFeed:
    """Tickers set by the test; every change moves the version, as a real feed's would."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.signal = UpdateSignal(clock)
        self.tickers: dict[str, Ticker] = {}

    def set(self, symbol: str, bid: str | Decimal, ask: str | Decimal, last: str | Decimal | None = None) -> None:
        b, a = D(bid), D(ask)
        self.tickers[symbol] = Ticker(symbol, b, a, D(last) if last is not None else (b + a) / 2, self.clock.now())
        self.signal.bump()

    def at(self, symbol: str, price: str | Decimal) -> None:
        """A book with no spread: bid = ask = last."""
        self.set(symbol, price, price, price)

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


def make(usdt: str = "10000", clock: SimClock | None = None, feed: FakeFeed | None = None,
         **kw: Any) -> tuple[PaperFuturesExchange, FakeFeed, SimClock]:
    clock = clock or SimClock(T0)
    feed = feed or FakeFeed(clock)
    return PaperFuturesExchange(feed, clock, MARKETS, D(usdt), **kw), feed, clock


def req(cid: str, side: Side, amount: str, *, symbol: str = BTC, otype: OrderType = OrderType.MARKET,
        price: str | None = None, stop: str | None = None, reduce_only: bool = False,
        leverage: int | None = None) -> OrderRequest:
    return OrderRequest(cid, symbol, side, otype, D(amount), D(price) if price else None,
                        D(stop) if stop else None, reduce_only, leverage)


async def account(ex: PaperFuturesExchange) -> tuple[Decimal, Decimal, Decimal]:
    """(wallet, available, equity)"""
    b = await ex.fetch_balance()
    return b.total["USDT"], b.free["USDT"], b.equity


async def position(ex: PaperFuturesExchange, symbol: str = BTC) -> ExchangePosition | None:
    return next((p for p in await ex.fetch_positions() if p.symbol == symbol), None)


# --- long and short P&L -----------------------------------------------------------------------------


async def test_long_open_add_reduce_close_moves_wallet_by_exact_pnl_and_fees() -> None:
    ex, feed, _ = make()
    feed.set(BTC, "29999.0", "30000.0", last="30000.0")
    up = await ex.create_order(req("o1", Side.BUY, "0.1", leverage=10))
    # ask 30000 * 1.0005 = 30015.0; taker fee 0.05 % of 3001.5; margin 3001.5 / 10
    assert up.state is OrderState.FILLED and up.avg_price == D("30015.0")
    assert up.fills[0].fee == D("1.50075") and up.fills[0].fee_asset == "USDT"
    wallet, available, equity = await account(ex)
    assert wallet == D("10000") - D("1.50075") == D("9998.49925")
    assert available == wallet - D("300.15")
    pos = await position(ex)
    assert pos is not None and (pos.side, pos.amount, pos.entry_price, pos.leverage, pos.margin) == (
        PositionSide.LONG, D("0.1"), D("30015.0"), 10, D("300.15"))
    assert pos.unrealized_pnl == D("0.1") * (D("30000.0") - D("30015.0")) and equity == wallet + pos.unrealized_pnl

    feed.set(BTC, "30999.0", "31000.0", last="31000.0")
    await ex.create_order(req("o2", Side.BUY, "0.1"))  # 31000 * 1.0005 = 31015.5
    pos = await position(ex)
    assert pos is not None and pos.amount == D("0.2")
    assert pos.entry_price == (D("3001.5") + D("3101.55")) / D("0.2") == D("30515.25")
    assert pos.margin == D("300.15") + D("310.155")

    feed.set(BTC, "32000.0", "32001.0", last="32000.0")
    up = await ex.create_order(req("o3", Side.SELL, "0.1"))  # bid 32000 * 0.9995 = 31984.0
    assert up.avg_price == D("31984.0")
    pos = await position(ex)
    assert pos is not None and pos.amount == D("0.1") and pos.entry_price == D("30515.25")
    assert pos.margin == D("305.1525")  # half the margin released with half the position
    realized_1 = D("0.1") * (D("31984.0") - D("30515.25"))
    assert realized_1 == D("146.875")

    feed.set(BTC, "29000.0", "29001.0", last="29000.0")
    await ex.create_order(req("o4", Side.SELL, "0.1"))  # 29000 * 0.9995 = 28985.5
    realized_2 = D("0.1") * (D("28985.5") - D("30515.25"))
    fees = (D("3001.5") + D("3101.55") + D("3198.4") + D("2898.55")) * TAKER
    wallet, available, equity = await account(ex)
    assert fees == D("6.1") and wallet == D("10000") + realized_1 + realized_2 - fees == D("9987.8")
    assert available == wallet == equity
    assert await ex.fetch_positions() == []


async def test_short_open_add_close_profits_when_price_falls() -> None:
    ex, feed, _ = make()
    feed.set(ETH, "2000.00", "2000.50")
    await ex.set_leverage(ETH, 5)
    await ex.create_order(req("s1", Side.SELL, "0.2", symbol=ETH))  # 2000 * 0.9995 = 1999.00
    feed.set(ETH, "2100.00", "2100.50")
    await ex.create_order(req("s2", Side.SELL, "0.2", symbol=ETH))  # 2100 * 0.9995 = 2098.95
    pos = await position(ex, ETH)
    assert pos is not None and pos.side is PositionSide.SHORT and pos.amount == D("0.4")
    assert pos.entry_price == (D("399.8") + D("419.79")) / D("0.4") == D("2048.975")
    assert pos.margin == (D("399.8") + D("419.79")) / 5 == D("163.918")
    feed.set(ETH, "1899.50", "1900.00", last="1900.00")
    assert pos.unrealized_pnl == D("819.59") - D("0.4") * D("2100.25")  # at the last price (mid here)
    pos = await position(ex, ETH)
    assert pos is not None and pos.unrealized_pnl == D("819.59") - D("0.4") * D("1900.00") == D("59.59")
    await ex.create_order(req("c1", Side.BUY, "0.4", symbol=ETH))  # 1900 * 1.0005 = 1900.95
    realized = D("819.59") - D("0.4") * D("1900.95")
    fees = (D("399.8") + D("419.79") + D("760.38")) * TAKER
    wallet, available, _ = await account(ex)
    assert realized == D("59.21") and wallet == D("10000") + realized - fees == available


async def test_one_way_mode_an_opposite_order_larger_than_the_position_flips_it() -> None:
    ex, feed, _ = make()
    feed.at(BTC, "30000.0")
    await ex.create_order(req("l", Side.BUY, "0.1", leverage=2))
    feed.at(BTC, "31000.0")
    await ex.create_order(req("f", Side.SELL, "0.3"))  # closes 0.1, opens a 0.2 short at 31000*0.9995
    pos = await position(ex)
    assert pos is not None and pos.side is PositionSide.SHORT and pos.amount == D("0.2")
    assert pos.entry_price == D("30984.5") and pos.margin == D("0.2") * D("30984.5") / 2
    wallet, _, _ = await account(ex)
    assert wallet == (D("10000") + D("0.1") * (D("30984.5") - D("30015.0"))
                      - (D("3001.5") + D("9295.35")) * TAKER)


# --- leverage and margin ----------------------------------------------------------------------------


async def test_leverage_is_validated_per_symbol_and_fixed_while_a_position_is_open() -> None:
    ex, feed, _ = make()
    feed.at(BTC, "30000.0")
    assert ex.leverage(BTC) == 1
    for bad in (0, 126):
        with pytest.raises(OrderRejected, match=r"outside 1\.\.125"):
            await ex.set_leverage(BTC, bad)
        with pytest.raises(OrderRejected, match="outside"):
            await ex.create_order(req(f"bad{bad}", Side.BUY, "0.01", leverage=bad))
    with pytest.raises(OrderRejected, match="unknown market"):
        await ex.set_leverage("DOGE/USDT:USDT", 2)
    await ex.create_order(req("o1", Side.BUY, "0.01", leverage=7))
    assert ex.leverage(BTC) == 7 and ex.leverage(ETH) == 1
    pos = await position(ex)
    # 0.01 * 30015.0 / 7 = 42.87857142857142857..., rounded up to 1e-12
    assert pos is not None and pos.leverage == 7 and pos.margin == D("42.878571428572")
    with pytest.raises(OrderRejected, match="while a position is open"):
        await ex.set_leverage(BTC, 20)
    with pytest.raises(OrderRejected, match="while a position is open"):
        await ex.create_order(req("o2", Side.BUY, "0.01", leverage=20))
    # The same leverage, or any on a reduce-only order, is no change.
    await ex.create_order(req("o3", Side.BUY, "0.01", leverage=7))
    await ex.create_order(req("r1", Side.SELL, "0.02", reduce_only=True, leverage=50))
    assert await ex.fetch_positions() == [] and ex.leverage(BTC) == 7
    await ex.set_leverage(BTC, 20)  # flat again: allowed
    assert ex.leverage(BTC) == 20
    with pytest.raises(OrderRejected, match="isolated"):
        await ex.ensure_symbol_setup(BTC, 3, "cross")


async def test_insufficient_margin_is_refused_without_changing_anything() -> None:
    # 0.1 BTC at 30015.0 and 10x: margin 300.15 + taker fee 1.50075 = 301.65075 USDT.
    ex, feed, _ = make(usdt="301.65074")
    feed.set(BTC, "29999.0", "30000.0")
    with pytest.raises(InsufficientFunds, match=r"needs 301\.65075 USDT"):
        await ex.create_order(req("o1", Side.BUY, "0.1", leverage=10))
    assert await account(ex) == (D("301.65074"),) * 3
    assert await ex.fetch_positions() == [] and ex.leverage(BTC) == 1  # the rejected leverage not kept
    with pytest.raises(OrderNotFound):
        await ex.fetch_order(BTC, "o1")
    exact, _, _ = make(usdt="301.65075", feed=feed)
    await exact.create_order(req("o1", Side.BUY, "0.1", leverage=10))
    wallet, available, _ = await account(exact)
    assert wallet == D("300.15") and available == 0


async def test_resting_limit_locks_margin_and_fills_at_limit_with_maker_fee() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, clock = make(on_fill=seen.append)
    feed.set(BTC, "30000.0", "30000.5")
    await ex.set_leverage(BTC, 4)
    up = await ex.create_order(req("l1", Side.BUY, "0.2", otype=OrderType.LIMIT, price="29000"))
    assert up.state is OrderState.OPEN
    lock = D("5800") / 4 + D("5800") * MAKER  # 1450 + 1.16
    _, available, _ = await account(ex)
    assert available == D("10000") - lock
    with pytest.raises(OrderRejected, match="orders that could open a position"):
        await ex.set_leverage(BTC, 2)  # the resting order would open at 4x
    feed.set(BTC, "29000.5", "29001.0")
    assert ex.process_prices() == []
    await clock.advance(60)
    feed.set(BTC, "28990.0", "28995.0")
    (filled,) = ex.process_prices()
    assert filled.state is OrderState.FILLED and filled.avg_price == D("29000") and seen == [filled]
    assert filled.fills[0].fee == D("1.16") and filled.fills[0].ts == clock.now()
    wallet, available, _ = await account(ex)
    assert wallet == D("10000") - D("1.16") and available == wallet - D("1450")
    canceled_lock = await ex.create_order(req("l2", Side.SELL, "0.2", otype=OrderType.LIMIT, price="31000"))
    assert canceled_lock.state is OrderState.OPEN
    assert (await ex.cancel_order(BTC, "l2")).state is OrderState.CANCELED
    assert (await account(ex))[1] == available


async def test_marketable_limit_fills_as_taker_never_beyond_its_limit() -> None:
    ex, feed, _ = make()
    feed.set(BTC, "30000.0", "30001.0")
    up = await ex.create_order(req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="30005"))
    assert up.avg_price == D("30005") and up.fills[0].fee == D("3000.5") * TAKER


async def test_rounding_minimums_unknown_market_and_missing_price() -> None:
    ex, feed, _ = make()
    with pytest.raises(DependencyError, match="no price"):
        await ex.create_order(req("p", Side.BUY, "0.1"))
    feed.set(BTC, "30000.0", "30001.0")
    up = await ex.create_order(req("a", Side.BUY, "0.0049999"))  # rounds down to 0.004: 120 USDT
    assert up.amount == up.filled == D("0.004")
    with pytest.raises(OrderRejected, match="notional"):
        await ex.create_order(req("n", Side.BUY, "0.003"))  # 90 USDT < 100
    with pytest.raises(OrderRejected, match=r"minimum 0\.001"):
        await ex.create_order(req("m", Side.BUY, "0.0009"))
    with pytest.raises(OrderRejected, match="unknown market"):
        await ex.create_order(req("u", Side.BUY, "1", symbol="DOGE/USDT:USDT"))
    with pytest.raises(ValueError, match="USDT-margined futures"):
        spot = MarketInfo("BTC/USDT", "BTC", "USDT", MarketType.SPOT, D("0.001"), D("0.1"), D("0.001"), D("5"))
        PaperFuturesExchange(feed, feed.clock, {"BTC/USDT": spot}, D(1))


async def test_duplicate_client_order_id_returns_the_existing_order_and_trades_once() -> None:
    ex, feed, _ = make()
    feed.set(BTC, "30000.0", "30001.0")
    first = await ex.create_order(req("dup", Side.BUY, "0.01"))
    feed.set(BTC, "35000.0", "35001.0")
    assert await ex.create_order(req("dup", Side.BUY, "0.01")) == first
    assert len(await ex.fetch_my_trades(BTC)) == 1
    pos = await position(ex)
    assert pos is not None and pos.amount == D("0.01")


# --- reduce-only ------------------------------------------------------------------------------------


async def test_reduce_only_never_opens_or_grows_and_is_cut_to_the_position() -> None:
    ex, feed, _ = make()
    feed.at(BTC, "30000.0")
    with pytest.raises(OrderRejected, match="reduce-only order would open a position"):
        await ex.create_order(req("r0", Side.SELL, "0.1", reduce_only=True))
    with pytest.raises(OrderRejected, match="reduce-only order would open a position"):
        await ex.create_order(req("r0s", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29000",
                                  reduce_only=True))
    await ex.create_order(req("o1", Side.BUY, "0.1"))
    with pytest.raises(OrderRejected, match="increase"):
        await ex.create_order(req("r1", Side.BUY, "0.1", reduce_only=True))
    up = await ex.create_order(req("r2", Side.SELL, "0.5", reduce_only=True))
    assert up.state is OrderState.FILLED and up.amount == up.filled == D("0.1") and up.reduce_only
    assert up.fills[0].reduce_only
    assert await ex.fetch_positions() == []


async def test_reduce_only_is_exempt_from_min_notional_unlike_an_opening_order() -> None:
    ex, feed, _ = make()
    feed.at(BTC, "30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.004"))  # 120 USDT
    with pytest.raises(OrderRejected, match="notional"):
        await ex.create_order(req("s1", Side.SELL, "0.001"))  # 30 USDT, not reduce-only
    up = await ex.create_order(req("s2", Side.SELL, "0.001", reduce_only=True))
    assert up.filled == D("0.001")
    pos = await position(ex)
    assert pos is not None and pos.amount == D("0.003")


# --- stops ------------------------------------------------------------------------------------------


async def test_protective_stop_triggers_on_last_price_and_closes_as_market() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, _ = make(on_fill=seen.append)
    feed.set(BTC, "30000.0", "30000.0", last="30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.1", leverage=5))
    _, available, _ = await account(ex)
    with pytest.raises(OrderRejected, match="trigger immediately"):
        await ex.create_order(req("bad", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="30100",
                                  reduce_only=True))
    stop = await ex.create_order(req("sl", Side.SELL, "0.2", otype=OrderType.STOP_MARKET, stop="29000",
                                     reduce_only=True))
    assert stop.state is OrderState.OPEN and (await account(ex))[1] == available  # a reduce-only locks nothing
    feed.set(BTC, "28999.0", "29002.0", last="29000.1")
    assert ex.process_prices() == []
    feed.set(BTC, "28900.0", "28901.0", last="28900.5")
    (up,) = ex.process_prices()
    # bid 28900 * 0.9995 = 28885.55 -> 28885.6 at a 0.1 step; cut to the 0.1 held
    assert up.state is OrderState.FILLED and up.avg_price == D("28885.6") and up.amount == up.filled == D("0.1")
    assert seen == [up] and await ex.fetch_positions() == []
    wallet, available, _ = await account(ex)
    assert wallet == D("10000") + D("0.1") * (D("28885.6") - D("30015.0")) - (D("3001.5") + D("2888.56")) * TAKER
    assert available == wallet


async def test_a_reduce_only_stop_left_without_a_position_is_canceled_when_it_triggers() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, _ = make(on_fill=seen.append)
    feed.at(BTC, "30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.1"))
    await ex.create_order(req("sl", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29000", reduce_only=True))
    await ex.create_order(req("tp", Side.SELL, "0.1", reduce_only=True))
    feed.at(BTC, "28000.0")
    (up,) = ex.process_prices()
    assert up.client_order_id == "sl" and up.state is OrderState.CANCELED and up.filled == 0
    assert await ex.fetch_positions() == [] and await ex.fetch_open_orders([]) == []


async def test_opening_stop_locks_margin_and_is_rejected_at_trigger_if_funds_are_gone() -> None:
    ex, feed, _ = make(usdt="1000")
    feed.at(BTC, "30000.0")
    await ex.create_order(req("entry", Side.BUY, "0.03", otype=OrderType.STOP_MARKET, stop="31000"))
    stop_price = D("31000") * (1 + D(5) / 10_000)
    lock = D("0.03") * stop_price + D("0.03") * stop_price * TAKER
    assert (await account(ex))[1] == D("1000") - lock
    feed.set(BTC, "40000.0", "40000.0")  # gapped far past: needs more than the lock and the account
    (up,) = ex.process_prices()
    assert up.state is OrderState.REJECTED and up.filled == 0
    assert await account(ex) == (D("1000"),) * 3


# --- liquidation ------------------------------------------------------------------------------------


async def test_long_is_liquidated_at_its_liquidation_price_losing_exactly_its_margin() -> None:
    seen: list[OrderUpdate] = []
    ex, feed, _ = make(on_fill=seen.append)
    feed.set(BTC, "29999.0", "30000.0", last="30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.1", leverage=10))
    pos = await position(ex)
    # 30015.0 * (1 - 1/10 + 0.005) = 27163.575, rounded up to the 0.1 step
    assert pos is not None and pos.liquidation_price == D("27163.6")
    wallet_before, _, _ = await account(ex)
    feed.set(BTC, "27163.6", "27163.8", last="27163.7")
    assert ex.process_prices() == [] and await position(ex) is not None
    feed.set(BTC, "27163.5", "27163.7", last="27163.6")
    (liq,) = ex.process_prices()
    assert seen == [liq]
    assert liq.client_order_id == f"liq-{BTC}-1" and liq.reduce_only and liq.side is Side.SELL
    assert liq.state is OrderState.FILLED and liq.filled == D("0.1") and liq.avg_price == D("27163.6")
    (fill,) = liq.fills
    assert fill.reduce_only and fill.fee == D("300.15") - (D("3001.5") - D("2716.36")) == D("15.01")
    wallet, available, equity = await account(ex)
    assert wallet == wallet_before - D("300.15") == available == equity
    assert await ex.fetch_positions() == []
    assert await ex.fetch_order(BTC, f"liq-{BTC}-1") == liq
    # A second liquidation of the symbol gets the next number.
    feed.at(BTC, "30000.0")
    await ex.create_order(req("o2", Side.BUY, "0.1"))
    feed.at(BTC, "1")
    (again,) = ex.process_prices()
    assert again.client_order_id == f"liq-{BTC}-2"


async def test_short_gapping_past_liquidation_closes_at_the_liquidation_price() -> None:
    ex, feed, _ = make()
    feed.set(ETH, "2000.00", "2000.50")
    await ex.create_order(req("s1", Side.SELL, "1", symbol=ETH, leverage=20))  # at 1999.00
    pos = await position(ex, ETH)
    # 1999.00 * (1 + 1/20 - 0.005) = 2088.955, rounded down to the 0.01 step
    assert pos is not None and pos.liquidation_price == D("2088.95") and pos.margin == D("99.95")
    feed.at(ETH, "2088.94")
    assert ex.process_prices() == []
    feed.at(ETH, "2500.00")
    (liq,) = ex.process_prices()
    assert liq.side is Side.BUY and liq.avg_price == D("2088.95")
    wallet, _, _ = await account(ex)
    assert wallet == D("10000") - D("1999.00") * TAKER - D("99.95")


async def test_a_stop_above_the_liquidation_price_closes_first_on_the_same_tick() -> None:
    ex, feed, _ = make()
    feed.at(BTC, "30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.1", leverage=10))
    await ex.create_order(req("sl", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29000", reduce_only=True))
    feed.at(BTC, "20000.0")
    (up,) = ex.process_prices()
    assert up.client_order_id == "sl" and up.avg_price == D("19990.0")


@settings(max_examples=150, deadline=None)
@given(side=st.sampled_from(list(Side)), leverage=st.integers(1, 20), entry_ticks=st.integers(1_000, 1_000_000),
       path=st.lists(st.integers(1, 400), max_size=8), gap=st.integers(0, 300))
def test_never_liquidated_before_the_liquidation_price_and_always_at_it(
    side: Side, leverage: int, entry_ticks: int, path: list[int], gap: int
) -> None:
    async def scenario() -> None:
        step = MARKETS[BTC].price_step
        entry = entry_ticks * step  # 100.0 .. 100 000.0
        amount = D("5")
        ex, feed, _ = make(usdt="100000000", slippage_bps=D(0))
        feed.at(BTC, entry)
        await ex.create_order(req("open", side, str(amount), leverage=leverage))
        margin = (amount * entry / leverage).quantize(D("1e-12"), rounding=ROUND_CEILING)
        long = side is Side.BUY
        raw = entry * (1 - D(1) / leverage + MMR) if long else entry * (1 + D(1) / leverage - MMR)
        expected = (raw / step).to_integral_value(rounding=ROUND_CEILING if long else ROUND_FLOOR) * step
        pos = await position(ex)
        assert pos is not None and pos.liquidation_price == expected
        wallet_open, _, _ = await account(ex)
        # Wander on the safe side of the liquidation price, closer and closer: never liquidated.
        for ticks in sorted(path, reverse=True):
            feed.at(BTC, expected + ticks * step if long else expected - ticks * step)
            assert ex.process_prices() == []
            assert await position(ex) is not None
        # At the price or past it (by `gap` steps): liquidated, at the liquidation price.
        crossed = expected - gap * step if long else expected + gap * step
        feed.at(BTC, max(crossed, step))
        (liq,) = ex.process_prices()
        assert liq.avg_price == expected and liq.filled == amount
        assert await ex.fetch_positions() == []
        wallet, _, _ = await account(ex)
        assert wallet == wallet_open - margin

    asyncio.run(scenario())


# --- funding ----------------------------------------------------------------------------------------


async def test_funding_at_0800_utc_long_pays_short_receives_once() -> None:
    payments: list[FundingPayment] = []
    clock = SimClock(T_0800 - 90)
    ex, feed, _ = make(clock=clock, on_funding=payments.append)
    feed.at(BTC, "30000.0")
    feed.at(ETH, "2000.00")
    await ex.create_order(req("l", Side.BUY, "0.1", leverage=5))
    await ex.create_order(req("s", Side.SELL, "1", symbol=ETH, leverage=5))
    wallet_before, _, _ = await account(ex)
    task = asyncio.create_task(ex.run())
    await clock.advance(60)  # 07:59:30
    feed.at(BTC, "30100.0")
    await clock.advance(20)  # 07:59:50
    assert payments == []
    await clock.advance(20)  # 08:00:10: the run loop woke at 08:00 without a price change
    rate = D("0.01") / 100
    assert payments == [
        FundingPayment(BTC, -(D("0.1") * D("30100.0") * rate), rate, T_0800),
        FundingPayment(ETH, D("1") * D("2000.00") * rate, rate, T_0800),
    ]
    assert payments[0].amount == D("-0.30100") and payments[1].amount == D("0.2")
    feed.at(BTC, "30200.0")
    await clock.advance(3 * H)  # more prices and wake-ups before 16:00: nothing more
    ex.process_prices()
    assert len(payments) == 2 and ex.funding_history() == payments
    wallet, _, _ = await account(ex)
    assert wallet == wallet_before - D("0.301") + D("0.2")
    await clock.advance(5 * H)  # 16:00:10
    assert [p.ts for p in payments] == [T_0800, T_0800, T_0800 + 8 * H, T_0800 + 8 * H]
    await ex.close()
    await clock.advance(10)
    assert task.done() and task.exception() is None


async def test_negative_rate_pays_longs_and_flat_accounts_pay_nothing() -> None:
    payments: list[FundingPayment] = []
    clock = SimClock(T_0800 - 10)
    ex, feed, _ = make(clock=clock, on_funding=payments.append, funding_rate_pct=D("-0.02"),
                       funding_interval_hours=4)
    feed.at(BTC, "30000.0")
    await ex.create_order(req("l", Side.BUY, "0.1"))
    await clock.advance(20)
    ex.process_prices()
    assert payments == [FundingPayment(BTC, D("0.1") * D("30000.0") * D("0.0002"), D("-0.0002"), T_0800)]
    await ex.create_order(req("c", Side.SELL, "0.1"))
    await clock.advance(4 * H)  # 12:00 passes flat
    ex.process_prices()
    assert len(payments) == 1
    with pytest.raises(ValueError, match="divide 24"):
        make(funding_interval_hours=5)


async def test_funding_due_is_charged_before_an_order_changes_the_position() -> None:
    payments: list[FundingPayment] = []
    clock = SimClock(T_0800 - 10)
    ex, feed, _ = make(clock=clock, on_funding=payments.append)
    feed.at(BTC, "30000.0")
    await ex.create_order(req("l", Side.BUY, "0.1"))
    await clock.advance(20)  # 08:00 passes with no price update and nobody running the loop
    await ex.create_order(req("add", Side.BUY, "0.2"))
    assert [p.amount for p in payments] == [-(D("0.1") * D("30000.0") * D("0.0001"))]


# --- restore and determinism ------------------------------------------------------------------------


async def snapshot(ex: PaperFuturesExchange) -> tuple[Any, ...]:
    b = await ex.fetch_balance()
    opens = sorted(await ex.fetch_open_orders([]), key=lambda u: u.client_order_id)
    return (b.free, b.total, b.equity, await ex.fetch_positions(),
            [(u.client_order_id, u.amount, u.filled, u.state) for u in opens],
            ex.funding_history(), {s: ex.leverage(s) for s in MARKETS})


async def rebuilt_from(live: PaperFuturesExchange, requests: dict[str, OrderRequest], feed: FakeFeed,
                       clock: SimClock, usdt: str) -> PaperFuturesExchange:
    """What a restart does: a fresh exchange restored from what the ledger has."""
    fills = [f for s in MARKETS for f in await live.fetch_my_trades(s)]
    resting = [requests[u.client_order_id] for u in await live.fetch_open_orders([])]
    fresh, _, _ = make(usdt, clock=clock, feed=feed)
    fresh.restore(reversed(fills), resting, reversed(live.funding_history()),
                  {s: live.leverage(s) for s in MARKETS})
    return fresh


async def test_restore_reproduces_positions_margins_and_open_orders_and_funding_is_not_repeated() -> None:
    payments: list[FundingPayment] = []
    clock = SimClock(T_0800 - 60)
    live, feed, _ = make(clock=clock, on_funding=payments.append)
    feed.at(BTC, "30000.0")
    feed.at(ETH, "2000.00")
    requests = {r.client_order_id: r for r in (
        req("l1", Side.BUY, "0.3", leverage=3),
        req("s1", Side.SELL, "2", symbol=ETH, leverage=7),
        req("sl", Side.SELL, "0.3", otype=OrderType.STOP_MARKET, stop="28000.04", reduce_only=True),
        req("lim", Side.BUY, "1", symbol=ETH, otype=OrderType.LIMIT, price="1900.004"),
    )}
    for r in requests.values():
        await live.create_order(r)
    await clock.advance(120)
    live.process_prices()
    await live.create_order(req("r1", Side.SELL, "0.1"))
    assert len(payments) == 2
    rebuilt = await rebuilt_from(live, requests, feed, clock, "10000")
    assert await snapshot(rebuilt) == await snapshot(live)
    assert (await rebuilt.fetch_order(BTC, "l1")).state is OrderState.FILLED
    assert (await rebuilt.create_order(requests["l1"])).filled == D("0.3")  # a re-sent id is not traded again
    await clock.advance(30)
    rebuilt.process_prices()
    assert rebuilt.funding_history() == payments  # 08:00 was charged before the restart: not again
    feed.at(BTC, "27000.0")
    feed.at(ETH, "1890.00")
    assert [u.fills for u in rebuilt.process_prices()] == [u.fills for u in live.process_prices()]
    assert await snapshot(rebuilt) == await snapshot(live)


async def test_restore_replays_fills_of_the_same_instant_in_the_order_they_happened() -> None:
    live, feed, clock = make()
    feed.at(BTC, "30000.0")
    await live.create_order(req("a", Side.BUY, "0.1", leverage=3))
    feed.at(BTC, "31000.0")
    await live.create_order(req("b", Side.SELL, "0.1"))
    feed.at(BTC, "29000.0")
    await live.create_order(req("c", Side.SELL, "0.05"))  # all at one timestamp: long, flat, short
    fills = await live.fetch_my_trades(BTC)
    assert len({f.ts for f in fills}) == 1
    fresh, _, _ = make(clock=clock, feed=feed)
    fresh.restore(reversed(fills), [], [], {BTC: 3})
    assert await snapshot(fresh) == await snapshot(live)
    pos = await position(fresh)
    assert pos is not None and pos.side is PositionSide.SHORT and pos.amount == D("0.05")


async def test_a_funding_time_missed_while_down_is_charged_once_after_restore() -> None:
    clock = SimClock(T_0800 - 60)
    live, feed, _ = make(clock=clock)
    feed.at(BTC, "30000.0")
    await live.create_order(req("l1", Side.BUY, "0.1"))
    await clock.advance(H)  # "down" over 08:00: the live loop never ran
    paid: list[FundingPayment] = []
    rebuilt = await rebuilt_from(live, {}, feed, clock, "10000")
    rebuilt.on_funding = paid.append
    rebuilt.process_prices()
    rebuilt.process_prices()
    assert paid == [FundingPayment(BTC, D("-0.3"), D("0.0001"), T_0800)]


async def test_restore_counts_fills_against_an_order_the_ledger_still_shows_open() -> None:
    live, feed, clock = make()
    feed.set(BTC, "30000.0", "30000.5")
    limit = req("l1", Side.BUY, "0.1", otype=OrderType.LIMIT, price="29000")
    await live.create_order(limit)
    feed.set(BTC, "28990.0", "28995.0")
    live.process_prices()
    rebuilt = await rebuilt_from(live, {}, feed, clock, "10000")
    rebuilt.restore(await live.fetch_my_trades(BTC), [limit], [], {})
    assert await rebuilt.fetch_open_orders([]) == [] and rebuilt.process_prices() == []
    assert await snapshot(rebuilt) == await snapshot(live)


Op = tuple[Any, ...]
SYMBOLS = st.sampled_from(sorted(MARKETS))
SIDES = st.sampled_from(list(Side))
NOTIONAL = st.decimals(D("50"), D("3000"), places=2)  # some below the 100 USDT BTC minimum
BASE = {BTC: D("30000"), ETH: D("2000")}

REDUCE_ONLY = st.sampled_from([False, False, True])
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("price"), SYMBOLS, st.integers(-1500, 1500)),  # bps from the base price
        st.tuples(st.just("price"), SYMBOLS, st.integers(-300, 300)),
        st.tuples(st.just("time"), st.integers(60, 6 * 3600)),
        st.tuples(st.just("market"), SYMBOLS, SIDES, NOTIONAL, REDUCE_ONLY),
        st.tuples(st.just("limit"), SYMBOLS, SIDES, NOTIONAL, st.integers(-300, 300), REDUCE_ONLY),
        st.tuples(st.just("stop"), SYMBOLS, SIDES, NOTIONAL, st.integers(1, 300), REDUCE_ONLY),
        st.tuples(st.just("leverage"), SYMBOLS, st.integers(1, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    max_size=40,
)


@dataclass
class Played:
    exchange: PaperFuturesExchange
    feed: FakeFeed
    clock: SimClock
    answers: list[Any]
    requests: dict[str, OrderRequest]  # as sent, before rounding (what the ledger keeps)


async def play(ops: list[Op]) -> Played:
    ex, feed, clock = make("3000", clock=SimClock(T0))
    answers: list[Any] = []
    requests: dict[str, OrderRequest] = {}
    placed: list[tuple[str, str]] = []
    for symbol, base in BASE.items():
        feed.set(symbol, base, base + 1, base)
    # Positions from the start, leveraged enough for the price moves to liquidate them.
    await ex.create_order(req("seed-btc", Side.BUY, "0.02", leverage=10))
    await ex.create_order(req("seed-eth", Side.SELL, "0.5", symbol=ETH, leverage=20))
    for i, op in enumerate(ops):
        await clock.advance(1)
        kind, cid = op[0], f"c{i}"
        try:
            if kind == "price":
                mid = BASE[op[1]] * (1 + D(op[2]) / 10_000)
                feed.set(op[1], mid - 1, mid + 1, mid)
                answers.append(ex.process_prices())
            elif kind == "time":
                await clock.advance(op[1])
                answers.append(ex.process_prices())
            elif kind == "leverage":
                await ex.set_leverage(op[1], op[2])
                answers.append(ex.leverage(op[1]))
            elif kind == "cancel":
                if placed:
                    target, symbol = placed[op[1] % len(placed)]
                    answers.append(await ex.cancel_order(symbol, target))
            else:
                symbol, side, notional, reduce_only = op[1], op[2], op[3], op[-1]
                last = feed.tickers[symbol].last
                amount = str(notional / last)
                if kind == "market":
                    r = req(cid, side, amount, symbol=symbol, reduce_only=reduce_only)
                elif kind == "limit":
                    r = req(cid, side, amount, symbol=symbol, otype=OrderType.LIMIT, reduce_only=reduce_only,
                            price=str(last * (1 + D(op[4]) / 10_000)))
                else:
                    offset = D(op[4]) / 10_000
                    stop = last * (1 + offset) if side is Side.BUY else last * (1 - offset)
                    r = req(cid, side, amount, symbol=symbol, otype=OrderType.STOP_MARKET, stop=str(stop),
                            reduce_only=reduce_only)
                requests[cid] = r
                answers.append(await ex.create_order(r))
                placed.append((cid, symbol))
        except (OrderRejected, DependencyError) as exc:
            answers.append(type(exc).__name__)
    return Played(ex, feed, clock, answers, requests)


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy)
def test_restore_from_the_ledger_reproduces_the_account_exactly(ops: list[Op]) -> None:
    async def scenario() -> None:
        played = await play(ops)
        live = played.exchange
        rebuilt = await rebuilt_from(live, played.requests, played.feed, played.clock, "3000")
        assert await snapshot(rebuilt) == await snapshot(live)
        # The same market afterwards does the same to both: margins, locks and stops came back whole.
        for symbol in MARKETS:
            played.feed.at(symbol, BASE[symbol] * D("0.93"))
        await played.clock.advance(8 * H)
        assert [u.fills for u in rebuilt.process_prices()] == [u.fills for u in live.process_prices()]
        assert await snapshot(rebuilt) == await snapshot(live)

    asyncio.run(scenario())


@settings(max_examples=50, deadline=None)
@given(ops=ops_strategy)
def test_same_inputs_give_the_same_outputs(ops: list[Op]) -> None:
    async def twice() -> None:
        a, b = await play(ops), await play(ops)
        assert a.answers == b.answers
        assert await snapshot(a.exchange) == await snapshot(b.exchange)

    asyncio.run(twice())


# --- plumbing ---------------------------------------------------------------------------------------


async def test_a_failing_callback_does_not_undo_a_fill_or_a_liquidation() -> None:
    def boom(_: object) -> None:
        raise RuntimeError("ledger down")

    clock = SimClock(T_0800 - 10)
    ex, feed, _ = make(clock=clock, on_fill=boom, on_funding=boom)
    feed.at(BTC, "30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.1", leverage=50))
    await clock.advance(20)
    feed.at(BTC, "20000.0")
    (liq,) = ex.process_prices()
    assert await ex.fetch_order(BTC, liq.client_order_id) == liq
    assert len(ex.funding_history()) == 1 and await ex.fetch_positions() == []


def test_satisfies_the_exchange_protocol() -> None:
    ex, _, _ = make()
    as_protocol: Exchange = ex
    assert as_protocol.market_type is MarketType.FUTURES
    assert as_protocol.market(BTC) is MARKETS[BTC]
    with pytest.raises(DependencyError):
        ex.market("XRP/USDT:USDT")


# --- matching inside the feed's update ---------------------------------------------------------------


async def test_a_stop_fills_inside_the_price_update_and_errors_end_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() works orders within the feed's update (a consumer woken by it finds the stop filled); a
    matching error ends run() with it instead of reaching the feed; cancelling removes the listener."""
    seen: list[OrderUpdate] = []
    ex, feed, clock = make(on_fill=seen.append)
    feed.at(BTC, "30000.0")
    await ex.create_order(req("o1", Side.BUY, "0.1", leverage=5))
    await ex.create_order(req("s1", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29000",
                              reduce_only=True))
    task = asyncio.create_task(ex.run())
    await clock.advance(0)
    found: list[list[str]] = []

    async def consumer() -> None:
        await feed.wait_update(feed.version, 10)
        found.append([u.client_order_id for u in seen])

    waiting = asyncio.create_task(consumer())
    await clock.advance(0)
    feed.at(BTC, "28900.0")
    assert [u.client_order_id for u in seen] == ["s1"]
    await clock.advance(0)
    assert waiting.done() and found == [["s1"]]

    def broken() -> list[OrderUpdate]:
        raise ValueError("matching bug")

    monkeypatch.setattr(ex, "process_prices", broken)
    feed.at(BTC, "28800.0")  # does not raise here
    await clock.advance(0)
    assert task.done() and isinstance(task.exception(), ValueError)
    assert feed.signal._listeners == []

    monkeypatch.undo()
    again = asyncio.create_task(make(feed=feed, clock=clock)[0].run())
    await clock.advance(0)
    assert len(feed.signal._listeners) == 1
    again.cancel()
    with pytest.raises(asyncio.CancelledError):
        await again
    assert feed.signal._listeners == []
