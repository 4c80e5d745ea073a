"""The Anthropic Messages surface (`POST /v1/messages`) ↔ the neutral form, for non-Anthropic providers.

Requests are decoded once into small Structs shaped like the `anthropic` SDK's params, then rebuilt as a
neutral `ChatRequest`. Answers come back as an Anthropic `message` object, or streamed as the event
sequence the Messages API sends (`message_start`, `content_block_*`, `message_delta`, `message_stop`).

Decisions, each forced by what the neutral (Chat Completions) form can carry:
- `tool_result` blocks become `tool` messages placed before the rest of their user turn; a result with
  `is_error: true` has its text prefixed with `Error: ` (Chat Completions has no error flag). Images in
  a result cannot ride in a `tool` message, so they open the following user message, after a text line
  naming the tool call they came from.
- Thinking signatures and `redacted_thinking` blocks are only meaningful to Anthropic: dropped.
- What would silently change the answer (server tools, documents, containers, `inference_geo`) is a
  400; pure hints (`cache_control`, `service_tier`, `speed`, `diagnostics`, workspace ids) are ignored.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Union, final

import msgspec
from msgspec import UNSET, Raw, UnsetType

from proxy.errors import ANTHROPIC, Code, GatewayError, error_body
from proxy.meta import Usage
from proxy.translators.neutral import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ContentPart,
    FunctionCall,
    FunctionDef,
    ImageURL,
    JSONSchema,
    Message,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    SurfaceTranslator,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoiceFunction,
)
from proxy.translators.openai import decode_body

__all__ = ["SURFACE", "MessagesWriter", "decode_request", "render_response", "writer"]

# ---------------------------------------------------------------------------------------------------------
# request views (field names and tags as in the SDK's `anthropic/types/*_param.py`)


class _In(msgspec.Struct, kw_only=True):
    """Nested members: unknown keys are ignored, so a newer SDK's optional fields do not break requests."""


class _Block(_In, tag_field="type"):
    pass


class _Text(_Block, tag="text"):
    text: str  # `cache_control` and `citations` are ignored: they do not change what the model reads


class _Base64Source(_In, tag_field="type", tag="base64"):
    media_type: str
    data: str


class _URLSource(_In, tag_field="type", tag="url"):
    url: str


class _FileSource(_In, tag_field="type", tag="file"):
    file_id: str = ""


class _Image(_Block, tag="image"):
    source: _Base64Source | _URLSource | _FileSource


