"""The intent log: an order row is durable against a crash of the process before the order is sent,
without waiting for the ledger thread's commit, and the next open commits whatever the log still holds.

What a user cares about: an order that may be on the exchange is never missing from the ledger after a
crash (so it is looked up by client order id, never sent again), a half-written record is not taken
for an order, and the order path never records anything about an order before its row is committed.
"""

from __future__ import annotations

import asyncio
import json
import marshal
import struct
import threading
import zlib
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from core.clock import SimClock
from core.errors import InvariantError
from core.events import EventBus
from core.types import MarketType, Order, OrderIntent, OrderState, OrderType, Side
from exchange.base import OrderRequest, OrderUpdate
from exchange.orders import OrderManager
from storage.intent_log import SLOT_SIZE, SLOTS, IntentLog, UnknownIntentLog
from storage.ledger import _ORDER_COLUMNS, Ledger, _order_row, intent_log_path
from tests.test_ledger import sigkill_child_when

D = Decimal
T0 = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[1]
BOUND = 10.0  # seconds of real time any wait here may take


def make_order(cid: str, *, reason: str = "momentum entry", amount: str = "0.5") -> Order:
    return Order(
        client_order_id=cid, engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.BUY,
        order_type=OrderType.MARKET, amount=D(amount), price=None, stop_price=None, reduce_only=False,
        state=OrderState.PENDING, created_at=T0, updated_at=T0, reason=reason,
    )


# --- the log itself ------------------------------------------------------------------------------


def test_a_row_put_is_found_by_the_next_open_until_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log, found = IntentLog.open(path, _ORDER_COLUMNS)
    assert found == []
    slot = log.put(_order_row(make_order("ke-1")))
    assert slot is not None
    # No close, no flush: a second mapping of the file sees what the first copied (the page cache),
    # which is what a restarted process sees after a SIGKILL.
    other, found = IntentLog.open(path, _ORDER_COLUMNS)
    other.close()
    assert [r.row["client_order_id"] for r in found] == ["ke-1"]
    assert found[0].row["amount"] == "0.5" and found[0].row["reason"] == "momentum entry"
    log.release(slot)
    other, found = IntentLog.open(path, _ORDER_COLUMNS)
    other.close()
    log.close()
    assert found == []


def test_records_come_back_oldest_first_across_the_ring(tmp_path: Path) -> None:
    log, _ = IntentLog.open(tmp_path / "log", _ORDER_COLUMNS)
    slots = [log.put(_order_row(make_order(f"ke-{i}"))) for i in range(SLOTS)]
    for slot in slots[:5]:
        assert slot is not None
        log.release(slot)
    later = [log.put(_order_row(make_order(f"ke-late-{i}"))) for i in range(3)]  # slots 0-2 again
    assert later == [0, 1, 2]
    other, found = IntentLog.open(tmp_path / "log", _ORDER_COLUMNS)
    other.close()
    log.close()
    ids = [r.row["client_order_id"] for r in found]
    assert ids == [f"ke-{i}" for i in range(5, SLOTS)] + ["ke-late-0", "ke-late-1", "ke-late-2"]


def test_a_full_log_or_a_row_too_long_is_refused_not_overwritten(tmp_path: Path) -> None:
    log, _ = IntentLog.open(tmp_path / "log", _ORDER_COLUMNS)
    taken = [log.put(_order_row(make_order(f"ke-{i}"))) for i in range(SLOTS)]
    assert None not in taken and log.in_use() == SLOTS
    assert log.put(_order_row(make_order("ke-overflow"))) is None, "the oldest row is not committed yet"
    log.release(0)
    assert log.put(_order_row(make_order("ke-next"))) == 0
    log.release(1)
    assert log.put(_order_row(make_order("ke-long", reason="x" * SLOT_SIZE))) is None
    assert log.in_use() == SLOTS - 1  # the refused row took nothing
    log.close()


