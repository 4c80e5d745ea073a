"""The neutral form every translation passes through: OpenAI Chat Completions, as typed Structs.

A surface that is not the provider's own format decodes its request into `ChatRequest`; the provider's
translator encodes that into its wire format and decodes the answer into `ChatResponse` or, streamed,
into `ChatChunk`s, which the surface encodes back. So each wire format needs two converters, not one per
pair. Unknown members are ignored when decoding; what a provider cannot honour is the translators' call
(see `unsupported`).

Conventions of the neutral form (those of OpenAI Chat Completions):
- `Usage.input_tokens` counts every prompt token, cached reads and cache writes included;
  `Usage.output_tokens` counts reasoning tokens too.
- Finish reasons are `stop`, `length`, `tool_calls`, `content_filter`.
- Reasoning text travels in `reasoning_content` (a message's and a delta's), as DeepSeek sends it.
- Tool-call arguments are JSON text (`arguments`), streamed as string fragments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from proxy.errors import Code, GatewayError
from proxy.meta import Usage

__all__ = [
    "ChatChunk",
    "ChatRequest",
    "ChatResponse",
    "Choice",
    "ChunkChoice",
    "ContentPart",
    "Delta",
    "FunctionCall",
    "FunctionDef",
    "FunctionDelta",
    "ImageURL",
    "JSONSchema",
    "Message",
    "NamedToolChoice",
    "ProviderTranslator",
    "ResponseFormat",
    "StreamReader",
    "StreamWriter",
    "SurfaceTranslator",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoiceFunction",
    "UpstreamRequest",
    "Usage",
    "unsupported",
]


class _S(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Policy: defaults are omitted when encoding, so an encoded Struct is clean Chat Completions JSON.
    (msgspec does not inherit `kw_only`: each subclass repeats it.)"""


class _Full(msgspec.Struct, kw_only=True):
    """Answers and chunks keep their defaults when encoded (`index: 0`, `finish_reason: null`, `object`),
    as OpenAI sends them and SDK accumulators expect them."""


# ---------------------------------------------------------------------------------------------------------
# requests


class ImageURL(_S, kw_only=True):
    url: str  # an http(s) URL or a `data:<media type>;base64,<data>` URL
    detail: str | None = None


class ContentPart(_S, kw_only=True):
    type: str  # "text", "image_url"; others ("input_audio", "file", …) are kept by type only
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(_S, kw_only=True):
    name: str = msgspec.field(default_factory=str)  # factories: both are required members on the wire
    arguments: str = msgspec.field(default_factory=str)  # JSON text


# A default that must still be encoded (OpenAI requires `type` and a schema `name`): `omit_defaults`
# leaves out a plain default, not a `default_factory` one.
_FUNCTION = msgspec.field(default_factory=lambda: "function")


class ToolCall(_S, kw_only=True):
    id: str = ""
    type: str = _FUNCTION
    function: FunctionCall = msgspec.field(default_factory=FunctionCall)


class Message(_S, kw_only=True):
    role: str  # system, developer, user, assistant, tool
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # role "tool": the call this answers
    reasoning_content: str | None = None
    refusal: str | None = None