class _ToolUse(_Block, tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class _Thinking(_Block, tag="thinking"):
    thinking: str
    signature: str = ""


class _RedactedThinking(_Block, tag="redacted_thinking"):
    data: str = ""


# Block types the Messages API accepts but the neutral form cannot carry: declared so that they reach
# `_reject` (a 400 naming the type) rather than msgspec's bare "Invalid value".
_UNSUPPORTED_BLOCKS: Final = (
    "document",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "container_upload",
    "tool_reference",
    "browser_state",
    "mcp_tool_use",
    "mcp_tool_result",
)
_Unsupported = tuple(msgspec.defstruct(f"_Unsupported_{t}", [], bases=(_Block,), tag=t) for t in _UNSUPPORTED_BLOCKS)


class _ToolResult(_Block, tag="tool_result"):
    tool_use_id: str
    content: str | list[Union[_Text, _Image, _ToolUse, *_Unsupported]] | None = None
    is_error: bool = False


_AnyBlock = Union[_Text, _Image, _ToolUse, _ToolResult, _Thinking, _RedactedThinking, *_Unsupported]


class _Message(_In):
    role: Literal["user", "assistant", "system"]  # "system" turns: the SDK's `SystemMessageParam`
    content: str | list[_AnyBlock]


class _ToolDef(_In):
    name: str = ""
    type: str | None = None  # absent or "custom": a client tool; anything else is defined by Anthropic
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    strict: bool | None = None


class _Choice(_In, tag_field="type"):
    disable_parallel_tool_use: bool | None = None


class _ChoiceAuto(_Choice, tag="auto"):
    pass


class _ChoiceAny(_Choice, tag="any"):
    pass


class _ChoiceTool(_Choice, tag="tool", kw_only=True):
    name: str


class _ChoiceNone(_Choice, tag="none"):
    pass


class _ThinkingEnabled(_In, tag_field="type", tag="enabled"):
    budget_tokens: int
    display: str | None = None


class _ThinkingDisabled(_In, tag_field="type", tag="disabled"):
    pass


class _ThinkingAdaptive(_In, tag_field="type", tag="adaptive"):
    display: str | None = None


class _ThinkingBetweenTools(_In, tag_field="type", tag="between_tools"):
    pass


class _JSONFormat(_In, tag_field="type", tag="json_schema"):
    schema: dict[str, Any]


class _OutputConfig(_In):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: _JSONFormat | None = None


class _Metadata(_In):
    user_id: str | None = None


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every top-level member of `MessageCreateParams`, plus the gateway's own; anything else is a 400."""

    model: str
    max_tokens: int  # required, as the real API requires it
    messages: list[_Message]
    system: str | list[_Text] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[_ToolDef] | None = None
    tool_choice: _ChoiceAuto | _ChoiceAny | _ChoiceTool | _ChoiceNone | None = None
    thinking: _ThinkingEnabled | _ThinkingDisabled | _ThinkingAdaptive | _ThinkingBetweenTools | None = None
    output_config: _OutputConfig | None = None
    metadata: _Metadata | None = None
    stream: bool = False
    # Anthropic-only state or guarantees: a 400 (see `_ANTHROPIC_ONLY`)
    container: Raw | UnsetType = UNSET
    inference_geo: Raw | UnsetType = UNSET
    # Hints the answer does not depend on: accepted, then dropped
    cache_control: Raw | UnsetType = UNSET
    service_tier: Literal["auto", "standard_only"] | None = None  # priority capacity is Anthropic's
    speed: Raw | UnsetType = UNSET
    diagnostics: Raw | UnsetType = UNSET
    user_profile_id: Raw | UnsetType = UNSET
    workspace_id: Raw | UnsetType = UNSET
    # gateway-only: the handler reads them
    meta: Raw | UnsetType = UNSET
    usage: Raw | UnsetType = UNSET
    provider: Raw | UnsetType = UNSET
    provider_options: Raw | UnsetType = UNSET
    debug: Raw | UnsetType = UNSET
    echo_upstream_request: Raw | UnsetType = UNSET
    session_id: Raw | UnsetType = UNSET


_request_decoder: Final = msgspec.json.Decoder(_Request)
_encoder: Final = msgspec.json.Encoder()

# ---------------------------------------------------------------------------------------------------------
# parameter tables

_ANTHROPIC_ONLY: Final = {
    "container": "it names a container on Anthropic's servers",
    "inference_geo": "the gateway cannot pin another provider's inference region",
}
# `thinking.budget_tokens` → reasoning_effort: the first bound the budget is under, else "high".
_EFFORT_BY_BUDGET: Final = ((4096, "low"), (16384, "medium"))
_EFFORT: Final = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
_TOOL_ERROR_PREFIX: Final = "Error: "


# ---------------------------------------------------------------------------------------------------------
# decode_request


def decode_request(body: bytes, drop_params: bool = False) -> ChatRequest:
    """An Anthropic Messages request body → the neutral request; GatewayError(400) naming what is wrong.

    With `drop_params` (the provider's setting), top-level members only Anthropic honours are dropped
    instead of refused; content and tools it cannot carry are still refused (the answer would be wrong)."""
    req = decode_body(_request_decoder.decode, body, _invalid)
    for name, why in _ANTHROPIC_ONLY.items():
        if getattr(req, name) is not UNSET and not drop_params:
            raise GatewayError(
                Code.invalid_request, f"The parameter `{name}` needs an Anthropic model ({why}).", param=name
            )
    return ChatRequest(
        model=req.model,
        messages=_messages(req),
        stream=req.stream,
        # Anthropic streams always end with usage: ask for it.
        stream_options=StreamOptions(include_usage=True) if req.stream else None,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=list(req.stop_sequences) if req.stop_sequences else None,
        tools=_tools(req.tools) if req.tools else None,
        tool_choice=_tool_choice(req.tool_choice),
        parallel_tool_calls=(
            False if req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use else None
        ),
        response_format=_response_format(req.output_config),
        reasoning_effort=_effort(req),
        user=req.metadata.user_id if req.metadata is not None else None,
    )


def _invalid(text: str) -> GatewayError:
    """A msgspec validation message → a 400 whose `param` is the offending member's path."""
    message, _, where = text.partition(" - at ")
    path = where.strip("`").removeprefix("$").removeprefix(".")
    for lead in ("Object missing required field `", "Object contains unknown field `"):
        if message.startswith(lead):
            field = message[len(lead) : -1]
            path = f"{path}.{field}" if path else field
            break
    if message.startswith("Object contains unknown field"):
        return GatewayError(
            Code.invalid_request, f"`{path}`: Extra inputs are not permitted (no such Messages API member).", param=path
        )
    if message.startswith("Object missing required field"):
        return GatewayError(Code.invalid_request, f"`{path}`: Field required.", param=path)
    return GatewayError(
        Code.invalid_request, f"Invalid request: {message}" + (f" at `{path}`" if path else ""), param=path or None
    )


def _effort(req: _Request) -> str | None:
    if req.output_config is not None and req.output_config.effort is not None:
        return _EFFORT[req.output_config.effort]
    if isinstance(req.thinking, _ThinkingEnabled):
        budget = req.thinking.budget_tokens
        return next((effort for bound, effort in _EFFORT_BY_BUDGET if budget < bound), "high")
    return None  # disabled, or adaptive / between_tools: the provider's own default


def _response_format(config: _OutputConfig | None) -> ResponseFormat | None:
    if config is None or config.format is None:
        return None
    # Anthropic's structured outputs always validate against the schema: `strict` on the OpenAI side.
    return ResponseFormat(type="json_schema", json_schema=JSONSchema(schema=config.format.schema, strict=True))


def _tools(tools: list[_ToolDef]) -> list[Tool]:
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise GatewayError(
                Code.invalid_request,
                f"The tool `{tool.name or tool.type}` (type `{tool.type}`) at `tools[{i}]` is defined by Anthropic "
                f"(a server or Anthropic-schema tool); it needs an Anthropic model.",
                param=f"tools[{i}].type",
            )
        if not tool.name:
            raise GatewayError(Code.invalid_request, f"`tools[{i}].name`: Field required.", param=f"tools[{i}].name")
        if tool.input_schema is None:
            raise GatewayError(
                Code.invalid_request, f"`tools[{i}].input_schema`: Field required.", param=f"tools[{i}].input_schema"
            )
        fn = FunctionDef(name=tool.name, description=tool.description, parameters=tool.input_schema, strict=tool.strict)
        out.append(Tool(function=fn))
    return out


def _tool_choice(choice: _Choice | None) -> str | NamedToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, _ChoiceTool):
        return NamedToolChoice(function=ToolChoiceFunction(name=choice.name))
    return {_ChoiceAuto: "auto", _ChoiceAny: "required", _ChoiceNone: "none"}[type(choice)]


