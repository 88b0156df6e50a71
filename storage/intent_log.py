"""The ledger's intent log: order rows made durable against a crash of this process by a memory write.

Intent before action needs the order row to survive the process before the order is sent. A SQLite
commit gives that, but from the event loop it costs a round trip to the ledger thread (two thread
wake-ups and GIL hand-offs around the INSERT, 60-100 us here), and the send waits for all of it.
This log gives the same guarantee with a copy into a shared memory mapping of a small file in
DATA_DIR: once the bytes are in the mapping they are in the kernel's page cache, which outlives the
process (SIGKILL, OOM kill, a crash), and the kernel writes them to the file on its own. That is
exactly what SQLite's WAL with synchronous=NORMAL promises for a commit (nothing more: neither
survives a power cut that came before the kernel wrote back). Writing into an already mapped
page is a memory store, not a system call, so it is done on the event loop. Not quite free: once
the kernel has written a page back (every 5-30 s), the next store into it takes a minor fault while
the filesystem marks it dirty again (measured here on ext4: p50 12 us, max 56 us), so the first
order after a quiet spell pays that; never a read from disk, since every page is written at open.

The SQLite row is still written, right behind, on the ledger thread; the log only has to cover the
moments between the send and that commit. A slot is given back once its row is committed, so the
log holds only rows the database may not have. At open, before anything reads the ledger, rows
found in the log that the database lacks are inserted (as written: pending, so reconciliation asks
the exchange for them by client order id), and the log is cleared.

One record per slot: a 20-byte header (magic, CRC-32, payload length, sequence number) and the row
with its column names, as two `marshal` dumps (the names' tuple, then the values' tuple). marshal
rather than JSON because the encoding runs on the order path: one C call of about 0.4 us, where the
JSON encoder was about 2.6 us and six calls through the json module's Python layer. Python may change
marshal's format between versions (for these plain types it has not since 3.4, and newer versions
read older dumps); it is only ever read back here, from our own file, after the CRC has passed, and
only tuples of exact str, int, float, bool and None are taken from it. `put` takes nothing else: a
value marshal would write as something else (a numpy float goes out as bytes) could not be read
back, so such a row is refused, and the order waits for its commit instead. The layout
before (magic KEI1, the row as JSON) is still read, so rows an older version left are committed
after an upgrade. A record torn by a crash mid-copy fails its CRC and is ignored, which is safe:
the order is sent only after the copy has finished.

Threads: `put` runs on the event loop's thread only; `release` on the ledger thread; open, `clear`
and `close` on the ledger thread too (no `put` can be in progress then: the ledger refuses calls
before it is open and after it closes). Different threads touch different slots, and the list of
free slots is only ever set item by item, which the GIL keeps whole.
"""

from __future__ import annotations

import io
import json
import marshal
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from core.values import value_type

MAGIC = b"KEI2"
MAGIC_JSON = b"KEI1"  # the earlier layout: the row as JSON (read, never written)
_HEADER = struct.Struct("<4sIIQ")  # magic, crc32 of the payload (from seq), payload length, seq
SLOT_SIZE = 1024
SLOTS = 64
MAX_PAYLOAD = SLOT_SIZE - _HEADER.size
_ZERO_MAGIC = b"\0" * len(MAGIC)


@value_type
class LoggedRow:
    """A record found at open: its sequence number and the row it holds, by column name (the names
    travel with each record, so a row logged by an older version of the program still lands in the
    right columns after an upgrade)."""

    seq: int
    row: dict[str, Any]


# What a record's values may be, exactly: subclasses (an IntEnum, numpy's str_) are refused too.
_EXACT_SCALARS = frozenset((str, int, float, bool, type(None)))
Row = tuple[str | int | float | None, ...]  # what a record holds: plain values, which marshal takes


def _crc(seq: int, payload: bytes) -> int:
    """The payload's CRC-32, started from the sequence number so that it covers that too (a torn
    length gives a different payload, which fails it as well)."""
    return zlib.crc32(payload, seq & 0xFFFFFFFF)


class UnknownIntentLog(Exception):
    """The log holds something that is neither empty nor a record of this layout (another version of
    the program wrote it): its orders cannot be read, so they must not be wiped either."""


def _read_records(data: bytes) -> list[LoggedRow]:
    """The valid records in a log file's bytes, oldest first. An empty slot, or a record torn by a crash
    (this layout's magic, but a length or CRC that does not hold), is skipped; anything else in a
    slot's magic raises `UnknownIntentLog`, and so does a whole record (its CRC holds) that is not an
    order row: it was written, so its order may have been sent, and skipping it would lose that order
    without a word. A new layout must change MAGIC, so that an older program refuses its log instead
    of reading past it."""
    found: list[LoggedRow] = []
    for offset in range(0, len(data) - _HEADER.size + 1, SLOT_SIZE):
        magic, crc, length, seq = _HEADER.unpack_from(data, offset)
        if magic == _ZERO_MAGIC:
            continue
        if magic not in (MAGIC, MAGIC_JSON):
            raise UnknownIntentLog(f"slot {offset // SLOT_SIZE} starts with {magic!r}, not {MAGIC!r}")
        if length > MAX_PAYLOAD or offset + _HEADER.size + length > len(data):
            continue
        payload = data[offset + _HEADER.size: offset + _HEADER.size + length]
        if _crc(seq, payload) != crc:
            continue
        decoded = _decode(payload) if magic == MAGIC else _decode_json(payload)
        if decoded is None:
            raise UnknownIntentLog(f"slot {offset // SLOT_SIZE} holds a whole {magic.decode()} record that is "
                                   f"not an order row this version can read")
        columns, values = decoded
        found.append(LoggedRow(seq, dict(zip(columns, values, strict=True))))
    found.sort(key=lambda r: r.seq)
    return found


