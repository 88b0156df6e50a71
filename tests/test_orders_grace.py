"""The order path's two answers to a send without a fill: "unknown" and "refused".

A send with no clear answer (timeout, 5xx, dropped connection, garbage) may have placed the order, so it
is resolved by client order id, and declared never placed only after ORDER_UNKNOWN_GRACE_SECONDS of
"not found". A send Binance refused before doing anything (429/418/-1003 rate limits, -1021 timestamp
outside recvWindow) placed nothing: it is rejected at once, never looked for and never resent, so the
engine's trade lock is not held through the grace period and its capital reservation comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import Settings, load_settings
from core.clock import LiveClock, SimClock, settle
from core.errors import ConfigError, OrderNotFound, TemporaryError
from core.events import EventBus, OrderRejectedByExchange
from core.types import Fill, MarketType, Order, OrderIntent, OrderState, OrderType, Side
from engines.base import EngineContext
from engines.orchestrator import Orchestrator
from engines.spot import SpotEngine
from exchange.base import OrderRequest, OrderUpdate
from exchange.ccxt_client import CcxtExchange
from exchange.errors import ClockSkew, MalformedResponse, RateLimited, SendOutcomeUnknown
from exchange.orders import FillOutcome, OrderManager, SubmitResult
from monitoring.health import HealthMonitor
from risk.allocator import CapitalAllocator
from risk.gate import EngineLimits, RiskGate
from risk.monitor import GlobalRiskMonitor, RiskLimits
from storage.ledger import Ledger
from tests.fakes.binance import API_KEY, API_SECRET, FakeBinance

SYMBOL = "BTC/USDT"
BOUND = 10.0  # seconds of real time any one test may take; a stuck resolution fails instead of hanging

Outcome = OrderUpdate | BaseException


def filled(request_or_cid: OrderRequest | str, amount: str = "0.01") -> OrderUpdate:
    cid = request_or_cid if isinstance(request_or_cid, str) else request_or_cid.client_order_id
    return OrderUpdate(
        client_order_id=cid, exchange_order_id="9001", symbol=SYMBOL, side=Side.BUY,
        order_type=OrderType.MARKET, amount=Decimal(amount), filled=Decimal(amount), avg_price=None,
        state=OrderState.FILLED, ts=0.0,
    )


@dataclass
class ScriptedExchange:
    """An exchange whose answers the test writes down in advance. `create` is consumed one entry per
    send (an exception is raised, an update returned); `fetch` likewise per lookup, its last entry
    repeating. Every call is counted, so a test can prove what was (not) asked."""

    create: list[Callable[[OrderRequest], Outcome]] = field(default_factory=list)
    fetch: list[Callable[[str], Outcome]] = field(default_factory=list)
    creates: list[str] = field(default_factory=list)
    fetches: list[str] = field(default_factory=list)

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        self.creates.append(request.client_order_id)
        outcome = self.create.pop(0)(request)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        self.fetches.append(client_order_id)
        step = self.fetch[0] if len(self.fetch) == 1 else self.fetch.pop(0)
        outcome = step(client_order_id)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def cancel_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        raise AssertionError("nothing here cancels")


def raises(exc: BaseException) -> Callable[[Any], Outcome]:
    return lambda _: exc


def intent(amount: str = "0.01") -> OrderIntent:
    return OrderIntent(engine="spot", market=MarketType.SPOT, symbol=SYMBOL, side=Side.BUY,
                       amount=Decimal(amount), price=Decimal("60000"),
                       notional=Decimal(amount) * Decimal("60000"))


class MemoryStore:
    """The ledger's order side in memory, without the ledger's worker thread: a SimClock test then
    decides alone when time moves, and no ledger call is half-way while it does."""

    def __init__(self) -> None:
        self.orders: dict[str, Order] = {}
        self._seq = 0

    async def insert_order(self, order: Order) -> None:
        self.orders[order.client_order_id] = dataclasses.replace(order)

    def log_order(self, order: Order) -> None:
        """No intent log here: the order manager inserts and waits, as it must without one."""
        return None

    async def update_order(
        self, client_order_id: str, *, state: OrderState, filled: Decimal | None = None,
        avg_price: Decimal | None = None, exchange_order_id: str | None = None,
    ) -> None:
        row = self.orders[client_order_id]
        row.state = state
        row.filled = filled if filled is not None else row.filled
        row.avg_price = avg_price if avg_price is not None else row.avg_price
        row.exchange_order_id = exchange_order_id or row.exchange_order_id

    async def get_order(self, client_order_id: str) -> Order | None:
        row = self.orders.get(client_order_id)
        return dataclasses.replace(row) if row is not None else None

    async def orders_in_states(self, states: Iterable[OrderState], engine: str | None = None) -> list[Order]:
        wanted = set(states)
        return [o for o in self.orders.values() if o.state in wanted and engine in (None, o.engine)]

    async def record_fill(self, fill: Fill, *, leverage: int = 1) -> FillOutcome:
        raise AssertionError("the scripted exchange reports no fills; fills are the ledger tests' business")

    async def next_sequence(self, name: str) -> int:
        self._seq += 1
        return self._seq


@dataclass
class Rig:
    clock: Any  # SimClock or LiveClock
    store: Any  # MemoryStore or Ledger
    bus: EventBus
    rejections: list[OrderRejectedByExchange]

    def manager(self, exchange: Any, **kw: Any) -> OrderManager:
        om = OrderManager("spot", exchange, self.store, self.bus, self.clock, boot_stamp=1, **kw)
        original = self.bus.publish

        def publish(event: Any) -> None:
            if isinstance(event, OrderRejectedByExchange):
                self.rejections.append(event)
            original(event)

        self.bus.publish = publish  # type: ignore[method-assign]
        return om


@pytest.fixture
def rig() -> Rig:
    return Rig(SimClock(), MemoryStore(), EventBus(), [])


@pytest.fixture
async def ledger_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The real ledger on a SimClock that no one advances: for paths that must not wait at all."""
    clock = SimClock()
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    try:
        yield Rig(clock, ledger, EventBus(), [])
    finally:
        await ledger.close()


