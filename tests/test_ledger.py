"""The ledger keeps what a restart needs, exactly: money round-trips as the same Decimal, position
arithmetic matches the cash that moved, repeats change nothing, and the file survives a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from decimal import ROUND_DOWN, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.clock import LiveClock, SimClock
from core.errors import InvariantError, LedgerVersionError
from core.types import (
    ZERO,
    Fill,
    MarketType,
    Order,
    OrderState,
    OrderType,
    PositionSide,
    Side,
)
from storage.ledger import ClosedTrade, Ledger
from storage.schema import SCHEMA_VERSION

D = Decimal
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
REPO = Path(__file__).resolve().parents[1]


def make_order(cid: str, *, engine: str = "spot", symbol: str = "BTC/USDT", side: Side = Side.BUY,
               amount: str = "1", price: str | None = None, created_at: float = T0) -> Order:
    return Order(
        client_order_id=cid, engine=engine, market=MarketType.SPOT, symbol=symbol, side=side,
        order_type=OrderType.LIMIT if price else OrderType.MARKET, amount=D(amount),
        price=D(price) if price else None, stop_price=None, reduce_only=False, state=OrderState.PENDING,
        created_at=created_at, updated_at=created_at,
    )


def make_fill(cid: str, trade_id: str, side: Side, amount: str | Decimal, price: str | Decimal, *,
              fee: str | Decimal = "0", fee_asset: str = "USDT", engine: str = "spot",
              symbol: str = "BTC/USDT", ts: float = T0) -> Fill:
    return Fill(
        client_order_id=cid, trade_id=trade_id, engine=engine, market=MarketType.SPOT, symbol=symbol,
        side=side, amount=D(amount), price=D(price), fee=D(fee), fee_asset=fee_asset, ts=ts,
    )


@pytest.fixture
def clock() -> SimClock:
    return SimClock(T0)


@pytest.fixture
async def ledger(tmp_path: Path, clock: SimClock) -> AsyncIterator[Ledger]:
    led = await Ledger.open(tmp_path / "data" / "ledger.sqlite3", clock)
    yield led
    await led.close()


# --- orders ---------------------------------------------------------------------------------------


async def test_order_round_trip_keeps_every_decimal_digit(ledger: Ledger) -> None:
    order = make_order("ke-1", amount="0.00012300", price="43210.10")
    order.stop_price = D("1E-8")
    order.leverage = 3
    order.reason = "ema cross"
    await ledger.insert_order(order)
    got = await ledger.get_order("ke-1")
    assert got == order
    assert got is not None
    # Same text, not just numerically equal: trailing zeros and exponents survive.
    assert (str(got.amount), str(got.price), str(got.stop_price)) == ("0.00012300", "43210.10", "1E-8")
    assert await ledger.get_order("nope") is None


async def test_duplicate_order_insert_raises_and_keeps_the_first(ledger: Ledger) -> None:
    await ledger.insert_order(make_order("ke-1", amount="1"))
    with pytest.raises(InvariantError, match="ke-1"):
        await ledger.insert_order(make_order("ke-1", amount="2"))
    got = await ledger.get_order("ke-1")
    assert got is not None and got.amount == D("1")


async def test_an_order_row_is_never_written_into_an_unfinished_transaction(ledger: Ledger) -> None:
    """The order row is one autocommit INSERT: inside an open transaction it would not commit, and the
    order would go out on a row that is not durable. Refused, and nothing shows in the mirror."""
    await ledger._thread.call(ledger._conn.execute, "BEGIN")
    with pytest.raises(InvariantError, match="transaction is still open"):
        await ledger.insert_order(make_order("ke-open"))
    assert await ledger.orders_in_states([OrderState.PENDING]) == []  # the mirror, no ledger call
    await ledger._thread.call(ledger._conn.execute, "ROLLBACK")
    await ledger.insert_order(make_order("ke-open"))
    other = sqlite3.connect(ledger.path)
    try:
        assert other.execute("SELECT COUNT(*) FROM orders WHERE client_order_id = 'ke-open'").fetchone() == (1,)
    finally:
        other.close()


def test_a_failed_commit_is_rolled_back_not_left_open() -> None:
    from storage.ledger import _transaction

    class Conn:
        """Enough of a connection to fail at COMMIT, as a full disk would."""

        def __init__(self) -> None:
            self.statements: list[str] = []
            self.in_transaction = False

        def execute(self, sql: str) -> None:
            self.statements.append(sql)
            if sql.startswith("BEGIN"):
                self.in_transaction = True
            elif sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            elif sql == "ROLLBACK":
                self.in_transaction = False

    conn = Conn()
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        _transaction(conn, lambda: "written", True)  # type: ignore[arg-type]
    assert conn.statements == ["BEGIN IMMEDIATE", "COMMIT", "ROLLBACK"] and not conn.in_transaction


async def test_an_order_row_the_schema_refuses_is_not_called_a_duplicate(ledger: Ledger) -> None:
    order = make_order("ke-bad")
    row = ("ke-bad", None, "spot", "BTC/USDT", "buy", "market", "1", None, None, 0, "pending", T0, T0, "0",
           None, None, None, "")  # engine NULL
    with pytest.raises(InvariantError, match="refused by the ledger") as raised:
        await ledger._thread.call(ledger._insert_order_row, row, order, None)
    assert "duplicate" not in str(raised.value)


async def test_float_money_is_refused(ledger: Ledger) -> None:
    order = make_order("ke-1")
    order.amount = 0.1  # type: ignore[assignment]
    with pytest.raises(InvariantError, match="Decimal"):
        await ledger.insert_order(order)
    assert await ledger.get_order("ke-1") is None


async def test_update_order_changes_only_what_is_given(ledger: Ledger, clock: SimClock) -> None:
    await ledger.insert_order(make_order("ke-1", amount="2"))
    clock.set(T0 + 5)
    await ledger.update_order("ke-1", state=OrderState.OPEN, exchange_order_id="9001")
    await ledger.update_order("ke-1", state=OrderState.PARTIALLY_FILLED, filled=D("0.5"),
                              avg_price=D("100.25"))
    got = await ledger.get_order("ke-1")
    assert got is not None
    assert (got.state, got.filled, got.avg_price, got.exchange_order_id) == (
        OrderState.PARTIALLY_FILLED, D("0.5"), D("100.25"), "9001")
    assert got.updated_at == T0 + 5 and got.created_at == T0
    with pytest.raises(InvariantError, match="ghost"):
        await ledger.update_order("ghost", state=OrderState.CANCELED)


async def test_order_queries(ledger: Ledger) -> None:
    for i, (engine, state) in enumerate([("spot", OrderState.PENDING), ("spot", OrderState.OPEN),
                                          ("futures", OrderState.UNKNOWN), ("spot", OrderState.FILLED)]):
        await ledger.insert_order(make_order(f"o{i}", engine=engine, created_at=T0 + i))
        await ledger.update_order(f"o{i}", state=state)
    live = [OrderState.PENDING, OrderState.OPEN, OrderState.UNKNOWN]
    assert [o.client_order_id for o in await ledger.orders_in_states(live)] == ["o0", "o1", "o2"]
    assert [o.client_order_id for o in await ledger.orders_in_states(live, engine="spot")] == ["o0", "o1"]
    assert await ledger.orders_in_states([]) == []
    assert [o.client_order_id for o in await ledger.recent_orders(2)] == ["o3", "o2"]
    counts = await ledger.order_counts_by_state()
    assert counts["pending"] == counts["open"] == counts["unknown"] == counts["filled"] == 1
    assert counts["canceled"] == 0 and set(counts) == {str(s) for s in OrderState}


# --- fills and positions --------------------------------------------------------------------------


async def test_long_position_adds_at_weighted_entry_reduces_and_closes(ledger: Ledger) -> None:
    await ledger.insert_order(make_order("b1", amount="4"))
    r1 = await ledger.record_fill(make_fill("b1", "t1", Side.BUY, "1", "100", fee="0.1"))
    r2 = await ledger.record_fill(make_fill("b1", "t2", Side.BUY, "3", "200", fee="0.6", ts=T0 + 1))
    assert r1.new and r2.new and r2.realized_pnl == ZERO and r2.closed is None
    pos = r2.position
    assert pos is not None
    assert (pos.side, pos.amount, pos.entry_price, pos.fees, pos.opened_at) == (
        PositionSide.LONG, D("4"), D("175"), D("0.7"), T0)
    order = await ledger.get_order("b1")
    assert order is not None
    assert (order.state, order.filled, order.avg_price) == (OrderState.FILLED, D("4"), D("175"))

    r3 = await ledger.record_fill(make_fill("s1", "t3", Side.SELL, "1", "250", fee="0.25", ts=T0 + 2))
    assert r3.realized_pnl == D("75") and r3.closed is None
    assert r3.position is not None and r3.position.amount == D("3") and r3.position.entry_price == D("175")
    assert await ledger.realized_pnl("spot") == D("75")

    r4 = await ledger.record_fill(make_fill("s2", "t4", Side.SELL, "3", "150", fee="0.45", ts=T0 + 3))
    fees = D("0.1") + D("0.6") + D("0.25") + D("0.45")
    # Gross on this fill: (150 - 175) * 3 = -75; every fee of the trade is charged now.
    assert r4.realized_pnl == D("-75") - fees
    assert r4.position is None
    assert r4.closed == ClosedTrade(
        engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=PositionSide.LONG, amount=D("4"),
        entry_price=D("175"), exit_price=D("175"), realized_pnl=-fees, fees=fees, opened_at=T0,
        closed_at=T0 + 3, leverage=1, close_order_id="s2",
    )
    assert await ledger.positions() == []
    assert await ledger.closed_trades() == [r4.closed]
    cash = D("250") + D("450") - D("100") - D("600") - fees
    assert await ledger.realized_pnl("spot") == cash == r3.realized_pnl + r4.realized_pnl


async def test_short_position_profits_when_price_falls(ledger: Ledger) -> None:
    await ledger.record_fill(make_fill("s", "t1", Side.SELL, "2", "100", fee="0.2"))
    (pos,) = await ledger.positions("spot")
    assert pos.side is PositionSide.SHORT and pos.amount == D("2")
    r = await ledger.record_fill(make_fill("b", "t2", Side.BUY, "2", "90", fee="0.18", ts=T0 + 60))
    assert r.closed is not None and r.closed.side is PositionSide.SHORT
    assert r.realized_pnl == r.closed.realized_pnl == D("20") - D("0.38")


async def test_overshoot_flips_into_the_remainder(ledger: Ledger) -> None:
    await ledger.record_fill(make_fill("b", "t1", Side.BUY, "1", "100", fee="0.1"), leverage=3)
    r = await ledger.record_fill(make_fill("s", "t2", Side.SELL, "3", "110", fee="0.33", ts=T0 + 9),
                                 leverage=5)
    assert r.closed is not None
    assert (r.closed.amount, r.closed.exit_price, r.closed.leverage) == (D("1"), D("110"), 3)
    # The fee is split by amount: a third closes the long, two thirds belong to the new short.
    assert r.closed.realized_pnl == D("10") - D("0.1") - D("0.11")
    pos = r.position
    assert pos is not None
    assert (pos.side, pos.amount, pos.entry_price, pos.fees, pos.opened_at, pos.leverage) == (
        PositionSide.SHORT, D("2"), D("110"), D("0.22"), T0 + 9, 5)
    assert await ledger.positions() == [pos]


async def test_base_asset_fee_on_a_buy_shrinks_the_position(ledger: Ledger) -> None:
    r = await ledger.record_fill(make_fill("b", "t1", Side.BUY, "1", "100", fee="0.001", fee_asset="BTC"))
    assert r.position is not None
    assert (r.position.amount, r.position.entry_price, r.position.fees) == (D("0.999"), D("100"), D("0.1"))
    r2 = await ledger.record_fill(make_fill("s", "t2", Side.SELL, "0.999", "110", fee="0.10989"))
    cash = D("0.999") * 110 - D("100") - D("0.10989")  # paid 100 USDT, got 0.999 BTC, sold it all
    assert r2.closed is not None and r2.closed.realized_pnl == cash == r2.realized_pnl


async def test_repeated_fill_changes_nothing(ledger: Ledger) -> None:
    await ledger.insert_order(make_order("b1", amount="2"))
    fill = make_fill("b1", "t1", Side.BUY, "1", "100", fee="0.1")
    first = await ledger.record_fill(fill)
    again = await ledger.record_fill(fill)
    assert first.new and not again.new
    assert again.realized_pnl == ZERO and again.closed is None and again.position == first.position
    assert len(await ledger.fills()) == 1
    (pos,) = await ledger.positions()
    assert pos.amount == D("1") and pos.fees == D("0.1")
    order = await ledger.get_order("b1")
    assert order is not None and (order.filled, order.state) == (D("1"), OrderState.PARTIALLY_FILLED)


async def test_update_position_levels_and_meta(ledger: Ledger) -> None:
    await ledger.record_fill(make_fill("b", "t1", Side.BUY, "1", "100"))
    assert await ledger.update_position("spot", "BTC/USDT", stop_loss=D("98.5"), take_profit=D("102"),
                                        meta={"trail": "101"})
    assert await ledger.update_position("spot", "BTC/USDT", take_profit=None)  # clears only the target
    (pos,) = await ledger.positions("spot")
    assert (pos.stop_loss, pos.take_profit, pos.meta) == (D("98.5"), None, {"trail": "101"})
    # Adding keeps the levels; the position is the same trade.
    await ledger.record_fill(make_fill("b2", "t2", Side.BUY, "1", "102"))
    (pos,) = await ledger.positions("spot")
    assert pos.stop_loss == D("98.5") and pos.entry_price == D("101")
    assert not await ledger.update_position("spot", "ETH/USDT", stop_loss=D("1"))


async def test_fills_filters_and_order(ledger: Ledger) -> None:
    for i in range(5):
        engine = "spot" if i % 2 == 0 else "futures"
        await ledger.record_fill(make_fill(f"o{i}", "t", Side.BUY, "1", "10", engine=engine, ts=T0 + i))
    assert [f.client_order_id for f in await ledger.fills()] == ["o0", "o1", "o2", "o3", "o4"]
    assert [f.client_order_id for f in await ledger.fills(engine="spot")] == ["o0", "o2", "o4"]
    assert [f.client_order_id for f in await ledger.fills(since=T0 + 3)] == ["o3", "o4"]
    assert [f.client_order_id for f in await ledger.fills(limit=2)] == ["o3", "o4"]
    assert (await ledger.fills(engine="futures"))[0] == make_fill("o1", "t", Side.BUY, "1", "10",
                                                                  engine="futures", ts=T0 + 1)


async def test_realized_pnl_by_utc_day_and_engine(ledger: Ledger) -> None:
    day = 86_400.0
    midnight = T0 - (T0 % day)  # 2023-11-14 00:00 UTC
    trades = [("spot", midnight - 10, "10"), ("spot", midnight + 10, "5"), ("spot", midnight + 20, "-2"),
              ("futures", midnight + 30, "7"), ("spot", midnight - 3 * day, "100")]
    for i, (engine, ts, gain) in enumerate(trades):
        await ledger.record_fill(make_fill(f"b{i}", "t", Side.BUY, "1", "100", engine=engine, ts=ts))
        await ledger.record_fill(make_fill(f"s{i}", "t", Side.SELL, "1", D(100) + D(gain), engine=engine,
                                           ts=ts))
    rows = await ledger.realized_pnl_by_day(2, midnight + 3600)
    assert rows == [("2023-11-13", "spot", D("10"), 1), ("2023-11-14", "futures", D("7"), 1),
                    ("2023-11-14", "spot", D("3"), 2)]
    assert await ledger.realized_pnl("spot") == D("113")
    assert await ledger.realized_pnl() == D("120")
    assert [t.realized_pnl for t in await ledger.closed_trades("spot", limit=2)] == [D("-2"), D("5")]
    with pytest.raises(ValueError):
        await ledger.realized_pnl_by_day(0, midnight)


# Prices with 2 decimals and amounts with 3, like real markets; fees in quote.
_fill_steps = st.lists(
    st.tuples(
        st.sampled_from([Side.BUY, Side.SELL]),
        st.integers(1, 5000).map(lambda n: D(n).scaleb(-3)),
        st.integers(1, 2_000_000).map(lambda n: D(n).scaleb(-2)),
        st.integers(0, 500).map(lambda n: D(n).scaleb(-4)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_fill_steps, last_price=st.integers(1, 2_000_000).map(lambda n: D(n).scaleb(-2)))
def test_round_trip_realized_pnl_equals_cash_pnl(
    steps: list[tuple[Side, Decimal, Decimal, Decimal]], last_price: Decimal
) -> None:
    asyncio.run(_round_trip(steps, last_price))


async def _round_trip(steps: list[tuple[Side, Decimal, Decimal, Decimal]], last_price: Decimal) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with await Ledger.open(Path(tmp) / "l.sqlite3", SimClock(T0)) as ledger:
            net = ZERO  # signed position, from nothing but the fills
            entry = ZERO  # classic weighted-average entry, the oracle for the ledger's cost basis
            fills: list[Fill] = []
            realized = ZERO
            for i, (side, amount, price, fee) in enumerate(steps):
                fill = make_fill(f"o{i}", "t", side, amount, price, fee=fee, ts=T0 + i)
                fills.append(fill)
                result = await ledger.record_fill(fill)
                realized += result.realized_pnl
                signed = amount if side is Side.BUY else -amount
                if net == 0 or (net > 0) == (signed > 0):
                    entry = (abs(net) * entry + amount * price) / (abs(net) + amount)
                elif abs(signed) > abs(net):
                    entry = price
                net += signed
                if net == 0:
                    assert result.position is None
                else:
                    assert result.position is not None
                    assert result.position.amount == abs(net)
                    assert result.position.side is (PositionSide.LONG if net > 0 else PositionSide.SHORT)
                    assert abs(result.position.entry_price - entry) < D("1e-20")
            if net != 0:
                flat = make_fill("flat", "t", Side.SELL if net > 0 else Side.BUY, abs(net), last_price,
                                 ts=T0 + len(steps))
                fills.append(flat)
                realized += (await ledger.record_fill(flat)).realized_pnl
            cash = sum((f.amount * f.price * (1 if f.side is Side.SELL else -1) - f.fee for f in fills), ZERO)
            assert await ledger.positions() == []
            assert abs(realized - cash) < D("1e-20")
            assert abs(await ledger.realized_pnl() - cash) < D("1e-20")
            trades = await ledger.closed_trades(limit=1000)
            assert abs(sum((t.realized_pnl for t in trades), ZERO) - cash) < D("1e-20")
            # Replaying every fill (a reconnect, a restart) is a no-op.
            total = await ledger.realized_pnl()
            for fill in fills:
                assert not (await ledger.record_fill(fill)).new
            assert await ledger.realized_pnl() == total
            assert len(await ledger.closed_trades(limit=1000)) == len(trades)
            assert len(await ledger.fills()) == len(fills)


async def test_a_cash_breakeven_round_trip_with_a_partial_close_is_exactly_zero(tmp_path: Path) -> None:
    """Buy 1 @ 100 and 2 @ 101 (302 paid), sell 0.002 @ 95.67 and 2.998 @ 100.67 (302 received): the
    partial close's share of the cost is rounded, and a 40-digit running balance used to leave
    -3.33E-38 behind, a "loss" in the trade metrics (whose profit factor then could not be computed)."""
    steps = [(Side.BUY, "1", "100"), (Side.BUY, "2", "101"), (Side.SELL, "0.002", "95.67"),
             (Side.SELL, "2.998", "100.67")]
    async with await Ledger.open(tmp_path / "l.sqlite3", SimClock(T0)) as ledger:
        per_fill = [(await ledger.record_fill(make_fill(f"o{i}", f"t{i}", side, amount, price, ts=T0 + i))).realized_pnl
                    for i, (side, amount, price) in enumerate(steps)]
        [trade] = await ledger.closed_trades()
        assert trade.realized_pnl == 0
        assert per_fill[2].copy_negate() == per_fill[3] != 0  # the partial's share, and the rest of the total
        assert await ledger.realized_pnl() == 0


_exact_round_trip = st.tuples(
    st.lists(st.tuples(st.integers(1, 5000).map(lambda n: D(n).scaleb(-3)),
                       st.integers(1, 2_000_000).map(lambda n: D(n).scaleb(-2))), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(1, 1000), st.integers(1, 2_000_000).map(lambda n: D(n).scaleb(-2)),
                       st.integers(0, 500).map(lambda n: D(n).scaleb(-4))), min_size=1, max_size=6),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trip=_exact_round_trip)
def test_a_round_trip_without_a_flip_realizes_its_cash_pnl_exactly(
    trip: tuple[list[tuple[Decimal, Decimal]], list[tuple[int, Decimal, Decimal]]]
) -> None:
    """Entries, then exits in parts (weights of the whole) that close it: the trade's realized P&L is
    the cash it made, to the last digit, whatever the partial closes' rounded shares of the cost."""
    asyncio.run(_exact_trip(*trip))


