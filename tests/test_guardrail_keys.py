"""A key's own guardrail policies (keys API, CLI, store) and what a request's guardrails did, in its record."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy import records
from proxy.app import build_app
from proxy.config import load_config
from proxy.meta import RequestMeta, Usage
from proxy.store import open_store
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for, stored_key
from tests.test_cli import cli

GUARDRAILS = """
guardrails:
  policies:
    pii: {check: pii, action: redact}
    secrets: {check: secrets, action: block}
"""
FOUND = [
    {"policy": "pii", "stage": "request", "action": "redact", "kinds": {"EMAIL": 2}},
    {"policy": "secrets", "stage": "response", "action": "log", "kinds": {"AWS_KEY": 1}},
]
CREATED_MS = 1_796_400_000_123


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The default config and two guardrail policies (no pricing file beside it: requests are not priced)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(DEFAULT_CONFIG.read_text() + GUARDRAILS)
    return path


@pytest.fixture
async def guarded(aiohttp_client, mock: Mock, store_url: str, config_path: Path) -> TestClient:
    return await aiohttp_client(build_app(load_config(config_path, env=env_for(mock, store_url))))


async def _stored(store_url: str, kid: str) -> tuple[str, ...]:
    return (await stored_key(store_url, kid)).guardrails


# --- a key's policies ------------------------------------------------------------------------------------


async def test_a_keys_guardrails_are_set_read_changed_and_cleared(guarded, make_key, store_url):
    admin = await make_key(management=True)
    created = await guarded.post("/v1/keys", json={"name": "g", "guardrails": ["pii"]}, headers=auth(admin))
    assert created.status == 200, await created.text()
    body = await created.json()
    new_key, kid = body["key"], body["data"]["id"]
    assert body["data"]["guardrails"] == ["pii"] and await _stored(store_url, kid) == ("pii",)
    mine = await (await guarded.get("/v1/key", headers=auth(new_key))).json()  # read through the key cache
    assert mine["data"]["guardrails"] == ["pii"]
    listing = await (await guarded.get("/v1/keys", headers=auth(admin))).json()
    assert {k["id"]: k["guardrails"] for k in listing["keys"]} == {admin.split("_")[3]: [], kid: ["pii"]}

    changed = await guarded.patch(f"/v1/keys/{kid}", json={"guardrails": ["pii", "secrets"]}, headers=auth(admin))
    assert (await changed.json())["data"]["guardrails"] == ["pii", "secrets"]
    mine = await (await guarded.get("/v1/key", headers=auth(new_key))).json()  # the cached record was forgotten
    assert mine["data"]["guardrails"] == ["pii", "secrets"]

    renamed = await guarded.patch(f"/v1/keys/{kid}", json={"name": "g2", "rpm_limit": 5}, headers=auth(admin))
    assert (await renamed.json())["data"]["guardrails"] == ["pii", "secrets"]  # absent: kept

    cleared = await guarded.patch(f"/v1/keys/{kid}", json={"guardrails": None}, headers=auth(admin))
    assert (await cleared.json())["data"]["guardrails"] == [] and await _stored(store_url, kid) == ()
    await guarded.patch(f"/v1/keys/{kid}", json={"guardrails": ["secrets", "secrets"]}, headers=auth(admin))
    assert await _stored(store_url, kid) == ("secrets",)  # each policy once
    emptied = await guarded.patch(f"/v1/keys/{kid}", json={"guardrails": []}, headers=auth(admin))
    assert (await emptied.json())["data"]["guardrails"] == []
    mine = await (await guarded.get("/v1/key", headers=auth(new_key))).json()
    assert mine["data"]["guardrails"] == []


async def test_an_unknown_policy_is_a_400_naming_it_that_changes_nothing(guarded, make_key, store_url):
    admin = await make_key(management=True)
    kid = admin.split("_")[3]
    r = await guarded.post("/v1/keys", json={"name": "x", "guardrails": ["pii", "toxicity"]}, headers=auth(admin))
    body = await r.json()
    assert r.status == 400 and body["error"] == "invalid_request", body
    assert body["message"] == "Unknown policies in guardrails: toxicity (the gateway's: pii, secrets)."
    r = await guarded.patch(f"/v1/keys/{kid}", json={"name": "y", "guardrails": ["nope"]}, headers=auth(admin))
    assert r.status == 400 and "nope" in (await r.json())["message"]
    listing = await (await guarded.get("/v1/keys", headers=auth(admin))).json()
    assert listing["total"] == 1 and listing["keys"][0]["name"] == "" and listing["keys"][0]["guardrails"] == []
    wrong = await guarded.post("/v1/keys", json={"guardrails": "pii"}, headers=auth(admin))  # not a list
    assert wrong.status == 400


async def test_without_policies_in_the_config_any_name_is_refused(gateway, make_key):
    admin = await make_key(management=True)
    r = await gateway.post("/v1/keys", json={"guardrails": ["pii"]}, headers=auth(admin))
    body = await r.json()
    assert r.status == 400 and body["message"] == "Unknown policies in guardrails: pii (the gateway's: none defined)."
    r = await gateway.post("/v1/keys", json={"guardrails": []}, headers=auth(admin))
    assert r.status == 200 and (await r.json())["data"]["guardrails"] == []


async def test_the_cli_sets_a_keys_guardrails(mock, store_url, config_path):
    env = env_for(mock, store_url)
    out = cli(env, "keys", "create", "--config", str(config_path), "--team", "acme", "--guardrails", "pii, secrets")
    kid = out.stdout.strip().splitlines()[-1].split("_")[3]
    assert await _stored(store_url, kid) == ("pii", "secrets")
    plain = cli(env, "keys", "create", "--config", str(config_path), "--team", "acme").stdout.splitlines()[-1]
    assert await _stored(store_url, plain.split("_")[3]) == ()
    args = ("keys", "create", "--config", str(config_path), "--team", "other", "--guardrails", "pii,toxicity")
    refused = cli(env, *args, check=False)
    assert refused.returncode == 2
    assert "unknown policies in --guardrails: toxicity (guardrails.policies: pii, secrets)" in refused.stderr
    store = await open_store(store_url)
    try:
        assert await store.get_team("other") is None  # refused before its team was made
    finally:
        await store.close()
    bare = cli(
        env, "keys", "create", "--config", str(DEFAULT_CONFIG), "--team", "acme", "--guardrails", "pii", check=False
    )
    assert bare.returncode == 2 and "(guardrails.policies: none defined in" in bare.stderr


# --- what a request's guardrails did, in its record ------------------------------------------------------


def _finished(team_id: str, request_id: str, guardrails: list[dict] | None) -> RequestMeta:
    m = RequestMeta(request_id, "chat.completions", 1000.0)
    m.team_id, m.key_id, m.model, m.provider = team_id, "k1", "openai/gpt-4o-mini", "openai"
    m.upstream_model, m.native_id, m.status = "gpt-4o-mini", "chatcmpl-1", 200
    m.usage = Usage(input_tokens=11, output_tokens=40, total_tokens=51)
    m.t_upstream_start, m.t_first_token, m.t_upstream_end, m.t_end = 1000.001, 1000.05, 1000.42, 1000.421
    m.guardrails = guardrails
    return m


async def test_a_records_guardrails_reach_the_generations_api(guarded, make_key, store_url):
    key = await make_key()
    store = await open_store(store_url)
    try:
        team = await store.get_team("acme")
        assert team is not None
        lines = [
            records.line(_finished(team.id, "req_guarded", FOUND), CREATED_MS),
            records.line(_finished(team.id, "req_plain", None), CREATED_MS),
            records.line(_finished(team.id, "req_empty", []), CREATED_MS),
        ]
        assert await store.record(lines) == 3
        stored = await store.get_generation(team.id, "req_guarded")
    finally:
        await store.close()
    assert stored is not None and orjson.loads(stored.guardrails) == FOUND
    assert records.generation(lines[0]).guardrails == stored.guardrails  # a record not yet in the store
    for request_id, expected in (("req_guarded", FOUND), ("req_plain", []), ("req_empty", [])):
        r = await guarded.get("/v1/generations", params={"id": request_id}, headers=auth(key))
        assert r.status == 200 and (await r.json())["data"]["guardrails"] == expected, request_id


async def test_a_snapshot_line_of_before_guardrails_still_becomes_a_row(store_url):
    store = await open_store(store_url)
    try:
        team = await store.ensure_team("acme")
        meta = _finished(team.id, "req_old", None)
        new = records.line(meta, CREATED_MS)
        v1 = len(get_args(records.SnapshotLineV1))
        old = orjson.dumps(orjson.loads(new)[:v1])  # a V1 line: the same members, without guardrails (nor cache)
        records.check(old)
        assert orjson.loads(old)[-1] == [] and len(orjson.loads(old)) == v1  # attempts last
        (row,) = records.rows([old])
        assert row == records.row(meta, CREATED_MS) and row[-3:] == ("", "", 0)  # guardrails, cache status, saved
        assert await store.record([old]) == 1
        found = await store.get_generation(team.id, "req_old")
    finally:
        await store.close()
    assert found is not None and found.guardrails == "" and found.row() == row


def test_the_response_meta_shows_guardrails_only_when_they_acted():
    meta = _finished("team_1", "req_1", None)
    assert "guardrails" not in meta.as_dict()
    meta.guardrails = []
    assert "guardrails" not in meta.as_dict()
    meta.guardrails = FOUND
    assert meta.as_dict()["guardrails"] == FOUND
