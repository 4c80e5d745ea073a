"""Platform APIs: the calling key, credits (management keys only), price sheets and the cost calculator."""

from __future__ import annotations

from decimal import Decimal

import pytest

from proxy.app import build_app
from proxy.gateway import GATEWAY
from tests.conftest import auth

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_key_describes_the_caller_without_its_secret(gateway, key):
    r = await gateway.get("/v1/key", headers=auth(key))
    body = await r.json()
    assert r.status == 200 and body["ok"] is True
    data = body["data"]
    kid = key.split("_")[3]
    assert data["id"] == kid and data["prefix"] == f"aistats_v1_sk_{kid}" and data["team_name"] == "acme"
    assert data["status"] == "active" and data["scopes"] == ["inference"]
    assert data["allowed_models"] == [] and data["rpm_limit"] is None and data["guardrails"] == []
    assert data["cache"] is None  # the config's default for its team
    assert key.split("_", 4)[4] not in await r.text()
    assert (await gateway.get("/v1/key")).status == 401


async def test_credits_need_a_management_key(gateway, key, make_key, mock):
    refused = await gateway.get("/v1/credits", headers=auth(key))
    assert refused.status == 403
    assert await refused.json() == {
        "ok": False,
        "error": "forbidden",
        "message": "This endpoint needs a management key (stats-gateway keys create --management).",
        "request_id": refused.headers["x-request-id"],
    }
    admin = await make_key(team="acme", credit_usd=5, management=True)  # acme now holds $15
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    data = (await (await gateway.get("/v1/credits", headers=auth(admin))).json())["data"]
    assert data["balance_nanos"] == 15_000_000_000 - 4_650 and data["balance"] == "$14.99999535"
    assert data["spend"]["last_24h_nanos"] == 4_650 == data["spend"]["last_30d_nanos"]
    assert [t["amount_nanos"] for t in data["top_ups"]] == [5_000_000_000, 10_000_000_000]
    await gateway.server.app[GATEWAY].accountant.flush()  # the same figures once written
    after = (await (await gateway.get("/v1/credits", headers=auth(admin))).json())["data"]
    assert after["balance_nanos"] == data["balance_nanos"] and after["spend"] == data["spend"]


async def test_pricing_models_lists_the_catalogue(gateway, key):
    data = (await (await gateway.get("/v1/pricing/models", headers=auth(key))).json())["data"]
    assert data["currency"] == "USD" and data["effective"]
    mini = next(m for m in data["models"] if m["model_id"] == "openai/gpt-4o-mini")
    assert Decimal(mini["input_per_mtok"]) == Decimal("0.15") and Decimal(mini["output_per_mtok"]) == Decimal("0.6")


async def test_calculate_uses_the_billing_code(gateway, key, mock):
    billed = await (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).json()
    usage = {
        "prompt_tokens": billed["usage"]["prompt_tokens"],
        "completion_tokens": billed["usage"]["completion_tokens"],
    }
    r = await gateway.post(
        "/v1/pricing/calculate", json={"model": "openai/gpt-4o-mini", "usage": usage}, headers=auth(key)
    )
    data = (await r.json())["data"]
    assert data["cost_nanos"] == billed["cost_nanos"] == 4_650
    assert data["pricing_lines"] == billed["pricing_lines"] and data["provider"] == "openai"
    big = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "cached_tokens": 500_000}
    r = await gateway.post("/v1/pricing/calculate", json={"model": "openai/gpt-5", "usage": big}, headers=auth(key))
    assert (await r.json())["data"]["cost_nanos"] == 625_000_000 + 62_500_000 + 10_000_000_000


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope/x", "usage": {}}, 404, "model_not_found"),
        ({"model": "openai/gpt-4o-mini", "usage": {"prompt_tokens": -1}}, 400, "invalid_request"),
        ({"model": "openai/gpt-4o-mini", "usage": {"tokens": 1}}, 400, "invalid_request"),
        ({"model": "openai/gpt-4o-mini", "usage": {}, "provider": "groq"}, 400, "invalid_request"),
        ({"usage": {}}, 400, "invalid_request"),
    ],
)
async def test_calculate_errors(gateway, key, body, status, code):
    r = await gateway.post("/v1/pricing/calculate", json=body, headers=auth(key))
    assert r.status == status and (await r.json())["error"] == code


