"""The store contract: every `Store` method, run against each backend (SQLite and PostgreSQL) alike."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import msgspec
import orjson
import pytest

from bench.pg_server import PgServer, free_port
from proxy import records
from proxy.config import ConfigError, load_config
from proxy.journal import encode_row
from proxy.meta import RequestMeta
from proxy.recorder import Recorder
from proxy.store import Store, StoreError, migrations, open_store, redact_url
from proxy.store.base import (
    ACTIVE,
    DISABLED,
    REVOKED,
    SCOPE_INFERENCE,
    SCOPE_MANAGEMENT,
    Generation,
    Job,
    Team,
    TopUp,
    url_secrets,
)
from proxy.store.postgres import PostgresStore
from tests.conftest import DEFAULT_CONFIG, ROOT

DAY_MS = 86_400_000
HASH = bytes(range(32))  # a sha256 digest's length, with a NUL byte in it


def ms(text: str) -> int:
    """`2025-03-02T10:00` (UTC) in unix milliseconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def generation(
    request_id: str,
    team_id: str,
    *,
    cost: int = 100,
    created_ms: int | None = None,
    key: str = "k1",
    model: str = "openai/gpt-4o-mini",
    provider: str = "openai",
    endpoint: str = "chat.completions",
    native: str = "",
    usage: bytes = b'{"prompt_tokens":11,"completion_tokens":5,"reasoning_tokens":2}',
    stream: bool = False,
    guardrails: str = "",
    cache_status: str = "",
    saved: int = 0,
) -> tuple:
    """A generation row as the accountant builds it."""
    return Generation(
        request_id=request_id,
        created_at=int(time.time() * 1000) if created_ms is None else created_ms,
        team_id=team_id,
        key_id=key,
        endpoint=endpoint,
        model_id=model,
        provider=provider,
        upstream_model=model.rpartition("/")[2],
        native_response_id=native,
        stream=stream,
        status_code=200,
        success=True,
        error_code="",
        error_message="",
        usage=msgspec.Raw(usage),
        usage_source="reported" if usage != b"{}" else "none",
        cost_nanos=cost,
        currency="USD",
        pricing_lines=msgspec.Raw(b'[{"kind": "input", "nanos": 1}]'),
        timings=msgspec.Raw(b'{"total_ms": 12.5}'),
        guardrails=guardrails,
        cache_status=cache_status,
        saved_nanos=saved,
    ).row()


async def record(store: Store, rows: list[tuple], via: str = "store") -> int:
    """`store.record` of rows given as tuples, as journal lines: called on the store itself, or (`via` "process")
    through the accounting writer process a worker would start for this store."""
    return await record_lines(store, [encode_row(row) for row in rows], via)


async def record_lines(store: Store, lines: list[bytes], via: str = "store") -> int:
    """`store.record` of journal lines, by the store itself or by an accounting writer process (`via`)."""
    if via == "store":
        return await store.record(lines)
    recorder = Recorder(store.url)
    try:
        return await recorder.record(lines)
    finally:
        await recorder.close()


@pytest.fixture(params=["store", "process"])
def via(request) -> str:
    """Records written by the store's own connection, or by an accounting writer process."""
    return request.param


async def funded_team(store: Store, name: str = "acme", credit: int = 1_000_000) -> Team:
    team = await store.ensure_team(name)
    await store.add_credit(team.id, credit)
    return team


# --- opening, migrations ---------------------------------------------------------------------------------


async def test_migrations_are_idempotent(url: str):
    for _ in range(2):  # the second open finds every step applied
        store = await open_store(url)
        try:
            assert await store.schema_version() == len(migrations.SQLITE) == len(migrations.POSTGRES)
            assert store.backend == url.partition(":")[0].replace("postgresql", "postgres")
            await store.ping()
            team = await store.ensure_team("acme")  # the schema works, and data survives a reopen
            assert team.name == "acme"
        finally:
            await store.close()


async def test_a_newer_schema_is_refused(url: str, store: Store):
    if isinstance(store, PostgresStore):
        async with store.pool.acquire() as conn:
            await conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    else:
        await store.db.execute("PRAGMA user_version = 99")  # type: ignore[attr-defined]
    newest = len(migrations.SQLITE)
    with pytest.raises(StoreError, match=f"schema version 99, newer than this gateway's {newest}: upgrade the gateway"):
        await open_store(url)


async def test_gateways_starting_together_migrate_once(pg_url: str):
    stores = await asyncio.gather(*(open_store(pg_url) for _ in range(4)))  # four processes' worth of pools
    try:
        async with stores[0].pool.acquire() as conn:  # type: ignore[attr-defined]
            applied = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in applied] == list(range(1, len(migrations.POSTGRES) + 1))
    finally:
        for store in stores:
            await store.close()


