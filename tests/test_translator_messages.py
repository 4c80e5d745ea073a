"""proxy.translators.messages: the Anthropic Messages surface, checked against wire transcripts and the SDK."""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec
import orjson
import pytest
from anthropic._models import construct_type
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message as SDKMessage
from anthropic.types import RawMessageStreamEvent

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.sse import split_events
from proxy.translators.messages import SURFACE, decode_request, render_response, writer
from proxy.translators.neutral import ChatChunk, ChatRequest, ChatResponse

FIXTURES = Path(__file__).parent / "fixtures" / "messages"


def _cases(folder: str) -> list[Path]:
    return sorted((FIXTURES / folder).glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_surface_registration() -> None:
    assert SURFACE.name == "anthropic.messages"
    assert SURFACE.dialect == "anthropic"
    assert SURFACE.decode_request is decode_request
    assert SURFACE.render_response is render_response


# ---------------------------------------------------------------------------------------------------------
# decode_request

DECODE = _cases("decode")


@pytest.mark.parametrize("path", DECODE, ids=_ids(DECODE))
def test_decode(path: Path) -> None:
    case = _load(path)
    got = decode_request(orjson.dumps(case["request"]))
    assert got == msgspec.convert(case["neutral"], ChatRequest)  # Struct equality: field by field


def test_decode_ignores_whitespace_and_key_order() -> None:
    case = _load(FIXTURES / "decode" / "tool_history.json")
    pretty = json.dumps(dict(reversed(list(case["request"].items()))), indent=2).encode()
    assert decode_request(pretty) == decode_request(orjson.dumps(case["request"]))


ERRORS = _load(FIXTURES / "decode_errors.json")


@pytest.mark.parametrize("case", ERRORS, ids=[c["id"] for c in ERRORS])
def test_decode_errors(case: dict[str, Any]) -> None:
    body = case["raw"].encode() if "raw" in case else orjson.dumps(case["body"])
    with pytest.raises(GatewayError) as info:
        decode_request(body)
    err = info.value
    assert err.code is Code[case.get("code", "invalid_request")]
    assert err.status == 400
    assert err.param == case["param"]
    for fragment in case["fragments"]:
        assert fragment in err.message, err.message


def _minimal(**members: Any) -> bytes:
    return orjson.dumps({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **members})


@pytest.mark.parametrize(
    ("tool_choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any"}, "required", None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "none"}, "none", None),
        ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": False}, "get_weather", None),
    ],
    ids=["auto", "auto-serial", "any", "any-serial", "none", "named"],
)
def test_tool_choice(tool_choice: dict[str, Any], expected: str, parallel: bool | None) -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    got = decode_request(_minimal(tools=tools, tool_choice=tool_choice))
    choice = got.tool_choice
    assert (choice if isinstance(choice, str) else choice.function.name) == expected
    assert got.parallel_tool_calls is parallel


@pytest.mark.parametrize(
    ("members", "effort"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4095}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 16383}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 16384}}, "high"),
        ({"thinking": {"type": "enabled", "budget_tokens": 64000, "display": "summarized"}}, "high"),
        ({"thinking": {"type": "disabled"}}, None),
        ({"thinking": {"type": "adaptive"}}, None),
        ({}, None),
        ({"output_config": {"effort": "low"}}, "low"),
        ({"output_config": {"effort": "max"}}, "high"),
        ({"output_config": {"effort": "medium"}, "thinking": {"type": "enabled", "budget_tokens": 30000}}, "medium"),
    ],
)
def test_reasoning_effort(members: dict[str, Any], effort: str | None) -> None:
    assert decode_request(_minimal(**members)).reasoning_effort == effort


def test_non_streaming_request_asks_no_stream_options() -> None:
    got = decode_request(_minimal(stream=False))
    assert got.stream is False
    assert got.stream_options is None


def test_empty_stop_sequences_and_system_are_dropped() -> None:
    got = decode_request(_minimal(stop_sequences=[], system=""))
    assert got.stop is None
    assert [m.role for m in got.messages] == ["user"]