@pytest.fixture
async def live_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The real ledger on real time, for paths that retry and wait (kept short by small settings)."""
    clock = LiveClock()
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    try:
        yield Rig(clock, ledger, EventBus(), [])
    finally:
        await ledger.close()


# --- definite refusals: rejected at once ------------------------------------------------------------------

REFUSALS = [
    pytest.param(RateLimited("DDoSProtection: binance 429 Too Many Requests {\"code\":-1003}"), id="429"),
    pytest.param(RateLimited("DDoSProtection: binance 418 I'm a teapot {\"code\":-1003}"), id="418"),
    pytest.param(ClockSkew("InvalidNonce: binance {\"code\":-1021,\"msg\":\"Timestamp for this request is "
                           "outside of the recvWindow.\"}"), id="-1021"),
]


@pytest.mark.parametrize("refusal", REFUSALS)
async def test_a_refused_send_is_rejected_at_once_without_looking_for_it_or_resending(
    rig: Rig, refusal: TemporaryError
) -> None:
    # Were it treated as unknown, resolution would ask fetch_order and sleep on the SimClock, which no
    # one advances: the bound below would fail the test.
    exchange = ScriptedExchange(create=[raises(refusal)], fetch=[raises(OrderNotFound("unknown order"))])
    om = rig.manager(exchange, unknown_grace_seconds=60)
    started = rig.clock.now()
    async with asyncio.timeout(BOUND):
        result = await om.submit(intent())
    cid = result.order.client_order_id
    assert result.order.state is OrderState.REJECTED
    assert result.error is not None and type(refusal).__name__ in result.error
    assert "-10" in result.error  # the exchange's own code travels with the reason
    assert exchange.creates == [cid] and exchange.fetches == []
    assert rig.clock.now() == started  # no simulated second passed: no grace period was sat out
    stored = await rig.store.get_order(cid)
    assert stored is not None and stored.state is OrderState.REJECTED
    assert [e.client_order_id for e in rig.rejections] == [cid]
    assert type(refusal).__name__ in rig.rejections[0].reason


UNKNOWN = [
    pytest.param(TimeoutError(), id="timeout"),
    pytest.param(SendOutcomeUnknown("order ke: no clear answer (ExchangeNotAvailable 503)"), id="5xx"),
    pytest.param(TemporaryError("create_order: no answer within 11s"), id="no-answer"),
    pytest.param(MalformedResponse("create_order: unexpected answer"), id="malformed"),
]


@pytest.mark.parametrize("failure", UNKNOWN)
async def test_a_send_without_a_clear_answer_is_still_resolved_by_client_id(
    rig: Rig, failure: BaseException
) -> None:
    exchange = ScriptedExchange(create=[raises(failure)], fetch=[filled])
    om = rig.manager(exchange)
    async with asyncio.timeout(BOUND):
        result = await om.submit(intent())
    cid = result.order.client_order_id
    assert result.order.state is OrderState.FILLED and result.error is None
    assert exchange.creates == [cid] and exchange.fetches == [cid]
    assert rig.rejections == []


async def test_a_stalled_send_times_out_and_is_found_on_the_exchange(rig: Rig) -> None:
    """The send timeout on the project clock, not an exception from the exchange: still unknown."""
    gate = asyncio.Event()

    class Stalling(ScriptedExchange):
        async def create_order(self, request: OrderRequest) -> OrderUpdate:
            self.creates.append(request.client_order_id)
            await gate.wait()
            raise AssertionError("never answers")

    exchange = Stalling(fetch=[filled])
    om = rig.manager(exchange, send_timeout=5.0)
    async with asyncio.timeout(BOUND):
        task = asyncio.ensure_future(om.submit(intent()))
        await settle()
        assert len(exchange.creates) == 1 and not task.done()
        await rig.clock.advance(5.0)
        result = await task
    assert result.order.state is OrderState.FILLED
    assert exchange.creates == exchange.fetches == [result.order.client_order_id]


# --- the grace period is the setting ----------------------------------------------------------------------

async def _first_moment_rejected(rig: Rig, grace: float) -> tuple[SubmitResult, float, list[str]]:
    """Submit into an exchange that never heard of the order, walk the SimClock forward a second at a
    time, and return when (relative to the send) the order was declared never placed."""
    exchange = ScriptedExchange(create=[raises(TimeoutError())], fetch=[raises(OrderNotFound("unknown"))])
    om = rig.manager(exchange, unknown_grace_seconds=grace)
    started = rig.clock.now()
    async with asyncio.timeout(BOUND):
        task = asyncio.ensure_future(om.submit(intent()))
        for _ in range(int(grace) + 60):
            await rig.clock.advance(1.0)
            if task.done():
                break
            assert (await rig.store.orders_in_states([OrderState.UNKNOWN]))  # unknown while waiting
        result = await task
    assert len(rig.rejections) == 1
    return result, rig.rejections[0].ts - started, exchange.creates


@pytest.mark.parametrize("grace", [3.0, 15.0, 45.0])
async def test_not_found_is_trusted_only_after_the_configured_grace(rig: Rig, grace: float) -> None:
    settings = load_settings(env_file=None, order_unknown_grace_seconds=grace)
    result, after, creates = await _first_moment_rejected(rig, settings.order_unknown_grace_seconds)
    assert result.order.state is OrderState.REJECTED and result.error == "never reached the exchange"
    # Never before the grace, and no later than one lookup interval (backoff caps at 5 s) after it.
    assert grace <= after <= grace + 5.0
    assert creates == [result.order.client_order_id]  # asked about, never sent again


async def test_the_orchestrator_hands_the_setting_to_every_order_manager(tmp_path: Path) -> None:
    settings = load_settings(env_file=None, data_dir=tmp_path, order_unknown_grace_seconds=42)
    clock = SimClock()
    orch = Orchestrator(settings, clock)
    orch.ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    try:
        orch._add_engine_parts("spot", ScriptedExchange())  # type: ignore[arg-type]
        om = orch.parts["spot"].orders
        assert om.unknown_grace_seconds == 42
        assert om.max_resolve_seconds == max(4 * 42, 120.0)
    finally:
        await orch.ledger.close()


def test_the_grace_setting_defaults_to_15_seconds() -> None:
    assert Settings.model_fields["order_unknown_grace_seconds"].default == 15.0
    assert load_settings(env_file=None).order_unknown_grace_seconds == 15.0


@pytest.mark.parametrize("value", ["0", "0.5", "600.5", "3600", "-1", "soon"])
def test_an_out_of_range_grace_is_refused_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.delenv("ORDER_UNKNOWN_GRACE_SECONDS", raising=False)
    env = tmp_path / ".env"
    env.write_text(f"ORDER_UNKNOWN_GRACE_SECONDS={value}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env_file=env)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("ORDER_UNKNOWN_GRACE_SECONDS: ")
    assert value in err.value.problems[0]


@pytest.mark.parametrize("value", ["1", "600", "7.5"])
def test_the_grace_range_ends_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ORDER_UNKNOWN_GRACE_SECONDS", value)
    assert load_settings(env_file=None).order_unknown_grace_seconds == float(value)



# --- through the engine: the reservation comes back, the lock is free -------------------------------------

async def test_an_engine_whose_order_is_refused_gets_its_reservation_back_and_trades_on(
    ledger_rig: Rig, tmp_path: Path
) -> None:
    rig = ledger_rig
    settings = load_settings(env_file=None, data_dir=tmp_path)
    allocator = CapitalAllocator({"spot": 100.0}, ["spot"])
    reserved_during_send: list[Decimal] = []

    def refuse(request: OrderRequest) -> Outcome:
        reserved_during_send.append(allocator.reserved("spot"))
        return RateLimited('DDoSProtection: binance 429 Too Many Requests {"code":-1003}')

    exchange = ScriptedExchange(create=[refuse, filled], fetch=[raises(OrderNotFound("unknown"))])
    om = rig.manager(exchange, unknown_grace_seconds=60)
    monitor = GlobalRiskMonitor(RiskLimits.from_settings(settings))
    monitor.update(rig.clock.now(), {"spot": Decimal(10_000)})
    gate = RiskGate(monitor, allocator, {"spot": EngineLimits(max_positions=3)})
    health = HealthMonitor(rig.clock, 60, 300)
    health.register("spot")
    ctx = EngineContext(name="spot", settings=settings, clock=rig.clock, bus=rig.bus, ledger=rig.store,
                        exchange=exchange, feed=None, gate=gate, allocator=allocator,  # type: ignore[arg-type]
                        health=health, orders=om, equity=lambda: Decimal(10_000))
    engine = SpotEngine(ctx)
    async with asyncio.timeout(BOUND):
        refused = await engine.trade(intent())
        assert refused is not None and refused.order.state is OrderState.REJECTED
        assert reserved_during_send == [Decimal("600")]  # the gate did reserve for the send ...
        assert allocator.reserved("spot") == 0 and allocator.open_reservations("spot") == 0  # ... and it is back
        assert engine.counters.rejected == 1 and not ctx.trade_lock.locked()
        placed = await engine.trade(intent())
    assert placed is not None and placed.order.state is OrderState.FILLED
    assert exchange.fetches == [] and len(exchange.creates) == 2
    assert exchange.creates[0] != exchange.creates[1]  # a new order, not the refused one resent
    assert allocator.reserved("spot") == 0


# --- the real ccxt client against the loopback fake ---------------------------------------------------------

@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance() as server:
        yield server


@pytest.fixture
async def clients() -> AsyncIterator[list[CcxtExchange]]:
    made: list[CcxtExchange] = []
    yield made
    for client in made:
        await client.close()


async def real_client(fake: FakeBinance, rig: Rig, made: list[CcxtExchange],
                      market: MarketType = MarketType.SPOT) -> CcxtExchange:
    client = CcxtExchange(market, rig.clock, api_key=API_KEY, api_secret=API_SECRET, mode="testnet",
                          timeout_seconds=2.0, urls_override=fake.url, max_retries=2,
                          backoff_base_seconds=0.01, backoff_max_seconds=0.02, rng=random.Random(5))
    made.append(client)
    await client.load_markets()
    return client


def real_intent(market: MarketType = MarketType.SPOT, amount: str = "0.002") -> OrderIntent:
    return OrderIntent(engine="spot", market=market, symbol=SYMBOL, side=Side.BUY, amount=Decimal(amount),
                       price=Decimal("60000"))


@pytest.mark.parametrize("status", [429, 418])
@pytest.mark.parametrize("market", [MarketType.SPOT, MarketType.FUTURES])
async def test_real_client_rate_limited_order_is_rejected_at_once_and_not_on_the_book(
    ledger_rig: Rig, fake: FakeBinance, clients: list[CcxtExchange], status: int, market: MarketType
) -> None:
    rig = ledger_rig
    client = await real_client(fake, rig, clients, market)
    om = rig.manager(client, unknown_grace_seconds=60, send_timeout=5.0)
    started = rig.clock.now()
    fake.inject("http", path="/order", method="POST", status=status)
    async with asyncio.timeout(BOUND):
        result = await om.submit(real_intent(market))
    cid = result.order.client_order_id
    assert result.order.state is OrderState.REJECTED
    assert result.error is not None and "RateLimited" in result.error and str(status) in result.error
    assert fake.create_count(cid) == 1 and cid not in fake.orders_by_client_id
    assert fake.calls("/order", "GET") == []  # never looked for: there is nothing to find
    assert rig.clock.now() == started
    stored = await rig.store.get_order(cid)
    assert stored is not None and stored.state is OrderState.REJECTED


async def test_real_client_clock_skew_rejects_the_order_resyncs_and_the_next_order_fills(
    ledger_rig: Rig, fake: FakeBinance, clients: list[CcxtExchange]
) -> None:
    """A real -1021: the fake's clock runs a minute behind ours, so our first signed request is outside
    recvWindow. The order is rejected without being resent; the client measured the offset again, so
    the engine's next order goes through."""
    rig = ledger_rig
    client = await real_client(fake, rig, clients)
    om = rig.manager(client, unknown_grace_seconds=60, send_timeout=5.0)
    fake.server_time_offset_ms = -60_000
    started = rig.clock.now()
    async with asyncio.timeout(BOUND):
        refused = await om.submit(real_intent())
        first = refused.order.client_order_id
        assert refused.order.state is OrderState.REJECTED
        assert refused.error is not None and "ClockSkew" in refused.error and "-1021" in refused.error
        assert fake.create_count(first) == 1 and first not in fake.orders_by_client_id
        assert fake.calls("/api/v3/order", "GET") == []
        assert fake.calls("/api/v3/time")  # the offset was measured again
        assert rig.clock.now() == started
        placed = await om.submit(real_intent())
    second = placed.order.client_order_id
    assert placed.order.state is OrderState.FILLED and placed.filled == Decimal("0.002")
    assert fake.orders_by_client_id[second].status == "FILLED"
    assert fake.create_count(first) == 1 and first not in fake.orders_by_client_id  # never resent
    stored = await rig.store.get_order(first)
    assert stored is not None and stored.state is OrderState.REJECTED


