"""Gemini provider kind: the neutral form ⇄ the Google Generative Language API (v1beta).

Wire facts relied on (ai.google.dev/api: "Generating content", "Caching", "Function calling",
"Thinking", "Thought signatures", "Structured output", "Troubleshooting: error codes"):
- `POST /v1beta/models/{model}:generateContent`, or `:streamGenerateContent?alt=sse` for SSE, where
  every `data:` event is a whole `GenerateContentResponse` framed with CRLF; there is no `[DONE]`: the
  body ends after the event that carries the candidate's `finishReason`;
- turns are `contents[{role: user|model, parts[]}]`; the system prompt is a separate
  `systemInstruction`; a part is one of `text`, `inlineData`, `fileData`, `functionCall`,
  `functionResponse`; a part with `thought: true` is a thought summary;
- tool results are `functionResponse` parts in a user turn, matched to the call by function name;
- `usageMetadata.promptTokenCount` already includes `cachedContentTokenCount`; thinking tokens come
  apart, as `thoughtsTokenCount`, and are billed as output;
- errors are `{"error": {"code", "message", "status", "details"}}` (google.rpc.Status).
"""

from __future__ import annotations

import base64
import os
import time
import urllib.parse
from typing import Any, Final, final

import msgspec
import orjson

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.sse import EventBuffer
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

KIND: Final = "gemini"

FINISH_REASONS: Final = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}  # others (LANGUAGE, OTHER, MALFORMED_FUNCTION_CALL, …) → "stop"

# Neutral attribute → `generationConfig` member: the parameters that only change their name.
GENERATION_PARAMS: Final = (
    ("temperature", "temperature"),  # same 0-2 range as OpenAI
    ("top_p", "topP"),
    ("top_k", "topK"),
    ("max_output_tokens", "maxOutputTokens"),
    ("stop_sequences", "stopSequences"),
    ("n", "candidateCount"),
    ("seed", "seed"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
)

# Neutral parameters Gemini has no counterpart for, with the values it does honour.
UNSUPPORTED: Final[dict[str, tuple[Any, ...]]] = {
    "parallel_tool_calls": (None, True),  # no switch: Gemini may always answer several calls
}

# reasoning_effort → thinkingConfig, chosen by model family (docs "Thinking"). Gemini 1.x/2.x take a
# token budget ("Gemini 2.5 series models don't support thinkingLevel"): the budgets Google's own
# OpenAI-compatible endpoint maps efforts to (low 1K, medium 8K, high 24K; "none" → 0, thinking off,
# which 2.5 Pro refuses upstream). Gemini 3 and later take a level and cannot turn thinking off, so
# "none" asks for the least. `includeThoughts` brings thought summaries back as `thought: true` parts,
# which become `reasoning_content`.
THINKING_BUDGETS: Final = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
THINKING_LEVELS: Final = {"none": "minimal", "minimal": "minimal", "low": "low", "medium": "medium", "high": "high"}
_BUDGET_FAMILIES: Final = ("gemini-1", "gemini-2")

# Gemini 3 rejects a replayed `functionCall` part without the `thoughtSignature` it was issued with
# ("Function call is missing a thought_signature in functionCall parts", 400). The neutral form has
# nowhere to keep signatures, so replayed calls carry the sentinel the "Thought signatures" guide
# documents for history that did not come from Gemini.
SKIP_SIGNATURE: Final = "skip_thought_signature_validator"

# fileData needs a MIME type; an http(s) image URL rarely says one, so it is guessed from the extension.
_MIME_BY_EXTENSION: Final = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "heic": "image/heic",
    "heif": "image/heif",
    "pdf": "application/pdf",
}
DEFAULT_IMAGE_MIME: Final = "image/jpeg"


def auth_headers(api_key: str) -> dict[str, str]:
    return {"x-goog-api-key": api_key} if api_key else {}


# ---------------------------------------------------------------------------------------------------------
# requests


def resource(upstream_model: str) -> tuple[str, str]:
    """(collection, name) of a model given as `x`, `models/x` or `tunedModels/x`."""
    collection, sep, name = upstream_model.partition("/")
    if not sep or collection not in ("models", "tunedModels"):
        return "models", upstream_model
    return collection, name


def model_path(upstream_model: str, stream: bool, method: str = "") -> str:
    """`/v1beta/models/{model}:generateContent` (or the SSE stream, or another `method` such as `countTokens`),
    whether the model is given as `x`, `models/x` or `tunedModels/x`."""
    collection, name = resource(upstream_model)
    method = f":{method}" if method else ":streamGenerateContent?alt=sse" if stream else ":generateContent"
    return f"/v1beta/{collection}/{urllib.parse.quote(name, safe='')}{method}"


