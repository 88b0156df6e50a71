"""After a restart, a paper venue's history is rebuilt by `restore()` in no particular time order (orders
re-opened from the ledger first, then orders known only by their fills, grouped by order); the
retention window (exchange.paper_history) must still forget each settled order and trade as soon as it
is older than the window, not only once the newest restored entry is, while open orders and recent
orders (a resend's duplicate protection) are kept."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal

import pytest

from core.clock import SimClock
from core.errors import OrderNotFound
from core.types import Fill, MarketType, OrderState, OrderType, Side
from exchange.base import OrderRequest, OrderUpdate
from exchange.paper import PaperExchange
from exchange.paper_futures import PaperFuturesExchange
from exchange.paper_history import RETENTION_SECONDS, SettledHistory
from tests import test_paper as spot
from tests import test_paper_futures as fut

D = Decimal
DAY = 86_400.0


def _fill(cid: str, seq: int, market: MarketType, symbol: str, side: Side, price: str, ts: float) -> Fill:
    """A ledger fill; `seq` is the venue-wide fill number paper trade ids end with."""
    return Fill(cid, f"paper-{cid}-{seq}", "test", market, symbol, side, D("0.01"), D(price), D("0.1"), "USDT", ts)


def _ledger(t0: float, market: MarketType, symbol: str, price: str) -> tuple[list[Fill], dict[str, float]]:
    """Fills whose orders settle out of the order restore() records them in, and each order's settle
    time (the restore time for "d", an order the ledger still shows open that its fill completed).

    "a" fills at t0 and t0+3d (its first fill is the oldest, its settle time late); "b" at t0+1d, "c" at
    t0+2d; "d" at t0+0.5d. Restore at t0+4d records d (now) first, then a, b, c."""
    fills = [
        _fill("a", 1, market, symbol, Side.BUY, price, t0),
        _fill("d", 2, market, symbol, Side.BUY, price, t0 + 0.5 * DAY),
        _fill("b", 3, market, symbol, Side.SELL, price, t0 + DAY),
        _fill("c", 4, market, symbol, Side.SELL, price, t0 + 2 * DAY),
        _fill("a", 5, market, symbol, Side.BUY, price, t0 + 3 * DAY),
    ]
    settle_at = {"a": t0 + 3 * DAY, "b": t0 + DAY, "c": t0 + 2 * DAY, "d": t0 + 4 * DAY}
    return fills, settle_at


async def _walk_the_window(ex: PaperExchange | PaperFuturesExchange, symbol: str, fills: list[Fill],
                           settle_at: dict[str, float], set_time: Callable[[float], None],
                           place_new: Callable[[str], Awaitable[OrderUpdate]]) -> None:
    """Step the clock just past each restored order's window, oldest first (4 steps): a new order (which
    prunes) finds exactly the restored orders and trades still inside the window, and the stop open."""
    for i, (cid, settled) in enumerate(sorted(settle_at.items(), key=lambda item: item[1])):
        now = settled + RETENTION_SECONDS + 1
        set_time(now)
        await place_new(f"new-{i}")
        cutoff = now - RETENTION_SECONDS
        kept = {c for c, at in settle_at.items() if at >= cutoff}
        assert {c for c in ex._orders if not c.startswith("new-")} == kept | {"stop"}, f"past {cid}'s window"
        with pytest.raises(OrderNotFound):
            await ex.fetch_order(symbol, cid)
        trades = [f for f in await ex.fetch_my_trades(symbol) if not f.client_order_id.startswith("new-")]
        assert trades == [f for f in fills if f.ts >= cutoff]
        assert [u.client_order_id for u in await ex.fetch_open_orders([])] == ["stop"]
        for still in kept:
            # Inside the window a resend is still recognized: the existing order back, nothing traded.
            before = len(await ex.fetch_my_trades(symbol))
            again = await ex.create_order(OrderRequest(still, symbol, Side.BUY, OrderType.MARKET, D("0.01")))
            assert again.client_order_id == still and again.state is OrderState.FILLED
            assert len(await ex.fetch_my_trades(symbol)) == before
    # Every restored settled order and trade is gone; only the open stop and the new orders remain.
    assert set(ex._orders) == {"stop"} | {f"new-{i}" for i in range(len(settle_at))}
    assert all(f.client_order_id.startswith("new-") for f in await ex.fetch_my_trades(symbol))


# --- spot -----------------------------------------------------------------------------------------


def _restored_spot() -> tuple[PaperExchange, spot.FakeFeed, SimClock, list[Fill], dict[str, float]]:
    ex, feed, clock = spot.make()
    t0 = clock.now()
    fills, settle_at = _ledger(t0, MarketType.SPOT, "BTC/USDT", "30000")
    d_open = spot.req("d", Side.BUY, "0.01", otype=OrderType.LIMIT, price="29000")
    stop = spot.req("stop", Side.SELL, "0.01", otype=OrderType.STOP_MARKET, stop="20000")
    clock.set(t0 + 4 * DAY)
    feed.set("BTC/USDT", "30000.00", "30001.00")
    ex.restore(fills, [stop, d_open])
    return ex, feed, clock, fills, settle_at


async def test_spot_restore_out_of_time_order_forgets_each_order_and_trade_once_past_its_window() -> None:
    ex, feed, clock, fills, settle_at = _restored_spot()
    assert set(ex._orders) == {"a", "b", "c", "d", "stop"}

    def set_time(now: float) -> None:
        clock.set(now)
        feed.set("BTC/USDT", "30000.00", "30001.00")

    async def place_new(cid: str) -> OrderUpdate:
        return await ex.create_order(spot.req(cid, Side.BUY, "0.001"))

    await _walk_the_window(ex, "BTC/USDT", fills, settle_at, set_time, place_new)
    # The open stop, older than the window, is still worked.
    feed.set("BTC/USDT", "19000.00", "19001.00")
    (update,) = ex.process_prices()
    assert update.client_order_id == "stop" and update.state is OrderState.FILLED


async def test_spot_restore_keeps_orders_inside_the_window_so_a_resend_gets_the_existing_order() -> None:
    ex, _, _, _, _ = _restored_spot()
    trades = await ex.fetch_my_trades("BTC/USDT")
    for cid, amount in (("a", D("0.02")), ("b", D("0.01")), ("d", D("0.01"))):
        again = await ex.create_order(spot.req(cid, Side.BUY, "0.5"))
        assert again.state is OrderState.FILLED and again.filled == amount
    assert await ex.fetch_my_trades("BTC/USDT") == trades
    assert [u.client_order_id for u in await ex.fetch_open_orders([])] == ["stop"]


# --- futures --------------------------------------------------------------------------------------


def _restored_futures() -> tuple[PaperFuturesExchange, fut.FakeFeed, SimClock, list[Fill],
                                 dict[str, float]]:
    ex, feed, clock = fut.make()
    t0 = clock.now()
    fills, settle_at = _ledger(t0, MarketType.FUTURES, fut.BTC, "40000")
    d_open = fut.req("d", Side.BUY, "0.01", otype=OrderType.LIMIT, price="39000")
    stop = fut.req("stop", Side.SELL, "0.01", otype=OrderType.STOP_MARKET, stop="30000", reduce_only=True)
    clock.set(t0 + 4 * DAY)
    feed.at(fut.BTC, "40000")
    ex.restore(fills, [stop, d_open], [], {})
    return ex, feed, clock, fills, settle_at


async def test_futures_restore_out_of_time_order_forgets_each_order_and_trade_once_past_its_window() -> None:
    ex, feed, clock, fills, settle_at = _restored_futures()
    assert set(ex._orders) == {"a", "b", "c", "d", "stop"}

    def set_time(now: float) -> None:
        clock.set(now)
        feed.at(fut.BTC, "40000")

    async def place_new(cid: str) -> OrderUpdate:
        return await ex.create_order(fut.req(cid, Side.BUY, "0.01"))

    await _walk_the_window(ex, fut.BTC, fills, settle_at, set_time, place_new)


async def test_futures_restore_keeps_orders_inside_the_window_so_a_resend_gets_the_existing_order() -> None:
    ex, _, _, _, _ = _restored_futures()
    trades = await ex.fetch_my_trades(fut.BTC)
    for cid, amount in (("a", D("0.02")), ("b", D("0.01")), ("d", D("0.01"))):
        again = await ex.create_order(fut.req(cid, Side.BUY, "0.5"))
        assert again.state is OrderState.FILLED and again.filled == amount
    assert await ex.fetch_my_trades(fut.BTC) == trades
    assert [u.client_order_id for u in await ex.fetch_open_orders([])] == ["stop"]


# --- the history itself ---------------------------------------------------------------------------


class _Order:
    def __init__(self, state: OrderState) -> None:
        self.state = state


def test_restored_settle_notes_in_any_order_are_forgotten_oldest_first_with_live_ones_after() -> None:
    history: SettledHistory[_Order] = SettledHistory(10)
    for cid in ("x", "y", "z", "live", "open"):
        history.orders[cid] = _Order(OrderState.OPEN if cid == "open" else OrderState.FILLED)
    history.settled("z", 300)  # recorded by restore as it rebuilds an order the ledger shows open
    history.restore_settled([("y", 200.0), ("x", 100.0)])
    history.settled("live", 400)  # a settle on the order path after the restore
    history.forget_old(110.5)
    assert set(history.orders) == {"y", "z", "live", "open"}
    history.forget_old(310.5)
    assert set(history.orders) == {"live", "open"}
    history.forget_old(1e9)
    assert set(history.orders) == {"open"} and not history._settled


def test_restored_trades_are_kept_in_time_order_whatever_order_they_come_in() -> None:
    history: SettledHistory[_Order] = SettledHistory(10)
    fills = [_fill(c, i, MarketType.SPOT, "BTC/USDT", Side.BUY, "1", ts)
             for i, (c, ts) in enumerate((("p", 300.0), ("q", 100.0), ("r", 200.0)))]
    history.restore_trades(fills)
    assert [f.ts for f in history.trades] == [100.0, 200.0, 300.0]
    history.forget_old(210.5)
    assert [f.client_order_id for f in history.trades] == ["p"]