# messages


def _messages(req: _Request) -> list[Message]:
    out: list[Message] = []
    if req.system is not None:
        system = _system_text(req.system)
        if system:
            out.append(Message(role="system", content=system))
    for i, message in enumerate(req.messages):
        if message.role == "user":
            _user_turn(message.content, f"messages[{i}].content", out)
        elif message.role == "assistant":
            out.append(_assistant_turn(message.content, f"messages[{i}].content"))
        else:
            out.append(Message(role="system", content=_system_text(message.content, f"messages[{i}].content")))
    return out


def _system_text(content: str | list[Any], path: str = "system") -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, _Text):
            _reject(block, f"{path}[{j}]", "a system prompt")
        texts.append(block.text)
    return "\n".join(texts)


def _user_turn(content: str | list[_Block], path: str, out: list[Message]) -> None:
    if isinstance(content, str):
        out.append(Message(role="user", content=content))
        return
    parts: list[ContentPart] = []
    tool_images: list[ContentPart] = []
    n_tools = 0
    for j, block in enumerate(content):
        where = f"{path}[{j}]"
        if isinstance(block, _Text):
            parts.append(ContentPart(type="text", text=block.text))
        elif isinstance(block, _Image):
            parts.append(_image_part(block, where))
        elif isinstance(block, _ToolResult):
            out.append(_tool_message(block, where, tool_images))
            n_tools += 1
        else:
            _reject(block, where, "a user message")
    parts = tool_images + parts
    if parts or not n_tools:
        out.append(Message(role="user", content=_collapse(parts)))