def test_user_turn_of_only_tool_results_adds_no_user_message() -> None:
    body = _minimal(
        messages=[
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]},
        ]
    )
    roles = [(m.role, m.content) for m in decode_request(body).messages]
    assert roles == [("assistant", None), ("tool", "42")]


def test_redacted_thinking_alone_keeps_an_assistant_turn() -> None:
    body = _minimal(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}]},
        ]
    )
    last = decode_request(body).messages[-1]
    assert (last.role, last.content, last.reasoning_content) == ("assistant", "", None)


# ---------------------------------------------------------------------------------------------------------
# render_response

RENDER = _cases("render")


def _render(case: dict[str, Any]) -> bytes:
    usage = msgspec.convert(case["usage"], Usage) if case["usage"] is not None else None
    response = msgspec.convert(case["neutral"], ChatResponse)
    return render_response(response, usage, case["model"], case["extra"].encode())


@pytest.mark.parametrize("path", RENDER, ids=_ids(RENDER))
def test_render(path: Path) -> None:
    case = _load(path)
    out = _render(case)
    body = orjson.loads(out)
    assert body == case["message"]
    assert list(body)[:8] == ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]
    message = SDKMessage.model_validate(body)  # the SDK's own model accepts it
    for block in message.content:
        if block.type == "tool_use":
            assert isinstance(block.input, dict)


@pytest.mark.parametrize("path", RENDER, ids=_ids(RENDER))
def test_render_through_the_sdk_client(path: Path) -> None:
    case = _load(path)
    body = _render(case)
    client = _client(lambda _request: httpx2.Response(200, content=body, headers={"content-type": "application/json"}))
    message = client.messages.create(model=case["model"], max_tokens=64, messages=[{"role": "user", "content": "x"}])
    assert message.model_dump(exclude_none=True, include=set(case["message"]) - {"meta", "cost_nanos", "currency"}) == {
        k: v for k, v in case["message"].items() if k not in ("meta", "cost_nanos", "currency") and v is not None
    }


# ---------------------------------------------------------------------------------------------------------
# streams

STREAMS = _cases("stream")


def _transcript(case: dict[str, Any]) -> bytes:
    w = writer(case["model"], False)
    out = [w.write(msgspec.convert(chunks, list[ChatChunk])) for chunks in case["writes"]]
    if case.get("error"):
        e = case["error"]
        err = GatewayError(Code[e["code"]], e["message"], status=e["status"], type=e["type"])
        out.append(w.error(err, e["request_id"]))
    else:
        usage = msgspec.convert(case["usage"], Usage) if case["usage"] is not None else None
        out.append(w.finish(usage, case["extra"].encode()))
    return b"".join(out)


@pytest.mark.parametrize("path", STREAMS, ids=_ids(STREAMS))
def test_stream_transcript(path: Path) -> None:
    expected = path.with_suffix(".sse").read_bytes()
    assert _transcript(_load(path)).decode() == expected.decode()


def _events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) for each SSE event, checking the framing the SDK's decoder relies on."""
    events = []
    for raw in split_events(stream):
        lines = raw.decode().strip("\n").split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), raw
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    return events


_ACCUMULATE_PARAMS = inspect.signature(accumulate_event).parameters


