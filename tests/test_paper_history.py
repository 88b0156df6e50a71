"""The paper venues forget settled orders and trades after a retention window (exchange.paper_history),
so a daemon paper-trading for months does not grow by a kilobyte an order; what they must not forget
(an open order, however old; recent orders a resend or reconciliation asks about; any fill's effect on
the balances) they keep."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.errors import OrderNotFound
from core.types import Fill, MarketType, OrderState, OrderType, Side
from exchange.paper_history import RETENTION_SECONDS, SettledHistory
from tests import test_paper as spot
from tests import test_paper_futures as fut

D = Decimal
DAY = 86_400.0


async def test_spot_forgets_settled_orders_and_trades_after_the_window_but_never_an_open_order() -> None:
    ex, feed, clock = spot.make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(spot.req("old-buy", Side.BUY, "0.1"))
    # A protective stop resting for longer than the window: it must stay open and able to fill.
    await ex.create_order(spot.req("old-stop", Side.SELL, "0.05", otype=OrderType.STOP_MARKET, stop="29000"))
    await ex.create_order(spot.req("old-sell", Side.SELL, "0.05"))

    clock.set(clock.now() + RETENTION_SECONDS + 1)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await ex.create_order(spot.req("new-buy", Side.BUY, "0.01"))

    for cid in ("old-buy", "old-sell"):
        with pytest.raises(OrderNotFound):
            await ex.fetch_order("BTC/USDT", cid)
    assert [f.client_order_id for f in await ex.fetch_my_trades("BTC/USDT")] == ["new-buy"]
    assert (await ex.fetch_order("BTC/USDT", "new-buy")).state is OrderState.FILLED
    assert [u.client_order_id for u in await ex.fetch_open_orders([])] == ["old-stop"]

    # The forgotten orders' fills still count: 0.1 + 0.01 bought, 0.05 sold.
    _, total = await spot.balances(ex)
    assert total["BTC"] == D("0.06")

    feed.set("BTC/USDT", "28000.00", "28001.00")
    (update,) = ex.process_prices()
    assert update.client_order_id == "old-stop" and update.state is OrderState.FILLED


async def test_spot_keeps_recent_orders_so_a_resend_is_still_recognized() -> None:
    ex, feed, clock = spot.make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    first = await ex.create_order(spot.req("b1", Side.BUY, "0.1"))
    clock.set(clock.now() + RETENTION_SECONDS - 60)
    again = await ex.create_order(spot.req("b1", Side.BUY, "0.1"))
    assert again == first
    assert len(await ex.fetch_my_trades("BTC/USDT")) == 1


async def test_spot_memory_stays_bounded_over_months_of_orders() -> None:
    ex, feed, clock = spot.make(usdt="100000000")
    for i in range(600):  # 10 orders a day for 60 days
        clock.set(clock.now() + DAY / 10)
        feed.set("BTC/USDT", "30000.00", "30001.00")
        await ex.create_order(spot.req(f"o{i}", Side.BUY if i % 2 == 0 else Side.SELL, "0.01"))
    kept = len(await ex.fetch_my_trades("BTC/USDT"))
    assert 70 <= kept <= 71  # the last 7 days' 10 a day (the one exactly 7 days old may still be in)
    assert len(ex._orders) == kept


async def test_spot_restore_counts_every_fill_but_keeps_only_recent_orders_and_trades() -> None:
    live, feed, clock = spot.make()
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await live.create_order(spot.req("old", Side.BUY, "0.1"))
    stop = spot.req("stop", Side.SELL, "0.1", otype=OrderType.STOP_MARKET, stop="29000")
    await live.create_order(stop)
    clock.set(clock.now() + RETENTION_SECONDS + 1)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    await live.create_order(spot.req("new", Side.BUY, "0.02"))
    # The ledger has every fill, including those the venue has forgotten.
    old_fill = Fill("old", "t-old", "spot", MarketType.SPOT, "BTC/USDT", Side.BUY, D("0.1"), D("30016.00"),
                    D("3.0016"), "USDT", clock.now() - RETENTION_SECONDS - 1)
    fills = [old_fill, *await live.fetch_my_trades("BTC/USDT")]

    rebuilt, _, _ = spot.make(clock=clock, feed=feed)
    rebuilt.restore(fills, [stop])
    assert (await rebuilt.fetch_balance()).total == (await live.fetch_balance()).total
    assert [f.client_order_id for f in await rebuilt.fetch_my_trades("BTC/USDT")] == ["new"]
    with pytest.raises(OrderNotFound):
        await rebuilt.fetch_order("BTC/USDT", "old")
    assert (await rebuilt.fetch_order("BTC/USDT", "new")).state is OrderState.FILLED
    assert [u.client_order_id for u in await rebuilt.fetch_open_orders([])] == ["stop"]


async def test_futures_forgets_settled_orders_and_trades_after_the_window_but_never_an_open_order() -> None:
    ex, feed, clock = fut.make()
    feed.at(fut.BTC, "40000")
    await ex.create_order(fut.req("old-long", Side.BUY, "0.01"))
    await ex.create_order(fut.req("old-stop", Side.SELL, "0.01", otype=OrderType.STOP_MARKET, stop="39000",
                                  reduce_only=True))
    await ex.create_order(fut.req("old-limit", Side.BUY, "0.01", otype=OrderType.LIMIT, price="35000"))
    await ex.cancel_order(fut.BTC, "old-limit")

    clock.set(clock.now() + RETENTION_SECONDS + 1)
    feed.at(fut.BTC, "40000")
    await ex.create_order(fut.req("new-long", Side.BUY, "0.01"))

    for cid in ("old-long", "old-limit"):
        with pytest.raises(OrderNotFound):
            await ex.fetch_order(fut.BTC, cid)
    assert [f.client_order_id for f in await ex.fetch_my_trades(fut.BTC)] == ["new-long"]
    assert [u.client_order_id for u in await ex.fetch_open_orders([])] == ["old-stop"]
    pos = await fut.position(ex)
    assert pos is not None and pos.amount == D("0.02")


def test_history_forgets_only_settled_orders_and_needs_a_positive_window() -> None:
    with pytest.raises(ValueError):
        SettledHistory(0)

    class Order:
        def __init__(self, state: OrderState) -> None:
            self.state = state

    history: SettledHistory[Order] = SettledHistory(10)
    history.orders["a"] = Order(OrderState.FILLED)
    history.orders["b"] = Order(OrderState.OPEN)  # (a settle note for an order that is open again: kept)
    history.settled("a", 100)
    history.settled("b", 100)
    history.forget_old(110)
    assert set(history.orders) == {"a", "b"}  # exactly the window's age: not yet
    history.forget_old(110.5)
    assert set(history.orders) == {"b"}