def test_the_store_config_takes_postgres_urls_and_pool_sizes(tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store:\n  url: postgres://gw:pw@db/gw\n  pool_min: 2\n  pool_max: 8\n{_providers()}")
    loaded = load_config(config, env={})
    assert (loaded.store.url, loaded.store.pool_min, loaded.store.pool_max) == ("postgres://gw:pw@db/gw", 2, 8)
    config.write_text(f"store:\n  url: postgres://db/gw\n  pool_min: 5\n  pool_max: 2\n{_providers()}")
    with pytest.raises(ConfigError, match=r"\$\.store\.pool_max: expected at least 1 and at least pool_min \(5\)"):
        load_config(config, env={})
    config.write_text(f"store:\n  url: mysql://gw:hunter2@db/gw\n{_providers()}")
    with pytest.raises(ConfigError, match="postgresql://") as refused:
        load_config(config, env={})
    assert "hunter2" not in str(refused.value)


def _providers() -> str:
    return "providers:\n  openai: {kind: openai, base_url: 'http://127.0.0.1:1/v1'}\n"


# --- failures --------------------------------------------------------------------------------------------


async def test_unreachable_store_is_a_store_error(url: str, tmp_path: Path):
    if url.startswith("sqlite"):
        # Not a folder: aiosqlite, failing to connect, leaves its thread to report to a loop that may be gone.
        (tmp_path / "garbage.db").write_bytes(b"not a database, " * 512)
        unreachable = f"sqlite:///{tmp_path}/garbage.db"
    else:
        unreachable = f"postgresql://gw:s3cret-Pa55@127.0.0.1:{free_port()}/gateway"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        await open_store(unreachable)
    assert time.monotonic() - started < 10
    assert "cannot open the" in str(refused.value)
    assert "s3cret-Pa55" not in str(refused.value)


async def test_a_wrong_password_is_refused_without_echoing_it(pg_server: PgServer, pg_url: str):
    wrong = pg_url.replace(pg_server.password, "not-the-Pa55word")
    with pytest.raises(StoreError, match="password authentication failed") as refused:
        await open_store(wrong)
    assert "not-the-Pa55word" not in str(refused.value) and "postgres:***@127.0.0.1" in str(refused.value)


def test_urls_are_shown_without_their_password():
    assert (
        redact_url("postgresql://gw:p%40ss@db:5432/gw?sslmode=require")
        == "postgresql://gw:***@db:5432/gw?sslmode=require"
    )
    assert (
        redact_url("postgres://db/gw?sslmode=require&password=s3cret")
        == "postgres://db/gw?sslmode=require&password=***"
    )
    assert redact_url("postgresql://gw@db/gw") == "postgresql://gw@db/gw"
    assert redact_url("sqlite:///./data/gateway.db") == "sqlite:///./data/gateway.db"
    assert url_secrets("postgresql://gw:p%40ss@db/gw?password=x") == ["p%2540ss", "p%40ss", "p@ss", "x"]


async def test_an_unsupported_url_names_both_forms():
    with pytest.raises(StoreError) as refused:
        await open_store("mysql://gw:hunter2@db/gw")
    message = str(refused.value)
    assert "sqlite:///path" in message and "postgresql://" in message and "hunter2" not in message


async def test_a_lost_connection_fails_one_call_then_the_pool_reconnects(pg_server: PgServer, pg_url: str):
    store = await open_store(pg_url, pool_min=1, pool_max=1)
    try:
        team = await funded_team(store)
        database = pg_url.rpartition("/")[2]
        # (with a timeout, pg_terminate_backend returns once the server process has gone)
        pg_server.psql(f"SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = '{database}'")
        with pytest.raises(StoreError, match="cannot read a balance: connection was closed") as cut:
            await store.get_balance(team.id)  # the pooled connection was cut: a StoreError, not the driver's
        assert pg_server.password not in str(cut.value)
        assert await store.get_balance(team.id) == 1_000_000
    finally:
        await store.close()


# --- teams and wallets -----------------------------------------------------------------------------------


async def test_teams(store: Store):
    assert await store.get_team("acme") is None
    team = await store.ensure_team("acme")
    assert team.id.startswith("team_") and team.name == "acme" and team.balance_nanos == 0
    assert abs(team.created_at - time.time()) < 60 and isinstance(team.created_at, int)
    assert await store.ensure_team("acme") == team  # once
    assert await store.get_team("acme") == team
    assert await store.get_balance(team.id) == 0
    assert await store.get_balance("team_nope") is None
    other = await store.ensure_team("rival")
    assert other.id != team.id


async def test_add_credit_credits_and_top_ups(store: Store):
    team = await store.ensure_team("acme")
    assert await store.add_credit(team.id, 5_000, note="first") == 5_000
    assert await store.add_credit(team.id, -1_500, note="refund") == 3_500
    assert await store.add_credit(team.id, 250) == 3_750
    assert (await store.get_team("acme")).balance_nanos == 3_750  # type: ignore[union-attr]
    credits = await store.credits(team.id)
    assert credits.balance_nanos == 3_750
    assert [(t.amount_nanos, t.note) for t in credits.top_ups] == [(250, ""), (-1_500, "refund"), (5_000, "first")]
    assert all(isinstance(t, TopUp) and abs(t.created_at - time.time()) < 60 for t in credits.top_ups)
    assert [t.amount_nanos for t in (await store.credits(team.id, top_ups=1)).top_ups] == [250]
    assert (credits.spend_24h_nanos, credits.spend_30d_nanos) == (0, 0)
    empty = await store.credits("team_nope")
    assert (empty.balance_nanos, empty.top_ups, empty.spend_24h_nanos) == (0, [], 0)


async def test_concurrent_credits_all_count(store: Store):
    team = await store.ensure_team("busy")
    await asyncio.gather(*(store.add_credit(team.id, 1_000) for _ in range(50)), store.ensure_team("other"))
    assert await store.get_balance(team.id) == 50_000


async def test_credits_spend_windows(store: Store):
    team = await funded_team(store)
    now = int(time.time() * 1000)
    await record(
        store,
        [
            generation("r-1h", team.id, cost=1, created_ms=now - 3_600_000),
            generation("r-5d", team.id, cost=20, created_ms=now - 5 * DAY_MS),
            generation("r-40d", team.id, cost=300, created_ms=now - 40 * DAY_MS),
            # either side of each window's start: exact, though the rollups' buckets are a minute and an hour
            generation("in-24h", team.id, cost=4_000, created_ms=now - DAY_MS + 5_000),
            generation("out-24h", team.id, cost=50_000, created_ms=now - DAY_MS - 5_000),
            generation("in-30d", team.id, cost=600_000, created_ms=now - 30 * DAY_MS + 5_000),
            generation("out-30d", team.id, cost=7_000_000, created_ms=now - 30 * DAY_MS - 5_000),
        ],
    )
    credits = await store.credits(team.id)
    assert (credits.spend_24h_nanos, credits.spend_30d_nanos) == (4_001, 654_021)
    assert credits.balance_nanos == 1_000_000 - 7_654_321


# --- keys ------------------------------------------------------------------------------------------------


async def test_keys_create_get_and_list(store: Store):
    acme = await store.ensure_team("acme")
    rival = await store.ensure_team("rival")
    key = await store.create_key(
        team_id=acme.id, kid="a1", secret_hash=HASH, name="ci", scopes=(SCOPE_INFERENCE, SCOPE_MANAGEMENT)
    )
    assert (key.kid, key.team_id, key.team_name, key.secret_hash, key.name) == ("a1", acme.id, "acme", HASH, "ci")
    assert key.scopes == (SCOPE_INFERENCE, SCOPE_MANAGEMENT) and key.management and key.status == ACTIVE
    assert key.allowed_models == () and not key.limited and isinstance(key.created_at, int)
    assert key.guardrails == ()
    assert await store.get_key("a1") == key
    assert await store.get_key("nope") is None
    await store.create_key(team_id=rival.id, kid="b1", secret_hash=b"x" * 32, name="", scopes=(SCOPE_INFERENCE,))
    await store.create_key(team_id=acme.id, kid="a0", secret_hash=b"y" * 32, name="", scopes=(SCOPE_INFERENCE,))
    assert [k.kid for k in await store.list_keys()] == ["a0", "a1", "b1"]  # same second: by kid
    assert [k.kid for k in await store.list_keys(acme.id)] == ["a0", "a1"]
    assert [k.team_name for k in await store.list_keys(rival.id)] == ["rival"]
    assert await store.list_keys("team_nope") == []


async def test_key_status(store: Store):
    team = await store.ensure_team("acme")
    await store.create_key(team_id=team.id, kid="k1", secret_hash=HASH, name="", scopes=(SCOPE_INFERENCE,))
    assert await store.set_key_status("k1", DISABLED)
    assert (await store.get_key("k1")).status == DISABLED  # type: ignore[union-attr]
    assert await store.set_key_status("k1", ACTIVE)
    assert await store.set_key_status("k1", REVOKED)
    assert not await store.set_key_status("k1", REVOKED)  # revoked is final
    assert not await store.set_key_status("k1", ACTIVE)
    assert (await store.get_key("k1")).status == REVOKED  # type: ignore[union-attr]
    assert not await store.set_key_status("nope", REVOKED)


async def test_key_rename_and_limits(store: Store):
    team = await store.ensure_team("acme")
    await store.create_key(team_id=team.id, kid="k1", secret_hash=HASH, name="old", scopes=(SCOPE_INFERENCE,))
    assert await store.rename_key("k1", "new name ✓")
    assert (await store.get_key("k1")).name == "new name ✓"  # type: ignore[union-attr]
    assert not await store.rename_key("nope", "x")
    assert await store.set_key_limits(
        "k1", allowed_models=("openai/gpt-4o-mini", "anthropic/claude"), daily_nanos=5, monthly_nanos=2**62
    )
    key = await store.get_key("k1")
    assert key is not None and key.limited
    assert key.allowed_models == ("openai/gpt-4o-mini", "anthropic/claude")
    assert (key.daily_limit_cost_nanos, key.monthly_limit_cost_nanos) == (5, 2**62)
    assert await store.set_key_limits("k1", allowed_models=(), daily_nanos=None, monthly_nanos=None)
    key = await store.get_key("k1")
    assert key is not None and not key.limited and key.allowed_models == ()
    assert not await store.set_key_limits("nope", allowed_models=(), daily_nanos=None, monthly_nanos=None)
    assert not key.rate_limited
    assert await store.set_key_rate_limits("k1", rpm=60, tpm=None, concurrency=0)
    key = await store.get_key("k1")
    assert (
        key is not None and key.rate_limited and (key.rpm_limit, key.tpm_limit, key.concurrency_limit) == (60, None, 0)
    )
    assert await store.set_key_rate_limits("k1", rpm=None, tpm=None, concurrency=None)
    assert not (await store.get_key("k1")).rate_limited  # type: ignore[union-attr]
    assert not await store.set_key_rate_limits("nope", rpm=1, tpm=1, concurrency=1)


async def test_key_guardrails(store: Store):
    team = await store.ensure_team("acme")
    await store.create_key(team_id=team.id, kid="k1", secret_hash=HASH, name="", scopes=(SCOPE_INFERENCE,))
    assert await store.set_key_guardrails("k1", guardrails=("pii", "secrets"))
    assert (await store.get_key("k1")).guardrails == ("pii", "secrets")  # type: ignore[union-attr]
    assert [k.guardrails for k in await store.list_keys(team.id)] == [("pii", "secrets")]
    assert await store.set_key_rate_limits("k1", rpm=5, tpm=None, concurrency=None)  # other settings keep them
    assert (await store.get_key("k1")).guardrails == ("pii", "secrets")  # type: ignore[union-attr]
    assert await store.set_key_guardrails("k1", guardrails=())
    assert (await store.get_key("k1")).guardrails == ()  # type: ignore[union-attr]
    assert not await store.set_key_guardrails("nope", guardrails=("pii",))


async def test_key_cache(store: Store):
    team = await store.ensure_team("acme")
    key = await store.create_key(team_id=team.id, kid="k1", secret_hash=HASH, name="", scopes=(SCOPE_INFERENCE,))
    assert key.cache is None  # the config's default for its team
    for cache in (True, False, None, False):
        assert await store.set_key_cache("k1", cache=cache)
        found = await store.get_key("k1")
        assert found is not None and found.cache is cache
    assert [k.cache for k in await store.list_keys(team.id)] == [False]
    assert await store.set_key_guardrails("k1", guardrails=("pii",))  # other settings keep it
    assert await store.set_key_rate_limits("k1", rpm=5, tpm=None, concurrency=None)
    assert (await store.get_key("k1")).cache is False  # type: ignore[union-attr]
    assert not await store.set_key_cache("nope", cache=True)


# The generation columns of each schema: 5 (and before) and 6 rows are the V1 and V2 row lines' prefixes.
COLUMNS_OF_SCHEMA = {5: records.ROW_LENGTHS[2], 6: records.ROW_LENGTHS[1], 7: records.ROW_LENGTHS[0]}


async def _open_at(url: str, version: int, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store migrated only up to `version`, as a gateway of then left it."""
    with monkeypatch.context() as m:
        m.setattr(migrations, "SQLITE", migrations.SQLITE[:version])
        m.setattr(migrations, "POSTGRES", migrations.POSTGRES[:version])
        store = await open_store(url)
    assert await store.schema_version() == version
    return store


async def _insert(store: Store, table: str, columns: Sequence[str], values: Sequence) -> None:
    """A row written in plain SQL (by an older gateway), on either backend."""
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({{}})"
    if isinstance(store, PostgresStore):
        async with store.pool.acquire() as conn:
            await conn.execute(sql.format(", ".join(f"${i + 1}" for i in range(len(values)))), *values)
    else:
        await store.db.execute(sql.format(", ".join("?" * len(values))), tuple(values))  # type: ignore[attr-defined]


async def _old_key_and_record(store: Store, version: int) -> tuple[Team, tuple]:
    """A key and a generation record of a store at schema `version`; the record's row as it was written."""
    team = await funded_team(store)
    key_columns = ("kid", "team_id", "secret_hash", "scopes", "created_at")
    await _insert(store, "api_keys", key_columns, ("k1", team.id, HASH, SCOPE_INFERENCE, 0))
    columns = COLUMNS_OF_SCHEMA[version]
    old = generation("r_old", team.id, guardrails='[{"policy": "pii"}]')[:columns]
    await _insert(store, "generations", Generation.__struct_fields__[:columns], old)
    return team, old


async def test_a_store_of_schema_5_gains_the_guardrails_columns(url: str, monkeypatch: pytest.MonkeyPatch):
    """Keys and records written before migration 6 read back with no guardrails; new ones keep theirs."""
    store = await _open_at(url, 5, monkeypatch)
    try:
        team, old = await _old_key_and_record(store, 5)
    finally:
        await store.close()
    store = await open_store(url)
    try:
        assert await store.schema_version() == len(migrations.SQLITE) == 10
        assert (await store.get_key("k1")).guardrails == ()  # type: ignore[union-attr]
        found = await store.get_generation(team.id, "r_old")
        assert found is not None and found.guardrails == "" and found.row() == (*old, "", "", 0)
        assert await store.set_key_guardrails("k1", guardrails=("pii",))
        assert (await store.get_key("k1")).guardrails == ("pii",)  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_a_store_of_schema_6_gains_the_cache_columns(url: str, monkeypatch: pytest.MonkeyPatch):
    """Keys written before migration 7 take the config's default; records read back as not involving the
    cache, and count in the activity report as no hits; new ones keep theirs."""
    store = await _open_at(url, 6, monkeypatch)
    try:
        team, old = await _old_key_and_record(store, 6)
        assert await store.set_key_guardrails("k1", guardrails=("pii",))
    finally:
        await store.close()
    store = await open_store(url)
    try:
        assert await store.schema_version() == len(migrations.POSTGRES) == 10
        key = await store.get_key("k1")
        assert key is not None and key.cache is None and key.guardrails == ("pii",)
        found = await store.get_generation(team.id, "r_old")
        assert found is not None and (found.cache_status, found.saved_nanos) == ("", 0)
        assert found.row() == (*old, "", 0) and found.guardrails == '[{"policy": "pii"}]'
        assert await store.set_key_cache("k1", cache=True)
        assert (await store.get_key("k1")).cache is True  # type: ignore[union-attr]
        created = old[Generation.__struct_fields__.index("created_at")]
        await record(store, [generation("r_hit", team.id, cost=0, created_ms=created, cache_status="hit", saved=90)])
        hit = await store.get_generation(team.id, "r_hit")
        assert hit is not None and (hit.cache_status, hit.saved_nanos) == ("hit", 90)
        window = {"since_ms": created - DAY_MS, "until_ms": created + DAY_MS, "limit": 10, "offset": 0}
        _, rows = await store.activity(team.id, model="", key_id="", **window)
        assert [row[-2:] for row in rows] == [(1, 90)] and rows[0][5] == 2
    finally:
        await store.close()


# --- records ---------------------------------------------------------------------------------------------


async def test_record_a_batch_debits_each_team_its_cost(store: Store, via: str):
    acme = await funded_team(store, "acme")
    rival = await funded_team(store, "rival")
    rows = [
        generation("r1", acme.id, cost=1_650),
        generation("r2", acme.id, cost=3_000, stream=True),
        generation("r3", rival.id, cost=7),
        generation("r4", rival.id, cost=0, usage=b"{}"),  # a failed request: recorded, not charged
    ]
    await record(store, rows, via)
    assert await store.get_balance(acme.id) == 1_000_000 - 4_650
    assert await store.get_balance(rival.id) == 1_000_000 - 7
    for row in rows:  # read back exactly as written, JSON text included
        found = await store.get_generation(row[2], row[0])
        assert found is not None and found.row() == row
    await record(store, [], via)
    assert await store.get_balance(acme.id) == 1_000_000 - 4_650


async def test_a_replayed_batch_is_recorded_and_debited_once(store: Store, via: str):
    team = await funded_team(store)
    batch = [generation("r1", team.id, cost=100), generation("r2", team.id, cost=20)]
    assert await record(store, batch, via) == 2
    assert await record(store, batch, via) == 0  # the writer retries a batch whose commit it never heard of
    assert await record(store, [*batch, generation("r3", team.id, cost=3)], via) == 1  # and one that grew
    assert await store.get_balance(team.id) == 1_000_000 - 123
    assert (await store.credits(team.id)).spend_24h_nanos == 123


async def test_a_request_id_twice_in_one_batch_is_recorded_once_last_wins(store: Store):
    team = await funded_team(store)
    await record(store, [generation("r1", team.id, cost=100), generation("r1", team.id, cost=40)])
    assert await store.get_balance(team.id) == 1_000_000 - 40
    assert (await store.get_generation(team.id, "r1")).cost_nanos == 40  # type: ignore[union-attr]
    assert (await store.credits(team.id)).spend_24h_nanos == 40


async def test_record_keeps_any_text_exactly(store: Store, via: str):
    """Rows travel as JSON to the store, which reads them itself: every string comes back as it was."""
    team = await funded_team(store)
    row = list(generation("r1", team.id, native="id \\u0000 not a NUL"))
    row[Generation.__struct_fields__.index("error_message")] = 'quote " backslash \\ \n\t\x01\x7f ü € 😀 \\"'
    row[Generation.__struct_fields__.index("usage")] = '{"prompt_tokens": 1, "note": "a \\"quoted\\" \\u00e9"}'
    await record(store, [tuple(row)], via)
    found = await store.get_generation(team.id, "r1")
    assert found is not None and found.row() == tuple(row)


async def test_two_gateways_recording_the_same_rows_at_once_debit_once(url: str):
    one, two = await open_store(url), await open_store(url)
    try:
        team = await funded_team(one)
        rows = [generation(f"r{i}", team.id, cost=i) for i in range(1, 201)]
        await asyncio.gather(record(one, rows[:150]), record(two, rows[50:]), record(one, rows[100:]))
        assert await two.get_balance(team.id) == 1_000_000 - sum(range(1, 201))
    finally:
        await one.close()
        await two.close()


async def test_record_keeps_what_guardrails_did(store: Store, via: str):
    """A snapshot line with guardrails, one without, and lines of a gateway of before guardrails (a snapshot
    and a row, each one member shorter), through either writer."""
    team = await funded_team(store)
    found = [{"policy": "pii", "stage": "request", "action": "redact", "kinds": {"EMAIL": 2, "PHONE": 1}}]
    meta = RequestMeta("r_guarded", "chat.completions", 1000.0)
    meta.team_id, meta.key_id, meta.status, meta.t_end, meta.guardrails = team.id, "k1", 200, 1000.5, found
    lines = [records.line(meta, int(time.time() * 1000))]
    meta.request_id, meta.guardrails = "r_plain", None
    lines.append(records.line(meta, int(time.time() * 1000)))
    meta.request_id = "r_v1_snapshot"
    v1 = len(get_args(records.SnapshotLineV1))
    lines.append(orjson.dumps(orjson.loads(records.line(meta, int(time.time() * 1000)))[:v1]))
    lines.append(orjson.dumps(generation("r_v1_row", team.id)[: records.ROW_LENGTHS[-1]]))
    lines.append(encode_row(generation("r_row", team.id, guardrails=orjson.dumps(found).decode())))
    assert await record_lines(store, lines, via) == 5
    for request_id, expected in [("r_guarded", found), ("r_row", found)]:
        stored = await store.get_generation(team.id, request_id)
        assert stored is not None and orjson.loads(stored.guardrails) == expected
    for request_id in ("r_plain", "r_v1_snapshot", "r_v1_row"):
        stored = await store.get_generation(team.id, request_id)
        assert stored is not None and stored.guardrails == "", request_id


async def test_record_keeps_what_the_cache_did(store: Store, via: str):
    """Snapshot lines with and without the cache's members, and lines of each older gateway version (snapshots
    and rows), through either writer: an older line reads back as not involving the cache."""
    team = await funded_team(store)
    now = int(time.time() * 1000)
    meta = RequestMeta("r_hit", "chat.completions", 1000.0)
    meta.team_id, meta.key_id, meta.status, meta.t_end = team.id, "k1", 200, 1000.5
    meta.cost_nanos, meta.cache_status, meta.saved_nanos = 10, "hit", 4_640
    lines = [records.line(meta, now)]
    meta.request_id, meta.cost_nanos, meta.cache_status, meta.saved_nanos = "r_plain", 4_650, "", 0
    lines.append(records.line(meta, now))
    meta.guardrails = [{"policy": "pii", "stage": "request", "action": "log", "kinds": {"EMAIL": 1}}]
    for shape in records.SNAPSHOT_LINES[1:]:
        meta.request_id = f"r_snapshot_{len(get_args(shape))}"
        lines.append(orjson.dumps(orjson.loads(records.line(meta, now))[: len(get_args(shape))]))
    row = generation("r_row", team.id, guardrails='[{"policy": "pii"}]', cache_status="miss", saved=0)
    lines.append(encode_row(row))
    for length in records.ROW_LENGTHS[1:]:
        lines.append(orjson.dumps((f"r_row_{length}", *row[1:length])))
    assert await record_lines(store, lines, via) == 7
    expected = {
        "r_hit": ("hit", 4_640),
        "r_plain": ("", 0),
        "r_snapshot_26": ("", 0),
        "r_snapshot_25": ("", 0),
        "r_row": ("miss", 0),
        "r_row_21": ("", 0),
        "r_row_20": ("", 0),
    }
    for request_id, cache in expected.items():
        stored = await store.get_generation(team.id, request_id)
        assert stored is not None and (stored.cache_status, stored.saved_nanos) == cache, request_id
    assert (await store.get_generation(team.id, "r_snapshot_26")).guardrails != ""  # type: ignore[union-attr]
    assert (await store.get_generation(team.id, "r_row_21")).guardrails == '[{"policy": "pii"}]'  # type: ignore[union-attr]
    assert await store.get_balance(team.id) == 1_000_000 - 10 - 3 * 4_650 - 3 * 100  # a hit costs its own cost


async def test_record_takes_flags_as_integers(store: Store, via: str):
    team = await funded_team(store)
    row = list(generation("r1", team.id))
    row[Generation.__struct_fields__.index("stream")] = 1
    row[Generation.__struct_fields__.index("success")] = 0
    await record(store, [tuple(row)], via)
    found = await store.get_generation(team.id, "r1")
    assert found is not None and found.stream is True and found.success is False


async def test_get_generation(store: Store):
    acme = await funded_team(store, "acme")
    rival = await funded_team(store, "rival")
    now = int(time.time() * 1000)
    await record(
        store,
        [
            generation("r1", acme.id, native="chatcmpl-1", created_ms=now - 1_000),
            generation("r2", acme.id, native="chatcmpl-1", created_ms=now),  # a retried native id: newest wins
            generation("r3", rival.id, native="chatcmpl-3"),
        ],
    )
    found = await store.get_generation(acme.id, "r1")
    assert found is not None and found.request_id == "r1" and found.native_response_id == "chatcmpl-1"
    assert isinstance(found.stream, bool) and isinstance(found.cost_nanos, int)
    assert msgspec.json.decode(found.usage) == {"prompt_tokens": 11, "completion_tokens": 5, "reasoning_tokens": 2}
    assert (await store.get_generation(acme.id, "chatcmpl-1")).request_id == "r2"  # type: ignore[union-attr]
    assert await store.get_generation(acme.id, "r3") is None  # another team's
    assert await store.get_generation(acme.id, "chatcmpl-3") is None
    assert await store.get_generation(acme.id, "nope") is None


async def test_key_spend(store: Store):
    team = await funded_team(store)
    since = ms("2025-03-02T00:00")
    await record(
        store,
        [
            generation("r1", team.id, key="k1", cost=100, created_ms=since),
            generation("r2", team.id, key="k1", cost=20, created_ms=since + DAY_MS),
            generation("r3", team.id, key="k1", cost=3_000, created_ms=since - 1),  # before: not counted
            generation("r4", team.id, key="k2", cost=5_000, created_ms=since),  # another key
        ],
    )
    assert await store.key_spend(team.id, "k1", since) == 120  # from the hour rollups
    assert await store.key_spend(team.id, "k2", since) == 5_000
    assert await store.key_spend(team.id, "nope", since) == 0
    assert await store.key_spend("another-team", "k1", since) == 0
    with pytest.raises(ValueError, match="start of a UTC hour"):
        await store.key_spend(team.id, "k1", since + 1)


async def test_activity_groups_by_day_model_provider_endpoint_and_pages(store: Store):
    team = await funded_team(store)
    rival = await funded_team(store, "rival")
    day_a, day_b = ms("2025-03-02T00:00"), ms("2025-03-03T00:00")
    usage = b'{"prompt_tokens":10,"completion_tokens":5,"reasoning_tokens":1}'
    await record(
        store,
        [
            generation("r1", team.id, created_ms=day_a + 1, cost=100, model="m/b", usage=usage),
            generation("r2", team.id, created_ms=day_b - 1, cost=50, model="m/b", usage=b'{"prompt_tokens":1}'),
            generation(
                "r3", team.id, created_ms=day_a, cost=7, model="m/a", endpoint="messages", key="k2", usage=b"{}"
            ),
            generation("r4", team.id, created_ms=day_a + 5, cost=9, model="M/z", usage=usage),  # "M" < "m" bytewise
            generation("r5", team.id, created_ms=day_b + DAY_MS - 1, cost=1, model="m/b", provider="groq", usage=usage),
            generation("r6", team.id, created_ms=day_a - 1, cost=1_000, model="m/b"),  # before `since`
            generation("r7", team.id, created_ms=day_b + DAY_MS, cost=1_000, model="m/b"),  # at `until`
            generation("r8", rival.id, created_ms=day_a + 1, cost=1_000, model="m/b"),  # another team
        ],
    )
    window = {"since_ms": day_a, "until_ms": day_b + DAY_MS, "limit": 100, "offset": 0}
    total, rows = await store.activity(team.id, model="", key_id="", **window)
    assert total == 4
    assert rows == [  # ..., cost, requests, prompt, completion and reasoning tokens, cache hits, saved nanos
        ("2025-03-03", "m/b", "groq", "chat.completions", 1, 1, 10, 5, 1, 0, 0),
        ("2025-03-02", "M/z", "openai", "chat.completions", 9, 1, 10, 5, 1, 0, 0),
        ("2025-03-02", "m/a", "openai", "messages", 7, 1, None, None, None, 0, 0),
        ("2025-03-02", "m/b", "openai", "chat.completions", 150, 2, 11, 5, 1, 0, 0),
    ]
    assert await store.activity(team.id, model="", key_id="", **{**window, "limit": 2, "offset": 1}) == (4, rows[1:3])
    assert await store.activity(team.id, model="", key_id="", **{**window, "offset": 10}) == (4, [])
    assert await store.activity(team.id, model="m/b", key_id="", **window) == (2, [rows[0], rows[3]])
    assert await store.activity(team.id, model="", key_id="k2", **window) == (1, [rows[2]])
    assert await store.activity("team_nope", model="", key_id="", **window) == (0, [])


async def test_activity_counts_cache_hits_and_what_they_saved(store: Store, via: str):
    team = await funded_team(store)
    day = ms("2025-03-02T00:00")
    await record(
        store,
        [
            generation("r1", team.id, created_ms=day + 1, cost=0, cache_status="hit", saved=4_650),
            generation("r2", team.id, created_ms=day + 2, cost=465, cache_status="hit", saved=4_185),
            generation("r3", team.id, created_ms=day + 3, cost=4_650, cache_status="miss"),
            generation("r4", team.id, created_ms=day + 4, cost=4_650, cache_status="bypass"),
            generation("r5", team.id, created_ms=day + 5, cost=4_650),  # the cache was not involved
            generation("r6", team.id, created_ms=day + 6, cost=0, model="m/a", cache_status="hit", saved=2**40),
            generation("r7", team.id, created_ms=day + DAY_MS, cost=0, cache_status="hit", saved=1),  # the next day
        ],
        via,
    )
    window = {"since_ms": day, "until_ms": day + DAY_MS, "limit": 100, "offset": 0}
    total, rows = await store.activity(team.id, model="", key_id="", **window)
    assert total == 2
    assert [(row[1], row[4], row[5], row[-2], row[-1]) for row in rows] == [
        ("m/a", 0, 1, 1, 2**40),  # model, cost, requests, cache hits, saved nanos
        ("openai/gpt-4o-mini", 465 + 3 * 4_650, 5, 2, 4_650 + 4_185),
    ]
    assert all(isinstance(value, int) for row in rows for value in row[-2:])
    assert await store.get_balance(team.id) == 1_000_000 - 465 - 3 * 4_650  # a hit is charged its cost, not saved


# --- a gateway on Postgres ------------------------------------------------------------------------------


async def test_a_gateway_on_postgres_records_debits_and_reports(aiohttp_client, mock, pg_url: str):
    from proxy.app import build_app
    from proxy.auth import generate_key, hash_secret, split_key
    from proxy.gateway import GATEWAY
    from tests.conftest import auth, env_for

    config = load_config(DEFAULT_CONFIG, env=env_for(mock, pg_url))
    config.store.pool_max = 2
    store = await open_store(pg_url)
    try:
        team = await funded_team(store, credit=10 * 10**9)
        kid, key = generate_key()
        secret = split_key(key)[1]  # type: ignore[index]
        await store.create_key(
            team_id=team.id,
            kid=kid,
            secret_hash=hash_secret(secret),
            name="",
            scopes=(SCOPE_INFERENCE, SCOPE_MANAGEMENT),
        )
        client = await aiohttp_client(build_app(config))
        chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=chat, headers=auth(key)) for _ in range(20))
        )
        assert [r.status for r in answers] == [200] * 20
        gw = client.server.app[GATEWAY]
        assert gw.store.backend == "postgres" and gw.store.pool.get_max_size() == 2  # type: ignore[union-attr]
        await gw.accountant.flush()
        cost = 11 * 150 + 5 * 600  # the mock's usage at gpt-4o-mini's prices
        assert await store.get_balance(team.id) == 10 * 10**9 - 20 * cost
        request_id = answers[0].headers["x-request-id"]
        record = await (await client.get("/v1/generations", params={"id": request_id}, headers=auth(key))).json()
        assert record["data"]["cost_nanos"] == cost and record["data"]["usage"]["prompt_tokens"] == 11
        credits = (await (await client.get("/v1/credits", headers=auth(key))).json())["data"]
        assert credits["balance_nanos"] == 10 * 10**9 - 20 * cost
        activity = await (await client.get("/v1/activity", headers=auth(key))).json()
        assert activity["total"] == 1 and activity["activity"][0]["requests"] == 20
        assert activity["activity"][0]["usage_nanos"] == 20 * cost and activity["activity"][0]["prompt_tokens"] == 220
        ready = await client.get("/readyz")
        assert ready.status == 200 and (await ready.json())["checks"]["store"] == "ok"
    finally:
        await store.close()


