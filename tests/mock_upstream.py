"""A controllable OpenAI-compatible upstream for the tests (127.0.0.1 only).

Each test sets `MockControl` fields to choose what the next requests get: a normal answer, a stream
gated on an event (to prove the gateway forwards before the upstream finishes), an error status, a
body that is not JSON, a stall, or a stream cut short. The mock records what it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

COUNTED_TOKENS = 43  # what `/v1/responses/input_tokens` answers


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Part:
    """One part of a multipart upload as the mock received it: text fields whole, files as size and sha256."""

    name: str
    headers: dict[str, str]
    filename: str | None = None
    value: str = ""  # a text field's
    size: int = 0
    sha256: str = ""


@dataclass
class Form:
    path: str
    headers: dict[str, str]
    parts: list[Part]

    def field(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]


# Speech answers repeat this block: a test can hash what it receives against `audio_sha256(n)`.
AUDIO_BLOCK = random.Random(7).randbytes(64 * 1024)


def audio_chunks(n: int):  # type: ignore[no-untyped-def]
    """`n` bytes of the mock's audio, a block at a time."""
    whole, rest = divmod(n, len(AUDIO_BLOCK))
    for _ in range(whole):
        yield AUDIO_BLOCK
    if rest:
        yield AUDIO_BLOCK[:rest]


def audio_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for chunk in audio_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


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
    # media
    audio_bytes: int = 4096  # the length of a speech answer (generated, never held: see `audio_block`)
    forms: list[Form] = field(default_factory=list)  # multipart uploads received, summarised (no file bytes)

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

    async def input_tokens(request: web.Request) -> web.Response:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        payload = orjson.loads(body)
        if not isinstance(payload.get("input"), (str, list)) or not payload.get("model"):
            return web.json_response({"error": {"message": "input and model are required"}}, status=400)
        return web.json_response({"object": "response.input_tokens", "input_tokens": COUNTED_TOKENS})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses/input_tokens", input_tokens)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/moderations", moderations)
    _media_routes(app, control)
    return app


def _invalid(message: str) -> web.Response:
    return web.json_response({"error": {"message": f"mock: {message}", "type": "invalid_request_error"}}, status=400)


def _check_model(model: object) -> str | None:
    """What is wrong with the model name the gateway sent (None: it is an upstream name, as it should be)."""
    if not isinstance(model, str) or not model:
        return f"expected a model name, got {model!r}"
    if "/" in model:
        return f"the gateway did not rewrite the public model id {model!r} to the upstream name"
    return None