async def _exact_trip(buys: list[tuple[Decimal, Decimal]], sells: list[tuple[int, Decimal, Decimal]]) -> None:
    held = sum((a for a, _ in buys), ZERO)
    weights = sum(w for w, _, _ in sells)
    amounts = [(held * w / weights).quantize(D("0.000001"), rounding=ROUND_DOWN) for w, _, _ in sells[:-1]]
    amounts.append(held - sum(amounts, ZERO))
    if any(a <= 0 for a in amounts):
        return
    fills = [make_fill(f"b{i}", f"tb{i}", Side.BUY, a, p, ts=T0 + i) for i, (a, p) in enumerate(buys)]
    fills += [make_fill(f"s{i}", f"ts{i}", Side.SELL, a, p, fee=f, ts=T0 + 100 + i)
              for i, (a, (_, p, f)) in enumerate(zip(amounts, sells, strict=True))]
    with tempfile.TemporaryDirectory() as tmp:
        async with await Ledger.open(Path(tmp) / "l.sqlite3", SimClock(T0)) as ledger:
            for fill in fills:
                await ledger.record_fill(fill)
            [trade] = await ledger.closed_trades()
    with localcontext(prec=100):
        cash = sum((f.amount * f.price * (1 if f.side is Side.SELL else -1) - f.fee for f in fills), ZERO)
    assert trade.realized_pnl == cash