class FunctionDef(_S, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema
    strict: bool | None = None


class Tool(_S, kw_only=True):
    type: str = _FUNCTION
    function: FunctionDef


class ToolChoiceFunction(_S, kw_only=True):
    name: str


class NamedToolChoice(_S, kw_only=True):
    type: str = _FUNCTION
    function: ToolChoiceFunction


class JSONSchema(_S, kw_only=True):
    name: str = msgspec.field(default_factory=lambda: "response")
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(_S, kw_only=True):
    type: str  # text, json_object, json_schema
    json_schema: JSONSchema | None = None


class StreamOptions(_S, kw_only=True):
    include_usage: bool = False


class ChatRequest(_S, kw_only=True):
    model: str = ""
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; Anthropic and Gemini honour it
    stop: str | list[str] | None = None
    n: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None  # "none", "auto", "required", or a named function
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None  # minimal, low, medium, high
    user: str | None = None
    metadata: dict[str, str] | None = None

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# ---------------------------------------------------------------------------------------------------------
# responses


class Choice(_Full, kw_only=True):
    index: int = 0
    message: Message
    finish_reason: str | None = None


class ChatResponse(_Full, kw_only=True):
    """A whole answer. Usage travels beside it (see `ResponseCodec.parse`), in neutral `Usage` terms."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]


# ---------------------------------------------------------------------------------------------------------
# streams


class FunctionDelta(_S, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_S, kw_only=True):
    index: int  # which tool call of the message; the first delta of a call carries id, type and name
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(_S, kw_only=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Full, kw_only=True):
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)  # some compatible servers omit it on the last chunk
    finish_reason: str | None = None


class ChatChunk(_Full, kw_only=True):
    """One streamed step. Usage is not here: readers hold it (`StreamReader.usage`) until the end."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


# ---------------------------------------------------------------------------------------------------------
# the translator interfaces


class UpstreamRequest(msgspec.Struct, kw_only=True):
    """What a provider translator asks the upstream client to send."""

    path: str  # appended to the provider's base_url
    body: bytes
    headers: dict[str, str] = {}  # besides the provider's credentials and configured headers
    dropped: tuple[str, ...] = ()  # request parameters left out (`unhonoured`): the answer says so


class StreamReader(Protocol):
    """A provider's stream → neutral chunks, one upstream chunk (any bytes) at a time.

    `feed` returns the chunks the bytes complete (often none) and raises `proxy.sse.SSEError` on broken
    framing. It sets `done` when the provider signalled the end of the answer, and `failure` when the
    provider sent an error event instead (the stream then ends). `usage`, `id`, `model`, `created`
    fill in as the provider reports them; `events` counts upstream events (an estimate's basis).
    """

    done: bool
    failure: GatewayError | None
    usage: Usage | None
    id: str
    model: str
    created: int
    events: int

    def feed(self, chunk: bytes) -> list[ChatChunk]: ...


class StreamWriter(Protocol):
    """Neutral chunks → a surface's stream, as bytes ready to write to the client."""

    def write(self, chunks: list[ChatChunk]) -> bytes: ...

    def finish(self, usage: Usage | None, extra: bytes) -> bytes:
        """The closing events. `extra` is JSON members (`"meta":{…}`, cost) for the final event, or b""."""
        ...

    def error(self, err: GatewayError, request_id: str) -> bytes:
        """The event that ends a stream that cannot finish, in the surface's idiom."""
        ...


# Parameters a provider may not honour whose loss leaves the answer valid for what was asked: sampling and
# determinism hints, and a cap on parallel tool calls (the client handles several calls anyway). They are
# dropped by default and reported (`x-gateway-dropped-params`, `meta.dropped_params`); a provider with
# `strict_params: true` refuses them. Any other parameter a provider cannot honour (`n`, response formats,
# content it cannot carry) changes the meaning of the answer: a 400, unless the provider has `drop_params`.
DROPPABLE: Final = frozenset({"seed", "presence_penalty", "frequency_penalty", "top_k", "parallel_tool_calls"})


def unhonoured(
    request: ChatRequest, table: Mapping[str, tuple[Any, ...]], kind: str, drop_params: bool, strict: bool
) -> tuple[str, ...]:
    """The parameters `request` sets to values a provider of `kind` cannot honour (`table`: name → the values
    it does), to be left out: the DROPPABLE ones (unless `strict`), and any with `drop_params`. Any other is a
    400 naming it."""
    dropped = []
    for name, honoured in table.items():
        if getattr(request, name) in honoured:
            continue
        if drop_params or (name in DROPPABLE and not strict):
            dropped.append(name)
        else:
            raise unsupported(name, kind, "the provider has strict_params" if name in DROPPABLE else "")
    return tuple(dropped)


def unsupported(name: str, provider_kind: str, why: str = "") -> GatewayError:
    """The 400 for a request parameter a provider cannot honour."""
    detail = f" ({why})" if why else ""
    return GatewayError(
        Code.invalid_request,
        f"The parameter `{name}` is not supported by {provider_kind} models{detail}. Remove it, or set "
        f"`drop_params: true` on the provider in the gateway config to drop it silently.",
        param=name,
    )


@dataclass(frozen=True, slots=True)
class ProviderTranslator:
    """A provider kind's half of every translation: neutral → its wire format, and back. Pure functions.

    - `auth_headers(api_key)`: the credential headers (e.g. `x-api-key`), sent on every request.
    - `build_request(request, upstream_model, stream, drop_params)`: the upstream request. A parameter it
      cannot honour raises `unsupported(...)`, unless `drop_params` is true (then it is left out).
    - `parse_response(body)`: (the answer, its usage or None); `GatewayError(upstream_bad_response)` when
      the body is not what the provider should send.
    - `reader()`: a new `StreamReader` for one stream.
    - `parse_error(status, body)`: the provider's error body → the error to show the client (its status,
      the provider's message and type); None when the body is not the provider's error shape.
    """

    kind: str
    auth_headers: Callable[[str], dict[str, str]]
    build_request: Callable[..., UpstreamRequest]
    parse_response: Callable[[bytes], tuple[ChatResponse, Usage | None]]
    reader: Callable[[], StreamReader]
    parse_error: Callable[[int, bytes], GatewayError | None]


@dataclass(frozen=True, slots=True)
class SurfaceTranslator:
    """A client surface's half: its wire format → neutral, and neutral answers back. Pure functions.

    - `decode_request(body, drop_params)`: the neutral request; `GatewayError(invalid_request)` naming the
      member that is wrong, or one the neutral form cannot carry (unless the surface may safely ignore it,
      or `drop_params` — the provider's setting — says to drop what cannot be honoured).
    - `render_response(response, usage, model, extra)`: the JSON body for the client. `model` is the
      public model id; `extra` is JSON members to add at the top level (cost, meta, upstream echo), or b"".
    - `writer(model, wants_usage)`: a new `StreamWriter` for one stream.
    - `dialect`: how `proxy.errors.render` shapes this surface's errors.
    """

    name: str
    dialect: str
    decode_request: Callable[[bytes, bool], ChatRequest]
    render_response: Callable[..., bytes]  # (response, usage, model, extra[, echo])
    writer: Callable[..., StreamWriter]  # (model, wants_usage[, echo])
