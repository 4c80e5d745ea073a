"""End to end: OpenAI surfaces through the gateway to the mock upstream."""

from __future__ import annotations

import asyncio

import msgspec
import orjson
import pytest

from proxy.app import build_app
from proxy.config import load_config
from proxy.gateway import GATEWAY
from tests.conftest import DEFAULT_CONFIG, auth, env_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def sse_payloads(text: bytes) -> list[bytes]:
    return [line[6:] for line in text.split(b"\n") if line.startswith(b"data: ")]


async def test_chat_non_streaming_rewrites_only_the_model(gateway, key, mock):
    body = b'{"model": "openai/gpt-4o-mini",  "messages": [ {"role":"user",   "content":"hi"} ], "temperature": 0.2}'
    r = await gateway.post("/v1/chat/completions", data=body, headers=auth(key))
    assert r.status == 200
    data = await r.json()
    assert data["choices"][0]["message"]["content"] == "Hello there!"
    assert data["usage"]["total_tokens"] == 16
    assert "meta" not in data
    assert r.headers["x-request-id"].startswith("req_")
    sent = mock.control.last
    # Nested values keep their bytes; only the model changed.
    assert sent.body == b'{"model":"gpt-4o-mini","messages":[ {"role":"user",   "content":"hi"} ],"temperature":0.2}'
    assert sent.headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_body_naming_the_upstream_model_is_forwarded_untouched(gateway, key, mock):
    body = b'{ "model" : "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}] }'
    r = await gateway.post("/v1/chat/completions", data=body, headers=auth(key))
    assert r.status == 200
    assert mock.control.last.body == body


async def test_meta_is_attached_when_asked_and_gateway_fields_are_not_forwarded(gateway, key, mock):
    request = {
        **CHAT,
        "meta": True,
        "provider": {"order": ["openai"]},
        "debug": {"enabled": False},
        "session_id": "s1",
        "user": "u-42",
    }
    r = await gateway.post("/v1/chat/completions", json=request, headers=auth(key))
    data = await r.json()
    meta = data["meta"]
    assert meta["request_id"] == r.headers["x-request-id"]
    assert meta["model"] == "openai/gpt-4o-mini" and meta["upstream_model"] == "gpt-4o-mini"
    assert meta["provider"] == "openai" and meta["stream"] is False
    assert meta["latency_ms"] >= meta["provider_latency_ms"] > 0
    assert meta["gateway_overhead_ms"] == pytest.approx(meta["latency_ms"] - meta["provider_latency_ms"], abs=0.002)
    assert meta["throughput_tps"] == pytest.approx(5 / (meta["provider_latency_ms"] / 1000), rel=0.01)
    assert meta["attempts"] == [{"provider": "openai", "status": 200, "duration_ms": meta["provider_latency_ms"]}]
    sent = mock.control.last.json
    assert set(sent) == {"model", "messages", "user"}  # `user` is OpenAI's own field: it stays


async def test_meta_always_from_config(aiohttp_client, mock, store_url, make_key):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.meta.always = True
    client = await aiohttp_client(build_app(config))
    key = await make_key()
    data = await (await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))).json()
    assert data["meta"]["provider"] == "openai"
    data = await (await client.post("/v1/chat/completions", json={**CHAT, "meta": False}, headers=auth(key))).json()
    assert "meta" not in data


async def test_bare_upstream_name_resolves(gateway, key, mock):
    r = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini", "meta": True}, headers=auth(key)
    )
    assert (await r.json())["meta"]["model"] == "openai/gpt-4o-mini"


async def test_stream_is_forwarded_and_usage_withheld_when_not_asked(gateway, key, mock):
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    payloads = sse_payloads(await r.read())
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert all(c.get("usage") is None for c in chunks)  # the usage chunk the gateway asked for is not passed on
    assert all(c["choices"] for c in chunks)
    # ... but the upstream was asked for usage, so the gateway could meter it
    assert mock.control.last.json["stream_options"] == {"include_usage": True}


async def test_stream_usage_passed_when_asked_and_meta_in_final_chunk(gateway, key, mock):
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "meta": True}
    r = await gateway.post("/v1/chat/completions", json=request, headers=auth(key))
    payloads = sse_payloads(await r.read())
    assert payloads[-1] == b"[DONE]"
    final = orjson.loads(payloads[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    meta = final["meta"]
    assert meta["stream"] is True and meta["request_id"] == r.headers["x-request-id"]
    assert meta["ttft_ms"] is not None and meta["ttft_ms"] <= meta["latency_ms"]
    assert meta["generation_ms"] is not None and meta["tpot_ms"] is not None
    assert sum(1 for p in payloads if b'"meta"' in p) == 1


async def test_stream_meta_without_usage_gets_its_own_chunk(gateway, key, mock):
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True, "meta": True}, headers=auth(key))
    payloads = sse_payloads(await r.read())
    final = orjson.loads(payloads[-2])
    assert final["object"] == "chat.completion.chunk" and final["id"] == "chatcmpl-mock"
    assert final["choices"] == [] and "usage" not in final and final["meta"]["provider"] == "openai"


