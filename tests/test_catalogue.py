"""Discovery APIs: the catalogue from the config and prices, its filters, and what it never shows."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.conftest import auth


async def get(gateway, path: str, key: str, **params) -> dict:
    r = await gateway.get(path, params=params, headers=auth(key))
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["ok"] is True
    return body


async def test_gateway_models_records(gateway, key):
    body = await get(gateway, "/v1/gateway/models", key)
    assert body["total"] == len(body["models"]) > 10
    mini = next(m for m in body["models"] if m["id"] == "openai/gpt-4o-mini")
    assert mini["organisation_id"] == "openai" and mini["endpoints"] == ["chat.completions", "responses", "messages"]
    assert mini["providers"] == [
        {
            "api_provider_id": "openai",
            "provider_model_slug": "gpt-4o-mini",
            "endpoints": ["chat.completions", "responses", "messages"],
            "status": "active",
            "pricing": mini["pricing"],
        }
    ]
    # USD per token as strings: $0.15 and $0.60 per million tokens
    assert Decimal(mini["pricing"]["prompt"]) == Decimal("0.00000015")
    assert Decimal(mini["pricing"]["completion"]) == Decimal("0.0000006")
    assert "e" not in mini["pricing"]["prompt"].lower()
    assert "tools" in mini["supported_parameters"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"endpoints": "embeddings"},
            {"openai/text-embedding-3-small", "openai/text-embedding-3-large", "mistral/mistral-embed"},
        ),
        ({"endpoints": "moderations"}, {"openai/omni-moderation-latest"}),
        ({"provider": "groq"}, {"groq/llama-3.3-70b-versatile", "groq/llama-3.1-8b-instant"}),
        ({"organisation": "xai"}, {"xai/grok-4"}),
        ({"output_types": "embedding", "provider": "mistral"}, {"mistral/mistral-embed"}),
        ({"output_types": "video"}, set()),  # OpenAI's Sora API shut down: no video model ships
        ({"input_types": "audio"}, {"openai/whisper-1", "openai/gpt-4o-transcribe"}),
        (
            {"endpoints": "chat.completions", "params": "tools", "organisation": "deepseek"},
            {"deepseek/deepseek-chat", "deepseek/deepseek-reasoner"},
        ),
        ({"endpoints": "telepathy"}, set()),
    ],
)
async def test_gateway_models_filters(gateway, key, params, expected):
    body = await get(gateway, "/v1/gateway/models", key, **params)
    assert {m["id"] for m in body["models"]} == expected


async def test_gateway_models_pagination_and_me(gateway, key):
    everything = await get(gateway, "/v1/gateway/models", key, limit=250)
    first = await get(gateway, "/v1/gateway/models", key, limit=5, offset=0)
    second = await get(gateway, "/v1/gateway/models", key, limit=5, offset=5)
    assert [m["id"] for m in first["models"] + second["models"]] == [m["id"] for m in everything["models"][:10]]
    me = await get(gateway, "/v1/gateway/models/me", key)
    assert me["total"] == everything["total"]
    assert (await gateway.get("/v1/gateway/models", params={"limit": 251}, headers=auth(key))).status == 400
    assert (await gateway.get("/v1/gateway/models")).status == 401


async def test_data_models_providers_endpoints_organisations(gateway, key):
    data = await get(gateway, "/v1/data/models", key)
    assert {
        "model_id": "xai/grok-4",
        "name": "grok-4",
        "release_date": None,
        "status": "active",
        "input_types": ["text"],
        "output_types": ["text"],
        "organisation": {"organisation_id": "xai", "name": "xai"},
    } in data["models"]
    providers = await get(gateway, "/v1/providers", key)
    openai = next(p for p in providers["providers"] if p["api_provider_id"] == "openai")
    assert openai["kind"] == "openai" and openai["models"] == 19
    assert "sk-upstream-secret" not in str(providers) and "127.0.0.1" not in str(providers)  # no keys, no URLs
    endpoints = {e["endpoint_id"]: e for e in (await get(gateway, "/v1/endpoints", key))["endpoints"]}
    assert endpoints["chat.completions"]["path"] == "/v1/chat/completions"
    assert endpoints["embeddings"]["models"] == 3 and endpoints["moderations"]["models"] == 1
    assert endpoints["video.generation"] == {**endpoints["video.generation"], "path": "/v1/videos", "models": 0}
    organisations = {
        o["organisation_id"]: o["models"] for o in (await get(gateway, "/v1/organisations", key))["organisations"]
    }
    assert organisations["openai"] == 19 and organisations["groq"] == 2


async def test_workspaces_need_a_management_key(gateway, key, make_key):
    assert (await gateway.get("/v1/workspaces", headers=auth(key))).status == 403
    admin = await make_key(team="acme", credit_usd=0, management=True)
    body = await get(gateway, "/v1/workspaces", admin)
    assert body["workspaces"][0]["name"] == "acme"
