"""proxy.translators.responses: the Responses surface (decode, render, stream writer) and the native relay.

Cases are wire transcripts under tests/fixtures/responses/. Rendered bodies and written streams are also
checked with the official `openai` SDK: its `Response` model and its own stream accumulator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.sse import event_data, split_events
from proxy.translators.neutral import ChatChunk, ChatRequest, ChatResponse, StreamWriter
from proxy.translators.responses import SURFACE, decode_request, render_response, writer
from proxy.translators.responses_native import ResponsesPassthrough, response_usage

FIXTURES = Path(__file__).parent / "fixtures" / "responses"
_event_adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def _cases(folder: str, suffix: str = ".json") -> list[Path]:
    return sorted((FIXTURES / folder).glob("*" + suffix))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_surface_descriptor() -> None:
    assert SURFACE.name == "openai.responses"
    assert SURFACE.dialect == "openai"
    assert SURFACE.decode_request is decode_request
    assert SURFACE.render_response is render_response


# ---------------------------------------------------------------------------------------------------------
# decode_request


@pytest.mark.parametrize("path", _cases("decode"), ids=lambda p: p.stem)
def test_decode(path: Path) -> None:
    case = _load(path)
    body, drop_params = orjson.dumps(case["body"]), case.get("drop_params", False)
    if "expect" in case:
        assert decode_request(body, drop_params) == msgspec.convert(case["expect"], ChatRequest)
        return
    with pytest.raises(GatewayError) as info:
        decode_request(body, drop_params)
    err, want = info.value, case["error"]
    assert err.code is Code[want["code"]]
    assert err.status == 400
    assert err.param == want["param"]
    for fragment in want["fragments"]:
        assert fragment in err.message, err.message


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"", Code.invalid_json, "empty"),
        (b"{nope", Code.invalid_json, "not valid JSON"),
        (
            b'{"input":"x","tools":[{"type":"function","name":"f","parameters":{"a":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}}]}",
            Code.invalid_json,
            "too deeply",
        ),
        (b'{"input":' + b"[" * 100 + b"]" * 100 + b"}", Code.invalid_request, "at input[0]"),
    ],
    ids=["empty", "invalid", "too-deep", "array-item"],
)
def test_decode_broken_bodies(body: bytes, code: Code, fragment: str) -> None:
    with pytest.raises(GatewayError) as info:
        decode_request(body)
    assert info.value.code is code
    assert fragment in info.value.message


def test_decode_lists_every_unknown_member() -> None:
    with pytest.raises(GatewayError) as info:
        decode_request(b'{"input":"x","foo":1,"bar":2}')
    assert "`foo`" in info.value.message and "`bar`" in info.value.message


# ---------------------------------------------------------------------------------------------------------
# render_response


@pytest.mark.parametrize("path", _cases("render"), ids=lambda p: p.stem)
def test_render(path: Path) -> None:
    case = _load(path)
    resp = msgspec.convert(case["response"], ChatResponse)
    usage = msgspec.convert(case["usage"], Usage) if case["usage"] is not None else None
    extra = case["extra"].encode()
    body = render_response(resp, usage, case["model"], extra)
    assert orjson.loads(body) == case["expect"]
    if extra:  # spliced as given, not re-encoded
        assert body.endswith(b"," + extra + b"}")
    parsed = Response.model_validate_json(body)  # every member the SDK requires, with the right types
    texts = [part.text for item in case["expect"]["output"] if item["type"] == "message" for part in _text_parts(item)]
    assert parsed.output_text == "".join(texts)


def _text_parts(item: dict[str, Any]) -> list[Any]:
    return [msgspec.convert(part, _Text) for part in item["content"] if part["type"] == "output_text"]


class _Text(msgspec.Struct):
    type: str
    text: str
    annotations: list[Any]
    logprobs: list[Any]


# ---------------------------------------------------------------------------------------------------------
# the stream writer


def _write(case: dict[str, Any]) -> bytes:
    w: StreamWriter = writer(case["model"], False)
    out = b""
    for batch in case["batches"]:
        out += w.write(msgspec.convert(batch, list[ChatChunk]))
    if "finish" in case:
        finish = case["finish"]
        usage = msgspec.convert(finish["usage"], Usage) if finish["usage"] else None
        out += w.finish(usage, finish["extra"].encode())
    else:
        e = case["error"]
        out += w.error(GatewayError(Code[e["code"]], e["message"], param=e["param"]), "req_1")
    return out


def _events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in split_events(stream):
        first, _, _ = event.partition(b"\n")
        assert first.startswith(b"event: ")
        data = event_data(event)
        assert data is not None
        out.append((first[7:].decode(), orjson.loads(data)))
    return out


@pytest.mark.parametrize("path", _cases("stream"), ids=lambda p: p.stem)
def test_writer_transcript(path: Path) -> None:
    case = _load(path)
    out = _write(case)
    events = _events(out)
    if "expect_types" in case:  # no upstream chunk: ids and times are made up, so only the shape is fixed
        assert [kind for kind, _ in events] == case["expect_types"]
    else:
        assert out == path.with_suffix(".sse").read_bytes()
    for n, (kind, data) in enumerate(events):
        assert data["type"] == kind
        assert data["sequence_number"] == n
        _event_adapter.validate_python(data)  # strict: every field the SDK's event type requires
    _check_indices(events)
    if "error" in case:
        assert events[-1][0] == "error"
        assert events[-1][1]["code"] == case["error"]["code"]
        assert events[-1][1]["message"] == case["error"]["message"]


def _check_indices(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Items are numbered in order, and every event names the item and content part that are open."""
    ids: list[str] = []  # item ids by output_index
    parts: dict[int, int] = {}  # output_index → content parts added
    for kind, data in events:
        if kind == "response.output_item.added":
            assert data["output_index"] == len(ids)
            ids.append(data["item"]["id"])
        elif kind == "response.output_item.done":
            assert data["item"]["id"] == ids[data["output_index"]]
        elif "item_id" in data:
            assert data["item_id"] == ids[data["output_index"]]
            if kind == "response.content_part.added":
                assert data["content_index"] == parts.get(data["output_index"], 0)
                parts[data["output_index"]] = data["content_index"] + 1
            elif "content_index" in data:
                assert data["content_index"] == parts[data["output_index"]] - 1


