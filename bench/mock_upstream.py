"""An OpenAI-compatible mock upstream for benchmarks and tests.

`python -m bench.mock_upstream --port P [--events N] [--event-bytes B] [--gap-ms G]` serves

- `POST /v1/chat/completions`: a chat.completion JSON with `usage`; with `"stream": true` an event stream
  of a role-only chunk, N content chunks of about B bytes each G ms apart (0: back to back), a
  finish_reason chunk, a usage chunk (`"choices": []`) when `stream_options.include_usage` is set, and
  `data: [DONE]`. Every chunk carries `"t_sent_ns"`: `time.time_ns()` when it was written, so a client
  on the same machine can measure how late each event arrives; content chunks also end their text with
  `@t=<ns>`, which survives a gateway translating the stream into another surface's events.
- `POST /v1/embeddings` and `GET /v1/models`.

A request may override N and G with the body fields `x_mock_events` and `x_mock_gap_ms`, and ask for an
error answer with `x_mock_status` (an OpenAI-style error JSON with that status). Responses are
encoded once at startup; only the timestamps are formatted per event. Nothing is logged.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from aiohttp import web

MODEL = "gpt-4o-mini-2024-07-18"
COMPLETION_ID = "chatcmpl-bench0000000000000000000000000"
PROMPT_TOKENS = 12
STAMP_MARK = "@t="  # content text ends with this and the send time in ns
EMBEDDING_DIMS = 256
_WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class MockConfig:
    events: int = 20
    event_bytes: int = 64
    gap_ms: float = 0.0


def _text(size: int) -> str:
    return (_WORDS * (size // len(_WORDS) + 1))[:size]


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def _event_prefix(created: int, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    """`data: {chunk` up to where `,"t_sent_ns":<ns>}` is appended when the event is written."""
    chunk = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": choices,
        **extra,
    }
    return b"data: " + orjson.dumps(chunk)[:-1] + b',"t_sent_ns":'


def _choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


@dataclass(frozen=True, slots=True)
class Encoded:
    """Every static byte the handlers send, built once."""

    completion: bytes
    role: bytes
    content: bytes
    finish: bytes
    created: int
    embedding: bytes
    models: bytes

    @classmethod
    def build(cls, config: MockConfig) -> Encoded:
        created = int(time.time())
        text = _text(config.event_bytes)
        completion = {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": created,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text * config.events, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(config.events),
        }
        vector = [round((i % 17) / 17 - 0.5, 6) for i in range(EMBEDDING_DIMS)]
        models = {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "bench"}
                for name in ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
            ],
        }
        return cls(
            completion=orjson.dumps(completion),
            role=_event_prefix(created, [_choice({"role": "assistant", "content": ""})]),
            content=_stamped_text_prefix(created, text),
            finish=_event_prefix(created, [_choice({}, "stop")]),
            created=created,
            embedding=orjson.dumps({"object": "embedding", "embedding": vector})[:-1],
            models=orjson.dumps(models),
        )


def _stamped_text_prefix(created: int, text: str) -> bytes:
    """A content event whose text ends with `@t=<ns>` (the stamp survives a gateway's translation into
    another surface's events), split where the stamp goes: `head|mid` before `_stamped`."""
    head, mid = _event_prefix(created, [_choice({"content": text + STAMP_MARK + "\x00"})]).split(b"\\u0000", 1)
    return head + b"|" + mid


def _stamped(prefix: bytes) -> bytes:
    ns = str(time.time_ns()).encode()
    head, bar, mid = prefix.partition(b"|")
    if bar:  # a content event: the stamp in its text too
        return head + ns + mid + ns + b"}\n\n"
    return prefix + ns + b"}\n\n"


CONFIG = web.AppKey("config", MockConfig)
ENCODED = web.AppKey("encoded", Encoded)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the JSON body must be an object")
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    encoded = request.app[ENCODED]
    status = body.get("x_mock_status")
    if isinstance(status, int) and status >= 400:
        error = {"error": {"message": "the mock was asked to fail", "type": "server_error", "code": None}}
        return web.Response(status=status, body=orjson.dumps(error), content_type="application/json")
    if not body.get("stream"):
        return web.Response(body=encoded.completion, content_type="application/json")
    config = request.app[CONFIG]
    events = int(body.get("x_mock_events", config.events))
    gap_s = float(body.get("x_mock_gap_ms", config.gap_ms)) / 1000
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    await resp.write(_stamped(encoded.role))
    for _ in range(events):
        if gap_s:
            await asyncio.sleep(gap_s)
        await resp.write(_stamped(encoded.content))
    await resp.write(_stamped(encoded.finish))
    if include_usage:
        await resp.write(_stamped(_event_prefix(encoded.created, [], usage=_usage(events))))
    await resp.write(_DONE)
    await resp.write_eof()
    return resp


def _input_count(value: Any) -> int:
    """How many embeddings an `input` asks for: one string or token list, or a list of them."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


async def embeddings(request: web.Request) -> web.Response:
    body = await _json_body(request)
    count = _input_count(body.get("input"))
    item = request.app[ENCODED].embedding
    data = b",".join(item + b',"index":%d}' % i for i in range(count))
    usage = orjson.dumps({"prompt_tokens": PROMPT_TOKENS * count, "total_tokens": PROMPT_TOKENS * count})
    payload = b'{"object":"list","data":[' + data + b'],"model":"text-embedding-3-small","usage":' + usage + b"}"
    return web.Response(body=payload, content_type="application/json")


async def traces(request: web.Request) -> web.Response:
    """An OTLP/HTTP collector that takes every export (the `gateway-otel` target sends its spans here)."""
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


async def models(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ENCODED].models, content_type="application/json")


def build_mock_app(events: int = 20, event_bytes: int = 64, gap_ms: float = 0.0) -> web.Application:
    """The mock upstream as an aiohttp application (routes under `/v1`)."""
    config = MockConfig(events=events, event_bytes=event_bytes, gap_ms=gap_ms)
    app = web.Application()
    app[CONFIG] = config
    app[ENCODED] = Encoded.build(config)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/traces", traces)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--event-bytes", type=int, default=64, help="content bytes per chunk")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between content chunks")
    args = parser.parse_args()
    app = build_mock_app(events=args.events, event_bytes=args.event_bytes, gap_ms=args.gap_ms)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
