"""What a traced request asked and was answered, as the OpenTelemetry GenAI conventions record it.

`finish_reasons` reads the reasons the model stopped from the answer the client got (for a traced request
whose reasons were not read with its usage: `bytes.find` and a regular expression over its bytes, cheap).
`messages` (only with `telemetry.traces.capture_content`) reads the request as the gateway sent it on (after any
guardrail redaction) and the client's answer, whole or streamed, through the surfaces' own decoders
(`proxy.translators`), and gives the conventions' attributes: `gen_ai.system_instructions` (the Messages API's
`system`, the Responses API's `instructions`), `gen_ai.input.messages` and `gen_ai.output.messages`, each a JSON
text of role and parts, its texts cut so that each attribute carries at most `limit` characters of them: in the
trace exporter process, never while serving.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from proxy.errors import GatewayError
from proxy.translators import replay
from proxy.translators.exchange import SURFACES
from proxy.translators.neutral import ContentPart, Message

# A reason is a JSON string in the answer's own bytes: inside a text it would be escaped (\"), never matched.
# Each member's name is found with `bytes.find` (much faster than a regular expression's scan over a long
# answer or stream end), its value read where it is found.
_FINISH: Final = {
    "openai.chat": (b'"finish_reason"', re.compile(rb'"finish_reason":\s*"([A-Za-z0-9_.-]{1,64})"')),
    "anthropic.messages": (b'"stop_reason"', re.compile(rb'"stop_reason":\s*"([A-Za-z0-9_.-]{1,64})"')),
}
_INCOMPLETE: Final = re.compile(rb'"incomplete_details":\s*\{\s*"reason":\s*"([A-Za-z0-9_.-]{1,64})"')
_RESPONSE_STATUS: Final = re.compile(rb'"status":\s*"(completed|incomplete|failed|cancelled)"')
_RESPONSE_END: Final = re.compile(rb'"type":\s*"response\.(completed|incomplete|failed)"')
_CUT: Final = "…[truncated]"
_TOOL_CALL: Final = "tool_call"  # the conventions' finish reason where Chat Completions says `tool_calls`
_SPLIT_SYSTEM: Final = frozenset({"anthropic.messages", "openai.responses"})  # instructions apart from messages


def finish_reasons(surface: str, answer: bytes, streamed: bool) -> tuple[str, ...]:
    """Why the model stopped, per choice: the provider's words (`stop`, `length`, `end_turn`, `tool_use`, …);
    for the Responses API, the incomplete reason or the response's status."""
    if surface == "openai.responses":
        found = _INCOMPLETE.search(answer) or (_RESPONSE_END if streamed else _RESPONSE_STATUS).search(answer)
        return (found[1].decode(),) if found else ()
    found = _FINISH.get(surface)
    if found is None:
        return ()
    name, pattern = found
    reasons = []
    at = answer.find(name)
    while at >= 0:
        value = pattern.match(answer, at)
        if value is not None:
            reasons.append(value[1].decode())
        at = answer.find(name, at + len(name))
    return tuple(reasons)


def messages(surface: str, sent: bytes, answer: bytes, streamed: bool, limit: int) -> list[tuple[str, str]]:
    """The content attributes of a request's server span: (name, JSON text) pairs; none for a surface whose
    content the conventions do not describe (embeddings, media) or that cannot be read."""
    translator = SURFACES.get(surface)
    if translator is None:
        return []
    out: list[tuple[str, str]] = []
    try:
        request = translator.decode_request(sent)
    except (GatewayError, ValueError):
        request = None
    if request is not None:
        system: list[dict[str, Any]] = []
        inputs: list[dict[str, Any]] = []
        for message in request.messages:
            if surface in _SPLIT_SYSTEM and message.role in ("system", "developer"):
                system += _parts(message)
            else:
                inputs.append(_message(message))
        if system:
            out.append(("gen_ai.system_instructions", _dumps(system, limit)))
        out.append(("gen_ai.input.messages", _dumps(inputs, limit)))
    try:
        read = replay.stream_answer(surface, answer) if streamed else replay.answer_of(surface, answer)
    except (GatewayError, ValueError):
        read = None
    if read is not None:
        outputs = []
        for choice in read[0].choices:
            message = _message(choice.message)
            reason = choice.finish_reason or ""
            message["finish_reason"] = _TOOL_CALL if reason in ("tool_calls", "function_call") else reason
            outputs.append(message)
        out.append(("gen_ai.output.messages", _dumps(outputs, limit)))
    return out


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "parts": _parts(message)}
    if message.name:
        out["name"] = message.name
    return out


def _parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if message.reasoning_content:
        parts.append({"type": "reasoning", "content": message.reasoning_content})
    content = message.content
    if message.role == "tool":
        parts.append({"type": "tool_call_response", "id": message.tool_call_id or "", "response": _text(content)})
    elif isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif content:
        parts += [_part(part) for part in content]
    if message.refusal:
        parts.append({"type": "text", "content": message.refusal})
    for call in message.tool_calls or ():
        parts.append(
            {
                "type": "tool_call",
                "id": call.id,
                "name": call.function.name,
                "arguments": _arguments(call.function.arguments),
            }
        )
    return parts


def _part(part: ContentPart) -> dict[str, Any]:
    if part.text is not None:
        return {"type": "text", "content": part.text}
    if part.image_url is not None:
        url = part.image_url.url
        if url.startswith("data:"):  # inline bytes: their type only, never the bytes
            return {"type": "blob", "modality": "image", "mime_type": url[5:].split(";", 1)[0]}
        return {"type": "uri", "modality": "image", "uri": url}
    return {"type": part.type}


def _text(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content or ())


def _arguments(text: str) -> Any:
    try:
        return orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return text


def _dumps(value: list[dict[str, Any]], limit: int) -> str:
    """JSON text of messages (or of parts), their texts cut so that they add up to at most `limit` characters;
    tool arguments count as their JSON text, and are cut as such."""
    left = limit

    def text(node: Any) -> Any:
        nonlocal left
        if not isinstance(node, str):
            as_text = orjson.dumps(node).decode()
            if len(as_text) <= left:
                left -= len(as_text)
                return node
            node = as_text
        if len(node) <= left:
            left -= len(node)
            return node
        kept, left = node[:left], 0
        return kept + _CUT

    def part(found: dict[str, Any]) -> dict[str, Any]:
        return {k: text(v) if k in ("content", "response", "arguments") else v for k, v in found.items()}

    cut = [{**item, "parts": [part(p) for p in item["parts"]]} if "parts" in item else part(item) for item in value]
    return orjson.dumps(cut).decode()