def test_a_torn_record_is_ignored(tmp_path: Path) -> None:
    """A crash in the middle of the copy leaves bytes that are not a record. Ignoring them is safe:
    the order is only sent after the copy is complete."""
    path = tmp_path / "log"
    log, _ = IntentLog.open(path, _ORDER_COLUMNS)
    for cid in ("ke-1", "ke-2"):
        log.put(_order_row(make_order(cid)))
    log.close()
    data = bytearray(path.read_bytes())
    data[SLOT_SIZE + 40] ^= 0xFF  # one byte of the second record's row
    path.write_bytes(bytes(data))
    other, found = IntentLog.open(path, _ORDER_COLUMNS)
    other.close()
    assert [r.row["client_order_id"] for r in found] == ["ke-1"]


def write_record(path: Path, slot: int, magic: bytes, seq: int, payload: bytes) -> None:
    """A record as `IntentLog.put` lays one out (header, then payload), written into `slot` of `path`."""
    header = struct.pack("<4sIIQ", magic, zlib.crc32(payload, seq), len(payload), seq)
    data = bytearray(path.read_bytes())
    data[slot * SLOT_SIZE: slot * SLOT_SIZE + len(header) + len(payload)] = header + payload
    path.write_bytes(bytes(data))


async def test_a_row_an_earlier_version_logged_as_json_is_still_committed(tmp_path: Path) -> None:
    """An upgrade must not lose an order the old version logged and never committed: records of the
    earlier layout (KEI1, the row as JSON) are read and committed like this layout's."""
    path = tmp_path / "ledger.sqlite3"
    async with await Ledger.open(path, SimClock(T0)) as ledger:
        await ledger.insert_order(make_order("ke-old"))  # not a new ledger (see the deleted-database case)
    row = _order_row(make_order("ke-from-v1", amount="0.125"))
    payload = json.dumps({"c": list(_ORDER_COLUMNS), "r": list(row)}, separators=(",", ":")).encode()
    write_record(intent_log_path(path), 5, b"KEI1", 7, payload)
    async with await Ledger.open(path, SimClock(T0 + 60)) as again:
        order = await again.get_order("ke-from-v1")
        assert order is not None and order.state is OrderState.PENDING and order.amount == D("0.125")
        assert order.reason == "momentum entry"


NAMES = marshal.dumps(("client_order_id", "amount"))


@pytest.mark.parametrize("payload", [
    NAMES + marshal.dumps(("ke-2", ["0.5"])),  # a value that is not a plain scalar
    NAMES + marshal.dumps(("ke-2", b"0.5")),  # what marshal makes of a numpy float
    NAMES + marshal.dumps({"ke-2", "0.5"}),  # not a tuple of values
    NAMES + marshal.dumps(("ke-2",)),  # fewer values than names
    NAMES + marshal.dumps(("ke-2", "0.5")) + b"\0",  # trailing bytes
    b"\xff" + NAMES,  # not marshal at all
], ids=["nested", "bytes", "set", "short", "trailing", "garbage"])
def test_a_whole_record_that_is_not_a_row_stops_the_open(tmp_path: Path, payload: bytes) -> None:
    """Past its CRC, a record was written whole, so its order may have been sent: one that cannot be
    read as a row is not skipped (the order would vanish from the books without a word) but stops the
    open, and the file is left as it is for a person."""
    path = tmp_path / "log"
    log, _ = IntentLog.open(path, _ORDER_COLUMNS)
    log.put(_order_row(make_order("ke-1")))
    log.close()
    write_record(path, 1, b"KEI2", 1, payload)
    before = path.read_bytes()
    with pytest.raises(UnknownIntentLog, match="slot 1 holds a whole KEI2 record"):
        IntentLog.open(path, _ORDER_COLUMNS)
    assert path.read_bytes() == before


@pytest.mark.parametrize("odd", [np.float64(T0), np.str_("ke-np"), OrderState.PENDING],
                         ids=["numpy-float", "numpy-str", "str-enum"])
