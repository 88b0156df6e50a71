"""The order round trip's fast path against the loopback Binance fake.

`CcxtExchange` sends plain orders through ccxt's implicit endpoints with the request built by ccxt's
own `create_order_request`, and rounds amounts in Decimal to the step ccxt rounds to. Both are only
right while they match what ccxt's unified calls do, so these tests compare the two on the wire and
amount by amount. They also pin what the futures round trip's extra request is for (trade ids and
fees), and the weight budget's no-wait path.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import ccxt.async_support as ccxt
import pytest

from core.clock import LiveClock, SimClock, settle
from core.types import MarketType, OrderState, OrderType, Side
from exchange.base import OrderRequest
from exchange.ccxt_client import CcxtExchange
from exchange.errors import MalformedResponse
from exchange.ratelimit import WeightBudget
from tests.bounded import bounded
from tests.fakes.binance import API_KEY, API_SECRET, FakeBinance

SPOT, FUT = MarketType.SPOT, MarketType.FUTURES
SYMBOL = {SPOT: "BTC/USDT", FUT: "BTC/USDT:USDT"}
# Signed-request bookkeeping and the ids that differ between the two clients by construction.
VOLATILE = {"timestamp", "signature", "recvWindow", "newClientOrderId", "origClientOrderId", "orderId"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance() as server:
        server.set_spot_balance("USDT", "1000000")
        server.futures_wallet = Decimal("1000000")
        yield server


@pytest.fixture
async def clients(fake: FakeBinance) -> AsyncIterator[Callable[[MarketType], Awaitable[tuple[CcxtExchange, Any]]]]:
    """The project's client and a bare ccxt instance of the same class, both on the fake."""
    opened: list[Any] = []

    async def build(market: MarketType) -> tuple[CcxtExchange, Any]:
        client = CcxtExchange(market, LiveClock(), api_key=API_KEY, api_secret=API_SECRET, mode="testnet",
                              timeout_seconds=2.0, urls_override=fake.url)
        opened.append(client)
        await client.load_markets()
        cls = ccxt.binance if market is SPOT else ccxt.binanceusdm
        bare = cls({"apiKey": API_KEY, "secret": API_SECRET, "enableRateLimit": False, "options": {
            "fetchCurrencies": False, "fetchMargins": False,
            "fetchMarkets": {"types": ["spot"] if market is SPOT else ["linear"]}}})
        bare.enable_demo_trading(True)
        for key, value in list(bare.urls["api"].items()):
            bare.urls["api"][key] = fake.url + urlsplit(value).path
        bare.timeout_on_exit = 0
        opened.append(bare)
        await bare.load_markets()
        return client, bare

    yield build
    for each in opened:
        await each.close()


def wire(fake: FakeBinance, path: str, method: str) -> list[dict[str, str]]:
    return [{k: v for k, v in r.params.items() if k not in VOLATILE} for r in fake.calls(path, method)]


ORDERS = [
    pytest.param(SPOT, OrderType.MARKET, "0.0012345", None, id="spot-market"),
    pytest.param(SPOT, OrderType.LIMIT, "0.0012345", "50000.123", id="spot-limit"),
    pytest.param(FUT, OrderType.MARKET, "0.0027", None, id="futures-market"),
    pytest.param(FUT, OrderType.LIMIT, "0.0027", "50000.17", id="futures-limit"),
]


@pytest.mark.parametrize(("market", "kind", "amount", "price"), ORDERS)
@bounded(15)
async def test_plain_orders_go_out_exactly_as_ccxts_unified_calls_send_them(
    clients: Callable[[MarketType], Awaitable[tuple[CcxtExchange, Any]]], fake: FakeBinance,
    market: MarketType, kind: OrderType, amount: str, price: str | None,
) -> None:
    client, bare = await clients(market)
    symbol = SYMBOL[market]
    if market is FUT:
        await client.ensure_symbol_setup(symbol, 5)
    order_path = "/api/v3/order" if market is SPOT else "/fapi/v1/order"
    trades_path = "/api/v3/myTrades" if market is SPOT else "/fapi/v1/userTrades"
    ours = await client.create_order(OrderRequest(
        "ke-ours", symbol, Side.BUY, kind, Decimal(amount),
        price=Decimal(price) if price else Decimal("60000")))
    ccxt_price = client._ex.price_to_precision(symbol, price) if price else None
    theirs = await bare.create_order(symbol, kind.value, "buy", amount, ccxt_price, {"newClientOrderId": "ke-ccxt"})
    if market is FUT and kind is OrderType.MARKET:
        await bare.fetch_my_trades(symbol, None, 1000, {"orderId": theirs["id"]})
    fetched = await client.fetch_order(symbol, "ke-ours")
    await bare.fetch_order(None, symbol, {"origClientOrderId": "ke-ccxt"})

    posts = wire(fake, order_path, "POST")
    assert len(posts) == 2 and posts[0] == posts[1]
    queries = wire(fake, order_path, "GET")
    assert len(queries) == 2 and queries[0] == queries[1]
    assert [r.params["newClientOrderId"] for r in fake.calls(order_path, "POST")] == ["ke-ours", "ke-ccxt"]
    assert fake.calls(order_path, "GET")[0].params["origClientOrderId"] == "ke-ours"
    # The answers read the same: state, amounts, average price.
    expected_state = {"closed": OrderState.FILLED, "open": OrderState.OPEN}[theirs["status"]]
    assert ours.state is fetched.state is expected_state
    assert fetched.amount == Decimal(bare.amount_to_precision(symbol, amount)) == ours.amount
    if kind is OrderType.MARKET:
        assert fetched.filled == ours.filled == fetched.amount
        # Futures answers carry no fills: the project reads them once, the same request ccxt would make.
        fills_reads = wire(fake, trades_path, "GET")
        assert len(fills_reads) == (2 if market is FUT else 0)
        if market is FUT:
            assert fills_reads[0] == fills_reads[1]
    else:
        assert fetched.state is OrderState.OPEN and fetched.filled == 0 and not fetched.fills


