"""OpenAI surfaces → OpenAI-compatible providers: a pass-through.

The request body stays bytes: when it already names the upstream model and carries no gateway-only
field, it is forwarded untouched; otherwise only its top-level members are spliced (nested values are
copied as raw bytes, never re-encoded). Responses are forwarded as they came; usage is read from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar, final

import msgspec
from msgspec import UNSET, Raw, UnsetType

from proxy.errors import Code, GatewayError, sse_error_event
from proxy.meta import Usage
from proxy.sse import EventBuffer, data_event, event_data, split_events

# Request members the gateway consumes; never forwarded upstream (see the reference digest).
GATEWAY_FIELDS: Final = (
    "meta",
    "usage",
    "provider",
    "provider_options",
    "debug",
    "echo_upstream_request",
    "session_id",
)

DONE: Final = b"data: [DONE]\n\n"
T = TypeVar("T")


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class RequestView(msgspec.Struct):
    """The members of an OpenAI-surface request that the gateway reads; the rest stay bytes."""

    model: str | UnsetType = UNSET
    stream: bool = False
    stream_options: _StreamOptions | None = None
    messages: Raw | UnsetType = UNSET
    input: Raw | UnsetType = UNSET
    # the output bound of any surface (Chat, Responses, Messages), for credit holds and token limits; kept raw:
    # a wrong type is the provider's to refuse, as before
    max_tokens: Raw | UnsetType = UNSET
    max_completion_tokens: Raw | UnsetType = UNSET
    max_output_tokens: Raw | UnsetType = UNSET
    temperature: Raw | UnsetType = UNSET  # for traces (gen_ai.request.*)
    top_p: Raw | UnsetType = UNSET
    # gateway-only
    meta: bool | UnsetType | None = UNSET
    usage: bool | UnsetType | None = UNSET
    provider: Raw | UnsetType = UNSET
    provider_options: Raw | UnsetType = UNSET
    debug: Raw | UnsetType = UNSET
    echo_upstream_request: Raw | UnsetType = UNSET
    session_id: Raw | UnsetType = UNSET

    def output_bound(self) -> int | None:
        """The request's `max_completion_tokens`, `max_tokens` or `max_output_tokens`, when one is a number."""
        for raw in (self.max_completion_tokens, self.max_tokens, self.max_output_tokens):
            if raw is not UNSET:
                text = bytes(raw)
                if text.isdigit():
                    return int(text)
        return None

    def has_gateway_fields(self) -> bool:
        return any(getattr(self, name) is not UNSET for name in GATEWAY_FIELDS)


_view_decoder = msgspec.json.Decoder(RequestView)
_members_decoder = msgspec.json.Decoder(dict[str, Raw])
_encoder = msgspec.json.Encoder()


def invalid_member(text: str) -> GatewayError:
    """A msgspec validation message (`… - at $.a.b`) → the 400 naming the member (`param`: `a.b`)."""
    message, _, where = text.partition(" - at ")
    param = where.strip("`").removeprefix("$.") or None
    return GatewayError(
        Code.invalid_request, f"Invalid request: {message}" + (f" at {param}" if param else ""), param=param
    )