async def test_key_management_lifecycle(gateway, key, make_key, mock):
    admin = await make_key(team="acme", credit_usd=0, management=True)
    assert (await gateway.get("/v1/keys", headers=auth(key))).status == 403  # an inference key may not
    listing = await (await gateway.get("/v1/keys", headers=auth(admin))).json()
    assert listing["ok"] is True and listing["total"] == 2 and len(listing["keys"]) == 2
    assert key.split("_", 4)[4] not in str(listing)

    created = await (await gateway.post("/v1/keys", json={"name": "ci"}, headers=auth(admin))).json()
    new_key, record = created["key"], created["data"]
    assert record["name"] == "ci" and record["scopes"] == ["inference"] and new_key.startswith(record["prefix"] + "_")
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(new_key))).status == 200

    kid = record["id"]
    disabled = await gateway.patch(
        f"/v1/keys/{kid}", json={"status": "disabled", "name": "ci-old"}, headers=auth(admin)
    )
    assert (await disabled.json())["data"] == {**record, "status": "disabled", "name": "ci-old"}
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(new_key))
    assert refused.status == 401 and "disabled" in (await refused.json())["error"]["message"]  # at once, here
    await gateway.patch(f"/v1/keys/{kid}", json={"status": "active"}, headers=auth(admin))
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(new_key))).status == 200

    revoked = await gateway.delete(f"/v1/keys/{kid}", headers=auth(admin))
    assert (await revoked.json())["data"]["status"] == "revoked"
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(new_key))).status == 401
    again = await gateway.patch(f"/v1/keys/{kid}", json={"status": "active"}, headers=auth(admin))
    assert again.status == 400
    bad = await gateway.patch(f"/v1/keys/{kid}", json={"status": "revoked"}, headers=auth(admin))
    assert bad.status == 400


async def test_keys_of_another_team_are_out_of_reach(gateway, key, make_key):
    rival_admin = await make_key(team="rival", management=True)
    kid = key.split("_")[3]
    for method in ("patch", "delete"):
        r = await getattr(gateway, method)(f"/v1/keys/{kid}", json={"name": "x"}, headers=auth(rival_admin))
        assert r.status == 404
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200


async def test_activity_rows_per_day_and_model(gateway, key, make_key, mock):
    admin = await make_key(team="acme", credit_usd=0, management=True)
    for _ in range(3):
        await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await gateway.post(
        "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "x"}, headers=auth(key)
    )
    body = await (await gateway.get("/v1/activity", headers=auth(admin))).json()
    assert body["ok"] is True and body["total"] == 2
    rows = {row["model"]: row for row in body["activity"]}
    chat = rows["openai/gpt-4o-mini"]
    assert chat["requests"] == 3 and chat["prompt_tokens"] == 33 and chat["completion_tokens"] == 15
    assert (
        chat["usage_nanos"] == 3 * 4_650 and chat["provider_name"] == "openai" and chat["endpoint_id"] == "openai.chat"
    )
    assert rows["openai/text-embedding-3-small"]["usage_nanos"] == 60
    assert (chat["cache_hits"], chat["saved_nanos"], chat["saved_usd"]) == (0, 0, "$0.00")  # the cache is off
    only = await (await gateway.get("/v1/activity", params={"model": "openai/gpt-4o-mini"}, headers=auth(admin))).json()
    assert [r["model"] for r in only["activity"]] == ["openai/gpt-4o-mini"]
    page = await (await gateway.get("/v1/activity", params={"limit": 1, "offset": 1}, headers=auth(admin))).json()
    assert page["total"] == 2 and len(page["activity"]) == 1
    old = await (
        await gateway.get("/v1/activity", params={"from": "2020-01-01", "to": "2020-01-31"}, headers=auth(admin))
    ).json()
    assert old["total"] == 0
    assert (await gateway.get("/v1/activity", params={"from": "yesterday"}, headers=auth(admin))).status == 400
    assert (await gateway.get("/v1/activity", headers=auth(key))).status == 403


# Found by tests/test_fuzz.py: each of these answered a plain-text 500 (aiohttp's own), not the envelope.


async def _raw(gateway, method: str, path: str, body: bytes, key: str, **headers: str):
    """A request whose body is sent as these exact bytes (json= could not carry invalid UTF-8)."""
    hdrs = {**auth(key), "Content-Type": "application/json", **headers}
    return await gateway.request(method, path, data=body, headers=hdrs)


async def test_a_body_that_is_not_utf8_is_a_400(gateway, make_key):
    admin = await make_key(team="acme", management=True)
    kid = admin.split("_")[3]
    for method, path, body in [
        ("POST", "/v1/keys", b'{"name": "\xff"}'),
        ("POST", "/v1/keys", b'{"allowed_models": ["\xed\xa0\x80"]}'),  # a lone surrogate, UTF-8 encoded
        ("PATCH", f"/v1/keys/{kid}", b'{"name": "ok", "status": "\xc3\x28"}'),
        ("POST", "/v1/pricing/calculate", b'{"model": "\xff", "usage": {}}'),
    ]:
        r = await _raw(gateway, method, path, body, admin)
        assert r.status == 400, (path, await r.text())
        body = await r.json()
        assert body["error"] == "invalid_json" and body["message"].startswith("The request body is not valid UTF-8")
        assert body == {
            "ok": False,
            "error": "invalid_json",
            "message": body["message"],
            "request_id": r.headers["x-request-id"],
        }
    listing = await (await gateway.get("/v1/keys", headers=auth(admin))).json()
    assert listing["total"] == 1 and listing["keys"][0]["name"] == ""  # nothing was created or renamed


