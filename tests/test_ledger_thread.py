"""The ledger's own thread and its background checkpoints: calls run in the order they were made, a
cancelled caller does not take its write back, errors reach the caller, a closed ledger refuses calls
and leaves no thread behind, and the WAL is copied back on another connection often enough that the
writer's own (slow) checkpoint never has to run."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.clock import SimClock
from core.errors import InvariantError
from storage import ledger as ledger_module
from storage.ledger import CHECKPOINT_EVERY_WRITES, Ledger

T0 = 1_700_000_000.0
WAL_FRAME = 4096 + 24  # page plus frame header
AUTOCHECKPOINT_FRAMES = 1000  # SQLite's default wal_autocheckpoint


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0))
    yield led
    await led.close()


async def wait_until(predicate: object, what: str, seconds: float = 10.0) -> None:
    """Poll (bounded) for something another thread does."""
    assert callable(predicate)
    for _ in range(int(seconds / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def ledger_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name in ("ledger", "ledger-checkpoint")}


async def test_calls_run_in_the_order_they_were_made(ledger: Ledger) -> None:
    await asyncio.gather(*(ledger.set_state("k", {"i": i}) for i in range(50)))
    assert await ledger.get_state("k") == {"i": 49}
    assert [await ledger.next_sequence("s") for _ in range(3)] == [1, 2, 3]


async def test_a_cancelled_caller_does_not_take_its_write_back(ledger: Ledger) -> None:
    # Hold the thread with a slow call so the write below is still queued when its caller is cancelled.
    release = threading.Event()
    blocker = asyncio.ensure_future(ledger._run(lambda _conn: release.wait(5), write=False))
    write = asyncio.ensure_future(ledger.set_state("intent", {"order": "x1"}))
    await asyncio.sleep(0)
    write.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert await blocker is True
    assert await ledger.get_state("intent") == {"order": "x1"}


async def test_errors_reach_the_caller_and_the_thread_goes_on(ledger: Ledger) -> None:
    with pytest.raises(TypeError, match="not plain JSON"):
        await ledger.set_state("bad", {"v": object()})
    with pytest.raises(RuntimeError, match="StopIteration"):  # a future cannot carry StopIteration itself
        await ledger._run(lambda _conn: next(iter(())), write=False)
    await ledger.set_state("good", {"v": 1})
    assert await ledger.get_state("good") == {"v": 1}
    assert await ledger.get_state("bad") is None, "the failed call rolled back"


async def test_a_closed_ledger_refuses_calls_and_its_threads_end(tmp_path: Path) -> None:
    before = ledger_threads()
    led = await Ledger.open(tmp_path / "ledger.sqlite3", SimClock(T0))
    mine = ledger_threads() - before
    assert sorted(t.name for t in mine) == ["ledger", "ledger-checkpoint"]
    await led.set_state("k", {"v": 1})
    await led.close()
    await led.close()
    with pytest.raises(InvariantError, match="closed"):
        await led.get_state("k")
    await wait_until(lambda: not any(t.is_alive() for t in mine), "the ledger's threads to end")


async def test_a_failed_open_leaves_no_thread(tmp_path: Path) -> None:
    path = tmp_path / "not-a-ledger.sqlite3"
    path.write_bytes(b"this is not an SQLite file" * 200)
    before = ledger_threads()
    with pytest.raises(sqlite3.DatabaseError, match="cannot be read as SQLite"):
        await Ledger.open(path, SimClock(T0))
    await wait_until(lambda: not (ledger_threads() - before), "the failed open's threads to end")


def wal_state(wal: Path) -> tuple[int, bytes]:
    """(size in frames, the header's salts): SQLite draws new salts whenever the WAL starts over."""
    with wal.open("rb") as f:
        return os.fstat(f.fileno()).st_size // WAL_FRAME, f.read(24)[16:24]


async def test_background_checkpoints_keep_the_wal_far_below_the_writers_own_mark(ledger: Ledger) -> None:
    """Bursts of writes with idle time between them, as a trading daemon makes: the WAL is copied back
    and started over while idle, so it never reaches the 1000 pages at which the committing writer
    would checkpoint it itself (several milliseconds on the order path), and the first write of the
    next burst does not pay for starting it over (an fsync)."""
    wal = Path(f"{ledger.path}-wal")
    checkpointer = ledger._checkpointer
    await ledger.next_sequence("coid:spot")  # a row for the WAL-restarting write to touch
    bursts = -(-2 * AUTOCHECKPOINT_FRAMES // CHECKPOINT_EVERY_WRITES)  # twice the writer's mark in pages
    for burst in range(bursts):
        runs = checkpointer.runs
        # Read before the burst: its last write starts the checkpoint, and on a slow machine the
        # checkpoint and the restart can be over before a read after the burst would see the old salts.
        _, salts = await asyncio.to_thread(wal_state, wal)
        for i in range(CHECKPOINT_EVERY_WRITES):
            await ledger.set_state(f"k{i % 7}", {"burst": burst, "i": i, "pad": "x" * 600})
        await wait_until(lambda runs=runs: checkpointer.runs > runs, "a background checkpoint")
        for _ in range(400):  # bounded: the restart happens without another write of ours
            if (await asyncio.to_thread(wal_state, wal))[1] != salts:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError(f"burst {burst}: the WAL was not started over while idle")
    assert bursts * CHECKPOINT_EVERY_WRITES >= 2 * AUTOCHECKPOINT_FRAMES  # at least a page per write
    frames, _ = await asyncio.to_thread(wal_state, wal)
    assert frames < AUTOCHECKPOINT_FRAMES // 2, f"the WAL grew to {frames} pages"
    assert await ledger.get_state("k0") is not None
    assert await ledger.next_sequence("coid:spot") == 2, "the restarting write changed nothing"


async def test_the_checkpointer_waits_for_enough_writes(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY_WRITES", 5)
    checkpointer = ledger._checkpointer
    for i in range(4):
        await ledger.set_state("k", {"i": i})
    for _ in range(10):
        await ledger.get_state("k")  # reads do not count
    await asyncio.sleep(0.05)
    assert checkpointer.runs == 0
    await ledger.set_state("k", {"i": 4})
    await wait_until(lambda: checkpointer.runs >= 1, "the first background checkpoint")


async def test_a_reader_holding_an_old_snapshot_does_not_make_it_spin(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process reading (a backup, an sqlite3 shell) keeps the checkpoint from copying what came
    after its snapshot: the checkpointer waits for the next round of writes instead of retrying."""
    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY_WRITES", 5)
    checkpointer = ledger._checkpointer
    await ledger.set_state("k", {"i": -1})
    reader = sqlite3.connect(ledger.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM state").fetchone()[0] == 1
        for i in range(4):
            await ledger.set_state("k", {"i": i})
        await wait_until(lambda: checkpointer.runs >= 1, "a background checkpoint")
        await asyncio.sleep(0.1)  # idle: plenty of time to spin if it were going to
        assert checkpointer.runs == 1
    finally:
        reader.execute("COMMIT")
        reader.close()
    for i in range(5):
        await ledger.set_state("k", {"i": i})
    await wait_until(lambda: checkpointer.runs >= 2, "the next round's checkpoint")


async def test_a_failed_checkpoint_does_not_end_the_upkeep(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient failure (here: the checkpointer cannot connect once) is retried after the next round
    of writes instead of switching the background checkpoints off for the process's life."""
    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY_WRITES", 5)
    real_connect = sqlite3.connect
    failures = [1]

    def flaky_connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        if threading.current_thread().name == "ledger-checkpoint" and failures[0] > 0:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked (test)")
        return real_connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger_module.sqlite3, "connect", flaky_connect)
    checkpointer = ledger._checkpointer
    for i in range(5):
        await ledger.set_state("k", {"i": i})
    await wait_until(lambda: failures[0] == 0 and not checkpointer._running, "the failed checkpoint")
    assert checkpointer.runs == 0
    for i in range(5):
        await ledger.set_state("k", {"i": 5 + i})
    await wait_until(lambda: checkpointer.runs >= 1, "a checkpoint after the failure")


EXIT_SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from core.clock import SimClock
from storage.ledger import Ledger

async def main() -> None:
    ledger = await Ledger.open(Path(sys.argv[1]), SimClock(1_700_000_000.0))
    ledger._thread.call_soon(time.sleep, 0.5)  # the ledger thread is busy when the process exits
    write = asyncio.ensure_future(ledger.set_state("last", {"written": True}))
    await asyncio.sleep(0.01)
    write.cancel()  # a shutdown cut short: the caller is gone, its write is queued
    # returns without closing the ledger

asyncio.run(main())
"""


ROOT = Path(__file__).resolve().parents[1]


async def test_a_write_queued_when_the_process_exits_still_commits(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    root = ROOT
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXIT_SCRIPT, str(path), cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()

    def read() -> object:
        conn = sqlite3.connect(path)
        try:
            return conn.execute("SELECT value FROM state WHERE key = 'last'").fetchone()
        finally:
            conn.close()

    assert await asyncio.to_thread(read) is not None, "the queued write was lost at exit"
