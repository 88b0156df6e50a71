"""Every fault the fake can inject, against the real ccxt client: the right error kind, reads retried
until they succeed, and order placement never retried.

The order path is what protects money: a send that times out, loses its connection or gets garbage
back must raise `SendOutcomeUnknown` after exactly one POST, and the order must then be found by its
client id, never sent twice.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import ccxt.async_support as ccxt
import pytest

from core.clock import LiveClock, SimClock
from core.errors import (
    DependencyError,
    InsufficientFunds,
    OperationalError,
    OrderNotFound,
    OrderRejected,
    TemporaryError,
)
from core.types import MarketType, OrderState, OrderType, Side
from exchange.base import OrderRequest
from exchange.ccxt_client import CcxtExchange
from exchange.errors import (
    ClockSkew,
    DuplicateClientOrderId,
    MalformedResponse,
    RateLimited,
    SendOutcomeUnknown,
    translate,
)
from tests.bounded import bounded
from tests.fakes.binance import API_KEY, API_SECRET, FakeBinance

Make = Callable[..., Awaitable[CcxtExchange]]

SPOT, FUT = MarketType.SPOT, MarketType.FUTURES
TIMEOUT = 0.5  # the client's per-request timeout in these tests; injected delays are longer


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance() as server:
        yield server


@pytest.fixture
async def make(fake: FakeBinance) -> AsyncIterator[Make]:
    made: list[CcxtExchange] = []

    async def build(market: MarketType = SPOT, **kw: Any) -> CcxtExchange:
        opts: dict[str, Any] = {
            "api_key": API_KEY, "api_secret": API_SECRET, "mode": "testnet", "timeout_seconds": TIMEOUT,
            "urls_override": fake.url, "max_retries": 2, "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.02, "rng": random.Random(3),
        }
        opts.update(kw)
        clock = opts.pop("clock", LiveClock())
        client = CcxtExchange(market, clock, **opts)
        made.append(client)
        await client.load_markets()
        return client

    yield build
    for client in made:
        await client.close()


def buy(cid: str, symbol: str = "BTC/USDT", amount: str = "0.001") -> OrderRequest:
    return OrderRequest(client_order_id=cid, symbol=symbol, side=Side.BUY, order_type=OrderType.MARKET,
                        amount=Decimal(amount), price=Decimal("60000"))


# --- reads: one transient fault, then success ------------------------------------------------------------

TRANSIENT = [
    pytest.param({"kind": "http", "status": 503}, "temporary", id="503"),
    pytest.param({"kind": "http", "status": 502}, "temporary", id="502"),
    pytest.param({"kind": "http", "status": 504}, "temporary", id="504-empty"),
    pytest.param({"kind": "http", "status": 429}, "rate_limit", id="429"),
    pytest.param({"kind": "http", "status": 418}, "rate_limit", id="418"),
    pytest.param({"kind": "error", "code": -1003, "msg": "Too many requests."}, "rate_limit", id="-1003"),
    pytest.param({"kind": "error", "code": -1021, "msg": "Timestamp for this request is outside of the "
                  "recvWindow."}, "clock_skew", id="-1021"),
    pytest.param({"kind": "malformed"}, "malformed", id="html-200"),
    pytest.param({"kind": "delay", "seconds": 3.0}, "temporary", id="slower-than-timeout"),
    # aiohttp silently repeats an idempotent request once on a dropped keep-alive connection, so it
    # takes two drops for the client to see one.
    pytest.param({"kind": "drop", "count": 2}, "temporary", id="dropped-connection"),
]


@pytest.mark.parametrize(("fault", "kind"), TRANSIENT)
@bounded(10)
async def test_a_read_is_retried_after_a_transient_fault_and_succeeds(
    make: Make, fake: FakeBinance, fault: dict[str, Any], kind: str
) -> None:
    fake.set_spot_balance("USDT", "1234.5")
    client = await make(SPOT)
    fake.inject(path="/api/v3/account", **fault)
    balance = await client.fetch_balance()
    assert balance.free["USDT"] == Decimal("1234.5")
    assert client.stats.retries == 1
    assert client.stats.errors[("fetch_balance", kind)] == 1
    if kind == "rate_limit":
        assert client.budget.stats.drains == 1  # every client sharing the budget slows down
    if kind == "clock_skew":
        paths = [r.path for r in fake.requests]
        assert paths[-3:] == ["/api/v3/account", "/api/v3/time", "/api/v3/account"]


@bounded(10)
async def test_a_real_clock_offset_is_measured_and_signed_requests_work_again(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(FUT)
    fake.server_time_offset_ms = -30_000  # the exchange's clock is 30 s behind ours
    balance = await client.fetch_balance()
    assert balance.equity == Decimal("10000")
    assert client.stats.errors[("fetch_balance", "clock_skew")] == 1
    assert [r.status for r in fake.calls("/fapi/v3/account")] == [400, 200]
    await client.fetch_balance()
    assert client.stats.errors[("fetch_balance", "clock_skew")] == 1  # the offset stuck


PERSISTENT = [
    pytest.param({"kind": "http", "status": 503}, TemporaryError, id="503"),
    pytest.param({"kind": "http", "status": 429}, RateLimited, id="429"),
    pytest.param({"kind": "error", "code": -1021, "msg": "Timestamp outside of the recvWindow."}, ClockSkew,
                 id="-1021"),
    pytest.param({"kind": "malformed"}, MalformedResponse, id="html-200"),
]


@pytest.mark.parametrize(("fault", "error"), PERSISTENT)
@bounded(10)
async def test_a_read_that_keeps_failing_gives_up_after_max_retries_with_its_kind(
    make: Make, fake: FakeBinance, fault: dict[str, Any], error: type[Exception]
) -> None:
    client = await make(SPOT, max_retries=2)
    fake.inject(path="/api/v3/account", count=3, **fault)
    with pytest.raises(error) as err:
        await client.fetch_balance()
    assert not isinstance(err.value, SendOutcomeUnknown)
    assert len(fake.calls("/api/v3/account")) == 3


FINAL = [
    pytest.param({"kind": "error", "code": -1121, "msg": "Invalid symbol."}, DependencyError, id="-1121"),
    pytest.param({"kind": "error", "code": -2015, "status": 401,
                  "msg": "Invalid API-key, IP, or permissions for action."}, OperationalError, id="401"),
    pytest.param({"kind": "error", "code": -2013, "msg": "Order does not exist."}, OrderNotFound, id="-2013"),
    pytest.param({"kind": "error", "code": -1022, "msg": "Signature for this request is not valid."},
                 OperationalError, id="-1022"),
]


@pytest.mark.parametrize(("fault", "error"), FINAL)
@bounded(10)
async def test_errors_that_retrying_cannot_fix_are_raised_at_once(
    make: Make, fake: FakeBinance, fault: dict[str, Any], error: type[Exception]
) -> None:
    client = await make(SPOT)
    fake.inject(path="/api/v3/order", method="GET", **fault)
    with pytest.raises(error):
        await client.fetch_order("BTC/USDT", "ke-x")
    assert len(fake.calls("/api/v3/order", "GET")) == 1


@bounded(10)
async def test_a_key_refused_after_it_had_worked_is_retried_then_operational(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(SPOT, max_retries=2)
    await client.fetch_balance()  # the key works
    refused = {"code": -2015, "status": 401, "msg": "Invalid API-key, IP, or permissions for action."}
    fake.inject("error", path="/api/v3/account", **refused)
    assert (await client.fetch_balance()).free  # a one-off refusal is ridden out
    fake.inject("error", path="/api/v3/account", count=3, **refused)
    with pytest.raises(OperationalError, match="API key refused"):
        await client.fetch_balance()


@bounded(10)
async def test_fills_already_seen_are_not_read_again(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT)
    placed = await client.create_order(buy("ke-m"))
    again = await client.fetch_order("BTC/USDT", "ke-m")
    assert again.fills == placed.fills and not fake.calls("/api/v3/myTrades")
    restarted = await make(SPOT)
    assert (await restarted.fetch_order("BTC/USDT", "ke-m")).fills == placed.fills
    assert len(fake.calls("/api/v3/myTrades")) == 1


@bounded(10)
async def test_a_garbled_ticker_is_an_error_not_a_ticker_of_none(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT, max_retries=0)
    fake.inject("malformed", path="/ticker/24hr")
    with pytest.raises(MalformedResponse):
        await client.fetch_ticker("BTC/USDT")
    assert (await client.fetch_ticker("BTC/USDT")).last == Decimal("60000")


@bounded(10)
async def test_a_stalled_read_ends_at_the_outer_timeout_on_the_project_clock(
    make: Make, fake: FakeBinance
) -> None:
    clock = SimClock()
    # ccxt's own timeout (real time) is far away; the outer one (project clock) must end the call.
    client = await make(SPOT, clock=clock, timeout_seconds=30.0, max_retries=0)
    fake.inject("delay", path="/api/v3/account", seconds=120.0)
    call = asyncio.ensure_future(client.fetch_balance())
    await fake.wait_for_request("/api/v3/account")
    await clock.advance(31.5)
    with pytest.raises(TemporaryError, match="no answer within 31s"):
        await call


# --- order placement: never retried, outcome resolved by client id ---------------------------------------

UNKNOWN_AFTER_PLACING = [
    pytest.param({"kind": "delay", "seconds": 3.0}, id="answer-too-late"),
    pytest.param({"kind": "drop"}, id="connection-dropped-after-placing"),
    pytest.param({"kind": "malformed"}, id="garbage-answer-after-placing"),
]


@pytest.mark.parametrize("fault", UNKNOWN_AFTER_PLACING)
@pytest.mark.parametrize("market", [SPOT, FUT])
@bounded(10)
async def test_order_without_a_clear_answer_is_sent_once_and_found_by_client_id(
    make: Make, fake: FakeBinance, fault: dict[str, Any], market: MarketType
) -> None:
    client = await make(market)
    fake.inject(path="/order", method="POST", **fault)
    with pytest.raises(SendOutcomeUnknown):
        await client.create_order(buy("ke-u", amount="0.002"))
    assert fake.create_count("ke-u") == 1
    assert fake.orders_by_client_id["ke-u"].status == "FILLED"  # it did happen
    resolved = await client.fetch_order("BTC/USDT", "ke-u")
    assert resolved.state is OrderState.FILLED and resolved.filled == Decimal("0.002")
    assert sum(f.amount for f in resolved.fills) == Decimal("0.002")
    assert fake.create_count("ke-u") == 1
    assert client.stats.errors[("create_order", "send_unknown")] == 1


UNKNOWN_BEFORE_PLACING = [
    pytest.param({"kind": "http", "status": 503}, id="503"),
    pytest.param({"kind": "http", "status": 504}, id="504"),
    pytest.param({"kind": "delay", "seconds": 3.0, "process": False}, id="stuck-before-the-exchange"),
    pytest.param({"kind": "drop", "process": False}, id="connection-dropped-before-placing"),
]


@pytest.mark.parametrize("fault", UNKNOWN_BEFORE_PLACING)
@bounded(10)
async def test_order_lost_before_the_exchange_is_unknown_then_not_found_and_never_resent(
    make: Make, fake: FakeBinance, fault: dict[str, Any]
) -> None:
    client = await make(SPOT)
    fake.inject(path="/api/v3/order", method="POST", **fault)
    with pytest.raises(SendOutcomeUnknown):
        await client.create_order(buy("ke-l"))
    with pytest.raises(OrderNotFound):
        await client.fetch_order("BTC/USDT", "ke-l")
    assert fake.create_count("ke-l") == 1 and "ke-l" not in fake.orders_by_client_id


REFUSED = [
    pytest.param({"kind": "http", "status": 429}, RateLimited, id="429"),
    pytest.param({"kind": "http", "status": 418}, RateLimited, id="418"),
    pytest.param({"kind": "error", "code": -1021, "msg": "Timestamp for this request is outside of the "
                  "recvWindow."}, ClockSkew, id="-1021"),
]


@pytest.mark.parametrize(("fault", "error"), REFUSED)
@bounded(10)
async def test_order_refused_outright_is_a_temporary_error_not_an_unknown_outcome(
    make: Make, fake: FakeBinance, fault: dict[str, Any], error: type[Exception]
) -> None:
    client = await make(SPOT)
    fake.inject(path="/api/v3/order", method="POST", **fault)
    with pytest.raises(error) as err:
        await client.create_order(buy("ke-r"))
    assert isinstance(err.value, TemporaryError) and not isinstance(err.value, SendOutcomeUnknown)
    assert fake.create_count("ke-r") == 1 and "ke-r" not in fake.orders_by_client_id
    if error is ClockSkew:
        assert fake.calls("/api/v3/time")  # resynced, so the next order can go through
    placed = await client.create_order(buy("ke-r2"))
    assert placed.state is OrderState.FILLED


@bounded(10)
async def test_a_stalled_send_ends_at_the_outer_timeout_as_unknown(make: Make, fake: FakeBinance) -> None:
    clock = SimClock()
    client = await make(SPOT, clock=clock, timeout_seconds=30.0)
    fake.inject("delay", path="/api/v3/order", method="POST", seconds=120.0)
    send = asyncio.ensure_future(client.create_order(buy("ke-stall")))
    await fake.wait_for_request("/api/v3/order", "POST")
    await clock.advance(31.5)
    with pytest.raises(SendOutcomeUnknown):
        await send
    assert fake.create_count("ke-stall") == 1
    assert (await client.fetch_order("BTC/USDT", "ke-stall")).state is OrderState.FILLED


@pytest.mark.parametrize("market", [SPOT, FUT])
@bounded(10)
async def test_duplicate_client_id_answer_returns_the_order_already_placed(
    make: Make, fake: FakeBinance, market: MarketType
) -> None:
    client = await make(market)
    # The exchange takes the order, then answers "duplicate" (an earlier send had arrived).
    fake.inject("duplicate", path="/order", method="POST")
    update = await client.create_order(buy("ke-d", amount="0.002"))
    assert update.client_order_id == "ke-d" and update.state is OrderState.FILLED
    assert [f.amount for f in update.fills] == [Decimal("0.002")]
    assert fake.create_count("ke-d") == 1 and len(fake.orders) == 1


@pytest.mark.parametrize("market", [SPOT, FUT])
@bounded(10)
async def test_resending_a_placed_client_id_after_a_restart_does_not_create_a_second_order(
    make: Make, fake: FakeBinance, market: MarketType
) -> None:
    first = await make(market)
    original = await first.create_order(buy("ke-twice", amount="0.002"))
    restarted = await make(market)
    again = await restarted.create_order(buy("ke-twice", amount="0.002"))
    assert again.exchange_order_id == original.exchange_order_id
    assert [o.client_order_id for o in fake.orders.values()] == ["ke-twice"]


@bounded(10)
async def test_partial_fill_of_a_market_order_reports_what_executed(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT)
    fake.inject("partial", path="/api/v3/order", method="POST", ratio="0.4")
    update = await client.create_order(buy("ke-p", amount="0.01"))
    assert update.state is OrderState.CANCELED  # the rest expired
    assert update.filled == Decimal("0.004") and sum(f.amount for f in update.fills) == Decimal("0.004")


@bounded(10)
async def test_partial_fill_of_a_futures_order_brings_its_fills(make: Make, fake: FakeBinance) -> None:
    client = await make(FUT)
    fake.inject("partial", path="/fapi/v1/order", method="POST", ratio="0.5")
    update = await client.create_order(buy("kf-p", amount="0.004"))
    assert update.filled == Decimal("0.002") and [f.amount for f in update.fills] == [Decimal("0.002")]


@pytest.mark.parametrize("market", [SPOT, FUT])
@bounded(10)
async def test_insufficient_funds_is_its_own_kind_and_places_nothing(
    make: Make, fake: FakeBinance, market: MarketType
) -> None:
    client = await make(market)
    # 1 BTC is 60 000 USDT; the account holds 10 000 (futures at the default 20x would pass, so 200 BTC).
    with pytest.raises(InsufficientFunds):
        await client.create_order(buy("ke-big", amount="1" if market is SPOT else "200"))
    assert fake.orders == {} and fake.create_count("ke-big") == 1


@bounded(10)
async def test_exchange_rejections_are_order_rejected(make: Make, fake: FakeBinance) -> None:
    client = await make(FUT)
    # A reduce-only order with nothing to reduce.
    with pytest.raises(OrderRejected) as err:
        await client.create_order(OrderRequest("kf-ro", "BTC/USDT", Side.SELL, OrderType.MARKET,
                                               Decimal("0.002"), reduce_only=True))
    assert "-2022" in str(err.value)


@bounded(10)
async def test_cancel_whose_answer_is_lost_is_retried_and_reports_the_cancelled_order(
    make: Make, fake: FakeBinance
) -> None:
    client = await make(SPOT)
    await client.create_order(OrderRequest("ke-c", "ETH/USDT", Side.BUY, OrderType.LIMIT, Decimal("0.1"),
                                           price=Decimal("2000")))
    fake.inject("delay", path="/api/v3/order", method="DELETE", seconds=3.0)
    update = await client.cancel_order("ETH/USDT", "ke-c")
    assert update.state is OrderState.CANCELED and update.client_order_id == "ke-c"
    assert len(fake.calls("/api/v3/order", "DELETE")) == 2


@bounded(10)
async def test_secrets_and_signatures_never_reach_error_messages(make: Make, fake: FakeBinance) -> None:
    client = await make(SPOT, max_retries=0)
    messages = []
    for fault in ({"kind": "http", "status": 503}, {"kind": "delay", "seconds": 3.0},
                  {"kind": "error", "code": -1121, "msg": "Invalid symbol."}):
        fake.inject(path="/api/v3/account", **fault)
        with pytest.raises(Exception) as err:
            await client.fetch_balance()
        messages.append(str(err.value))
    fake.inject("http", path="/api/v3/order", method="POST", status=502)
    with pytest.raises(SendOutcomeUnknown) as err:
        await client.create_order(buy("ke-s"))
    messages.append(str(err.value))
    signatures = [r.params.get("signature", "") for r in fake.requests] + [
        r.params["signature"] for r in fake.requests if "signature" in r.params]
    for text in messages:
        assert API_KEY not in text and API_SECRET not in text
        assert not any(sig and sig in text for sig in signatures)
    assert any("signature=***" in m for m in messages)  # the URL is kept, its signature is not


def _transport_failure() -> Exception:
    try:
        try:
            raise aiohttp.ClientPayloadError("Response payload is not completed")
        except aiohttp.ClientError as cause:
            raise ccxt.ExchangeError("binance POST http://127.0.0.1/api/v3/order") from cause
    except ccxt.ExchangeError as exc:
        return exc


TRANSLATIONS = [
    (ccxt.RequestTimeout("binance GET /api/v3/account"), TemporaryError),
    (ccxt.ExchangeNotAvailable("binance 503"), TemporaryError),
    (ccxt.OnMaintenance("binance system maintenance"), TemporaryError),
    (ccxt.NetworkError("reset"), TemporaryError),
    (ccxt.DDoSProtection("binance 429"), RateLimited),
    (ccxt.RateLimitExceeded('binance {"code":-1003}'), RateLimited),
    (ccxt.InvalidNonce('binance {"code":-1021}'), ClockSkew),
    (ccxt.BadResponse("not json"), MalformedResponse),
    (TimeoutError(), TemporaryError),
    (ccxt.OrderNotFound('binance {"code":-2013}'), OrderNotFound),
    (ccxt.InsufficientFunds('binance {"code":-2010,"msg":"Account has insufficient balance"}'), InsufficientFunds),
    (ccxt.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}'), DuplicateClientOrderId),
    (ccxt.InvalidOrder('binance {"code":-1013,"msg":"Filter failure: LOT_SIZE"}'), OrderRejected),
    (ccxt.ExchangeError('binanceusdm {"code": -4116, "msg": "ClientOrderId is duplicated."}'), DuplicateClientOrderId),
    (ccxt.ExchangeError('binanceusdm {"code": -2019, "msg": "Margin is insufficient."}'), InsufficientFunds),
    (ccxt.ExchangeError('binanceusdm {"code": -2022, "msg": "ReduceOnly Order is rejected."}'), OrderRejected),
    (ccxt.BadSymbol('binance {"code":-1121,"msg":"Invalid symbol."}'), DependencyError),
    (ccxt.BadRequest('binance {"code":-1100,"msg":"Illegal characters"}'), DependencyError),
    (ccxt.AuthenticationError('binance {"code":-2015}'), OperationalError),
    (ccxt.PermissionDenied("no trading permission"), OperationalError),
    (ccxt.AccountSuspended("account suspended"), OperationalError),
    (ccxt.ExchangeError('binance {"code":-9999,"msg":"something new"}'), DependencyError),
]


@pytest.mark.parametrize(("exc", "kind"), TRANSLATIONS, ids=lambda v: type(v).__name__)
def test_translate_sorts_ccxt_errors_by_what_to_do(exc: Exception, kind: type[Exception]) -> None:
    translated = translate(exc)
    assert type(translated) is kind
    assert str(exc) in str(translated)  # the exchange's own words are kept


def test_translate_treats_a_connection_broken_mid_answer_as_temporary() -> None:
    assert type(translate(_transport_failure())) is TemporaryError


def test_translate_never_carries_keys_or_signatures() -> None:
    exc = ccxt.RequestTimeout(
        f"binance GET http://x/api/v3/account?timestamp=1&signature={'ab12' * 16} key={API_KEY} {API_SECRET}"
    )
    text = str(translate(exc, secrets=(API_KEY, API_SECRET)))
    assert "ab12ab12" not in text and API_KEY not in text and API_SECRET not in text
    assert "signature=***" in text