async def test_limits_beyond_64_bits_are_a_400_that_changes_nothing(gateway, make_key):
    admin = await make_key(team="acme", management=True)
    kid = admin.split("_")[3]
    for too_big in (2**63, 2**64 - 1, 2**64, 10**30):
        r = await gateway.post("/v1/keys", json={"name": "big", "daily_limit_cost_nanos": too_big}, headers=auth(admin))
        body = await r.json()
        assert r.status == 400 and body["error"] == "invalid_request", body
        assert body["message"] == f"`daily_limit_cost_nanos` must be at most {2**63 - 1}."
        r = await gateway.patch(
            f"/v1/keys/{kid}", json={"name": "renamed", "monthly_limit_cost_nanos": too_big}, headers=auth(admin)
        )
        assert r.status == 400 and (await r.json())["error"] == "invalid_request"
    listing = await (await gateway.get("/v1/keys", headers=auth(admin))).json()
    assert listing["total"] == 1  # no key created before the limit was refused
    assert listing["keys"][0]["name"] == "" and listing["keys"][0]["monthly_limit_cost_nanos"] is None
    most = 2**63 - 1
    r = await gateway.post("/v1/keys", json={"monthly_limit_cost_nanos": most}, headers=auth(admin))
    assert r.status == 200 and (await r.json())["data"]["monthly_limit_cost_nanos"] == most


async def test_an_offset_beyond_64_bits_is_a_400(gateway, make_key):
    admin = await make_key(team="acme", management=True)
    for path in ("/v1/activity", "/v1/keys", "/v1/gateway/models"):
        r = await gateway.get(path, params={"offset": str(2**63)}, headers=auth(admin))
        body = await r.json()
        assert r.status == 400 and body["ok"] is False and body["error"] == "invalid_request", (path, body)
    assert (await gateway.get("/v1/activity", params={"offset": str(2**63 - 1)}, headers=auth(admin))).status == 200


async def test_a_body_that_cannot_be_read_is_enveloped(aiohttp_client, config, make_key):
    config.server.max_body_bytes = 64
    client = await aiohttp_client(build_app(config))
    admin = await make_key(team="acme", management=True)
    r = await _raw(client, "POST", "/v1/keys", b'{"name": "' + b"x" * 100 + b'"}', admin)
    assert r.status == 413 and (await r.json())["error"] == "payload_too_large"

    async def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(10):
            yield b"x" * 20

    r = await client.post("/v1/pricing/calculate", data=chunks(), headers=auth(admin))
    body = await r.json()
    assert r.status == 413 and body["ok"] is False and body["error"] == "payload_too_large"
    assert (await client.post("/v1/keys", json={"name": "fits"}, headers=auth(admin))).status == 200

    # aiohttp closes the connection after a body it could not decode: this one goes last, on its own
    headers = {"Content-Encoding": "gzip", "Connection": "close"}
    r = await _raw(client, "POST", "/v1/keys", b'{"name": "not gzip"}', admin, **headers)
    body = await r.json()
    assert r.status == 400 and body["error"] == "invalid_request"
    assert body["message"] == "The request body could not be read: Can not decode content-encoding: gzip."


async def test_key_names_are_printable_and_bounded(gateway, make_key):
    admin = await make_key(team="acme", management=True)
    kid = admin.split("_")[3]
    for bad, why in (("nul\u0000here", "control characters"), ("two\nlines", "control characters"), ("x" * 201, "200")):
        r = await gateway.post("/v1/keys", json={"name": bad}, headers=auth(admin))
        body = await r.json()
        assert r.status == 400 and body["error"] == "invalid_request" and why in body["message"], body
        r = await gateway.patch(f"/v1/keys/{kid}", json={"name": bad}, headers=auth(admin))
        assert r.status == 400 and why in (await r.json())["message"]
    listing = await (await gateway.get("/v1/keys", headers=auth(admin))).json()
    assert listing["total"] == 1 and listing["keys"][0]["name"] == ""  # nothing created or renamed
    r = await gateway.post("/v1/keys", json={"name": "café · ci 🚀"}, headers=auth(admin))
    assert r.status == 200 and (await r.json())["data"]["name"] == "café · ci 🚀"