def _row_of(columns: object, values: object) -> tuple[list[str], list[object]] | None:
    """Column names and values, when they are what `put` writes: as many names (str) as values."""
    if not isinstance(columns, (list, tuple)) or not isinstance(values, (list, tuple)):
        return None
    if len(columns) != len(values) or not all(isinstance(c, str) for c in columns):
        return None
    return list(columns), list(values)


def _decode(payload: bytes) -> tuple[list[str], list[object]] | None:
    """This layout's payload: marshal's dump of the names' tuple, then of the values' tuple."""
    stream = io.BytesIO(payload)
    try:
        columns = marshal.load(stream)
        values = marshal.load(stream)
    except (EOFError, ValueError, TypeError):
        return None
    if stream.tell() != len(payload) or not isinstance(values, tuple):
        return None
    if not _EXACT_SCALARS.issuperset(map(type, values)):
        return None
    return _row_of(columns, values)


def _decode_json(payload: bytes) -> tuple[list[str], list[object]] | None:
    """The earlier layout's payload: {"c": [names], "r": [values]}."""
    try:
        record = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return _row_of(record.get("c"), record.get("r"))


class IntentLog:
    """A ring of fixed slots in a mapped file. Open it with `IntentLog.open(path)` (blocking: on the
    ledger thread), which also returns the records a previous process left."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap, columns: tuple[str, ...]) -> None:
        self.path = path
        # Every record starts the same way; only the values are encoded per row.
        self._prefix = marshal.dumps(tuple(columns))
        self._fd = fd
        self._map = mapping
        self._free = [True] * SLOTS
        self._next = 0  # the slot the next put tries
        self._seq = 0
        self._closed = False

    @classmethod
    def open(cls, path: Path, columns: tuple[str, ...]) -> tuple[IntentLog, list[LoggedRow]]:
        """Map the log (creating it, full size, if missing) and read what a previous process left in
        it. Rows put from now on are the values of `columns`, in that order. Every page is written
        once here, so the loop's later copies never read a page in from disk."""
        path = Path(path)
        size = SLOTS * SLOT_SIZE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            left = os.pread(fd, max(size, os.fstat(fd).st_size), 0)
            if left.strip(b"\0") and len(left) != size:
                # Not this layout's size, and not empty: another version's log. Left as it is.
                raise UnknownIntentLog(f"{len(left)} bytes, not {size}")
            records = _read_records(left)
            if len(left) != size:
                # A new (or empty) log: written out in full, so no page of it is a hole.
                os.ftruncate(fd, 0)
                os.pwrite(fd, bytes(size), 0)
                os.fsync(fd)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        log = cls(path, fd, mapping, columns)
        # Touch every page (the records themselves stay until `clear`): resident and writable.
        for offset in range(0, size, mmap.PAGESIZE):
            mapping[offset] = mapping[offset]
        return log, records

    def put(self, row: Row) -> int | None:
        """Event loop: copy the row (the values of `columns`) into the next slot; from then on a crash
        of this process leaves it for the next open. Returns the slot, to `release` once the database
        has the row; None when the log cannot take it (that slot's row is not committed yet, the row
        is too long, or a value is not exactly a str, int, float, bool or None): the caller then waits
        for the commit instead."""
        if self._closed:
            return None
        slot = self._next
        if not self._free[slot]:
            return None
        if not _EXACT_SCALARS.issuperset(map(type, row)):
            return None  # (see the module's docstring: it could not be read back as it was)
        payload = self._prefix + marshal.dumps(row)
        length = len(payload)
        if length > MAX_PAYLOAD:
            return None
        seq = self._seq
        self._seq = seq + 1
        self._next = (slot + 1) % SLOTS
        self._free[slot] = False
        offset = slot * SLOT_SIZE
        self._map[offset: offset + _HEADER.size + length] = (
            _HEADER.pack(MAGIC, _crc(seq, payload), length, seq) + payload
        )
        return slot

    def release(self, slot: int) -> None:
        """Ledger thread, once the slot's row is committed: the record is no longer needed."""
        if self._closed:
            return
        offset = slot * SLOT_SIZE
        self._map[offset: offset + len(MAGIC)] = _ZERO_MAGIC
        self._free[slot] = True

    def clear(self) -> None:
        """Ledger thread, at open, once the records found there are committed: every slot free."""
        for slot in range(SLOTS):
            self.release(slot)

    def in_use(self) -> int:
        """Slots whose rows are not committed yet."""
        return self._free.count(False)

    def close(self) -> None:
        """Ledger thread, at close. A row whose commit never started stays in the file for the next open."""
        if self._closed:
            return
        self._closed = True
        try:
            self._map.close()
        finally:
            os.close(self._fd)
