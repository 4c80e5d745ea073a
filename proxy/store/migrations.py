"""Versioned schema migrations. Append only: a released step is never edited.

SQLITE and POSTGRES grow together, step for step: version N is the same schema on both backends.
"""

from __future__ import annotations

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
]

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
]
