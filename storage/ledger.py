"""The daemon's memory: orders, fills, positions, closed trades, engine/risk state and the journal.

Intent before action: an order row (with its client order id) is written before the order is sent,
and a restart resumes from what is here. On the order path the row goes into the intent log first
(`log_order`, see `storage.intent_log`: a memory copy that outlives the process, as a commit does) and
is committed right behind the send; any row the log holds at open is committed before anything reads.
Every call is one SQLite transaction, so a crash (SIGKILL included) leaves either all of a fill's
effects (fill, position, closed trade, order progress) or none of them.

SQLite calls block, so none of them runs on the event loop: one dedicated thread owns the connection
and the async methods hand work to it. One thread also means calls are applied in the order they
were made, with no locking. WAL with synchronous=NORMAL survives a process crash (a committed
transaction is in the WAL file, which the OS keeps); FULL adds an fsync per commit for power loss.
A second thread, with a connection of its own, copies the WAL back into the file in the background,
so that slow work never lands on a commit in the order path (see `_Checkpointer`).

The open positions and the orders still in play (pending, unknown, open, partly filled) are also kept
in memory (`_Mirror`), so the reads an engine makes between a price update and its order (its
positions, its resting stops) need no trip to the ledger thread. The ledger thread rebuilds the
mirror's touched rows from the database inside each write's transaction (an order row being inserted
is taken as written) and publishes the new mirror right after the commit, before the writer hears
back: a caller always reads its own writes, and the mirror only ever shows what is committed. This
process is the ledger's only writer (the DATA_DIR lock), so nothing else can change those rows
behind it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import enum
import functools
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from core.clock import DAY_SECONDS, Clock, start_of_utc_day, utc_datetime
from core.errors import InvariantError
from core.types import ZERO, Fill, MarketType, Order, OrderState, OrderType, Position, PositionSide, Side
from core.values import value_type
from storage.intent_log import IntentLog, LoggedRow, Row, UnknownIntentLog
from storage.schema import file_version, migrate, refuse_newer

log = structlog.get_logger("ledger")

T = TypeVar("T")

Synchronous = Literal["NORMAL", "FULL"]

# Average prices and partial cost bases need a division; 40 digits keep the rounding far below any
# exchange's precision, and a position's last reduction realizes the trade's exact total (see
# `apply_fill`), so a round trip's realized P&L is its cash P&L.
_MONEY = Context(prec=40)


# Orders that may still change on the exchange; every other state is final. These are the mirrored ones.
IN_PLAY = frozenset({OrderState.PENDING, OrderState.UNKNOWN, OrderState.OPEN, OrderState.PARTIALLY_FILLED})


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET
"""Default of `update_position`'s levels: leave as is (None clears a level)."""


@value_type
class ClosedTrade:
    """A position from open to flat. `realized_pnl` is net of every fee paid on it; `amount` is the
    total amount exited, `entry_price`/`exit_price` the amount-weighted averages of its fills."""

    engine: str
    market: MarketType
    symbol: str
    side: PositionSide
    amount: Decimal
    entry_price: Decimal
    exit_price: Decimal
    realized_pnl: Decimal
    fees: Decimal
    opened_at: float
    closed_at: float
    leverage: int = 1
    close_order_id: str = ""


@value_type
class FillResult:
    """What one fill did. `new` is False for a fill already recorded (then nothing changed).
    `realized_pnl` is this fill's share: gross on a partial reduction, net of the position's
    accumulated fees on the fill that closes it, so the sum over a round trip is its cash P&L.
    `position` is the position after the fill (None when flat)."""

    new: bool
    position: Position | None
    realized_pnl: Decimal
    closed: ClosedTrade | None


# --- position arithmetic (pure) --------------------------------------------------------------------


@dataclass(slots=True)
class _Book:
    """A position with the running totals the ledger keeps beside what `Position` shows."""

    engine: str
    market: MarketType
    symbol: str
    side: PositionSide
    amount: Decimal
    cost: Decimal
    opened_at: float
    leverage: int
    realized: Decimal
    fees: Decimal
    entry_amount: Decimal
    entry_value: Decimal
    exit_amount: Decimal
    exit_value: Decimal
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def entry_price(self) -> Decimal:
        with localcontext(_MONEY):
            return self.cost / self.amount

    def position(self) -> Position:
        return Position(
            engine=self.engine,
            market=self.market,
            symbol=self.symbol,
            side=self.side,
            amount=self.amount,
            entry_price=self.entry_price,
            opened_at=self.opened_at,
            leverage=self.leverage,
            realized_pnl=self.realized,
            fees=self.fees,
            stop_loss=self.stop_loss,
            take_profit=self.take_profit,
            meta=dict(self.meta),
        )


def split_symbol(symbol: str) -> tuple[str, str]:
    """('BTC', 'USDT') for 'BTC/USDT' and for the futures form 'BTC/USDT:USDT'."""
    base, _, rest = symbol.partition("/")
    return base, rest.partition(":")[0]


def fee_effect(fill: Fill) -> tuple[Decimal, Decimal]:
    """(amount the position moves by, fee in quote currency).

    Binance spot takes a buy's fee out of the bought asset, so the position grows by amount - fee and
    the fee's quote value is the cost. A fee in a third asset (BNB) has no price here: it is recorded
    with the fill but not charged to P&L, and logged so that a user knows the figure is incomplete.
    """
    base, quote = split_symbol(fill.symbol)
    asset = fill.fee_asset.upper()
    if fill.fee == 0 or asset in ("", quote.upper()):
        return fill.amount, fill.fee
    if asset == base.upper():
        with localcontext(_MONEY):
            if fill.side is Side.BUY:
                if fill.fee >= fill.amount:
                    raise InvariantError(
                        f"fill {fill.trade_id}: base fee {fill.fee} >= amount {fill.amount}"
                    )
                return fill.amount - fill.fee, fill.fee * fill.price
            return fill.amount, fill.fee * fill.price
    log.warning("fee in a third asset not charged to P&L", symbol=fill.symbol, fee=str(fill.fee),
                fee_asset=fill.fee_asset, trade_id=fill.trade_id)
    return fill.amount, ZERO