def decode_body(
    decode: Callable[[bytes], T], body: bytes, invalid: Callable[[str], GatewayError] = invalid_member
) -> T:
    """`decode(body)` for a client's request body, its failures as the gateway's 400s: an empty body, JSON
    that does not parse or nests too deeply (`invalid_json`), a member of the wrong shape (`invalid(text)`)."""
    if not body:
        raise GatewayError(Code.invalid_json, "The request body is empty; expected a JSON object.")
    try:
        return decode(body)
    except msgspec.ValidationError as e:
        raise invalid(str(e)) from None
    except msgspec.DecodeError as e:
        raise GatewayError(Code.invalid_json, f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise GatewayError(Code.invalid_json, "The request body nests JSON values too deeply.") from None


def decode_request(body: bytes) -> RequestView:
    """The view of a request body; GatewayError(400) naming what is wrong."""
    return decode_body(_view_decoder.decode, body)


def closing_members(cost: bytes, extra: bytes, meta: bytes | None) -> bytes:
    """The members a stream's final event carries: cost (b"" when not shown), extra members, then meta."""
    parts = [part for part in (cost, extra) if part]
    if meta is not None:
        parts.append(b'"meta":' + meta)
    return b",".join(parts)


def patch_members(body: bytes, set_members: dict[str, bytes], drop: tuple[str, ...] = ()) -> bytes:
    """`body` (a JSON object) with top-level members replaced, added or removed; the rest copied as bytes."""
    return _patch(_members_decoder.decode(body), set_members, drop)


def _patch(members: dict[str, Raw], set_members: dict[str, bytes], drop: tuple[str, ...]) -> bytes:
    for name in drop:
        members.pop(name, None)
    for name, value in set_members.items():
        members[name] = Raw(value)
    return _encoder.encode(members)


def inject_members(body: bytes, members: bytes) -> bytes:
    """Append `members` (`"a":1,"b":2`) to a JSON object without decoding it."""
    end = body.rstrip()
    if not end.endswith(b"}") or not members:
        return body
    head = end[:-1].rstrip()
    sep = b"" if head.endswith(b"{") else b","
    return head + sep + members + b"}"


def inject_member(body: bytes, name: str, value: bytes) -> bytes:
    """Add `"name": value` at the end of a JSON object without decoding it."""
    return inject_members(body, b'"' + name.encode() + b'":' + value)


def build_request(body: bytes, view: RequestView, upstream_model: str, streaming_surface: bool) -> tuple[bytes, bool]:
    """(the upstream body, whether the client asked for usage in its stream)."""
    set_members: dict[str, bytes] = {}
    if view.model is UNSET or view.model != upstream_model:
        set_members["model"] = _encoder.encode(upstream_model)
    wants_usage = bool(view.usage)
    ask_usage = False  # metering needs usage: ask for it even when the client did not (and withhold it)
    if streaming_surface and view.stream:
        if view.stream_options is not None and view.stream_options.include_usage:
            wants_usage = True
        else:
            ask_usage = True
    if not set_members and not ask_usage and not view.has_gateway_fields():
        return body, wants_usage
    members = _members_decoder.decode(body)
    if ask_usage:
        options = members.get("stream_options")
        merged = _members_decoder.decode(options) if options is not None and bytes(options)[:1] == b"{" else {}
        merged["include_usage"] = Raw(b"true")
        set_members["stream_options"] = _encoder.encode(merged)
    return _patch(members, set_members, GATEWAY_FIELDS), wants_usage


# ---------------------------------------------------------------------------------------------------------
# usage


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class OpenAIUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def neutral(self) -> Usage:
        prompt = self.prompt_tokens or 0
        completion = self.completion_tokens or 0
        return Usage(
            input_tokens=prompt,
            output_tokens=completion,
            total_tokens=self.total_tokens or prompt + completion,
            cached_input_tokens=(self.prompt_tokens_details.cached_tokens or 0) if self.prompt_tokens_details else 0,
            reasoning_tokens=(
                (self.completion_tokens_details.reasoning_tokens or 0) if self.completion_tokens_details else 0
            ),
        )


class _ResponseView(msgspec.Struct):
    id: str = ""
    usage: OpenAIUsage | None = None


_response_decoder = msgspec.json.Decoder(_ResponseView)


class _Finish(msgspec.Struct, gc=False):
    finish_reason: str | None = None


class _TracedResponseView(msgspec.Struct):
    """`_ResponseView` and the choices' finish reasons, for a traced request's span (read in the same pass)."""

    id: str = ""
    usage: OpenAIUsage | None = None
    choices: list[_Finish] = []


_traced_response_decoder = msgspec.json.Decoder(_TracedResponseView)


def traced_response_view(body: bytes) -> tuple[Usage | None, str, tuple[str, ...] | None]:
    """`response_view`, and the finish reasons of the answer's choices (None when they are not where and what
    the API says: the caller reads them another way)."""
    try:
        view = _traced_response_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return (*response_view(body), None)
    choices = view.choices
    if len(choices) == 1:  # the common answer
        reason = choices[0].finish_reason
        reasons: tuple[str, ...] = (reason,) if reason is not None else ()
    else:
        reasons = tuple([choice.finish_reason for choice in choices if choice.finish_reason is not None])
    return (view.usage.neutral() if view.usage else None), view.id, reasons


def response_view(body: bytes) -> tuple[Usage | None, str]:
    """(usage, the provider's response id) from a JSON body; GatewayError(502) when it is not a JSON object."""
    try:
        view = _response_decoder.decode(body)
    except RecursionError:
        raise GatewayError(Code.upstream_bad_response, "The provider answered JSON nested too deeply.") from None
    except msgspec.DecodeError as e:
        raise GatewayError(
            Code.upstream_bad_response, f"The provider answered with a body that is not valid JSON: {e}"
        ) from None
    return (view.usage.neutral() if view.usage else None), view.id


# ---------------------------------------------------------------------------------------------------------
# streams


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    # Raw, not `Raw | None`: msgspec reads that union as "null only" and rejects a real tool call.
    tool_calls: Raw | UnsetType = UNSET
    function_call: Raw | UnsetType = UNSET


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _ChunkView(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[_Choice] | None = None
    usage: OpenAIUsage | None = None


_chunk_decoder = msgspec.json.Decoder(_ChunkView)


def _may_carry_usage(data: bytes) -> bool:
    return b'"usage":{' in data or b'"usage": {' in data


_EMPTY = (b"null", b"[]", b"{}")


def _has_token(chunk: _ChunkView) -> bool:
    for choice in chunk.choices or ():
        d = choice.delta
        if d is None:
            continue
        if d.content or d.reasoning_content or d.refusal:
            return True
        for call in (d.tool_calls, d.function_call):
            if call is not UNSET and bytes(call) not in _EMPTY:
                return True
    return False


@final
class ChatStream:
    """One chat stream's state. `feed` takes upstream bytes and returns what to send the client now."""

    __slots__ = (
        "_buffer",
        "_held",
        "created",
        "done",
        "events",
        "failure",
        "first_token",
        "id",
        "model",
        "usage",
        "wants_meta",
        "wants_usage",
    )

    def __init__(self, wants_usage: bool, wants_meta: bool):
        self._buffer = EventBuffer()
        self._held: bytes | None = None  # the usage chunk, kept to carry meta
        self.wants_usage = wants_usage
        self.wants_meta = wants_meta
        self.first_token = False
        self.done = False
        self.failure: GatewayError | None = None  # an upstream error event is forwarded as it came
        self.events = 0  # data events received: the basis of an estimate when no usage comes
        self.usage: Usage | None = None
        self.id = ""
        self.created = 0
        self.model = ""

    def feed(self, chunk: bytes) -> bytes:
        complete = self._buffer.feed(chunk)
        if not complete or self.done:
            return b""
        self.events += complete.count(b"data:")
        if self.first_token and b"[DONE]" not in complete and not _may_carry_usage(complete):
            return complete  # the common case: forward as it came
        out = []
        for event in split_events(complete):
            data = event_data(event)
            if data is None:
                out.append(event)
                continue
            if data.strip() == b"[DONE]":
                self.done = True
                break
            out.append(self._on_data(event, data))
        return b"".join(out)

    def _on_data(self, event: bytes, data: bytes) -> bytes:
        carries_usage = _may_carry_usage(data)
        if self.first_token and not carries_usage:
            return event
        try:
            chunk = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return event  # not ours to judge: forward it
        if not self.first_token:
            if not self.id:
                self.id, self.created, self.model = chunk.id, chunk.created, chunk.model
            self.first_token = _has_token(chunk)
        if chunk.usage is None:
            return event
        self.usage = chunk.usage.neutral()
        if chunk.choices:  # usage riding on a content chunk (some compatible servers)
            return event if self.wants_usage else data_event(patch_members(data, {}, ("usage",)))
        if self.wants_meta or self.wants_usage:  # kept to carry cost and meta, sent just before [DONE]
            self._held = data if self.wants_usage else patch_members(data, {}, ("usage",))
        return b""

    @property
    def truncated(self) -> bool:
        """The upstream ended without `[DONE]`."""
        return not self.done

    def abort(self) -> bytes:
        """What to send before an error event ends the stream: the usage chunk, when asked for and held."""
        held, self._held = self._held, None
        return data_event(held) if held is not None and self.wants_usage else b""

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return sse_error_event(err, request_id)

    def finish(self, meta: bytes | None, cost: bytes = b"", extra: bytes = b"") -> bytes:
        """The closing bytes: the final chunk when asked for, then `[DONE]`.

        The final chunk is the usage chunk (when the client asked for usage) carrying `cost` (the
        `"cost_nanos":…,"currency":…,"pricing_lines":[…]` members), `extra` members and `meta`; or, without
        usage, a chunk with `choices: []` carrying `extra` and `meta` alone.
        """
        members = closing_members(cost if self.wants_usage else b"", extra, meta)
        if self._held is not None:
            return data_event(inject_members(self._held, members)) + DONE
        if not members:
            return DONE
        head = _encoder.encode(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
            }
        )
        return data_event(inject_members(head, members)) + DONE