def test_a_row_with_a_value_marshal_cannot_give_back_is_refused_not_logged(tmp_path: Path, odd: object) -> None:
    """marshal writes a numpy float as bytes and refuses a str subclass: either way the row could not be
    read back as it was, so `put` refuses it (the order then waits for its commit) and logs nothing."""
    path = tmp_path / "log"
    log, _ = IntentLog.open(path, _ORDER_COLUMNS)
    row = list(_order_row(make_order("ke-1")))
    row[11 if isinstance(odd, float) else 0] = odd
    assert log.put(tuple(row)) is None  # type: ignore[arg-type]
    assert log.in_use() == 0
    log.close()
    other, found = IntentLog.open(path, _ORDER_COLUMNS)
    other.close()
    assert found == []


def test_a_log_of_another_size_is_left_alone_unless_empty(tmp_path: Path) -> None:
    """Another size is another version's layout: its records cannot be read safely, so they are not
    wiped either. An empty file (a crash while creating it) is simply laid out."""
    path = tmp_path / "log"
    log, _ = IntentLog.open(path, _ORDER_COLUMNS)
    log.put(_order_row(make_order("ke-1")))
    log.close()
    other_size = path.read_bytes()[:SLOT_SIZE]
    path.write_bytes(other_size)
    with pytest.raises(UnknownIntentLog, match="not 65536"):
        IntentLog.open(path, _ORDER_COLUMNS)
    assert path.read_bytes() == other_size
    path.write_bytes(b"")
    again, found = IntentLog.open(path, _ORDER_COLUMNS)
    again.close()
    assert found == [] and path.stat().st_size == SLOTS * SLOT_SIZE


# --- the ledger's use of it ----------------------------------------------------------------------


def block_ledger_thread(ledger: Ledger) -> threading.Event:
    """Hold the ledger thread until the returned event is set (so a queued commit waits)."""
    release = threading.Event()
    ledger._thread.call_soon(release.wait, BOUND)
    return release


async def test_a_logged_row_is_committed_and_its_slot_given_back(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0))
    try:
        release = block_ledger_thread(ledger)
        commit = ledger.log_order(make_order("ke-1"))
        assert commit is not None
        committed = commit()
        assert commit() is committed, "one commit per row, however often asked"
        assert ledger._intents.in_use() == 1 and "ke-1" not in ledger._mirror.orders
        release.set()
        await asyncio.wait_for(committed, BOUND)
        got = await ledger.get_order("ke-1")
        assert got is not None and got.state is OrderState.PENDING and got.amount == D("0.5")
        assert ledger._intents.in_use() == 0
    finally:
        await ledger.close()
    _, found = IntentLog.open(intent_log_path(tmp_path / "ledger.sqlite3"), _ORDER_COLUMNS)
    assert found == []


async def test_a_row_logged_but_never_committed_is_committed_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path, SimClock(T0))
    await ledger.insert_order(make_order("ke-old"))
    await ledger.update_order("ke-old", state=OrderState.FILLED, filled=D("0.5"), avg_price=D("100"))
    ledger._intents.put(_order_row(make_order("ke-lost", amount="0.25")))  # the commit never ran
    ledger._intents.put(_order_row(make_order("ke-old")))  # committed, slot not given back yet
    await ledger.close()
    async with await Ledger.open(path, SimClock(T0 + 60)) as again:
        lost = await again.get_order("ke-lost")
        assert lost is not None and lost.state is OrderState.PENDING and lost.amount == D("0.25")
        # Pending, so reconciliation looks it up on the exchange by client order id.
        pending = await again.orders_in_states([OrderState.PENDING], engine="spot")
        assert [o.client_order_id for o in pending] == ["ke-lost"]
        old = await again.get_order("ke-old")
        assert old is not None and old.state is OrderState.FILLED, "a stale record never rolls a row back"
        assert again._intents.in_use() == 0
    _, found = IntentLog.open(intent_log_path(path), _ORDER_COLUMNS)
    assert found == [], "the log is cleared once its rows are committed"


