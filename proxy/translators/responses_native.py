"""The OpenAI Responses API relayed natively, to OpenAI itself: usage read from the body, the stream
forwarded as it comes with its terminal event held so meta can ride in it.

The wire facts are listed in `proxy.translators.responses`.
"""

from __future__ import annotations

from typing import Final, final

import msgspec
from msgspec import Raw

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.sse import EventBuffer, data_event, event_data, split_events
from proxy.translators.openai import closing_members, inject_members
from proxy.translators.responses import error_event

_members_decoder = msgspec.json.Decoder(dict[str, Raw])
_encoder = msgspec.json.Encoder()


class _InputDetails(msgspec.Struct):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None


class _OutputDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class ResponsesUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    input_tokens_details: _InputDetails | None = None
    output_tokens_details: _OutputDetails | None = None

    def neutral(self) -> Usage:
        inp = self.input_tokens or 0
        out = self.output_tokens or 0
        details = self.input_tokens_details
        return Usage(
            input_tokens=inp,
            output_tokens=out,
            total_tokens=self.total_tokens or inp + out,
            cached_input_tokens=(details.cached_tokens or 0) if details else 0,
            cache_write_tokens=(details.cache_write_tokens or 0) if details else 0,
            reasoning_tokens=((self.output_tokens_details.reasoning_tokens or 0) if self.output_tokens_details else 0),
        )


class _ErrorView(msgspec.Struct):
    code: str | None = None
    message: str = ""
    param: str | None = None


class _ResponseView(msgspec.Struct):
    id: str = ""
    usage: ResponsesUsage | None = None
    error: _ErrorView | None = None


class _TerminalView(msgspec.Struct):
    response: _ResponseView | None = None


class _TypeView(msgspec.Struct):
    type: str = ""


_response_decoder = msgspec.json.Decoder(_ResponseView)
_terminal_decoder = msgspec.json.Decoder(_TerminalView)
_error_decoder = msgspec.json.Decoder(_ErrorView)
_type_decoder = msgspec.json.Decoder(_TypeView)


def response_usage(body: bytes) -> tuple[Usage | None, str]:
    """(usage, response id) from a Responses JSON body; GatewayError(502) when it is not a JSON object."""
    try:
        view = _response_decoder.decode(body)
    except RecursionError:
        raise GatewayError(Code.upstream_bad_response, "The provider answered JSON nested too deeply.") from None
    except msgspec.DecodeError as e:
        raise GatewayError(
            Code.upstream_bad_response, f"The provider answered with a body that is not a Responses object: {e}"
        ) from None
    return (view.usage.neutral() if view.usage else None), view.id


_COMPLETED: Final = b"response.completed"
_INCOMPLETE_EVENT: Final = b"response.incomplete"
_FAILED: Final = b"response.failed"
_ERROR: Final = b"error"
_TOKEN_EVENTS: Final = frozenset(
    {
        b"response.output_text.delta",
        b"response.function_call_arguments.delta",
        b"response.reasoning_summary_text.delta",
        b"response.reasoning_text.delta",
        b"response.refusal.delta",
    }
)
_CREATED: Final = b"response.created"
# The event types the relay reads (first token, id, failure, end); all others are only forwarded.
_WATCHED: Final = _TOKEN_EVENTS | {_CREATED, _ERROR, _COMPLETED, _INCOMPLETE_EVENT, _FAILED}


def _event_type(event: bytes) -> bytes:
    """The event's type from its `event:` line (OpenAI always sends one), else from its data."""
    if event.startswith(b"event:"):
        return event[6 : event.find(b"\n")].strip()
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip()
    data = event_data(event)
    if data is None:
        return b""
    try:
        return _type_decoder.decode(data).type.encode()
    except (msgspec.DecodeError, RecursionError):
        return b""


def _upstream_failure(error: _ErrorView | None) -> GatewayError:
    if error is None:
        return GatewayError(Code.upstream_error, "The provider reported that the response failed.")
    return GatewayError(
        Code.upstream_error,
        error.message or "The provider reported that the response failed.",
        param=error.param,
        type=error.code or "",
    )


