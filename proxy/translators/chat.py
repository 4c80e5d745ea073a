"""Chat Completions wire ⇄ the neutral form, for the two places it is translated rather than passed through:

- `PROVIDER`: OpenAI and OpenAI-compatible providers behind another surface (an Anthropic Messages or
  Responses client asking for an OpenAI model);
- `SURFACE`: the `openai.chat` surface in front of another provider kind (the `openai` SDK asking for a
  Claude or Gemini model).

Chat to an OpenAI-kind provider never comes here: `proxy.translators.openai` forwards those bytes.
"""

from __future__ import annotations

from typing import Any, Final, final

import msgspec
import orjson

from proxy.errors import OPENAI, Code, GatewayError, error_body
from proxy.meta import Usage
from proxy.sse import EventBuffer, data_event, event_data, single_data, split_events
from proxy.translators.neutral import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ChunkChoice,
    Delta,
    ProviderTranslator,
    StreamWriter,
    SurfaceTranslator,
    UpstreamRequest,
    unhonoured,
    unsupported,
)
from proxy.translators.openai import DONE, GATEWAY_FIELDS, OpenAIUsage, decode_body, inject_members

KIND: Final = "openai"
PATH: Final = "/chat/completions"

_encode = msgspec.json.Encoder().encode

# ---------------------------------------------------------------------------------------------------------
# provider side: neutral → an OpenAI-compatible upstream

# Neutral parameters an OpenAI-kind provider does not take.
_NOT_OPENAI: Final = {"top_k": (None,)}


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_request(
    request: ChatRequest, upstream_model: str, stream: bool, drop_params: bool, strict: bool = False
) -> UpstreamRequest:
    dropped = unhonoured(request, _NOT_OPENAI, KIND, drop_params, strict)
    if dropped:
        request = msgspec.structs.replace(request, **dict.fromkeys(dropped))
    out = msgspec.structs.replace(request, model=upstream_model, stream=stream, stream_options=None)
    body = _encode(out)
    if stream:  # metering needs usage
        body = inject_members(body, b'"stream_options":{"include_usage":true}')
    return UpstreamRequest(path=PATH, body=body, dropped=dropped)


class _UsageView(msgspec.Struct):
    usage: OpenAIUsage | None = None


class _UpChunk(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] | None = None  # decoded straight into the neutral form
    usage: OpenAIUsage | None = None
    error: Any = None


class _LaxChoice(msgspec.Struct):
    index: int = 0
    delta: Delta | None = None  # `"delta": null`, which the neutral form does not take
    finish_reason: str | None = None


class _LaxChunk(_UpChunk):
    choices: list[_LaxChoice] | None = None  # type: ignore[assignment]


_usage_decoder = msgspec.json.Decoder(_UsageView)
_response_decoder = msgspec.json.Decoder(ChatResponse)
_chunk_decoder = msgspec.json.Decoder(_UpChunk)
_lax_chunk_decoder = msgspec.json.Decoder(_LaxChunk)


def _decode_chunk(data: bytes) -> _UpChunk:
    try:
        return _chunk_decoder.decode(data)
    except msgspec.ValidationError:
        lax = _lax_chunk_decoder.decode(data)
        choices = [
            ChunkChoice(index=c.index, delta=c.delta or Delta(), finish_reason=c.finish_reason)
            for c in lax.choices or ()
        ]
        return _UpChunk(lax.id, lax.created, lax.model, choices, lax.usage, lax.error)


def parse_response(body: bytes) -> tuple[ChatResponse, Usage | None]:
    try:
        response = _response_decoder.decode(body)
        view = _usage_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise GatewayError(
            Code.upstream_bad_response, f"The provider answered with a body that is not a chat completion: {e}"
        ) from None
    return response, view.usage.neutral() if view.usage else None


class _ErrorDetail(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: Any = None
    param: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)


def parse_error(status: int, body: bytes) -> GatewayError | None:
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    detail = parsed.error
    if detail is None:
        return None
    if isinstance(detail, str):  # some compatible servers: {"error": "text"}
        detail = _ErrorDetail(message=detail)
    return GatewayError(
        Code.upstream_error,
        detail.message or "the provider answered an error",
        status=status,
        param=detail.param,
        type=detail.type or "api_error",
    )


