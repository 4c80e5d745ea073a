"""The OpenAI Responses surface (`POST /v1/responses`) translated through the neutral form, for every
provider kind but OpenAI (which speaks it natively: `proxy.translators.responses_native`).

Wire facts relied on (the `openai` Python SDK's `types/responses/*` and the API reference, "Responses" and
"Streaming events"):
- a request's `input` is a string or a list of items: messages (`type: "message"`, or just a `role`),
  `function_call`, `function_call_output`, `reasoning` and the built-in tools' items;
- function tools are flat (`{type: "function", name, parameters}`), not nested under `function`;
- a response's `output` is a list of items (`reasoning`, `message` with `output_text` parts,
  `function_call`), and its `usage` counts `input_tokens` with cached tokens included, `output_tokens`
  with reasoning tokens included (the neutral conventions);
- a stream is named SSE events (`event: <type>` then `data: {"type": <type>, "sequence_number": n, …}`),
  with no `[DONE]`: `response.created`, `response.in_progress`, per item `response.output_item.added` …
  `response.output_item.done`, then one of `response.completed` / `response.incomplete` /
  `response.failed`; an `error` event may come instead.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final, final

import msgspec
import orjson
from msgspec import UNSET, Raw, UnsetType

from proxy.errors import OPENAI, Code, GatewayError
from proxy.meta import Usage
from proxy.sse import data_event
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
    StreamWriter,
    SurfaceTranslator,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoiceFunction,
)
from proxy.translators.openai import GATEWAY_FIELDS, decode_body, inject_members

NAME: Final = "openai.responses"

# ---------------------------------------------------------------------------------------------------------
# requests: the view decoded once, then mapped to the neutral form


class _Part(msgspec.Struct):
    """A content part of a message, or of a `function_call_output`'s list output."""

    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None  # input_image: an http(s) or data: URL
    file_id: str | None = None
    detail: str | None = None