# --- the command line ------------------------------------------------------------------------------------


def _migrate(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and not k.endswith("_API_KEY")}
    env["GATEWAY_STORE"] = url
    return subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", "--config", str(DEFAULT_CONFIG)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrate_command(url: str):
    backend = "sqlite" if url.startswith("sqlite") else "postgres"
    for _ in range(2):  # creates the schema, then finds it current
        done = _migrate(url)
        assert done.returncode == 0, done.stderr
        assert f"({backend}): schema version {len(migrations.SQLITE)}" in done.stdout
    if backend == "postgres":
        password = url.partition("//")[2].partition("@")[0].partition(":")[2]
        assert password and password not in done.stdout and ":***@" in done.stdout
    else:
        assert f"store {url} (sqlite)" in done.stdout


def test_migrate_command_reports_an_unreachable_store(url: str, tmp_path: Path):
    if url.startswith("sqlite"):
        unreachable = f"sqlite:///{tmp_path}"  # a folder
    else:
        unreachable = f"postgresql://gw:s3cret-Pa55@127.0.0.1:{free_port()}/gateway"
    done = _migrate(unreachable)
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("store error: cannot open the") and "s3cret-Pa55" not in done.stderr


def job(team_id: str, job_id: str, created_at: int, kind: str = "video", status: str = "queued") -> Job:
    return Job(
        id=job_id,
        kind=kind,
        team_id=team_id,
        key_id="kid1",
        model_id="openai/sora-2",
        provider="openai",
        upstream_id="up_" + job_id,
        status=status,
        created_at=created_at,
        updated_at=created_at,
        billed=False,
        data=msgspec.Raw(
            b'{"id": "%s", "status": "%s", "note": "caf\\u00e9 \xc3\xa9"}' % (job_id.encode(), status.encode())
        ),
    )


