"""The real ccxt client against the loopback Binance fake: every call, spot and USD-M futures.

What matters to a user: amounts and prices leave rounded to the market, orders too small never leave,
every answer carries exact Decimals and the fills that make it up, futures symbols are set up before
their first order, stops are sent in the form the symbol supports, and nothing needs the internet.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from config import load_settings
from core.clock import LiveClock, SimClock
from core.errors import DependencyError, OperationalError, OrderNotFound, OrderRejected
from core.types import MarketType, OrderState, OrderType, PositionSide, Side
from exchange.base import OrderRequest
from exchange.ccxt_client import CcxtExchange
from exchange.errors import SendOutcomeUnknown
from exchange.ratelimit import BudgetRegistry, WeightBudget
from tests.bounded import bounded
from tests.fakes.binance import API_KEY, API_SECRET, FakeBinance

Make = Callable[..., Awaitable[CcxtExchange]]

SPOT, FUT = MarketType.SPOT, MarketType.FUTURES
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance() as server:
        yield server


@pytest.fixture
async def make(fake: FakeBinance) -> AsyncIterator[Make]:
    made: list[CcxtExchange] = []

    async def build(market: MarketType = SPOT, *, load: bool = True, **kw: Any) -> CcxtExchange:
        opts: dict[str, Any] = {
            "api_key": API_KEY, "api_secret": API_SECRET, "mode": "testnet", "timeout_seconds": 2.0,
            "urls_override": fake.url, "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05,
            "rng": random.Random(7),
        }
        opts.update(kw)
        clock = opts.pop("clock", LiveClock())
        client = CcxtExchange(market, clock, **opts)
        made.append(client)
        if load:
            await client.load_markets()
        return client

    yield build
    for client in made:
        await client.close()


def order(cid: str, symbol: str, side: Side, amount: str, order_type: OrderType = OrderType.MARKET,
          **kw: Any) -> OrderRequest:
    return OrderRequest(client_order_id=cid, symbol=symbol, side=side, order_type=order_type,
                        amount=Decimal(amount), **kw)


# --- markets ------------------------------------------------------------------------------------------

@bounded(10)
async def test_spot_markets_carry_exact_steps_and_minimums_from_the_filters(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(SPOT)
    btc, sol = client.market("BTC/USDT"), client.market("SOL/USDT")
    assert (btc.amount_step, btc.price_step, btc.min_amount, btc.min_notional) == (
        Decimal("0.00001"), Decimal("0.01"), Decimal("0.00001"), Decimal("5"))
    assert (sol.amount_step, sol.min_amount, sol.base, sol.quote) == (Decimal("0.001"), Decimal("0.001"),
                                                                        "SOL", "USDT")
    assert set(client.markets) == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
    # One exchangeInfo call, nothing else (no sapi, no futures exchangeInfo).
    assert [r.path for r in fake.requests] == ["/api/v3/exchangeInfo"]
    with pytest.raises(DependencyError, match="unknown market"):
        client.market("DOGE/USDT")


@bounded(10)
async def test_futures_markets_know_min_notional_and_max_leverage(make: Make, fake: FakeBinance) -> None:
    client = await make(FUT)
    btc = client.market("BTC/USDT:USDT")
    assert (btc.amount_step, btc.price_step, btc.min_notional, btc.max_leverage) == (
        Decimal("0.001"), Decimal("0.1"), Decimal("100"), 125)
    assert client.market("BTC/USDT") == btc  # the short spelling resolves to the perpetual
    assert client.market("SOL/USDT:USDT").amount_step == Decimal("1")
    assert {r.path for r in fake.requests} == {"/fapi/v1/exchangeInfo", "/fapi/v1/leverageBracket"}


# --- spot orders ------------------------------------------------------------------------------------

@bounded(10)
async def test_spot_market_buy_is_rounded_sent_as_quantity_and_returns_its_fills(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(SPOT)
    update = await client.create_order(order("ke-1", "BTC/USDT", Side.BUY, "0.0012345",
                                             price=Decimal("60000")))
    post = fake.calls("/api/v3/order", "POST")[-1].params
    assert post["quantity"] == "0.00123" and "quoteOrderQty" not in post and "price" not in post
    assert post["newClientOrderId"] == "ke-1"
    assert update.state is OrderState.FILLED and update.filled == Decimal("0.00123")
    assert update.avg_price == Decimal("60000") and update.client_order_id == "ke-1"
    assert len(update.fills) == 1
    fill = update.fills[0]
    assert (fill.amount, fill.price, fill.fee, fill.fee_asset) == (
        Decimal("0.00123"), Decimal("60000"), Decimal("0.00000123"), "BTC")
    assert fill.engine == "" and fill.client_order_id == "ke-1"
    assert fake.orders_by_client_id["ke-1"].executed == Decimal("0.00123")


@bounded(10)
async def test_spot_limit_order_open_listed_then_cancelled_by_client_id(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT)
    placed = await client.create_order(order("ke-lim", "ETH/USDT", Side.BUY, "0.5", OrderType.LIMIT,
                                             price=Decimal("2500.004")))
    assert fake.calls("/api/v3/order", "POST")[-1].params["price"] == "2500"
    assert placed.state is OrderState.OPEN and placed.filled == 0
    assert fake.spot_balances["USDT"][1] == Decimal("1250")  # locked by the resting order
    fetched = await client.fetch_order("ETH/USDT", "ke-lim")
    assert fetched.state is OrderState.OPEN and fetched.exchange_order_id == placed.exchange_order_id
    assert [o.client_order_id for o in await client.fetch_open_orders(["ETH/USDT", "BTC/USDT"])] == ["ke-lim"]
    cancelled = await client.cancel_order("ETH/USDT", "ke-lim")
    # Binance answers a cancel with a new id in clientOrderId; the update must keep the order's own.
    assert cancelled.client_order_id == "ke-lim" and cancelled.state is OrderState.CANCELED
    assert fake.orders_by_client_id["ke-lim"].status == "CANCELED"
    assert fake.spot_balances["USDT"] == [Decimal("10000"), Decimal("0")]
    assert await client.fetch_open_orders([]) == []


@bounded(10)
async def test_partially_filled_order_comes_with_the_fills_that_make_it_up(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(SPOT)
    await client.create_order(order("ke-part", "BTC/USDT", Side.BUY, "0.01", OrderType.LIMIT,
                                    price=Decimal("59000")))
    fake.fill_order("ke-part", qty="0.004")
    fake.fill_order("ke-part", qty="0.002", price="58990")
    update = await client.fetch_order("BTC/USDT", "ke-part")
    assert update.state is OrderState.PARTIALLY_FILLED and update.filled == Decimal("0.006")
    assert sorted(f.amount for f in update.fills) == [Decimal("0.002"), Decimal("0.004")]
    assert len({f.trade_id for f in update.fills}) == 2
    assert update.avg_price == (Decimal("0.004") * 59000 + Decimal("0.002") * 58990) / Decimal("0.006")
    # Cancelling the rest keeps the executions.
    cancelled = await client.cancel_order("BTC/USDT", "ke-part")
    assert cancelled.state is OrderState.CANCELED and cancelled.filled == Decimal("0.006")
    assert sum(f.amount for f in cancelled.fills) == Decimal("0.006")


@bounded(10)
async def test_cancel_of_a_filled_order_answers_with_its_fills_and_unknown_id_is_not_found(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(SPOT)
    await client.create_order(order("ke-f", "BTC/USDT", Side.BUY, "0.001", price=Decimal("60000")))
    update = await client.cancel_order("BTC/USDT", "ke-f")
    assert update.state is OrderState.FILLED and len(update.fills) == 1
    with pytest.raises(OrderNotFound):
        await client.cancel_order("BTC/USDT", "never-sent")
    with pytest.raises(OrderNotFound):
        await client.fetch_order("BTC/USDT", "never-sent")


@bounded(10)
async def test_my_trades_map_to_client_ids_even_for_orders_another_process_placed(
    make: Make, fake: FakeBinance
) -> None:
    first = await make(SPOT)
    await first.create_order(order("ke-a", "BTC/USDT", Side.BUY, "0.001", price=Decimal("60000")))
    fake.set_price("BTC/USDT", "61000")
    await first.create_order(order("ke-b", "BTC/USDT", Side.SELL, "0.0005", price=Decimal("61000")))
    restarted = await make(SPOT)  # knows nothing about the orders: looks their ids up
    fills = await restarted.fetch_my_trades("BTC/USDT")
    assert [(f.client_order_id, f.side, f.amount, f.price) for f in fills] == [
        ("ke-a", Side.BUY, Decimal("0.001"), Decimal("60000")),
        ("ke-b", Side.SELL, Decimal("0.0005"), Decimal("61000")),
    ]
    assert fills[1].fee == Decimal("0.0305") and fills[1].fee_asset == "USDT"
    later = await restarted.fetch_my_trades("BTC/USDT", since=fills[1].ts + 1)
    assert later == []
    assert await restarted.fetch_my_trades("ETH/USDT") == []


@bounded(10)
async def test_spot_balance_values_holdings_at_their_last_price(make: Make, fake: FakeBinance) -> None:
    fake.set_spot_balance("USDT", "1000")
    fake.set_spot_balance("BTC", "0.5")
    fake.set_spot_balance("XYZ", "3")  # no XYZ/USDT market: listed, not valued
    client = await make(SPOT)
    balance = await client.fetch_balance()
    assert balance.free == {"USDT": Decimal("1000"), "BTC": Decimal("0.5"), "XYZ": Decimal("3")}
    assert balance.equity == Decimal("1000") + Decimal("0.5") * Decimal("60000")
    fake.set_price("BTC/USDT", "50000")
    assert (await client.fetch_balance()).equity == Decimal("26000")


@bounded(10)
async def test_spot_stop_uses_stop_loss_where_listed_and_stop_loss_limit_elsewhere(
    make: Make, fake: FakeBinance
) -> None:
    fake.set_spot_balance("BTC", "0.1")
    fake.set_spot_balance("SOL", "10")
    client = await make(SPOT)
    btc = await client.create_order(order("ke-sb", "BTC/USDT", Side.SELL, "0.01", OrderType.STOP_MARKET,
                                          stop_price=Decimal("58000.123")))
    sent = fake.calls("/api/v3/order", "POST")[-1].params
    assert (sent["type"], sent["stopPrice"], "price" in sent) == ("STOP_LOSS", "58000.12", False)
    assert btc.state is OrderState.OPEN and btc.order_type is OrderType.STOP_MARKET
    sol = await client.create_order(order("ke-ss", "SOL/USDT", Side.SELL, "2", OrderType.STOP_MARKET,
                                          stop_price=Decimal("140")))
    sent = fake.calls("/api/v3/order", "POST")[-1].params
    assert (sent["type"], sent["stopPrice"], sent["price"]) == ("STOP_LOSS_LIMIT", "140", "139.3")
    assert sol.state is OrderState.OPEN
    fake.set_price("BTC/USDT", "57000")
    hit = await client.fetch_order("BTC/USDT", "ke-sb")
    assert hit.state is OrderState.FILLED and hit.fills[0].price == Decimal("57000")


@bounded(10)
async def test_orders_below_minimums_are_refused_before_anything_is_sent(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT)
    with pytest.raises(OrderRejected, match="notional"):
        await client.create_order(order("ke-small", "BTC/USDT", Side.BUY, "0.00005", price=Decimal("60000")))
    with pytest.raises(OrderRejected, match="below the minimum"):
        await client.create_order(order("ke-dust", "BTC/USDT", Side.BUY, "0.000004", price=Decimal("60000")))
    with pytest.raises(OrderRejected, match="notional"):
        await client.create_order(order("ke-lim", "ETH/USDT", Side.BUY, "0.001", OrderType.LIMIT,
                                        price=Decimal("3000")))
    # A market order without a reference price is checked against the ticker, still before sending.
    with pytest.raises(OrderRejected, match="notional"):
        await client.create_order(order("ke-np", "SOL/USDT", Side.BUY, "0.01"))
    assert fake.calls("/api/v3/ticker/24hr")
    assert fake.calls("/order", "POST") == [] and fake.orders == {}


@bounded(10)
async def test_market_order_without_price_uses_the_ticker_and_is_placed(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT)
    update = await client.create_order(order("ke-t", "ETH/USDT", Side.BUY, "0.01"))
    assert update.state is OrderState.FILLED and update.fills[0].price == Decimal("3000")


@bounded(10)
async def test_ticker_is_exact_and_futures_bid_ask_come_from_the_book(make: Make, fake: FakeBinance) -> None:
    spot = await make(SPOT)
    t = await spot.fetch_ticker("BTC/USDT")
    assert (t.bid, t.ask, t.last) == (Decimal("59999.99"), Decimal("60000.01"), Decimal("60000"))
    fut = await make(FUT)
    f = await fut.fetch_ticker("BTC/USDT")
    assert (f.bid, f.ask, f.last, f.symbol) == (Decimal("59999.9"), Decimal("60000.1"), Decimal("60000"),
                                                "BTC/USDT")


# --- futures --------------------------------------------------------------------------------------------

@bounded(10)
async def test_futures_symbol_setup_before_first_order_cached_and_already_set_is_fine(
    make: Make, fake: FakeBinance
) -> None:
    fake.margin_type["ETHUSDT"] = "ISOLATED"  # "No need to change margin type." will come back
    client = await make(FUT)
    await client.ensure_symbol_setup("ETH/USDT", 5)
    assert fake.margin_type["ETHUSDT"] == "ISOLATED" and fake.leverage["ETHUSDT"] == 5
    before = len(fake.requests)
    await client.ensure_symbol_setup("ETH/USDT:USDT", 5)
    assert len(fake.requests) == before  # cached
    with pytest.raises(OrderRejected, match="leverage"):
        await client.ensure_symbol_setup("ETH/USDT", 500)
    # The first order on a symbol sets it up on its own.
    await client.create_order(order("kf-1", "BTC/USDT", Side.BUY, "0.002", price=Decimal("60000"), leverage=3))
    assert fake.margin_type["BTCUSDT"] == "ISOLATED" and fake.leverage["BTCUSDT"] == 3
    paths = [r.path for r in fake.requests[before:]]
    assert paths.index("/fapi/v1/leverage") < paths.index("/fapi/v1/order")


@bounded(10)
async def test_futures_position_lifecycle_with_reduce_only_close(make: Make, fake: FakeBinance) -> None:
    client = await make(FUT)
    opened = await client.create_order(order("kf-o", "BTC/USDT:USDT", Side.BUY, "0.0025",
                                             price=Decimal("60000"), leverage=10))
    assert fake.calls("/fapi/v1/order", "POST")[-1].params["quantity"] == "0.002"
    # USD-M answers carry no fills: they are fetched by order id so the ledger gets them.
    assert opened.state is OrderState.FILLED and [f.amount for f in opened.fills] == [Decimal("0.002")]
    assert opened.fills[0].fee == Decimal("0.06") and opened.fills[0].fee_asset == "USDT"
    fake.set_price("BTC/USDT", "61000")
    [pos] = await client.fetch_positions()
    assert (pos.symbol, pos.side, pos.amount, pos.entry_price, pos.leverage) == (
        "BTC/USDT:USDT", PositionSide.LONG, Decimal("0.002"), Decimal("60000"), 10)
    assert pos.unrealized_pnl == Decimal("2") and pos.liquidation_price is not None and pos.margin > 0
    balance = await client.fetch_balance()
    assert balance.equity == Decimal("10000") - Decimal("0.06") + Decimal("2")
    assert balance.total == {"USDT": Decimal("9999.94")}
    # Closing 0.002 BTC is 122 USDT of notional: fine, and reduce-only closes are exempt anyway.
    closed = await client.create_order(order("kf-c", "BTC/USDT", Side.SELL, "0.002", reduce_only=True))
    assert fake.calls("/fapi/v1/order", "POST")[-1].params["reduceOnly"] == "true"
    assert closed.reduce_only and closed.fills[0].reduce_only and closed.state is OrderState.FILLED
    assert await client.fetch_positions() == []


@bounded(10)
async def test_futures_position_leverage_survives_a_restart(make: Make, fake: FakeBinance) -> None:
    client = await make(FUT)
    await client.create_order(order("kf-l", "ETH/USDT", Side.SELL, "0.1", price=Decimal("3000"), leverage=4))
    restarted = await make(FUT)
    [pos] = await restarted.fetch_positions()
    assert (pos.side, pos.amount, pos.leverage) == (PositionSide.SHORT, Decimal("0.1"), 4)


@bounded(10)
async def test_futures_stop_market_goes_through_algo_orders_and_is_found_after_restart(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(FUT)
    await client.create_order(order("kf-e", "BTC/USDT", Side.BUY, "0.004", price=Decimal("60000"), leverage=5))
    stop = await client.create_order(order("kf-s", "BTC/USDT", Side.SELL, "0.004", OrderType.STOP_MARKET,
                                           stop_price=Decimal("57000.04"), reduce_only=True))
    sent = fake.calls("/fapi/v1/algoOrder", "POST")[-1].params
    assert (sent["clientAlgoId"], sent["type"], sent["triggerPrice"], sent["reduceOnly"]) == (
        "kf-s", "STOP_MARKET", "57000", "true")
    assert stop.state is OrderState.OPEN and stop.order_type is OrderType.STOP_MARKET
    assert [o.client_order_id for o in await client.fetch_open_orders(["BTC/USDT"])] == ["kf-s"]
    restarted = await make(FUT)
    assert (await restarted.fetch_order("BTC/USDT", "kf-s")).state is OrderState.OPEN
    fake.set_price("BTC/USDT", "56900")
    fired = await restarted.fetch_order("BTC/USDT", "kf-s")
    assert fired.state is OrderState.FILLED and fired.filled == Decimal("0.004")
    assert [(f.client_order_id, f.price, f.amount) for f in fired.fills] == [
        ("kf-s", Decimal("56900"), Decimal("0.004"))]
    assert await restarted.fetch_positions() == []


@bounded(10)
async def test_futures_stop_cancel_by_client_id(make: Make, fake: FakeBinance) -> None:
    client = await make(FUT)
    await client.create_order(order("kf-e2", "ETH/USDT", Side.BUY, "0.01", price=Decimal("3000")))
    await client.create_order(order("kf-s2", "ETH/USDT", Side.SELL, "0.01", OrderType.STOP_MARKET,
                                    stop_price=Decimal("2800"), reduce_only=True))
    restarted = await make(FUT)
    cancelled = await restarted.cancel_order("ETH/USDT", "kf-s2")
    assert cancelled.state is OrderState.CANCELED and fake.orders_by_client_id["kf-s2"].status == "CANCELED"
    assert await restarted.fetch_open_orders(["ETH/USDT"]) == []


# --- modes, keys, budget --------------------------------------------------------------------------------

@bounded(10)
async def test_public_mode_reads_markets_but_never_sends_private_calls(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT, mode="public", api_key=None, api_secret=None)
    assert client.market("BTC/USDT").min_notional == Decimal("5")
    assert (await client.fetch_ticker("ETH/USDT")).last == Decimal("3000")
    with pytest.raises(OperationalError, match="public mode"):
        await client.fetch_balance()
    with pytest.raises(OperationalError, match="public mode"):
        await client.create_order(order("x", "BTC/USDT", Side.BUY, "0.001", price=Decimal("60000")))
    assert not fake.calls("/api/v3/account") and not fake.calls("/api/v3/order")


@bounded(10)
async def test_bad_keys_are_operational_and_never_appear_in_the_message(make: Make, fake: FakeBinance) -> None:
    wrong_secret = "definitely-not-the-secret-abcdef"
    client = await make(SPOT, api_secret=wrong_secret)
    with pytest.raises(OperationalError) as err:
        await client.fetch_balance()
    assert len(fake.calls("/api/v3/account")) == 1  # not retried
    bad_key = await make(SPOT, api_key="wrong-key-1234567")
    with pytest.raises(OperationalError) as err2:
        await bad_key.fetch_balance()
    for text in (str(err.value), str(err2.value)):
        for secret in (wrong_secret, API_SECRET, API_KEY, "wrong-key-1234567"):
            assert secret not in text


def test_modes_point_at_demo_live_or_override() -> None:
    clock = LiveClock()
    demo = CcxtExchange(SPOT, clock, api_key="k", api_secret="s", mode="testnet", timeout_seconds=5)
    live = CcxtExchange(FUT, clock, api_key="k", api_secret="s", mode="live", timeout_seconds=5)
    local = CcxtExchange(FUT, clock, api_key="k", api_secret="s", mode="testnet", timeout_seconds=5,
                         urls_override="http://127.0.0.1:9")
    assert demo._ex.urls["api"]["private"].startswith("https://demo-api.binance.com/")
    assert live._ex.urls["api"]["fapiPrivate"] == "https://fapi.binance.com/fapi/v1"
    assert live.is_live and not demo.is_live and demo.mode == "testnet"
    assert all(v.startswith("http://127.0.0.1:9/") for v in local._ex.urls["api"].values())
    assert local._ex.urls["api"]["fapiPrivateV3"] == "http://127.0.0.1:9/fapi/v3"
    assert local._ex.timeout == 5000


def test_trading_modes_need_keys() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="BINANCE_API_KEY"):
        CcxtExchange(SPOT, LiveClock(), api_key=None, api_secret=None, mode="live", timeout_seconds=5)


@bounded(10)
async def test_clients_of_one_api_share_one_weight_budget_and_count_their_calls(
    make: Make, fake: FakeBinance
) -> None:
    registry = BudgetRegistry(LiveClock())
    budget = registry.for_market(SPOT)
    seen: list[tuple[str, str | None]] = []
    a = await make(SPOT, budget=budget, on_request=lambda ep, s, kind: seen.append((ep, kind)))
    b = await make(SPOT, budget=registry.for_market(SPOT))
    assert registry.for_market(FUT) is not budget
    await a.fetch_balance()
    await b.fetch_ticker("BTC/USDT")
    assert budget.stats.spent == 20 + 20 + 20 + 2  # exchangeInfo x2, account, ticker
    assert a.stats.calls == {"load_markets": 1, "fetch_balance": 1}
    assert ("fetch_balance", None) in seen
    with pytest.raises(OrderNotFound):
        await a.fetch_order("BTC/USDT", "nope")
    snap = a.stats_snapshot()
    assert snap["errors_by_kind"] == {"not_found": 1}
    assert sum(snap["latency_counts"]) == 3


async def test_weight_budget_waits_on_the_clock_when_spent() -> None:
    clock = SimClock()
    budget = WeightBudget(clock, rate_per_second=10, burst=20)
    assert await budget.acquire(20) == 0
    task = asyncio.ensure_future(budget.acquire(5))
    await clock.advance(0.4)
    assert not task.done()
    await clock.advance(0.2)
    assert task.done() and task.result() == pytest.approx(0.5)
    budget.drain()
    assert budget.available == 0
    # The Binance presets stay under the published limits in any rolling minute.
    for market, limit in ((SPOT, 6000), (FUT, 2400)):
        preset = WeightBudget.for_binance(market, clock)
        assert preset.burst + 60 * preset.rate_per_second <= 0.8 * limit


@bounded(10)
async def test_settings_build_a_trading_client_or_a_public_one_for_paper(fake: FakeBinance) -> None:
    clock = LiveClock()
    settings = load_settings(None, trading_mode="testnet", binance_api_key=API_KEY,
                             binance_api_secret=API_SECRET, exchange_url_override=fake.url,
                             exchange_timeout_seconds=3, exchange_max_retries=1)
    client = CcxtExchange.from_settings(settings, SPOT, clock)
    try:
        assert (client.mode, client.timeout_seconds, client.max_retries) == ("testnet", 3, 1)
        await client.load_markets()
        assert (await client.fetch_balance()).free["USDT"] == Decimal("10000")
    finally:
        await client.close()
    paper = CcxtExchange.from_settings(load_settings(None, binance_api_key=API_KEY), SPOT, clock)
    assert paper.mode == "public" and not paper.is_live
    await paper.close()


@bounded(20)
async def test_fake_runs_standalone_for_a_daemon_in_a_subprocess() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.binance", "--port", "0", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    client: CcxtExchange | None = None
    try:
        url = (await proc.stdout.readline()).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        client = CcxtExchange(SPOT, LiveClock(), api_key=API_KEY, api_secret=API_SECRET, mode="testnet",
                              timeout_seconds=2, urls_override=url)
        await client.load_markets()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            # A harness drives it over HTTP: a fault for the next order, then the exchange's own record.
            await http.post(f"{url}/_fake/faults", json={"kind": "drop", "path": "/api/v3/order",
                                                         "method": "POST"})
            with pytest.raises(SendOutcomeUnknown):
                await client.create_order(order("ke-sub", "BTC/USDT", Side.BUY, "0.001", price=Decimal("60000")))
            state = await (await http.get(f"{url}/_fake/state")).json()
        assert [(o["client_order_id"], o["status"]) for o in state["orders"]] == [("ke-sub", "FILLED")]
        assert state["create_calls"] == [["spot", "ke-sub"]]
    finally:
        if client is not None:
            await client.close()
        proc.terminate()
        await proc.wait()
    assert proc.returncode == 0


@bounded(10)
async def test_fake_serves_klines_in_binance_shape(fake: FakeBinance) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for prefix in ("/api/v3", "/fapi/v1"):
            url = f"{fake.url}{prefix}/klines?symbol=ETHUSDT&interval=5m&limit=12"
            rows = await (await http.get(url)).json()
            assert len(rows) == 12 and all(len(r) == 12 for r in rows)
            opens = [r[0] for r in rows]
            assert opens == sorted(opens) and {b - a for a, b in itertools.pairwise(opens)} == {300_000}
            assert all(Decimal(r[3]) <= Decimal(r[4]) <= Decimal(r[2]) for r in rows)  # low <= close <= high


# --- a placed order is never reported as refused ------------------------------------------------------


async def _futures_client(fake: FakeBinance) -> CcxtExchange:
    client = CcxtExchange(MarketType.FUTURES, LiveClock(), api_key=API_KEY, api_secret=API_SECRET,
                          mode="testnet", timeout_seconds=0.5, urls_override=fake.url, max_retries=2,
                          backoff_base_seconds=0.01, backoff_max_seconds=0.02, rng=random.Random(3))
    await client.load_markets()
    return client


def _futures_buy(cid: str) -> OrderRequest:
    return OrderRequest(client_order_id=cid, symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.MARKET,
                        amount=Decimal("0.002"), price=Decimal("60000"))


_REFUSED_KEY = {"code": -2015, "status": 401, "msg": "Invalid API-key, IP, or permissions for action."}


@pytest.mark.parametrize("fault", [
    pytest.param({"count": 3, **_REFUSED_KEY}, id="refused-key"),
    pytest.param({"code": -1121, "msg": "Invalid symbol."}, id="unmapped-400"),
])
@bounded(10)
async def test_a_placed_order_whose_fills_cannot_be_read_is_unknown_not_refused(fault: dict[str, Any]) -> None:
    """Futures answers carry no fills, so the client reads them after the send. Whatever stops that
    read, the order is on the exchange: the outcome is unknown (resolved by client id), never a
    refusal, which the order manager would settle as REJECTED while the order had FILLED."""
    async with FakeBinance() as fake:
        client = await _futures_client(fake)
        try:
            await client.fetch_balance()  # the key has worked
            fake.inject("error", path="/fapi/v1/userTrades", **fault)
            with pytest.raises(SendOutcomeUnknown):
                await client.create_order(_futures_buy("kf-lost"))
            assert fake.orders_by_client_id["kf-lost"].status == "FILLED"
        finally:
            await client.close()


@pytest.mark.parametrize("fault", [
    pytest.param({"code": -2013, "msg": "Order does not exist."}, id="read-back-lags"),
    pytest.param({"code": -1121, "msg": "Invalid symbol."}, id="unmapped-400"),
])
@bounded(10)
async def test_a_duplicate_answer_whose_read_back_fails_is_unknown_not_refused(fault: dict[str, Any]) -> None:
    """'Duplicate order sent' proves the order exists; a read-back that fails (or lags the send and says
    it does not exist) must not turn it into a refusal."""
    async with FakeBinance() as fake:
        client = await _futures_client(fake)
        try:
            fake.inject("duplicate", path="/order", method="POST")
            fake.inject("error", path="/fapi/v1/order", method="GET", **fault)
            with pytest.raises(SendOutcomeUnknown):
                await client.create_order(_futures_buy("kf-dup"))
            assert fake.orders_by_client_id["kf-dup"].status == "FILLED"
        finally:
            await client.close()


@bounded(10)
async def test_futures_trades_since_more_than_a_week_ago_include_the_latest() -> None:
    """USD-M answers at most a week of trades per request. Reconciliation can ask from further back (its
    window starts at the oldest unsettled order, e.g. a protective stop resting for 8 days); a quiet
    first week must not end the walk before today's fills."""
    async with FakeBinance() as fake:
        client = await _futures_client(fake)
        try:
            placed = await client.create_order(_futures_buy("kf-t"))
            assert placed.fills
            trades = await client.fetch_my_trades("BTC/USDT", since=client.clock.now() - 8 * 86_400)
            assert [f.client_order_id for f in trades] == ["kf-t"]
            windows = [(int(c.params["startTime"]), int(c.params["endTime"]))
                       for c in fake.calls("/fapi/v1/userTrades") if "startTime" in c.params]
            assert len(windows) == 2 and all(end - start < 7 * 86_400_000 for start, end in windows)
            assert windows[1][0] == windows[0][1] + 1  # one after the other, nothing left between
        finally:
            await client.close()