@pytest.mark.parametrize("path", [p for p in _cases("stream") if "sdk" in _load(p)], ids=lambda p: p.stem)
def test_writer_output_through_the_sdk_accumulator(path: Path) -> None:
    case = _load(path)
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    final: Any = None
    for _, data in _events(_write(case)):
        for event in state.handle_event(construct_type(type_=ResponseStreamEvent, value=data)):
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    want = case["sdk"]
    assert final is not None
    assert final.status == want.get("status", "completed")
    assert final.output_text == want["output_text"]
    calls = [(item.call_id, item.name, item.arguments) for item in final.output if item.type == "function_call"]
    assert calls == [tuple(call) for call in want["calls"]]
    if final.status == "completed":
        assert final.usage is not None and final.usage.total_tokens == case["finish"]["usage"]["total_tokens"]


def test_writer_final_response_matches_render_shape() -> None:
    case = _load(FIXTURES / "stream" / "text.json")
    kind, data = _events(_write(case))[-1]
    assert kind == "response.completed"
    response = data["response"]
    assert response["meta"] == {"request_id": "req_9"} and response["cost_nanos"] == 7
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 20
    assert response["model"] == "anthropic/claude-sonnet-4-5"
    Response.model_validate(response)


def test_writer_finish_without_chunks_still_opens_the_response() -> None:
    out = writer("m", True).finish(None, b"")
    kinds = [kind for kind, _ in _events(out)]
    assert kinds == ["response.created", "response.in_progress", "response.completed"]


# ---------------------------------------------------------------------------------------------------------
# native pass-through


_NATIVE = _load(FIXTURES / "native" / "cases.json")
_META = b'{"request_id":"req_abc","latency_ms":812.5}'
_COST = b'"cost_nanos":123456,"currency":"USD"'


def _relay(stream: bytes, step: int | None) -> tuple[ResponsesPassthrough, bytes]:
    relay = ResponsesPassthrough(wants_meta=True)
    if step is None:
        return relay, relay.feed(stream)
    out = b""
    for i in range(0, len(stream), step):
        if relay.done:
            break
        out += relay.feed(stream[i : i + step])
    return relay, out