async def test_jobs_belong_to_their_team(store: Store):
    acme, other = await store.ensure_team("acme"), await store.ensure_team("other")
    first = job(acme.id, "video_1", 1_700_000_000)
    await store.create_job(first)
    assert await store.get_job(acme.id, "video_1") == first  # data kept byte for byte
    assert await store.get_job(other.id, "video_1") is None  # another team's job is absent, not forbidden
    assert not await store.delete_job(other.id, "video_1")
    assert await store.get_job(acme.id, "video_1") == first
    with pytest.raises(StoreError):  # ids are unique
        await store.create_job(job(other.id, "video_1", 1_700_000_001))
    assert await store.delete_job(acme.id, "video_1")
    assert await store.get_job(acme.id, "video_1") is None and not await store.delete_job(acme.id, "video_1")


async def test_jobs_list_newest_first_by_kind_and_page(store: Store):
    acme, other = await store.ensure_team("acme"), await store.ensure_team("other")
    for i, created in enumerate([100, 300, 200, 300, 400]):
        await store.create_job(job(acme.id, f"video_{i}", created))
    await store.create_job(job(acme.id, "music_1", 500, kind="music"))
    await store.create_job(job(other.id, "video_x", 600))
    listed = [j.id for j in await store.list_jobs(acme.id, "video", limit=10)]
    assert listed == ["video_4", "video_3", "video_1", "video_2", "video_0"]  # ties: the greater id first
    pages, after = [], ""
    while page := await store.list_jobs(acme.id, "video", limit=2, after=after):
        pages.append([j.id for j in page])
        after = page[-1].id
    assert pages == [["video_4", "video_3"], ["video_1", "video_2"], ["video_0"]]
    assert [j.id for j in await store.list_jobs(acme.id, "music", limit=10)] == ["music_1"]
    assert await store.list_jobs(other.id, "video", limit=10, after="video_4") == []  # not its job to page from


