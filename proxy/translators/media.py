"""Media surfaces (images, audio, rerank, OCR) → OpenAI-kind providers: usage read from the answers.

Requests and answers pass through as bytes, as for chat (`openai.build_request` splices `model` into JSON
bodies; multipart uploads are re-emitted by `proxy.surfaces.media`). What this module adds is pure: each
answer's usage in the gateway's units, the characters a speech request bills, an event-stream relay for
streamed transcriptions and image generations that notices usage on the way, and the part heads of a
re-emitted multipart form. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, final

import msgspec
from msgspec import UNSET, Raw, UnsetType

from proxy.errors import Code, GatewayError, sse_error_event
from proxy.meta import Usage
from proxy.sse import EventBuffer, data_event, event_data, split_events
from proxy.translators.openai import closing_members

SPEECH: Final = "openai.audio.speech"
TRANSCRIPTIONS: Final = "openai.audio.transcriptions"
TRANSLATIONS: Final = "openai.audio.translations"
IMAGES: Final = "openai.images.generations"
IMAGE_EDITS: Final = "openai.images.edits"
RERANK: Final = "rerank"
OCR: Final = "ocr"

# Where each surface goes at an OpenAI-kind provider (appended to its base_url).
PATHS: Final[dict[str, str]] = {
    SPEECH: "/audio/speech",
    TRANSCRIPTIONS: "/audio/transcriptions",
    TRANSLATIONS: "/audio/translations",
    IMAGES: "/images/generations",
    IMAGE_EDITS: "/images/edits",
    RERANK: "/rerank",
    OCR: "/ocr",
}
# Surfaces whose successful answer may be other than JSON (audio, text, SRT, VTT): relayed as bytes.
RAW: Final = frozenset({SPEECH, TRANSCRIPTIONS, TRANSLATIONS})


def _decode(decoder: msgspec.json.Decoder, body: bytes):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(body)
    except RecursionError:
        raise GatewayError(Code.upstream_bad_response, "The provider answered JSON nested too deeply.") from None
    except msgspec.DecodeError as e:
        raise GatewayError(
            Code.upstream_bad_response, f"The provider answered with a body that is not valid JSON: {e}"
        ) from None


def _count(value: float | None) -> int:
    return 0 if value is None else round(value)


# ---------------------------------------------------------------------------------------------------------
# usage of whole answers: (usage, the provider's id)


class _Tokens(msgspec.Struct):
    """Token and duration usage as OpenAI's media APIs report it: images (gpt-image-1) and transcriptions
    (`{"type": "tokens", …}` or `{"type": "duration", "seconds": …}`)."""

    type: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    seconds: float | None = None

    def into(self, usage: Usage) -> None:
        prompt, completion = self.input_tokens or 0, self.output_tokens or 0
        usage.input_tokens += prompt
        usage.output_tokens += completion
        usage.total_tokens += self.total_tokens or prompt + completion
        if self.seconds is not None:
            usage.audio_seconds += self.seconds


class _Images(msgspec.Struct):
    data: list[Raw] | None = None
    usage: _Tokens | None = None


def images_usage(body: bytes) -> tuple[Usage | None, str]:
    """Images generated or edited: `len(data)`, and the tokens gpt-image-1 reports."""
    view: _Images = _decode(_images, body)
    usage = Usage(images=len(view.data or ()))
    if view.usage is not None:
        view.usage.into(usage)
    return usage, ""


class _Transcript(msgspec.Struct):
    usage: _Tokens | None = None
    duration: float | None = None  # verbose_json


def transcript_usage(body: bytes) -> tuple[Usage | None, str]:
    """A JSON transcription or translation: its `usage` (tokens, or seconds of audio), else the
    `duration` of a verbose_json answer, else none."""
    view: _Transcript = _decode(_transcript, body)
    if view.usage is not None:
        usage = Usage()
        view.usage.into(usage)
        if not usage.audio_seconds and view.duration:
            usage.audio_seconds = view.duration
        return usage, ""
    if view.duration is not None:
        return Usage(audio_seconds=view.duration), ""
    return None, ""


class _BilledUnits(msgspec.Struct):
    search_units: float | None = None


class _RerankMeta(msgspec.Struct):
    billed_units: _BilledUnits | None = None


class _RerankUsage(msgspec.Struct):
    search_units: float | None = None
    total_tokens: int | None = None
    prompt_tokens: int | None = None


class _Rerank(msgspec.Struct):
    id: str = ""
    meta: _RerankMeta | None = None  # Cohere: {"billed_units": {"search_units": 1}}
    usage: _RerankUsage | None = None  # others: {"total_tokens": …} or {"search_units": …}


def rerank_usage(body: bytes) -> tuple[Usage | None, str]:
    """One search, or the search units the provider billed; the tokens it reports, if any."""
    view: _Rerank = _decode(_rerank, body)
    billed = view.meta.billed_units if view.meta is not None else None
    searches = billed.search_units if billed is not None else None
    tokens = 0
    if view.usage is not None:
        if searches is None:
            searches = view.usage.search_units
        tokens = view.usage.total_tokens or view.usage.prompt_tokens or 0
    count = 1 if searches is None else _count(searches)
    return Usage(searches=count, input_tokens=tokens, total_tokens=tokens), view.id


class _OcrUsage(msgspec.Struct):
    pages_processed: int | None = None


class _Ocr(msgspec.Struct):
    id: str = ""
    pages: list[Raw] | None = None
    usage_info: _OcrUsage | None = None  # Mistral: {"pages_processed": 3, "doc_size_bytes": …}


def ocr_usage(body: bytes) -> tuple[Usage | None, str]:
    """Pages read: `usage_info.pages_processed`, else `len(pages)`."""
    view: _Ocr = _decode(_ocr, body)
    processed = view.usage_info.pages_processed if view.usage_info is not None else None
    return Usage(pages=len(view.pages or ()) if processed is None else processed), view.id


_images = msgspec.json.Decoder(_Images)
_transcript = msgspec.json.Decoder(_Transcript)
_rerank = msgspec.json.Decoder(_Rerank)
_ocr = msgspec.json.Decoder(_Ocr)

READERS: Final[dict[str, Callable[[bytes], tuple[Usage | None, str]]]] = {
    IMAGES: images_usage,
    IMAGE_EDITS: images_usage,
    TRANSCRIPTIONS: transcript_usage,
    TRANSLATIONS: transcript_usage,
    RERANK: rerank_usage,
    OCR: ocr_usage,
}

_text = msgspec.json.Decoder(str)


def speech_usage(text: Raw | UnsetType) -> Usage:
    """The characters a speech request asks to be spoken (its `input`); GatewayError(400) unless a string."""
    if text is UNSET:
        raise GatewayError(Code.invalid_request, "Missing required field `input`.", param="input")
    try:
        return Usage(characters=len(_text.decode(text)))
    except msgspec.DecodeError:
        raise GatewayError(
            Code.invalid_request, "`input` must be a string: the text to speak.", param="input"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# event streams


class _Event(msgspec.Struct):
    type: str = ""
    usage: _Tokens | None = None
    message: str = ""  # an `error` event's


_event = msgspec.json.Decoder(_Event)
# The events that end a media stream: a transcription's text, or one image of a generation or an edit.
_FINAL_SUFFIXES = (".done", ".completed")
_INTERESTING = (b'"usage"', b".done", b".completed", b'"error"')


@final
class EventRelay:
    """A media event stream (a streamed transcription, image generation or image edit), relayed as it
    arrives: each chunk is sent on at once, and the events are framed beside it only to read the usage
    that `transcript.text.done` and `image_generation.completed` (one per image) carry. Implements
    `exchange.Relay`; the stream is read to its end (`done` stays False)."""

    __slots__ = ("_buffer", "completed", "done", "events", "failure", "first_token", "id", "usage", "wants_meta")

    def __init__(self, wants_meta: bool):
        self._buffer = EventBuffer()
        self.wants_meta = wants_meta
        self.done = False
        self.first_token = False
        self.completed = False  # a final event arrived: the stream ended as the provider meant it to
        self.events = 0
        self.usage: Usage | None = None
        self.id = ""
        self.failure: GatewayError | None = None

    def feed(self, chunk: bytes) -> bytes:
        complete = self._buffer.feed(chunk)
        if complete:
            for event in split_events(complete):
                self._observe(event)
        return chunk

    def _observe(self, event: bytes) -> None:
        data = event_data(event)
        if not data or data[:1] != b"{":
            return
        self.events += 1
        self.first_token = True
        if not any(mark in data for mark in _INTERESTING):
            return  # deltas and partial images: nothing to read
        try:
            view = _event.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return  # not ours to judge: it was forwarded as it came
        if view.type == "error":
            self.failure = GatewayError(Code.upstream_error, view.message or "The provider sent an error event.")
            return
        final = view.type.endswith(_FINAL_SUFFIXES)
        if not final and view.usage is None:
            return
        usage = self.usage = self.usage or Usage()
        if final:
            self.completed = True
            if view.type.startswith("image_"):
                usage.images += 1
        if view.usage is not None:
            view.usage.into(usage)

    @property
    def truncated(self) -> bool:
        """The stream ended before its final event."""
        return not self.completed

    def abort(self) -> bytes:
        return b""

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return sse_error_event(err, request_id)

    def finish(self, meta: bytes | None, cost: bytes = b"", extra: bytes = b"") -> bytes:
        """One closing `gateway.meta` event with cost and meta, when meta (or an echo) was asked for."""
        if meta is None and not extra:
            return b""
        return data_event(b'{"type":"gateway.meta",' + closing_members(cost, extra, meta) + b"}")


# ---------------------------------------------------------------------------------------------------------
# multipart forms


def part_head(boundary: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    """The delimiter and header lines that open one part of a multipart body."""
    lines = [b"--" + boundary]
    lines += [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def closing(boundary: bytes) -> bytes:
    """The delimiter that ends a multipart body."""
    return b"--" + boundary + b"--\r\n"
