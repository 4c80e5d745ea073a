"""The embedded store: SQLite through aiosqlite, WAL mode, migrations by `PRAGMA user_version`."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiosqlite
import msgspec

from proxy import rollups
from proxy.store import migrations, sqlite_usage
from proxy.store.base import (
    ACTIVE,
    GENERATION_COLUMNS,
    JOB_COLUMNS,
    KEY_COLUMNS,
    REVOKED,
    AdminToken,
    Credits,
    DashboardSession,
    Generation,
    Job,
    KeyRecord,
    Overview,
    StoreError,
    TargetUsage,
    Team,
    TopUp,
    key_from_row,
    recent_query,
    spend_args,
    spend_query,
)
from proxy.store.sqlite_usage import sqlite_path


class SqliteStore:
    """`Store` on one aiosqlite connection (its own thread); SQLite serialises writers itself."""

    backend = "sqlite"

    def __init__(self, url: str):
        self.url = url
        self.path = sqlite_path(url)
        self._db: aiosqlite.Connection | None = None
        # One connection serves every coroutine: a write transaction must not interleave with another.
        self._write = asyncio.Lock()
        # A second one, opened on first use, for the overviews: a long read must not hold up the store's other calls.
        self._reader: aiosqlite.Connection | None = None
        self._opening_reader = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in sqlite_usage.PRAGMAS:
                await self._db.execute(pragma)
            await self._db._execute(sqlite_usage.register, self._db._conn)  # used by `record`
            await self._migrate()
        except sqlite3.Error as e:
            await self.close()
            raise StoreError(f"cannot open the SQLite store at {self.path}: {e}") from e
        except StoreError:  # a schema newer than this gateway's: the connection must not outlive the refusal
            await self.close()
            raise

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(migrations.SQLITE):
            raise StoreError(
                f"the store at {self.path} has schema version {version}, newer than this gateway's "
                f"{len(migrations.SQLITE)}: upgrade the gateway"
            )
        for number, script in enumerate(migrations.SQLITE[version:], start=version + 1):
            backfill = migrations.SQLITE_BACKFILLS.get(number)
            if backfill is None:
                # executescript commits first; the version bump is part of the same script.
                await self.db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
            else:
                await self.db._execute(_migrate_step, self.db._conn, script, number, backfill)

    async def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ping(self) -> None:
        try:
            async with self.db.execute("SELECT 1") as cur:
                await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e

    async def schema_version(self) -> int:
        try:
            async with self.db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return row[0] if row else 0

    async def get_key(self, kid: str) -> KeyRecord | None:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.kid = ?"
        try:
            async with self.db.execute(sql, (kid,)) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return key_from_row(row) if row else None

    async def get_balance(self, team_id: str) -> int | None:
        try:
            async with self.db.execute("SELECT balance_nanos FROM wallets WHERE team_id = ?", (team_id,)) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return row[0] if row else None

    async def get_team(self, name: str) -> Team | None:
        sql = (
            "SELECT t.id, t.name, COALESCE(w.balance_nanos, 0), t.created_at FROM teams t "
            "LEFT JOIN wallets w ON w.team_id = t.id WHERE t.name = ?"
        )
        async with self.db.execute(sql, (name,)) as cur:
            row = await cur.fetchone()
        return Team(*row) if row else None

    async def ensure_team(self, name: str) -> Team:
        now = int(time.time())
        team_id = "team_" + secrets.token_hex(8)
        async with self._write:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.execute(
                    "INSERT INTO teams (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING",
                    (team_id, name, now),
                )
                await self.db.execute(
                    "INSERT INTO wallets (team_id, balance_nanos, updated_at) "
                    "SELECT id, 0, ? FROM teams WHERE name = ? ON CONFLICT(team_id) DO NOTHING",
                    (now, name),
                )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        team = await self.get_team(name)
        assert team is not None
        return team

    async def create_key(
        self, *, team_id: str, kid: str, secret_hash: bytes, name: str, scopes: tuple[str, ...]
    ) -> KeyRecord:
        async with self._write:
            await self.db.execute(
                "INSERT INTO api_keys (kid, team_id, name, secret_hash, scopes, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kid, team_id, name, secret_hash, ",".join(scopes), ACTIVE, int(time.time())),
            )
        record = await self.get_key(kid)
        assert record is not None
        return record

    async def list_keys(self, team_id: str | None = None) -> list[KeyRecord]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN teams t ON t.id = k.team_id"
        args: tuple = ()
        if team_id is not None:
            sql += " WHERE k.team_id = ?"
            args = (team_id,)
        async with self.db.execute(sql + " ORDER BY k.created_at, k.kid", args) as cur:
            rows = await cur.fetchall()
        return [key_from_row(row) for row in rows]

    async def set_key_status(self, kid: str, status: str) -> bool:
        revoked_at = int(time.time()) if status == REVOKED else None
        async with self._write:
            cur = await self.db.execute(
                "UPDATE api_keys SET status = ?, revoked_at = COALESCE(revoked_at, ?) "
                "WHERE kid = ? AND status != 'revoked'",
                (status, revoked_at, kid),
            )
        return cur.rowcount > 0

    async def add_credit(self, team_id: str, amount_nanos: int, note: str = "") -> int:
        now = int(time.time())
        async with self._write:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.execute(
                    "UPDATE wallets SET balance_nanos = balance_nanos + ?, updated_at = ? WHERE team_id = ?",
                    (amount_nanos, now, team_id),
                )
                await self.db.execute(
                    "INSERT INTO wallet_ledger (team_id, amount_nanos, kind, note, created_at) VALUES (?, ?, ?, ?, ?)",
                    (team_id, amount_nanos, "topup" if amount_nanos >= 0 else "adjustment", note, now),
                )
                async with self.db.execute("SELECT balance_nanos FROM wallets WHERE team_id = ?", (team_id,)) as cur:
                    row = await cur.fetchone()
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        if row is None:
            raise StoreError(f"team {team_id} has no wallet")
        return row[0]

    async def record(self, lines: Sequence[bytes]) -> int:
        """Insert the generation records of journal lines (`proxy.records`) and debit each team by their cost,
        in one transaction. A record whose request id is already stored (a replay) is skipped and not charged
        again. Returns how many records were new."""
        if not lines:
            return 0
        try:
            async with self._write:
                # The whole transaction is one call into the connection's thread (aiosqlite's `_execute`,
                # which all its public methods use): one hand-off per batch instead of one per statement.
                return await self.db._execute(sqlite_usage.record, self.db._conn, lines, int(time.time()))
        except sqlite3.Error as e:
            raise StoreError(f"cannot record usage: {e}") from e

    async def sync(self) -> None:
        """Make every committed transaction survive a power loss. With `synchronous=NORMAL` SQLite syncs its
        WAL only at checkpoints; an fsync of the WAL file makes every commit so far durable."""
        if self.path == ":memory:":
            return
        try:
            await asyncio.to_thread(sqlite_usage.fsync_wal, self.path)
        except OSError as e:
            raise StoreError(f"cannot sync the SQLite store's WAL: {e}") from e

    async def credits(self, team_id: str, top_ups: int = 20) -> Credits:
        """The wallet's balance, its latest top-ups, and what the team spent over 24 hours and 30 days."""
        now_ms = int(time.time() * 1000)
        try:
            balance = await self.get_balance(team_id) or 0
            async with self.db.execute(
                "SELECT amount_nanos, note, created_at FROM wallet_ledger WHERE team_id = ? "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (team_id, top_ups),
            ) as cur:
                ledger = [TopUp(*r) for r in await cur.fetchall()]
            spent = []
            for args in spend_args(team_id, now_ms):
                async with self.db.execute(_SPEND, args) as cur:
                    (total,) = await cur.fetchone()  # type: ignore[misc]
                spent.append(int(total))
            day, month = spent
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return Credits(balance_nanos=balance, top_ups=ledger, spend_24h_nanos=day, spend_30d_nanos=month)

    async def rename_key(self, kid: str, name: str) -> bool:
        async with self._write:
            cur = await self.db.execute("UPDATE api_keys SET name = ? WHERE kid = ?", (name, kid))
        return cur.rowcount > 0

    async def set_key_limits(
        self, kid: str, *, allowed_models: tuple[str, ...], daily_nanos: int | None, monthly_nanos: int | None
    ) -> bool:
        async with self._write:
            cur = await self.db.execute(
                "UPDATE api_keys SET allowed_models = ?, daily_limit_cost_nanos = ?, monthly_limit_cost_nanos = ? "
                "WHERE kid = ?",
                (",".join(allowed_models), daily_nanos, monthly_nanos, kid),
            )
        return cur.rowcount > 0

    async def set_key_rate_limits(self, kid: str, *, rpm: int | None, tpm: int | None, concurrency: int | None) -> bool:
        async with self._write:
            cur = await self.db.execute(
                "UPDATE api_keys SET rpm_limit = ?, tpm_limit = ?, concurrency_limit = ? WHERE kid = ?",
                (rpm, tpm, concurrency, kid),
            )
        return cur.rowcount > 0

    async def set_key_guardrails(self, kid: str, *, guardrails: tuple[str, ...]) -> bool:
        async with self._write:
            cur = await self.db.execute("UPDATE api_keys SET guardrails = ? WHERE kid = ?", (",".join(guardrails), kid))
        return cur.rowcount > 0

    async def set_key_cache(self, kid: str, *, cache: bool | None) -> bool:
        async with self._write:
            cur = await self.db.execute("UPDATE api_keys SET cache = ? WHERE kid = ?", (cache, kid))
        return cur.rowcount > 0

    async def key_spend(self, team_id: str, kid: str, since_ms: int) -> int:
        rollups.check_hour(since_ms)
        try:
            async with self.db.execute(
                "SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_rollups "
                f"WHERE step_ms = {rollups.HOUR_MS} AND team_id = ? AND bucket_ms >= ? AND key_id = ?",
                (team_id, since_ms, kid),
            ) as cur:
                (spent,) = await cur.fetchone()  # type: ignore[misc]
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return spent

    async def activity(
        self, team_id: str, *, since_ms: int, until_ms: int, model: str, key_id: str, limit: int, offset: int
    ) -> tuple[int, list[tuple]]:
        where = "team_id = ? AND created_at >= ? AND created_at < ?"
        args: list = [team_id, since_ms, until_ms]
        if model:
            where += " AND model_id = ?"
            args.append(model)
        if key_id:
            where += " AND key_id = ?"
            args.append(key_id)
        grouped = (
            "SELECT date(created_at / 1000, 'unixepoch') AS day, model_id, provider, endpoint, "
            "SUM(cost_nanos), COUNT(*), SUM(json_extract(usage, '$.prompt_tokens')), "
            "SUM(json_extract(usage, '$.completion_tokens')), SUM(json_extract(usage, '$.reasoning_tokens')), "
            "COUNT(*) FILTER (WHERE cache_status = 'hit'), SUM(saved_nanos) "
            f"FROM generations WHERE {where} GROUP BY day, model_id, provider, endpoint"
        )
        try:
            async with self.db.execute(f"SELECT COUNT(*) FROM ({grouped})", args) as cur:
                (total,) = await cur.fetchone()  # type: ignore[misc]
            async with self.db.execute(
                f"{grouped} ORDER BY day DESC, model_id, provider, endpoint LIMIT ? OFFSET ?", [*args, limit, offset]
            ) as cur:
                rows = [tuple(r) for r in await cur.fetchall()]
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e
        return total, rows

    async def overview(self, team_id: str | None, since_ms: int, until_ms: int, step_ms: int) -> Overview:
        rollup = rollups.rollup_step(since_ms, until_ms, int(time.time() * 1000))
        rollups.check_range(since_ms, until_ms, step_ms, rollup)
        try:
            if self.path == ":memory:":  # no second connection (it would see another database): the store's own
                async with self._write:  # (its writes' transactions span several calls)
                    return await self.db._execute(
                        _overview, self.db._conn, team_id, since_ms, until_ms, step_ms, rollup
                    )
            reader = await self._reading()
            # Both reads and their sums in one call into the reader's thread: the event loop only waits.
            return await reader._execute(_overview, reader._conn, team_id, since_ms, until_ms, step_ms, rollup)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the usage overview: {e}") from e

    async def target_usage(self, team_id: str | None, since_ms: int) -> list[TargetUsage]:
        teams = "team_id IN (SELECT id FROM teams)" if team_id is None else "team_id = ?"
        sql = (
            "SELECT model_id, provider, SUM(requests), SUM(errors), SUM(latency_ms_sum) FROM usage_rollups "
            f"WHERE step_ms = {rollups.MINUTE_MS} AND {teams} AND bucket_ms >= ? GROUP BY model_id, provider"
        )
        first = since_ms // rollups.MINUTE_MS * rollups.MINUTE_MS
        args = (first,) if team_id is None else (team_id, first)
        try:
            reader = self.db if self.path == ":memory:" else await self._reading()
            async with reader.execute(sql, args) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the usage per provider: {e}") from e
        return [TargetUsage(*row) for row in rows]

    async def _reading(self) -> aiosqlite.Connection:
        """The overviews' connection, opened on first use."""
        if self._db is None:
            raise StoreError("the store is not open")
        async with self._opening_reader:
            if self._reader is None:
                reader = await aiosqlite.connect(self.path, isolation_level=None)
                try:
                    for pragma in (*sqlite_usage.PRAGMAS, "PRAGMA query_only=ON"):
                        await reader.execute(pragma)
                except BaseException:
                    await reader.close()
                    raise
                self._reader = reader
            return self._reader

    async def get_generation(self, team_id: str, request_id: str) -> Generation | None:
        sql = (
            f"SELECT {GENERATION_COLUMNS} FROM generations WHERE team_id = ? "
            "AND (request_id = ? OR native_response_id = ?) "
            "ORDER BY request_id = ? DESC, cost_nanos > 0 DESC, created_at DESC LIMIT 1"
        )
        async with self.db.execute(sql, (team_id, request_id, request_id, request_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else Generation.from_row(tuple(row))

    async def recent_generations(
        self,
        team_id: str,
        *,
        limit: int,
        before_ms: int | None = None,
        since_ms: int | None = None,
        model: str = "",
        key_id: str = "",
        failed: bool | None = None,
    ) -> list[Generation]:
        sql, args = recent_query(team_id, limit, before_ms, since_ms, model, key_id, failed, lambda i: "?")
        async with self.db.execute(sql, args) as cur:
            return [Generation.from_row(tuple(row)) for row in await cur.fetchall()]

    async def list_teams(self) -> list[Team]:
        sql = (
            "SELECT t.id, t.name, COALESCE(w.balance_nanos, 0), t.created_at FROM teams t "
            "LEFT JOIN wallets w ON w.team_id = t.id ORDER BY t.name"
        )
        async with self.db.execute(sql) as cur:
            return [Team(*row) for row in await cur.fetchall()]

    async def create_session(self, session: DashboardSession) -> None:
        async with self._write:
            await self.db.execute("DELETE FROM dashboard_sessions WHERE expires_at <= ?", (session.created_at,))
            await self.db.execute(
                "INSERT INTO dashboard_sessions (token_hash, role, team_id, key_id, csrf, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                msgspec.structs.astuple(session),
            )

    async def get_session(self, token_hash: bytes, now_ms: int) -> DashboardSession | None:
        sql = (
            "SELECT token_hash, role, team_id, key_id, csrf, created_at, expires_at FROM dashboard_sessions "
            "WHERE token_hash = ? AND expires_at > ?"
        )
        async with self.db.execute(sql, (token_hash, now_ms)) as cur:
            row = await cur.fetchone()
        return DashboardSession(*row) if row else None

    async def delete_session(self, token_hash: bytes) -> None:
        async with self._write:
            await self.db.execute("DELETE FROM dashboard_sessions WHERE token_hash = ?", (token_hash,))

    async def create_admin_token(self, token_id: str, secret_hash: bytes, name: str) -> None:
        async with self._write:
            await self.db.execute(
                "INSERT INTO admin_tokens (id, secret_hash, name, created_at) VALUES (?, ?, ?, ?)",
                (token_id, secret_hash, name, int(time.time() * 1000)),
            )

    async def admin_token(self, secret_hash: bytes) -> str | None:
        async with self.db.execute("SELECT id FROM admin_tokens WHERE secret_hash = ?", (secret_hash,)) as cur:
            row = await cur.fetchone()
        return row[0] if row else None

    async def admin_token_live(self, token_id: str) -> bool:
        async with self.db.execute("SELECT 1 FROM admin_tokens WHERE id = ?", (token_id,)) as cur:
            return await cur.fetchone() is not None

    async def list_admin_tokens(self) -> list[AdminToken]:
        async with self.db.execute("SELECT id, name, created_at FROM admin_tokens ORDER BY created_at") as cur:
            return [AdminToken(*row) for row in await cur.fetchall()]

    async def revoke_admin_token(self, token_id: str) -> bool:
        async with self._write:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = await self.db.execute("DELETE FROM admin_tokens WHERE id = ?", (token_id,))
                await self.db.execute(
                    "DELETE FROM dashboard_sessions WHERE role = 'operator' AND key_id = ?", (token_id,)
                )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return cur.rowcount > 0

    async def create_job(self, job: Job) -> None:
        marks = ", ".join("?" * len(Job.__struct_fields__))
        try:
            async with self._write:
                await self.db.execute(f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({marks})", job.row())
        except sqlite3.Error as e:
            raise StoreError(f"cannot record a job: {e}") from e

    async def get_job(self, team_id: str, job_id: str) -> Job | None:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ? AND team_id = ?"
        async with self.db.execute(sql, (job_id, team_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else Job.from_row(tuple(row))

    async def list_jobs(self, team_id: str, kind: str, *, limit: int, after: str = "") -> list[Job]:
        where, args = "team_id = ? AND kind = ?", [team_id, kind]
        if after:  # newest first: continue with the jobs older than `after` (ties broken by id)
            where += " AND (created_at, id) < (SELECT created_at, id FROM jobs WHERE id = ? AND team_id = ?)"
            args += [after, team_id]
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ?"
        async with self.db.execute(sql, (*args, limit)) as cur:
            return [Job.from_row(tuple(row)) for row in await cur.fetchall()]

    async def update_job(self, job_id: str, *, status: str, data: bytes) -> bool:
        return await self._change(
            "UPDATE jobs SET status = ?, data = ?, updated_at = ? WHERE id = ?",
            (status, data.decode(), int(time.time()), job_id),
        )

    async def mark_job_billed(self, job_id: str) -> bool:
        return await self._change("UPDATE jobs SET billed = 1 WHERE id = ? AND billed = 0", (job_id,))

    async def delete_job(self, team_id: str, job_id: str) -> bool:
        return await self._change("DELETE FROM jobs WHERE id = ? AND team_id = ?", (job_id, team_id))

    async def _change(self, sql: str, args: tuple) -> bool:
        """One write statement; whether it changed a row."""
        try:
            async with self._write, self.db.execute(sql, args) as cur:
                return cur.rowcount > 0
        except sqlite3.Error as e:
            raise StoreError(f"cannot change a job: {e}") from e


def _migrate_step(
    db: sqlite3.Connection, script: str, number: int, backfill: Callable[[sqlite3.Connection], None]
) -> None:
    """A migration step whose data Python fills in: its SQL, the backfill and the version bump in one transaction."""
    db.executescript(f"BEGIN IMMEDIATE;\n{script}")  # (commits nothing: it ends inside the transaction it began)
    try:
        backfill(db)
        db.execute(f"PRAGMA user_version={number}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_SPEND = spend_query(lambda i: f"?{i}")


def _overview_sql(team_id: str | None) -> tuple[str, str]:
    """The overview's reads: `team_rollups` (series and totals) and `usage_rollups` (spend per key, model and
    provider). Every team's: one range of the primary key per team."""
    teams = "team_id IN (SELECT id FROM teams)" if team_id is None else "team_id = :team"
    where = f"step_ms = :rollup AND {teams} AND bucket_ms >= :first AND bucket_ms < :until"
    return (
        "SELECT bucket_ms - bucket_ms % :step, requests, errors, cost_nanos, input_tokens, output_tokens, cache_hits, "
        f"saved_nanos, rate_limited, guarded, blocked, latency_hist, ttft_hist FROM team_rollups WHERE {where}",
        "SELECT key_id, model_id, provider, SUM(requests), SUM(cost_nanos) FROM usage_rollups "
        f"WHERE {where} GROUP BY key_id, model_id, provider",
    )


_OVERVIEW_SQL = {scope: _overview_sql(scope) for scope in (None, "")}


def _overview(
    db: sqlite3.Connection, team_id: str | None, since_ms: int, until_ms: int, step_ms: int, rollup: int
) -> Overview:
    """`SqliteStore.overview`, in the reader's thread: both reads in one transaction (one snapshot)."""
    teams_sql, spend_sql = _OVERVIEW_SQL[None if team_id is None else ""]
    args = {
        "rollup": rollup,
        "team": team_id,
        "first": rollups.first_bucket(since_ms, rollup),
        "until": until_ms,
        "step": step_ms,
    }
    db.execute("BEGIN")
    try:
        teams = db.execute(teams_sql, args).fetchall()
        spend = db.execute(spend_sql, args).fetchall()
    finally:
        db.execute("COMMIT")
    return rollups.overview(
        since_ms=since_ms, until_ms=until_ms, step_ms=step_ms, rollup=rollup, teams=teams, spend=spend
    )
