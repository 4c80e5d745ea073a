"""The shared store: PostgreSQL through an asyncpg pool, migrated under an advisory lock.

Several gateways (and every worker of each) share one database, so every write is atomic in SQL: a
balance changes by `balance_nanos = balance_nanos ± $n` in the statement that also writes its ledger
line or generation records, never by reading it into Python first. Each worker has its own pool of
`pool_min`..`pool_max` connections. Every failure (the server's, the driver's, the network's, a
timeout) is raised as `StoreError`, whose message never holds the URL's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence

import asyncpg
import msgspec
import orjson

from proxy import records, rollups
from proxy.store import migrations
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
    redact_url,
    spend_args,
    spend_query,
    url_secrets,
)

CONNECT_TIMEOUT_S = 10.0  # opening one connection, TLS and login included
COMMAND_TIMEOUT_S = 60.0  # one statement
CLOSE_TIMEOUT_S = 10.0  # then connections still busy are cut
# Any fixed 64-bit number: every gateway migrating a database takes this same transaction-level lock.
MIGRATION_LOCK = 7_461_617_453_727_361_601

# The driver's, the server's and the network's failures (TimeoutError is an OSError).
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


# The Postgres type of each generation column, to which `record` casts the batch's JSON values.
_GENERATION_TYPES = {
    "request_id": "text",
    "created_at": "bigint",
    "team_id": "text",
    "key_id": "text",
    "endpoint": "text",
    "model_id": "text",
    "provider": "text",
    "upstream_model": "text",
    "native_response_id": "text",
    "stream": "boolean",
    "status_code": "integer",
    "success": "boolean",
    "error_code": "text",
    "error_message": "text",
    "usage": "json",
    "usage_source": "text",
    "cost_nanos": "bigint",
    "currency": "text",
    "pricing_lines": "json",
    "timings": "json",
    "guardrails": "text",
    "cache_status": "text",
    "saved_nanos": "bigint",
}
assert tuple(_GENERATION_TYPES) == Generation.__struct_fields__, "a generation column without its Postgres type"
_BATCH_COLUMNS = ", ".join(
    (f"r ->> {i}" if t == "text" else f"(r ->> {i})::{t}") + f" AS {name}"
    for i, (name, t) in enumerate(_GENERATION_TYPES.items())
)
_NOW = 2

# One statement, so one transaction and one round trip. The batch arrives as one parameter, the rows (the
# journal's lines, JSON arrays) joined by commas, parsed once by the server (jsonb). The last row of a
# request id repeated in the batch wins (as in SQLite). Only rows actually inserted (not already stored: a
# retried batch, a replayed journal) are debited. Wallets are locked in team order, so two workers whose
# batches debit the same teams cannot deadlock; the debit is relative, so a concurrent top-up is kept.
# A request refused by a rate limit, as 1 (else 0), of a row of `table`.
_RATE_LIMITED = "({table}.error_code IN (" + ", ".join(f"'{c}'" for c in rollups.RATE_LIMITED) + "))::int"

# The rows inserted are added to the usage rollups (`proxy.rollups`): grouped here, then one upsert per rollup row,
# relative too (sums added, histograms added by `rollup_hist_add`), in key order (so no deadlock either). Minute rows
# before $3 (`rollups.minutes_from`) are not written; once per step of $3, the first batch to see it deletes them.
# Returns the count of rows inserted.
_RECORD = f"""
WITH batch AS (
    SELECT DISTINCT ON (r ->> 0) {_BATCH_COLUMNS}
    FROM jsonb_array_elements(('[' || $1::text || ']')::jsonb) WITH ORDINALITY AS b(r, n)
    ORDER BY r ->> 0, n DESC
), inserted AS (
    INSERT INTO generations ({GENERATION_COLUMNS})
    SELECT {GENERATION_COLUMNS} FROM batch
    ON CONFLICT (request_id) DO NOTHING
    RETURNING team_id, cost_nanos, created_at, key_id, model_id, provider, status_code, success, cache_status,
        saved_nanos, error_code, guardrails, usage::jsonb AS usage_doc, timings::jsonb AS timings_doc
), debits AS (
    SELECT team_id, SUM(cost_nanos)::bigint AS cost FROM inserted GROUP BY team_id HAVING SUM(cost_nanos) <> 0
), locked AS MATERIALIZED (
    SELECT w.team_id, d.cost FROM wallets w JOIN debits d ON d.team_id = w.team_id
    ORDER BY w.team_id COLLATE "C" FOR UPDATE OF w
), debited AS (
    UPDATE wallets w SET balance_nanos = w.balance_nanos - l.cost, updated_at = ${_NOW}
    FROM locked l WHERE w.team_id = l.team_id
), facts AS (
    SELECT
        s.step_ms, i.team_id, i.created_at - i.created_at % s.step_ms AS bucket_ms, i.key_id, i.model_id, i.provider,
        (i.status_code >= 400 OR NOT i.success)::int AS error, (i.cache_status = 'hit')::int AS hit,
        CASE WHEN jsonb_typeof(i.usage_doc -> 'prompt_tokens') = 'number'
            THEN (i.usage_doc ->> 'prompt_tokens')::numeric::bigint ELSE 0 END AS input_tokens,
        CASE WHEN jsonb_typeof(i.usage_doc -> 'completion_tokens') = 'number'
            THEN (i.usage_doc ->> 'completion_tokens')::numeric::bigint ELSE 0 END AS output_tokens,
        i.cost_nanos, i.saved_nanos,
        CASE WHEN jsonb_typeof(i.timings_doc -> 'latency_ms') = 'number'
            THEN (i.timings_doc ->> 'latency_ms')::double precision END AS latency_ms,
        CASE WHEN jsonb_typeof(i.timings_doc -> 'ttft_ms') = 'number'
            THEN (i.timings_doc ->> 'ttft_ms')::double precision END AS ttft_ms,
        {_RATE_LIMITED.format(table="i")} AS limited, (i.guardrails <> '')::int AS guarded,
        (i.error_code = '{rollups.BLOCKED}')::int AS blocked
    FROM inserted i JOIN (VALUES ({rollups.MINUTE_MS}::bigint), ({rollups.HOUR_MS})) AS s(step_ms)
        ON s.step_ms = {rollups.HOUR_MS} OR i.created_at >= $3
), summed AS (
    INSERT INTO usage_rollups ({", ".join(rollups.KEY + rollups.SUMS)})
    SELECT step_ms, team_id, bucket_ms, key_id, model_id, provider, COUNT(*), SUM(error), SUM(hit),
        SUM(input_tokens), SUM(output_tokens), SUM(cost_nanos), SUM(saved_nanos), COALESCE(SUM(latency_ms), 0),
        COALESCE(SUM(ttft_ms), 0), COUNT(ttft_ms), SUM(limited), SUM(guarded), SUM(blocked)
    FROM facts GROUP BY step_ms, team_id, bucket_ms, key_id, model_id, provider
    ORDER BY step_ms, team_id COLLATE "C", bucket_ms, key_id COLLATE "C", model_id COLLATE "C", provider COLLATE "C"
    ON CONFLICT ({", ".join(rollups.KEY)}) DO UPDATE SET
        {", ".join(f"{name} = usage_rollups.{name} + EXCLUDED.{name}" for name in rollups.SUMS)}
), counts AS (
    SELECT step_ms, team_id, bucket_ms, 0 AS kind, rollup_bucket(latency_ms) AS i, COUNT(*) AS n
    FROM facts WHERE latency_ms IS NOT NULL GROUP BY step_ms, team_id, bucket_ms, i
    UNION ALL
    SELECT step_ms, team_id, bucket_ms, 1, rollup_bucket(ttft_ms), COUNT(*)
    FROM facts WHERE ttft_ms IS NOT NULL GROUP BY step_ms, team_id, bucket_ms, 5
), hists AS (
    SELECT step_ms, team_id, bucket_ms, json_object_agg(i, n) FILTER (WHERE kind = 0) AS latency_hist,
        json_object_agg(i, n) FILTER (WHERE kind = 1) AS ttft_hist
    FROM counts GROUP BY step_ms, team_id, bucket_ms
), team_sums AS (
    SELECT step_ms, team_id, bucket_ms, COUNT(*), SUM(error), SUM(hit), SUM(input_tokens), SUM(output_tokens),
        SUM(cost_nanos), SUM(saved_nanos), COALESCE(SUM(latency_ms), 0), COALESCE(SUM(ttft_ms), 0), COUNT(ttft_ms),
        SUM(limited), SUM(guarded), SUM(blocked)
    FROM facts GROUP BY step_ms, team_id, bucket_ms
), teamed AS (
    INSERT INTO team_rollups (step_ms, team_id, bucket_ms, {", ".join(rollups.SUMS)}, latency_hist, ttft_hist)
    SELECT t.*, COALESCE(h.latency_hist, '{{}}'), COALESCE(h.ttft_hist, '{{}}')
    FROM team_sums t LEFT JOIN hists h USING (step_ms, team_id, bucket_ms)
    ORDER BY t.step_ms, t.team_id COLLATE "C", t.bucket_ms
    ON CONFLICT (step_ms, team_id, bucket_ms) DO UPDATE SET
        {"".join(f"{name} = team_rollups.{name} + EXCLUDED.{name}, " for name in rollups.SUMS)}
        latency_hist = rollup_hist_add(team_rollups.latency_hist, EXCLUDED.latency_hist),
        ttft_hist = rollup_hist_add(team_rollups.ttft_hist, EXCLUDED.ttft_hist)
), pruning AS (
    UPDATE rollup_pruning SET minutes_before_ms = $3 WHERE minutes_before_ms < $3 RETURNING 1
), pruned_sums AS (
    DELETE FROM usage_rollups
    WHERE step_ms = {rollups.MINUTE_MS} AND bucket_ms < $3 AND EXISTS (SELECT FROM pruning)
), pruned_teams AS (
    DELETE FROM team_rollups
    WHERE step_ms = {rollups.MINUTE_MS} AND bucket_ms < $3 AND EXISTS (SELECT FROM pruning)
)
SELECT COUNT(*) FROM inserted
"""

# `overview`'s reads, of one team's or every team's rollups ($2: their ids; one index range per team).
_RANGE = "step_ms = $1 AND team_id = ANY($2::text[]) AND bucket_ms >= $3 AND bucket_ms < $4"
_OVERVIEW_TEAMS = (
    "SELECT bucket_ms - bucket_ms % $5, requests, errors, cost_nanos, input_tokens, output_tokens, cache_hits, "
    f"saved_nanos, rate_limited, guarded, blocked, latency_hist, ttft_hist FROM team_rollups WHERE {_RANGE}"
)
_OVERVIEW_SPEND = (
    "SELECT key_id, model_id, provider, SUM(requests)::bigint, SUM(cost_nanos)::bigint FROM usage_rollups "
    f"WHERE {_RANGE} GROUP BY key_id, model_id, provider"
)
_SPEND = spend_query(lambda i: f"${i}")
_TARGET_USAGE = (
    "SELECT model_id, provider, SUM(requests)::bigint, SUM(errors)::bigint, SUM(latency_ms_sum)::float8 "
    f"FROM usage_rollups WHERE step_ms = {rollups.MINUTE_MS} AND team_id = ANY($1::text[]) AND bucket_ms >= $2 "
    "GROUP BY model_id, provider"
)

# A top-up and its ledger line in one statement; no wallet, no line (and `add_credit` raises).
_ADD_CREDIT = """
WITH w AS (
    UPDATE wallets SET balance_nanos = balance_nanos + $2, updated_at = $3 WHERE team_id = $1
    RETURNING team_id, balance_nanos
), line AS (
    INSERT INTO wallet_ledger (team_id, amount_nanos, kind, note, created_at)
    SELECT team_id, $2, $4, $5, $3 FROM w
)
SELECT balance_nanos FROM w
"""


def _count(status: str) -> int:
    """The row count of a command status such as `UPDATE 1`."""
    return int(status.rpartition(" ")[2] or 0)


class PostgresStore:
    """`Store` on an asyncpg pool: a connection per operation, borrowed and given back."""

    backend = "postgres"

    def __init__(self, url: str, *, pool_min: int = 1, pool_max: int = 4):
        self.url = url
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.safe_url = redact_url(url)
        self._secrets = url_secrets(url)
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    def _masked(self, e: BaseException) -> str:
        text = str(e) or type(e).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, doing: str, e: BaseException) -> StoreError:
        """`e` as a StoreError saying what failed; the password, should a message quote it, is masked."""
        return StoreError(f"{doing}: {self._masked(e)}")

    def _cause(self, e: BaseException) -> BaseException | None:
        """`e`, kept for tracebacks, unless its message quotes the password."""
        return e if self._masked(e) == (str(e) or type(e).__name__) else None

    @contextlib.asynccontextmanager
    async def _conn(self, doing: str) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; any failure while it is used becomes a StoreError about `doing`."""
        pool = self.pool
        try:
            async with pool.acquire() as conn:
                yield conn
        except _FAILURES as e:
            raise self._error(doing, e) from self._cause(e)

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.pool_min,
                max_size=self.pool_max,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
            )
            await self._migrate()
        except (*_FAILURES, ValueError, StoreError) as e:
            await self.close()
            if isinstance(e, StoreError):
                raise
            raise self._error(f"cannot open the PostgreSQL store at {self.safe_url}", e) from self._cause(e)

    async def _migrate(self) -> None:
        """Apply the steps this database lacks, in one transaction. Gateways starting together queue on the
        advisory lock: the first migrates, the others then find nothing to do."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
            )
            version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            if version > len(migrations.POSTGRES):
                raise StoreError(
                    f"the store at {self.safe_url} has schema version {version}, newer than this gateway's "
                    f"{len(migrations.POSTGRES)}: upgrade the gateway"
                )
            for number, script in enumerate(migrations.POSTGRES[version:], start=version + 1):
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_version VALUES ($1, $2)", number, int(time.time()))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, *_FAILURES):
                pool.terminate()

    async def ping(self) -> None:
        async with self._conn("the store does not answer") as conn:
            await conn.fetchval("SELECT 1")

    async def schema_version(self) -> int:
        async with self._conn("cannot read the schema version") as conn:
            return await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")

    async def get_key(self, kid: str) -> KeyRecord | None:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.kid = $1"
        async with self._conn("cannot read a key") as conn:
            row = await conn.fetchrow(sql, kid)
        return key_from_row(row) if row else None

    async def get_balance(self, team_id: str) -> int | None:
        async with self._conn("cannot read a balance") as conn:
            return await conn.fetchval("SELECT balance_nanos FROM wallets WHERE team_id = $1", team_id)

    async def get_team(self, name: str) -> Team | None:
        async with self._conn("cannot read a team") as conn:
            return await self._team(conn, name)

    @staticmethod
    async def _team(conn: asyncpg.Connection, name: str) -> Team | None:
        row = await conn.fetchrow(
            "SELECT t.id, t.name, COALESCE(w.balance_nanos, 0), t.created_at FROM teams t "
            "LEFT JOIN wallets w ON w.team_id = t.id WHERE t.name = $1",
            name,
        )
        return Team(*row) if row else None

    async def ensure_team(self, name: str) -> Team:
        now = int(time.time())
        async with self._conn("cannot create a team") as conn:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                    "team_" + secrets.token_hex(8),
                    name,
                    now,
                )
                await conn.execute(
                    "INSERT INTO wallets (team_id, balance_nanos, updated_at) "
                    "SELECT id, 0, $1 FROM teams WHERE name = $2 ON CONFLICT (team_id) DO NOTHING",
                    now,
                    name,
                )
            team = await self._team(conn, name)
        assert team is not None
        return team

    async def create_key(
        self, *, team_id: str, kid: str, secret_hash: bytes, name: str, scopes: tuple[str, ...]
    ) -> KeyRecord:
        async with self._conn("cannot create a key") as conn:
            await conn.execute(
                "INSERT INTO api_keys (kid, team_id, name, secret_hash, scopes, status, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                kid,
                team_id,
                name,
                secret_hash,
                ",".join(scopes),
                ACTIVE,
                int(time.time()),
            )
        record = await self.get_key(kid)
        assert record is not None
        return record

    async def list_keys(self, team_id: str | None = None) -> list[KeyRecord]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN teams t ON t.id = k.team_id"
        args: tuple = ()
        if team_id is not None:
            sql += " WHERE k.team_id = $1"
            args = (team_id,)
        async with self._conn("cannot list keys") as conn:
            rows = await conn.fetch(sql + ' ORDER BY k.created_at, k.kid COLLATE "C"', *args)
        return [key_from_row(row) for row in rows]

    async def set_key_status(self, kid: str, status: str) -> bool:
        revoked_at = int(time.time()) if status == REVOKED else None
        async with self._conn("cannot change a key's status") as conn:
            done = await conn.execute(
                "UPDATE api_keys SET status = $1, revoked_at = COALESCE(revoked_at, $2) "
                "WHERE kid = $3 AND status <> 'revoked'",
                status,
                revoked_at,
                kid,
            )
        return _count(done) > 0

    async def add_credit(self, team_id: str, amount_nanos: int, note: str = "") -> int:
        kind = "topup" if amount_nanos >= 0 else "adjustment"
        async with self._conn("cannot add credit") as conn:
            balance = await conn.fetchval(_ADD_CREDIT, team_id, amount_nanos, int(time.time()), kind, note)
        if balance is None:
            raise StoreError(f"team {team_id} has no wallet")
        return balance

    async def record(self, lines: Sequence[bytes]) -> int:
        """Insert the generation records of journal lines (`proxy.records`) and debit each team by their cost,
        in one statement. A record whose request id is already stored (a replay) is skipped and not charged
        again. Returns how many records were new."""
        if not lines:
            return 0
        batch = orjson.dumps(records.rows(lines)).decode()[1:-1]  # rows as JSON arrays; the server adds brackets
        now = time.time()
        async with self._conn("cannot record usage") as conn:
            return await conn.fetchval(_RECORD, batch, int(now), rollups.minutes_from(int(now * 1000)))

    async def sync(self) -> None:
        """Nothing to do: a commit is durable once the server acknowledges it (`synchronous_commit` on)."""

    async def credits(self, team_id: str, top_ups: int = 20) -> Credits:
        """The wallet's balance, its latest top-ups, and what the team spent over 24 hours and 30 days."""
        now_ms = int(time.time() * 1000)
        async with self._conn("cannot read credits") as conn:
            balance = await conn.fetchval("SELECT balance_nanos FROM wallets WHERE team_id = $1", team_id) or 0
            ledger = [
                TopUp(*r)
                for r in await conn.fetch(
                    "SELECT amount_nanos, note, created_at FROM wallet_ledger WHERE team_id = $1 "
                    "ORDER BY created_at DESC, id DESC LIMIT $2",
                    team_id,
                    top_ups,
                )
            ]
            day, month = [int(await conn.fetchval(_SPEND, *args)) for args in spend_args(team_id, now_ms)]
        return Credits(balance_nanos=balance, top_ups=ledger, spend_24h_nanos=day, spend_30d_nanos=month)

    async def rename_key(self, kid: str, name: str) -> bool:
        async with self._conn("cannot rename a key") as conn:
            done = await conn.execute("UPDATE api_keys SET name = $1 WHERE kid = $2", name, kid)
        return _count(done) > 0

    async def set_key_limits(
        self, kid: str, *, allowed_models: tuple[str, ...], daily_nanos: int | None, monthly_nanos: int | None
    ) -> bool:
        async with self._conn("cannot set a key's limits") as conn:
            done = await conn.execute(
                "UPDATE api_keys SET allowed_models = $1, daily_limit_cost_nanos = $2, monthly_limit_cost_nanos = $3 "
                "WHERE kid = $4",
                ",".join(allowed_models),
                daily_nanos,
                monthly_nanos,
                kid,
            )
        return _count(done) > 0

    async def set_key_rate_limits(self, kid: str, *, rpm: int | None, tpm: int | None, concurrency: int | None) -> bool:
        async with self._conn("cannot set a key's rate limits") as conn:
            done = await conn.execute(
                "UPDATE api_keys SET rpm_limit = $1, tpm_limit = $2, concurrency_limit = $3 WHERE kid = $4",
                rpm,
                tpm,
                concurrency,
                kid,
            )
        return _count(done) > 0

    async def set_key_guardrails(self, kid: str, *, guardrails: tuple[str, ...]) -> bool:
        async with self._conn("cannot set a key's guardrails") as conn:
            done = await conn.execute("UPDATE api_keys SET guardrails = $1 WHERE kid = $2", ",".join(guardrails), kid)
        return _count(done) > 0

    async def set_key_cache(self, kid: str, *, cache: bool | None) -> bool:
        async with self._conn("cannot set a key's cache setting") as conn:
            done = await conn.execute("UPDATE api_keys SET cache = $1 WHERE kid = $2", cache, kid)
        return _count(done) > 0

    async def key_spend(self, team_id: str, kid: str, since_ms: int) -> int:
        rollups.check_hour(since_ms)
        async with self._conn("cannot read a key's spend") as conn:
            return await conn.fetchval(
                "SELECT COALESCE(SUM(cost_nanos), 0)::bigint FROM usage_rollups "
                f"WHERE step_ms = {rollups.HOUR_MS} AND team_id = $1 AND bucket_ms >= $2 AND key_id = $3",
                team_id,
                since_ms,
                kid,
            )

    async def activity(
        self, team_id: str, *, since_ms: int, until_ms: int, model: str, key_id: str, limit: int, offset: int
    ) -> tuple[int, list[tuple]]:
        where = "team_id = $1 AND created_at >= $2 AND created_at < $3"
        args: list = [team_id, since_ms, until_ms]
        if model:
            args.append(model)
            where += f" AND model_id = ${len(args)}"
        if key_id:
            args.append(key_id)
            where += f" AND key_id = ${len(args)}"
        grouped = (
            "SELECT to_char(to_timestamp(created_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, "
            "model_id, provider, endpoint, SUM(cost_nanos)::bigint, COUNT(*), "
            "SUM((usage ->> 'prompt_tokens')::bigint)::bigint, SUM((usage ->> 'completion_tokens')::bigint)::bigint, "
            "SUM((usage ->> 'reasoning_tokens')::bigint)::bigint, "
            "COUNT(*) FILTER (WHERE cache_status = 'hit'), SUM(saved_nanos)::bigint "
            f"FROM generations WHERE {where} GROUP BY day, model_id, provider, endpoint"
        )
        page = len(args)
        async with self._conn("cannot read activity") as conn:
            total = await conn.fetchval(f"SELECT COUNT(*) FROM ({grouped}) AS g", *args)
            rows = await conn.fetch(
                f'{grouped} ORDER BY day DESC, model_id COLLATE "C", provider COLLATE "C", endpoint COLLATE "C" '
                f"LIMIT ${page + 1} OFFSET ${page + 2}",
                *args,
                limit,
                offset,
            )
        return total, [tuple(r) for r in rows]

    async def overview(self, team_id: str | None, since_ms: int, until_ms: int, step_ms: int) -> Overview:
        rollup = rollups.rollup_step(since_ms, until_ms, int(time.time() * 1000))
        rollups.check_range(since_ms, until_ms, step_ms, rollup)
        async with (
            self._conn("cannot read the usage overview") as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),  # the reads of one snapshot
        ):
            teams = [team_id] if team_id is not None else [r[0] for r in await conn.fetch("SELECT id FROM teams")]
            args = (rollup, teams, rollups.first_bucket(since_ms, rollup), until_ms)
            teams_rows = await conn.fetch(_OVERVIEW_TEAMS, *args, step_ms)
            spend = await conn.fetch(_OVERVIEW_SPEND, *args)
        return rollups.overview(
            since_ms=since_ms, until_ms=until_ms, step_ms=step_ms, rollup=rollup, teams=teams_rows, spend=spend
        )

    async def target_usage(self, team_id: str | None, since_ms: int) -> list[TargetUsage]:
        first = since_ms // rollups.MINUTE_MS * rollups.MINUTE_MS
        async with self._conn("cannot read the usage per provider") as conn:
            teams = [team_id] if team_id is not None else [r[0] for r in await conn.fetch("SELECT id FROM teams")]
            rows = await conn.fetch(_TARGET_USAGE, teams, first)
        return [TargetUsage(*row) for row in rows]

    async def get_generation(self, team_id: str, request_id: str) -> Generation | None:
        sql = (
            f"SELECT {GENERATION_COLUMNS} FROM generations WHERE team_id = $1 "
            "AND (request_id = $2 OR native_response_id = $2) "
            "ORDER BY request_id = $2 DESC, cost_nanos > 0 DESC, created_at DESC LIMIT 1"
        )
        async with self._conn("cannot read a generation") as conn:
            row = await conn.fetchrow(sql, team_id, request_id)
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
        sql, args = recent_query(team_id, limit, before_ms, since_ms, model, key_id, failed, lambda i: f"${i}")
        async with self._conn("cannot read generations") as conn:
            rows = await conn.fetch(sql, *args)
        return [Generation.from_row(tuple(row)) for row in rows]

    async def list_teams(self) -> list[Team]:
        async with self._conn("cannot list teams") as conn:
            rows = await conn.fetch(
                "SELECT t.id, t.name, COALESCE(w.balance_nanos, 0), t.created_at FROM teams t "
                "LEFT JOIN wallets w ON w.team_id = t.id ORDER BY t.name"
            )
        return [Team(*row) for row in rows]

    async def create_session(self, session: DashboardSession) -> None:
        async with self._conn("cannot keep a dashboard session") as conn, conn.transaction():
            await conn.execute("DELETE FROM dashboard_sessions WHERE expires_at <= $1", session.created_at)
            await conn.execute(
                "INSERT INTO dashboard_sessions (token_hash, role, team_id, key_id, csrf, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *msgspec.structs.astuple(session),
            )

    async def get_session(self, token_hash: bytes, now_ms: int) -> DashboardSession | None:
        async with self._conn("cannot read a dashboard session") as conn:
            row = await conn.fetchrow(
                "SELECT token_hash, role, team_id, key_id, csrf, created_at, expires_at FROM dashboard_sessions "
                "WHERE token_hash = $1 AND expires_at > $2",
                token_hash,
                now_ms,
            )
        return DashboardSession(*row) if row else None

    async def delete_session(self, token_hash: bytes) -> None:
        async with self._conn("cannot end a dashboard session") as conn:
            await conn.execute("DELETE FROM dashboard_sessions WHERE token_hash = $1", token_hash)

    async def create_admin_token(self, token_id: str, secret_hash: bytes, name: str) -> None:
        async with self._conn("cannot create an operator token") as conn:
            await conn.execute(
                "INSERT INTO admin_tokens (id, secret_hash, name, created_at) VALUES ($1, $2, $3, $4)",
                token_id,
                secret_hash,
                name,
                int(time.time() * 1000),
            )

    async def admin_token(self, secret_hash: bytes) -> str | None:
        async with self._conn("cannot read operator tokens") as conn:
            return await conn.fetchval("SELECT id FROM admin_tokens WHERE secret_hash = $1", secret_hash)

    async def admin_token_live(self, token_id: str) -> bool:
        async with self._conn("cannot read operator tokens") as conn:
            return bool(await conn.fetchval("SELECT 1 FROM admin_tokens WHERE id = $1", token_id))

    async def list_admin_tokens(self) -> list[AdminToken]:
        async with self._conn("cannot list operator tokens") as conn:
            rows = await conn.fetch("SELECT id, name, created_at FROM admin_tokens ORDER BY created_at")
        return [AdminToken(*row) for row in rows]

    async def revoke_admin_token(self, token_id: str) -> bool:
        async with self._conn("cannot revoke an operator token") as conn, conn.transaction():
            done = await conn.execute("DELETE FROM admin_tokens WHERE id = $1", token_id)
            await conn.execute("DELETE FROM dashboard_sessions WHERE role = 'operator' AND key_id = $1", token_id)
        return _count(done) > 0

    async def create_job(self, job: Job) -> None:
        marks = ", ".join(f"${i}" for i in range(1, len(Job.__struct_fields__) + 1))
        async with self._conn("cannot record a job") as conn:
            await conn.execute(f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({marks})", *job.row())

    async def get_job(self, team_id: str, job_id: str) -> Job | None:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND team_id = $2"
        async with self._conn("cannot read a job") as conn:
            row = await conn.fetchrow(sql, job_id, team_id)
        return None if row is None else Job.from_row(tuple(row))

    async def list_jobs(self, team_id: str, kind: str, *, limit: int, after: str = "") -> list[Job]:
        where, args = "team_id = $1 AND kind = $2", [team_id, kind]
        if after:  # newest first: continue with the jobs older than `after` (ties broken by id)
            where += (
                ' AND (created_at, id COLLATE "C") < (SELECT created_at, id FROM jobs WHERE id = $3 AND team_id = $1)'
            )
            args.append(after)
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} "
            f'ORDER BY created_at DESC, id COLLATE "C" DESC LIMIT ${len(args) + 1}'
        )
        async with self._conn("cannot list jobs") as conn:
            rows = await conn.fetch(sql, *args, limit)
        return [Job.from_row(tuple(row)) for row in rows]

    async def update_job(self, job_id: str, *, status: str, data: bytes) -> bool:
        async with self._conn("cannot change a job") as conn:
            done = await conn.execute(
                "UPDATE jobs SET status = $1, data = $2, updated_at = $3 WHERE id = $4",
                status,
                data.decode(),
                int(time.time()),
                job_id,
            )
        return _count(done) > 0

    async def mark_job_billed(self, job_id: str) -> bool:
        async with self._conn("cannot change a job") as conn:
            done = await conn.execute("UPDATE jobs SET billed = TRUE WHERE id = $1 AND NOT billed", job_id)
        return _count(done) > 0

    async def delete_job(self, team_id: str, job_id: str) -> bool:
        async with self._conn("cannot delete a job") as conn:
            done = await conn.execute("DELETE FROM jobs WHERE id = $1 AND team_id = $2", job_id, team_id)
        return _count(done) > 0