def _tool_message(block: _ToolResult, path: str, images: list[ContentPart]) -> Message:
    texts: list[str] = []
    found: list[ContentPart] = []
    if isinstance(block.content, str):
        texts.append(block.content)
    elif block.content:
        for k, item in enumerate(block.content):
            if isinstance(item, _Text):
                texts.append(item.text)
            elif isinstance(item, _Image):
                found.append(_image_part(item, f"{path}.content[{k}]"))
            else:
                _reject(item, f"{path}.content[{k}]", "a tool_result")
    if found:  # a `tool` message carries text only: the images follow in the user message, labelled
        images.append(ContentPart(type="text", text=f"Image(s) returned by tool call {block.tool_use_id}:"))
        images.extend(found)
    text = "\n".join(texts)
    if block.is_error:
        text = _TOOL_ERROR_PREFIX + text if text else _TOOL_ERROR_PREFIX.rstrip(": ")
    return Message(role="tool", tool_call_id=block.tool_use_id, content=text)


def _assistant_turn(content: str | list[_Block], path: str) -> Message:
    if isinstance(content, str):
        return Message(role="assistant", content=content)
    texts: list[ContentPart] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(content):
        if isinstance(block, _Text):
            texts.append(ContentPart(type="text", text=block.text))
        elif isinstance(block, _Thinking):
            if block.thinking:  # empty when the client asked for `display: "omitted"`
                thinking.append(block.thinking)
        elif isinstance(block, _ToolUse):
            arguments = _encoder.encode(block.input).decode()
            calls.append(ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=arguments)))
        elif not isinstance(block, _RedactedThinking):  # encrypted for Anthropic alone: dropped
            _reject(block, f"{path}[{j}]", "an assistant message")
    text: str | list[ContentPart] | None = _collapse(texts) if texts else (None if calls else "")
    return Message(
        role="assistant",
        content=text,
        tool_calls=calls or None,
        reasoning_content="\n".join(thinking) if thinking else None,
    )


def _collapse(parts: list[ContentPart]) -> str | list[ContentPart]:
    if not parts:
        return ""
    if len(parts) == 1 and parts[0].type == "text":
        return parts[0].text or ""
    return parts


def _image_part(block: _Image, path: str) -> ContentPart:
    source = block.source
    if isinstance(source, _Base64Source):
        url = f"data:{source.media_type};base64,{source.data}"
    elif isinstance(source, _URLSource):
        url = source.url
    else:
        raise GatewayError(
            Code.invalid_request,
            f"Image sources of type `file` (at `{path}.source`) refer to Anthropic's Files API; they need an "
            f"Anthropic model. Send the image as `base64` or `url`.",
            param=f"{path}.source",
        )
    return ContentPart(type="image_url", image_url=ImageURL(url=url))


def _reject(block: msgspec.Struct, path: str, where: str) -> None:
    kind = type(block).__struct_config__.tag
    if kind in _UNSUPPORTED_BLOCKS:
        message = f"Content blocks of type `{kind}` (at `{path}`) need an Anthropic model."
    else:
        message = f"Content blocks of type `{kind}` are not allowed in {where} (at `{path}`)."
    raise GatewayError(Code.invalid_request, message, param=path)


# ---------------------------------------------------------------------------------------------------------
# render_response