def _last_sequence_number(block: bytes) -> int:
    i = block.rfind(b'"sequence_number":')
    if i < 0:
        return -1
    digits = block[i + 18 : i + 40].lstrip()
    end = 0
    while end < len(digits) and digits[end : end + 1].isdigit():
        end += 1
    return int(digits[:end]) if end else -1


@final
class ResponsesPassthrough:
    """One native Responses stream's state: upstream bytes are forwarded as they come, except the
    `response.completed` / `response.incomplete` event, held so that `finish` can add cost and meta to
    its `response`. Only terminal and `error` events are decoded."""

    __slots__ = (
        "_buffer",
        "_held",
        "_held_type",
        "_last",
        "done",
        "events",
        "failure",
        "first_token",
        "id",
        "usage",
        "wants_meta",
    )

    def __init__(self, wants_meta: bool):
        self._buffer = EventBuffer()
        self._held: bytes | None = None
        self._held_type = b""
        self._last = b""  # the last block forwarded: where the next sequence number is read from
        self.wants_meta = wants_meta
        self.done = False
        self.first_token = False
        self.failure: GatewayError | None = None
        self.events = 0
        self.usage: Usage | None = None
        self.id = ""

    def feed(self, chunk: bytes) -> bytes:
        complete = self._buffer.feed(chunk)
        if not complete or self.done:
            return b""
        # One event per chunk is the usual case (LF framing: a JSON payload holds no raw newline).
        one = complete.find(b"\n\n") == len(complete) - 2
        events = (complete,) if one else split_events(complete)  # their concatenation is `complete`
        self.events += len(events)
        for i, event in enumerate(events):
            kind = _event_type(event)
            if kind not in _WATCHED:
                continue  # the common case: nothing to read, the bytes go as they came
            if kind in _TOKEN_EVENTS:
                self.first_token = True
            elif kind == _ERROR:
                data = event_data(event) or b""
                try:
                    self.failure = _upstream_failure(_error_decoder.decode(data))
                except (msgspec.DecodeError, RecursionError):
                    self.failure = _upstream_failure(None)
            elif kind == _CREATED:
                self.id = self.id or _created_id(event)
            else:  # the terminal event: the stream ends here
                self._terminal(kind, event)
                complete = b"".join(events[: i + 1] if kind == _FAILED else events[:i])
                break
        if complete:
            self._last = complete
        return complete

    def _terminal(self, kind: bytes, event: bytes) -> None:
        self.done = True
        data = event_data(event) or b""
        try:
            response = _terminal_decoder.decode(data).response
        except (msgspec.DecodeError, RecursionError):
            response = None
        if response is not None:
            self.id = response.id or self.id
            if response.usage is not None:
                self.usage = response.usage.neutral()
        if kind == _FAILED:
            self.failure = _upstream_failure(response.error if response else None)
        else:
            self._held, self._held_type = event, kind

    @property
    def truncated(self) -> bool:
        """The upstream ended without a terminal event."""
        return not self.done

    def abort(self) -> bytes:
        return b""

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return error_event(err, _last_sequence_number(self._last) + 1)

    def finish(self, meta: bytes | None, cost: bytes = b"", extra: bytes = b"") -> bytes:
        """The held terminal event, its `response` carrying the `cost` and `extra` members and `"meta":` + meta."""
        held = self._held
        if held is None:
            return b""
        members = closing_members(cost, extra, meta)
        if not members:
            return held
        data = event_data(held)
        if data is None:
            return held
        top = _members_decoder.decode(data)
        response = top.get("response")
        if response is None:
            return held
        top["response"] = Raw(inject_members(bytes(response), members))
        patched = _encoder.encode(top)
        if data in held:
            return held.replace(data, patched, 1)
        return b"event: " + self._held_type + b"\n" + data_event(patched)


def _created_id(event: bytes) -> str:
    """The response id of a `response.created` event, by a byte search (its `response` leads with `id`)."""
    i = event.find(b'"id":')
    if i < 0:
        return ""
    start = event.find(b'"', i + 5)
    if start < 0 or event[i + 5 : start].strip():  # not a string (null)
        return ""
    end = event.find(b'"', start + 1)
    return event[start + 1 : end].decode("utf-8", "replace") if end > start else ""
