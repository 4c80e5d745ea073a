"""Whole answers ⇄ the neutral form, for the response cache: a cached answer is kept as (ChatResponse, Usage) so
that a streamed request can be answered from an answer first produced whole, and the other way round, on the
same surface.

- `answer_of(surface, body)`: an answer as the surface's client got it (JSON) → neutral;
- `stream_answer(surface, events)`: a stream as the client got it (SSE) → neutral, None when it did not finish;
- `replay(surface, ...)`: neutral → the client's answer, whole or streamed, through the surface's own
  `render_response` / `writer` (so a replay is what a translated answer looks like);
- `accumulate` and `chunks_of`: a stream's chunks → a whole answer, and back.

The Responses decoder lives here (the surface renders answers but never had to read one). What the neutral form
does not carry is lost on a replay (logprobs, annotations, thinking signatures, encrypted reasoning, built-in tool
items, which stop sequence matched, …). Pure: no I/O.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from msgspec import UNSET, Raw, UnsetType

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.sse import EventBuffer, SSEError, event_data, split_events
from proxy.translators import anthropic, chat
from proxy.translators.exchange import SURFACES
from proxy.translators.neutral import (
    ChatChunk,
    ChatResponse,
    Choice,
    ChunkChoice,
    ContentPart,
    Delta,
    FunctionCall,
    FunctionDelta,
    Message,
    StreamReader,
    ToolCall,
    ToolCallDelta,
)
from proxy.translators.responses_native import ResponsesUsage

__all__ = ["accumulate", "answer_of", "chunks_of", "replay", "stream_answer"]

CHAT: Final = "openai.chat"
MESSAGES: Final = "anthropic.messages"
RESPONSES: Final = "openai.responses"

# ---------------------------------------------------------------------------------------------------------
# streams → whole answers


@dataclass(slots=True)
class _Call:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Answer:
    """One choice being gathered from its deltas."""

    role: str = ""
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None


def _content(text: str, calls: bool, refusal: bool) -> str | None:
    """An assistant message's `content`: null beside tool calls or a refusal when there is no text (as OpenAI
    answers), else the text, even empty."""
    return text if text or not (calls or refusal) else None


def accumulate(chunks: Iterable[ChatChunk], id: str, model: str, created: int) -> ChatResponse:
    """Stream chunks → the whole answer: content, reasoning and refusal concatenated, tool calls gathered by index
    (the first id and name, the arguments concatenated), the first role, the last finish reason; one choice per
    `index`."""
    answers: dict[int, _Answer] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            answer = answers.get(choice.index)
            if answer is None:
                answer = answers[choice.index] = _Answer()
            delta = choice.delta
            if delta.role and not answer.role:
                answer.role = delta.role
            if delta.content:
                answer.content.append(delta.content)
            if delta.reasoning_content:
                answer.reasoning.append(delta.reasoning_content)
            if delta.refusal:
                answer.refusal.append(delta.refusal)
            for call in delta.tool_calls or ():
                gathered = answer.calls.get(call.index)
                if gathered is None:
                    gathered = answer.calls[call.index] = _Call()
                if call.id and not gathered.id:
                    gathered.id = call.id
                fn = call.function
                if fn is not None:
                    if fn.name and not gathered.name:  # some servers repeat the name on every delta
                        gathered.name = fn.name
                    if fn.arguments:
                        gathered.arguments.append(fn.arguments)
            if choice.finish_reason:
                answer.finish_reason = choice.finish_reason
    choices = []
    for index in sorted(answers):
        answer = answers[index]
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments="".join(c.arguments)))
            for _, c in sorted(answer.calls.items())
        ]
        refusal = "".join(answer.refusal)
        message = Message(
            role=answer.role or "assistant",
            content=_content("".join(answer.content), bool(calls), bool(refusal)),
            reasoning_content="".join(answer.reasoning) or None,
            refusal=refusal or None,
            tool_calls=calls or None,
        )
        choices.append(Choice(index=index, message=message, finish_reason=answer.finish_reason))
    return ChatResponse(id=id, created=created, model=model, choices=choices)


# ---------------------------------------------------------------------------------------------------------
# whole answers → streams

_ZWJ: Final = "\u200d"
_MARKS: Final = frozenset({"Mn", "Mc", "Me"})


def _regional(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _joined(text: str, cut: int) -> bool:
    """Whether a cut before `text[cut]` would split what a reader sees as one character: a surrogate pair, a
    base and its combining marks, variation selectors or skin tones, a ZWJ emoji sequence, a flag."""
    before, after = text[cut - 1], text[cut]
    if "\ud800" <= before <= "\udbff" or before == _ZWJ or after == _ZWJ:
        return True
    if "\ufe00" <= after <= "\ufe0f" or "\U0001f3fb" <= after <= "\U0001f3ff" or "\U000e0020" <= after <= "\U000e007f":
        return True
    if _regional(before) and _regional(after):
        run = cut - 1
        while run > 0 and _regional(text[run - 1]):
            run -= 1
        return (cut - run) % 2 == 1  # an odd run before the cut: `after` completes a flag
    return unicodedata.category(after) in _MARKS


def _pieces(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters: ending after a space or line break in the second half of the
    window when there is one, else at the window's end moved back to a character boundary."""
    out = []
    start, end = 0, len(text)
    while end - start > size:
        limit = start + size
        low = start + size // 2
        cut = max(text.rfind(" ", low, limit), text.rfind("\n", low, limit)) + 1
        if cut <= start:
            cut = next((c for c in range(limit, start, -1) if not _joined(text, c)), limit)
        out.append(text[start:cut])
        start = cut
    if start < end:
        out.append(text[start:])
    return out


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


