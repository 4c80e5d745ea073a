"""proxy.translators.replay: cached answers, whole or streamed, on the surface that first produced them.

Each surface's answers are written here as its client receives them (with the gateway's extra members and
provider fields the neutral form drops). Every one must come back from a replayed stream and a replayed body
as the same neutral answer, and the official SDKs must read the replayed streams, offline.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec
import openai
import orjson
import pytest

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.sse import event_data, split_events
from proxy.translators import replay as rp
from proxy.translators.chat import ChatWriter
from proxy.translators.messages import MessagesWriter
from proxy.translators.neutral import ChatChunk, ChatResponse, Choice, FunctionCall, Message, ToolCall
from proxy.translators.responses import ResponsesWriter

CHAT, MESSAGES, RESPONSES = "openai.chat", "anthropic.messages", "openai.responses"
SURFACES = (CHAT, MESSAGES, RESPONSES)
NATIVE = Path(__file__).parent / "fixtures" / "responses" / "native"

# Multibyte text longer than a piece (48 characters), with no space for a long stretch: CJK, a ZWJ family, a
# flag, a skin tone, a combining accent, a variation selector.
TEXT = (
    "Bonjour 👋🏽 — 東京の天気は晴れです。明日は雨が降るでしょう。👨‍👩‍👧‍👦🇫🇷 café ❤️ "
    "e\u0301t\u00e9 Ünïcödé and plain words."
)
REASONING = "The user greets me in French; 考えてみます… I should answer politely and mention the weather."
CALLS = [
    ("call_a1", "get_weather", '{"city":"東京","unit":"celsius","note":"👨‍👩‍👧‍👦 family trip, long arguments"}'),
    ("call_b2", "get_time", '{"tz":"Asia/Tokyo"}'),
]  # compact JSON: the Messages API sends `input` as an object, which is read back as compact text
EXTRA = {"cost_nanos": 1234, "currency": "USD", "meta": {"request_id": "req_1", "provider": "p"}}


def _expect(text: str | None, reasoning: str | None, calls: list[tuple[str, str, str]], finish: str) -> dict:
    return {"text": text, "reasoning": reasoning, "calls": calls, "finish": finish}


# ---------------------------------------------------------------------------------------------------------
# the answers, as each surface's client gets them


def _chat(message: dict, finish: str, usage: dict) -> dict:
    return {
        "id": "chatcmpl-Cache123",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_abc",  # dropped by the neutral form
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
        **EXTRA,
    }


CHAT_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 40,
    "total_tokens": 160,
    "prompt_tokens_details": {"cached_tokens": 20, "cache_write_tokens": 10},
    "completion_tokens_details": {"reasoning_tokens": 12},
    "cost": 0.001,  # a gateway's usage extra
}
CHAT_NEUTRAL_USAGE = Usage(
    input_tokens=120,
    output_tokens=40,
    total_tokens=160,
    cached_input_tokens=20,
    cache_write_tokens=10,
    reasoning_tokens=12,
)


def _chat_calls() -> list[dict]:
    return [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in CALLS]


def _message(content: list[dict], stop: str) -> dict:
    return {
        "id": "msg_01Cache",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 100,
            "output_tokens": 40,
            "cache_read_input_tokens": 20,
            "cache_creation_input_tokens": 10,
            "service_tier": "standard",  # dropped
        },
        **EXTRA,
    }


MESSAGES_NEUTRAL_USAGE = Usage(
    input_tokens=130, output_tokens=40, total_tokens=170, cached_input_tokens=20, cache_write_tokens=10
)


def _tool_uses() -> list[dict]:
    return [{"type": "tool_use", "id": i, "name": n, "input": orjson.loads(a)} for i, n, a in CALLS]


def _response(output: list[dict], status: str = "completed", reason: str | None = None) -> dict:
    return {
        "id": "resp_68afCache",
        "object": "response",
        "created_at": 1756306746,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": reason} if reason else None,
        "model": "gpt-5-mini-2025-08-07",
        "output": output,
        "parallel_tool_calls": True,
        "service_tier": "default",
        "store": True,
        "tools": [],
        "usage": {
            "input_tokens": 120,
            "input_tokens_details": {"cached_tokens": 20},
            "output_tokens": 40,
            "output_tokens_details": {"reasoning_tokens": 12},
            "total_tokens": 160,
        },
        **EXTRA,
    }


RESPONSES_NEUTRAL_USAGE = Usage(
    input_tokens=120, output_tokens=40, total_tokens=160, cached_input_tokens=20, reasoning_tokens=12
)


def _output_message(text: str) -> dict:
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    return {"id": "msg_68af01", "type": "message", "status": "completed", "role": "assistant", "content": [part]}


def _function_calls() -> list[dict]:
    return [
        {"id": f"fc_68af{k}", "type": "function_call", "status": "completed", "call_id": i, "name": n, "arguments": a}
        for k, (i, n, a) in enumerate(CALLS)
    ]


def _reasoning_item(text: str) -> dict:
    summary = [{"type": "summary_text", "text": text}]
    return {"id": "rs_68af00", "type": "reasoning", "summary": summary, "encrypted_content": "gAAAA…"}


# (surface, case) → (the client's body, the neutral answer it holds, its usage)
CASES: dict[tuple[str, str], tuple[dict, dict, Usage]] = {
    (CHAT, "text"): (
        _chat({"role": "assistant", "content": TEXT, "refusal": None, "annotations": []}, "stop", CHAT_USAGE),
        _expect(TEXT, None, [], "stop"),
        CHAT_NEUTRAL_USAGE,
    ),
    (CHAT, "reasoning"): (
        _chat({"role": "assistant", "content": TEXT, "reasoning_content": REASONING}, "stop", CHAT_USAGE),
        _expect(TEXT, REASONING, [], "stop"),
        CHAT_NEUTRAL_USAGE,
    ),
    (CHAT, "tool_calls"): (
        _chat({"role": "assistant", "content": None, "tool_calls": _chat_calls()}, "tool_calls", CHAT_USAGE),
        _expect(None, None, CALLS, "tool_calls"),
        CHAT_NEUTRAL_USAGE,
    ),
    (CHAT, "length"): (
        _chat({"role": "assistant", "content": TEXT[:30]}, "length", CHAT_USAGE),
        _expect(TEXT[:30], None, [], "length"),
        CHAT_NEUTRAL_USAGE,
    ),
    (MESSAGES, "text"): (
        _message([{"type": "text", "text": TEXT, "citations": None}], "end_turn"),
        _expect(TEXT, None, [], "stop"),
        MESSAGES_NEUTRAL_USAGE,
    ),
    (MESSAGES, "reasoning"): (
        _message(
            [{"type": "thinking", "thinking": REASONING, "signature": "EqQBCkYIAxgC"}, {"type": "text", "text": TEXT}],
            "end_turn",
        ),
        _expect(TEXT, REASONING, [], "stop"),
        MESSAGES_NEUTRAL_USAGE,
    ),
    (MESSAGES, "tool_calls"): (
        _message(_tool_uses(), "tool_use"),
        _expect(None, None, CALLS, "tool_calls"),
        MESSAGES_NEUTRAL_USAGE,
    ),
    (MESSAGES, "length"): (
        _message([{"type": "text", "text": TEXT[:30]}], "max_tokens"),
        _expect(TEXT[:30], None, [], "length"),
        MESSAGES_NEUTRAL_USAGE,
    ),
    (RESPONSES, "text"): (
        _response([_output_message(TEXT)]),
        _expect(TEXT, None, [], "stop"),
        RESPONSES_NEUTRAL_USAGE,
    ),
    (RESPONSES, "reasoning"): (
        _response([_reasoning_item(REASONING), _output_message(TEXT)]),
        _expect(TEXT, REASONING, [], "stop"),
        RESPONSES_NEUTRAL_USAGE,
    ),
    (RESPONSES, "tool_calls"): (
        _response(_function_calls()),
        _expect(None, None, CALLS, "tool_calls"),
        RESPONSES_NEUTRAL_USAGE,
    ),
    (RESPONSES, "length"): (
        _response([_output_message(TEXT[:30])], "incomplete", "max_output_tokens"),
        _expect(TEXT[:30], None, [], "length"),
        RESPONSES_NEUTRAL_USAGE,
    ),
}
IDS = [f"{surface}-{case}" for surface, case in CASES]


def _body(key: tuple[str, str]) -> bytes:
    return orjson.dumps(CASES[key][0])


def _essentials(response: ChatResponse) -> dict:
    [choice] = response.choices
    message = choice.message
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
    text = message.content
    assert text is None or isinstance(text, str)
    return _expect(text, message.reasoning_content, calls, choice.finish_reason or "")


def _extra() -> bytes:
    return orjson.dumps(EXTRA)[1:-1]


# ---------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_answer_of_reads_the_clients_body(key: tuple[str, str]) -> None:
    _, expected, usage = CASES[key]
    response, got_usage = rp.answer_of(key[0], _body(key))
    assert _essentials(response) == expected
    assert got_usage == usage


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_whole_answer_replays_as_a_stream(key: tuple[str, str]) -> None:
    surface = key[0]
    response, usage = rp.answer_of(surface, _body(key))
    events = rp.replay(surface, response, usage, "public/model", True, True, _extra())
    streamed = rp.stream_answer(surface, events)
    assert streamed is not None
    again, again_usage = streamed
    assert _essentials(again) == _essentials(response) == CASES[key][1]
    assert again_usage == usage
    assert again.model == "public/model"


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_whole_answer_replays_whole(key: tuple[str, str]) -> None:
    surface = key[0]
    response, usage = rp.answer_of(surface, _body(key))
    body = rp.replay(surface, response, usage, "public/model", False, False, _extra())
    assert orjson.loads(body)["meta"] == EXTRA["meta"]
    again, again_usage = rp.answer_of(surface, body)
    assert _essentials(again) == CASES[key][1]
    assert again_usage == usage
    assert again.id == rp.answer_of(surface, rp.replay(surface, again, again_usage, "m", False, False, b""))[0].id


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_streamed_answer_replays_whole_and_streamed_again(key: tuple[str, str]) -> None:
    surface = key[0]
    response, usage = rp.answer_of(surface, _body(key))
    streamed = rp.stream_answer(surface, rp.replay(surface, response, usage, "m", True, True, b""))
    assert streamed is not None
    body = rp.replay(surface, *streamed, "m", False, False, b"")
    assert _essentials(rp.answer_of(surface, body)[0]) == CASES[key][1]
    twice = rp.stream_answer(surface, rp.replay(surface, *streamed, "m", True, True, b""))
    assert twice is not None
    assert _essentials(twice[0]) == CASES[key][1]
    assert twice[1] == usage


def test_chat_stream_without_include_usage_carries_none() -> None:
    response, usage = rp.answer_of(CHAT, _body((CHAT, "text")))
    events = rp.replay(CHAT, response, usage, "m", True, False, b"")
    assert b'"usage"' not in events
    streamed = rp.stream_answer(CHAT, events)
    assert streamed is not None
    assert streamed[1] is None
    assert _essentials(streamed[0]) == CASES[(CHAT, "text")][1]


def test_native_responses_streams() -> None:
    """OpenAI's own streams (recorded): the terminal event's `response` is the answer; `response.incomplete`
    is a finished answer too; `response.failed` and `error` are not."""
    text = rp.stream_answer(RESPONSES, (NATIVE / "text.sse").read_bytes())
    assert text is not None
    assert _essentials(text[0]) == _expect(
        "Hi there — the response.completed event is last.", "**Greeting the user**", [], "stop"
    )
    assert text[1] == Usage(
        input_tokens=2048, output_tokens=148, total_tokens=2196, cached_input_tokens=1024, reasoning_tokens=128
    )
    incomplete = rp.stream_answer(RESPONSES, (NATIVE / "incomplete.sse").read_bytes())
    assert incomplete is not None
    assert _essentials(incomplete[0])["finish"] == "length"
    assert rp.stream_answer(RESPONSES, (NATIVE / "failed.sse").read_bytes()) is None
    assert rp.stream_answer(RESPONSES, (NATIVE / "error.sse").read_bytes()) is None


# ---------------------------------------------------------------------------------------------------------
# incomplete and failed streams


def _terminal_offset(surface: str, events: bytes) -> int:
    marker = {CHAT: b"data: [DONE]", MESSAGES: b"event: message_stop", RESPONSES: b"event: response.completed"}
    offset = events.rfind(marker[surface])
    assert offset > 0
    return offset


@pytest.mark.parametrize("surface", SURFACES)
def test_a_stream_cut_before_its_terminal_event_is_none(surface: str) -> None:
    response, usage = rp.answer_of(surface, _body((surface, "tool_calls")))
    events = rp.replay(surface, response, usage, "m", True, True, b"")
    end = _terminal_offset(surface, events)
    assert rp.stream_answer(surface, events) is not None
    for cut in (0, 1, end // 3, end // 2, end - 1, end, end + 5):
        assert rp.stream_answer(surface, events[:cut]) is None, cut


def test_an_error_event_makes_the_stream_none() -> None:
    err = GatewayError(Code.upstream_error, "overloaded")
    writers: dict[str, Any] = {
        CHAT: ChatWriter("m", True),
        MESSAGES: MessagesWriter("m"),
        RESPONSES: ResponsesWriter("m"),
    }
    response, _ = rp.answer_of(CHAT, _body((CHAT, "text")))
    chunks = rp.chunks_of(response)
    for surface, writer in writers.items():
        events = writer.write(chunks[:3]) + writer.error(err, "req_1")
        assert rp.stream_answer(surface, events) is None, surface
        # what a relay could append after the error is ignored: the stream failed
        assert rp.stream_answer(surface, events + writer.finish(None, b"")) is None, surface


# ---------------------------------------------------------------------------------------------------------
# the official SDKs read the replayed streams


def _transport(events: bytes) -> httpx2.Client:
    def handler(_request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=events, headers={"content-type": "text/event-stream"})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def _replayed(key: tuple[str, str]) -> tuple[bytes, dict]:
    surface = key[0]
    response, usage = rp.answer_of(surface, _body(key))
    return rp.replay(surface, response, usage, "public/model", True, True, _extra()), CASES[key][1]


def _openai(events: bytes) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test", base_url="http://gateway.test/v1", http_client=_transport(events), max_retries=0
    )


@pytest.mark.parametrize("key", [k for k in CASES if k[0] == CHAT], ids=lambda k: k[1])
def test_openai_sdk_reads_a_replayed_chat_stream(key: tuple[str, str]) -> None:
    events, expected = _replayed(key)
    stream = _openai(events).chat.completions.create(
        model="public/model", messages=[{"role": "user", "content": "x"}], stream=True
    )
    text, reasoning, finish = "", "", None
    calls: dict[int, list[str]] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            text += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or ():
                got = calls.setdefault(call.index, ["", "", ""])
                got[0] += call.id or ""
                got[1] += (call.function.name if call.function else None) or ""
                got[2] += (call.function.arguments if call.function else None) or ""
            finish = choice.finish_reason or finish
    assert text == (expected["text"] or "")
    assert reasoning == (expected["reasoning"] or "")
    assert [tuple(calls[i]) for i in sorted(calls)] == expected["calls"]
    assert finish == expected["finish"]
    assert usage is not None
    assert usage.prompt_tokens == 120
    assert usage.completion_tokens == 40

    # the SDK's own accumulator agrees (its helper refuses a cut-short answer, as for a live one)
    helper = _openai(events).chat.completions.stream(model="public/model", messages=[{"role": "user", "content": "x"}])
    if expected["finish"] == "length":
        with pytest.raises(openai.LengthFinishReasonError), helper as running:
            running.get_final_completion()
        return
    with helper as running:
        final = running.get_final_completion()
    message = final.choices[0].message
    assert (message.content or "") == (expected["text"] or "")
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()] == expected["calls"]


@pytest.mark.parametrize("key", [k for k in CASES if k[0] == RESPONSES], ids=lambda k: k[1])
def test_openai_sdk_reads_a_replayed_responses_stream(key: tuple[str, str]) -> None:
    events, expected = _replayed(key)
    stream = _openai(events).responses.create(model="public/model", input="x", stream=True)
    last = None
    text = ""
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        last = event
    assert last is not None
    assert last.type == ("response.incomplete" if expected["finish"] == "length" else "response.completed")
    response = last.response
    assert response.output_text == (expected["text"] or "") == text
    calls = [(i.call_id, i.name, i.arguments) for i in response.output if i.type == "function_call"]
    assert calls == expected["calls"]
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 12

    # the SDK's stream state machine accepts every event in order (its final response needs `response.completed`)
    with _openai(events).responses.stream(model="public/model", input="x") as helper:
        kinds = [event.type for event in helper]
        assert kinds[0] == "response.created"
        if expected["finish"] != "length":
            assert helper.get_final_response().output_text == (expected["text"] or "")


@pytest.mark.parametrize("key", [k for k in CASES if k[0] == MESSAGES], ids=lambda k: k[1])
def test_anthropic_sdk_reads_a_replayed_messages_stream(key: tuple[str, str]) -> None:
    events, expected = _replayed(key)
    client = anthropic.Anthropic(
        api_key="sk-test", base_url="http://gateway.test", http_client=_transport(events), max_retries=0
    )
    kwargs: dict[str, Any] = {"model": "public/model", "max_tokens": 64, "messages": [{"role": "user", "content": "x"}]}
    with client.messages.stream(**kwargs) as stream:
        message = stream.get_final_message()
    text = "".join(b.text for b in message.content if b.type == "text")
    thinking = "".join(b.thinking for b in message.content if b.type == "thinking")
    calls = [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]
    assert text == (expected["text"] or "")
    assert thinking == (expected["reasoning"] or "")
    assert calls == [(i, n, orjson.loads(a)) for i, n, a in expected["calls"]]
    stop = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}[expected["finish"]]
    assert message.stop_reason == stop
    assert (message.usage.input_tokens, message.usage.output_tokens) == (100, 40)
    assert message.usage.cache_read_input_tokens == 20


# ---------------------------------------------------------------------------------------------------------
# chunks_of and accumulate


def _answer(**message: Any) -> ChatResponse:
    return ChatResponse(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[Choice(message=Message(role="assistant", **message), finish_reason="stop")],
    )


def _joined_at(text: str, cut: int) -> bool:
    """A piece boundary inside what a reader sees as one character."""
    after = text[cut]
    return (
        text[cut - 1] == "\u200d"
        or after == "\u200d"
        or "\ufe00" <= after <= "\ufe0f"
        or "\U0001f3fb" <= after <= "\U0001f3ff"
        or unicodedata.category(after) in ("Mn", "Mc", "Me")
    )


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 8, 13, 48, 1000])
def test_chunks_of_keeps_multibyte_text_whole(piece: int) -> None:
    text = TEXT * 3 + "🇯🇵🇫🇷🇩🇪" * 5
    chunks = rp.chunks_of(_answer(content=text, reasoning_content=REASONING), piece)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == text
    for chunk in chunks:  # every chunk encodes as valid UTF-8 JSON
        msgspec.json.decode(msgspec.json.encode(chunk))
    offset = 0
    for p in pieces[:-1]:
        offset += len(p)
        if piece >= 8:  # a smaller window may have to split the 7-code-point family
            assert not _joined_at(text, offset), (piece, p)
        assert len(p) <= piece
    flags = text[-30:]
    assert "".join(pieces)[-30:] == flags


def test_chunks_of_prefers_whole_words() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 5
    pieces = [c.choices[0].delta.content for c in rp.chunks_of(_answer(content=text), 20)]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == text
    assert all(p.endswith(" ") for p in pieces)


def test_chunks_of_shape() -> None:
    calls = [ToolCall(id=i, function=FunctionCall(name=n, arguments=a)) for i, n, a in CALLS]
    chunks = rp.chunks_of(_answer(content=None, tool_calls=calls), 16)
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    heads = [d.tool_calls[0] for d in deltas if d.tool_calls and d.tool_calls[0].id]
    assert [(h.index, h.id, h.type, h.function and h.function.name) for h in heads] == [
        (0, "call_a1", "function", "get_weather"),
        (1, "call_b2", "function", "get_time"),
    ]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    again = rp.accumulate(chunks, "chatcmpl-1", "m", 7)
    assert again.choices[0].message.tool_calls == calls
    assert again.choices[0].message.content is None


def _chunk(index: int, delta: dict, finish: str | None = None) -> ChatChunk:
    return msgspec.convert(
        {"id": "c", "created": 1, "model": "m", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]},
        ChatChunk,
    )


def test_accumulate_gathers_choices_and_interleaved_calls() -> None:
    chunks = [
        _chunk(0, {"role": "assistant", "content": ""}),
        _chunk(1, {"role": "assistant", "content": "B"}),
        _chunk(0, {"reasoning_content": "think "}),
        _chunk(0, {"reasoning_content": "more"}),
        _chunk(0, {"tool_calls": [{"index": 1, "id": "c2", "type": "function", "function": {"name": "g"}}]}),
        _chunk(0, {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]}),
        _chunk(0, {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a":'}}]}),  # name repeated
        _chunk(0, {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        _chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk(1, {"content": "ye"}),
        _chunk(0, {}, "tool_calls"),
        _chunk(1, {}, "stop"),
        _chunk(1, {}, None),  # a null finish after the real one is not the answer's
    ]
    response = rp.accumulate(chunks, "id-1", "m", 9)
    assert (response.id, response.model, response.created) == ("id-1", "m", 9)
    first, second = response.choices
    assert first.message.content is None
    assert first.message.reasoning_content == "think more"
    assert [(c.id, c.function.name, c.function.arguments) for c in first.message.tool_calls or ()] == [
        ("c1", "f", '{"a":1}'),
        ("c2", "g", "{}"),
    ]
    assert first.finish_reason == "tool_calls"
    assert (second.index, second.message.content, second.message.tool_calls, second.finish_reason) == (
        1,
        "Bye",
        None,
        "stop",
    )


def test_refusals_survive_chat_and_responses() -> None:
    response = _answer(content=None, refusal="I can't help with that.")
    for surface in (CHAT, RESPONSES):
        whole = rp.answer_of(surface, rp.replay(surface, response, None, "m", False, False, b""))[0]
        streamed = rp.stream_answer(surface, rp.replay(surface, response, None, "m", True, False, b""))
        assert streamed is not None
        for answer in (whole, streamed[0]):
            assert answer.choices[0].message.refusal == "I can't help with that."
            assert answer.choices[0].message.content is None


# ---------------------------------------------------------------------------------------------------------
# the Responses decoder


def test_responses_decoder_reads_summaries_and_ignores_other_items() -> None:
    body = _response(
        [
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "**A**"}, {"type": "summary_text", "text": "**B**"}],
            },
            {
                "type": "web_search_call",
                "id": "ws_1",
                "status": "completed",
                "action": {"type": "search", "query": "q"},
            },
            {"type": "reasoning", "id": "rs_2", "summary": [], "content": [{"type": "reasoning_text", "text": "raw"}]},
            _output_message("one "),
            {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
            _output_message("two"),
        ]
    )
    response, usage = rp.answer_of(RESPONSES, orjson.dumps(body))
    message = response.choices[0].message
    assert message.content == "one two"
    assert message.refusal == "no"
    assert message.reasoning_content == "**A**\n\n**B**\n\nraw"
    assert response.choices[0].finish_reason == "stop"
    assert usage == RESPONSES_NEUTRAL_USAGE


@pytest.mark.parametrize(
    ("status", "reason", "finish"),
    [("incomplete", "content_filter", "content_filter"), ("incomplete", None, "length"), (None, None, "stop")],
)
def test_responses_decoder_finish_reasons(status: str | None, reason: str | None, finish: str) -> None:
    body = _response([_output_message("x")], status or "completed", reason)
    if status is None:
        del body["status"]
    assert rp.answer_of(RESPONSES, orjson.dumps(body))[0].choices[0].finish_reason == finish


# ---------------------------------------------------------------------------------------------------------
# garbage


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}',
        b"[" * 5000,
    ],
    ids=["empty", "text", "array", "empty_object", "error_body", "deep"],
)
def test_answer_of_refuses_garbage(surface: str, body: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        rp.answer_of(surface, body)
    assert info.value.code is Code.upstream_bad_response


@pytest.mark.parametrize("status", ["failed", "in_progress", "cancelled", "queued"])
def test_answer_of_refuses_an_unfinished_response(status: str) -> None:
    with pytest.raises(GatewayError, match=status):
        rp.answer_of(RESPONSES, orjson.dumps(_response([], status)))


@pytest.mark.parametrize("surface", SURFACES)
def test_stream_answer_of_garbage_is_none(surface: str) -> None:
    assert rp.stream_answer(surface, b"") is None
    assert rp.stream_answer(surface, b"data: not json\n\n") is None
    assert rp.stream_answer(surface, b"\n\n\n") is None


def test_unknown_surface() -> None:
    response, usage = rp.answer_of(CHAT, _body((CHAT, "text")))
    with pytest.raises(ValueError, match=r"openai\.images"):
        rp.answer_of("openai.images", b"{}")
    with pytest.raises(ValueError):
        rp.stream_answer("openai.images", b"")
    with pytest.raises(ValueError):
        rp.replay("openai.images", response, usage, "m", False, False, b"")


def test_replayed_streams_are_whole_events() -> None:
    for surface in SURFACES:
        response, usage = rp.answer_of(surface, _body((surface, "reasoning")))
        events = rp.replay(surface, response, usage, "m", True, True, _extra())
        assert events.endswith(b"\n\n")
        for raw in split_events(events):
            data = event_data(raw)
            assert data is not None
            if data != b"[DONE]":
                orjson.loads(data)


def test_chat_answers_with_several_choices_round_trip() -> None:
    body = _chat({"role": "assistant", "content": TEXT}, "stop", CHAT_USAGE)
    body["choices"].append(
        {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "length"}
    )
    response, usage = rp.answer_of(CHAT, orjson.dumps(body))
    streamed = rp.stream_answer(CHAT, rp.replay(CHAT, response, usage, "m", True, True, b""))
    assert streamed is not None
    assert [(c.index, c.message.content, c.finish_reason) for c in streamed[0].choices] == [
        (0, TEXT, "stop"),
        (1, "second", "length"),
    ]
    assert streamed[1] == CHAT_NEUTRAL_USAGE
