"""A mock Anthropic Messages API (127.0.0.1 only) that validates what it receives as the real one does.

It answers 400 in Anthropic's error shape when the request would be rejected upstream: a missing
`x-api-key` or `anthropic-version`, unknown top-level members, no `max_tokens`, roles other than user and
assistant, unknown content blocks, tools without `input_schema`, a temperature above 1. Otherwise it
answers text or a tool call, whole or streamed with the real event sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.mock_upstream import Received

TOP_LEVEL = {
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "metadata",
    "stream",
    "output_config",
    "service_tier",
}
BLOCKS = {"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "document"}
USAGE = {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3}


@dataclass
class AnthropicControl:
    mode: str = "text"  # text | tool_call | thinking | status | error_mid_stream | truncate
    status: int = 529
    error_body: bytes = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    events: int = 3
    received: list[Received] = field(default_factory=list)

    @property
    def last(self) -> Received:
        return self.received[-1]


def _invalid(message: str) -> web.Response:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return web.json_response(body, status=400)


def validate(headers: Any, payload: Any) -> str | None:
    """What the real API would reject in this request, or None."""
    if not headers.get("x-api-key"):
        return "missing x-api-key header"
    if not headers.get("anthropic-version"):
        return "anthropic-version: header is required"
    if not isinstance(payload, dict):
        return "body must be an object"
    extra = set(payload) - TOP_LEVEL
    if extra:
        return f"{sorted(extra)[0]}: Extra inputs are not permitted"
    if not isinstance(payload.get("max_tokens"), int):
        return "max_tokens: Field required"
    if not isinstance(payload.get("model"), str):
        return "model: Field required"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            return f"messages.{i}.content: expected a string or a non-empty list"
        for block in content:
            if block.get("type") not in BLOCKS:
                return f"messages.{i}.content: unknown block type {block.get('type')!r}"
            if block["type"] == "tool_use" and not isinstance(block.get("input"), dict):
                return f"messages.{i}.content: tool_use.input must be an object"
    system = payload.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system: expected a string or a list of text blocks"
    for tool in payload.get("tools") or ():
        if "input_schema" not in tool or "name" not in tool:
            return "tools: each tool needs name and input_schema"
    choice = payload.get("tool_choice")
    if choice is not None and choice.get("type") not in ("auto", "any", "tool", "none"):
        return "tool_choice.type: unknown"
    if payload.get("temperature") is not None and not 0 <= payload["temperature"] <= 1:
        return "temperature: must be between 0 and 1"
    return None


def _event(kind: str, data: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


COUNTED_TOKENS = 41  # what `/v1/messages/count_tokens` answers


def build_anthropic_mock(control: AnthropicControl) -> web.Application:
    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        if control.mode == "status":
            return web.Response(status=control.status, body=control.error_body, content_type="application/json")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _invalid("body is not JSON")
        problem = validate(request.headers, payload)
        if problem:
            return _invalid(problem)
        model = payload["model"]
        if payload.get("stream"):
            return await _stream(request, model)
        content: list[dict] = []
        if control.mode == "thinking":
            content.append({"type": "thinking", "thinking": "Let me think.", "signature": "sig"})
        if control.mode == "tool_call":
            content.append({"type": "text", "text": "Checking."})
            content.append({"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}})
            stop = "tool_use"
        else:
            content.append({"type": "text", "text": "Hello from Claude!"})
            stop = "end_turn"
        return web.json_response(
            {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": USAGE,
            }
        )

    async def _stream(request: web.Request, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start_usage = {**USAGE, "output_tokens": 1}
        message = {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        await resp.write(_event("message_start", {"type": "message_start", "message": message}))
        await resp.write(_event("ping", {"type": "ping"}))
        index = 0
        if control.mode == "thinking":
            await resp.write(
                _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
                )
            )
            delta = {"type": "thinking_delta", "thinking": "Let me think."}
            await resp.write(_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
            sig = {"type": "signature_delta", "signature": "sig"}
            await resp.write(_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": sig}))
            await resp.write(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            index = 1
        block = {"type": "text", "text": ""}
        await resp.write(
            _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
        )
        for i in range(control.events):
            delta = {"type": "text_delta", "text": f"tok{i} "}
            await resp.write(
                _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
            if control.mode == "error_mid_stream" and i == 1:
                error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                await resp.write(_event("error", error))
                return resp
        if control.mode == "truncate":
            return resp
        await resp.write(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        stop = "end_turn"
        if control.mode == "tool_call":
            index += 1
            stop = "tool_use"
            tool = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
            await resp.write(
                _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": tool})
            )
            for part in ('{"city', '": "Par', 'is"}'):
                delta = {"type": "input_json_delta", "partial_json": part}
                await resp.write(
                    _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                )
            await resp.write(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        final = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": USAGE["output_tokens"]},
        }
        await resp.write(_event("message_delta", final))
        await resp.write(_event("message_stop", {"type": "message_stop"}))
        return resp

    async def count_tokens(request: web.Request) -> web.Response:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        if control.mode == "status":
            return web.Response(status=control.status, body=control.error_body, content_type="application/json")
        payload = orjson.loads(body)
        if "max_tokens" in payload or "messages" not in payload:  # the real endpoint refuses both
            return web.json_response(
                {"type": "error", "error": {"type": "invalid_request_error", "message": "bad count request"}},
                status=400,
            )
        return web.json_response({"input_tokens": COUNTED_TOKENS})

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    return app