@bounded(15)
async def test_a_futures_fill_carries_the_exchanges_trade_id_and_fee_read_once(
    clients: Callable[[MarketType], Awaitable[tuple[CcxtExchange, Any]]], fake: FakeBinance,
) -> None:
    client, _ = await clients(FUT)
    await client.ensure_symbol_setup("BTC/USDT:USDT", 5)
    placed = await client.create_order(OrderRequest("ke-f", "BTC/USDT:USDT", Side.BUY, OrderType.MARKET,
                                                    Decimal("0.002"), price=Decimal("60000")))
    trades = [t for t in fake.trades if t.market == "futures"]
    assert len(trades) == 1 and len(placed.fills) == 1
    fill = placed.fills[0]
    # The ledger keys fills by (client order id, exchange trade id); a made-up id would be recorded
    # again when reconciliation reads the real trade, and the fee would be lost.
    assert (fill.trade_id, fill.fee, fill.fee_asset) == (str(trades[0].trade_id), trades[0].commission,
                                                        trades[0].commission_asset)
    assert fill.fee > 0 and fill.amount == placed.filled == Decimal("0.002")
    assert len(fake.calls("/fapi/v1/userTrades")) == 1
    again = await client.fetch_order("BTC/USDT:USDT", "ke-f")
    assert again.fills == placed.fills
    assert len(fake.calls("/fapi/v1/userTrades")) == 1  # executions never change: not read again


@pytest.mark.parametrize("market", [SPOT, FUT])
@bounded(20)
async def test_amounts_are_truncated_to_the_step_exactly_as_ccxt_rounds_them(
    clients: Callable[[MarketType], Awaitable[tuple[CcxtExchange, Any]]], market: MarketType,
) -> None:
    client, _ = await clients(market)
    rng = random.Random(11)
    for symbol in client.markets:
        edges = ["0.000001", "0.00001", "0.001", "0.0019999", "1", "7.77777777", "12345.678901234",
                 "0.1", "1E+3", "2.5E-4", "99999999999999999999.99999999"]
        randoms = [f"{rng.randint(0, 10 ** rng.randint(1, 12))}E-{rng.randint(0, 12)}" for _ in range(400)]
        for text in edges + randoms:
            amount = Decimal(text)
            if amount <= 0:
                continue
            try:
                expected = Decimal(client._ex.amount_to_precision(symbol, str(amount)))
            except ccxt.InvalidOrder:
                expected = Decimal(0)  # ccxt refuses what truncates to nothing
            assert client._amount(symbol, amount) == expected, (symbol, text)


async def test_an_order_answer_whose_fill_has_no_trade_id_is_malformed(
    clients: Callable[[MarketType], Awaitable[tuple[CcxtExchange, Any]]],
) -> None:
    client, _ = await clients(SPOT)
    answer = {"symbol": "BTCUSDT", "orderId": 7, "clientOrderId": "ke-t", "status": "FILLED", "side": "BUY",
              "type": "MARKET", "origQty": "0.001", "executedQty": "0.001", "cummulativeQuoteQty": "60",
              "transactTime": 1, "fills": [{"price": "60000", "qty": "0.001", "commission": "0",
                                             "commissionAsset": "BNB"}]}
    with pytest.raises(MalformedResponse, match="tradeId"):
        client._order_update(answer, "BTC/USDT")
    answer["fills"] = "garbage"
    with pytest.raises(MalformedResponse, match="fills"):
        client._order_update(answer, "BTC/USDT")
    answer["fills"] = [{"price": "60000", "qty": "0.001", "commission": "0", "commissionAsset": "BNB",
                        "tradeId": 42}]
    update = client._order_update(answer, "BTC/USDT")
    assert update.fills[0].trade_id == "42" and update.avg_price == Decimal("60000")


# --- the weight budget's no-wait path ----------------------------------------------------------------

def test_try_take_takes_what_is_there_and_nothing_otherwise() -> None:
    budget = WeightBudget(SimClock(), rate_per_second=1.0, burst=10.0)
    assert budget.try_take(4)
    assert budget.available == 6 and budget.stats.spent == 4
    assert not budget.try_take(7)
    assert budget.available == 6 and budget.stats.spent == 4
    full = WeightBudget(SimClock(), rate_per_second=1.0, burst=10.0)
    assert full.try_take(25)  # a call heavier than the burst goes through once the bucket is full
    assert full.available == 0 and full.stats.spent == 25
    assert not full.try_take(1)


async def test_try_take_never_overtakes_a_caller_waiting_for_the_refill() -> None:
    clock = SimClock()
    budget = WeightBudget(clock, rate_per_second=1.0, burst=10.0)
    assert budget.try_take(8)  # 2 left
    waiter = asyncio.ensure_future(budget.acquire(5))
    await settle()
    assert not waiter.done()
    assert not budget.try_take(1)  # 2 are there, but the waiter is first in line
    await clock.advance(3.0)
    assert await asyncio.wait_for(waiter, 1.0) == pytest.approx(3.0)
    assert not budget.try_take(1)
    await clock.advance(1.0)
    assert budget.try_take(1)
    assert budget.stats.spent == 14 and budget.stats.waits == 1