async def test_a_log_left_beside_a_deleted_database_is_not_taken_into_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path, SimClock(T0))
    ledger._intents.put(_order_row(make_order("ke-lost")))
    await ledger.close()
    path.unlink()  # closed cleanly: no -wal or -shm is left
    async with await Ledger.open(path, SimClock(T0)) as fresh:
        assert await fresh.get_order("ke-lost") is None
    kept = intent_log_path(path).with_name(intent_log_path(path).name + ".set-aside-1")
    other, found = IntentLog.open(kept, _ORDER_COLUMNS)
    other.close()
    assert [r.row["client_order_id"] for r in found] == ["ke-lost"], "set aside for a person, not wiped"


async def test_a_log_of_an_unknown_layout_stops_the_open_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with await Ledger.open(path, SimClock(T0)):
        pass
    log_path = intent_log_path(path)
    data = bytearray(log_path.read_bytes())
    data[SLOT_SIZE * 3: SLOT_SIZE * 3 + 4] = b"KEI9"  # a record of some later version
    log_path.write_bytes(bytes(data))
    with pytest.raises(InvariantError, match=r"another version of this program.*sent but are not in the ledger"):
        await Ledger.open(path, SimClock(T0))
    assert log_path.read_bytes() == bytes(data)


async def test_a_logged_row_the_database_refuses_stops_the_open_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path, SimClock(T0))
    await ledger.next_sequence("coid:spot")  # a ledger in use: it has handed out ids
    bad = list(_order_row(make_order("ke-bad")))
    bad[_ORDER_COLUMNS.index("side")] = "sideways"  # the schema's CHECK refuses it
    ledger._intents.put(tuple(bad))
    await ledger.close()
    with pytest.raises(InvariantError, match=r"ke-bad.*may have been sent.*check the exchange"):
        await Ledger.open(path, SimClock(T0))
    _, found = IntentLog.open(intent_log_path(path), _ORDER_COLUMNS)
    assert [r.row["client_order_id"] for r in found] == ["ke-bad"], "kept for the operator"