def _terminal(stream: bytes, kind: str) -> bytes:
    return next(e for e in split_events(stream) if e.startswith(b"event: " + kind.encode()))


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "byte-at-a-time", "7-bytes"])
@pytest.mark.parametrize("name", sorted(_NATIVE))
def test_passthrough(name: str, step: int | None, crlf: bool) -> None:
    want = _NATIVE[name]
    stream = (FIXTURES / "native" / f"{name}.sse").read_bytes()
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    relay, forwarded = _relay(stream, step)
    assert relay.id == want["id"]
    assert relay.usage == (msgspec.convert(want["usage"], Usage) if want["usage"] else None)
    assert relay.abort() == b""
    if want["terminal"] is None:  # failures reach the client as they came
        assert forwarded == stream
        assert relay.failure is not None
        assert relay.failure.message == want["failure"]["message"]
        assert relay.failure.type == want["failure"]["type"]
        assert relay.failure.code is Code.upstream_error
        return
    held = _terminal(stream, want["terminal"])
    assert relay.done and not relay.truncated and relay.failure is None
    assert relay.first_token
    assert forwarded + held == stream  # every other byte forwarded unchanged, in order
    closing = relay.finish(_META, _COST)
    data = event_data(closing)
    assert data is not None
    patched, original = orjson.loads(data), orjson.loads(event_data(held) or b"")
    assert patched["response"].pop("meta") == orjson.loads(_META)
    assert patched["response"].pop("cost_nanos") == 123456
    assert patched["response"].pop("currency") == "USD"
    assert patched == original
    assert closing.startswith(b"event: " + want["terminal"].encode())
    assert closing.endswith(b"\r\n\r\n" if crlf else b"\n\n")
    assert relay.finish(None, b"") == held
    with_extra = orjson.loads(event_data(relay.finish(None, b"", b'"echo":{"a":1}')) or b"")
    assert with_extra["response"].pop("echo") == {"a": 1}
    assert with_extra == original


def test_passthrough_stream_is_forwarded_as_it_arrives() -> None:
    stream = (FIXTURES / "native" / "text.sse").read_bytes()
    events = split_events(stream)
    relay = ResponsesPassthrough(wants_meta=False)
    for event in events[:-1]:
        assert relay.feed(event) == event
    assert relay.first_token and not relay.done
    assert relay.events == len(events) - 1
    assert relay.feed(events[-1]) == b""  # held for `finish`
    assert relay.done and relay.events == len(events)
    assert relay.feed(b"event: response.output_text.delta\ndata: {}\n\n") == b""  # nothing after the end


def test_passthrough_first_token_waits_for_a_delta() -> None:
    events = split_events((FIXTURES / "native" / "text.sse").read_bytes())
    relay = ResponsesPassthrough(wants_meta=False)
    relay.feed(b"".join(events[:4]))  # created, in_progress, item added, summary part added
    assert not relay.first_token
    relay.feed(events[4])  # the first reasoning summary delta
    assert relay.first_token


def test_passthrough_truncated_stream_ends_with_an_error_event() -> None:
    events = split_events((FIXTURES / "native" / "text.sse").read_bytes())
    relay = ResponsesPassthrough(wants_meta=False)
    relay.feed(b"".join(events[:12]))
    assert relay.truncated and relay.usage is None
    out = relay.error(GatewayError(Code.upstream_bad_response, "closed early"), "req_1")
    kind, data = _events(out)[0]
    assert kind == "error"
    assert data == {
        "type": "error",
        "sequence_number": 12,
        "code": "upstream_bad_response",
        "message": "closed early",
        "param": None,
    }
    _event_adapter.validate_python(data)


def test_response_usage() -> None:
    completed = _terminal((FIXTURES / "native" / "text.sse").read_bytes(), "response.completed")
    body = orjson.dumps(orjson.loads(event_data(completed) or b"")["response"])
    usage, rid = response_usage(body)
    assert rid == "resp_68af1d3a4e5c8193a0b8c1d2e3f40516"
    assert usage == Usage(
        input_tokens=2048, output_tokens=148, total_tokens=2196, cached_input_tokens=1024, reasoning_tokens=128
    )
    assert response_usage(b'{"id":"resp_1","status":"in_progress","usage":null}') == (None, "resp_1")


@pytest.mark.parametrize("body", [b"<html>502</html>", b"[1]", b""], ids=["html", "array", "empty"])
def test_response_usage_rejects_what_is_not_a_response(body: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        response_usage(body)
    assert info.value.code is Code.upstream_bad_response