async def test_a_job_is_updated_and_billed_exactly_once(store: Store):
    acme = await store.ensure_team("acme")
    await store.create_job(job(acme.id, "video_1", 1_700_000_000))
    assert await store.update_job("video_1", status="completed", data=b'{"id": "video_1", "status": "completed"}')
    got = await store.get_job(acme.id, "video_1")
    assert (
        got is not None and got.status == "completed" and bytes(got.data) == b'{"id": "video_1", "status": "completed"}'
    )
    assert got.updated_at >= got.created_at and not got.billed
    marks = await asyncio.gather(*(store.mark_job_billed("video_1") for _ in range(8)))
    assert marks.count(True) == 1  # concurrent pollers: one bills it
    assert (await store.get_job(acme.id, "video_1")).billed  # type: ignore[union-attr]
    assert not await store.update_job("video_404", status="failed", data=b"{}")
    assert not await store.mark_job_billed("video_404")


async def test_recent_generations_newest_first_filtered_and_paged(store: Store):
    acme, rival = await funded_team(store, "acme"), await funded_team(store, "rival")
    now = int(time.time() * 1000)
    rows = [
        generation(f"r{i}", acme.id, created_ms=now - i * 1000, key="k1" if i % 2 else "k2",
                   model="openai/gpt-4o" if i == 3 else "openai/gpt-4o-mini")
        for i in range(6)
    ]  # fmt: skip
    failed = list(generation("bad", acme.id, created_ms=now - 500))
    fields = Generation.__struct_fields__
    failed[fields.index("status_code")], failed[fields.index("success")] = 502, False
    failed[fields.index("error_code")] = "upstream_error"
    await record(store, [*rows, tuple(failed), generation("theirs", rival.id, created_ms=now)])

    def ids(found: list[Generation]) -> list[str]:
        return [g.request_id for g in found]

    assert ids(await store.recent_generations(acme.id, limit=3)) == ["r0", "bad", "r1"]
    assert ids(await store.recent_generations(acme.id, limit=3, before_ms=now - 1000)) == ["r2", "r3", "r4"]
    assert ids(await store.recent_generations(acme.id, limit=10, since_ms=now - 1000)) == ["r0", "bad", "r1"]
    assert ids(await store.recent_generations(acme.id, limit=10, model="openai/gpt-4o")) == ["r3"]
    assert ids(await store.recent_generations(acme.id, limit=10, key_id="k2")) == ["r0", "r2", "r4"]
    assert ids(await store.recent_generations(acme.id, limit=10, failed=True)) == ["bad"]
    assert "bad" not in ids(await store.recent_generations(acme.id, limit=10, failed=False))
    assert ids(await store.recent_generations(rival.id, limit=10)) == ["theirs"]