def _accumulate(stream: bytes) -> tuple[Any, list[str]]:
    """Feed the stream's events to the SDK's own accumulator: (the final message snapshot, event names)."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    extra = {"json_bufs": json_bufs} if "json_bufs" in _ACCUMULATE_PARAMS else {}
    names = []
    for name, data in _events(stream):
        names.append(name)
        if name == "error":
            break
        event = construct_type(type_=RawMessageStreamEvent, value=data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, **extra)
    return snapshot, names


def _check_message(message: Any, expected: dict[str, Any]) -> None:
    assert message.id == expected["id"]
    assert message.role == "assistant"
    texts = [b.text for b in message.content if b.type == "text"]
    assert "".join(texts) == expected["text"]
    thinking = [b.thinking for b in message.content if b.type == "thinking"]
    assert ("".join(thinking) if thinking else None) == expected["thinking"]
    tools = [b for b in message.content if b.type == "tool_use"]
    for block in tools:
        assert isinstance(block.input, dict)
    assert [{"id": b.id, "name": b.name, "input": b.input} for b in tools] == expected["tool_inputs"]
    assert message.stop_reason == expected["stop_reason"]
    usage = message.usage
    got_usage = {k: getattr(usage, k) for k in expected["usage"]}
    assert got_usage == expected["usage"]


@pytest.mark.parametrize("path", STREAMS, ids=_ids(STREAMS))
def test_stream_accumulates_in_the_sdk(path: Path) -> None:
    case = _load(path)
    message, names = _accumulate(_transcript(case))
    _check_message(message, case["sdk"])
    assert names[0] == "message_start"
    assert names[-1] == ("error" if case.get("error") else "message_stop")


@pytest.mark.parametrize("path", STREAMS, ids=_ids(STREAMS))
def test_stream_through_the_sdk_client(path: Path) -> None:
    """The `anthropic` client's own `messages.stream()` over the transcript (a mock transport: no network)."""
    case = _load(path)
    body = _transcript(case)
    client = _client(lambda _request: httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"}))
    kwargs: dict[str, Any] = {"model": case["model"], "max_tokens": 64, "messages": [{"role": "user", "content": "x"}]}
    if case.get("error"):
        with pytest.raises(anthropic.APIStatusError) as info, client.messages.stream(**kwargs) as stream:
            stream.get_final_message()
        assert "Overloaded" in str(info.value)
        return
    with client.messages.stream(**kwargs) as stream:
        message = stream.get_final_message()
    _check_message(message, case["sdk"])


def _client(handler: Any) -> anthropic.Anthropic:
    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        api_key="sk-test", base_url="http://gateway.test", http_client=httpx2.Client(transport=transport), max_retries=0
    )


def _chunk(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> ChatChunk:
    return msgspec.convert(
        {
            "id": "chatcmpl-1",
            "created": 1,
            "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
        },
        ChatChunk,
    )


def test_role_only_first_chunk_opens_no_block() -> None:
    w = writer("openai/gpt-4o-mini", True)
    out = w.write([_chunk({"role": "assistant", "content": ""})])
    assert [name for name, _ in _events(out)] == ["message_start"]
    assert w.write([_chunk({"content": ""})]) == b""


def test_empty_stream_still_finishes_cleanly() -> None:
    w = writer("openai/gpt-4o-mini", False)
    out = w.finish(None, b"")
    assert [name for name, _ in _events(out)] == ["message_start", "message_delta", "message_stop"]
    message, _ = _accumulate(out)
    assert message.content == []
    assert message.stop_reason == "end_turn"


def test_tool_call_without_id_and_interleaved_fragments() -> None:
    """A call with no id gets a stable one; a fragment for an earlier call still names that call's block."""
    w = writer("gemini/gemini-2.5-flash", False)
    out = w.write(
        [
            _chunk({"tool_calls": [{"index": 0, "function": {"name": "a", "arguments": '{"x":'}}]}),
            _chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "b", "arguments": "{}"}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            _chunk({"content": "ignored second answer"}, index=1),
            _chunk({}, finish_reason="stop"),
        ]
    )
    out += w.finish(Usage(input_tokens=3, output_tokens=2), b"")
    message, _ = _accumulate(out)
    assert [(b.id, b.name, b.input) for b in message.content] == [
        ("toolu_chatcmpl-1_0", "a", {"x": 1}),
        ("call_b", "b", {}),
    ]
    assert message.stop_reason == "tool_use"  # "stop" after tool calls, as Gemini finishes


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal"), (None, "end_turn")],
)
def test_stream_stop_reasons(finish_reason: str | None, stop_reason: str) -> None:
    w = writer("m", False)
    out = w.write([_chunk({"content": "x"}, finish_reason=finish_reason)]) + w.finish(None, b"")
    message, _ = _accumulate(out)
    assert message.stop_reason == stop_reason


def test_text_deltas_are_cheap() -> None:
    """A text delta costs a few microseconds (loose bound: a hundred)."""
    w = writer("openai/gpt-4o-mini", False)
    chunks = [[_chunk({"content": "token "})] for _ in range(20_000)]
    start = time.perf_counter()
    for batch in chunks:
        w.write(batch)
    assert (time.perf_counter() - start) / len(chunks) < 100e-6
