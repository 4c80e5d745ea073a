"""Which translation one request takes, decided once: `plan(...)` → an `Exchange`.

The pair (client surface, provider kind) picks it. When both speak the same wire format the body is
forwarded as bytes (only `model` and the gateway's own members are spliced) and streams are relayed as
they come; otherwise the surface's translator decodes the request into the neutral form, the provider's
encodes it, and answers come back the same way (a `Pipe` for streams). A media surface a provider kind does
not speak has its own translator of whole answers (`MEDIA_TRANSLATORS`: images from Gemini). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, Mapping
from typing import Any, Final, Protocol, final

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.translators import (
    anthropic,
    chat,
    gemini,
    gemini_images,
    media,
    messages,
    openai,
    responses,
    responses_native,
)
from proxy.translators.neutral import (
    ChatChunk,
    ChatResponse,
    ProviderTranslator,
    StreamReader,
    StreamWriter,
    SurfaceTranslator,
    UpstreamRequest,
)

# The one registry of translators: provider kinds, and client surfaces that can be translated.
PROVIDERS: Final[dict[str, ProviderTranslator]] = {
    "openai": chat.PROVIDER,
    "openai-compatible": chat.PROVIDER,
    "anthropic": anthropic.PROVIDER,
    "gemini": gemini.PROVIDER,
}
SURFACES: Final[dict[str, SurfaceTranslator]] = {
    "openai.chat": chat.SURFACE,
    "anthropic.messages": messages.SURFACE,
    "openai.responses": responses.SURFACE,
}

# Surfaces each provider kind speaks natively (bytes pass through). The OpenAI Responses API is
# OpenAI's own: OpenAI-compatible servers get it translated into Chat Completions. Media surfaces (images,
# audio, rerank, OCR) pass through to both OpenAI kinds.
_MEDIA = frozenset(media.PATHS)
NATIVE: Final[dict[str, frozenset[str]]] = {
    "openai": frozenset({"openai.chat", "openai.embeddings", "openai.moderations", "openai.responses", *_MEDIA}),
    "openai-compatible": frozenset({"openai.chat", "openai.embeddings", "openai.moderations", *_MEDIA}),
    "anthropic": frozenset({"anthropic.messages"}),
}

_NATIVE_PATHS: Final[dict[str, str]] = {
    "openai.chat": "/chat/completions",
    "openai.embeddings": "/embeddings",
    "openai.moderations": "/moderations",
    "openai.responses": "/responses",
    "anthropic.messages": anthropic.PATH,
    **media.PATHS,
}
# How the usage of a whole native answer is read (Chat Completions' shape unless named here).
_NATIVE_READERS: Final = {
    "anthropic.messages": anthropic.message_view,
    "openai.responses": responses_native.response_usage,
    **media.READERS,
}

_TOKEN = re.compile(r"[0-9A-Za-z'+_.-]+")  # a multipart boundary that needs no quotes
# Client headers forwarded on a pass-through, per surface (they select API features, not identity).
_FORWARDED_HEADERS: Final = {"anthropic.messages": ("anthropic-beta", "anthropic-version")}


class WholeAnswer(Protocol):
    """A media surface translated for one request (images from Gemini): a whole answer read, then rendered."""

    def read(self, body: bytes) -> tuple[Usage | None, str]: ...

    def render(self, extra: bytes) -> bytes: ...

    def error(self, status: int, body: bytes) -> GatewayError | None: ...


class MediaTranslate(Protocol):
    def __call__(
        self, body: bytes, upstream_model: str, stream: bool, drop_params: bool
    ) -> tuple[UpstreamRequest, WholeAnswer]: ...


# Media surfaces translated for a provider kind that does not speak them: (surface, kind) → translator.
MEDIA_TRANSLATORS: Final[dict[tuple[str, str], MediaTranslate]] = {
    (media.IMAGES, gemini.KIND): gemini_images.translate,
}


class Upload(Protocol):
    """A request body sent as it is read from the client (a multipart upload): it can be sent once."""

    error: GatewayError | None  # why reading the client's body failed (the client's fault, not the provider's)

    def payload(self) -> AsyncIterable[bytes]: ...


class Relay(Protocol):
    """What the stream handler drives: upstream bytes in, client bytes out."""

    done: bool
    first_token: bool
    events: int
    usage: Usage | None
    id: str
    wants_meta: bool
    failure: GatewayError | None

    @property
    def truncated(self) -> bool: ...

    def feed(self, chunk: bytes) -> bytes: ...

    def abort(self) -> bytes: ...

    def error(self, err: GatewayError, request_id: str) -> bytes: ...

    def finish(self, meta: bytes | None, cost: bytes = b"", extra: bytes = b"") -> bytes:
        """The closing events: `cost` members (when the surface shows them), `extra` members and meta."""
        ...


def _has_token(chunk: ChatChunk) -> bool:
    for choice in chunk.choices:
        d = choice.delta
        if d.content or d.reasoning_content or d.refusal or d.tool_calls:
            return True
    return False


@final
class Pipe:
    """A translated stream: the provider's reader feeding the surface's writer (a `Relay`)."""

    __slots__ = ("failure", "first_token", "reader", "request_id", "shows_cost", "wants_meta", "writer")

    def __init__(self, reader: StreamReader, writer: StreamWriter, request_id: str, wants_meta: bool, shows_cost: bool):
        self.reader = reader
        self.writer = writer
        self.request_id = request_id
        self.wants_meta = wants_meta
        self.shows_cost = shows_cost  # Chat Completions shows cost beside usage, only when usage was asked for
        self.first_token = False
        self.failure: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        chunks = self.reader.feed(chunk)
        out = self.writer.write(chunks) if chunks else b""
        if chunks and not self.first_token:
            self.first_token = any(_has_token(c) for c in chunks)
        if self.reader.failure is not None and self.failure is None:
            self.failure = self.reader.failure
            out += self.writer.error(self.failure, self.request_id)
        return out

    @property
    def done(self) -> bool:
        return self.reader.done

    @property
    def truncated(self) -> bool:
        return not self.reader.done

    @property
    def usage(self) -> Usage | None:
        return self.reader.usage

    @property
    def events(self) -> int:
        return self.reader.events

    @property
    def id(self) -> str:
        return self.reader.id

    def abort(self) -> bytes:
        return b""

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return self.writer.error(err, request_id)

    def finish(self, meta: bytes | None, cost: bytes = b"", extra: bytes = b"") -> bytes:
        members = openai.closing_members(cost if self.shows_cost else b"", extra, meta)
        return self.writer.finish(self.reader.usage, members)


@final
class Exchange:
    """One request's translation: what to send upstream, and how to read and render what comes back."""

    __slots__ = (
        "_answer",
        "_echo",
        "_parsed",
        "_provider",
        "_surface",
        "model",
        "native",
        "raw",
        "reasons",
        "surface",
        "upload",
        "upstream",
        "usage",
        "wants_usage",
    )

    def __init__(
        self,
        surface: str,
        upstream: UpstreamRequest,
        model: str,
        wants_usage: bool,
        provider: ProviderTranslator | None = None,
        translator: SurfaceTranslator | None = None,
        answer: WholeAnswer | None = None,
    ):
        self.surface = surface
        self.upstream = upstream
        self.model = model
        self._echo: dict[str, Any] = {}  # a translated Responses answer echoes these request members
        self.wants_usage = wants_usage
        self.native = translator is None and answer is None
        self._provider = provider
        self._surface = translator
        self._answer = answer  # a translated media surface's (its answers are whole: never streamed)
        self._parsed: ChatResponse | None = None
        self.raw = False  # a 2xx answer that is not JSON is relayed as bytes, as it arrives (audio, text)
        self.usage: Usage | None = None  # known from the request alone (speech: its characters)
        self.upload: Upload | None = None  # the body, when it streams from the client instead of `upstream.body`
        self.reasons: tuple[str, ...] | None = None  # a whole answer's finish reasons, when `read` for a trace

    def relay(self, request_id: str, wants_meta: bool) -> Relay:
        if self._surface is None or self._provider is None:
            if self.surface == "openai.chat":
                return openai.ChatStream(self.wants_usage, wants_meta)
            if self.surface == "anthropic.messages":
                return anthropic.MessagesPassthrough(wants_meta)
            if self.surface == "openai.responses":
                return responses_native.ResponsesPassthrough(wants_meta)
            return media.EventRelay(wants_meta)
        writer = self._surface.writer(self.model, self.wants_usage, **self._echoes())
        shows_cost = self.wants_usage or self.surface != "openai.chat"
        return Pipe(self._provider.reader(), writer, request_id, wants_meta, shows_cost)

    def read(self, body: bytes, traced: bool = False) -> tuple[Usage | None, str]:
        """(usage, the provider's id) of a whole answer; GatewayError(502) when it is not one (or, from a media
        translator, 400 `content_policy_violation` when the provider refused to make it). `traced`: its finish
        reasons are wanted too (`reasons`, when they are read in the same pass: a Chat Completions answer)."""
        if self._provider is None or self._surface is None:
            if self._answer is not None:
                return self._answer.read(body)
            if traced and self.surface == "openai.chat":
                usage, native_id, self.reasons = openai.traced_response_view(body)
                return usage, native_id
            return _NATIVE_READERS.get(self.surface, openai.response_view)(body)
        self._parsed, usage = self._provider.parse_response(body)
        return usage, self._parsed.id

    def render(self, body: bytes, usage: Usage | None, extra: bytes) -> bytes:
        """The client's body for a whole answer (after `read`), with `extra` members added."""
        if self._surface is None or self._parsed is None:
            if self._answer is not None:
                return self._answer.render(extra)
            return openai.inject_members(body, extra)
        return self._surface.render_response(self._parsed, usage, self.model, extra, **self._echoes())

    @property
    def parsed(self) -> ChatResponse | None:
        """A translated whole answer in neutral form, once `read` (None for a native one)."""
        return self._parsed

    def _echoes(self) -> dict[str, Any]:
        return {"echo": self._echo} if self._echo else {}  # only the Responses surface takes an echo

    def error(self, status: int, body: bytes) -> GatewayError | None:
        """A provider's error answer as the client's error; None to forward it as it came (native)."""
        if self._provider is None or self._surface is None:
            return self._answer.error(status, body) if self._answer is not None else None
        return self._provider.parse_error(status, body)

    @property
    def dialect(self) -> str:
        return self._surface.dialect if self._surface is not None else ""