# --- state, sequences, journal ---------------------------------------------------------------------


async def test_state_round_trip(ledger: Ledger) -> None:
    assert await ledger.get_state("risk") is None
    value = {"state": "reducing", "peak_equity": "10432.10", "until": 1.5, "paused": {"spot": True}}
    await ledger.set_state("risk", value)
    assert await ledger.get_state("risk") == value
    await ledger.set_state("risk", {"state": "active"})
    assert await ledger.get_state("risk") == {"state": "active"}
    with pytest.raises(TypeError, match="Decimal"):
        await ledger.set_state("risk", {"peak_equity": D("1")})
    assert await ledger.get_state("risk") == {"state": "active"}


async def test_sequences_are_atomic_and_per_name(ledger: Ledger) -> None:
    got = await asyncio.gather(*[ledger.next_sequence("coid:spot") for _ in range(200)])
    assert sorted(got) == list(range(1, 201))
    assert await ledger.next_sequence("coid:futures") == 1


async def test_journal_appends_and_refuses_update_and_delete(ledger: Ledger) -> None:
    await ledger.journal("OrderPlaced", {"amount": "1.5", "side": Side.BUY}, T0)
    await ledger.journal_many([("OrderFilled", {"price": D("100.10")}, T0 + 1),
                               ("OrderPlaced", {"nested": {"pnl": D("-2")}}, T0 + 2)])
    rows = await ledger.read_journal()
    assert [(r["kind"], r["ts"]) for r in rows] == [("OrderPlaced", T0 + 2), ("OrderFilled", T0 + 1),
                                                    ("OrderPlaced", T0)]
    assert rows[0]["payload"] == {"nested": {"pnl": "-2"}}
    assert rows[2]["payload"] == {"amount": "1.5", "side": "buy"}
    assert [r["ts"] for r in await ledger.read_journal("OrderPlaced", limit=1)] == [T0 + 2]

    raw = sqlite3.connect(ledger.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("UPDATE journal SET kind = 'x'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM journal")
        raw.rollback()
    finally:
        raw.close()
    assert len(await ledger.read_journal()) == 3


# --- file lifecycle -------------------------------------------------------------------------------


async def test_new_file_is_wal_with_current_version(ledger: Ledger) -> None:
    raw = sqlite3.connect(ledger.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


async def test_newer_schema_is_refused_and_the_file_left_alone(tmp_path: Path, clock: SimClock) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with await Ledger.open(path, clock) as ledger:
        await ledger.set_state("k", {"v": 1})
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    before = path.read_bytes()
    with pytest.raises(LedgerVersionError) as err:
        await Ledger.open(path, clock)
    message = str(err.value)
    assert str(path) in message and f"version {SCHEMA_VERSION + 1}" in message
    assert f"up to version {SCHEMA_VERSION}" in message
    assert path.read_bytes() == before


async def test_reopen_after_close_resumes_everything(tmp_path: Path, clock: SimClock) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path, clock, synchronous="FULL")
    await ledger.insert_order(make_order("b1", amount="2"))
    await ledger.record_fill(make_fill("b1", "t1", Side.BUY, "2", "100.5", fee="0.201"))
    await ledger.update_position("spot", "BTC/USDT", stop_loss=D("99"), meta={"k": "v"})
    await ledger.record_fill(make_fill("e1", "t1", Side.BUY, "1", "10", symbol="ETH/USDT"))
    await ledger.record_fill(make_fill("e2", "t1", Side.SELL, "1", "12", symbol="ETH/USDT", ts=T0 + 5))
    await ledger.set_state("risk", {"state": "halted"})
    seq = await ledger.next_sequence("coid:spot")
    await ledger.journal("DaemonStopping", {"reason": "test"}, T0)
    before = (await ledger.get_order("b1"), await ledger.positions(), await ledger.fills(),
              await ledger.closed_trades(), await ledger.realized_pnl())
    await ledger.close()
    await ledger.close()  # idempotent
    with pytest.raises(InvariantError, match="closed"):
        await ledger.get_state("risk")

    async with await Ledger.open(path, clock) as again:
        after = (await again.get_order("b1"), await again.positions(), await again.fills(),
                 await again.closed_trades(), await again.realized_pnl())
        assert after == before
        assert after[1][0].stop_loss == D("99") and after[4] == D("2")
        assert await again.get_state("risk") == {"state": "halted"}
        assert await again.next_sequence("coid:spot") == seq + 1
        assert (await again.read_journal())[0]["kind"] == "DaemonStopping"
        # Still idempotent after the restart.
        assert not (await again.record_fill(make_fill("b1", "t1", Side.BUY, "2", "100.5"))).new


async def test_event_loop_keeps_running_during_2000_writes(ledger: Ledger) -> None:
    writes = 2000
    done = asyncio.Event()
    ticks = 0
    during_batch = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(10_000_000):
            if done.is_set():
                return
            ticks += 1
            await asyncio.sleep(0)

    async def writer() -> None:
        nonlocal during_batch
        try:
            for i in range(writes):
                await ledger.journal("tick", {"i": i}, T0 + i)
            before = ticks
            await ledger.journal_many([("batch", {"i": i}, T0 + i) for i in range(writes)])
            during_batch = ticks - before
        finally:
            done.set()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ticker())
        tg.create_task(writer())
    # SQLite work done on the loop itself would leave the ticker about one turn per awaited call; on
    # the ledger thread the loop goes round many times while each write is in flight.
    assert ticks >= 5 * (writes + 1)
    assert during_batch >= 10
    assert len(await ledger.read_journal("tick", limit=writes + 1)) == writes
    assert len(await ledger.read_journal("batch", limit=writes + 1)) == writes