async def test_a_logged_order_survives_sigkill_before_its_commit(tmp_path: Path) -> None:
    """The real thing: a process logs an order while its ledger thread is busy, says so, and is killed.
    The next open has the order, pending."""
    path = tmp_path / "ledger.sqlite3"
    child = (
        "import asyncio, sys, threading\n"
        "from pathlib import Path\n"
        "from decimal import Decimal\n"
        "from core.clock import SimClock\n"
        "from core.types import MarketType, Order, OrderState, OrderType, Side\n"
        "from storage.ledger import Ledger\n"
        "async def main():\n"
        "    ledger = await Ledger.open(Path(sys.argv[1]), SimClock(0.0))\n"
        "    await ledger.next_sequence('coid:spot')  # as the order manager takes its ids\n"
        "    ledger._thread.call_soon(threading.Event().wait, 60)\n"
        "    order = Order('ke-killed', 'spot', MarketType.SPOT, 'BTC/USDT', Side.BUY, OrderType.MARKET,\n"
        "                  Decimal('0.5'), None, None, False, OrderState.PENDING, 1.0, 1.0)\n"
        "    assert ledger.log_order(order) is not None\n"
        "    print('logged', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    await sigkill_child_when(child, path, lambda line: line.startswith(b"logged"), max_lines=50, timeout=BOUND)
    async with await Ledger.open(path, SimClock(2.0)) as ledger:
        order = await ledger.get_order("ke-killed")
        assert order is not None and order.state is OrderState.PENDING and order.amount == D("0.5")


# --- the order manager ---------------------------------------------------------------------------


class WatchedExchange:
    """Answers every send with a fill, noting whether the order's row was committed when it arrived."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.committed_at_send: list[bool] = []
        self.sent: list[str] = []

    async def create_order(self, request: OrderRequest) -> OrderUpdate:
        self.sent.append(request.client_order_id)
        self.committed_at_send.append(request.client_order_id in self.ledger._mirror.orders)
        return OrderUpdate(
            client_order_id=request.client_order_id, exchange_order_id=f"x-{len(self.sent)}",
            symbol=request.symbol, side=request.side, order_type=request.order_type, amount=request.amount,
            filled=D(0), avg_price=None, state=OrderState.OPEN, ts=T0,
        )


def buy(reason: str = "momentum entry") -> OrderIntent:
    return OrderIntent(engine="spot", market=MarketType.SPOT, symbol="BTC/USDT", side=Side.BUY,
                       amount=D("0.5"), order_type=OrderType.LIMIT, price=D("100"), notional=D("50"),
                       reason=reason)


async def manager(ledger: Ledger, exchange: WatchedExchange) -> OrderManager:
    om = OrderManager("spot", exchange, ledger, EventBus(), SimClock(T0))  # type: ignore[arg-type]
    await om.new_client_order_id()  # a block of ids, as after the first order
    return om


async def test_the_order_goes_out_before_its_commit_and_the_result_waits_for_it(tmp_path: Path) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = WatchedExchange(ledger)
        om = await manager(ledger, exchange)
        release = block_ledger_thread(ledger)
        submitting = asyncio.ensure_future(om.submit(buy()))
        for _ in range(100):  # the send does not wait for the blocked ledger thread
            if exchange.sent:
                break
            await asyncio.sleep(0.001)
        assert exchange.committed_at_send == [False]
        await asyncio.sleep(0.01)
        assert not submitting.done(), "nothing about the order is recorded before its row is committed"
        release.set()
        result = await asyncio.wait_for(submitting, BOUND)
        assert result.order.state is OrderState.OPEN
        got = await ledger.get_order(result.order.client_order_id)
        assert got is not None and got.state is OrderState.OPEN and got.exchange_order_id == "x-1"


async def test_without_room_in_the_log_the_order_waits_for_its_commit(tmp_path: Path) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = WatchedExchange(ledger)
        om = await manager(ledger, exchange)
        await om.submit(buy(reason="y" * SLOT_SIZE))  # too long for a slot
        for slot in range(SLOTS):  # every slot held by a row not committed yet
            assert ledger._intents.put(_order_row(make_order(f"ke-held-{slot}"))) is not None
        await om.submit(buy())
        assert exchange.committed_at_send == [True, True]


async def test_a_commit_refused_after_the_send_is_a_broken_invariant(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The send went out; the row could not be committed. The order manager raises (the crash path)
    rather than record the answer against a row that is not there, and the row stays in the log."""
    async with await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0)) as ledger:
        exchange = WatchedExchange(ledger)
        om = await manager(ledger, exchange)
        first = await om.submit(buy())
        # The next id collides with the first order's: the database refuses the row as a duplicate.
        monkeypatch.setattr(om, "_take_id", lambda: first.order.client_order_id)
        with pytest.raises(InvariantError, match="refusing a duplicate"):
            await om.submit(buy())
        assert len(exchange.sent) == 2
        assert ledger._intents.in_use() == 1, "kept for the next open"
        assert isinstance(ledger.order_failure(), InvariantError), "the daemon's supervisor stops on this"
        # Until the restart, every order is committed before it is sent.
        monkeypatch.undo()
        assert ledger.log_order(make_order("ke-after")) is None
        release = block_ledger_thread(ledger)
        submitting = asyncio.ensure_future(om.submit(buy()))
        await asyncio.sleep(0.05)
        assert len(exchange.sent) == 2, "not sent while its row cannot be committed"
        release.set()
        await asyncio.wait_for(submitting, BOUND)
        assert len(exchange.sent) == 3 and exchange.committed_at_send[-1]


def test_the_log_sits_beside_the_ledger_file() -> None:
    assert intent_log_path(Path("/data/ledger.sqlite3")) == Path("/data/ledger.sqlite3-intents")