def _invalid(param: str, message: str) -> GatewayError:
    return GatewayError(Code.invalid_request, f"{param}: {message}", param=param)


def _text_of(message: Message, index: int, drop: bool, where: str) -> str:
    """The text of a message whose Gemini counterpart holds text only (`where` says which)."""
    if isinstance(message.content, str):
        return message.content
    text = []
    for j, part in enumerate(message.content or ()):
        if part.type == "text":
            text.append(part.text or "")
        elif not drop:
            raise unsupported(f"messages[{index}].content[{j}]", KIND, f"{part.type!r} parts in {where}")
    return "".join(text)


def _mime_from_url(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    _, dot, extension = path.rpartition(".")
    return _MIME_BY_EXTENSION.get(extension.lower(), DEFAULT_IMAGE_MIME) if dot else DEFAULT_IMAGE_MIME


def _image_part(url: str, param: str) -> dict[str, Any]:
    if not url.startswith("data:"):
        return {"fileData": {"mimeType": _mime_from_url(url), "fileUri": url}}
    header, sep, data = url.partition(",")
    if not sep:
        raise _invalid(param, "a data: URL needs a comma before its data.")
    mime = header[5:].split(";", 1)[0] or DEFAULT_IMAGE_MIME
    if ";base64" not in header:
        data = base64.b64encode(urllib.parse.unquote_to_bytes(data)).decode()
    return {"inlineData": {"mimeType": mime, "data": data}}


def _parts(message: Message, index: int, drop: bool) -> list[dict[str, Any]]:
    content = message.content
    if content is None:
        return []
    # Gemini rejects an empty text part ("empty text parameter"): empty strings are left out.
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if part.type == "text":
            if part.text:
                parts.append({"text": part.text})
        elif part.type == "image_url" and part.image_url is not None:
            parts.append(_image_part(part.image_url.url, f"messages[{index}].content[{j}].image_url"))
        elif not drop:
            raise unsupported(f"messages[{index}].content[{j}]", KIND, f"content parts of type {part.type!r}")
    return parts


def _args(arguments: str, param: str) -> Any:
    if not arguments.strip():
        return {}
    try:
        args = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise _invalid(param, "the arguments are not valid JSON; Gemini needs a JSON object.") from None
    if not isinstance(args, dict):
        raise _invalid(param, "the arguments must be a JSON object for Gemini.")
    return args


def _tool_response(text: str) -> dict[str, Any]:
    """A tool's output as `functionResponse.response`: an object as is, anything else under `result`."""
    if text.lstrip().startswith("{"):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
    return {"result": text}


def _contents(request: ChatRequest, drop: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system parts, turns): system and developer messages go to `systemInstruction`; tool results
    join a user turn; consecutive turns of one role are merged (Gemini wants them alternating)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name: a functionResponse names its function

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:  # a turn without parts is rejected upstream
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["parts"].extend(parts)
        else:
            turns.append({"role": role, "parts": parts})

    for i, message in enumerate(request.messages):
        role = message.role
        if role in ("system", "developer"):
            text = _text_of(message, i, drop, "a system message")
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _parts(message, i, drop))
        elif role == "assistant":
            # reasoning_content is not replayed: a thought part means nothing without its signature.
            parts = _parts(message, i, drop)
            for j, call in enumerate(message.tool_calls or ()):
                name = call.function.name
                names[call.id] = name
                part: dict[str, Any] = {
                    "functionCall": {
                        "name": name,
                        "args": _args(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments"),
                    }
                }
                if j == 0:  # the guide: the first functionCall part of each step carries the signature
                    part["thoughtSignature"] = SKIP_SIGNATURE
                parts.append(part)
            add("model", parts)
        elif role == "tool":
            name = names.get(message.tool_call_id or "") or message.name
            if not name:
                raise _invalid(
                    f"messages[{i}].tool_call_id",
                    f"no earlier assistant tool call has the id {message.tool_call_id!r}; "
                    "Gemini needs the function's name to accept its result.",
                )
            output = _text_of(message, i, drop, "a tool result")
            add("user", [{"functionResponse": {"name": name, "response": _tool_response(output)}}])
        else:
            raise _invalid(
                f"messages[{i}].role", f"unknown role {role!r} (expected system, developer, user, assistant, tool)."
            )
    if not turns:
        raise _invalid("messages", "Gemini needs at least one user or assistant message with content.")
    return system, turns


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    # `$schema` is metadata, but Gemini answers 400 "Unknown name \"$schema\"" for it.
    return {k: v for k, v in schema.items() if k != "$schema"} if "$schema" in schema else schema


def _tools(request: ChatRequest, drop: bool) -> list[dict[str, Any]] | None:
    declarations = []
    for i, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            if drop:
                continue
            raise unsupported(f"tools[{i}]", KIND, f"tools of type {tool.type!r}")
        function = tool.function
        declaration: dict[str, Any] = {"name": function.name}
        if function.description:
            declaration["description"] = function.description
        if function.parameters is not None:
            # `parameters` is an OpenAPI-subset Schema proto that rejects plain JSON Schema keywords
            # (`additionalProperties`, `$ref`, type lists: "Invalid JSON payload received. Unknown
            # name ..."); `parametersJsonSchema` (FunctionDeclaration, v1beta) takes JSON Schema as is.
            declaration["parametersJsonSchema"] = _schema(function.parameters)
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}] if declarations else None


