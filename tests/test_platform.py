"""Platform APIs: the calling key, credits (management keys only), price sheets and the cost calculator."""

from __future__ import annotations

from decimal import Decimal

import pytest

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