async def sigkill_child_when(child: str, path: Path, done: Callable[[bytes], bool], *, max_lines: int,
                             timeout: float = 20.0) -> None:
    """Run `child` (Python source; `path` is its argv[1]) and SIGKILL it at the first line of its
    output for which `done` is true. Bounded: at most `max_lines` lines, `timeout` seconds each."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child, str(path), cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    clock = LiveClock()
    try:
        for _ in range(max_lines):
            line = await clock.wait_for(proc.stdout.readline(), timeout)
            assert line, "child ended early"
            if done(line):
                break
        else:
            raise AssertionError(f"no awaited line in {max_lines} lines of the child's output")
    finally:
        proc.send_signal(signal.SIGKILL)
        await clock.wait_for(proc.wait(), timeout)
    assert proc.returncode == -signal.SIGKILL


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    """What a caller was told is written is there after the process is killed mid-stream."""
    path = tmp_path / "ledger.sqlite3"
    child = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from core.clock import SimClock\n"
        "from storage.ledger import Ledger\n"
        "async def main():\n"
        "    ledger = await Ledger.open(Path(sys.argv[1]), SimClock())\n"
        "    for _ in range(100000):\n"
        "        n = await ledger.next_sequence('s')\n"
        "        await ledger.journal('n', {'n': n}, 0.0)\n"
        "        print('ack', n, flush=True)\n"
        "asyncio.run(main())\n"
    )
    acks: list[int] = [0]

    def enough(line: bytes) -> bool:
        if line.startswith(b"ack "):  # other lines are the child's log
            acks.append(int(line.split()[1]))
        return acks[-1] >= 300

    await sigkill_child_when(child, path, enough, max_lines=5_000)
    acknowledged = acks[-1]
    async with await Ledger.open(path, SimClock()) as ledger:
        assert await ledger.next_sequence("s") > acknowledged
        assert len(await ledger.read_journal("n", limit=100_000)) >= acknowledged