_TOOL_MODES: Final = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


def _tool_config(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if isinstance(choice, str):
        mode = _TOOL_MODES.get(choice)
        if mode is None:
            raise _invalid("tool_choice", f"unknown value {choice!r} (expected auto, required, none or a function).")
        config: dict[str, Any] = {"mode": mode}
    else:
        config = {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}
    return {"functionCallingConfig": config}


def _thinking(effort: str, upstream_model: str) -> dict[str, Any] | None:
    name = upstream_model.rpartition("/")[2]
    if name.startswith(_BUDGET_FAMILIES):
        budget = THINKING_BUDGETS.get(effort)
        if budget is None:
            return None
        return {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}
    level = THINKING_LEVELS.get(effort)
    if level is None:
        return None
    return {"thinkingLevel": level} if effort == "none" else {"thinkingLevel": level, "includeThoughts": True}


def _generation_config(request: ChatRequest, upstream_model: str, stream: bool, drop: bool) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, member in GENERATION_PARAMS:
        value = getattr(request, name)
        if value is not None and value != []:
            config[member] = value
    n = request.n
    if stream and n is not None and n > 1:
        if not drop:
            raise unsupported("n", KIND, "a Gemini stream carries one candidate; use n > 1 without streaming")
        del config["candidateCount"]
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type not in ("json_object", "json_schema"):
            if not drop:
                raise unsupported("response_format", KIND, f"unknown type {fmt.type!r}")
        else:
            config["responseMimeType"] = "application/json"
            if fmt.json_schema is not None and fmt.json_schema.schema is not None:
                # `responseJsonSchema` takes JSON Schema as is; `responseSchema` is the OpenAPI subset.
                config["responseJsonSchema"] = _schema(fmt.json_schema.schema)
    if request.reasoning_effort is not None:
        thinking = _thinking(request.reasoning_effort, upstream_model)
        if thinking is not None:
            config["thinkingConfig"] = thinking
        elif not drop:
            raise unsupported(
                "reasoning_effort",
                KIND,
                f"unknown effort {request.reasoning_effort!r}; use minimal, low, medium or high",
            )
    return config


def build_request(
    request: ChatRequest, upstream_model: str, stream: bool, drop_params: bool, strict: bool = False
) -> UpstreamRequest:
    dropped = unhonoured(request, UNSUPPORTED, KIND, drop_params, strict)  # none of them is read below
    system, turns = _contents(request, drop_params)
    body: dict[str, Any] = {"contents": turns}
    if system:
        body["systemInstruction"] = {"parts": system}
    tools = _tools(request, drop_params)
    if tools is not None:
        body["tools"] = tools
        tool_config = _tool_config(request)
        if tool_config is not None:
            body["toolConfig"] = tool_config
    config = _generation_config(request, upstream_model, stream, drop_params)
    if config:
        body["generationConfig"] = config
    # `user` and `metadata` have no Gemini counterpart and change nothing in the answer: left out.
    return UpstreamRequest(path=model_path(upstream_model, stream), body=orjson.dumps(body), dropped=dropped)


# ---------------------------------------------------------------------------------------------------------
# answers: one GenerateContentResponse (a whole answer, or one stream event)


class GeminiUsage(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    cached_content_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0
    tool_use_prompt_token_count: int = 0
    total_token_count: int = 0

    def neutral(self) -> Usage:
        # Tool-use prompt tokens (code execution, search results) are prompt the model reads: input.
        prompt = self.prompt_token_count + self.tool_use_prompt_token_count
        output = self.candidates_token_count + self.thoughts_token_count
        return Usage(
            input_tokens=prompt,
            output_tokens=output,
            total_tokens=self.total_token_count or prompt + output,
            cached_input_tokens=self.cached_content_token_count,
            reasoning_tokens=self.thoughts_token_count,
        )


class _FunctionCall(msgspec.Struct):
    name: str = ""
    args: dict[str, Any] | None = None
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    index: int | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _ErrorDetail(msgspec.Struct):
    code: int = 0
    message: str = ""
    status: str = ""
    details: list[dict[str, Any]] = []


class _Answer(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: GeminiUsage | None = None
    model_version: str = ""
    response_id: str = ""
    error: _ErrorDetail | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)


def _new_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def _arguments(call: _FunctionCall) -> str:
    # Compact JSON text, as OpenAI sends arguments (Gemini sends an object, spaced).
    return orjson.dumps(call.args).decode() if call.args is not None else "{}"


def _finish(reason: str | None, has_calls: bool) -> str:
    finish = FINISH_REASONS.get(reason or "", "stop")
    return "tool_calls" if finish == "stop" and has_calls else finish


def _message(candidate: _Candidate) -> Message:
    text: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for part in candidate.content.parts if candidate.content is not None else ():
        if part.function_call is not None:
            call = part.function_call
            calls.append(
                ToolCall(
                    id=call.id or f"call_{len(calls)}",
                    function=FunctionCall(name=call.name, arguments=_arguments(call)),
                )
            )
        elif part.text is not None:
            (thoughts if part.thought else text).append(part.text)
    return Message(
        role="assistant",
        content="".join(text) if text or not calls else None,
        reasoning_content="".join(thoughts) or None,
        tool_calls=calls or None,
    )


def _bad(what: str) -> GatewayError:
    return GatewayError(Code.upstream_bad_response, f"Gemini answered {what}.")


def parse_response(body: bytes) -> tuple[ChatResponse, Usage | None]:
    try:
        answer = _answer_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad(f"with a body that is not a GenerateContentResponse JSON object ({e})") from None
    if answer.error is not None:
        raise _error(0, answer.error)
    choices = []
    for position, candidate in enumerate(answer.candidates):
        message = _message(candidate)
        choices.append(
            Choice(
                index=candidate.index if candidate.index is not None else position,
                message=message,
                finish_reason=_finish(candidate.finish_reason, bool(message.tool_calls)),
            )
        )
    if not choices:
        feedback = answer.prompt_feedback
        if feedback is None or not feedback.block_reason:
            raise _bad("without candidates or a prompt block reason; the upstream may be misconfigured")
        # The prompt itself was blocked: nothing was generated.
        choices.append(Choice(message=Message(role="assistant", content=""), finish_reason="content_filter"))
    response = ChatResponse(
        id=answer.response_id or _new_id(),
        created=int(time.time()),
        model=answer.model_version,
        choices=choices,
    )
    return response, answer.usage_metadata.neutral() if answer.usage_metadata is not None else None


# ---------------------------------------------------------------------------------------------------------
# errors

_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _error(status: int, detail: _ErrorDetail) -> GatewayError:
    if not 400 <= status <= 599:
        status = detail.code if 400 <= detail.code <= 599 else 502
    # A wrong key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID: shown as the 401 it means.
    if any(d.get("reason") == "API_KEY_INVALID" for d in detail.details if isinstance(d, dict)):
        status = 401
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return GatewayError(
        Code.upstream_error, f"Gemini: {detail.message or detail.status or 'error'}", status=status, type=kind
    )


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)
_error_list_decoder = msgspec.json.Decoder(list[_ErrorBody])


def parse_error(status: int, body: bytes) -> GatewayError | None:
    try:
        # A streaming call without `alt=sse` answers its error inside a JSON array.
        if body.lstrip()[:1] == b"[":
            items = _error_list_decoder.decode(body)
            parsed = items[0] if items else _ErrorBody()
        else:
            parsed = _error_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if parsed.error is None:
        return None
    return _error(status, parsed.error)


# ---------------------------------------------------------------------------------------------------------
# streams


def _payloads(complete: bytes) -> list[bytes]:
    """The `data` payloads of complete SSE events (data lines joined by LF; comments and other fields
    skipped). Gemini frames every event with CRLF, where `proxy.sse.split_events` walks a regex; one
    `splitlines` (CR, LF and CRLF alike, and never inside a JSON payload) costs a fraction of that."""
    out: list[bytes] = []
    lines: list[bytes] = []
    for line in complete.splitlines():
        if not line:
            if lines:
                out.append(lines[0] if len(lines) == 1 else b"\n".join(lines))
                lines = []
        elif line[:5] == b"data:":
            lines.append(line[6:] if line[5:6] == b" " else line[5:])
    if lines:
        out.append(lines[0] if len(lines) == 1 else b"\n".join(lines))
    return out


@final
class GeminiReader:
    """A `streamGenerateContent?alt=sse` stream → neutral chunks (see `StreamReader`)."""

    __slots__ = ("_buffer", "_calls", "_started", "created", "done", "events", "failure", "id", "model", "usage")

    def __init__(self) -> None:
        self._buffer = EventBuffer()
        self._calls: dict[int, int] = {}  # candidate index → tool calls seen so far
        self._started: set[int] = set()  # candidates whose first delta (with the role) went out
        self.done = False
        self.failure: GatewayError | None = None
        self.usage: Usage | None = None
        self.id = ""
        self.model = ""
        self.created = int(time.time())
        self.events = 0

    def feed(self, chunk: bytes) -> list[ChatChunk]:
        complete = self._buffer.feed(chunk)
        if not complete or self.failure is not None:
            return []
        out: list[ChatChunk] = []
        for data in _payloads(complete):
            self.events += 1
            try:
                answer = _answer_decoder.decode(data)
            except (msgspec.DecodeError, RecursionError):
                continue  # not ours to judge (e.g. a future event with another shape)
            converted = self._on(answer)
            if converted is not None:
                out.append(converted)
            if self.failure is not None:
                break
        return out

    def _on(self, answer: _Answer) -> ChatChunk | None:
        if answer.error is not None:
            self.failure = _error(0, answer.error)
            self.done = True
            return None
        if answer.usage_metadata is not None:  # each report covers the whole answer so far: the latest wins
            self.usage = answer.usage_metadata.neutral()
        if self.done:
            return None  # past the finish: only a later usage report is still of use
        if not self.id:
            self.id = answer.response_id or _new_id()
        if not self.model and answer.model_version:
            self.model = answer.model_version
        choices = [choice for position, c in enumerate(answer.candidates) if (choice := self._choice(position, c))]
        if not answer.candidates and answer.prompt_feedback is not None and answer.prompt_feedback.block_reason:
            choices.append(self._blocked())
        if not choices:
            return None
        return ChatChunk(id=self.id, created=self.created, model=self.model, choices=choices)

    def _choice(self, position: int, candidate: _Candidate) -> ChunkChoice | None:
        index = candidate.index if candidate.index is not None else position
        text: list[str] = []
        thoughts: list[str] = []
        calls: list[ToolCallDelta] = []
        for part in candidate.content.parts if candidate.content is not None else ():
            if part.function_call is not None:
                call = part.function_call
                n = self._calls.get(index, 0)
                self._calls[index] = n + 1
                calls.append(
                    ToolCallDelta(
                        index=n,
                        id=call.id or f"call_{n}",
                        type="function",
                        function=FunctionDelta(name=call.name, arguments=_arguments(call)),
                    )
                )
            elif part.text:
                (thoughts if part.thought else text).append(part.text)
        finish = None
        if candidate.finish_reason:
            finish = _finish(candidate.finish_reason, self._calls.get(index, 0) > 0)
            self.done = True
        if not (text or thoughts or calls or finish):
            return None
        delta = Delta(
            content="".join(text) or None, reasoning_content="".join(thoughts) or None, tool_calls=calls or None
        )
        if index not in self._started:
            self._started.add(index)
            delta.role = "assistant"
        return ChunkChoice(index=index, delta=delta, finish_reason=finish)

    def _blocked(self) -> ChunkChoice:
        """The prompt was blocked: no candidate comes, the stream ends with a content filter."""
        self.done = True
        delta = Delta(content="")
        if 0 not in self._started:
            self._started.add(0)
            delta.role = "assistant"
        return ChunkChoice(delta=delta, finish_reason="content_filter")


PROVIDER: Final = ProviderTranslator(
    kind=KIND,
    auth_headers=auth_headers,
    build_request=build_request,
    parse_response=parse_response,
    reader=GeminiReader,
    parse_error=parse_error,
)
