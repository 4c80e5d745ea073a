"""SQLite's usage-record transaction, in plain `sqlite3` (no asyncio, no aiosqlite): run in the store's
connection thread, and in the accounting writer process (`proxy.recorder`), which loads only this."""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Sequence

import orjson

from proxy import records
from proxy.store.base import GENERATION_COLUMNS, ROW_COST, ROW_TEAM, Generation

# Every connection to a store: a write-ahead log (readers never wait for the writer), synced at checkpoints
# (`sync` makes commits durable in between), a wait for a writer of another process instead of an error.
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
)


def sqlite_path(url: str) -> str:
    """`sqlite:///./data/gateway.db` → `./data/gateway.db`; `sqlite:////abs` → `/abs`; `sqlite://:memory:`."""
    rest = url.removeprefix("sqlite://")
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(f"expected sqlite:///relative/path or sqlite:////absolute/path, got {url!r}")
    return rest[1:]


def in_memory(url: str) -> bool:
    """The store dies with its process (and no other process can open it)."""
    return url.startswith("sqlite://") and sqlite_path(url) == ":memory:"


def connect(path: str) -> sqlite3.Connection:
    """A connection to the store at `path` (migrated already: its gateway opened it), for `record`."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        db.execute(pragma)
    return db


_ROW_MARKS = "(" + ", ".join("?" * len(Generation.__struct_fields__)) + ")"
_MAX_ROWS_PER_INSERT = 256  # x 23 columns stays far below SQLite's 32,766 bound parameters
_STORED = "SELECT request_id FROM generations WHERE request_id IN (SELECT value FROM json_each(?))"
_DEBIT = "UPDATE wallets SET balance_nanos = balance_nanos - ?, updated_at = ? WHERE team_id = ?"


@functools.cache
def _insert(rows: int) -> str:
    return f"INSERT INTO generations ({GENERATION_COLUMNS}) VALUES " + ", ".join([_ROW_MARKS] * rows)


def record(db: sqlite3.Connection, lines: Sequence[bytes], now: int) -> int:
    """`SqliteStore.record`'s transaction: journal lines made rows (`proxy.records.rows`), bound as parameters
    of multi-row INSERTs of power-of-two sizes whose texts repeat from batch to batch, so SQLite prepares each
    once. (Letting SQLite read the JSON itself, `json_each` and a `->>` per column, holds the GIL less but costs
    three times the CPU per row: it parses each row's JSON once per column.) A request id twice in the batch:
    the last row counts. Returns the rows inserted."""
    rows = {row[0]: row for row in records.rows(lines)}
    db.execute("BEGIN IMMEDIATE")
    try:
        stored = {r[0] for r in db.execute(_STORED, (orjson.dumps(list(rows)),))}
        fresh = [row for request_id, row in rows.items() if request_id not in stored]
        done = 0
        while done < len(fresh):
            size = min(1 << ((len(fresh) - done).bit_length() - 1), _MAX_ROWS_PER_INSERT)
            db.execute(_insert(size), [value for row in fresh[done : done + size] for value in row])
            done += size
        debits: dict[str, int] = {}
        for row in fresh:
            debits[row[ROW_TEAM]] = debits.get(row[ROW_TEAM], 0) + row[ROW_COST]
        db.executemany(_DEBIT, [(cost, now, team) for team, cost in debits.items() if cost])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(fresh)


def fsync_wal(path: str) -> None:
    """Make every commit so far survive a power loss: fsync the store's write-ahead log (`path` + "-wal")."""
    path += "-wal"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # no WAL: every commit is in the database file, synced when it was checkpointed
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
