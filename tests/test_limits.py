"""Per-key limits: allowed models (403) and cost budgets per UTC day and month (402), enforced from memory."""

from __future__ import annotations

import subprocess
import sys

from proxy.app import build_app
from proxy.config import load_config
from proxy.gateway import GATEWAY
from tests.conftest import DEFAULT_CONFIG, ROOT, auth, env_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
COST = 4_650  # the mock's usage at gpt-4o-mini's prices


async def limited(gateway, make_key, **limits) -> str:
    admin = await make_key(team="acme", credit_usd=0, management=True)
    created = await gateway.post("/v1/keys", json={"name": "limited", **limits}, headers=auth(admin))
    assert created.status == 200, await created.text()
    return (await created.json())["key"]


async def test_allowed_models(gateway, key, make_key, mock):
    limited_key = await limited(gateway, make_key, allowed_models=["openai/gpt-4o-mini"])
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 200
    refused = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "openai/gpt-4o"}, headers=auth(limited_key)
    )
    assert refused.status == 403
    assert "may not use 'openai/gpt-4o'" in (await refused.json())["error"]["message"]
    me = await (await gateway.get("/v1/gateway/models/me", headers=auth(limited_key))).json()
    assert [m["id"] for m in me["models"]] == ["openai/gpt-4o-mini"] and me["total"] == 1
    bad = await gateway.post(
        "/v1/keys",
        json={"allowed_models": ["nope/x"]},
        headers=auth(await make_key(team="acme", credit_usd=0, management=True)),
    )
    assert bad.status == 400


async def test_daily_budget_stops_the_key_not_the_team(gateway, key, make_key, mock):
    limited_key = await limited(gateway, make_key, daily_limit_cost_nanos=2 * COST + 1)
    for _ in range(3):  # spent 0, then 4,650, then 9,300: under the limit before each request
        assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 200
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))
    body = await refused.json()
    assert refused.status == 402 and body["error"]["code"] == "key_budget_exceeded"
    assert "$0.00001395 today" in body["error"]["message"]
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200  # others go on


async def test_budget_holds_after_a_reload_from_the_store(aiohttp_client, mock, store_url, make_key):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.auth.cache_ttl_s = 0  # every check reads the store: spend must come from the records
    client = await aiohttp_client(build_app(config))
    await make_key()
    limited_key = await limited(client, make_key, monthly_limit_cost_nanos=COST)
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 200
    # not yet written: counted from what is pending
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 402
    await client.server.app[GATEWAY].accountant.flush()
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 402


async def test_raising_or_clearing_a_limit_lets_the_key_go_on(gateway, key, make_key, mock):
    admin = await make_key(team="acme", credit_usd=0, management=True)
    created = await (await gateway.post("/v1/keys", json={"daily_limit_cost_nanos": 0}, headers=auth(admin))).json()
    limited_key, kid = created["key"], created["data"]["id"]
    assert created["data"]["daily_limit_cost_nanos"] == 0
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 402
    changed = await gateway.patch(f"/v1/keys/{kid}", json={"daily_limit_cost_nanos": None}, headers=auth(admin))
    assert (await changed.json())["data"]["daily_limit_cost_nanos"] is None
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(limited_key))).status == 200
    negative = await gateway.patch(f"/v1/keys/{kid}", json={"monthly_limit_cost_nanos": -1}, headers=auth(admin))
    assert negative.status == 400


def test_cli_sets_limits(mock, store_url):
    env = env_for(mock, store_url)
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "keys",
        "create",
        "--team",
        "acme",
        "--models",
        "openai/gpt-4o-mini,openai/gpt-4o",
        "--daily-limit",
        "0.5",
        "--monthly-limit",
        "10",
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import asyncio

    from proxy.store import open_store

    async def read():
        store = await open_store(store_url)
        try:
            return (await store.list_keys())[0]
        finally:
            await store.close()

    record = asyncio.run(read())
    assert record.allowed_models == ("openai/gpt-4o-mini", "openai/gpt-4o")
    assert (record.daily_limit_cost_nanos, record.monthly_limit_cost_nanos) == (500_000_000, 10_000_000_000)
    bad = subprocess.run(
        [*argv[:7], "--models", "nope/x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unknown models" in bad.stderr