def _chunk(response: ChatResponse, index: int, delta: Delta, finish: str | None = None) -> ChatChunk:
    choice = ChunkChoice(index=index, delta=delta, finish_reason=finish)
    return ChatChunk(id=response.id, created=response.created, model=response.model, choices=[choice])


def chunks_of(response: ChatResponse, piece: int = 48) -> list[ChatChunk]:
    """A whole answer → the chunks of a stream that carries it, per choice: a role chunk, reasoning, content and
    refusal in pieces of about `piece` characters, each tool call (its id, type and name, then its arguments in
    pieces), then a chunk with the finish reason (`stop` when the answer has none)."""
    size = max(piece, 1)
    out: list[ChatChunk] = []
    for choice in response.choices:
        message = choice.message
        text = _text_of(message.content)
        deltas = [Delta(role=message.role or "assistant", content="" if text else None)]
        deltas += [Delta(reasoning_content=part) for part in _pieces(message.reasoning_content or "", size)]
        deltas += [Delta(content=part) for part in _pieces(text, size)]
        deltas += [Delta(refusal=part) for part in _pieces(message.refusal or "", size)]
        for i, call in enumerate(message.tool_calls or ()):
            fn = call.function
            head = ToolCallDelta(
                index=i, id=call.id, type="function", function=FunctionDelta(name=fn.name, arguments="")
            )
            deltas.append(Delta(tool_calls=[head]))
            deltas += [
                Delta(tool_calls=[ToolCallDelta(index=i, function=FunctionDelta(arguments=part))])
                for part in _pieces(fn.arguments, size)
            ]
        out += [_chunk(response, choice.index, delta) for delta in deltas]
        out.append(_chunk(response, choice.index, Delta(), choice.finish_reason or "stop"))
    return out


# ---------------------------------------------------------------------------------------------------------
# the Responses API's `response` object → neutral (the inverse of `responses.render_response`)


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None


class _ItemType(msgspec.Struct):
    type: str = ""


class _MessageItem(msgspec.Struct):
    role: str = "assistant"
    content: list[_Part] = []


class _CallItem(msgspec.Struct):
    call_id: str = ""
    name: str = ""
    arguments: str = ""


class _ReasoningItem(msgspec.Struct):
    summary: list[_Part] = []
    content: list[_Part] | None = None  # reasoning_text parts, from models that show their reasoning


class _Incomplete(msgspec.Struct):
    reason: str | None = None


class _ResponseObject(msgspec.Struct):
    id: str
    output: list[Raw]  # items read by type below; other types (built-in tools' calls) are not kept
    created_at: int | float = 0
    model: str = ""
    status: str | None = None
    incomplete_details: _Incomplete | None = None
    usage: ResponsesUsage | None = None


class _EventView(msgspec.Struct):
    type: str = ""
    response: Raw | UnsetType = UNSET  # (not `Raw | None`: msgspec reads that union as "null only")


_response_decoder: Final = msgspec.json.Decoder(_ResponseObject)
_item_type_decoder: Final = msgspec.json.Decoder(_ItemType)
_message_decoder: Final = msgspec.json.Decoder(_MessageItem)
_call_decoder: Final = msgspec.json.Decoder(_CallItem)
_reasoning_decoder: Final = msgspec.json.Decoder(_ReasoningItem)
_event_decoder: Final = msgspec.json.Decoder(_EventView)