class _OutUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class _OutText(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class _OutThinking(msgspec.Struct, tag_field="type", tag="thinking"):
    thinking: str
    signature: str = ""  # none to give: only Anthropic signs thinking


class _OutToolUse(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: Raw


class _OutMessage(msgspec.Struct, kw_only=True):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[_OutText | _OutThinking | _OutToolUse]
    stop_reason: str | None
    stop_sequence: None = None  # the neutral form does not say which sequence matched
    usage: _OutUsage


_STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_EMPTY_INPUT: Final = Raw(b"{}")
_object_check: Final = msgspec.json.Decoder(dict[str, Raw])


def _stop_reason(finish_reason: str | None, tool_calls: bool) -> str:
    """Neutral finish reason → Anthropic's. A stop sequence also ends as `end_turn`: which one matched is lost.

    Some providers (Gemini) finish with `stop` after calling tools; Anthropic says `tool_use` then.
    """
    reason = _STOP_REASONS.get(finish_reason or "stop", "end_turn")
    return "tool_use" if tool_calls and reason == "end_turn" else reason


def _usage(usage: Usage | None) -> _OutUsage:
    """Neutral usage (input includes cache reads and writes) → Anthropic's (input excludes both)."""
    if usage is None:
        return _OutUsage()
    fresh = max(usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens, 0)
    return _OutUsage(fresh, usage.output_tokens, usage.cached_input_tokens, usage.cache_write_tokens)


def _tool_input(arguments: str) -> Raw:
    """Tool-call arguments as the `input` object, copied as bytes when they are a JSON object.

    Anything else (empty, truncated by `max_tokens`, or not an object) becomes `{}`: the SDK types `input`
    as a dict, and a client's tool then fails on missing arguments the way it would for a bad call.
    """
    raw = arguments.encode()
    try:
        _object_check.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return _EMPTY_INPUT
    return Raw(raw)


def _message_id(neutral_id: str) -> str:
    """A stable `msg_` id: the provider's id behind the prefix Anthropic ids carry."""
    if neutral_id.startswith("msg_"):
        return neutral_id
    return "msg_" + (neutral_id or "gateway")


def render_response(resp: ChatResponse, usage: Usage | None, model: str, extra: bytes) -> bytes:
    """The neutral answer → an Anthropic `message` object, with `extra` members spliced in at the top level."""
    content: list[_OutText | _OutThinking | _OutToolUse] = []
    finish_reason = None
    tool_calls = False
    if resp.choices:
        choice = resp.choices[0]  # the Messages API has no `n`
        message = choice.message
        finish_reason = choice.finish_reason
        if message.reasoning_content:
            content.append(_OutThinking(message.reasoning_content))
        text = _text_of(message.content) or message.refusal
        if text:
            content.append(_OutText(text))
        for call in message.tool_calls or ():
            content.append(_OutToolUse(call.id, call.function.name, _tool_input(call.function.arguments)))
            tool_calls = True
    body = _encoder.encode(
        _OutMessage(
            id=_message_id(resp.id),
            model=model,
            content=content,
            stop_reason=_stop_reason(finish_reason, tool_calls),
            usage=_usage(usage),
        )
    )
    return _splice(body, extra)


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


def _splice(body: bytes, extra: bytes) -> bytes:
    """`body` (a JSON object, as encoded here) with `extra` members (`"a":1,"b":2`) added at its end."""
    return body[:-1] + b"," + extra + b"}" if extra else body


# ---------------------------------------------------------------------------------------------------------
# streams: the sequence of https://docs.anthropic.com/en/docs/build-with-claude/streaming ("Event types").
# `message_delta` usage counts are cumulative totals that overwrite `message_start`'s (the SDK's
# `accumulate_event` says so), which is what lets the final counts arrive only at the end.


def _event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


_STOP_EVENT: Final = _event(b"message_stop", b'{"type":"message_stop"}')
_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_BLOCK_START: Final = b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,"content_block":'
_DELTA: Final = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"'
_TEXT_START: Final = b'{"type":"text","text":""}}\n\n'
_THINKING_START: Final = b'{"type":"thinking","thinking":"","signature":""}}\n\n'
_TEXT, _THINKING, _TOOL = 1, 2, 3
_MESSAGE_DELTA: Final = (
    b'{"type":"message_delta","delta":{"stop_reason":"%s","stop_sequence":null},"usage":{"output_tokens":%d,'
    b'"input_tokens":%d,"cache_read_input_tokens":%d,"cache_creation_input_tokens":%d}}'
)
_DELTA_KIND: Final = {_TEXT: b'text_delta","text":', _THINKING: b'thinking_delta","thinking":'}


@final
class MessagesWriter:
    """Neutral chunks → the Messages API's event stream, for one answer.

    Blocks are opened as the kind of delta changes (thinking, text, one per tool call) and each is closed
    when the next opens, as the real API does. `message_start` reports zero input tokens: the neutral
    usage only arrives with `finish`, whose `message_delta` carries the final counts (the SDK overwrites
    the start's counts with them).
    """

    __slots__ = ("_block", "_blocks", "_finish_reason", "_id", "_kind", "_model", "_started", "_tools")

    def __init__(self, model: str):
        self._model = model
        self._id = ""
        self._started = False
        self._blocks = 0  # blocks opened so far
        self._block = -1  # the open block's index, -1 when none
        self._kind = 0
        self._tools: dict[int, int] = {}  # neutral tool-call index → its block index
        self._finish_reason: str | None = None

    def write(self, chunks: list[ChatChunk]) -> bytes:
        out: list[bytes] = []
        for chunk in chunks:
            if not self._started:
                out.append(self._message_start(chunk.id))
            for choice in chunk.choices:
                if choice.index:
                    continue  # the Messages API has one answer per request
                delta = choice.delta
                if delta.reasoning_content:
                    self._append(_THINKING, delta.reasoning_content, out)
                if delta.content:
                    self._append(_TEXT, delta.content, out)
                if delta.refusal:
                    self._append(_TEXT, delta.refusal, out)
                if delta.tool_calls:
                    for call in delta.tool_calls:
                        self._tool_delta(call, out)
                if choice.finish_reason:
                    self._finish_reason = choice.finish_reason
        return b"".join(out)

    def finish(self, usage: Usage | None, extra: bytes) -> bytes:
        out = [] if self._started else [self._message_start("")]
        self._close(out)
        u = _usage(usage)
        reason = _stop_reason(self._finish_reason, bool(self._tools)).encode()
        payload = _MESSAGE_DELTA % (
            reason,
            u.output_tokens,
            u.input_tokens,
            u.cache_read_input_tokens,
            u.cache_creation_input_tokens,
        )
        out.append(_event(b"message_delta", _splice(payload, extra)))
        out.append(_STOP_EVENT)
        return b"".join(out)

    def error(self, err: GatewayError, request_id: str) -> bytes:
        return _event(b"error", _encoder.encode(error_body(err, request_id, ANTHROPIC)))

    # -----------------------------------------------------------------------------------------------------

    def _message_start(self, neutral_id: str) -> bytes:
        self._started = True
        self._id = _message_id(neutral_id)
        message = _OutMessage(id=self._id, model=self._model, content=[], stop_reason=None, usage=_OutUsage())
        return _event(b"message_start", b'{"type":"message_start","message":' + _encoder.encode(message) + b"}")

    def _close(self, out: list[bytes]) -> None:
        if self._block >= 0:
            out.append(_BLOCK_STOP % self._block)
            self._block, self._kind = -1, 0

    def _open(self, kind: int, start: bytes, out: list[bytes]) -> int:
        self._close(out)
        self._block, self._kind = self._blocks, kind
        self._blocks += 1
        out.append(_BLOCK_START % self._block + start)
        return self._block

    def _append(self, kind: int, text: str, out: list[bytes]) -> None:
        if self._kind != kind:
            self._open(kind, _TEXT_START if kind == _TEXT else _THINKING_START, out)
        out.append(_DELTA % self._block + _DELTA_KIND[kind] + _encoder.encode(text) + b"}}\n\n")

    def _tool_delta(self, call: ToolCallDelta, out: list[bytes]) -> None:
        fn = call.function
        block = self._tools.get(call.index)
        if block is None:
            call_id = call.id or f"toolu_{self._id.removeprefix('msg_')}_{call.index}"
            name = (fn.name if fn is not None else None) or ""
            start = b'{"type":"tool_use","id":%s,"name":%s,"input":{}}}\n\n' % (
                _encoder.encode(call_id),
                _encoder.encode(name),
            )
            block = self._tools[call.index] = self._open(_TOOL, start, out)
        if fn is not None and fn.arguments:
            # A fragment for a call whose block already closed (providers that interleave parallel calls)
            # still names that call's block: the SDK accumulates by index.
            out.append(
                _DELTA % block + b'input_json_delta","partial_json":' + _encoder.encode(fn.arguments) + b"}}\n\n"
            )


def writer(model: str, wants_usage: bool) -> MessagesWriter:
    """A writer for one stream. `wants_usage` is moot: Anthropic streams always carry usage."""
    return MessagesWriter(model)


SURFACE: Final = SurfaceTranslator(
    name="anthropic.messages",
    dialect=ANTHROPIC,
    decode_request=decode_request,
    render_response=render_response,
    writer=writer,
)
