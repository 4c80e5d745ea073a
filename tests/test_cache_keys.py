"""A key's response cache setting (keys API, CLI, store) and what the cache did, in the record and the activity."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import get_args

import orjson
import pytest

from proxy import records
from proxy.journal import encode_row
from proxy.meta import RequestMeta, Usage
from proxy.store import open_store
from proxy.store.base import Generation, Team
from tests.conftest import auth, env_for, stored_key
from tests.test_cli import cli

CREATED_MS = int(datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0).timestamp() * 1000)


async def _stored(store_url: str, kid: str) -> bool | None:
    return (await stored_key(store_url, kid)).cache


# --- a key's setting -------------------------------------------------------------------------------------


async def test_a_keys_cache_is_set_read_changed_and_cleared(gateway, make_key, store_url):
    admin = await make_key(management=True)
    created = await gateway.post("/v1/keys", json={"name": "c", "cache": True}, headers=auth(admin))
    assert created.status == 200, await created.text()
    body = await created.json()
    new_key, kid = body["key"], body["data"]["id"]
    assert body["data"]["cache"] is True and await _stored(store_url, kid) is True
    mine = await (await gateway.get("/v1/key", headers=auth(new_key))).json()  # read through the key cache
    assert mine["data"]["cache"] is True
    listing = await (await gateway.get("/v1/keys", headers=auth(admin))).json()
    assert {k["id"]: k["cache"] for k in listing["keys"]} == {admin.split("_")[3]: None, kid: True}

    off = await gateway.patch(f"/v1/keys/{kid}", json={"cache": False}, headers=auth(admin))
    assert (await off.json())["data"]["cache"] is False and await _stored(store_url, kid) is False
    mine = await (await gateway.get("/v1/key", headers=auth(new_key))).json()  # the cached record was forgotten
    assert mine["data"]["cache"] is False

    renamed = await gateway.patch(f"/v1/keys/{kid}", json={"name": "c2", "rpm_limit": 5}, headers=auth(admin))
    assert (await renamed.json())["data"]["cache"] is False  # absent: kept

    cleared = await gateway.patch(f"/v1/keys/{kid}", json={"cache": None}, headers=auth(admin))
    assert (await cleared.json())["data"]["cache"] is None and await _stored(store_url, kid) is None
    mine = await (await gateway.get("/v1/key", headers=auth(new_key))).json()
    assert mine["data"]["cache"] is None

    plain = await gateway.post("/v1/keys", json={"name": "p"}, headers=auth(admin))
    assert (await plain.json())["data"]["cache"] is None
    explicit = await gateway.post("/v1/keys", json={"cache": None}, headers=auth(admin))
    assert (await explicit.json())["data"]["cache"] is None


@pytest.mark.parametrize(
    ("value", "shown"),
    [("on", '"on"'), (1, "1"), (0, "0"), ([], "[]"), ({"enabled": True}, '{"enabled":true}'), ("x" * 100, None)],
)
async def test_a_cache_that_is_not_a_boolean_or_null_is_a_400_that_changes_nothing(
    gateway, make_key, store_url, value, shown
):
    admin = await make_key(management=True)
    kid = admin.split("_")[3]
    r = await gateway.post("/v1/keys", json={"name": "x", "cache": value}, headers=auth(admin))
    body = await r.json()
    assert r.status == 400 and body["error"] == "invalid_request", body
    assert body["message"].startswith(
        "`cache` must be true (cache this key's answers), false (never) or null (the gateway's default for its "
        "team), got "
    )
    if shown is not None:
        assert body["message"].endswith(f"got {shown}.")
    else:  # a long value is cut short
        assert body["message"].endswith("….") and len(body["message"]) < 200
    r = await gateway.patch(f"/v1/keys/{kid}", json={"name": "y", "cache": value}, headers=auth(admin))
    assert r.status == 400 and (await r.json())["message"] == body["message"]
    listing = await (await gateway.get("/v1/keys", headers=auth(admin))).json()
    assert listing["total"] == 1 and listing["keys"][0]["name"] == "" and listing["keys"][0]["cache"] is None
    assert await _stored(store_url, kid) is None


async def test_the_cli_sets_a_keys_cache(mock, store_url):
    env = env_for(mock, store_url)
    on = cli(env, "keys", "create", "--team", "acme", "--cache", "on").stdout.splitlines()[-1]
    off = cli(env, "keys", "create", "--team", "acme", "--cache", "off").stdout.splitlines()[-1]
    plain = cli(env, "keys", "create", "--team", "acme").stdout.splitlines()[-1]
    assert [await _stored(store_url, key.split("_")[3]) for key in (on, off, plain)] == [True, False, None]
    refused = cli(env, "keys", "create", "--team", "other", "--cache", "yes", check=False)
    assert refused.returncode == 2 and "--cache: invalid choice: 'yes'" in refused.stderr


# --- what the cache did, in the record -------------------------------------------------------------------


def _finished(team_id: str, request_id: str, *, cost: int, cache_status: str = "", saved: int = 0) -> RequestMeta:
    m = RequestMeta(request_id, "chat.completions", 1000.0)
    m.team_id, m.key_id, m.model, m.provider = team_id, "k1", "openai/gpt-4o-mini", "openai"
    m.upstream_model, m.native_id, m.status = "gpt-4o-mini", "chatcmpl-1", 200
    m.usage = Usage(input_tokens=11, output_tokens=40, total_tokens=51)
    m.t_upstream_start, m.t_first_token, m.t_upstream_end, m.t_end = 1000.001, 1000.05, 1000.42, 1000.421
    m.cost_nanos, m.cache_status, m.saved_nanos = cost, cache_status, saved
    return m


async def _team(store_url: str) -> Team:
    store = await open_store(store_url)
    try:
        team = await store.get_team("acme")
    finally:
        await store.close()
    assert team is not None
    return team


async def _record(store_url: str, lines: list[bytes]) -> int:
    store = await open_store(store_url)
    try:
        return await store.record(lines)
    finally:
        await store.close()


async def test_what_the_cache_did_reaches_the_generations_api(gateway, make_key, store_url):
    key = await make_key()
    team = await _team(store_url)
    hit = records.line(_finished(team.id, "req_hit", cost=0, cache_status="hit", saved=4_650), CREATED_MS)
    lines = [
        hit,
        records.line(_finished(team.id, "req_miss", cost=4_650, cache_status="miss"), CREATED_MS),
        records.line(_finished(team.id, "req_plain", cost=4_650), CREATED_MS),
    ]
    (row, *_) = records.rows(lines)
    assert Generation.from_row(row).saved_nanos == 4_650
    pending = records.generation(hit)  # a record not yet in the store, as the accountant finds it
    assert (pending.cache_status, pending.saved_nanos, pending.cost_nanos) == ("hit", 4_650, 0)
    assert await _record(store_url, lines) == 3
    for request_id, expected in (
        ("req_hit", ("hit", 4_650, 0)),
        ("req_miss", ("miss", 0, 4_650)),
        ("req_plain", ("", 0, 4_650)),
    ):
        r = await gateway.get("/v1/generations", params={"id": request_id}, headers=auth(key))
        data = (await r.json())["data"]
        assert r.status == 200 and (data["cache_status"], data["saved_nanos"], data["cost_nanos"]) == expected


async def test_lines_of_older_gateways_replay_as_not_involving_the_cache(gateway, make_key, store_url):
    key = await make_key()
    team = await _team(store_url)
    lines = []
    for shape in records.SNAPSHOT_LINES[1:]:
        meta = _finished(team.id, f"req_snapshot_{len(get_args(shape))}", cost=100)
        new = records.line(meta, CREATED_MS)
        lines.append(orjson.dumps(orjson.loads(new)[: len(get_args(shape))]))
    row = records.row(_finished(team.id, "req_row", cost=100, cache_status="hit", saved=9), CREATED_MS)
    for length in records.ROW_LENGTHS[1:]:
        lines.append(encode_row((f"req_row_{length}", *row[1:length])).rstrip(b"\n"))
    for line in lines:
        records.check(line)
    assert await _record(store_url, lines) == 4
    for request_id in ("req_snapshot_26", "req_snapshot_25", "req_row_21", "req_row_20"):
        r = await gateway.get("/v1/generations", params={"id": request_id}, headers=auth(key))
        data = (await r.json())["data"]
        assert r.status == 200 and (data["cache_status"], data["saved_nanos"]) == ("", 0), request_id
        assert data["cost_nanos"] == 100 and data["guardrails"] == []


# --- the activity report ---------------------------------------------------------------------------------


async def test_activity_counts_cache_hits_and_saved_nanos(gateway, make_key, store_url):
    admin = await make_key(management=True)
    team = await _team(store_url)
    lines = [
        records.line(_finished(team.id, "req_1", cost=0, cache_status="hit", saved=4_650), CREATED_MS),
        records.line(_finished(team.id, "req_2", cost=465, cache_status="hit", saved=4_185), CREATED_MS),
        records.line(_finished(team.id, "req_3", cost=4_650, cache_status="miss"), CREATED_MS),
        records.line(_finished(team.id, "req_4", cost=4_650, cache_status="bypass"), CREATED_MS),
        records.line(_finished(team.id, "req_5", cost=4_650), CREATED_MS),
    ]
    assert await _record(store_url, lines) == 5
    body = await (await gateway.get("/v1/activity", headers=auth(admin))).json()
    assert body["ok"] is True and body["total"] == 1, body
    (row,) = body["activity"]
    assert row["requests"] == 5 and row["usage_nanos"] == 465 + 3 * 4_650 and row["usage"] == "$0.000014415"
    assert (row["cache_hits"], row["saved_nanos"], row["saved_usd"]) == (2, 8_835, "$0.000008835")
