"""The ledger's tables, as an ordered list of migrations, and the rule about files from the future.

`PRAGMA user_version` holds how many migrations a file has had. Upgrading is applying the missing
ones in order, each in its own transaction together with the version bump, so a crash mid-upgrade
leaves the file at a version the code knows. A file with a higher version was written by a newer
program whose tables this code cannot be trusted to read or write: it is refused before anything,
not even the journal mode, is changed in it.

Money columns are TEXT: SQLite has no decimal type, and REAL would round prices and P&L.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from core.errors import LedgerVersionError

# One list of statements per version; MIGRATIONS[n] takes a file from version n to n + 1.
# Never edit a released migration: append a new one.
MIGRATIONS: list[list[str]] = [
    [
        """
        CREATE TABLE orders (
            client_order_id   TEXT PRIMARY KEY,
            engine            TEXT NOT NULL,
            market            TEXT NOT NULL,
            symbol            TEXT NOT NULL,
            side              TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
            order_type        TEXT NOT NULL,
            amount            TEXT NOT NULL,
            price             TEXT,
            stop_price        TEXT,
            reduce_only       INTEGER NOT NULL,
            state             TEXT NOT NULL,
            created_at        REAL NOT NULL,
            updated_at        REAL NOT NULL,
            filled            TEXT NOT NULL,
            avg_price         TEXT,
            exchange_order_id TEXT,
            leverage          INTEGER,
            reason            TEXT NOT NULL DEFAULT ''
        )
        """,
        "CREATE INDEX orders_by_state ON orders (state, engine)",
        "CREATE INDEX orders_by_created ON orders (created_at)",
        """
        CREATE TABLE fills (
            id              INTEGER PRIMARY KEY,
            client_order_id TEXT NOT NULL,
            trade_id        TEXT NOT NULL,
            engine          TEXT NOT NULL,
            market          TEXT NOT NULL,
            symbol          TEXT NOT NULL,
            side            TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
            amount          TEXT NOT NULL,
            price           TEXT NOT NULL,
            fee             TEXT NOT NULL,
            fee_asset       TEXT NOT NULL,
            ts              REAL NOT NULL,
            reduce_only     INTEGER NOT NULL,
            realized_pnl    TEXT NOT NULL,
            UNIQUE (client_order_id, trade_id)
        )
        """,
        "CREATE INDEX fills_by_engine ON fills (engine, ts)",
        "CREATE INDEX fills_by_ts ON fills (ts)",
        # cost: entry cost of the amount still open (shrinks on reductions);
        # entry_amount/entry_value and exit_amount/exit_value: totals over the position's life, from
        # which the closed trade's average entry and exit prices are taken.
        """
        CREATE TABLE positions (
            engine        TEXT NOT NULL,
            symbol        TEXT NOT NULL,
            market        TEXT NOT NULL,
            side          TEXT NOT NULL CHECK (side IN ('long', 'short')),
            amount        TEXT NOT NULL,
            entry_price   TEXT NOT NULL,
            cost          TEXT NOT NULL,
            opened_at     REAL NOT NULL,
            leverage      INTEGER NOT NULL,
            realized_pnl  TEXT NOT NULL,
            fees          TEXT NOT NULL,
            entry_amount  TEXT NOT NULL,
            entry_value   TEXT NOT NULL,
            exit_amount   TEXT NOT NULL,
            exit_value    TEXT NOT NULL,
            stop_loss     TEXT,
            take_profit   TEXT,
            meta          TEXT NOT NULL DEFAULT '{}',
            updated_at    REAL NOT NULL,
            PRIMARY KEY (engine, symbol)
        )
        """,
        """
        CREATE TABLE closed_trades (
            id             INTEGER PRIMARY KEY,
            engine         TEXT NOT NULL,
            market         TEXT NOT NULL,
            symbol         TEXT NOT NULL,
            side           TEXT NOT NULL CHECK (side IN ('long', 'short')),
            amount         TEXT NOT NULL,
            entry_price    TEXT NOT NULL,
            exit_price     TEXT NOT NULL,
            realized_pnl   TEXT NOT NULL,
            fees           TEXT NOT NULL,
            leverage       INTEGER NOT NULL,
            opened_at      REAL NOT NULL,
            closed_at      REAL NOT NULL,
            close_order_id TEXT NOT NULL
        )
        """,
        "CREATE INDEX closed_by_engine ON closed_trades (engine, closed_at)",
        "CREATE INDEX closed_by_time ON closed_trades (closed_at)",
        """
        CREATE TABLE state (
            key        TEXT PRIMARY KEY,
            value      TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE sequences (
            name  TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE journal (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            ts      REAL NOT NULL,
            kind    TEXT NOT NULL,
            payload TEXT NOT NULL
        )
        """,
        "CREATE INDEX journal_by_kind ON journal (kind, id)",
        # An audit trail that the program itself could rewrite would prove nothing.
        """
        CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
        BEGIN SELECT RAISE(ABORT, 'journal is append-only: UPDATE refused'); END
        """,
        """
        CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
        BEGIN SELECT RAISE(ABORT, 'journal is append-only: DELETE refused'); END
        """,
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)


def file_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def refuse_newer(path: Path, version: int) -> None:
    """Raise before touching a file written by a newer program (see the module docstring)."""
    if version > SCHEMA_VERSION:
        raise LedgerVersionError(
            f"ledger {path} has schema version {version}, but this program supports up to version "
            f"{SCHEMA_VERSION}; it was written by a newer release. Run that release (or a newer one), "
            f"or point DATA_DIR elsewhere. The file was not modified."
        )


def migrate(conn: sqlite3.Connection, from_version: int) -> int:
    """Apply the missing migrations, one transaction each; returns the new version."""
    version = from_version
    for statements in MIGRATIONS[from_version:]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in statements:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1
    return version