class _Item(msgspec.Struct):
    """One `input` item. Only the members this gateway reads; each type's other members are ignored."""

    type: str | None = None
    role: str | None = None
    content: str | list[_Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    # function_call_output: text or parts; computer_call_output sends an object (rejected by type, later)
    output: str | list[_Part] | dict[str, Any] | None = None


class _ToolView(msgspec.Struct):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _ToolChoiceView(msgspec.Struct):
    type: str
    name: str | None = None


class _FormatView(msgspec.Struct):
    type: str
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class _TextView(msgspec.Struct):
    format: _FormatView | None = None
    # `verbosity` is a style hint only GPT-5 models know: ignored, like any other member of `text`.


class _ReasoningView(msgspec.Struct):
    effort: str | None = None
    # `summary` / `generate_summary` ask OpenAI models for summaries; a translated answer carries the
    # provider's reasoning text as the summary whenever there is some, so they change nothing.


_Ignored = Raw | UnsetType


class RequestView(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A Responses request, as far as the neutral form can carry it."""

    model: str = ""
    input: str | list[_Item] | UnsetType = UNSET
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[_ToolView] | None = None
    tool_choice: str | _ToolChoiceView | None = None
    parallel_tool_calls: bool | None = None
    text: _TextView | None = None
    reasoning: _ReasoningView | None = None
    stream: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    # Server-side state: honoured only by OpenAI (checked below, with a message saying so).
    previous_response_id: str | None = None
    conversation: _Ignored = UNSET  # (Raw, not `Raw | None`: msgspec reads that union as "null only")
    background: bool | None = None
    prompt: _Ignored = UNSET
    # Ignored safely: they change nothing about a translated answer.
    top_logprobs: _Ignored = UNSET  # logprobs come only from OpenAI; ours carry `logprobs: []`
    truncation: _Ignored = UNSET  # "disabled" is the default; with "auto" a too-long input fails instead
    store: _Ignored = UNSET  # nothing is stored for other providers (so nothing can be referenced later)
    include: _Ignored = UNSET  # extra output data (encrypted reasoning, logprobs, sources) only OpenAI has
    service_tier: _Ignored = UNSET  # OpenAI's processing tiers
    prompt_cache_key: _Ignored = UNSET  # a routing hint for OpenAI's prompt cache
    prompt_cache_retention: _Ignored = UNSET  # how long OpenAI keeps that cache
    safety_identifier: _Ignored = UNSET  # OpenAI's abuse-monitoring id for the end user
    stream_options: _Ignored = UNSET  # `include_obfuscation`: padding OpenAI adds to deltas
    max_tool_calls: _Ignored = UNSET  # caps built-in tool calls, which translated requests cannot make
    # Gateway-only members: the handler reads them.
    meta: _Ignored = UNSET
    usage: _Ignored = UNSET
    provider: _Ignored = UNSET
    provider_options: _Ignored = UNSET
    debug: _Ignored = UNSET
    echo_upstream_request: _Ignored = UNSET
    session_id: _Ignored = UNSET


assert set(GATEWAY_FIELDS) <= set(RequestView.__struct_fields__)

# Responses members only OpenAI models take (not in the neutral form, not safe to ignore).
_OPENAI_ONLY: Final = frozenset(
    {"context_management", "moderation", "prompt_cache_options", "image", "access_programs", "background_options"}
)
_STATEFUL: Final = ("previous_response_id", "conversation", "background", "prompt")
_TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
_TEXT_PARTS: Final = frozenset({"input_text", "output_text"})

_view_decoder = msgspec.json.Decoder(RequestView)
_members_decoder = msgspec.json.Decoder(dict[str, Raw])
_encoder = msgspec.json.Encoder()


def _invalid(message: str, param: str | None) -> GatewayError:
    return GatewayError(Code.invalid_request, message, param=param)


def _needs_openai(what: str, param: str) -> GatewayError:
    return _invalid(
        f"{what} needs an OpenAI model: only OpenAI runs it behind /v1/responses. Remove it, or ask an OpenAI model.",
        param,
    )


def _without_unknown_members(body: bytes, drop_params: bool) -> bytes:
    """`body` without the OpenAI-only members, when `drop_params` allows; else the 400 naming what is unknown."""
    members = _members_decoder.decode(body)
    names = [name for name in members if name not in RequestView.__struct_fields__]
    unknown = [name for name in names if name not in _OPENAI_ONLY]
    if unknown:  # a typo, or a parameter this gateway does not know: never dropped silently
        listed = ", ".join(f"`{name}`" for name in unknown)
        raise _invalid(f"Unknown parameter{'s' if len(unknown) > 1 else ''}: {listed}.", unknown[0])
    if not drop_params:
        raise _needs_openai(f"The parameter `{names[0]}`", names[0])
    for name in names:
        del members[name]
    return _encoder.encode(members)


def _view(body: bytes, drop_params: bool) -> RequestView:
    try:
        return _view_decoder.decode(body)
    except msgspec.ValidationError as e:
        message, _, where = str(e).partition(" - at ")
        if message.startswith("Object contains unknown field") and where.strip("`") in ("", "$"):
            return _view_decoder.decode(_without_unknown_members(body, drop_params))
        param = where.strip("`").removeprefix("$.").removeprefix("$") or None
        raise _invalid(f"Invalid request: {message}" + (f" at {param}" if param else ""), param) from None


def decode_request(body: bytes, drop_params: bool = False) -> ChatRequest:
    """A Responses request body → the neutral request; GatewayError(400) naming what is wrong.

    With `drop_params` (the provider's setting), what only OpenAI can honour is left out instead: its
    top-level parameters, built-in tools (and a `tool_choice` naming one), and the history items of
    built-in tool calls. Stateful parameters and content parts (files, audio) still answer 400: dropping
    them would silently change the conversation itself.
    """
    return _neutral(decode_body(lambda data: _view(data, drop_params), body), drop_params)


def _neutral(view: RequestView, drop_params: bool) -> ChatRequest:
    for name in _STATEFUL:
        value = getattr(view, name)
        if isinstance(value, Raw):
            value = None if bytes(value).strip() == b"null" else value
        if value not in (None, False, UNSET):
            raise _invalid(
                f"The parameter `{name}` is not supported for non-OpenAI models: the gateway does not keep "
                f"conversation state for them. Send the full conversation in `input` instead.",
                name,
            )
    if view.input is UNSET:
        raise _invalid("The parameter `input` is required.", "input")
    messages = [Message(role="system", content=view.instructions)] if view.instructions else []
    if isinstance(view.input, str):
        messages.append(Message(role="user", content=view.input))
    else:
        _messages(view.input, messages, drop_params)
    if not messages:
        raise _invalid("The parameter `input` holds no message.", "input")
    return ChatRequest(
        model=view.model,
        messages=messages,
        stream=bool(view.stream),
        max_completion_tokens=view.max_output_tokens,
        temperature=view.temperature,
        top_p=view.top_p,
        tools=_tools(view.tools, drop_params) if view.tools else None,
        tool_choice=_tool_choice(view.tool_choice, drop_params),
        parallel_tool_calls=view.parallel_tool_calls,
        response_format=_response_format(view.text.format) if view.text and view.text.format else None,
        reasoning_effort=view.reasoning.effort if view.reasoning else None,
        user=view.user,
        metadata=view.metadata,
    )


def _messages(items: list[_Item], out: list[Message], drop_params: bool) -> None:
    for i, item in enumerate(items):
        kind = item.type or ("message" if item.role else None)
        where = f"input[{i}]"
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            if not item.call_id or not item.name:
                raise _invalid(f"A `function_call` item needs `call_id` and `name` (at {where}).", where)
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments or "{}"))
            last = out[-1] if out else None
            # One assistant turn in Chat terms: its text and the calls that follow it (reasoning items,
            # dropped, do not separate them).
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or ()), call]
            else:
                out.append(Message(role="assistant", tool_calls=[call]))
        elif kind == "function_call_output":
            if not item.call_id:
                raise _invalid(f"A `function_call_output` item needs `call_id` (at {where}).", where)
            out.append(Message(role="tool", tool_call_id=item.call_id, content=_tool_output(item.output, where)))
        elif kind == "reasoning":
            continue  # state bound to the model that wrote it (often encrypted): no other provider can read it
        elif kind is None:
            raise _invalid(f"An input item needs a `type` or a `role` (at {where}).", where)
        elif not drop_params or kind == "item_reference":  # a reference to stored state is never dropped
            raise _invalid(
                f"Input items of type `{kind}` are not supported for non-OpenAI models (at {where}); "
                f"they belong to OpenAI's built-in tools or stored state.",
                f"{where}.type",
            )
        # else: a built-in tool's call or output in the history, dropped with `drop_params`


def _message(item: _Item, where: str) -> Message:
    role = item.role
    if role not in ("user", "assistant", "system", "developer"):
        raise _invalid(f"Unknown message role {role!r} (at {where}.role).", f"{where}.role")
    content = item.content
    if content is None:
        raise _invalid(f"A message needs `content` (at {where}).", f"{where}.content")
    if isinstance(content, str):
        return Message(role=role, content=content)
    parts: list[ContentPart] = []
    refusal: list[str] = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if part.type == "refusal" and role == "assistant":
            refusal.append(part.refusal or "")
        elif part.type == "input_image" and role != "assistant":
            parts.append(_image(part, here))
        else:
            parts.append(_text_part(part, here))
    if len(parts) == 1 and parts[0].type == "text":
        text: str | list[ContentPart] | None = parts[0].text
    else:
        text = parts or None
    return Message(role=role, content=text, refusal="".join(refusal) if refusal else None)


def _text_part(part: _Part, where: str) -> ContentPart:
    if part.type not in _TEXT_PARTS:
        raise _invalid(
            f"Content parts of type `{part.type}` are not supported here for non-OpenAI models (at {where}).",
            f"{where}.type",
        )
    if part.text is None:
        raise _invalid(f"A `{part.type}` part needs `text` (at {where}).", f"{where}.text")
    return ContentPart(type="text", text=part.text)


def _image(part: _Part, where: str) -> ContentPart:
    if not part.image_url:
        if part.file_id:  # an OpenAI Files id: only OpenAI can resolve it
            raise _needs_openai(f"An image given by `file_id` (at {where})", f"{where}.file_id")
        raise _invalid(f"An `input_image` part needs `image_url` (at {where}).", f"{where}.image_url")
    return ContentPart(type="image_url", image_url=ImageURL(url=part.image_url, detail=part.detail))


def _tool_output(output: str | list[_Part] | dict[str, Any] | None, where: str) -> str | list[ContentPart]:
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise _invalid(
            f"A `function_call_output` needs `output`: a string or a list of parts (at {where}.output).",
            f"{where}.output",
        )
    here = f"{where}.output"
    return [
        _image(part, f"{here}[{j}]") if part.type == "input_image" else _text_part(part, f"{here}[{j}]")
        for j, part in enumerate(output)
    ]


def _tools(tools: list[_ToolView], drop_params: bool) -> list[Tool] | None:
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            if drop_params:
                continue
            raise _needs_openai(f"The built-in tool `{tool.type}` (at tools[{i}])", f"tools[{i}].type")
        if not tool.name:
            raise _invalid(f"A function tool needs a `name` (at tools[{i}]).", f"tools[{i}].name")
        out.append(
            Tool(
                function=FunctionDef(
                    name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
                )
            )
        )
    return out or None


def _tool_choice(choice: str | _ToolChoiceView | None, drop_params: bool) -> str | NamedToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise _invalid(
                f"Invalid `tool_choice` {choice!r}: expected auto, none, required or a function.", "tool_choice"
            )
        return choice
    if choice.type != "function":
        if drop_params:
            return None
        raise _needs_openai(f"`tool_choice` of type `{choice.type}`", "tool_choice.type")
    if not choice.name:
        raise _invalid("A function `tool_choice` needs a `name`.", "tool_choice.name")
    return NamedToolChoice(function=ToolChoiceFunction(name=choice.name))


def _response_format(fmt: _FormatView) -> ResponseFormat | None:
    if fmt.type == "text":
        return None  # the default: nothing to ask of the provider
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise _invalid("A `json_schema` text format needs a `schema`.", "text.format.schema")
        return ResponseFormat(
            type="json_schema",
            json_schema=JSONSchema(
                name=fmt.name or "response", description=fmt.description, schema=fmt.schema, strict=fmt.strict
            ),
        )
    raise _invalid(f"Unknown text format type {fmt.type!r}.", "text.format.type")


# ---------------------------------------------------------------------------------------------------------
# answers: the response object, whole or streamed


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens or usage.input_tokens + usage.output_tokens,
    }


# finish_reason → (status, incomplete reason). `length` and `content_filter` end a response early.
_INCOMPLETE: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}
_ID_PREFIXES: Final = ("chatcmpl-", "resp_", "msg_")


def _base_id(upstream_id: str) -> str:
    """A stable stem for the response's and its items' ids, from the provider's answer id."""
    for prefix in _ID_PREFIXES:
        if upstream_id.startswith(prefix):
            upstream_id = upstream_id[len(prefix) :]
            break
    return upstream_id or os.urandom(12).hex()


# What OpenAI's Response object echoes of the request. A translated answer echoes the same: what the
# request set, else the API's defaults below (null where the neutral answer cannot know).
ECHOED: Final = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "reasoning",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
)


def request_echo(body: bytes) -> dict[str, Any]:
    """The members of a Responses request (already checked by `decode_request`) that its answer echoes."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return {name: fields[name] for name in ECHOED if fields.get(name) is not None} if isinstance(fields, dict) else {}


def _response(
    base: str,
    created: int,
    model: str,
    status: str,
    reason: str | None,
    output: list,
    usage: Usage | None,
    echo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object: the request's echoed members (`request_echo`) over the API's defaults."""
    response = {
        "id": "resp_" + base,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": None,
        "text": None,
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "usage": _usage(usage),
        "user": None,
        "metadata": {},
    }
    if echo:
        response.update(echo)
    return response


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def _text_content(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "content": content, "role": "assistant"}


def _call_item(item_id: str, status: str, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    reason = _INCOMPLETE.get(finish_reason or "")
    return ("incomplete", reason) if reason else ("completed", None)


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


def render_response(
    resp: ChatResponse, usage: Usage | None, model: str, extra: bytes, echo: dict[str, Any] | None = None
) -> bytes:
    """A whole neutral answer → the Responses `response` object (echoing `echo`), with `extra` spliced in."""
    base = _base_id(resp.id)
    choice = resp.choices[0] if resp.choices else None
    status, reason = _status(choice.finish_reason if choice else None)
    output: list[dict[str, Any]] = []
    if choice is not None:
        message = choice.message
        if message.reasoning_content:
            output.append(_reasoning_item(f"rs_{base}_{len(output)}", message.reasoning_content))
        content = []
        text = _text_of(message.content)
        if text:
            content.append(_text_content(text))
        if message.refusal:
            content.append({"type": "refusal", "refusal": message.refusal})
        if content:
            output.append(_message_item(f"msg_{base}_{len(output)}", status, content))
        for i, call in enumerate(message.tool_calls or ()):
            fn = call.function
            call_id = call.id or f"call_{base}_{i}"
            output.append(_call_item(f"fc_{base}_{len(output)}", "completed", call_id, fn.name, fn.arguments))
    body = orjson.dumps(_response(base, resp.created, model, status, reason, output, usage, echo))
    return inject_members(body, extra)


_REASONING: Final = 1
_MESSAGE: Final = 2
_CALL: Final = 3


@final
class ResponsesWriter:
    """Neutral chunks → a Responses event stream (see `StreamWriter`).

    One output item is open at a time: reasoning, a message (its text then refusal parts), or a function
    call. It closes when another kind (or another call) starts, or at `finish`. The closed items are kept
    to make the final `response` object.
    """

    __slots__ = (
        "_base",
        "_call",
        "_content",
        "_created",
        "_echo",
        "_finish_reason",
        "_index",
        "_open",
        "_output",
        "_part",
        "_seq",
        "_started",
        "_texts",
        "_where",
        "model",
    )

    def __init__(self, model: str, wants_usage: bool = True, echo: dict[str, Any] | None = None):
        self.model = model  # `wants_usage` does not matter: Responses always carry usage
        self._echo = echo  # the request's echoed members (`request_echo`)
        self._seq = 0
        self._started = False
        self._base = ""
        self._created = 0
        self._output: list[dict[str, Any]] = []  # closed items, in their final form
        self._open = 0  # the kind of the open item, 0 when none
        self._index = -1  # the open item's output_index
        self._where: dict[str, Any] = {}  # the open item's `item_id` and `output_index`, for its events
        self._texts: list[str] = []  # fragments of the open part (or reasoning, or arguments)
        self._part = ""  # the open message part's type: output_text or refusal
        self._content: list[dict[str, Any]] = []  # the open message's closed parts
        self._call: tuple[int, str, str] = (-1, "", "")  # the open call: (neutral index, call_id, name)
        self._finish_reason: str | None = None

    def _emit(self, out: list[bytes], kind: str, **members: Any) -> None:
        event = {"type": kind, "sequence_number": self._seq, **members}
        self._seq += 1
        out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")

    def _start(self, out: list[bytes], upstream_id: str, created: int) -> None:
        self._started = True
        self._base = _base_id(upstream_id)
        self._created = created or int(time.time())
        response = _response(self._base, self._created, self.model, "in_progress", None, [], None, self._echo)
        self._emit(out, "response.created", response=response)
        self._emit(out, "response.in_progress", response=response)

    def write(self, chunks: list[ChatChunk]) -> bytes:
        out: list[bytes] = []
        for chunk in chunks:
            if not self._started:
                self._start(out, chunk.id, chunk.created)
            for choice in chunk.choices:
                if choice.index:  # Responses have one answer; `n` is never asked for
                    continue
                delta = choice.delta
                if delta.reasoning_content:
                    self._reasoning(out, delta.reasoning_content)
                if delta.content:
                    self._text(out, "output_text", delta.content)
                if delta.refusal:
                    self._text(out, "refusal", delta.refusal)
                for call in delta.tool_calls or ():
                    self._tool_call(out, call)
                if choice.finish_reason:
                    self._finish_reason = choice.finish_reason
        return b"".join(out)

    def _open_item(self, out: list[bytes], kind: int, item: dict[str, Any]) -> None:
        self._open = kind
        self._index = len(self._output)
        self._where = {"item_id": item["id"], "output_index": self._index}
        self._emit(out, "response.output_item.added", output_index=self._index, item=item)

    def _reasoning(self, out: list[bytes], text: str) -> None:
        if self._open != _REASONING:
            self._close(out)
            item = {"id": f"rs_{self._base}_{len(self._output)}", "type": "reasoning", "summary": []}
            self._open_item(out, _REASONING, item)
            part = {"type": "summary_text", "text": ""}
            self._emit(out, "response.reasoning_summary_part.added", **self._where, summary_index=0, part=part)
        self._texts.append(text)
        self._emit(out, "response.reasoning_summary_text.delta", **self._where, summary_index=0, delta=text)

    def _text(self, out: list[bytes], part: str, text: str) -> None:
        if self._open != _MESSAGE:
            self._close(out)
            self._open_item(out, _MESSAGE, _message_item(f"msg_{self._base}_{len(self._output)}", "in_progress", []))
        if self._part != part:
            self._close_part(out)
            self._part = part
            empty = _text_content("") if part == "output_text" else {"type": "refusal", "refusal": ""}
            where = {**self._where, "content_index": len(self._content)}
            self._emit(out, "response.content_part.added", **where, part=empty)
        else:
            where = {**self._where, "content_index": len(self._content)}
        self._texts.append(text)
        if part == "output_text":
            self._emit(out, "response.output_text.delta", **where, delta=text, logprobs=[])
        else:
            self._emit(out, "response.refusal.delta", **where, delta=text)

    def _tool_call(self, out: list[bytes], delta: ToolCallDelta) -> None:
        fn = delta.function
        if self._open != _CALL or delta.index != self._call[0]:
            # Calls are streamed one after another (every provider reader emits them so).
            self._close(out)
            call_id = delta.id or f"call_{self._base}_{delta.index}"
            name = (fn.name if fn else None) or ""
            self._call = (delta.index, call_id, name)
            item_id = f"fc_{self._base}_{len(self._output)}"
            self._open_item(out, _CALL, _call_item(item_id, "in_progress", call_id, name, ""))
        elif fn is not None and fn.name and not self._call[2]:
            self._call = (self._call[0], self._call[1], fn.name)  # a name that came after the first delta
        if fn is not None and fn.arguments:
            self._texts.append(fn.arguments)
            self._emit(out, "response.function_call_arguments.delta", **self._where, delta=fn.arguments)

    def _close_part(self, out: list[bytes]) -> None:
        if not self._part:
            return
        text = "".join(self._texts)
        self._texts.clear()
        where = {**self._where, "content_index": len(self._content)}
        if self._part == "output_text":
            self._emit(out, "response.output_text.done", **where, text=text, logprobs=[])
            part = _text_content(text)
        else:
            self._emit(out, "response.refusal.done", **where, refusal=text)
            part = {"type": "refusal", "refusal": text}
        self._emit(out, "response.content_part.done", **where, part=part)
        self._content.append(part)
        self._part = ""

    def _close(self, out: list[bytes], status: str = "completed") -> None:
        if not self._open:
            return
        item_id = self._where["item_id"]
        if self._open == _MESSAGE:
            self._close_part(out)
            item = _message_item(item_id, status, self._content)
            self._content = []
        else:
            text = "".join(self._texts)
            self._texts.clear()
            if self._open == _REASONING:
                self._emit(out, "response.reasoning_summary_text.done", **self._where, summary_index=0, text=text)
                part = {"type": "summary_text", "text": text}
                self._emit(out, "response.reasoning_summary_part.done", **self._where, summary_index=0, part=part)
                item = _reasoning_item(item_id, text)
            else:
                self._emit(out, "response.function_call_arguments.done", **self._where, arguments=text)
                _, call_id, name = self._call
                item = _call_item(item_id, status, call_id, name, text)
        self._emit(out, "response.output_item.done", output_index=self._index, item=item)
        self._output.append(item)
        self._open = 0

    def finish(self, usage: Usage | None, extra: bytes) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._start(out, "", 0)
        status, reason = _status(self._finish_reason)
        self._close(out, status)
        kind = b"response.incomplete" if reason else b"response.completed"
        body = orjson.dumps(
            _response(self._base, self._created, self.model, status, reason, self._output, usage, self._echo)
        )
        out.append(
            b"event: "
            + kind
            + b'\ndata: {"type":"'
            + kind
            + b'","sequence_number":'
            + str(self._seq).encode()
            + b',"response":'
            + inject_members(body, extra)
            + b"}\n\n"
        )
        self._seq += 1
        return b"".join(out)

    def error(self, err: GatewayError, request_id: str) -> bytes:
        out: list[bytes] = []
        if not self._started:  # the SDK's stream helpers expect `response.created` first
            self._start(out, "", 0)
        out.append(error_event(err, self._seq))
        self._seq += 1
        return b"".join(out)


def error_event(err: GatewayError, sequence_number: int) -> bytes:
    """The Responses `error` event (the SDK's `ResponseErrorEvent`)."""
    payload = {
        "type": "error",
        "sequence_number": sequence_number,
        "code": err.code.name,
        "message": err.message,
        "param": err.param,
    }
    return b"event: error\n" + data_event(orjson.dumps(payload))


def writer(model: str, wants_usage: bool, echo: dict[str, Any] | None = None) -> StreamWriter:
    return ResponsesWriter(model, wants_usage, echo)


SURFACE: Final = SurfaceTranslator(
    name=NAME,
    dialect=OPENAI,
    decode_request=decode_request,
    render_response=render_response,
    writer=writer,
)
