"""Every error the gateway answers: the envelope, the status, and a message a person can act on."""

from __future__ import annotations

import asyncio
import gzip
import socket

import orjson
import pytest

from proxy.app import build_app
from proxy.config import load_config
from tests.conftest import DEFAULT_CONFIG, auth, env_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def expect_error(resp, status: int, code: str, *fragments: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    error = body["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "code", "param"}
    assert body["request_id"] == resp.headers["x-request-id"]
    for fragment in fragments:
        assert fragment in error["message"]
    return body


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "empty"),
        (b"[1, 2]", "invalid_request", "Expected `object`"),
        (b'{"model": 5, "messages": []}', "invalid_request", "model"),
        (b'{"model": "openai/gpt-4o-mini", "stream": "yes", "messages": []}', "invalid_request", "stream"),
        (b'{"model": "openai/gpt-4o-mini"}', "invalid_request", "`messages`"),
        (b'{"model": "openai/gpt-4o-mini", "messages": "hi"}', "invalid_request", "array"),
        (b'{"messages": []}', "invalid_request", "`model`"),
        (b'{"model": "x", "messages": [], "meta": "yes"}', "invalid_request", "meta"),
        (b'\xff\xfe{"model": 1}', "invalid_json", "not valid UTF-8 (byte 0 is 0xff)"),
        (
            b'{"model": "openai/gpt-4o-mini", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            "invalid_json",
            "too deeply",
        ),
    ],
)
async def test_400_bad_bodies(gateway, key, mock, body, code, fragment):
    r = await gateway.post("/v1/chat/completions", data=body, headers=auth(key))
    await expect_error(r, 400, code, fragment)
    assert mock.control.received == []  # nothing reached the upstream


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "Missing API key"),
        ({"Authorization": "Bearer sk-not-ours"}, "Invalid API key"),
        ({"Authorization": "Basic abc"}, "Invalid API key"),
        ({"Authorization": "Bearer aistats_v1_sk_0123456789ab_" + "x" * 43}, "Invalid API key"),
    ],
)
async def test_401_bad_keys(gateway, mock, headers, fragment):
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)
    body = await expect_error(r, 401, "invalid_api_key", fragment)
    assert body["error"]["type"] == "authentication_error"


async def test_401_wrong_secret_for_a_real_kid_does_not_leak_the_key(gateway, key):
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(wrong))
    body = await expect_error(r, 401, "invalid_api_key")
    assert key[-20:] not in str(body) and wrong[-20:] not in str(body)


async def test_402_when_wallet_below_minimum(gateway, make_key, mock):
    key = await make_key(team="poor", credit_usd=0.5)
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await expect_error(r, 402, "insufficient_credits", "$0.50", "$1.00", "credits add")
    assert mock.control.received == []


async def test_404_unknown_model_suggests_close_names(gateway, key):
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "openai/gpt-4o-mimi"}, headers=auth(key))
    body = await expect_error(r, 404, "model_not_found", "'openai/gpt-4o-mimi'", "GET /v1/models")
    assert "openai/gpt-4o-mini" in body["error"]["message"]
    assert body["error"]["param"] == "model"


async def test_400_model_that_does_not_serve_the_surface(gateway, key):
    r = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "openai/text-embedding-3-small"}, headers=auth(key)
    )
    await expect_error(r, 400, "model_not_supported", "chat.completions", "embeddings")


async def test_404_unknown_route_and_405_wrong_method(gateway, key):
    r = await gateway.post("/v1/nothing/here", json={}, headers=auth(key))
    await expect_error(r, 404, "route_not_found", "/v1/nothing/here")
    r = await gateway.get("/v1/chat/completions", headers=auth(key))
    await expect_error(r, 405, "method_not_allowed", "POST")
    assert r.headers["Allow"] == "POST"


async def test_a_missing_object_is_not_found_which_is_not_a_missing_route(gateway, key):
    """A client can tell a wrong path (`route_not_found`) from an id that names nothing (`not_found`)."""
    r = await gateway.get("/v1/videos/video_nothing", headers=auth(key))
    await expect_error(r, 404, "not_found", "video_nothing")
    r = await gateway.get("/v1/generations", params={"id": "req_nothing"}, headers=auth(key))
    body = await r.json()
    assert r.status == 404 and body["ok"] is False and body["error"] == "not_found", body


