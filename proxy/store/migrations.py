"""Versioned schema migrations. Append only: a released step is never edited.

SQLITE and POSTGRES grow together, step for step: version N is the same schema on both backends.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from proxy.rollups import BLOCKED, BOUNDS, HOUR_MS, MINUTE_MS, MINUTES_KEPT_MS, PRUNE_EVERY_MS, RATE_LIMITED
from proxy.store import sqlite_usage

# Migration 8's backfill keeps minute rollups from here on (as `proxy.rollups.minutes_from` at the migration's time).
_SQLITE_NOW_MS = "CAST(strftime('%s', 'now') AS INTEGER) * 1000"
_POSTGRES_NOW_MS = "(extract(epoch FROM now()) * 1000)::bigint"
_MINUTES_FROM = f"(({{now}} - {MINUTES_KEPT_MS}) - ({{now}} - {MINUTES_KEPT_MS}) % {PRUNE_EVERY_MS})"


def _refusals(integer: str) -> str:
    """Migration 10 (both backends; `integer`: the column type): the rollups' counts of requests refused by a rate
    limit, matched by a guardrail policy and refused by one, filled for the rollup rows already there from the
    records they sum (minute rows already pruned stay so)."""
    limited = ", ".join(f"'{code}'" for code in RATE_LIMITED)
    columns = "".join(
        f"ALTER TABLE {table} ADD COLUMN {name} {integer} NOT NULL DEFAULT 0;\n"
        for table in ("usage_rollups", "team_rollups")
        for name in ("rate_limited", "guarded", "blocked")
    )
    fills = []
    values = ("s.step_ms", "g.team_id", "g.created_at - g.created_at % s.step_ms")
    values += ("g.key_id", "g.model_id", "g.provider")
    for table, keys in (
        ("usage_rollups", ("step_ms", "team_id", "bucket_ms", "key_id", "model_id", "provider")),
        ("team_rollups", ("step_ms", "team_id", "bucket_ms")),
    ):
        grouped = ", ".join(str(i) for i in range(1, len(keys) + 1))
        fills.append(f"""
    UPDATE {table} SET rate_limited = f.limited, guarded = f.guarded, blocked = f.blocked FROM (
        SELECT {", ".join(f"{value} AS {key}" for value, key in zip(values, keys, strict=False))},
            SUM(CASE WHEN g.error_code IN ({limited}) THEN 1 ELSE 0 END) AS limited,
            SUM(CASE WHEN g.guardrails <> '' THEN 1 ELSE 0 END) AS guarded,
            SUM(CASE WHEN g.error_code = '{BLOCKED}' THEN 1 ELSE 0 END) AS blocked
        FROM generations g CROSS JOIN (SELECT {MINUTE_MS} AS step_ms UNION ALL SELECT {HOUR_MS}) AS s
        WHERE g.error_code IN ({limited}, '{BLOCKED}') OR g.guardrails <> ''
        GROUP BY {grouped}
    ) AS f
    WHERE {" AND ".join(f"{table}.{key} = f.{key}" for key in keys)};""")
    return columns + "".join(fills)


SQLITE: list[str] = [
    # 1: teams, wallets with a ledger, hashed API keys
    """
    CREATE TABLE teams (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE wallets (
        team_id        TEXT PRIMARY KEY REFERENCES teams(id),
        balance_nanos  INTEGER NOT NULL DEFAULT 0,
        currency       TEXT NOT NULL DEFAULT 'USD',
        updated_at     INTEGER NOT NULL
    );
    CREATE TABLE wallet_ledger (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        team_id       TEXT NOT NULL REFERENCES teams(id),
        amount_nanos  INTEGER NOT NULL,
        kind          TEXT NOT NULL,
        note          TEXT NOT NULL DEFAULT '',
        created_at    INTEGER NOT NULL
    );
    CREATE INDEX wallet_ledger_team ON wallet_ledger(team_id, created_at);
    CREATE TABLE api_keys (
        kid          TEXT PRIMARY KEY,
        team_id      TEXT NOT NULL REFERENCES teams(id),
        name         TEXT NOT NULL DEFAULT '',
        secret_hash  BLOB NOT NULL,
        scopes       TEXT NOT NULL,
        status       TEXT NOT NULL DEFAULT 'active',
        created_at   INTEGER NOT NULL,
        revoked_at   INTEGER
    );
    CREATE INDEX api_keys_team ON api_keys(team_id);
    """,
    # 2: one record per request, written with its wallet debit in one transaction
    """
    CREATE TABLE generations (
        request_id          TEXT PRIMARY KEY,
        created_at          INTEGER NOT NULL,
        team_id             TEXT NOT NULL REFERENCES teams(id),
        key_id              TEXT NOT NULL,
        endpoint            TEXT NOT NULL,
        model_id            TEXT NOT NULL,
        provider            TEXT NOT NULL,
        upstream_model      TEXT NOT NULL,
        native_response_id  TEXT NOT NULL DEFAULT '',
        stream              INTEGER NOT NULL,
        status_code         INTEGER NOT NULL,
        success             INTEGER NOT NULL,
        error_code          TEXT NOT NULL DEFAULT '',
        error_message       TEXT NOT NULL DEFAULT '',
        usage               TEXT NOT NULL,
        usage_source        TEXT NOT NULL,
        cost_nanos          INTEGER NOT NULL,
        currency            TEXT NOT NULL,
        pricing_lines       TEXT NOT NULL,
        timings             TEXT NOT NULL
    );
    CREATE INDEX generations_team_time ON generations(team_id, created_at);
    CREATE INDEX generations_native ON generations(native_response_id);
    """,
    # 3: per-key limits: allowed models, cost budgets per UTC day and month
    """
    ALTER TABLE api_keys ADD COLUMN allowed_models TEXT NOT NULL DEFAULT '';
    ALTER TABLE api_keys ADD COLUMN daily_limit_cost_nanos INTEGER;
    ALTER TABLE api_keys ADD COLUMN monthly_limit_cost_nanos INTEGER;
    CREATE INDEX generations_key_time ON generations(key_id, created_at);
    """,
    # 4: asynchronous jobs (videos, music, files, batches): the gateway's id, its owner, the provider's id
    """
    CREATE TABLE jobs (
        id           TEXT PRIMARY KEY,
        kind         TEXT NOT NULL,
        team_id      TEXT NOT NULL REFERENCES teams(id),
        key_id       TEXT NOT NULL,
        model_id     TEXT NOT NULL,
        provider     TEXT NOT NULL,
        upstream_id  TEXT NOT NULL,
        status       TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        billed       INTEGER NOT NULL DEFAULT 0,
        data         TEXT NOT NULL
    );
    CREATE INDEX jobs_team_kind_time ON jobs(team_id, kind, created_at);
    """,
    # 5: per-key rate limits (NULL: the `rate_limits.key` default of the config; 0: none for this key)
    """
    ALTER TABLE api_keys ADD COLUMN rpm_limit INTEGER;
    ALTER TABLE api_keys ADD COLUMN tpm_limit INTEGER;
    ALTER TABLE api_keys ADD COLUMN concurrency_limit INTEGER;
    """,
    # 6: guardrails: a key's own policies (comma-separated names, '': none); what a request's policies did
    # (a JSON list, '': nothing)
    """
    ALTER TABLE api_keys ADD COLUMN guardrails TEXT NOT NULL DEFAULT '';
    ALTER TABLE generations ADD COLUMN guardrails TEXT NOT NULL DEFAULT '';
    """,
    # 7: the response cache: a key's setting (NULL: the config's default for its team; 1: on; 0: off); what the
    # cache did for a request ('': not involved, hit, miss, bypass) and, on a hit, what its answer would have cost
    """
    ALTER TABLE api_keys ADD COLUMN cache INTEGER;
    ALTER TABLE generations ADD COLUMN cache_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE generations ADD COLUMN saved_nanos INTEGER NOT NULL DEFAULT 0;
    """,
    # 8: usage rollups (`proxy.rollups`): sums per minute and per hour by team, key, model and provider; the same
    # sums per minute and hour by team, with latency and TTFT histograms ({"<bucket>": count}); where minute rows
    # are pruned up to. Filled from `generations` by SQLITE_BACKFILLS[8].
    f"""
    CREATE TABLE usage_rollups (
        step_ms         INTEGER NOT NULL,
        team_id         TEXT NOT NULL,
        bucket_ms       INTEGER NOT NULL,
        key_id          TEXT NOT NULL,
        model_id        TEXT NOT NULL,
        provider        TEXT NOT NULL,
        requests        INTEGER NOT NULL,
        errors          INTEGER NOT NULL,
        cache_hits      INTEGER NOT NULL,
        input_tokens    INTEGER NOT NULL,
        output_tokens   INTEGER NOT NULL,
        cost_nanos      INTEGER NOT NULL,
        saved_nanos     INTEGER NOT NULL,
        latency_ms_sum  REAL NOT NULL,
        ttft_ms_sum     REAL NOT NULL,
        ttft_count      INTEGER NOT NULL,
        PRIMARY KEY (step_ms, team_id, bucket_ms, key_id, model_id, provider)
    ) WITHOUT ROWID;
    CREATE TABLE team_rollups (
        step_ms         INTEGER NOT NULL,
        team_id         TEXT NOT NULL,
        bucket_ms       INTEGER NOT NULL,
        requests        INTEGER NOT NULL,
        errors          INTEGER NOT NULL,
        cache_hits      INTEGER NOT NULL,
        input_tokens    INTEGER NOT NULL,
        output_tokens   INTEGER NOT NULL,
        cost_nanos      INTEGER NOT NULL,
        saved_nanos     INTEGER NOT NULL,
        latency_ms_sum  REAL NOT NULL,
        ttft_ms_sum     REAL NOT NULL,
        ttft_count      INTEGER NOT NULL,
        latency_hist    TEXT NOT NULL,
        ttft_hist       TEXT NOT NULL,
        PRIMARY KEY (step_ms, team_id, bucket_ms)
    ) WITHOUT ROWID;
    CREATE TABLE rollup_pruning (minutes_before_ms INTEGER NOT NULL);
    INSERT INTO rollup_pruning VALUES ({_MINUTES_FROM.format(now=_SQLITE_NOW_MS)});
    """,
    # 9: the dashboard: sessions (their token's hash only) and operator tokens (hashed like keys)
    """
    CREATE TABLE dashboard_sessions (
        token_hash  BLOB PRIMARY KEY,
        role        TEXT NOT NULL,
        team_id     TEXT NOT NULL,
        key_id      TEXT NOT NULL,
        csrf        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions(expires_at);
    CREATE TABLE admin_tokens (
        id          TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL UNIQUE,
        name        TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    );
    """,
    # 10: the rollups count the requests refused by a rate limit, matched by a guardrail policy, refused by one
    _refusals("INTEGER"),
]

# The SQLite steps whose data Python fills in after their SQL, in their transaction: migration 8's rollups, by the
# writer's own code (`sqlite_usage.backfill_rollups`, in migration 8's columns), ten times faster than SQLite reading
# the JSON members itself.
SQLITE_BACKFILLS: dict[int, Callable[[sqlite3.Connection], None]] = {8: sqlite_usage.backfill_rollups}

# The same steps for PostgreSQL (so a version number means the same schema on both): nanos and
# timestamps as BIGINT, hashes as BYTEA, flags as BOOLEAN, and the JSON members as `json`, which keeps
# the text exactly as written (what `Generation.from_row` reads back). Applied by `PostgresStore`
# under an advisory lock and recorded in `schema_version`.
POSTGRES: list[str] = [
    # 1: teams, wallets with a ledger, hashed API keys
    """
    CREATE TABLE teams (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  BIGINT NOT NULL
    );
    CREATE TABLE wallets (
        team_id        TEXT PRIMARY KEY REFERENCES teams(id),
        balance_nanos  BIGINT NOT NULL DEFAULT 0,
        currency       TEXT NOT NULL DEFAULT 'USD',
        updated_at     BIGINT NOT NULL
    );
    CREATE TABLE wallet_ledger (
        id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        team_id       TEXT NOT NULL REFERENCES teams(id),
        amount_nanos  BIGINT NOT NULL,
        kind          TEXT NOT NULL,
        note          TEXT NOT NULL DEFAULT '',
        created_at    BIGINT NOT NULL
    );
    CREATE INDEX wallet_ledger_team ON wallet_ledger(team_id, created_at);
    CREATE TABLE api_keys (
        kid          TEXT PRIMARY KEY,
        team_id      TEXT NOT NULL REFERENCES teams(id),
        name         TEXT NOT NULL DEFAULT '',
        secret_hash  BYTEA NOT NULL,
        scopes       TEXT NOT NULL,
        status       TEXT NOT NULL DEFAULT 'active',
        created_at   BIGINT NOT NULL,
        revoked_at   BIGINT
    );
    CREATE INDEX api_keys_team ON api_keys(team_id);
    """,
    # 2: one record per request, written with its wallet debit in one transaction
    """
    CREATE TABLE generations (
        request_id          TEXT PRIMARY KEY,
        created_at          BIGINT NOT NULL,
        team_id             TEXT NOT NULL REFERENCES teams(id),
        key_id              TEXT NOT NULL,
        endpoint            TEXT NOT NULL,
        model_id            TEXT NOT NULL,
        provider            TEXT NOT NULL,
        upstream_model      TEXT NOT NULL,
        native_response_id  TEXT NOT NULL DEFAULT '',
        stream              BOOLEAN NOT NULL,
        status_code         INTEGER NOT NULL,
        success             BOOLEAN NOT NULL,
        error_code          TEXT NOT NULL DEFAULT '',
        error_message       TEXT NOT NULL DEFAULT '',
        usage               JSON NOT NULL,
        usage_source        TEXT NOT NULL,
        cost_nanos          BIGINT NOT NULL,
        currency            TEXT NOT NULL,
        pricing_lines       JSON NOT NULL,
        timings             JSON NOT NULL
    );
    CREATE INDEX generations_team_time ON generations(team_id, created_at);
    CREATE INDEX generations_native ON generations(native_response_id);
    """,
    # 3: per-key limits: allowed models, cost budgets per UTC day and month
    """
    ALTER TABLE api_keys ADD COLUMN allowed_models TEXT NOT NULL DEFAULT '';
    ALTER TABLE api_keys ADD COLUMN daily_limit_cost_nanos BIGINT;
    ALTER TABLE api_keys ADD COLUMN monthly_limit_cost_nanos BIGINT;
    CREATE INDEX generations_key_time ON generations(key_id, created_at);
    """,
    # 4: asynchronous jobs (videos, music, files, batches): the gateway's id, its owner, the provider's id
    """
    CREATE TABLE jobs (
        id           TEXT PRIMARY KEY,
        kind         TEXT NOT NULL,
        team_id      TEXT NOT NULL REFERENCES teams(id),
        key_id       TEXT NOT NULL,
        model_id     TEXT NOT NULL,
        provider     TEXT NOT NULL,
        upstream_id  TEXT NOT NULL,
        status       TEXT NOT NULL,
        created_at   BIGINT NOT NULL,
        updated_at   BIGINT NOT NULL,
        billed       BOOLEAN NOT NULL DEFAULT FALSE,
        data         JSON NOT NULL
    );
    CREATE INDEX jobs_team_kind_time ON jobs(team_id, kind, created_at);
    """,
    # 5: per-key rate limits (NULL: the `rate_limits.key` default of the config; 0: none for this key)
    """
    ALTER TABLE api_keys ADD COLUMN rpm_limit BIGINT;
    ALTER TABLE api_keys ADD COLUMN tpm_limit BIGINT;
    ALTER TABLE api_keys ADD COLUMN concurrency_limit BIGINT;
    """,
    # 6: guardrails: a key's own policies (comma-separated names, '': none); what a request's policies did
    # (JSON text, '': nothing; TEXT, not `json`, since '' is not JSON)
    """
    ALTER TABLE api_keys ADD COLUMN guardrails TEXT NOT NULL DEFAULT '';
    ALTER TABLE generations ADD COLUMN guardrails TEXT NOT NULL DEFAULT '';
    """,
    # 7: the response cache: a key's setting (NULL: the config's default for its team; true: on; false: off);
    # what the cache did for a request ('': not involved, hit, miss, bypass) and, on a hit, what its answer
    # would have cost
    """
    ALTER TABLE api_keys ADD COLUMN cache BOOLEAN;
    ALTER TABLE generations ADD COLUMN cache_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE generations ADD COLUMN saved_nanos BIGINT NOT NULL DEFAULT 0;
    """,
    # 8: usage rollups (`proxy.rollups`), as in SQLite; histograms as `json` (read back as written, cheaply), added by
    # `rollup_hist_add` inside the upsert (atomic with several gateways writing); `rollup_bucket`: a duration's bucket.
    f"""
    CREATE TABLE usage_rollups (
        step_ms         BIGINT NOT NULL,
        team_id         TEXT NOT NULL,
        bucket_ms       BIGINT NOT NULL,
        key_id          TEXT NOT NULL,
        model_id        TEXT NOT NULL,
        provider        TEXT NOT NULL,
        requests        BIGINT NOT NULL,
        errors          BIGINT NOT NULL,
        cache_hits      BIGINT NOT NULL,
        input_tokens    BIGINT NOT NULL,
        output_tokens   BIGINT NOT NULL,
        cost_nanos      BIGINT NOT NULL,
        saved_nanos     BIGINT NOT NULL,
        latency_ms_sum  DOUBLE PRECISION NOT NULL,
        ttft_ms_sum     DOUBLE PRECISION NOT NULL,
        ttft_count      BIGINT NOT NULL,
        PRIMARY KEY (step_ms, team_id, bucket_ms, key_id, model_id, provider)
    );
    CREATE TABLE team_rollups (
        step_ms         BIGINT NOT NULL,
        team_id         TEXT NOT NULL,
        bucket_ms       BIGINT NOT NULL,
        requests        BIGINT NOT NULL,
        errors          BIGINT NOT NULL,
        cache_hits      BIGINT NOT NULL,
        input_tokens    BIGINT NOT NULL,
        output_tokens   BIGINT NOT NULL,
        cost_nanos      BIGINT NOT NULL,
        saved_nanos     BIGINT NOT NULL,
        latency_ms_sum  DOUBLE PRECISION NOT NULL,
        ttft_ms_sum     DOUBLE PRECISION NOT NULL,
        ttft_count      BIGINT NOT NULL,
        latency_hist    JSON NOT NULL,
        ttft_hist       JSON NOT NULL,
        PRIMARY KEY (step_ms, team_id, bucket_ms)
    );
    CREATE TABLE rollup_pruning (minutes_before_ms BIGINT NOT NULL);
    INSERT INTO rollup_pruning VALUES ({_MINUTES_FROM.format(now=_POSTGRES_NOW_MS)});
    CREATE FUNCTION rollup_bucket(ms DOUBLE PRECISION) RETURNS INTEGER LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT width_bucket(ms, '{{{",".join(map(repr, BOUNDS))}}}'::double precision[])
    $$;
    CREATE FUNCTION rollup_hist_add(a JSON, b JSON) RETURNS JSON LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT COALESCE(json_object_agg(key, total), '{{}}'::json) FROM (
            SELECT key, SUM(value::bigint) AS total
            FROM (SELECT * FROM json_each_text(a) UNION ALL SELECT * FROM json_each_text(b)) AS e GROUP BY key
        ) AS summed
    $$;
    WITH facts AS (
        SELECT
            s.step_ms, g.team_id, g.created_at - g.created_at % s.step_ms AS bucket_ms, g.key_id, g.model_id,
            g.provider, (g.status_code >= 400 OR NOT g.success)::int AS error, (g.cache_status = 'hit')::int AS hit,
            CASE WHEN json_typeof(g.usage -> 'prompt_tokens') = 'number'
                THEN (g.usage ->> 'prompt_tokens')::numeric::bigint END AS input_tokens,
            CASE WHEN json_typeof(g.usage -> 'completion_tokens') = 'number'
                THEN (g.usage ->> 'completion_tokens')::numeric::bigint END AS output_tokens,
            g.cost_nanos, g.saved_nanos,
            CASE WHEN json_typeof(g.timings -> 'latency_ms') = 'number'
                THEN (g.timings ->> 'latency_ms')::double precision END AS latency_ms,
            CASE WHEN json_typeof(g.timings -> 'ttft_ms') = 'number'
                THEN (g.timings ->> 'ttft_ms')::double precision END AS ttft_ms
        FROM generations g JOIN (VALUES ({MINUTE_MS}::bigint), ({HOUR_MS})) AS s(step_ms)
            ON s.step_ms = {HOUR_MS} OR g.created_at >= (SELECT minutes_before_ms FROM rollup_pruning)
    ), sums AS (
        INSERT INTO usage_rollups
        SELECT step_ms, team_id, bucket_ms, key_id, model_id, provider, COUNT(*), SUM(error), SUM(hit),
            COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), SUM(cost_nanos), SUM(saved_nanos),
            COALESCE(SUM(latency_ms), 0), COALESCE(SUM(ttft_ms), 0), COUNT(ttft_ms)
        FROM facts GROUP BY step_ms, team_id, bucket_ms, key_id, model_id, provider
    ), hists AS (
        SELECT step_ms, team_id, bucket_ms,
            json_object_agg(i, n) FILTER (WHERE kind = 0) AS latency_hist,
            json_object_agg(i, n) FILTER (WHERE kind = 1) AS ttft_hist
        FROM (
            SELECT step_ms, team_id, bucket_ms, 0 AS kind, rollup_bucket(latency_ms) AS i, COUNT(*) AS n
            FROM facts WHERE latency_ms IS NOT NULL GROUP BY step_ms, team_id, bucket_ms, i
            UNION ALL
            SELECT step_ms, team_id, bucket_ms, 1, rollup_bucket(ttft_ms), COUNT(*)
            FROM facts WHERE ttft_ms IS NOT NULL GROUP BY step_ms, team_id, bucket_ms, 5
        ) AS counts GROUP BY step_ms, team_id, bucket_ms
    ), team_sums AS (
        SELECT step_ms, team_id, bucket_ms, COUNT(*), SUM(error), SUM(hit), COALESCE(SUM(input_tokens), 0),
            COALESCE(SUM(output_tokens), 0), SUM(cost_nanos), SUM(saved_nanos), COALESCE(SUM(latency_ms), 0),
            COALESCE(SUM(ttft_ms), 0), COUNT(ttft_ms)
        FROM facts GROUP BY step_ms, team_id, bucket_ms
    )
    INSERT INTO team_rollups
    SELECT t.*, COALESCE(h.latency_hist, '{{}}'), COALESCE(h.ttft_hist, '{{}}')
    FROM team_sums t LEFT JOIN hists h USING (step_ms, team_id, bucket_ms);
    """,
    # 9: the dashboard: sessions (their token's hash only) and operator tokens (hashed like keys)
    """
    CREATE TABLE dashboard_sessions (
        token_hash  BYTEA PRIMARY KEY,
        role        TEXT NOT NULL,
        team_id     TEXT NOT NULL,
        key_id      TEXT NOT NULL,
        csrf        TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL
    );
    CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions(expires_at);
    CREATE TABLE admin_tokens (
        id          TEXT PRIMARY KEY,
        secret_hash BYTEA NOT NULL UNIQUE,
        name        TEXT NOT NULL,
        created_at  BIGINT NOT NULL
    );
    """,
    # 10: the rollups count the requests refused by a rate limit, matched by a guardrail policy, refused by one
    _refusals("BIGINT"),
]