@final
class ChatReader:
    """A Chat Completions stream → neutral chunks (see `StreamReader`)."""

    __slots__ = ("_buffer", "created", "done", "events", "failure", "id", "model", "usage")

    def __init__(self) -> None:
        self._buffer = EventBuffer()
        self.done = False
        self.failure: GatewayError | None = None
        self.usage: Usage | None = None
        self.id = ""
        self.model = ""
        self.created = 0
        self.events = 0

    def feed(self, chunk: bytes) -> list[ChatChunk]:
        if self.done:
            return []
        data = single_data(chunk) if self._buffer.empty else None
        if data is not None:  # the common case: the chunk is one whole `data: {...}` event
            out: list[ChatChunk] = []
            self._on_data(data, out)
            return out
        complete = self._buffer.feed(chunk)
        if not complete:
            return []
        out = []
        for raw in split_events(complete):
            data = event_data(raw)
            if data is not None and not self._on_data(data, out):
                break
        return out

    def _on_data(self, data: bytes, out: list[ChatChunk]) -> bool:
        """Reads one event's data into `out`; False once the stream is over."""
        self.events += 1
        if data.strip() == b"[DONE]":
            self.done = True
            return False
        try:
            up = _decode_chunk(data)
        except (msgspec.DecodeError, RecursionError):
            return True
        if up.error is not None:
            self.failure = parse_error(502, data) or GatewayError(Code.upstream_bad_response, "stream error")
            self.done = True
            return False
        if not self.id:
            self.id, self.created, self.model = up.id, up.created, up.model
        if up.usage is not None:
            self.usage = up.usage.neutral()
        if up.choices:
            out.append(ChatChunk(id=up.id, created=up.created, model=up.model, choices=up.choices))
        return True


PROVIDER: Final = ProviderTranslator(
    kind=KIND,
    auth_headers=auth_headers,
    build_request=build_request,
    parse_response=parse_response,
    reader=ChatReader,
    parse_error=parse_error,
)


# ---------------------------------------------------------------------------------------------------------
# surface side: a Chat Completions client in front of another provider kind

_request_decoder = msgspec.json.Decoder(ChatRequest)
_members_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])

# Chat members the neutral form does not carry, which no other provider kind honours: a request that
# sets them gets a 400 naming them (or they are dropped, with `drop_params`). Members not listed here and
# unknown to the neutral form are ignored: they change nothing about the answer (store, service_tier, …).
_CHAT_ONLY: Final = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "logit_bias": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
}
_KNOWN: Final = frozenset(ChatRequest.__struct_fields__) | frozenset(GATEWAY_FIELDS)


def decode_request(body: bytes, drop_params: bool = False) -> ChatRequest:
    request = decode_body(_request_decoder.decode, body)
    if not drop_params:
        members = _members_decoder.decode(body)
        for name in members.keys() - _KNOWN:
            honoured = _CHAT_ONLY.get(name)
            if honoured is not None and orjson.loads(bytes(members[name])) not in honoured:
                raise unsupported(name, "non-OpenAI", "only OpenAI models take it")
    return request


def _usage(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens or usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    if usage.cache_write_tokens:
        out["prompt_tokens_details"]["cache_write_tokens"] = usage.cache_write_tokens
    return out


def render_response(response: ChatResponse, usage: Usage | None, model: str, extra: bytes) -> bytes:
    body = _encode(msgspec.structs.replace(response, model=model))
    members = b'"usage":' + orjson.dumps(_usage(usage)) if usage is not None else b""
    if extra:
        members = members + b"," + extra if members else extra
    return inject_members(body, members)


@final
class ChatWriter:
    """Neutral chunks → a Chat Completions stream (see `StreamWriter`)."""

    __slots__ = ("_created", "_id", "model", "wants_usage")

    def __init__(self, model: str, wants_usage: bool):
        self.model = model
        self.wants_usage = wants_usage
        self._id = ""
        self._created = 0

    def write(self, chunks: list[ChatChunk]) -> bytes:
        out = []
        for chunk in chunks:
            if not self._id:
                self._id, self._created = chunk.id, chunk.created
            chunk.model = self.model
            out.append(data_event(_encode(chunk)))
        return b"".join(out)

    def finish(self, usage: Usage | None, extra: bytes) -> bytes:
        members = b'"usage":' + orjson.dumps(_usage(usage)) if usage is not None and self.wants_usage else b""
        if extra:
            members = members + b"," + extra if members else extra
        if not members:
            return DONE
        head = _encode(ChatChunk(id=self._id, created=self._created, model=self.model, choices=[]))
        return data_event(inject_members(head, members)) + DONE

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return data_event(orjson.dumps(error_body(err, request_id, OPENAI)))


def writer(model: str, wants_usage: bool) -> StreamWriter:
    return ChatWriter(model, wants_usage)


SURFACE: Final = SurfaceTranslator(
    name="openai.chat",
    dialect=OPENAI,
    decode_request=decode_request,
    render_response=render_response,
    writer=writer,
)
