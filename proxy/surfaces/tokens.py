"""`POST /v1/messages/count_tokens`: how many input tokens a Messages request would use, for any model.

Anthropic's SDK (`client.messages.count_tokens`) and LangChain's `ChatAnthropic.get_num_tokens_from_messages`
call it. The model's first target whose provider can count answers:

- an `anthropic` provider: the request is passed through to its `/v1/messages/count_tokens` (model renamed);
- a `gemini` provider: translated like a Messages request, then sent to `models/{model}:countTokens` as a
  `generateContentRequest` (its `totalTokens` is the count);
- an `openai` provider: translated into the Responses API's input and sent to `/responses/input_tokens`.

OpenAI-compatible servers have no counting endpoint: a model served only by them gets a 400 saying so.
The answer is Anthropic's, `{"input_tokens": N}`, whatever counted it. Counting is not billed and makes no
generation record (it is counted in the metrics). It needs a key that may use the model, not credit.
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.access import META
from proxy.auth import token_from_headers
from proxy.client import ClientError
from proxy.errors import ANTHROPIC, Code, GatewayError, render
from proxy.gateway import GATEWAY, Gateway
from proxy.meta import RequestMeta, new_request_id
from proxy.routing import SURFACES
from proxy.surfaces.body import read_body
from proxy.translators import gemini, messages
from proxy.translators.neutral import ChatRequest, ContentPart, Message
from proxy.translators.openai import GATEWAY_FIELDS
from proxy.upstream import Upstream

SURFACE: Final = SURFACES["anthropic.count_tokens"]
COUNTING_KINDS: Final = ("anthropic", "gemini", "openai")  # provider kinds with a token-counting endpoint


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """The aiohttp handler of the `anthropic.count_tokens` surface."""
    gw = request.app[GATEWAY]
    meta = RequestMeta(new_request_id(), SURFACE.name, time.perf_counter())
    request[META] = meta  # for the access log
    try:
        return await _count(request, gw, meta)
    except GatewayError as e:
        meta.status, meta.error_code, meta.error_message = e.status, e.code.name, e.message
        return render(e, meta.request_id, ANTHROPIC)
    finally:
        meta.t_end = time.perf_counter()
        gw.metrics.record(meta, meta.t_end)  # counted, not recorded as a generation: counting costs nothing


async def _count(request: web.Request, gw: Gateway, meta: RequestMeta) -> web.Response:
    key = await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]
    meta.team_id, meta.key_id = key.team_id, key.kid
    body = await read_body(request, gw.config.server)
    meta.request_bytes = len(body)
    fields = _fields(body)
    model_id, model = gw.routes.resolve(fields["model"], SURFACE)
    meta.model = model_id
    if key.allowed_models and model_id not in key.allowed_models:
        raise GatewayError(
            Code.forbidden,
            f"This key may not use {model_id!r} (it may use: {', '.join(key.allowed_models)}).",
            param="model",
        )
    targets = gw.routes.usable(model_id, model.targets, key.team_name)
    kinds = {t.provider: gw.config.providers[t.provider].kind for t in targets}
    target = next((t for t in targets if kinds[t.provider] in COUNTING_KINDS), None)
    if target is None:
        providers = ", ".join(f"{name!r} ({kind})" for name, kind in kinds.items())
        raise GatewayError(
            Code.model_not_supported,
            f"The model {model_id!r} is served by {providers}, which has no token-counting endpoint (only "
            f"Anthropic, Gemini and OpenAI providers count tokens); count with another model of the same family.",
            param="model",
        )
    kind = kinds[target.provider]
    upstream = gw.upstreams[target.provider]
    meta.provider, meta.upstream_model = target.provider, target.model
    drop = gw.config.providers[target.provider].drop_params
    path, out = _request(kind, body, fields, target.model, drop)
    meta.upstream_started()
    try:
        resp = await upstream.post(path, out)
        try:
            data = await resp.read()
        finally:
            resp.release()
    except ClientError as e:
        meta.upstream_ended(0)
        raise upstream.failure(e, "counting tokens") from None
    meta.upstream_ended(resp.status)
    if resp.status >= 400:
        raise _refused(upstream, resp.status, data)
    meta.status = 200
    answer = orjson.dumps({"input_tokens": _read(kind, target.provider, data)})
    return web.Response(body=answer, headers={"Content-Type": "application/json", "x-request-id": meta.request_id})


def _fields(body: bytes) -> dict[str, Any]:
    """The request as a JSON object with a `model` and `messages` (400 naming what is wrong)."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise GatewayError(Code.invalid_json, f"The request body is not valid JSON: {e}.") from None
    if not isinstance(fields, dict):
        raise GatewayError(Code.invalid_request, "The request body must be a JSON object.")
    for name in ("model", "messages"):
        if name not in fields:
            raise GatewayError(Code.invalid_request, f"Missing required field `{name}`.", param=name)
    if not isinstance(fields["model"], str):
        raise GatewayError(Code.invalid_request, "`model` must be a string.", param="model")
    return fields