UNCLEAR = [
    pytest.param({"kind": "http", "status": 503}, OrderState.REJECTED, id="503-not-placed"),
    pytest.param({"kind": "http", "status": 502}, OrderState.REJECTED, id="502-not-placed"),
    pytest.param({"kind": "drop"}, OrderState.FILLED, id="connection-dropped-after-placing"),
    pytest.param({"kind": "malformed"}, OrderState.FILLED, id="garbage-after-placing"),
]


@pytest.mark.parametrize(("fault", "state"), UNCLEAR)
async def test_real_client_unclear_answer_is_looked_up_before_it_is_settled(
    live_rig: Rig, fake: FakeBinance, clients: list[CcxtExchange], fault: dict[str, Any], state: OrderState
) -> None:
    """5xx is "execution status unknown" for Binance: never settled without asking. An order that was
    placed is found; one that was not is declared never placed once the (short) grace has passed."""
    rig = live_rig
    client = await real_client(fake, rig, clients)
    om = rig.manager(client, unknown_grace_seconds=1.0, send_timeout=5.0)
    fake.inject(path="/api/v3/order", method="POST", **fault)
    async with asyncio.timeout(BOUND):
        result = await om.submit(real_intent())
    cid = result.order.client_order_id
    assert result.order.state is state
    assert fake.calls("/api/v3/order", "GET")  # asked by client id
    assert fake.create_count(cid) == 1
    if state is OrderState.REJECTED:
        assert result.error == "never reached the exchange" and cid not in fake.orders_by_client_id