def _media_routes(app: web.Application, control: MockControl) -> None:
    """OpenAI's media endpoints (and Cohere's rerank, Mistral's OCR), each checking what it receives: the
    model rewritten to its upstream name, the gateway's credentials; multipart parts are read as they come
    and summarised (size, sha256), never kept."""

    def mode() -> str:
        return control.script.pop(0) if control.script else control.mode

    def error_reply() -> web.Response:
        return web.Response(status=control.status, body=control.error_body, content_type="application/json")

    async def json_body(request: web.Request) -> tuple[dict, web.Response | None]:
        body = await request.read()
        control.received.append(Received(request.path, dict(request.headers), body))
        payload = orjson.loads(body)
        problem = _check_model(payload.get("model"))
        if request.headers.get("Authorization") != "Bearer sk-upstream-secret":
            problem = "the gateway did not send its own credentials"
        return payload, (_invalid(problem) if problem else None)

    async def read_form(request: web.Request) -> tuple[Form, web.Response | None]:
        reader = await request.multipart()
        parts: list[Part] = []
        async for part in reader:
            assert isinstance(part, BodyPartReader)
            entry = Part(part.name or "", dict(part.headers), part.filename)
            if part.filename is None:
                entry.value = (await part.read()).decode()
            else:
                digest = hashlib.sha256()
                while chunk := await part.read_chunk(64 * 1024):
                    digest.update(chunk)
                    entry.size += len(chunk)
                entry.sha256 = digest.hexdigest()
            parts.append(entry)
        form = Form(request.path, dict(request.headers), parts)
        control.forms.append(form)
        models = [p.value for p in parts if p.name == "model"]
        problem = None if len(models) == 1 else f"expected one model field, got {len(models)}"
        problem = problem or _check_model(models[0])
        if not any(p.filename is not None for p in parts):
            problem = "no file part"
        if request.headers.get("Authorization") != "Bearer sk-upstream-secret":
            problem = "the gateway did not send its own credentials"
        return form, (_invalid(problem) if problem else None)

    async def speech(request: web.Request) -> web.StreamResponse:
        payload, invalid = await json_body(request)
        if invalid is not None:
            return invalid
        if not isinstance(payload.get("input"), str):
            return _invalid("`input` must be a string")
        current = mode()
        if current == "status":
            return error_reply()
        types = {"mp3": "audio/mpeg", "wav": "audio/wav", "opus": "audio/opus", "pcm": "audio/pcm"}
        resp = web.StreamResponse(
            headers={"Content-Type": types.get(payload.get("response_format", "mp3"), "audio/mpeg")}
        )
        await resp.prepare(request)
        try:
            for i, chunk in enumerate(audio_chunks(control.audio_bytes)):
                await resp.write(chunk)
                control.bytes_sent += len(chunk)
                control.first_sent.set()
                if control.gate_after and i + 1 == control.gate_after:
                    await control.gate.wait()
                if current == "truncate" and i == 0:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
        except (asyncio.CancelledError, ConnectionError):
            control.disconnected.set()
            raise
        await resp.write_eof()
        return resp

    async def transcribe(request: web.Request) -> web.StreamResponse:
        form, invalid = await read_form(request)
        if invalid is not None:
            return invalid
        if mode() == "status":
            return error_reply()
        fields = {p.name: p.value for p in form.parts if p.filename is None}
        model = fields["model"]
        if fields.get("stream") == "true":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for word in ("Hello", " there", "!"):
                event = {"type": "transcript.text.delta", "delta": word}
                await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            usage = {"type": "tokens", "input_tokens": 40, "output_tokens": 3, "total_tokens": 43}
            done = {"type": "transcript.text.done", "text": "Hello there!", "usage": usage}
            await resp.write(b"data: " + orjson.dumps(done) + b"\n\n")
            return resp
        fmt = fields.get("response_format", "json")
        if fmt in ("text", "srt", "vtt"):
            text = {"text": "Hello there!\n", "srt": "1\n00:00:00,000 --> 00:00:01,000\nHello there!\n\n"}
            content_type = "text/vtt" if fmt == "vtt" else "text/plain"
            return web.Response(
                text=text.get(fmt, "WEBVTT\n\n00:00.000 --> 00:01.000\nHello there!\n"), content_type=content_type
            )
        if fmt == "verbose_json":
            return web.json_response({"task": "transcribe", "duration": 8.47, "text": "Hello there!", "segments": []})
        if model.startswith("gpt-"):
            usage = {"type": "tokens", "input_tokens": 40, "output_tokens": 3, "total_tokens": 43}
        else:
            usage = {"type": "duration", "seconds": 9}
        return web.json_response({"text": "Hello there!", "usage": usage})

    def images_answer(model: str, n: int) -> dict:
        answer: dict = {"created": 1700000000, "data": [{"b64_json": "aW1hZ2U="} for _ in range(n)]}
        if model.startswith("gpt-image"):
            answer["usage"] = {"input_tokens": 50, "output_tokens": 1056 * n, "total_tokens": 50 + 1056 * n}
        return answer

    async def images(request: web.Request) -> web.StreamResponse:
        payload, invalid = await json_body(request)
        if invalid is not None:
            return invalid
        if mode() == "status":
            return error_reply()
        n = payload.get("n", 1)
        if not payload.get("stream"):
            return web.json_response(images_answer(payload["model"], n))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            partial = {"type": "image_generation.partial_image", "b64_json": "cGFydA==", "partial_image_index": 0}
            await resp.write(b"event: image_generation.partial_image\ndata: " + orjson.dumps(partial) + b"\n\n")
            usage = {
                "input_tokens": 50 if i == 0 else 0,
                "output_tokens": 1056,
                "total_tokens": 1056 + (50 if i == 0 else 0),
            }
            done = {"type": "image_generation.completed", "b64_json": "aW1hZ2U=", "usage": usage}
            await resp.write(b"event: image_generation.completed\ndata: " + orjson.dumps(done) + b"\n\n")
        return resp

    async def image_edits(request: web.Request) -> web.StreamResponse:
        form, invalid = await read_form(request)
        if invalid is not None:
            return invalid
        if mode() == "status":
            return error_reply()
        fields = {p.name: p.value for p in form.parts if p.filename is None}
        return web.json_response(images_answer(fields["model"], int(fields.get("n", "1"))))

    async def rerank(request: web.Request) -> web.Response:
        payload, invalid = await json_body(request)
        if invalid is not None:
            return invalid
        if mode() == "status":
            return error_reply()
        results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(payload.get("documents", [])))]
        return web.json_response(
            {
                "id": "rerank-mock",
                "results": results,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            }
        )

    async def ocr(request: web.Request) -> web.Response:
        payload, invalid = await json_body(request)
        if invalid is not None:
            return invalid
        if mode() == "status":
            return error_reply()
        pages = [{"index": i, "markdown": f"# Page {i + 1}", "images": [], "dimensions": None} for i in range(3)]
        return web.json_response(
            {"pages": pages, "model": payload["model"], "usage_info": {"pages_processed": 3, "doc_size_bytes": 2048}}
        )

    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_post("/v1/audio/translations", transcribe)
    app.router.add_post("/v1/images/generations", images)
    app.router.add_post("/v1/images/edits", image_edits)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_post("/v1/ocr", ocr)


def now_ms() -> float:
    return time.perf_counter() * 1000.0