def apply_fill(
    book: _Book | None, fill: Fill, qty: Decimal, fee: Decimal, leverage: int
) -> tuple[_Book | None, Decimal, ClosedTrade | None]:
    """Move a position by one fill: (position after, realized P&L of this fill, trade it closed).

    Cost basis instead of a rounded entry price: a partial reduction removes its proportional share
    of the cost, the reduction that closes removes whatever is left, so nothing is lost to rounding.
    """
    with localcontext(_MONEY):
        direction = PositionSide.LONG if fill.side is Side.BUY else PositionSide.SHORT
        if book is None:
            return _opened(fill, direction, qty, fee, leverage), ZERO, None
        if book.side is direction:
            book.amount += qty
            book.cost += qty * fill.price
            book.entry_amount += qty
            book.entry_value += qty * fill.price
            book.fees += fee
            return book, ZERO, None
        reduce = min(qty, book.amount)
        closing = reduce == book.amount
        removed = book.cost if closing else book.cost * reduce / book.amount
        exit_value = reduce * fill.price
        if closing:
            # The whole trade's gross from its exact sums (every entry and exit value is a product of
            # exchange figures, exact here), less what the partial reductions already realized: their
            # shares of the cost were rounded, and a running balance of 40 digits can lose their tail,
            # which would leave a cash-breakeven trade at +-1E-38 (a "win" or a "loss").
            exits = book.exit_value + exit_value
            total = exits - book.entry_value if book.side is PositionSide.LONG else book.entry_value - exits
            gross = total - book.realized
            realized_after = total  # set, not added: the sum could need a digit more than the context has
        else:
            gross = exit_value - removed if book.side is PositionSide.LONG else removed - exit_value
            realized_after = book.realized + gross
        close_fee = fee if reduce == qty else fee * reduce / qty
        book.amount -= reduce
        book.cost -= removed
        book.realized = realized_after
        book.fees += close_fee
        book.exit_amount += reduce
        book.exit_value += exit_value
        if book.amount > 0:
            return book, gross, None
        closed = ClosedTrade(
            engine=book.engine,
            market=book.market,
            symbol=book.symbol,
            side=book.side,
            amount=book.exit_amount,
            entry_price=book.entry_value / book.entry_amount,
            exit_price=book.exit_value / book.exit_amount,
            realized_pnl=book.realized - book.fees,
            fees=book.fees,
            opened_at=book.opened_at,
            closed_at=fill.ts,
            leverage=book.leverage,
            close_order_id=fill.client_order_id,
        )
        realized = gross - book.fees
        remainder = qty - reduce
        flipped = _opened(fill, direction, remainder, fee - close_fee, leverage) if remainder > 0 else None
        return flipped, realized, closed


def written_off(book: _Book, ts: float) -> ClosedTrade:
    """The trade a long position ends as when its remainder is written off: the remainder's cost is
    charged as a loss (it is never sold), so the round trip's P&L stays what the sales brought in
    minus what the buys and fees cost."""
    if book.side is not PositionSide.LONG:
        raise InvariantError(f"{book.engine} {book.symbol}: only a long remainder can be written off")
    with localcontext(_MONEY):
        sold = book.exit_amount > 0
        return ClosedTrade(
            engine=book.engine,
            market=book.market,
            symbol=book.symbol,
            side=book.side,
            amount=book.exit_amount if sold else book.entry_amount,
            entry_price=book.entry_value / book.entry_amount,
            exit_price=book.exit_value / book.exit_amount if sold else ZERO,
            realized_pnl=book.realized - book.cost - book.fees,
            fees=book.fees,
            opened_at=book.opened_at,
            closed_at=ts,
            leverage=book.leverage,
            close_order_id="",
        )


def _opened(fill: Fill, side: PositionSide, qty: Decimal, fee: Decimal, leverage: int) -> _Book:
    value = qty * fill.price
    return _Book(
        engine=fill.engine, market=fill.market, symbol=fill.symbol, side=side, amount=qty, cost=value,
        opened_at=fill.ts, leverage=leverage, realized=ZERO, fees=fee, entry_amount=qty,
        entry_value=value, exit_amount=ZERO, exit_value=ZERO,
    )


# --- encoding ---------------------------------------------------------------------------------------


def _money(value: Decimal, what: str) -> str:
    """Decimals only, and finite: a float or a NaN reaching the ledger is a bug upstream."""
    if not isinstance(value, Decimal) or not value.is_finite():
        raise InvariantError(f"{what} must be a finite Decimal, got {value!r}")
    return str(value)


def _money_or_none(value: Decimal | None, what: str) -> str | None:
    return None if value is None else _money(value, what)


def _dec(text: str) -> Decimal:
    return Decimal(text)


