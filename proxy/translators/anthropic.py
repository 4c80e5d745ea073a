"""Anthropic provider kind: the neutral form ⇄ the Messages API (`POST /v1/messages`), and the
pass-through for clients that already speak it.

Wire facts relied on (docs.anthropic.com, "Messages" and "Streaming Messages"):
- requests need `max_tokens`; the system prompt is a top-level `system`, not a message;
- tool results are `tool_result` blocks in a user turn; tool calls are `tool_use` blocks;
- a stream is `message_start`, then per block `content_block_start` / `_delta` / `_stop`, then
  `message_delta` (stop reason, cumulative output tokens) and `message_stop`; `ping` and `error` may
  appear anywhere;
- `usage.input_tokens` excludes cache reads and writes, which come as `cache_read_input_tokens` and
  `cache_creation_input_tokens`.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Final, final

import msgspec
import orjson

from proxy.errors import ANTHROPIC, Code, GatewayError, error_body
from proxy.meta import Usage
from proxy.sse import EventBuffer, event_data, split_events
from proxy.translators.neutral import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionDelta,
    Message,
    ProviderTranslator,
    ToolCall,
    ToolCallDelta,
    UpstreamRequest,
    unhonoured,
    unsupported,
)
from proxy.translators.openai import closing_members, inject_members

KIND: Final = "anthropic"
PATH: Final = "/v1/messages"
VERSION: Final = "2023-06-01"  # the `anthropic-version` header every request needs
DEFAULT_MAX_TOKENS: Final = 4096  # Anthropic requires max_tokens; OpenAI-style clients often omit it
# reasoning_effort → thinking budget (tokens); the API's minimum budget is 1024.
THINKING_BUDGET: Final = {"low": 1024, "medium": 4096, "high": 16384}
MIN_THINKING_BUDGET: Final = 1024

STOP_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Neutral parameters Anthropic has no counterpart for. A value in the tuple is one it does honour.
UNSUPPORTED: Final[dict[str, tuple[Any, ...]]] = {
    "n": (None, 1),
    "seed": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


def auth_headers(api_key: str) -> dict[str, str]:
    headers = {"anthropic-version": VERSION}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


# ---------------------------------------------------------------------------------------------------------
# requests


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if ";base64" not in header:
            data = base64.b64encode(data.encode()).decode()
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(message: Message, index: int, drop: bool) -> list[dict[str, Any]]:
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if part.type == "text":
            blocks.append({"type": "text", "text": part.text or ""})
        elif part.type == "image_url" and part.image_url is not None:
            blocks.append(_image_block(part.image_url.url))
        elif not drop:
            raise unsupported(f"messages[{index}].content[{part.type}]", KIND, "content parts of this type")
    return blocks


def _text_of(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text or "" for part in message.content or () if part.type == "text")


def _tool_input(arguments: str, index: int) -> Any:
    if not arguments.strip():
        return {}
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise GatewayError(
            Code.invalid_request,
            f"messages[{index}].tool_calls: the arguments are not valid JSON; Anthropic needs a JSON object.",
            param=f"messages[{index}].tool_calls",
        ) from None


def _messages(request: ChatRequest, drop: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, turns): system and developer messages go to `system`; tool results join a user
    turn; consecutive turns of one role are merged (the API wants them alternating)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, message in enumerate(request.messages):
        role = message.role
        if role in ("system", "developer"):
            text = _text_of(message)
            if text:
                system.append({"type": "text", "text": text})
        elif role == "user":
            add("user", _blocks(message, i, drop))
        elif role == "assistant":
            # reasoning_content is not replayed: a thinking block needs the signature Anthropic issued
            # with it, and the API ignores earlier turns' thinking anyway.
            blocks = _blocks(message, i, drop)
            for call in message.tool_calls or ():
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.function.name,
                        "input": _tool_input(call.function.arguments, i),
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id or ""}
            blocks = _blocks(message, i, drop)
            if blocks:
                result["content"] = blocks
            add("user", [result])
        else:
            raise GatewayError(
                Code.invalid_request,
                f"messages[{i}].role: unknown role {role!r} (expected system, developer, user, assistant, tool).",
                param=f"messages[{i}].role",
            )
    # An empty content list is an error upstream; a turn left empty (e.g. an empty string) gets one.
    for turn in turns:
        if not turn["content"]:
            turn["content"] = [{"type": "text", "text": " "}]
    return system, turns


def _tool_choice(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        out = None
    elif isinstance(choice, str):
        kinds = {"auto": "auto", "required": "any", "none": "none"}
        if choice not in kinds:
            raise GatewayError(
                Code.invalid_request,
                f"tool_choice: unknown value {choice!r} (expected auto, required, none or a function).",
                param="tool_choice",
            )
        out = {"type": kinds[choice]}
    else:
        out = {"type": "tool", "name": choice.function.name}
    if request.parallel_tool_calls is False and request.tools:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def build_request(
    request: ChatRequest, upstream_model: str, stream: bool, drop_params: bool, strict: bool = False
) -> UpstreamRequest:
    dropped = unhonoured(request, UNSUPPORTED, KIND, drop_params, strict)  # none of them is read below
    system, turns = _messages(request, drop_params)
    body: dict[str, Any] = {"model": upstream_model, "messages": turns}
    if system:
        body["system"] = system
    max_tokens = request.max_output_tokens
    effort = request.reasoning_effort
    budget = THINKING_BUDGET.get(effort or "")
    if budget is not None:
        if max_tokens is None:
            max_tokens = budget + DEFAULT_MAX_TOKENS
        budget = min(budget, max_tokens - 1)
        if budget >= MIN_THINKING_BUDGET:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    elif effort not in (None, "none", "minimal") and not drop_params:
        raise unsupported("reasoning_effort", KIND, f"unknown effort {effort!r}; use low, medium or high")
    body["max_tokens"] = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS
    if request.temperature is not None:
        # OpenAI's range is 0-2, Anthropic's 0-1: clamp rather than fail a request that worked before.
        body["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.top_k is not None:
        body["top_k"] = request.top_k
    stops = request.stop_sequences
    if stops:
        body["stop_sequences"] = stops
    if request.tools:
        body["tools"] = [
            {
                "name": tool.function.name,
                **({"description": tool.function.description} if tool.function.description else {}),
                "input_schema": tool.function.parameters or {"type": "object", "properties": {}},
                **({"strict": True} if tool.function.strict else {}),
            }
            for tool in request.tools
        ]
    choice = _tool_choice(request)
    if choice is not None and (request.tools or choice["type"] == "none"):
        body["tool_choice"] = choice
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.schema is not None:
            # Structured outputs, generally available as `output_config.format` (docs: "Structured outputs").
            body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.json_schema.schema}}
        elif not drop_params:
            raise unsupported(
                "response_format", KIND, "Anthropic needs a schema: use {type: json_schema, json_schema: {schema}}"
            )
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if stream:
        body["stream"] = True
    return UpstreamRequest(path=PATH, body=orjson.dumps(body), dropped=dropped)


# ---------------------------------------------------------------------------------------------------------
# usage and whole responses


class AnthropicUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None

    def neutral(self) -> Usage:
        cached = self.cache_read_input_tokens or 0
        writes = self.cache_creation_input_tokens or 0
        prompt = (self.input_tokens or 0) + cached + writes
        output = self.output_tokens or 0
        return Usage(
            input_tokens=prompt,
            output_tokens=output,
            total_tokens=prompt + output,
            cached_input_tokens=cached,
            cache_write_tokens=writes,
        )

    def merge(self, later: AnthropicUsage) -> AnthropicUsage:
        """This usage updated by a later report (`message_delta` counts are cumulative)."""
        return AnthropicUsage(
            input_tokens=later.input_tokens if later.input_tokens is not None else self.input_tokens,
            output_tokens=later.output_tokens if later.output_tokens is not None else self.output_tokens,
            cache_read_input_tokens=(
                later.cache_read_input_tokens
                if later.cache_read_input_tokens is not None
                else self.cache_read_input_tokens
            ),
            cache_creation_input_tokens=(
                later.cache_creation_input_tokens
                if later.cache_creation_input_tokens is not None
                else self.cache_creation_input_tokens
            ),
        )


class _Block(msgspec.Struct):
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _Message(msgspec.Struct):
    id: str = ""
    model: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: AnthropicUsage | None = None


_message_decoder = msgspec.json.Decoder(_Message)


def _bad(what: str) -> GatewayError:
    return GatewayError(Code.upstream_bad_response, f"Anthropic answered {what}.")


def parse_response(body: bytes) -> tuple[ChatResponse, Usage | None]:
    try:
        message = _message_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad(f"with a body that is not a Messages API message: {e}") from None
    text: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text":
            text.append(block.text or "")
        elif block.type == "thinking":
            thinking.append(block.thinking or "")
        elif block.type == "tool_use":
            arguments = bytes(block.input).decode() if block.input is not msgspec.UNSET else "{}"
            calls.append(ToolCall(id=block.id or "", function=FunctionCall(name=block.name or "", arguments=arguments)))
    finish = STOP_REASONS.get(message.stop_reason or "", "stop")
    reply = Message(
        role="assistant",
        content="".join(text) if text or not calls else None,
        reasoning_content="".join(thinking) or None,
        tool_calls=calls or None,
    )
    response = ChatResponse(
        id=message.id,
        created=int(time.time()),
        model=message.model,
        choices=[Choice(message=reply, finish_reason=finish)],
    )
    return response, message.usage.neutral() if message.usage else None


# ---------------------------------------------------------------------------------------------------------
# errors


class _ErrorDetail(msgspec.Struct):
    type: str = ""
    message: str = ""


class _ErrorBody(msgspec.Struct):
    type: str = ""
    error: _ErrorDetail | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)

# Anthropic's error types, in OpenAI's vocabulary where it differs (docs: "Errors").
_ERROR_TYPES: Final = {"overloaded_error": "api_error", "request_too_large": "invalid_request_error"}


def _error(status: int, detail: _ErrorDetail) -> GatewayError:
    return GatewayError(
        Code.upstream_error,
        f"Anthropic: {detail.message or detail.type or 'error'}",
        status=status,
        type=_ERROR_TYPES.get(detail.type, detail.type or "api_error"),
    )


def parse_error(status: int, body: bytes) -> GatewayError | None:
    try:
        parsed = _error_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if parsed.error is None:
        return None
    return _error(status, parsed.error)


# ---------------------------------------------------------------------------------------------------------
# streams


class _Delta(msgspec.Struct):
    type: str = ""
    text: str | None = None
    thinking: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str
    index: int = 0
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: AnthropicUsage | None = None
    error: _ErrorDetail | None = None


_event_decoder = msgspec.json.Decoder(_Event)


@final
class AnthropicReader:
    """A Messages stream → neutral chunks (see `StreamReader`)."""

    __slots__ = (
        "_buffer",
        "_tools",
        "_usage",
        "created",
        "done",
        "events",
        "failure",
        "id",
        "model",
        "usage",
    )

    def __init__(self) -> None:
        self._buffer = EventBuffer()
        self._tools: dict[int, int] = {}  # content block index → tool call index
        self._usage = AnthropicUsage()
        self.done = False
        self.failure: GatewayError | None = None
        self.usage: Usage | None = None
        self.id = ""
        self.model = ""
        self.created = int(time.time())
        self.events = 0

    def feed(self, chunk: bytes) -> list[ChatChunk]:
        complete = self._buffer.feed(chunk)
        if not complete or self.done:
            return []
        out: list[ChatChunk] = []
        for raw in split_events(complete):
            data = event_data(raw)
            if data is None:
                continue
            self.events += 1
            try:
                event = _event_decoder.decode(data)
            except (msgspec.DecodeError, RecursionError):
                continue  # not ours to judge (e.g. a future event with another shape)
            delta = self._on(event)
            if delta is not None:
                out.append(delta)
            if self.done:
                break
        return out

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatChunk:
        return ChatChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
        )

    def _on(self, event: _Event) -> ChatChunk | None:
        kind = event.type
        if kind == "content_block_delta" and event.delta is not None:
            d = event.delta
            if d.type == "text_delta":
                return self._chunk(Delta(content=d.text or ""))
            if d.type == "thinking_delta":
                return self._chunk(Delta(reasoning_content=d.thinking or ""))
            if d.type == "input_json_delta" and event.index in self._tools:
                call = ToolCallDelta(index=self._tools[event.index], function=FunctionDelta(arguments=d.partial_json))
                return self._chunk(Delta(tool_calls=[call]))
            return None  # signature_delta, citations_delta, …
        if kind == "content_block_start" and event.content_block is not None:
            block = event.content_block
            if block.type == "tool_use":
                index = self._tools[event.index] = len(self._tools)
                call = ToolCallDelta(
                    index=index,
                    id=block.id,
                    type="function",
                    function=FunctionDelta(name=block.name, arguments=""),
                )
                return self._chunk(Delta(tool_calls=[call]))
            if block.type == "text" and block.text:
                return self._chunk(Delta(content=block.text))
            return None
        if kind == "message_start" and event.message is not None:
            message = event.message
            self.id, self.model = message.id, message.model
            if message.usage is not None:
                self._usage = message.usage
                self.usage = self._usage.neutral()
            return self._chunk(Delta(role="assistant", content=""))
        if kind == "message_delta":
            if event.usage is not None:
                self._usage = self._usage.merge(event.usage)
                self.usage = self._usage.neutral()
            stop = event.delta.stop_reason if event.delta is not None else None
            return self._chunk(Delta(), STOP_REASONS.get(stop or "", "stop"))
        if kind == "message_stop":
            self.done = True
            return None
        if kind == "error":
            detail = event.error or _ErrorDetail(type="api_error", message="the stream failed")
            self.failure = _error(502, detail)
            self.done = True
        return None  # ping, content_block_stop, unknown events


# ---------------------------------------------------------------------------------------------------------
# pass-through: an Anthropic Messages client and an Anthropic provider


def message_view(body: bytes) -> tuple[Usage | None, str]:
    """(usage, message id) of a whole Messages API answer; GatewayError(502) when it is not JSON."""
    try:
        message = _message_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad(f"with a body that is not a Messages API message: {e}") from None
    return (message.usage.neutral() if message.usage else None), message.id


def sse_event(kind: bytes, data: bytes) -> bytes:
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"


MESSAGE_STOP: Final = sse_event(b"message_stop", b'{"type":"message_stop"}')


def error_event(err: GatewayError, request_id: str) -> bytes:
    """The `error` event that ends an Anthropic stream (the SDK raises it as an APIError)."""
    return sse_event(b"error", orjson.dumps(error_body(err, request_id, ANTHROPIC)))


@final
class MessagesPassthrough:
    """A Messages stream forwarded as it comes, except the final `message_delta` and `message_stop`,
    held so that `meta` can ride in the `message_delta` (see the reference digest). Usage is read from
    `message_start` and `message_delta`; other events are not decoded."""

    __slots__ = ("_buffer", "_held", "_usage", "done", "events", "failure", "first_token", "id", "usage", "wants_meta")

    def __init__(self, wants_meta: bool):
        self._buffer = EventBuffer()
        self._held: bytes | None = None  # the message_delta payload
        self._usage = AnthropicUsage()
        self.wants_meta = wants_meta
        self.done = False
        self.failure: GatewayError | None = None
        self.first_token = False
        self.events = 0
        self.usage: Usage | None = None
        self.id = ""

    def feed(self, chunk: bytes) -> bytes:
        complete = self._buffer.feed(chunk)
        if not complete or self.done:
            return b""
        if self.first_token and b"message_" not in complete and b"error" not in complete:
            self.events += complete.count(b"data:")
            return complete  # the common case: content deltas, forwarded as they came
        out = []
        for raw in split_events(complete):
            data = event_data(raw)
            if data is None:
                out.append(raw)
                continue
            self.events += 1
            if b'"message_' not in data and b'"error"' not in data:
                if not self.first_token and b'"content_block_delta"' in data:
                    self.first_token = True
                out.append(raw)
                continue
            try:
                event = _event_decoder.decode(data)
            except (msgspec.DecodeError, RecursionError):
                out.append(raw)
                continue
            if event.type == "message_start" and event.message is not None:
                self.id = event.message.id
                if event.message.usage is not None:
                    self._usage = event.message.usage
                    self.usage = self._usage.neutral()
            elif event.type == "message_delta":
                if event.usage is not None:
                    self._usage = self._usage.merge(event.usage)
                    self.usage = self._usage.neutral()
                self._held = data
                continue
            elif event.type == "message_stop":
                self.done = True
                break
            elif event.type == "error":
                self.failure = _error(502, event.error or _ErrorDetail(type="api_error"))
                self.done = True
                out.append(raw)
                break
            out.append(raw)
        return b"".join(out)

    @property
    def truncated(self) -> bool:
        return not self.done

    def abort(self) -> bytes:
        held, self._held = self._held, None
        return sse_event(b"message_delta", held) if held is not None else b""

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return error_event(err, request_id)

    def finish(self, meta: bytes | None, cost: bytes = b"", extra: bytes = b"") -> bytes:
        held, self._held = self._held, None
        members = closing_members(cost, extra, meta)
        delta = sse_event(b"message_delta", inject_members(held, members)) if held is not None else b""
        return delta + MESSAGE_STOP


PROVIDER: Final = ProviderTranslator(
    kind=KIND,
    auth_headers=auth_headers,
    build_request=build_request,
    parse_response=parse_response,
    reader=AnthropicReader,
    parse_error=parse_error,
)