def _request(kind: str, body: bytes, fields: dict[str, Any], upstream_model: str, drop: bool) -> tuple[str, bytes]:
    """The provider's counting request: (path, body)."""
    if kind == "anthropic":  # the gateway's own members (`meta`, `provider`, …) are not Anthropic's
        asked = {name: value for name, value in fields.items() if name not in GATEWAY_FIELDS}
        return "/v1/messages/count_tokens", orjson.dumps({**asked, "model": upstream_model})
    # Counting takes no `max_tokens`; the Messages translator needs one (it is not counted, nor sent).
    neutral = messages.decode_request(orjson.dumps({"max_tokens": 1, **fields, "stream": False}), drop)
    if kind == "gemini":
        generate = orjson.loads(gemini.PROVIDER.build_request(neutral, upstream_model, False, drop).body)
        generate.pop("generationConfig", None)  # how to answer, not what is read
        path = gemini.model_path(upstream_model, False, "countTokens")
        name = "/".join(gemini.resource(upstream_model))
        return path, orjson.dumps({"generateContentRequest": {"model": name, **generate}})
    return "/responses/input_tokens", orjson.dumps(responses_input(neutral, upstream_model))


def responses_input(request: ChatRequest, upstream_model: str) -> dict[str, Any]:
    """A neutral request as the OpenAI Responses API's input (what its `input_tokens` endpoint reads)."""
    items: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "tool":
            items.append(
                {"type": "function_call_output", "call_id": message.tool_call_id or "", "output": _text(message)}
            )
            continue
        if message.content:
            items.append({"role": message.role, "content": _content(message)})
        for call in message.tool_calls or ():
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.id,
                    "name": call.function.name,
                    "arguments": call.function.arguments,
                }
            )
    out: dict[str, Any] = {"model": upstream_model, "input": items}
    if request.tools:
        out["tools"] = [
            {
                "type": "function",
                "name": tool.function.name,
                **({"description": tool.function.description} if tool.function.description else {}),
                "parameters": tool.function.parameters or {"type": "object", "properties": {}},
            }
            for tool in request.tools
        ]
    return out


def _content(message: Message) -> str | list[dict[str, Any]]:
    if isinstance(message.content, str):
        return message.content
    text_type = "output_text" if message.role == "assistant" else "input_text"
    return [_part(part, text_type) for part in message.content or ()]


def _part(part: ContentPart, text_type: str) -> dict[str, Any]:
    if part.type == "image_url" and part.image_url is not None:
        return {"type": "input_image", "image_url": part.image_url.url}
    return {"type": text_type, "text": part.text or ""}


def _text(message: Message) -> str:
    if isinstance(message.content, str) or message.content is None:
        return message.content or ""
    return "".join(part.text or "" for part in message.content)


def _read(kind: str, provider: str, data: bytes) -> int:
    """The count in a provider's answer (502 when it has none)."""
    member = "totalTokens" if kind == "gemini" else "input_tokens"
    try:
        count = orjson.loads(data).get(member)
    except (orjson.JSONDecodeError, AttributeError):
        count = None
    if not isinstance(count, int) or isinstance(count, bool):
        raise GatewayError(
            Code.upstream_bad_response, f"The provider {provider!r} answered the token count without `{member}`."
        )
    return count


def _refused(upstream: Upstream, status: int, data: bytes) -> GatewayError:
    """A provider's error answer to a count, with its status and message."""
    if status in (401, 403):
        return upstream.credentials_refused(status)
    provider = upstream.name
    try:
        error = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    message = error.get("message") if isinstance(error, dict) else error
    kind = error.get("type") if isinstance(error, dict) else None  # Anthropic's and OpenAI's own error type
    said = f": {message}" if isinstance(message, str) and message else ""
    return GatewayError(
        Code.upstream_error,
        f"The provider {provider!r} refused to count (HTTP {status}){said}",
        status=status,
        type=kind if isinstance(kind, str) else "",
    )