def _dec_or_none(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _journal_default(obj: object) -> object:
    """The journal records whatever an event carried; an odd value is written as text rather than
    stopping the journal writer (which would stop the daemon)."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def _order_from(row: sqlite3.Row) -> Order:
    return Order(
        client_order_id=row["client_order_id"],
        engine=row["engine"],
        market=MarketType(row["market"]),
        symbol=row["symbol"],
        side=Side(row["side"]),
        order_type=OrderType(row["order_type"]),
        amount=_dec(row["amount"]),
        price=_dec_or_none(row["price"]),
        stop_price=_dec_or_none(row["stop_price"]),
        reduce_only=bool(row["reduce_only"]),
        state=OrderState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        filled=_dec(row["filled"]),
        avg_price=_dec_or_none(row["avg_price"]),
        exchange_order_id=row["exchange_order_id"],
        leverage=row["leverage"],
        reason=row["reason"],
    )


def _fill_from(row: sqlite3.Row) -> Fill:
    return Fill(
        client_order_id=row["client_order_id"],
        trade_id=row["trade_id"],
        engine=row["engine"],
        market=MarketType(row["market"]),
        symbol=row["symbol"],
        side=Side(row["side"]),
        amount=_dec(row["amount"]),
        price=_dec(row["price"]),
        fee=_dec(row["fee"]),
        fee_asset=row["fee_asset"],
        ts=row["ts"],
        reduce_only=bool(row["reduce_only"]),
    )


def _book_from(row: sqlite3.Row) -> _Book:
    return _Book(
        engine=row["engine"],
        market=MarketType(row["market"]),
        symbol=row["symbol"],
        side=PositionSide(row["side"]),
        amount=_dec(row["amount"]),
        cost=_dec(row["cost"]),
        opened_at=row["opened_at"],
        leverage=row["leverage"],
        realized=_dec(row["realized_pnl"]),
        fees=_dec(row["fees"]),
        entry_amount=_dec(row["entry_amount"]),
        entry_value=_dec(row["entry_value"]),
        exit_amount=_dec(row["exit_amount"]),
        exit_value=_dec(row["exit_value"]),
        stop_loss=_dec_or_none(row["stop_loss"]),
        take_profit=_dec_or_none(row["take_profit"]),
        meta=json.loads(row["meta"]),
    )


def _trade_from(row: sqlite3.Row) -> ClosedTrade:
    return ClosedTrade(
        engine=row["engine"],
        market=MarketType(row["market"]),
        symbol=row["symbol"],
        side=PositionSide(row["side"]),
        amount=_dec(row["amount"]),
        entry_price=_dec(row["entry_price"]),
        exit_price=_dec(row["exit_price"]),
        realized_pnl=_dec(row["realized_pnl"]),
        fees=_dec(row["fees"]),
        opened_at=row["opened_at"],
        closed_at=row["closed_at"],
        leverage=row["leverage"],
        close_order_id=row["close_order_id"],
    )


@value_type
class _Mirror:
    """Committed open positions and in-play orders. Built on the ledger thread and replaced whole,
    never changed in place: the loop thread reads whichever one is current without a lock, and hands
    out copies, since callers change the objects they get."""

    positions: dict[tuple[str, str], Position]  # (engine, symbol)
    orders: dict[str, tuple[float, int, Order]]  # client order id -> (created_at, rowid, order)


def _copy_position(p: Position) -> Position:
    return Position(p.engine, p.market, p.symbol, p.side, p.amount, p.entry_price, p.opened_at, p.leverage,
                    p.realized_pnl, p.fees, p.stop_loss, p.take_profit, dict(p.meta))


def _copy_order(o: Order) -> Order:
    return Order(o.client_order_id, o.engine, o.market, o.symbol, o.side, o.order_type, o.amount, o.price,
                 o.stop_price, o.reduce_only, o.state, o.created_at, o.updated_at, o.filled, o.avg_price,
                 o.exchange_order_id, o.leverage, o.reason)


# The orders table's columns, in the order `_order_row` gives their values.
_ORDER_COLUMNS = (
    "client_order_id", "engine", "market", "symbol", "side", "order_type", "amount", "price", "stop_price",
    "reduce_only", "state", "created_at", "updated_at", "filled", "avg_price", "exchange_order_id", "leverage",
    "reason",
)
_INSERT_ORDER = f"INSERT INTO orders ({', '.join(_ORDER_COLUMNS)}) VALUES ({', '.join('?' * len(_ORDER_COLUMNS))})"


def _order_row(order: Order) -> Row:
    """The order as the values of `_ORDER_COLUMNS`."""
    # (The None tests are written out, not left to _money_or_none: this runs on the order path.)
    price, stop, avg = order.price, order.stop_price, order.avg_price
    return (
        order.client_order_id, order.engine, str(order.market), order.symbol, str(order.side),
        str(order.order_type), _money(order.amount, "amount"), None if price is None else _money(price, "price"),
        None if stop is None else _money(stop, "stop_price"), int(order.reduce_only), str(order.state),
        order.created_at, order.updated_at, _money(order.filled, "filled"),
        None if avg is None else _money(avg, "avg_price"), order.exchange_order_id, order.leverage,
        order.reason,
    )


def _load_mirror(conn: sqlite3.Connection) -> _Mirror:
    positions = {(r["engine"], r["symbol"]): _book_from(r).position()
                 for r in conn.execute("SELECT * FROM positions")}
    states = sorted(str(s) for s in IN_PLAY)
    rows = conn.execute(f"SELECT rowid, * FROM orders WHERE state IN ({', '.join('?' * len(states))})", states)
    orders = {r["client_order_id"]: (r["created_at"], r["rowid"], _order_from(r)) for r in rows}
    return _Mirror(positions, orders)


# --- connection (runs on the ledger thread) -----------------------------------------------------------


def _connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are begun and ended explicitly, one per ledger call.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        try:
            version = file_version(conn)
        except sqlite3.DatabaseError as exc:
            raise sqlite3.DatabaseError(f"ledger {path} cannot be read as SQLite: {exc}") from exc
        refuse_newer(path, version)
        conn.execute("PRAGMA busy_timeout = 5000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"ledger {path}: WAL journal mode refused (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, version)
    except BaseException:
        conn.close()
        raise
    return conn


def _discard(made: list[sqlite3.Connection], logs: list[IntentLog]) -> None:
    for conn in made:
        conn.close()
    for intents in logs:
        intents.close()


def _set_aside(log_path: Path) -> Path:
    """Rename the log to a name no open reads again; the open then makes a new one."""
    n = 1
    while (kept := log_path.with_name(f"{log_path.name}.set-aside-{n}")).exists():
        n += 1
    log_path.rename(kept)
    return kept


def intent_log_path(path: Path) -> Path:
    """The intent log beside the ledger file (and its -wal and -shm): delete or move them together."""
    return path.with_name(path.name + "-intents")


def _recover_intents(conn: sqlite3.Connection, path: Path, found: list[LoggedRow]) -> None:
    """Ledger thread, at open: commit the rows a previous process logged but never committed (it died
    between logging an order and its commit), as they were written, i.e. pending: reconciliation then
    asks the exchange for each by client order id. A row the database refuses is a broken invariant,
    and the ledger does not open: that order may be on the exchange."""
    if not found:
        return
    columns = {r["name"] for r in conn.execute("PRAGMA table_info(orders)")}
    recovered: list[str] = []

    def work() -> None:
        for record in found:
            row = record.row
            cid = row.get("client_order_id")
            unknown = sorted(set(row) - columns)
            if not isinstance(cid, str) or unknown:
                raise InvariantError(
                    f"intent log {intent_log_path(path)}: record {record.seq} is not an order row this "
                    f"ledger can take (columns {unknown or 'without client_order_id'})"
                )
            if conn.execute("SELECT 1 FROM orders WHERE client_order_id = ?", (cid,)).fetchone():
                continue  # committed after all (the process died before giving the slot back)
            try:
                conn.execute(f"INSERT INTO orders ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
            except sqlite3.Error as exc:
                raise InvariantError(
                    f"order {cid} from the intent log {intent_log_path(path)} cannot be written to the "
                    f"ledger ({exc}). It may have been sent. If the disk is full, free space and start "
                    f"again; otherwise check the exchange for this client order id, then move the intent "
                    f"log aside to start."
                ) from exc
            recovered.append(cid)

    _transaction(conn, work, write=True)
    for cid in recovered:
        log.warning("order recovered from the intent log; reconciliation asks the exchange for it",
                    client_order_id=cid)


def _transaction(conn: sqlite3.Connection, work: Callable[[], T], write: bool) -> T:
    # IMMEDIATE takes the write lock up front, so a write never fails half-way on a busy lock;
    # reads get a consistent snapshot across their statements.
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = work()
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full, I/O error) leaves the transaction open: close it, or the next
        # call's statements would silently join it and never be committed.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # a caller cancelled while waiting no longer wants the answer
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _deliver(loop: asyncio.AbstractEventLoop, setter: Callable[[asyncio.Future[Any], Any], None],
             future: asyncio.Future[Any], value: object) -> None:
    if loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to tell
        loop.call_soon_threadsafe(setter, future, value)


_Call = tuple[asyncio.AbstractEventLoop | None, asyncio.Future[Any] | None, Callable[..., Any], tuple[Any, ...]]


class _LedgerThread:
    """The one thread that owns the connection, running calls strictly in the order they were made.

    A queue in and `call_soon_threadsafe` back is the whole hand-off. `run_in_executor` on a
    one-worker ThreadPoolExecutor did the same with a concurrent Future, a work item and
    `wrap_future`'s chaining and state copy on top: about a quarter of every ledger round trip
    (measured p50 37 -> 27 us for an empty call), and the order path makes one to four of them.
    A daemon thread, so a ledger nobody closed cannot hold the interpreter at exit forever; but an
    exit hook lets it finish what was queued first (bounded by EXIT_DRAIN_SECONDS), so a write whose
    caller was cancelled on the way out (shutdown cut short) still commits, as it would have on an
    executor's worker.
    """

    def __init__(self, name: str, checkpointer: _Checkpointer | None = None) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._checkpointer = checkpointer
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._drain_at_exit)

    def _drain_at_exit(self) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join(EXIT_DRAIN_SECONDS)

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)`; the future resolves on the caller's loop. Cancelling the future does
        not take the call back: it still runs, in its turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)` with nobody waiting for it (clean-up, upkeep); thread-safe."""
        self._calls.put((None, None, fn, args))

    def stop(self) -> None:
        """The thread ends after every call queued before this one."""
        atexit.unregister(self._drain_at_exit)
        self._calls.put(None)

    def _next(self) -> _Call | None:
        """The next call; while a checkpoint is due, it is started once the queue has stayed empty for
        IDLE_SECONDS, i.e. between bursts of calls (an order's writes come well under that apart)."""
        checkpointer = self._checkpointer
        while checkpointer is not None and checkpointer.due():
            try:
                return self._calls.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                checkpointer.start()
        return self._calls.get()

    def _serve(self) -> None:
        while (item := self._next()) is not None:
            loop, future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, as an executor would
                if loop is not None and future is not None:
                    if isinstance(exc, StopIteration):  # a future refuses StopIteration itself
                        exc = RuntimeError(f"ledger call raised {exc!r}")
                    _deliver(loop, _fail, future, exc)
                else:
                    # Nothing may end this loop but the stop marker: every later call would wait for ever.
                    with contextlib.suppress(Exception):
                        log.warning("ledger background call failed", call=getattr(fn, "__name__", repr(fn)),
                                    error=repr(exc))
            else:
                if loop is not None and future is not None:
                    _deliver(loop, _succeed, future, result)
            del item, loop, future, fn, args


# Write transactions between two background checkpoints. SQLite's own autocheckpoint runs inside the
# commit that takes the WAL past 1000 pages, on the ledger thread: measured 3-7 ms, nearly all of it
# the first fsync of ~4 MB of WAL, holding up whatever order insert is queued behind it (about 250
# writes apart here, so a few percent of all orders). Checkpointing well before that mark from
# another connection means the commit never has to.
CHECKPOINT_EVERY_WRITES = 64
# At interpreter exit, how long the ledger thread may take to finish the calls already queued.
EXIT_DRAIN_SECONDS = 10.0
# How long the ledger thread must have had nothing to do before a due checkpoint starts.
IDLE_SECONDS = 0.0005

# The write that starts the WAL over while idle (see _Checkpointer): it must change a page's bytes, or
# SQLite skips writing it. A counter under its own state key is that change, and shows how often.
WAL_STATE_KEY = "ledger:wal"
_RESTART_WAL = (
    "INSERT INTO state (key, value, updated_at) VALUES (?, '{\"restarts\": 1}', ?) "
    "ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at, "
    "value = json_set(value, '$.restarts', json_extract(value, '$.restarts') + 1)"
)


class _Checkpointer:
    """PASSIVE WAL checkpoints on a thread and connection of their own.

    In WAL mode a checkpoint runs beside the writer and readers without blocking them, so the copy
    and its fsyncs leave the ledger thread. It starts after enough writes, usually in the middle of
    a burst; a write during the copy adds pages it did not copy, so it runs again once the ledger
    thread has been idle for a moment, with only the burst's tail left. Once the WAL is copied whole,
    the next write starts it over from the top, which costs that write an fsync of the WAL header
    (0.1-0.4 ms measured); so the ledger thread is handed one small write (`_RESTART_WAL`) to pay
    that while still idle, instead of the next order's insert. A failure here costs nothing but
    speed: SQLite's autocheckpoint in the writer still bounds the WAL.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._go = threading.Event()
        self._stopping = False
        self._running = False
        self._retry = False
        self._writes = 0
        self.runs = 0
        # Handed each checkpoint's outcome (True: it copied everything it found); runs it on the ledger
        # thread, which also makes an idle ledger thread look at `due()` again.
        self.report: Callable[[bool], None] | None = None
        self._thread = threading.Thread(target=self._serve, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def note_write(self) -> None:
        """Ledger thread: one more committed write transaction. Enough of them start a checkpoint at
        once: the bulk of the copy (and its fsyncs) overlaps the rest of the burst."""
        self._writes += 1
        if self._writes >= CHECKPOINT_EVERY_WRITES and not self._running and not self._stopping:
            self.start()

    def due(self) -> bool:
        """Ledger thread: a checkpoint that could not copy everything runs again at the next idle
        moment, when only the burst's tail is left to copy."""
        return self._retry and not self._running and not self._stopping

    def settle(self, complete: bool) -> bool:
        """Ledger thread, told a checkpoint's outcome: True when the WAL is now copied whole (nothing
        left out, no write since it started). When writes came in meanwhile it runs again at the next
        idle moment; when it could not copy what it found (another process reading an old snapshot),
        only after the next round of writes, so a long reader cannot make it spin."""
        if not complete:
            return False
        if self._writes:
            self._retry = True
            return False
        return True

    def start(self) -> None:
        """Ledger thread: run one checkpoint now (on the checkpointer's thread)."""
        self._writes = 0
        self._retry = False
        self._running = True
        self._go.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Let a running checkpoint finish (bounded) and end the thread; before the final checkpoint."""
        self._stopping = True
        self._go.set()
        self._thread.join(timeout)

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        failures = 0
        try:
            while True:
                self._go.wait()
                self._go.clear()
                if self._stopping:
                    return
                complete = False
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, isolation_level=None)
                    # fetchall: a statement left unfinished would hold a read lock, and no WAL restart
                    # could happen while it does.
                    ((busy, frames, copied),) = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                    complete = not busy and frames == copied
                    if failures:
                        log.info("background WAL checkpoint works again", path=str(self._path), failures=failures)
                        failures = 0
                except Exception as exc:
                    # One failure (a locked or busy file, an I/O hiccup) must not end the upkeep for the
                    # process's life: drop the connection and try again after the next round of writes.
                    # SQLite's own autocheckpoint still bounds the WAL meanwhile.
                    failures += 1
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                        conn = None
                    if failures == 1 or failures % 100 == 0:
                        log.warning("background WAL checkpoint failed; retried after the next writes",
                                    path=str(self._path), error=str(exc), failures=failures)
                finally:
                    self._running = False
                if self.report is not None and not self._stopping:
                    self.report(complete)
        finally:
            if conn is not None:
                conn.close()


class Ledger:
    """Open with `await Ledger.open(path, clock)`. Every write, and every read the mirror cannot answer,
    is one transaction on the ledger thread."""

    def __init__(self, path: Path, clock: Clock, thread: _LedgerThread, checkpointer: _Checkpointer,
                 conn: sqlite3.Connection, intents: IntentLog, mirror: _Mirror) -> None:
        self.path = path
        self.clock = clock
        self._thread = thread
        self._checkpointer = checkpointer
        self._conn = conn  # touched only on the ledger thread
        self._intents = intents  # put from the loop (log_order), released on the ledger thread
        # Set on the ledger thread when the commit of a logged (already sendable) row fails: see
        # `order_failure`.
        self._order_failure: BaseException | None = None
        self._closed = False
        # Replaced by the ledger thread after each commit that touched a mirrored row; read by anyone.
        self._mirror = mirror
        # Ledger thread only: the mirrored rows the current write transaction touched.
        self._touched_positions: set[tuple[str, str]] = set()
        self._touched_orders: set[str] = set()
        checkpointer.report = functools.partial(thread.call_soon, self._after_checkpoint)

    @classmethod
    async def open(cls, path: Path, clock: Clock, synchronous: Synchronous = "NORMAL") -> Ledger:
        """Create the folder and file if needed, refuse a newer schema, apply missing migrations."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        path = Path(path)
        checkpointer = _Checkpointer(path)
        thread = _LedgerThread("ledger", checkpointer)
        made: list[sqlite3.Connection] = []
        logs: list[IntentLog] = []

        def connect() -> tuple[sqlite3.Connection, IntentLog, _Mirror]:
            made.append(_connect(path, synchronous))
            # A new ledger (this open may have created the file, or an earlier open that failed did):
            # no order and no sequence. Order ids come only from blocks of the sequence, committed
            # before the first id is used, so a ledger whose order is in the log is never new.
            fresh = made[0].execute(
                "SELECT NOT EXISTS (SELECT 1 FROM orders) AND NOT EXISTS (SELECT 1 FROM sequences)"
            ).fetchone()[0] == 1
            log_path = intent_log_path(path)
            try:
                intents, found = IntentLog.open(log_path, _ORDER_COLUMNS)
                if found and fresh:
                    # The database was deleted and its log kept: these rows belong to a ledger that is
                    # gone. Kept aside for a person to look at, not taken into a new ledger.
                    intents.close()
                    kept = _set_aside(log_path)
                    log.warning("intent log set aside: its ledger database is new", path=str(kept),
                                rows=len(found))
                    intents, found = IntentLog.open(log_path, _ORDER_COLUMNS)
            except UnknownIntentLog as exc:
                raise InvariantError(
                    f"intent log {log_path} was written by another version of this program ({exc}); it may "
                    f"hold orders that were sent but are not in the ledger. Start that version again to "
                    f"recover them, or check the exchange and move the file aside."
                ) from exc
            logs.append(intents)
            _recover_intents(made[0], path, found)
            intents.clear()
            return made[0], intents, _load_mirror(made[0])

        try:
            conn, intents, mirror = await thread.call(connect)
        except BaseException:
            # Cancelled while connecting: the connection may still be made; close it on its thread,
            # which runs this after the connect.
            thread.call_soon(_discard, made, logs)
            thread.call_soon(checkpointer.stop)
            thread.stop()
            raise
        log.info("ledger opened", path=str(path), synchronous=synchronous)
        return cls(path, clock, thread, checkpointer, conn, intents, mirror)

    async def close(self) -> None:
        """Checkpoint the WAL into the main file and stop the threads. Calls made before it finish
        first (the thread runs them in order); calls after it raise. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._thread.call(self._close_sync)
        finally:
            self._thread.stop()
        log.info("ledger closed", path=str(self.path))

    def _after_checkpoint(self, complete: bool) -> None:
        """Ledger thread, after a background checkpoint: when it copied the WAL whole, the write that
        starts it over (see `_Checkpointer`); when a write came in meanwhile (its pages were not
        copied, nothing would start over) the checkpoint runs again at the next idle moment."""
        if not self._closed and self._checkpointer.settle(complete):
            conn = self._conn
            _transaction(conn, lambda: conn.execute(_RESTART_WAL, (WAL_STATE_KEY, self.clock.now())), write=True)

    def _close_sync(self) -> None:
        try:
            self._checkpointer.stop()
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            try:
                self._conn.close()
            finally:
                self._intents.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, work: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """Run `work` in one transaction on the ledger thread. A caller cancelled while waiting does
        not undo it: the transaction still commits (or not) as a whole, which is why an order whose
        insert was interrupted is looked up by its client order id, never assumed absent."""
        if self._closed:
            raise InvariantError(f"ledger {self.path} is closed")
        return await self._thread.call(self._transact, work, write)

    def _transact(self, work: Callable[[sqlite3.Connection], T], write: bool) -> T:
        """Ledger thread: one transaction, counted for the background checkpointer when it wrote. The
        mirrored rows it touched are read back inside it and published once it has committed."""
        conn = self._conn
        if not write:
            return _transaction(conn, functools.partial(work, conn), False)
        self._touched_positions.clear()
        self._touched_orders.clear()

        def body() -> tuple[T, _Mirror | None]:
            result = work(conn)
            return result, self._reread(conn)

        try:
            result, mirror = _transaction(conn, body, True)
        finally:
            self._touched_positions.clear()
            self._touched_orders.clear()
        if mirror is not None:
            self._mirror = mirror
        self._checkpointer.note_write()
        return result

    def _reread(self, conn: sqlite3.Connection) -> _Mirror | None:
        """Ledger thread, inside a write transaction: the mirror with the touched rows as they now are
        (None when nothing mirrored was touched)."""
        if not self._touched_positions and not self._touched_orders:
            return None
        current = self._mirror
        positions = current.positions
        if self._touched_positions:
            positions = dict(positions)
            for key in self._touched_positions:
                row = conn.execute("SELECT * FROM positions WHERE engine = ? AND symbol = ?", key).fetchone()
                if row is None:
                    positions.pop(key, None)
                else:
                    positions[key] = _book_from(row).position()
        orders = current.orders
        if self._touched_orders:
            orders = dict(orders)
            for cid in self._touched_orders:
                row = conn.execute("SELECT rowid, * FROM orders WHERE client_order_id = ?", (cid,)).fetchone()
                if row is None or OrderState(row["state"]) not in IN_PLAY:
                    orders.pop(cid, None)
                else:
                    orders[cid] = (row["created_at"], row["rowid"], _order_from(row))
        return _Mirror(positions, orders)

    def _live_mirror(self) -> _Mirror:
        if self._closed:
            raise InvariantError(f"ledger {self.path} is closed")
        return self._mirror

    # --- orders ------------------------------------------------------------------------------------
    def insert_order(self, order: Order) -> asyncio.Future[None]:
        """Intent before action: this row exists before the order is sent. A second insert of the same
        client order id is a broken invariant (it would mean sending an order twice).

        Queued for the ledger thread when called, not when awaited; await the result before sending.
        The order path uses `log_order`, which lets the order go out before the commit."""
        row = _order_row(order)
        written = _copy_order(order)  # as it is now: the caller may change its own copy meanwhile
        if self._closed:
            raise InvariantError(f"ledger {self.path} is closed")
        return self._thread.call(self._insert_order_row, row, written, None)

    def log_order(self, order: Order) -> Callable[[], asyncio.Future[None]] | None:
        """Intent before action, without waiting for the ledger thread: the row is copied into the
        intent log (see `storage.intent_log`) before this returns, so from here on a crash of this
        process leaves it for the next open, exactly as a commit would; the order may be sent at once.

        Returns `commit`: it queues the row's commit for the ledger thread the first time it is called
        and returns the future of that commit every time (it raises what refused the row). The order
        manager calls it once the loop is free after starting the send, so the ledger thread does not
        contend with the send for the GIL; await it before recording anything else about the order.
        None when the log cannot take the row (64 rows not yet committed, or a row too long for a
        slot): use `insert_order` and await it before sending."""
        row = _order_row(order)
        written = _copy_order(order)
        if self._closed:
            raise InvariantError(f"ledger {self.path} is closed")
        if self._order_failure is not None:
            return None  # a logged row was refused: from then on, commit first and send after
        slot = self._intents.put(row)
        if slot is None:
            return None
        queued: list[asyncio.Future[None]] = []

        def commit() -> asyncio.Future[None]:
            if not queued:
                if self._closed:  # the row stays in the log: the next open commits it
                    raise InvariantError(f"ledger {self.path} is closed; order {order.client_order_id} is "
                                         f"in the intent log, for the next start")
                queued.append(self._thread.call(self._insert_order_row, row, written, slot))
            return queued[0]

        return commit

    def order_failure(self) -> BaseException | None:
        """What refused the commit of a row `log_order` had logged, if that ever happened: its order
        may be on the exchange with no row in the database, only in the intent log, which the next
        open commits. Whoever waited for that commit got the error too, but the process must restart
        (the Orchestrator's supervisor checks this); until then `log_order` declines, so every
        further order is committed before it is sent."""
        return self._order_failure

    def _insert_order_row(self, row: tuple[object, ...], written: Order, slot: int | None) -> None:
        try:
            self._write_order_row(row, written, slot)
        except BaseException as exc:
            if slot is not None:  # the order may be out already: see `order_failure`
                self._order_failure = exc
            raise

    def _write_order_row(self, row: tuple[object, ...], written: Order, slot: int | None) -> None:
        """Ledger thread: the order path's write, as one autocommit statement.

        A single INSERT is its own transaction (it takes the write lock when it starts, as BEGIN
        IMMEDIATE would), so BEGIN and COMMIT add nothing but two more statements. They are not free
        on this path: each statement hands the GIL back and forth with the event loop, which is
        meanwhile starting the order's task, and the order waits for every hand-off (about 7 us at
        the median, see bench/tick_to_order_bench.py). The row is exactly `written`, so the mirror
        takes it without reading it back, and is published only after the statement has committed.

        Inside an unfinished transaction the INSERT would join it instead of committing, and the
        order would be sent on a row that is not durable: refused (`_transaction` never leaves one
        open, so this is a broken invariant, not a case to handle)."""
        if self._conn.in_transaction:
            raise InvariantError(
                f"ledger {self.path}: a transaction is still open; refusing to write order "
                f"{written.client_order_id} into it"
            )
        try:
            rowid = self._conn.execute(_INSERT_ORDER, row).lastrowid
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise InvariantError(
                    f"order {written.client_order_id} is already in the ledger; refusing a duplicate"
                ) from exc
            raise InvariantError(f"order {written.client_order_id} refused by the ledger: {exc}") from exc
        if written.state in IN_PLAY:
            current = self._mirror
            orders = dict(current.orders)
            orders[written.client_order_id] = (written.created_at, rowid or 0, written)
            self._mirror = _Mirror(current.positions, orders)
        if slot is not None:
            # Only once committed; a row the database refused stays in the log, for the next open to
            # try again (and refuse to start, saying so, if it is refused again).
            self._intents.release(slot)
        self._checkpointer.note_write()

    async def update_order(
        self,
        client_order_id: str,
        *,
        state: OrderState,
        filled: Decimal | None = None,
        avg_price: Decimal | None = None,
        exchange_order_id: str | None = None,
    ) -> None:
        """None leaves a field as it is. An unknown id raises: every order was inserted first."""
        sets = ["state = ?", "updated_at = ?"]
        args: list[Any] = [str(OrderState(state)), self.clock.now()]
        if filled is not None:
            sets.append("filled = ?")
            args.append(_money(filled, "filled"))
        if avg_price is not None:
            sets.append("avg_price = ?")
            args.append(_money(avg_price, "avg_price"))
        if exchange_order_id is not None:
            sets.append("exchange_order_id = ?")
            args.append(exchange_order_id)
        sql = f"UPDATE orders SET {', '.join(sets)} WHERE client_order_id = ?"

        def work(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, [*args, client_order_id]).rowcount != 1:
                raise InvariantError(f"update of order {client_order_id}, which the ledger does not have")
            self._touched_orders.add(client_order_id)

        await self._run(work)

    async def get_order(self, client_order_id: str) -> Order | None:
        """An order still in play comes from memory; a settled one from the database."""
        held = self._live_mirror().orders.get(client_order_id)
        if held is not None:
            return _copy_order(held[2])

        def work(conn: sqlite3.Connection) -> Order | None:
            row = conn.execute("SELECT * FROM orders WHERE client_order_id = ?", (client_order_id,)).fetchone()
            return None if row is None else _order_from(row)

        return await self._run(work, write=False)

    async def orders_in_states(self, states: Iterable[OrderState], engine: str | None = None) -> list[Order]:
        """Oldest first, so orders are resolved in the order they were made. Orders in play only (the
        engines' question: what is working, what is unsettled) come from memory."""
        chosen = {s if type(s) is OrderState else OrderState(s) for s in states}  # (no Enum call per member)
        if not chosen:
            return []
        if chosen <= IN_PLAY:
            held = [entry for entry in self._live_mirror().orders.values()
                    if entry[2].state in chosen and (engine is None or entry[2].engine == engine)]
            held.sort(key=lambda entry: (entry[0], entry[1]))
            return [_copy_order(entry[2]) for entry in held]
        wanted = sorted(str(s) for s in chosen)
        sql = f"SELECT * FROM orders WHERE state IN ({', '.join('?' * len(wanted))})"
        args: list[Any] = list(wanted)
        if engine is not None:
            sql += " AND engine = ?"
            args.append(engine)
        sql += " ORDER BY created_at, rowid"

        def work(conn: sqlite3.Connection) -> list[Order]:
            return [_order_from(r) for r in conn.execute(sql, args)]

        return await self._run(work, write=False)

    async def recent_orders(self, limit: int) -> list[Order]:
        """Newest first."""

        def work(conn: sqlite3.Connection) -> list[Order]:
            rows = conn.execute("SELECT * FROM orders ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                (max(0, limit),))
            return [_order_from(r) for r in rows]

        return await self._run(work, write=False)

    async def order_counts_by_state(self) -> dict[str, int]:
        """Every state, zero included, so a metrics gauge never silently keeps a stale value."""

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {str(s): 0 for s in OrderState}
            for state, n in conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"):
                counts[state] = n
            return counts

        return await self._run(work, write=False)

    # --- fills and positions -----------------------------------------------------------------------
    async def record_fill(self, fill: Fill, *, leverage: int = 1) -> FillResult:
        """Record a fill and everything it implies, in one transaction; a repeat changes nothing."""
        for name in ("amount", "price", "fee"):
            _money(getattr(fill, name), f"fill {name}")
        if fill.amount <= 0 or fill.price <= 0 or fill.fee < 0:
            raise InvariantError(
                f"fill {fill.client_order_id}/{fill.trade_id}: amount and price must be positive and fee "
                f"not negative (amount={fill.amount}, price={fill.price}, fee={fill.fee})"
            )
        now = self.clock.now()
        return await self._run(functools.partial(self._record_fill, fill=fill, leverage=leverage, now=now))

    def _record_fill(self, conn: sqlite3.Connection, *, fill: Fill, leverage: int, now: float) -> FillResult:
        known = conn.execute(
            "SELECT amount, price FROM fills WHERE client_order_id = ? AND trade_id = ?",
            (fill.client_order_id, fill.trade_id),
        ).fetchone()
        if known is not None:
            if _dec(known["amount"]) != fill.amount or _dec(known["price"]) != fill.price:
                log.warning("repeated fill differs from the recorded one; keeping the first",
                            client_order_id=fill.client_order_id, trade_id=fill.trade_id)
            book = self._load_book(conn, fill.engine, fill.symbol)
            return FillResult(False, None if book is None else book.position(), ZERO, None)
        qty, fee = fee_effect(fill)
        self._touched_positions.add((fill.engine, fill.symbol))
        self._touched_orders.add(fill.client_order_id)
        book = self._load_book(conn, fill.engine, fill.symbol)
        after, realized, closed = apply_fill(book, fill, qty, fee, leverage)
        if closed is not None:
            self._insert_closed(conn, closed)
        if after is None:
            conn.execute("DELETE FROM positions WHERE engine = ? AND symbol = ?", (fill.engine, fill.symbol))
        else:
            self._save_book(conn, after, now)
        conn.execute(
            "INSERT INTO fills (client_order_id, trade_id, engine, market, symbol, side, amount, price,"
            " fee, fee_asset, ts, reduce_only, realized_pnl) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (fill.client_order_id, fill.trade_id, fill.engine, str(fill.market), fill.symbol,
             str(fill.side), str(fill.amount), str(fill.price), str(fill.fee), fill.fee_asset, fill.ts,
             int(fill.reduce_only), str(realized)),
        )
        self._order_progress(conn, fill.client_order_id, now)
        return FillResult(True, None if after is None else after.position(), realized, closed)

    async def write_off(self, engine: str, symbol: str, *, expected_amount: Decimal, reason: str) -> ClosedTrade | None:
        """Close a long position the engine can no longer sell (a remainder below the market's minimum
        order, typically what a buy's fee taken in the base asset leaves after the sale). Left open it
        would block its symbol and count as a position for ever. The coins stay on the account; the
        journal entry (`PositionWrittenOff`) keeps amount and cost for the owner's own books. Returns the
        closed trade, or None when there is no such position or its amount is no longer
        `expected_amount` (a fill landed since the caller looked: it must look again)."""
        now = self.clock.now()

        def work(conn: sqlite3.Connection) -> ClosedTrade | None:
            book = self._load_book(conn, engine, symbol)
            if book is None or book.amount != expected_amount:
                return None
            closed = written_off(book, now)
            self._touched_positions.add((engine, symbol))
            self._insert_closed(conn, closed)
            conn.execute("DELETE FROM positions WHERE engine = ? AND symbol = ?", (engine, symbol))
            payload = {"engine": engine, "symbol": symbol, "amount": str(book.amount), "cost": str(book.cost),
                       "realized_pnl": str(closed.realized_pnl), "reason": reason}
            conn.execute("INSERT INTO journal (ts, kind, payload) VALUES (?, ?, ?)",
                         (now, "PositionWrittenOff", json.dumps(payload)))
            return closed

        return await self._run(work)

    @staticmethod
    def _insert_closed(conn: sqlite3.Connection, closed: ClosedTrade) -> None:
        conn.execute(
            "INSERT INTO closed_trades (engine, market, symbol, side, amount, entry_price, exit_price,"
            " realized_pnl, fees, leverage, opened_at, closed_at, close_order_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (closed.engine, str(closed.market), closed.symbol, str(closed.side), str(closed.amount),
             str(closed.entry_price), str(closed.exit_price), str(closed.realized_pnl),
             str(closed.fees), closed.leverage, closed.opened_at, closed.closed_at,
             closed.close_order_id),
        )

    @staticmethod
    def _load_book(conn: sqlite3.Connection, engine: str, symbol: str) -> _Book | None:
        row = conn.execute("SELECT * FROM positions WHERE engine = ? AND symbol = ?", (engine, symbol)).fetchone()
        return None if row is None else _book_from(row)

    @staticmethod
    def _save_book(conn: sqlite3.Connection, b: _Book, now: float) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO positions (engine, symbol, market, side, amount, entry_price, cost,"
            " opened_at, leverage, realized_pnl, fees, entry_amount, entry_value, exit_amount, exit_value,"
            " stop_loss, take_profit, meta, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (b.engine, b.symbol, str(b.market), str(b.side), str(b.amount), str(b.entry_price), str(b.cost),
             b.opened_at, b.leverage, str(b.realized), str(b.fees), str(b.entry_amount),
             str(b.entry_value), str(b.exit_amount), str(b.exit_value),
             None if b.stop_loss is None else str(b.stop_loss),
             None if b.take_profit is None else str(b.take_profit), json.dumps(b.meta), now),
        )

    @staticmethod
    def _order_progress(conn: sqlite3.Connection, client_order_id: str, now: float) -> None:
        """The order's filled amount and average price, from its own fills (not from what an exchange
        said last), so they agree with the positions after a crash between the two."""
        order = conn.execute("SELECT amount, state FROM orders WHERE client_order_id = ?",
                             (client_order_id,)).fetchone()
        if order is None:
            # A fill of an order this ledger never wrote (found during reconciliation): the fill and
            # the position count, there is no order row to advance.
            log.warning("fill for an order not in the ledger", client_order_id=client_order_id)
            return
        filled = ZERO
        value = ZERO
        with localcontext(_MONEY):
            for amount, price in conn.execute("SELECT amount, price FROM fills WHERE client_order_id = ?",
                                              (client_order_id,)):
                filled += _dec(amount)
                value += _dec(amount) * _dec(price)
            avg = value / filled
        state = OrderState(order["state"])
        if filled >= _dec(order["amount"]):
            state = OrderState.FILLED
        elif not state.is_terminal:
            state = OrderState.PARTIALLY_FILLED
        conn.execute(
            "UPDATE orders SET filled = ?, avg_price = ?, state = ?, updated_at = ? WHERE client_order_id = ?",
            (str(filled), str(avg), str(state), now, client_order_id),
        )

    async def fills(self, engine: str | None = None, since: float | None = None,
                    limit: int | None = None) -> list[Fill]:
        """Oldest first (the order they are replayed in); with `limit`, the latest `limit` of them."""
        where: list[str] = []
        args: list[Any] = []
        if engine is not None:
            where.append("engine = ?")
            args.append(engine)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        sql = "SELECT * FROM fills" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY ts DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(max(0, limit))

        def work(conn: sqlite3.Connection) -> list[Fill]:
            return [_fill_from(r) for r in conn.execute(sql, args)][::-1]

        return await self._run(work, write=False)

    async def positions(self, engine: str | None = None) -> list[Position]:
        """Open positions by engine and symbol, from memory (see `_Mirror`)."""
        held = self._live_mirror().positions
        return [_copy_position(held[key]) for key in sorted(held) if engine is None or key[0] == engine]

    async def position(self, engine: str, symbol: str) -> Position | None:
        """One engine's open position in a symbol, from memory: what an exit reads under the trade lock
        before it sells, without copying the engine's other positions."""
        held = self._live_mirror().positions.get((engine, symbol))
        return None if held is None else _copy_position(held)

    async def update_position(
        self,
        engine: str,
        symbol: str,
        *,
        stop_loss: Decimal | _Unset | None = UNSET,
        take_profit: Decimal | _Unset | None = UNSET,
        meta: dict[str, str] | None = None,
    ) -> bool:
        """Set exit levels and/or replace `meta`; omitted arguments stay as they are, None clears a
        level. Returns False when there is no such position (it closed meanwhile)."""
        sets: list[str] = []
        args: list[Any] = []
        if not isinstance(stop_loss, _Unset):
            sets.append("stop_loss = ?")
            args.append(_money_or_none(stop_loss, "stop_loss"))
        if not isinstance(take_profit, _Unset):
            sets.append("take_profit = ?")
            args.append(_money_or_none(take_profit, "take_profit"))
        if meta is not None:
            sets.append("meta = ?")
            args.append(json.dumps(meta))
        sets.append("updated_at = ?")
        args.append(self.clock.now())
        sql = f"UPDATE positions SET {', '.join(sets)} WHERE engine = ? AND symbol = ?"

        def work(conn: sqlite3.Connection) -> bool:
            self._touched_positions.add((engine, symbol))
            return bool(conn.execute(sql, [*args, engine, symbol]).rowcount == 1)

        return await self._run(work)

    async def closed_trades(self, engine: str | None = None, limit: int = 50) -> list[ClosedTrade]:
        """Newest first."""
        sql = "SELECT * FROM closed_trades" + (" WHERE engine = ?" if engine is not None else "")
        sql += " ORDER BY closed_at DESC, id DESC LIMIT ?"
        args: list[Any] = [engine] if engine is not None else []
        args.append(max(0, limit))

        def work(conn: sqlite3.Connection) -> list[ClosedTrade]:
            return [_trade_from(r) for r in conn.execute(sql, args)]

        return await self._run(work, write=False)

    async def realized_pnl_by_day(self, days: int, now: float) -> list[tuple[str, str, Decimal, int]]:
        """(UTC day, engine, net realized P&L, trades closed) for the last `days` days including today,
        oldest day first. A trade counts on the day it closed."""
        if days < 1:
            raise ValueError(f"days must be at least 1, got {days}")
        start = start_of_utc_day(now) - (days - 1) * DAY_SECONDS

        def work(conn: sqlite3.Connection) -> list[tuple[str, str, Decimal, int]]:
            totals: dict[tuple[str, str], tuple[Decimal, int]] = {}
            rows = conn.execute(
                "SELECT engine, realized_pnl, closed_at FROM closed_trades WHERE closed_at >= ? AND "
                "closed_at <= ?", (start, now))
            with localcontext(_MONEY):
                for engine, pnl, closed_at in rows:
                    key = (utc_datetime(closed_at).strftime("%Y-%m-%d"), engine)
                    total, n = totals.get(key, (ZERO, 0))
                    totals[key] = (total + _dec(pnl), n + 1)
            return [(day, engine, p, n) for (day, engine), (p, n) in sorted(totals.items())]

        return await self._run(work, write=False)

    async def realized_pnl(self, engine: str | None = None) -> Decimal:
        """All time: closed trades net of their fees, plus what partial reductions of still-open
        positions realized (their fees are charged when they close). Equals the sum of every
        FillResult.realized_pnl, less the cost and fees that write-offs charged."""
        where = " WHERE engine = ?" if engine is not None else ""
        args = (engine,) if engine is not None else ()

        def work(conn: sqlite3.Connection) -> Decimal:
            total = ZERO
            with localcontext(_MONEY):
                for (pnl,) in conn.execute(f"SELECT realized_pnl FROM closed_trades{where}", args):
                    total += _dec(pnl)
                for (pnl,) in conn.execute(f"SELECT realized_pnl FROM positions{where}", args):
                    total += _dec(pnl)
            return total

        return await self._run(work, write=False)

    # --- key-value state ---------------------------------------------------------------------------
    async def get_state(self, key: str) -> dict[str, Any] | None:
        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return None if row is None else dict(json.loads(row[0]))

        return await self._run(work, write=False)

    async def set_state(self, key: str, value: dict[str, Any]) -> None:
        """Plain JSON, strictly: a Decimal must be passed as a string, so that it comes back as the
        same text instead of silently turning into a float."""
        if not isinstance(value, dict):
            raise TypeError(f"state {key!r} must be a dict, got {type(value).__name__}")
        now = self.clock.now()

        def work(conn: sqlite3.Connection) -> None:
            try:
                text = json.dumps(value)
            except TypeError as exc:
                raise TypeError(f"state {key!r} is not plain JSON ({exc}); store Decimals as str") from exc
            conn.execute("INSERT OR REPLACE INTO state (key, value, updated_at) VALUES (?, ?, ?)",
                         (key, text, now))

        await self._run(work)

    async def next_sequence(self, name: str) -> int:
        """1, 2, 3, ... per name, persisted before it is returned, so an id built from it is never
        handed out twice, even across a crash."""

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO sequences (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
                (name,),
            ).fetchone()
            return int(row[0])

        return await self._run(work)

    # --- journal -----------------------------------------------------------------------------------
    async def journal(self, kind: str, payload: dict[str, Any], ts: float) -> None:
        await self.journal_many([(kind, payload, ts)])

    async def journal_many(self, rows: list[tuple[str, dict[str, Any], float]]) -> None:
        """A burst of events in one transaction (one commit instead of one per event)."""
        if not rows:
            return
        batch = list(rows)

        def work(conn: sqlite3.Connection) -> None:
            encoded = [(ts, kind, json.dumps(payload, default=_journal_default)) for kind, payload, ts in batch]
            conn.executemany("INSERT INTO journal (ts, kind, payload) VALUES (?, ?, ?)", encoded)

        await self._run(work)

    async def read_journal(self, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first (in the order written): dicts with id, ts, kind and payload."""
        sql = "SELECT id, ts, kind, payload FROM journal" + (" WHERE kind = ?" if kind is not None else "")
        sql += " ORDER BY id DESC LIMIT ?"
        args: list[Any] = [kind] if kind is not None else []
        args.append(max(0, limit))

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [{"id": r["id"], "ts": r["ts"], "kind": r["kind"], "payload": json.loads(r["payload"])}
                    for r in conn.execute(sql, args)]

        return await self._run(work, write=False)
