"""A controllable OpenAI-compatible upstream for the tests (127.0.0.1 only).

Each test sets `MockControl` fields to choose what the next requests get: a normal answer, a stream
gated on an event (to prove the gateway forwards before the upstream finishes), an error status, a
body that is not JSON, a stall, or a stream cut short. The mock records what it received.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class MockControl:
    # ok | tool_call | status | not_json | truncated_json | stall | truncate | broken_sse | plain_error | reset
    # | reset_mid_stream | silent_stream
    mode: str = "ok"
    script: list[str] = field(default_factory=list)  # modes for the next chat requests, one each, before `mode`
    headers: dict[str, str] = field(default_factory=dict)  # added to `status` answers (e.g. Retry-After)
    status: int = 500
    error_body: bytes = b'{"error": {"message": "upstream says no", "type": "server_error", "code": null}}'
    events: int = 5  # content chunks in a stream
    gate_after: int = 0  # when > 0, wait for `gate` after sending this many content chunks
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    stall_s: float = 0.0
    usage_in_content_chunk: bool = False
    received: list[Received] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    first_sent: asyncio.Event = field(default_factory=asyncio.Event)
    pad_bytes: int = 0  # extra content per chunk, to make streams heavy
    bytes_sent: int = 0  # stream bytes the mock has handed to its transport so far
    linger_after_done_s: float = 0.0  # like a real network: the body's end arrives after [DONE]
    peers: list[int] = field(default_factory=list)  # client port of each request: equal ports = reused

    @property
    def last(self) -> Received:
        return self.received[-1]


def _chunk(model: str, delta: dict, finish: str | None = None, **extra: Any) -> bytes:
    body = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
# A recorded Responses API stream (written for the translator tests), replayed by /v1/responses.
RESPONSES_STREAM = Path(__file__).parent / "fixtures" / "responses" / "native" / "text.sse"


def build_mock(control: MockControl) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        control.peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        payload = orjson.loads(body)
        model = payload.get("model", "")
        mode = control.script.pop(0) if control.script else control.mode
        if mode == "reset":  # the connection drops before any answer
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if mode == "stall":
            await asyncio.sleep(control.stall_s)
        if mode == "status":
            return web.Response(
                status=control.status, body=control.error_body, content_type="application/json", headers=control.headers
            )
        if mode == "plain_error":
            return web.Response(status=control.status, text="<html>Bad Gateway</html>", content_type="text/html")
        if mode == "not_json":
            return web.Response(status=200, text="this is not json", content_type="application/json")
        if mode == "truncated_json":
            return web.Response(
                status=200, text='{"id": "chatcmpl-mock", "choices": [{"ind', content_type="application/json"
            )
        if mode == "tool_call":
            return await _tool_call(request, payload, model)
        if not payload.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Hello there!"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": USAGE,
                }
            )
        return await _stream(request, payload, model, mode)

    async def _stream(request: web.Request, payload: dict, model: str, mode: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if mode == "silent_stream":  # headers, then nothing for a while
            await asyncio.sleep(control.stall_s)
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        usage_extra = {"usage": None} if include_usage else {}
        try:
            await resp.write(_chunk(model, {"role": "assistant", "content": ""}, **usage_extra))
            for i in range(control.events):
                last = i == control.events - 1
                extra = {"usage": USAGE} if (last and include_usage and control.usage_in_content_chunk) else usage_extra
                event = _chunk(model, {"content": f"tok{i} " + "x" * control.pad_bytes}, **extra)
                await resp.write(event)
                control.bytes_sent += len(event)
                control.first_sent.set()
                if control.gate_after and i + 1 == control.gate_after:
                    await control.gate.wait()
                if mode == "reset_mid_stream" and i == 1:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
            if mode == "truncate":
                return resp  # ends without finish, usage or [DONE]
            if mode == "broken_sse":
                await resp.write(b"data: " + b"x" * 64)  # an event that never ends
                return resp
            await resp.write(_chunk(model, {}, "stop", **usage_extra))
            if include_usage and not control.usage_in_content_chunk:
                await resp.write(
                    b"data: "
                    + orjson.dumps(
                        {
                            "id": "chatcmpl-mock",
                            "object": "chat.completion.chunk",
                            "created": 1700000000,
                            "model": model,
                            "choices": [],
                            "usage": USAGE,
                        }
                    )
                    + b"\n\n"
                )
            await resp.write(b"data: [DONE]\n\n")
            if control.linger_after_done_s:
                await asyncio.sleep(control.linger_after_done_s)
        except (asyncio.CancelledError, ConnectionError):
            control.disconnected.set()
            raise
        return resp

    async def _tool_call(request: web.Request, payload: dict, model: str) -> web.StreamResponse:
        call = {
            "id": "call_mock",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
        if not payload.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            return web.json_response(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": model,
                    "choices": [choice],
                    "usage": USAGE,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        head = {"index": 0, "id": "call_mock", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        await resp.write(_chunk(model, {"role": "assistant", "content": None, "tool_calls": [head]}))
        for part in ('{"city', '": "Par', 'is"}'):
            await resp.write(_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        await resp.write(_chunk(model, {}, "tool_calls"))
        if (payload.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": model,
                "choices": [],
                "usage": USAGE,
            }
            await resp.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def responses(request: web.Request) -> web.StreamResponse:
        """OpenAI's own Responses API: a recorded stream, or a whole response object."""
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        payload = orjson.loads(body)
        if control.mode == "status":
            return web.Response(status=control.status, body=control.error_body, content_type="application/json")
        if payload.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(RESPONSES_STREAM.read_bytes())
            return resp
        message = {
            "type": "message",
            "id": "msg_native",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello from Responses!", "annotations": []}],
        }
        return web.json_response(
            {
                "id": "resp_native",
                "object": "response",
                "created_at": 1700000000,
                "status": "completed",
                "model": payload.get("model", ""),
                "output": [message],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": 12,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 4,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 16,
                },
            }
        )

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        payload = orjson.loads(body)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": payload["model"],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )

    async def moderations(request: web.Request) -> web.Response:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        payload = orjson.loads(body)
        return web.json_response(
            {"id": "modr-mock", "model": payload["model"], "results": [{"flagged": False, "categories": {}}]}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/moderations", moderations)
    return app


def now_ms() -> float:
    return time.perf_counter() * 1000.0