async def test_413_body_over_the_limit(aiohttp_client, mock, store_url, make_key):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.server.max_body_bytes = 2048
    client = await aiohttp_client(build_app(config))
    key = await make_key()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = await client.post("/v1/chat/completions", json=big, headers=auth(key))
    await expect_error(r, 413, "payload_too_large", "2048")

    # A small compressed body that decodes past the limit (a zip bomb) is refused, not read whole.
    packed = gzip.compress(orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 50_000}]}))
    assert len(packed) < 2048
    headers = {**auth(key), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    r = await client.post("/v1/chat/completions", data=packed, headers=headers)
    await expect_error(r, 413, "payload_too_large", "2048")

    async def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = await client.post("/v1/chat/completions", data=chunks(), headers=auth(key))
    await expect_error(r, 413, "payload_too_large", "2048")
    assert mock.control.received == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_502_upstream_unreachable(aiohttp_client, mock, store_url, make_key):
    env = env_for(mock, store_url)
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{_closed_port()}/v1"
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))
    key = await make_key()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    body = await expect_error(r, 502, "upstream_unreachable", "'openai'", "connecting")
    assert "sk-upstream-secret" not in str(body)


async def test_504_upstream_timeout(aiohttp_client, mock, store_url, make_key):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.providers["openai"].timeouts.first_byte_s = 0.3
    config.models["openai/gpt-4o-mini"].retries = 0
    client = await aiohttp_client(build_app(config))
    key = await make_key()
    mock.control.mode, mock.control.stall_s = "stall", 3
    started = asyncio.get_running_loop().time()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await expect_error(r, 504, "upstream_timeout", "timed out", "0.3 s")
    assert asyncio.get_running_loop().time() - started < 2


async def test_upstream_json_error_passes_through(gateway, key, mock):
    mock.control.mode, mock.control.status = "status", 429
    mock.control.error_body = b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}}'
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 429
    assert await r.read() == mock.control.error_body
    assert r.headers["x-request-id"].startswith("req_")


async def test_upstream_non_json_error_is_wrapped(gateway, key, mock):
    mock.control.mode, mock.control.status = "plain_error", 503
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await expect_error(r, 503, "upstream_bad_response", "HTTP 503", "Bad Gateway")


async def test_upstream_rejecting_gateway_credentials_is_not_the_clients_401(gateway, key, mock):
    mock.control.mode, mock.control.status = "status", 401
    mock.control.error_body = b'{"error": {"message": "Incorrect API key provided: sk-up***ret"}}'
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    body = await expect_error(r, 502, "upstream_bad_response", "rejected the gateway's credentials")
    assert "sk-up" not in str(body)


async def test_upstream_200_that_is_not_json_is_a_502(gateway, key, mock):
    mock.control.mode = "not_json"
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await expect_error(r, 502, "upstream_bad_response", "not valid JSON")


async def test_truncated_stream_ends_with_an_error_event_not_done(gateway, key, mock):
    mock.control.mode = "truncate"
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    body = await r.read()
    assert b"data: [DONE]" not in body
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b'data: {"error":') and b"closed the stream before it finished" in last


async def test_broken_sse_framing_ends_with_an_error_event(gateway, key, mock):
    mock.control.mode = "broken_sse"
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    body = await r.read()
    assert b"data: [DONE]" not in body and b'"error"' in body.strip().split(b"\n\n")[-1]


async def test_stream_stall_mid_way_ends_with_timeout_event(aiohttp_client, mock, store_url, make_key):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.providers["openai"].timeouts.idle_s = 0.3
    client = await aiohttp_client(build_app(config))
    key = await make_key()
    mock.control.gate_after = 2  # never released: the upstream goes silent mid-stream
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    body = await asyncio.wait_for(r.read(), 5)
    assert b"tok1" in body and b"data: [DONE]" not in body
    assert b"upstream_timeout" in body.strip().split(b"\n\n")[-1]


async def test_upstream_json_nested_too_deeply_is_a_502(gateway, key, mock):
    mock.control.mode, mock.control.status = "status", 200
    mock.control.error_body = b'{"choices": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await expect_error(r, 502, "upstream_bad_response", "too deeply")