async def test_real_client_duplicate_answer_then_rate_limited_readback_is_unknown_not_refused(
    live_rig: Rig, fake: FakeBinance, clients: list[CcxtExchange]
) -> None:
    """The exchange took the order and answered "duplicate"; reading it back is then rate limited past
    the client's retries. The order exists, so this must not pass for a refusal of the send: it stays
    unknown and is found by the resolution that follows."""
    rig = live_rig
    client = await real_client(fake, rig, clients)
    om = rig.manager(client, unknown_grace_seconds=1.0, send_timeout=5.0)
    fake.inject("duplicate", path="/api/v3/order", method="POST")
    fake.inject("http", path="/api/v3/order", method="GET", status=429, count=3)  # 1 try + 2 retries
    async with asyncio.timeout(BOUND):
        result = await om.submit(real_intent())
    cid = result.order.client_order_id
    assert result.order.state is OrderState.FILLED and rig.rejections == []
    assert fake.create_count(cid) == 1
    assert len(fake.calls("/api/v3/order", "GET")) >= 4  # three refused read-backs, then the lookup


class StallsThenShows(ScriptedExchange):
    """The send never answers; the order shows on the exchange, filled, from `visible_at` on."""

    def __init__(self, clock: SimClock, visible_at: float) -> None:
        super().__init__()
        self.clock = clock
        self.visible_at = visible_at
        self.never = asyncio.Event()

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        self.creates.append(request.client_order_id)
        await self.never.wait()
        raise AssertionError("the send never answers")

    async def fetch_order(self, symbol: str, client_order_id: str) -> OrderUpdate:
        self.fetches.append(client_order_id)
        if self.clock.now() < self.visible_at:
            raise OrderNotFound("unknown order")
        return filled(client_order_id)