# `incomplete_details.reason` → finish reason (an incomplete response was cut short: `length` otherwise).
_INCOMPLETE: Final = {"max_output_tokens": "length", "content_filter": "content_filter"}
_FINISHED: Final = frozenset({None, "completed", "incomplete"})
_REASONING_JOIN: Final = "\n\n"  # OpenAI's summary parts are paragraphs, each under its own bold title


def _bad_response(what: str) -> GatewayError:
    return GatewayError(Code.upstream_bad_response, f"The answer is not a Responses API response: {what}.")


def _response_answer(body: bytes | Raw) -> tuple[ChatResponse, Usage | None]:
    try:
        response = _response_decoder.decode(body)
        text: list[str] = []
        refusal: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        for raw in response.output:
            kind = _item_type_decoder.decode(raw).type
            if kind == "message":
                for part in _message_decoder.decode(raw).content:
                    if part.type == "output_text":
                        text.append(part.text or "")
                    elif part.type == "refusal":
                        refusal.append(part.refusal or "")
            elif kind == "function_call":
                call = _call_decoder.decode(raw)
                calls.append(ToolCall(id=call.call_id, function=FunctionCall(name=call.name, arguments=call.arguments)))
            elif kind == "reasoning":
                item = _reasoning_decoder.decode(raw)
                parts = item.summary or item.content or ()
                reasoning.extend(part.text for part in parts if part.text)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad_response(str(e)) from None
    if response.status not in _FINISHED:
        raise _bad_response(f"its status is {response.status!r}, not a finished answer")
    if response.status == "incomplete":
        reason = response.incomplete_details.reason if response.incomplete_details else None
        finish = _INCOMPLETE.get(reason or "", "length")
    else:
        finish = "tool_calls" if calls else "stop"
    refused = "".join(refusal)
    message = Message(
        role="assistant",
        content=_content("".join(text), bool(calls), bool(refused)),
        reasoning_content=_REASONING_JOIN.join(reasoning) or None,
        refusal=refused or None,
        tool_calls=calls or None,
    )
    answer = ChatResponse(
        id=response.id,
        created=int(response.created_at),
        model=response.model,
        choices=[Choice(message=message, finish_reason=finish)],
    )
    return answer, response.usage.neutral() if response.usage is not None else None


# ---------------------------------------------------------------------------------------------------------
# Chat Completions: `chat.parse_response` and `ChatReader`, plus the cache writes the gateway renders


class _PromptDetails(msgspec.Struct):
    cache_write_tokens: int | None = None


class _ChatUsage(msgspec.Struct):
    prompt_tokens_details: _PromptDetails | None = None


class _ChatUsageView(msgspec.Struct):
    usage: _ChatUsage | None = None


_chat_usage_decoder: Final = msgspec.json.Decoder(_ChatUsageView)


def _with_cache_writes(usage: Usage | None, payload: bytes) -> Usage | None:
    """`usage` with the cache writes of the Chat Completions object `payload`.

    `chat.render_response` and `ChatWriter.finish` write `prompt_tokens_details.cache_write_tokens` (a translated
    Anthropic answer's cache writes), but `OpenAIUsage.neutral` does not read it back (nor `chat.parse_response`,
    nor `ChatReader`): read here until it does."""
    if usage is None or b'"cache_write_tokens"' not in payload:
        return usage
    try:
        view = _chat_usage_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return usage
    details = view.usage.prompt_tokens_details if view.usage is not None else None
    if details is None or not details.cache_write_tokens:
        return usage
    return msgspec.structs.replace(usage, cache_write_tokens=details.cache_write_tokens)


def _chat_answer(body: bytes) -> tuple[ChatResponse, Usage | None]:
    response, usage = chat.parse_response(body)
    return response, _with_cache_writes(usage, body)


def _last_usage_event(events: bytes) -> bytes:
    """The payload of the last `data:` line of a Chat Completions stream naming `"usage"` (its final chunk), or
    b"". A key is the only place those quoted bytes can be: in a string value its quotes are escaped."""
    at = events.rfind(b'"usage"')
    if at < 0:
        return b""
    start = events.rfind(b"\n", 0, at) + 1
    end = events.find(b"\n", at)
    line = events[start : end if end >= 0 else len(events)].rstrip(b"\r")
    return line[5:].lstrip(b" ") if line.startswith(b"data:") else b""


# ---------------------------------------------------------------------------------------------------------
# Anthropic Messages: `anthropic.parse_response`, once the body is known to be a message


class _MessageKind(msgspec.Struct):
    type: str = ""