def plan(
    surface: str,
    kind: str,
    body: bytes,
    view: openai.RequestView,
    upstream_model: str,
    public_model: str,
    stream: bool,
    drop_params: bool,
    headers: Mapping[str, str],
    strict_params: bool = False,
) -> Exchange:
    """The exchange for a request on `surface` to a provider of `kind` (GatewayError 400 when the body
    cannot be translated, or asks for what the provider cannot honour)."""
    if surface in NATIVE.get(kind, ()):
        chat_usage = surface == "openai.chat"  # only Chat Completions streams need usage asked for
        upstream_body, wants_usage = openai.build_request(body, view, upstream_model, stream and chat_usage)
        forwarded = {name: headers[name] for name in _FORWARDED_HEADERS.get(surface, ()) if name in headers}
        path = _NATIVE_PATHS[surface]
        exchange = Exchange(
            surface, UpstreamRequest(path=path, body=upstream_body, headers=forwarded), public_model, wants_usage
        )
        if surface in _MEDIA:
            exchange.raw = surface in media.RAW
            if surface == media.SPEECH:
                exchange.usage = media.speech_usage(view.input)
        return exchange
    translate = MEDIA_TRANSLATORS.get((surface, kind))
    if translate is not None:
        upstream, answer = translate(body, upstream_model, stream, drop_params)
        return Exchange(surface, upstream, public_model, False, answer=answer)
    translator = SURFACES.get(surface)
    provider = PROVIDERS.get(kind)
    if translator is None or provider is None:
        raise GatewayError(
            Code.model_not_supported,
            f"The model {public_model!r} is served by a {kind} provider, which cannot answer {surface} requests.",
            param="model",
        )
    request = translator.decode_request(body, drop_params)
    wants_usage = bool(view.usage) or bool(request.stream_options and request.stream_options.include_usage)
    upstream = provider.build_request(request, upstream_model, stream, drop_params, strict_params)
    exchange = Exchange(surface, upstream, public_model, wants_usage, provider, translator)
    if surface == "openai.responses":
        exchange._echo = responses.request_echo(body)
    return exchange


def form_type(boundary: str) -> str:
    """The Content-Type of a multipart form re-emitted under the client's `boundary`."""
    if not _TOKEN.fullmatch(boundary):  # RFC 2046 allows spaces and separators in a quoted boundary
        boundary = f'"{boundary}"'
    return f"multipart/form-data; boundary={boundary}"


def upload_exchange(surface: str, upload: Upload, boundary: str, public_model: str) -> Exchange:
    """The exchange for a multipart upload to an OpenAI-kind provider: the form streams from the client."""
    headers = {"Content-Type": form_type(boundary)}
    exchange = Exchange(
        surface, UpstreamRequest(path=_NATIVE_PATHS[surface], body=b"", headers=headers), public_model, False
    )
    exchange.raw = surface in media.RAW
    exchange.upload = upload
    return exchange
