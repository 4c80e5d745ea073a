"""A controllable Gemini (Generative Language API v1beta) upstream for the tests (127.0.0.1 only).

It serves `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`, records
what it received, and validates requests the way the real API does: a request it would reject gets the
real API's error body (`{"error": {"code", "message", "status"}}`). Streams use CRLF framing, as the
real API does. `GeminiControl` chooses the answer: text, one function call, or an error status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

PART_FIELDS = frozenset(
    {
        "text",
        "inlineData",
        "fileData",
        "functionCall",
        "functionResponse",
        "executableCode",
        "codeExecutionResult",
    }
)
USAGE = {"promptTokenCount": 9, "candidatesTokenCount": 5, "totalTokenCount": 14}
RESPONSE_ID = "mock-gemini-response"


@dataclass
class GeminiReceived:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # the parsed JSON body (None when it was not JSON)


@dataclass
class GeminiControl:
    mode: str = "text"  # text | tool_call | status
    status: int = 500
    error_body: bytes = b'{"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}'
    events: list[str] = field(default_factory=lambda: ["Hello", " from", " Gemini!"])  # streamed text chunks
    received: list[GeminiReceived] = field(default_factory=list)

    @property
    def last(self) -> GeminiReceived:
        return self.received[-1]


_STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}


def gemini_error(status: int, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _problem(payload: Any) -> str | None:
    """What the real API would reject in this body, or None."""
    if not isinstance(payload, dict):
        return "Invalid JSON payload received. Expected an object."
    contents = payload.get("contents")
    if not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{i}].role = {role!r})"
        parts = content.get("parts")
        if not parts:
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or not PART_FIELDS & part.keys():
                return (
                    f"* GenerateContentRequest.contents[{i}].parts[{j}].data: "
                    "required oneof field 'data' must have one initialized field"
                )
    return None


def _answer(model: str, parts: list[dict[str, Any]], finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": RESPONSE_ID}


def _sse(answer: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(answer) + b"\r\n\r\n"


TOOL_CALL_PART = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}


COUNTED_TOKENS = 42  # what `countTokens` answers, as `totalTokens`


def _count_tokens(control: GeminiControl, request: web.Request, model: str, payload: Any) -> web.Response:
    """`models/{model}:countTokens`, checked as the real API checks it: `contents` or a `generateContentRequest`
    naming the same model, never both."""
    if not request.headers.get("x-goog-api-key"):
        return gemini_error(400, "API key not valid. Please pass a valid API key.")
    if control.mode == "status":
        return web.Response(status=control.status, body=control.error_body, content_type="application/json")
    if not isinstance(payload, dict) or ("contents" in payload) == ("generateContentRequest" in payload):
        return gemini_error(400, "Either contents or generateContentRequest must be set, not both.")
    generate = payload.get("generateContentRequest")
    if generate is not None:
        if generate.get("model") != f"models/{model}":
            return gemini_error(400, f"generateContentRequest.model must be models/{model}.")
        problem = _problem({k: v for k, v in generate.items() if k != "model"})
        if problem:
            return gemini_error(400, problem)
    return web.json_response({"totalTokens": COUNTED_TOKENS, "promptTokensDetails": []})


def build_gemini_mock(control: GeminiControl) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            payload: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        control.received.append(GeminiReceived(request.path, dict(request.query), dict(request.headers), payload))
        model, _, method = request.match_info["name"].partition(":")
        if method == "countTokens":
            return _count_tokens(control, request, model, payload)
        if method not in ("generateContent", "streamGenerateContent"):
            return gemini_error(404, f"Method not found: {method!r}.")
        if not request.headers.get("x-goog-api-key"):
            return gemini_error(400, "API key not valid. Please pass a valid API key.")
        if payload is None:
            return gemini_error(400, "Invalid JSON payload received.")
        problem = _problem(payload)
        if problem:
            return gemini_error(400, problem)
        stream = method == "streamGenerateContent"
        if stream and request.query.get("alt") != "sse":
            return gemini_error(400, "This mock serves streams as server-sent events only: add ?alt=sse.")
        if control.mode == "status":
            return web.Response(status=control.status, body=control.error_body, content_type="application/json")
        parts = [TOOL_CALL_PART] if control.mode == "tool_call" else [{"text": "Hello from Gemini!"}]
        if not stream:
            return web.json_response(_answer(model, parts, "STOP", USAGE))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        prompt_only = {"promptTokenCount": USAGE["promptTokenCount"], "totalTokenCount": USAGE["promptTokenCount"]}
        if control.mode == "text":
            for text in control.events:
                await resp.write(_sse(_answer(model, [{"text": text}], None, prompt_only)))
            parts = [{"text": ""}]
        await resp.write(_sse(_answer(model, parts, "STOP", USAGE)))
        return resp

    app = web.Application()
    app.router.add_post("/v1beta/models/{name}", handle)
    return app