async def test_first_event_reaches_client_while_upstream_still_producing(gateway, key, mock):
    mock.control.gate_after = 1  # the upstream sends one content chunk, then waits for the test
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
    second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
    assert b'"role":"assistant"' in first and b"tok0" in second
    assert not mock.control.gate.is_set()  # the upstream is still blocked: nothing was buffered
    mock.control.gate.set()
    rest = await asyncio.wait_for(r.read(), 5)
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_closes_the_upstream(gateway, key, mock):
    mock.control.gate_after = 1
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    await asyncio.wait_for(r.content.readuntil(b"tok0"), 5)
    r.close()  # the client goes away mid-stream
    await asyncio.wait_for(mock.control.disconnected.wait(), 5)
    metrics = await (await gateway.get("/metrics")).text()
    assert 'gateway_in_flight_requests{surface="openai.chat"} 0.0' in metrics
    assert 'status="499"' in metrics


async def test_embeddings_and_moderations(gateway, key, mock):
    r = await gateway.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hello"}, headers=auth(key)
    )
    assert r.status == 200 and (await r.json())["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    assert mock.control.last.path == "/v1/embeddings" and mock.control.last.json["model"] == "text-embedding-3-small"
    r = await gateway.post("/v1/moderations", json={"input": "hello"}, headers=auth(key))
    assert r.status == 200 and (await r.json())["results"][0]["flagged"] is False
    assert mock.control.last.json == {"input": "hello", "model": "omni-moderation-latest"}


async def test_models_list(gateway, key):
    r = await gateway.get("/v1/models", headers=auth(key))
    data = await r.json()
    assert data["object"] == "list"
    ids = {m["id"] for m in data["data"]}
    assert {"openai/gpt-4o-mini", "openai/text-embedding-3-small", "openai/omni-moderation-latest"} <= ids
    assert all(m["object"] == "model" and m["owned_by"] for m in data["data"])
    assert (await gateway.get("/v1/models")).status == 401


async def test_health_and_readiness(gateway):
    assert (await (await gateway.get("/healthz")).json()) == {"status": "ok"}
    r = await gateway.get("/readyz")
    assert r.status == 200 and (await r.json())["checks"]["store"] == "ok"


async def test_every_answer_carries_a_request_id(gateway):
    for path in ("/healthz", "/readyz", "/metrics", "/nowhere"):
        r = await gateway.get(path)
        assert r.headers.get("x-request-id", "").startswith("req_"), path


async def test_many_concurrent_streams(gateway, key, mock):
    async def one() -> bytes:
        r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
        return await r.read()

    bodies = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(50))), 20)
    assert all(b.endswith(b"data: [DONE]\n\n") and b.count(b"tok") == 5 for b in bodies)


def test_meta_field_names_match_reference():
    from proxy.meta import RequestMeta

    names = set(RequestMeta("r", "openai.chat", 0.0).as_dict())
    assert {
        "request_id",
        "provider",
        "model",
        "upstream_model",
        "endpoint",
        "stream",
        "latency_ms",
        "provider_latency_ms",
        "ttft_ms",
        "generation_ms",
        "tpot_ms",
        "throughput_tps",
        "output_speed_tps",
        "gateway_overhead_ms",
        "cost_nanos",
        "attempts",
    } == names
    msgspec.json.encode(RequestMeta("r", "openai.chat", 0.0).as_dict())


async def test_slow_client_slows_the_upstream(gateway, key, mock):
    """Back-pressure: a client that stops reading stalls the upstream; nothing piles up in the gateway."""
    mock.control.events, mock.control.pad_bytes = 192, 256 * 1024  # 48 MiB if nothing pushed back
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    await asyncio.wait_for(r.content.readuntil(b"tok0"), 5)
    # The client now reads nothing. Wait until the upstream's progress stops (bounded in time).
    loop = asyncio.get_running_loop()
    deadline, last, stable_since = loop.time() + 10, -1, loop.time()
    while loop.time() < deadline and loop.time() - stable_since < 0.5:
        if mock.control.bytes_sent != last:
            last, stable_since = mock.control.bytes_sent, loop.time()
        await asyncio.sleep(0.05)
    total = 192 * 256 * 1024
    assert mock.control.bytes_sent < total / 3, f"upstream pushed {mock.control.bytes_sent} bytes unread"
    body = await asyncio.wait_for(r.read(), 30)  # reading again lets the rest through, intact
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"tok") == 191


async def test_upstream_connection_is_reused_after_a_stream(gateway, key, mock):
    mock.control.linger_after_done_s = 0.05  # the end of the chunked body comes after [DONE]
    for _ in range(3):
        r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
        assert (await asyncio.wait_for(r.read(), 5)).endswith(b"data: [DONE]\n\n")
    assert len(set(mock.control.peers)) == 1, mock.control.peers


async def test_client_leaving_after_done_is_not_counted_as_aborted(gateway, key, mock):
    mock.control.linger_after_done_s = 2  # the gateway is still draining the upstream when the client leaves
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert (await asyncio.wait_for(r.read(), 5)).endswith(b"data: [DONE]\n\n")
    r.close()
    await gateway.close()  # closes the client's connection: the server cancels the draining handler
    metrics = gateway.server.app[GATEWAY].metrics.render()[0].decode()
    assert 'status="200"' in metrics and 'status="499"' not in metrics
