"""The ledger's in-memory mirror (`_Mirror`) answers the engines' hot-path reads (open positions,
orders in play) without a trip to the ledger thread, so it must never disagree with the database.

These tests pin that down: after any sequence of writes (successful or failed) the mirror-served
reads equal what a separate read-only connection finds in the SQLite file; callers get copies; a
failed write, a restart or a write still queued behind a busy ledger thread never shows anything
but committed rows; a caller reads its own writes; and the mirror reads really are served from
memory (they complete while the ledger thread is held), and refuse once the ledger is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.errors import InvariantError
from core.types import Fill, MarketType, Order, OrderState, OrderType, Position, PositionSide, Side
from storage.ledger import IN_PLAY, UNSET, ClosedTrade, Ledger, _book_from, _order_from, _Unset

D = Decimal
T0 = 1_700_000_000.0
MARKETS = {"spot": MarketType.SPOT, "futures": MarketType.FUTURES}
ENGINES = tuple(MARKETS)
SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
TERMINAL = frozenset(s for s in OrderState if s.is_terminal)
# Every non-empty subset of the in-play states (served from memory) and a few that are not (SQL).
IN_PLAY_SUBSETS = [list(c) for n in range(1, len(IN_PLAY) + 1)
                   for c in itertools.combinations(sorted(IN_PLAY), n)]
MIXED_SUBSETS = [sorted(IN_PLAY | {OrderState.FILLED}), [OrderState.PENDING, OrderState.CANCELED],
                 sorted(OrderState), [OrderState.REJECTED]]
HOLD_SECONDS = 10.0  # upper bound on how long a test may hold the ledger thread


# --- building blocks ---------------------------------------------------------------------------------


def make_order(cid: str, *, engine: str = "spot", symbol: str = "BTC/USDT", state: OrderState = OrderState.PENDING,
               created_at: float = T0, amount: str | Decimal = "1", side: Side = Side.BUY) -> Order:
    return Order(
        client_order_id=cid, engine=engine, market=MARKETS[engine], symbol=symbol, side=side,
        order_type=OrderType.LIMIT, amount=D(amount), price=D("100"), stop_price=None, reduce_only=False,
        state=state, created_at=created_at, updated_at=created_at, reason=f"made {cid}",
    )


def make_fill(cid: str, trade_id: str, side: Side, amount: str | Decimal, price: str | Decimal = "100", *,
              engine: str = "spot", symbol: str = "BTC/USDT", fee: str | Decimal = "0",
              fee_asset: str = "USDT", ts: float = T0) -> Fill:
    return Fill(
        client_order_id=cid, trade_id=trade_id, engine=engine, market=MARKETS[engine], symbol=symbol,
        side=side, amount=D(amount), price=D(price), fee=D(fee), fee_asset=fee_asset, ts=ts,
    )


class Truth:
    """The rows as they are in the file, read through a connection of its own (read-only), converted
    with the ledger's own row readers: what the mirror must agree with."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None)
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, tuple(args)).fetchall()  # fetchall: no snapshot left open

    def positions(self, engine: str | None = None) -> list[Position]:
        where, args = (" WHERE engine = ?", [engine]) if engine is not None else ("", [])
        rows = self._rows(f"SELECT * FROM positions{where} ORDER BY engine, symbol", args)
        return [_book_from(r).position() for r in rows]

    def position(self, engine: str, symbol: str) -> Position | None:
        rows = self._rows("SELECT * FROM positions WHERE engine = ? AND symbol = ?", (engine, symbol))
        return _book_from(rows[0]).position() if rows else None

    def orders(self, states: Iterable[OrderState], engine: str | None = None) -> list[Order]:
        wanted = [str(s) for s in states]
        sql = f"SELECT * FROM orders WHERE state IN ({', '.join('?' * len(wanted))})"
        if engine is not None:
            sql += " AND engine = ?"
            wanted.append(engine)
        return [_order_from(r) for r in self._rows(sql + " ORDER BY created_at, rowid", wanted)]

    def order(self, cid: str) -> Order | None:
        rows = self._rows("SELECT * FROM orders WHERE client_order_id = ?", (cid,))
        return _order_from(rows[0]) if rows else None

    def written(self, ref: int | None) -> str | None:
        """The ref-th order written (cyclically), or None when there is none or no ref."""
        cids = [r[0] for r in self._rows("SELECT client_order_id FROM orders ORDER BY rowid")]
        return None if ref is None or not cids else cids[ref % len(cids)]

    def has_fill(self, cid: str, trade_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM fills WHERE client_order_id = ? AND trade_id = ?", (cid, trade_id)))


@dataclass(frozen=True)
class Snapshot:
    """Everything the mirror serves, for the given order ids."""

    positions: list[Position]
    by_engine: dict[str, list[Position]]
    one: dict[tuple[str, str], Position | None]  # Ledger.position(engine, symbol), held or not
    in_play: dict[tuple[tuple[OrderState, ...], str | None], list[Order]]
    orders: dict[str, Order | None]


async def mirror_snapshot(ledger: Ledger, cids: Iterable[str]) -> Snapshot:
    return Snapshot(
        positions=await ledger.positions(),
        by_engine={e: await ledger.positions(e) for e in ENGINES},
        one={(e, sym): await ledger.position(e, sym) for e in ENGINES for sym in SYMBOLS},
        in_play={(tuple(s), e): await ledger.orders_in_states(s, e)
                 for s in IN_PLAY_SUBSETS for e in (None, *ENGINES)},
        orders={cid: await ledger.get_order(cid) for cid in cids},
    )


def truth_snapshot(truth: Truth, cids: Iterable[str]) -> Snapshot:
    return Snapshot(
        positions=truth.positions(),
        by_engine={e: truth.positions(e) for e in ENGINES},
        one={(e, sym): next((p for p in truth.positions(e) if p.symbol == sym), None)
             for e in ENGINES for sym in SYMBOLS},
        in_play={(tuple(s), e): truth.orders(s, e) for s in IN_PLAY_SUBSETS for e in (None, *ENGINES)},
        orders={cid: truth.order(cid) for cid in cids},
    )


async def assert_mirror_is_the_file(ledger: Ledger, truth: Truth, cids: Iterable[str], where: str = "") -> None:
    """Every mirror-served read equals the file; so does the SQL path for state sets beyond the mirror."""
    wanted = list(cids)
    mine, theirs = await mirror_snapshot(ledger, wanted), truth_snapshot(truth, wanted)
    assert mine.positions == theirs.positions, where
    assert mine.by_engine == theirs.by_engine, where
    assert mine.one == theirs.one, where
    for key, listed in theirs.in_play.items():
        assert mine.in_play[key] == listed, f"{where} orders_in_states{key}"
    for cid, order in theirs.orders.items():
        assert mine.orders[cid] == order, f"{where} get_order({cid})"
    for states in MIXED_SUBSETS:
        for engine in (None, *ENGINES):
            assert await ledger.orders_in_states(states, engine) == truth.orders(states, engine), where


@contextlib.asynccontextmanager
async def ledger_thread_held(ledger: Ledger) -> AsyncIterator[Callable[[], None]]:
    """Hold the ledger thread with a call that waits for an event (bounded); yields the release.
    Calls queued meanwhile wait behind it, in order."""
    release = threading.Event()
    started = threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(HOLD_SECONDS)

    held = ledger._thread.call(hold)
    try:
        assert await asyncio.to_thread(started.wait, 5.0), "the ledger thread never ran the hold"
        yield release.set
    finally:
        release.set()
        await asyncio.wait_for(held, 5.0)


async def still_waiting(aw: asyncio.Future[Any], seconds: float = 0.2) -> bool:
    done, _ = await asyncio.wait({aw}, timeout=seconds)
    return not done


@pytest.fixture
def clock() -> SimClock:
    return SimClock(T0)


@pytest.fixture
async def ledger(tmp_path: Path, clock: SimClock) -> AsyncIterator[Ledger]:
    led = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    yield led
    await led.close()


@pytest.fixture
def truth(ledger: Ledger) -> Iterator[Truth]:
    t = Truth(ledger.path)
    yield t
    t.close()


# --- 1. model-based: random writes, compared with the file after every step -------------------------

CID_KEY = {f"{e}-{i}-{n}": (e, s) for e in ENGINES for i, s in enumerate(SYMBOLS) for n in range(2)}
CIDS = (*CID_KEY, "never-written")
LEVELS: tuple[Decimal | _Unset | None, ...] = (UNSET, None, D("95"), D("120.5"))


@dataclass(frozen=True)
class InsertOrder:
    cid: str
    state: OrderState
    created_at: float  # few distinct values: ties, broken by insertion order (rowid)
    amount: Decimal
    side: Side


@dataclass(frozen=True)
class UpdateOrder:
    cid: str
    ref: int | None  # an order already written (the ref-th, cyclically) instead of `cid`, when there is one
    state: OrderState
    filled: Decimal | None
    exchange_order_id: str | None


@dataclass(frozen=True)
class RecordFill:
    cid: str
    ref: int | None  # as in UpdateOrder
    trade_id: str  # few of them: the same fill comes again
    side: Side | None  # None: against the position (a buy when flat)
    size: Decimal | str  # or relative to the position: "all", "half" or "more" (1 when flat)
    price: Decimal
    fee: str  # "none", "quote" or "base" (a base-asset fee leaves odd remainders, as Binance spot does)
    leverage: int


@dataclass(frozen=True)
class UpdatePosition:
    engine: str
    symbol: str
    stop_loss: Decimal | _Unset | None
    take_profit: Decimal | _Unset | None
    meta: dict[str, str] | None


@dataclass(frozen=True)
class WriteOff:
    engine: str
    symbol: str
    matching: bool


@dataclass(frozen=True)
class UnrelatedWrite:
    """A write that touches no mirrored row."""


Step = InsertOrder | UpdateOrder | RecordFill | UpdatePosition | WriteOff | UnrelatedWrite

# Most steps go to one engine and symbol, so that orders are updated after they were made and fills
# meet a position to grow, reduce, close or flip (the REQUIRED events below); the rest go anywhere.
_cid = st.sampled_from(("spot-0-0", "spot-0-1") * 4 + tuple(CID_KEY))
_pair = st.sampled_from([("spot", SYMBOLS[0])] * 5 + [(e, s) for e in ENGINES for s in SYMBOLS])
_state = st.sampled_from(list(OrderState))
_ref = st.sampled_from([None, 0, 1, 2, 3])
_trade_id = st.sampled_from(["t0", "t1", "t2"])
steps = st.lists(
    st.one_of(
        st.builds(InsertOrder, _cid, _state, st.sampled_from([T0, T0 + 1, T0 + 2]),
                  st.sampled_from([D("1"), D("2"), D("3")]), st.sampled_from(list(Side))),
        st.builds(UpdateOrder, _cid, _ref, _state, st.sampled_from([None, D("0"), D("0.5"), D("1")]),
                  st.sampled_from([None, "x-1"])),
        st.builds(RecordFill, _cid, _ref, _trade_id, st.sampled_from(list(Side)),
                  st.sampled_from([D("0.5"), D("1"), D("2")]), st.sampled_from([D("90"), D("100"), D("110.5")]),
                  st.sampled_from(["none", "quote", "base"]), st.integers(1, 3)),
        st.builds(RecordFill, _cid, _ref, _trade_id, st.sampled_from([None, None, Side.BUY, Side.SELL]),
                  st.sampled_from(["all", "half", "more"]), st.sampled_from([D("90"), D("100"), D("110.5")]),
                  st.sampled_from(["none", "none", "quote", "base"]), st.just(1)),
        _pair.flatmap(lambda p: st.builds(
            UpdatePosition, st.just(p[0]), st.just(p[1]), st.sampled_from(LEVELS), st.sampled_from(LEVELS),
            st.sampled_from([None, {}, {"note": "trail"}, {"x": "1", "y": "2"}]))),
        _pair.flatmap(lambda p: st.builds(WriteOff, st.just(p[0]), st.just(p[1]), st.booleans())),
        st.just(UnrelatedWrite()),
    ),
    min_size=1,
    max_size=25,
)


def _fill_size(position: Position | None, side: Side | None, size: Decimal | str) -> tuple[Side, Decimal]:
    if side is None:
        side = Side.SELL if position is not None and position.side is PositionSide.LONG else Side.BUY
    if isinstance(size, Decimal):
        return side, size
    held = D("1") if position is None else position.amount
    return side, {"all": held, "half": held / 2, "more": held * D("1.5")}[size]


def _fill_kind(before: Position | None, after: Position | None, new: bool) -> str:
    if not new:
        return "fill-repeat"
    if before is None:
        return "fill-open"
    if after is None:
        return "fill-close"
    if after.side is not before.side:
        return "fill-flip"
    return "fill-grow" if after.amount > before.amount else "fill-reduce"


async def insert_order(ledger: Ledger, truth: Truth, step: InsertOrder, seen: Counter[str]) -> None:
    engine, symbol = CID_KEY[step.cid]
    order = make_order(step.cid, engine=engine, symbol=symbol, state=step.state, created_at=step.created_at,
                       amount=step.amount, side=step.side)
    if truth.order(step.cid) is not None:
        with pytest.raises(InvariantError, match="already in the ledger"):
            await ledger.insert_order(order)
        seen["insert-duplicate"] += 1
        return
    await ledger.insert_order(order)
    seen[f"insert-{'terminal' if step.state.is_terminal else 'in-play'}"] += 1


async def update_order(ledger: Ledger, truth: Truth, step: UpdateOrder, seen: Counter[str]) -> None:
    cid = truth.written(step.ref) or step.cid
    before = truth.order(cid)
    if before is None:
        with pytest.raises(InvariantError, match="does not have"):
            await ledger.update_order(cid, state=step.state, filled=step.filled,
                                      exchange_order_id=step.exchange_order_id)
        seen["update-unknown"] += 1
        return
    await ledger.update_order(cid, state=step.state, filled=step.filled, exchange_order_id=step.exchange_order_id)
    seen[f"update-{'terminal' if before.state.is_terminal else 'in-play'}-to-"
         f"{'terminal' if step.state.is_terminal else 'in-play'}"] += 1


async def record_fill(ledger: Ledger, truth: Truth, step: RecordFill, seen: Counter[str]) -> None:
    cid = truth.written(step.ref) or step.cid
    engine, symbol = CID_KEY[cid]
    base = symbol.split("/")[0]
    fee, asset = {"none": ("0", "USDT"), "quote": ("0.1", "USDT"), "base": ("0.01", base)}[step.fee]
    before = truth.position(engine, symbol)
    side, amount = _fill_size(before, step.side, step.size)
    fill = make_fill(cid, step.trade_id, side, amount, step.price, engine=engine, symbol=symbol, fee=fee,
                     fee_asset=asset, ts=ledger.clock.now())
    known = truth.has_fill(cid, step.trade_id)
    if not known and asset == base and side is Side.BUY and fill.fee >= amount:
        with pytest.raises(InvariantError, match="base fee"):  # refused as a whole
            await ledger.record_fill(fill, leverage=step.leverage)
        seen["fill-refused"] += 1
        return
    result = await ledger.record_fill(fill, leverage=step.leverage)
    after = truth.position(engine, symbol)
    assert result.new is not known
    assert result.position == after
    seen[_fill_kind(before, after, result.new)] += 1
    if truth.order(cid) is None:
        seen["fill-without-order"] += 1


async def update_position(ledger: Ledger, truth: Truth, step: UpdatePosition, seen: Counter[str]) -> None:
    had = truth.position(step.engine, step.symbol) is not None
    changed = await ledger.update_position(step.engine, step.symbol, stop_loss=step.stop_loss,
                                           take_profit=step.take_profit, meta=step.meta)
    assert changed is had
    seen[f"update_position-{'hit' if had else 'missing'}"] += 1


async def write_off(ledger: Ledger, truth: Truth, step: WriteOff, seen: Counter[str]) -> None:
    before = truth.position(step.engine, step.symbol)
    expected = D("1") if before is None else before.amount + (0 if step.matching else 1)
    if before is None or not step.matching:
        assert await ledger.write_off(step.engine, step.symbol, expected_amount=expected, reason="dust") is None
        seen["write_off-no-match"] += 1
    elif before.side is PositionSide.SHORT:
        with pytest.raises(InvariantError, match="only a long"):
            await ledger.write_off(step.engine, step.symbol, expected_amount=expected, reason="dust")
        seen["write_off-short-refused"] += 1
    else:
        closed = await ledger.write_off(step.engine, step.symbol, expected_amount=expected, reason="dust")
        assert isinstance(closed, ClosedTrade)
        assert truth.position(step.engine, step.symbol) is None
        seen["write_off-closed"] += 1


async def apply_step(ledger: Ledger, truth: Truth, step: Step, seen: Counter[str]) -> None:
    """Make one write, checking its own outcome against the file before and after it."""
    if isinstance(step, InsertOrder):
        await insert_order(ledger, truth, step, seen)
    elif isinstance(step, UpdateOrder):
        await update_order(ledger, truth, step, seen)
    elif isinstance(step, RecordFill):
        await record_fill(ledger, truth, step, seen)
    elif isinstance(step, UpdatePosition):
        await update_position(ledger, truth, step, seen)
    elif isinstance(step, WriteOff):
        await write_off(ledger, truth, step, seen)
    else:
        await ledger.next_sequence("unrelated")
        seen["unrelated"] += 1


async def run_model(steps: list[Step], seen: Counter[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clock = SimClock(T0)
        async with await Ledger.open(Path(tmp) / "ledger.sqlite3", clock) as ledger:
            truth = Truth(ledger.path)
            try:
                await assert_mirror_is_the_file(ledger, truth, CIDS, "at open")
                for i, step in enumerate(steps):
                    clock.set(T0 + 10 + i)  # every write stamps a new updated_at: a stale copy would show
                    await apply_step(ledger, truth, step, seen)
                    await assert_mirror_is_the_file(ledger, truth, CIDS, f"after step {i}: {step}")
            finally:
                truth.close()


# One sequence written out, that does every kind of write the mirror must follow (REQUIRED below), so
# that each of them is compared with the file whatever the random sequences happen to contain.
BTC, ETH = SYMBOLS[0], SYMBOLS[1]
SCENARIO: list[Step] = [
    InsertOrder("spot-0-0", OrderState.PENDING, T0 + 1, D("2"), Side.BUY),
    InsertOrder("spot-0-1", OrderState.FILLED, T0, D("1"), Side.SELL),
    InsertOrder("spot-1-0", OrderState.UNKNOWN, T0 + 1, D("1"), Side.BUY),
    InsertOrder("spot-0-0", OrderState.OPEN, T0, D("3"), Side.SELL),
    UpdateOrder("futures-2-1", None, OrderState.OPEN, None, None),
    UpdateOrder("spot-0-0", None, OrderState.OPEN, None, "x-1"),
    RecordFill("spot-0-0", None, "t0", Side.BUY, D("1"), D("100"), "none", 1),
    RecordFill("spot-0-0", None, "t0", Side.BUY, D("1"), D("100"), "none", 1),
    RecordFill("spot-0-0", None, "t1", Side.BUY, D("0.5"), D("90"), "base", 1),
    UpdatePosition("spot", BTC, D("95"), D("120.5"), {"note": "trail"}),
    UpdatePosition("futures", ETH, None, UNSET, None),
    RecordFill("spot-0-1", None, "t0", Side.SELL, "half", D("110.5"), "quote", 1),
    RecordFill("spot-0-1", None, "t1", Side.SELL, "more", D("100"), "none", 1),
    WriteOff("spot", BTC, True),
    RecordFill("spot-0-1", None, "t2", None, "all", D("90"), "none", 1),
    RecordFill("futures-1-0", None, "t0", Side.BUY, D("2"), D("100"), "quote", 3),
    WriteOff("futures", ETH, False),
    WriteOff("futures", ETH, True),
    UpdateOrder("spot-0-0", None, OrderState.CANCELED, None, None),
    UpdateOrder("spot-0-0", None, OrderState.PARTIALLY_FILLED, D("1.5"), None),
    UpdateOrder("spot-1-0", None, OrderState.OPEN, None, None),
    UnrelatedWrite(),
]
REQUIRED = {
    "insert-in-play", "insert-terminal", "insert-duplicate", "update-unknown", "update-in-play-to-terminal",
    "update-terminal-to-in-play", "update-in-play-to-in-play", "fill-open", "fill-grow", "fill-reduce",
    "fill-close", "fill-flip", "fill-repeat", "fill-without-order", "update_position-hit",
    "update_position-missing", "write_off-closed", "write_off-no-match", "write_off-short-refused", "unrelated",
}


def test_mirror_matches_the_file_after_every_write() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(steps=steps)
    @example(steps=SCENARIO)
    def check(steps: list[Step]) -> None:
        asyncio.run(run_model(steps, seen))

    check()
    assert set(seen) >= REQUIRED, f"never exercised: {sorted(REQUIRED - set(seen))}"


# --- 2. copies --------------------------------------------------------------------------------------


async def test_reads_hand_out_copies(ledger: Ledger) -> None:
    await ledger.insert_order(make_order("b1", amount="2"))
    await ledger.record_fill(make_fill("b1", "t1", Side.BUY, "1"))
    await ledger.update_position("spot", "BTC/USDT", stop_loss=D("90"), meta={"x": "kept"})
    position_before = (await ledger.positions())[0]
    order_before = await ledger.get_order("b1")
    assert order_before is not None and order_before.state is OrderState.PARTIALLY_FILLED

    single = await ledger.position("spot", "BTC/USDT")
    assert single == position_before
    for got in (await ledger.positions(), await ledger.positions("spot"), [single]):
        assert got[0] is not None
        got[0].amount = D("999")
        got[0].stop_loss = D("1")
        got[0].meta["x"] = "changed"
        got[0].meta["new"] = "added"
    for got_order in (await ledger.get_order("b1"), *(await ledger.orders_in_states([OrderState.PARTIALLY_FILLED]))):
        assert got_order is not None
        got_order.state = OrderState.CANCELED
        got_order.filled = D("999")

    assert (await ledger.positions())[0] == position_before
    assert await ledger.position("spot", "BTC/USDT") == position_before
    assert (await ledger.positions("spot"))[0].meta == {"x": "kept"}
    assert await ledger.get_order("b1") == order_before
    assert await ledger.orders_in_states([OrderState.PARTIALLY_FILLED]) == [order_before]


# --- 3. failed writes ----------------------------------------------------------------------------------


async def test_a_failed_write_leaves_the_mirror_as_it_was(
    ledger: Ledger, truth: Truth, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ledger.insert_order(make_order("b1", amount="2"))
    await ledger.record_fill(make_fill("b1", "t1", Side.BUY, "1"))
    await ledger.update_position("spot", "BTC/USDT", stop_loss=D("90"), meta={"k": "v"})
    await ledger.insert_order(make_order("s1", side=Side.SELL, amount="1"))
    await ledger.update_order("s1", state=OrderState.OPEN)
    await ledger.insert_order(make_order("e1", symbol="ETH/USDT", amount="1", created_at=T0 - 1))
    await ledger.insert_order(make_order("d1", symbol="BTC/USDT", amount="1", created_at=T0 + 1))
    await ledger.record_fill(make_fill("d1", "t1", Side.BUY, "0.5", fee="0.01", fee_asset="BTC"))
    cids = ["b1", "s1", "e1", "d1", "ghost"]
    before = await mirror_snapshot(ledger, cids)
    assert [p.amount for p in before.positions] == [D("1.49")]
    assert before.in_play[((OrderState.PENDING,), None)] == [truth.order("e1")]
    assert before == truth_snapshot(truth, cids)

    async def unchanged(what: str) -> None:
        assert await mirror_snapshot(ledger, cids) == before, what
        await assert_mirror_is_the_file(ledger, truth, cids, what)

    with pytest.raises(InvariantError, match="already in the ledger"):
        await ledger.insert_order(make_order("e1", symbol="ETH/USDT", state=OrderState.OPEN, amount="7"))
    await unchanged("after a duplicate insert")

    with pytest.raises(InvariantError, match="does not have"):
        await ledger.update_order("ghost", state=OrderState.OPEN)
    await unchanged("after an update of an unknown order")

    real_progress = Ledger._order_progress

    def progress_then_fail(conn: sqlite3.Connection, client_order_id: str, now: float) -> None:
        real_progress(conn, client_order_id, now)  # position and order rows changed, mirror rows touched
        raise RuntimeError("injected failure after the rows changed")

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "_order_progress", staticmethod(progress_then_fail))
        with pytest.raises(RuntimeError, match="injected"):  # would close the position, fill s1
            await ledger.record_fill(make_fill("s1", "t1", Side.SELL, "1.49"))
        await unchanged("after a failed closing fill")
        with pytest.raises(RuntimeError, match="injected"):  # would open ETH, start e1
            await ledger.record_fill(make_fill("e1", "t1", Side.BUY, "0.5", symbol="ETH/USDT"))
        await unchanged("after a failed opening fill")
    assert not truth.has_fill("s1", "t1") and not truth.has_fill("e1", "t1")

    def fail_closing(conn: sqlite3.Connection, closed: ClosedTrade) -> None:
        raise RuntimeError("injected failure while closing")

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "_insert_closed", staticmethod(fail_closing))
        with pytest.raises(RuntimeError, match="injected"):
            await ledger.write_off("spot", "BTC/USDT", expected_amount=D("1.49"), reason="dust")
        await unchanged("after a failed write-off")

    # The ledger goes on: the next write is mirrored as usual.
    await ledger.record_fill(make_fill("s1", "t1", Side.SELL, "1.49"))
    assert await ledger.positions() == []
    assert [o.client_order_id for o in await ledger.orders_in_states(IN_PLAY)] == ["e1", "b1", "d1"]
    await assert_mirror_is_the_file(ledger, truth, cids, "after the retried fill")


# --- 4. restart ----------------------------------------------------------------------------------------


async def test_a_reopened_ledger_serves_the_same_mirror(tmp_path: Path, clock: SimClock) -> None:
    path = tmp_path / "ledger.sqlite3"
    # Equal created_at, inserted in an order that neither the state index nor the ids follow: only the
    # rowid tie-break gives z1, a2, m3.
    made = [("z1", "futures", "BTC/USDT", OrderState.UNKNOWN, T0), ("a2", "spot", "ETH/USDT", OrderState.PENDING, T0),
            ("m3", "spot", "BTC/USDT", OrderState.OPEN, T0), ("c4", "spot", "SOL/USDT", OrderState.CANCELED, T0),
            ("b5", "futures", "ETH/USDT", OrderState.OPEN, T0 + 1), ("f6", "spot", "BTC/USDT", OrderState.OPEN, T0 - 1)]
    async with await Ledger.open(path, clock) as ledger:
        for cid, engine, symbol, state, created_at in made:
            await ledger.insert_order(make_order(cid, engine=engine, symbol=symbol, state=state,
                                                 created_at=created_at, amount="2"))
        await ledger.record_fill(make_fill("b5", "t1", Side.SELL, "1", "250", engine="futures", symbol="ETH/USDT"),
                                 leverage=3)
        await ledger.record_fill(make_fill("f6", "t1", Side.BUY, "2", "100", fee="0.2"))  # fills f6
        await ledger.record_fill(make_fill("x", "t1", Side.SELL, "0.5", "120"))  # partly reduces
        await ledger.update_position("spot", "BTC/USDT", stop_loss=D("95.5"), take_profit=D("130"),
                                     meta={"entry": "ema", "atr": "1.25"})
        await ledger.update_position("futures", "ETH/USDT", take_profit=D("200"), meta={"note": "short"})
        cids = [c for c, *_ in made]
        before = await mirror_snapshot(ledger, cids)
    in_play = before.in_play[(tuple(sorted(IN_PLAY)), None)]
    assert [(o.client_order_id, o.state) for o in in_play] == [
        ("z1", OrderState.UNKNOWN), ("a2", OrderState.PENDING), ("m3", OrderState.OPEN),
        ("b5", OrderState.PARTIALLY_FILLED)]
    assert [(p.engine, p.symbol, p.meta) for p in before.positions] == [
        ("futures", "ETH/USDT", {"note": "short"}), ("spot", "BTC/USDT", {"entry": "ema", "atr": "1.25"})]
    assert before.positions[1].realized_pnl != 0 and before.positions[1].stop_loss == D("95.5")

    async with await Ledger.open(path, clock) as reopened:
        assert await mirror_snapshot(reopened, cids) == before
        truth = Truth(path)
        try:
            await assert_mirror_is_the_file(reopened, truth, cids, "after reopening")
        finally:
            truth.close()


# --- 5. read-your-writes, and nothing before the commit ------------------------------------------------


async def test_a_caller_reads_its_own_writes_at_once(ledger: Ledger) -> None:
    await ledger.insert_order(make_order("b1"))
    assert [o.client_order_id for o in await ledger.orders_in_states([OrderState.PENDING])] == ["b1"]
    await ledger.record_fill(make_fill("b1", "t1", Side.BUY, "1"))
    assert [p.symbol for p in await ledger.positions()] == ["BTC/USDT"]
    assert await ledger.orders_in_states([OrderState.PENDING]) == []
    await ledger.insert_order(make_order("s1", side=Side.SELL))
    await ledger.update_order("s1", state=OrderState.OPEN)
    assert [o.client_order_id for o in await ledger.orders_in_states([OrderState.OPEN])] == ["s1"]
    await ledger.record_fill(make_fill("s1", "t1", Side.SELL, "1"))
    assert await ledger.positions() == []
    assert await ledger.orders_in_states([OrderState.OPEN]) == []


async def test_a_queued_write_is_not_seen_before_it_commits(ledger: Ledger, truth: Truth) -> None:
    await ledger.insert_order(make_order("b1"))
    await ledger.record_fill(make_fill("b1", "t1", Side.BUY, "1"))
    await ledger.insert_order(make_order("s1", side=Side.SELL))
    await ledger.update_order("s1", state=OrderState.OPEN)
    position = (await ledger.positions())[0]
    open_order = await ledger.get_order("s1")
    async with ledger_thread_held(ledger) as release:
        writes = [asyncio.ensure_future(w) for w in (
            ledger.insert_order(make_order("n1", symbol="ETH/USDT")),
            ledger.update_order("s1", state=OrderState.CANCELED),
            ledger.record_fill(make_fill("x", "t1", Side.SELL, "1")),
        )]
        await asyncio.sleep(0)  # each write is queued behind the hold now
        assert await still_waiting(asyncio.gather(*writes))
        assert await ledger.positions() == [position]
        assert await ledger.orders_in_states([OrderState.PENDING]) == []
        assert await ledger.orders_in_states([OrderState.OPEN]) == [open_order]
        assert await ledger.get_order("s1") == open_order
        release()
        await asyncio.wait_for(asyncio.gather(*writes), 5.0)
    assert await ledger.positions() == []
    assert [o.client_order_id for o in await ledger.orders_in_states([OrderState.PENDING])] == ["n1"]
    assert await ledger.orders_in_states([OrderState.OPEN]) == []
    settled = await ledger.get_order("s1")
    assert settled is not None and settled.state is OrderState.CANCELED
    await assert_mirror_is_the_file(ledger, truth, ["b1", "s1", "n1", "x"])


# --- 6. closed -----------------------------------------------------------------------------------------


async def test_reads_after_close_raise(tmp_path: Path, clock: SimClock) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", clock)
    await ledger.insert_order(make_order("b1"))
    await ledger.record_fill(make_fill("x", "t1", Side.BUY, "1"))
    assert await ledger.get_order("b1") is not None
    await ledger.close()
    reads: list[Callable[[], Awaitable[object]]] = [
        ledger.positions, lambda: ledger.positions("spot"), lambda: ledger.orders_in_states([OrderState.PENDING]),
        lambda: ledger.get_order("b1"), lambda: ledger.get_order("unknown")]
    for read in reads:
        with pytest.raises(InvariantError, match="closed"):
            await read()


# --- 7. mirror reads never wait for the ledger thread --------------------------------------------------


async def test_mirror_reads_do_not_wait_for_the_ledger_thread(ledger: Ledger) -> None:
    await ledger.insert_order(make_order("f1"))
    await ledger.record_fill(make_fill("f1", "t1", Side.BUY, "1"))  # fills f1
    await ledger.insert_order(make_order("o1", side=Side.SELL))
    await ledger.update_order("o1", state=OrderState.OPEN)
    async with ledger_thread_held(ledger) as release:
        positions = await asyncio.wait_for(ledger.positions(), 1.0)
        assert [(p.symbol, p.amount) for p in positions] == [("BTC/USDT", D("1"))]
        assert [p.symbol for p in await asyncio.wait_for(ledger.positions("spot"), 1.0)] == ["BTC/USDT"]
        working = await asyncio.wait_for(ledger.orders_in_states([OrderState.OPEN]), 1.0)
        assert [o.client_order_id for o in working] == ["o1"]
        in_play = await asyncio.wait_for(ledger.get_order("o1"), 1.0)
        assert in_play is not None and in_play.state is OrderState.OPEN
        # Settled orders are not mirrored: those reads queue behind the held thread.
        settled = asyncio.ensure_future(ledger.get_order("f1"))
        history = asyncio.ensure_future(ledger.orders_in_states([OrderState.FILLED]))
        assert await still_waiting(settled) and await still_waiting(history)
        release()
        filled = await asyncio.wait_for(settled, 5.0)
        assert filled is not None and filled.state is OrderState.FILLED
        assert [o.client_order_id for o in await asyncio.wait_for(history, 5.0)] == ["f1"]


def test_in_play_is_the_states_that_may_still_change() -> None:
    assert {OrderState.PENDING, OrderState.UNKNOWN, OrderState.OPEN, OrderState.PARTIALLY_FILLED} == IN_PLAY
    assert set(OrderState) - TERMINAL == IN_PLAY