@pytest.mark.parametrize(("send_timeout", "grace", "shows_after_timeout"), [
    (10.0, 15.0, 8.0),  # the defaults
    (20.0, 15.0, 1.0),  # a send timeout longer than the grace
])
async def test_the_grace_after_a_send_timeout_counts_from_the_timeout(
        rig: Rig, send_timeout: float, grace: float, shows_after_timeout: float) -> None:
    """The grace is how long an order may stay 'not found' once its send's outcome is unknown; counted
    from the order's creation, the send timeout used it up, and an order that showed within it was
    declared never placed (its fill then missing from the ledger until the next start)."""
    start = rig.clock.now()
    exchange = StallsThenShows(rig.clock, start + send_timeout + shows_after_timeout)
    om = rig.manager(exchange, send_timeout=send_timeout, unknown_grace_seconds=grace)
    async with asyncio.timeout(10):
        task = asyncio.ensure_future(om.submit(intent()))
        await settle()
        for _ in range(int(send_timeout + grace + 30)):
            await rig.clock.advance(1.0)
            if task.done():
                break
        result = await task
    assert result.order.state is OrderState.FILLED, result.error
    stored = await rig.store.get_order(result.order.client_order_id)
    assert stored is not None and stored.state is OrderState.FILLED
    assert exchange.creates == [result.order.client_order_id]  # sent once, never again