_message_kind_decoder: Final = msgspec.json.Decoder(_MessageKind)


def _messages_answer(body: bytes) -> tuple[ChatResponse, Usage | None]:
    # `anthropic.parse_response` takes any JSON object (every member has a default): an error body or `{}`
    # would read as an empty answer.
    try:
        kind = _message_kind_decoder.decode(body).type
    except (msgspec.DecodeError, RecursionError) as e:
        raise GatewayError(Code.upstream_bad_response, f"The answer is not a Messages API message: {e}") from None
    if kind != "message":
        raise GatewayError(
            Code.upstream_bad_response, f"The answer is not a Messages API message: its type is {kind!r}."
        )
    return anthropic.parse_response(body)


# ---------------------------------------------------------------------------------------------------------
# the three functions the cache calls

_ANSWER_DECODERS: Final[dict[str, Callable[[bytes], tuple[ChatResponse, Usage | None]]]] = {
    CHAT: _chat_answer,
    MESSAGES: _messages_answer,
    RESPONSES: _response_answer,
}
# The provider readers that read each surface's stream (the gateway writes the wire format they read).
_STREAM_READERS: Final[dict[str, Callable[[], StreamReader]]] = {
    CHAT: chat.PROVIDER.reader,
    MESSAGES: anthropic.PROVIDER.reader,
}
# A Responses stream ends with one of these, whose `response` is the whole answer.
_RESPONSES_TERMINAL: Final = frozenset({"response.completed", "response.incomplete"})
_RESPONSES_FAILED: Final = frozenset({"response.failed", "error"})


def _unknown(surface: str) -> ValueError:
    return ValueError(f"no replay for the surface {surface!r} (expected one of {', '.join(_ANSWER_DECODERS)})")


def answer_of(surface: str, body: bytes) -> tuple[ChatResponse, Usage | None]:
    """A whole answer as the client of `surface` gets it (JSON; the gateway's extra top-level members such as
    cost and `meta` are ignored) → neutral. GatewayError(upstream_bad_response) when it is not one."""
    decode = _ANSWER_DECODERS.get(surface)
    if decode is None:
        raise _unknown(surface)
    return decode(body)


def stream_answer(surface: str, events: bytes) -> tuple[ChatResponse, Usage | None] | None:
    """A whole stream as the client of `surface` got it (SSE bytes) → the answer it carried; None when the stream
    did not finish (no `[DONE]`, `message_stop`, `response.completed` / `response.incomplete`), carried an error
    event, or is not valid SSE."""
    if surface == RESPONSES:
        return _responses_stream(events)
    reader_of = _STREAM_READERS.get(surface)
    if reader_of is None:
        raise _unknown(surface)
    reader = reader_of()
    try:
        chunks = reader.feed(events)
    except SSEError:
        return None
    if not reader.done or reader.failure is not None:
        return None
    usage = reader.usage
    if surface == CHAT and usage is not None:
        usage = _with_cache_writes(usage, _last_usage_event(events))
    return accumulate(chunks, reader.id, reader.model, reader.created), usage


def _responses_stream(events: bytes) -> tuple[ChatResponse, Usage | None] | None:
    try:
        complete = EventBuffer().feed(events)
    except SSEError:
        return None
    for raw in split_events(complete) if complete else ():
        data = event_data(raw)
        if data is None:
            continue
        try:
            event = _event_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            continue  # not an event this reads
        if event.type in _RESPONSES_FAILED:
            return None
        if event.type in _RESPONSES_TERMINAL:
            if event.response is UNSET:
                return None
            try:
                return _response_answer(event.response)
            except GatewayError:
                return None
    return None


def replay(
    surface: str,
    response: ChatResponse,
    usage: Usage | None,
    model: str,
    stream: bool,
    wants_usage: bool,
    extra: bytes,
    echo: dict[str, Any] | None = None,
) -> bytes:
    """The client's answer from a neutral one: the surface's JSON body (`stream=False`) or its whole SSE body.
    `model` is the public model id; `extra` is JSON members for the top level / the final event (cost, meta), or
    b""; `wants_usage`: the Chat Completions client asked for `stream_options.include_usage`; `echo`: the
    request members a Responses answer repeats (`responses.request_echo`)."""
    translator = SURFACES.get(surface)
    if translator is None:
        raise _unknown(surface)
    echoes = {"echo": echo} if echo else {}
    if not stream:
        return translator.render_response(response, usage, model, extra, **echoes)
    writer = translator.writer(model, wants_usage, **echoes)
    return writer.write(chunks_of(response)) + writer.finish(usage, extra)
