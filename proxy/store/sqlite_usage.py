"""SQLite's usage-record transaction, in plain `sqlite3` (no asyncio, no aiosqlite): run in the store's
connection thread, and in the accounting writer process (`proxy.recorder`), which loads only this."""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Iterator, Sequence
from itertools import chain

import orjson

from proxy import records, rollups
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
    register(db)
    return db


def register(db: sqlite3.Connection) -> None:
    """The function the rollups' upserts call (`proxy.rollups.hist_add`), on a connection that records usage."""
    db.create_function("rollup_hist_add", 2, rollups.hist_add, deterministic=True)


_ROW_MARKS = "(" + ", ".join("?" * len(Generation.__struct_fields__)) + ")"
_MAX_ROWS_PER_INSERT = 256  # x 23 columns stays far below SQLite's 32,766 bound parameters
_STORED = "SELECT request_id FROM generations WHERE request_id IN (SELECT value FROM json_each(?))"
_DEBIT = "UPDATE wallets SET balance_nanos = balance_nanos - ?, updated_at = ? WHERE team_id = ?"
_MAX_ROLLUPS_PER_UPSERT = 128  # x 19 columns
_BACKFILL_CHUNK = 5000
_PRUNED = "SELECT minutes_before_ms FROM rollup_pruning"
# Each team's minute rows before the cutoff (one range of the primary key per team).
_PRUNE = (
    f"DELETE FROM usage_rollups WHERE step_ms = {rollups.MINUTE_MS} AND team_id IN (SELECT id FROM teams) "
    "AND bucket_ms < ?1",
    f"DELETE FROM team_rollups WHERE step_ms = {rollups.MINUTE_MS} AND team_id IN (SELECT id FROM teams) "
    "AND bucket_ms < ?1",
    "UPDATE rollup_pruning SET minutes_before_ms = ?1",
)


@functools.cache
def _insert(rows: int) -> str:
    return f"INSERT INTO generations ({GENERATION_COLUMNS}) VALUES " + ", ".join([_ROW_MARKS] * rows)


@functools.cache
def _add_sums(rows: int, sums: tuple[str, ...] = rollups.SUMS) -> str:
    marks = "(" + ", ".join("?" * len(rollups.KEY + sums)) + ")"
    return (
        f"INSERT INTO usage_rollups ({', '.join(rollups.KEY + sums)}) VALUES "
        + ", ".join([marks] * rows)
        + f" ON CONFLICT ({', '.join(rollups.KEY)}) DO UPDATE SET "
        + ", ".join(f"{name} = {name} + excluded.{name}" for name in sums)
    )


@functools.cache
def _add_teams(sums: tuple[str, ...] = rollups.SUMS) -> str:
    return (
        f"INSERT INTO team_rollups (step_ms, team_id, bucket_ms, {', '.join(sums)}, latency_hist, ttft_hist) "
        f"VALUES ({', '.join('?' * (5 + len(sums)))}) ON CONFLICT (step_ms, team_id, bucket_ms) DO UPDATE SET "
        + "".join(f"{name} = {name} + excluded.{name}, " for name in sums)
        + "latency_hist = rollup_hist_add(latency_hist, excluded.latency_hist), "
        "ttft_hist = rollup_hist_add(ttft_hist, excluded.ttft_hist)"
    )


def _chunks(count: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, size) pieces of `count` rows, each of a power-of-two size up to `most`: few distinct statements,
    each prepared once (sqlite3's statement cache)."""
    done = 0
    while done < count:
        size = min(1 << ((count - done).bit_length() - 1), most)
        yield done, size
        done += size


def record(db: sqlite3.Connection, lines: Sequence[bytes], now: int) -> int:
    """`SqliteStore.record`'s transaction: journal lines made rows (`proxy.records.rows`), bound as parameters
    of multi-row INSERTs of power-of-two sizes whose texts repeat from batch to batch, so SQLite prepares each
    once. (Letting SQLite read the JSON itself, `json_each` and a `->>` per column, holds the GIL less but costs
    three times the CPU per row: it parses each row's JSON once per column.) A request id twice in the batch:
    the last row counts. The rows inserted are added to the usage rollups (`roll_up`). Returns their count."""
    rows = {row[0]: row for row in records.rows(lines)}
    db.execute("BEGIN IMMEDIATE")
    try:
        stored = {r[0] for r in db.execute(_STORED, (orjson.dumps(list(rows)),))}
        fresh = [row for request_id, row in rows.items() if request_id not in stored]
        for start, size in _chunks(len(fresh), _MAX_ROWS_PER_INSERT):
            db.execute(_insert(size), list(chain.from_iterable(fresh[start : start + size])))
        debits: dict[str, int] = {}
        for row in fresh:
            debits[row[ROW_TEAM]] = debits.get(row[ROW_TEAM], 0) + row[ROW_COST]
        db.executemany(_DEBIT, [(cost, now, team) for team, cost in debits.items() if cost])
        if fresh:
            roll_up(db, fresh, now * 1000)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(fresh)


def roll_up(db: sqlite3.Connection, rows: Sequence[tuple], now_ms: int) -> None:
    """Add new generation rows to the usage rollups, one upsert per rollup row (in the caller's transaction); first,
    at most every `rollups.PRUNE_EVERY_MS`, drop the minute rows no longer kept."""
    minutes_from = rollups.minutes_from(now_ms)
    (pruned,) = db.execute(_PRUNED).fetchone()
    if pruned < minutes_from:
        for sql in _PRUNE:
            db.execute(sql, (minutes_from,))
    _add_rollups(db, rows, minutes_from)


def _add_rollups(
    db: sqlite3.Connection, rows: Sequence[tuple], minutes_from: int, sums: tuple[str, ...] = rollups.SUMS
) -> None:
    """Upsert the rollups of `rows`: every sum, or the first of them (`sums`: the columns an older migration made)."""
    found, teams = rollups.aggregate(rows, minutes_from)
    if sums != rollups.SUMS:
        width = len(rollups.KEY) + len(sums)
        found = [row[:width] for row in found]
        teams = [(*row[: 3 + len(sums)], *row[-2:]) for row in teams]
    for start, size in _chunks(len(found), _MAX_ROLLUPS_PER_UPSERT):
        db.execute(_add_sums(size, sums), list(chain.from_iterable(found[start : start + size])))
    db.executemany(_add_teams(sums), teams)


def backfill_rollups(db: sqlite3.Connection) -> None:
    """Migration 8's data, in its transaction: the rollups of every stored record, by the writer's own code (minute
    rows from `rollup_pruning`'s cutoff, as the migration set it), in the columns migration 8 made (the first ten
    sums; migration 10 adds and fills the others). Reads `generations` in the order it was written (mostly by
    time), so that each chunk adds to few rollup rows."""
    (minutes_from,) = db.execute(_PRUNED).fetchone()
    register(db)
    rows = db.execute(f"SELECT {GENERATION_COLUMNS} FROM generations ORDER BY rowid")
    while chunk := rows.fetchmany(_BACKFILL_CHUNK):
        _add_rollups(db, chunk, minutes_from, rollups.SUMS[:10])


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