# --- an unknown order the send gave up on is asked about by the order poll ---------------------------------

async def _gave_up(rig: Rig, exchange: ScriptedExchange) -> tuple[OrderManager, str]:
    """A send with no answer whose resolution gave up: the exchange did not answer for longer than
    `max_resolve_seconds`. The order stays UNKNOWN in the ledger."""
    om = rig.manager(exchange, unknown_grace_seconds=15.0)
    om.max_resolve_seconds = 20.0
    async with asyncio.timeout(BOUND):
        task = asyncio.ensure_future(om.submit(intent()))
        for _ in range(60):
            await rig.clock.advance(1.0)
            if task.done():
                break
        result = await task
    assert result.order.state is OrderState.UNKNOWN and result.error is not None
    return om, result.order.client_order_id


async def test_the_order_poll_settles_an_unknown_order_the_exchange_has(rig: Rig) -> None:
    down = raises(TemporaryError("503 (test)"))
    exchange = ScriptedExchange(create=[raises(TimeoutError())], fetch=[down])
    om, cid = await _gave_up(rig, exchange)
    exchange.fetch = [down]
    assert await om.poll_open_orders() == 0  # still down: it stays unknown, and is asked again later
    assert (await rig.store.get_order(cid)).state is OrderState.UNKNOWN
    exchange.fetch = [filled]
    assert await om.poll_open_orders() == 1
    assert (await rig.store.get_order(cid)).state is OrderState.FILLED
    assert exchange.creates == [cid], "asked about, never sent again"


async def test_the_order_poll_declares_an_unknown_order_never_placed_only_after_the_grace(rig: Rig) -> None:
    exchange = ScriptedExchange(create=[raises(TimeoutError())], fetch=[raises(TemporaryError("503 (test)"))])
    om, cid = await _gave_up(rig, exchange)
    order = await rig.store.get_order(cid)
    assert order is not None
    await rig.store.update_order(cid, state=OrderState.UNKNOWN)  # as if it just turned unknown
    rig.store.orders[cid].updated_at = rig.clock.now()
    exchange.fetch = [raises(OrderNotFound("unknown order (test)"))]
    assert await om.poll_open_orders() == 0  # not found within the grace: the exchange may lag
    assert (await rig.store.get_order(cid)).state is OrderState.UNKNOWN
    await rig.clock.advance(15.0)
    assert await om.poll_open_orders() == 1
    assert (await rig.store.get_order(cid)).state is OrderState.REJECTED
    assert [r.client_order_id for r in rig.rejections] == [cid]


async def test_the_order_poll_leaves_an_order_its_send_is_still_resolving(rig: Rig) -> None:
    exchange = ScriptedExchange(create=[raises(TimeoutError())], fetch=[raises(TemporaryError("503 (test)"))])
    om = rig.manager(exchange)
    async with asyncio.timeout(BOUND):
        task = asyncio.ensure_future(om.submit(intent()))
        await rig.clock.advance(1.0)
        [order] = await rig.store.orders_in_states([OrderState.UNKNOWN])
        asked = len(exchange.fetches)
        assert await om.poll_open_orders() == 0
        assert len(exchange.fetches) == asked, "the poll did not ask in parallel with the resolution"
        exchange.fetch = [filled]
        await rig.clock.advance(5.0)
        result = await task
    assert result.order.client_order_id == order.client_order_id and result.order.state is OrderState.FILLED


async def test_the_order_poll_settles_a_pending_row_no_send_holds_after_the_grace(rig: Rig) -> None:
    """A row left PENDING with no send behind it (a send cut off by an error nobody expected) is asked
    about like an unknown one once the grace has passed; a fresh one, or one whose send is still going,
    is not."""
    exchange = ScriptedExchange(fetch=[filled])
    om = rig.manager(exchange)
    now = rig.clock.now()
    stuck = Order("kes1-stuck", "spot", MarketType.SPOT, SYMBOL, Side.BUY, OrderType.MARKET, Decimal("0.01"),
                  None, None, False, OrderState.PENDING, now, now)
    await rig.store.insert_order(stuck)
    assert await om.poll_open_orders() == 0 and exchange.fetches == []  # within the grace: left alone
    await rig.clock.advance(om.unknown_grace_seconds)
    om._sending.add(stuck.client_order_id)
    assert await om.poll_open_orders() == 0 and exchange.fetches == []  # a send still holds it
    om._sending.discard(stuck.client_order_id)
    assert await om.poll_open_orders() == 1
    assert (await rig.store.get_order(stuck.client_order_id)).state is OrderState.FILLED  # type: ignore[union-attr]
