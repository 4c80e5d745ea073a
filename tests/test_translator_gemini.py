"""proxy.translators.gemini: neutral ⇄ Gemini v1beta, table-driven from the transcripts in fixtures/gemini."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from proxy.errors import Code, GatewayError
from proxy.translators.gemini import PROVIDER, SKIP_SIGNATURE, GeminiReader
from proxy.translators.neutral import ChatChunk, ChatRequest, ChatResponse
from tests.mock_gemini import GeminiControl, _problem, build_gemini_mock

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gemini"
REQUESTS = sorted((FIXTURES / "requests").glob("*.json"))
RESPONSES = sorted((FIXTURES / "responses").glob("*.json"))
STREAMS = sorted((FIXTURES / "streams").glob("*.sse"))
ERRORS = json.loads((FIXTURES / "errors.json").read_text())


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _request(data: dict[str, Any]) -> ChatRequest:
    # Through JSON bytes, as a surface decodes it.
    return msgspec.json.decode(json.dumps(data).encode(), type=ChatRequest)


def test_fixtures_are_there() -> None:
    assert len(REQUESTS) >= 15 and len(RESPONSES) >= 7 and len(STREAMS) >= 7


def test_provider_and_auth() -> None:
    assert PROVIDER.kind == "gemini"
    assert PROVIDER.auth_headers("AIza-secret") == {"x-goog-api-key": "AIza-secret"}
    assert PROVIDER.auth_headers("") == {}
    assert isinstance(PROVIDER.reader(), GeminiReader)


# ---------------------------------------------------------------------------------------------------------
# requests


@pytest.mark.parametrize("path", REQUESTS, ids=[p.stem for p in REQUESTS])
def test_build_request(path: Path) -> None:
    case = _load(path)
    upstream = PROVIDER.build_request(_request(case["request"]), case["model"], case["stream"], case["drop_params"])
    assert upstream.path == case["path"]
    body = json.loads(upstream.body)
    assert body == case["body"], case["description"]
    assert _problem(body) is None  # what the mock (like the real API) would accept


UNSUPPORTED = [
    (
        "audio_part",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "input_audio"}]}]},
        False,
        "messages[0].content[1]",
    ),
    (
        "image_in_system",
        {
            "messages": [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "user", "content": "hi"},
            ]
        },
        False,
        "messages[0].content[0]",
    ),
    ("n_streaming", {"n": 2}, True, "n"),
    ("unknown_effort", {"reasoning_effort": "extreme"}, False, "reasoning_effort"),
    ("grammar_format", {"response_format": {"type": "grammar"}}, False, "response_format"),
    ("custom_tool", {"tools": [{"type": "custom", "function": {"name": "x"}}]}, False, "tools[0]"),
]


@pytest.mark.parametrize(("extra", "stream", "param"), [c[1:] for c in UNSUPPORTED], ids=[c[0] for c in UNSUPPORTED])
def test_unsupported_params_400_unless_dropped(extra: dict[str, Any], stream: bool, param: str) -> None:
    request = _request({"messages": [{"role": "user", "content": "hi"}], **extra})
    with pytest.raises(GatewayError) as info:
        PROVIDER.build_request(request, "gemini-2.5-flash", stream, False)
    err = info.value
    assert (err.code, err.status, err.param) == (Code.invalid_request, 400, param)
    assert f"`{param}` is not supported by gemini" in err.message
    assert "drop_params" in err.message
    body = json.loads(PROVIDER.build_request(request, "gemini-2.5-flash", stream, True).body)
    assert "candidateCount" not in body.get("generationConfig", {})
    assert "thinkingConfig" not in body.get("generationConfig", {})
    assert "responseMimeType" not in body.get("generationConfig", {})
    assert "tools" not in body


def test_a_parameter_whose_loss_keeps_the_answer_valid_is_dropped_and_reported_unless_strict() -> None:
    """`parallel_tool_calls: false` (LlamaIndex and LangChain send it with tools): Gemini has no switch; the
    client gets what it asked for, possibly several calls at once, and is told the parameter was left out."""
    asked = {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False}
    plain = PROVIDER.build_request(_request({"messages": asked["messages"]}), "gemini-2.5-flash", False, False)
    for drop_params in (False, True):
        upstream = PROVIDER.build_request(_request(asked), "gemini-2.5-flash", False, drop_params)
        assert upstream.dropped == ("parallel_tool_calls",) and upstream.body == plain.body
    assert plain.dropped == ()
    with pytest.raises(GatewayError) as info:
        PROVIDER.build_request(_request(asked), "gemini-2.5-flash", False, False, strict=True)
    assert info.value.param == "parallel_tool_calls" and "strict_params" in info.value.message


def test_n_is_honoured_without_streaming() -> None:
    body = json.loads(
        PROVIDER.build_request(
            _request({"messages": [{"role": "user", "content": "hi"}], "n": 2}), "g", False, False
        ).body
    )
    assert body["generationConfig"] == {"candidateCount": 2}


INVALID = [
    (
        "args_not_json",
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{city: Paris"}}]},
        ],
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "args_not_object",
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "[1]"}}]},
        ],
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "unknown_tool_call_id",
        [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "42"}],
        "messages[1].tool_call_id",
    ),
    ("unknown_role", [{"role": "robot", "content": "hi"}], "messages[0].role"),
    ("only_system", [{"role": "system", "content": "Be brief."}], "messages"),
    ("empty_user", [{"role": "user", "content": ""}], "messages"),
    (
        "data_url_without_comma",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64"}}]}],
        "messages[0].content[0].image_url",
    ),
]


@pytest.mark.parametrize("drop", [False, True], ids=["strict", "drop_params"])
@pytest.mark.parametrize(("messages", "param"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_requests_400_even_with_drop_params(messages: list[dict[str, Any]], param: str, drop: bool) -> None:
    with pytest.raises(GatewayError) as info:
        PROVIDER.build_request(_request({"messages": messages}), "gemini-2.5-flash", False, drop)
    assert (info.value.code, info.value.status, info.value.param) == (Code.invalid_request, 400, param)
    assert info.value.message.startswith(param + ":")


def test_unknown_tool_choice_is_400() -> None:
    request = _request(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"function": {"name": "f"}}], "tool_choice": "any"}
    )
    with pytest.raises(GatewayError) as info:
        PROVIDER.build_request(request, "gemini-2.5-flash", False, False)
    assert info.value.param == "tool_choice"


def test_tool_result_name_falls_back_to_the_message_name() -> None:
    request = _request(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "name": "f", "tool_call_id": "x", "content": "ok"},
            ]
        }
    )
    body = json.loads(PROVIDER.build_request(request, "gemini-2.5-flash", False, False).body)
    assert body["contents"][0]["parts"][1] == {"functionResponse": {"name": "f", "response": {"result": "ok"}}}


def test_every_replayed_assistant_turn_signs_its_first_call() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"id": "a", **call}, {"id": "b", **call}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "assistant", "tool_calls": [{"id": "c", **call}]},
        {"role": "tool", "tool_call_id": "c", "content": "3"},
    ]
    body = json.loads(
        PROVIDER.build_request(_request({"messages": messages}), "gemini-3-pro-preview", False, False).body
    )
    signed = [
        [p.get("thoughtSignature") for p in turn["parts"]] for turn in body["contents"] if turn["role"] == "model"
    ]
    assert signed == [[SKIP_SIGNATURE, None], [SKIP_SIGNATURE]]


@pytest.mark.parametrize(
    ("model", "effort", "thinking"),
    [
        ("gemini-2.5-pro", "low", {"thinkingBudget": 1024, "includeThoughts": True}),
        ("gemini-2.5-flash", "high", {"thinkingBudget": 24576, "includeThoughts": True}),
        ("gemini-2.5-flash-lite", "minimal", {"thinkingBudget": 512, "includeThoughts": True}),
        ("models/gemini-2.5-flash", "none", {"thinkingBudget": 0}),
        ("gemini-3-flash-preview", "minimal", {"thinkingLevel": "minimal", "includeThoughts": True}),
        ("gemini-3-flash-preview", "medium", {"thinkingLevel": "medium", "includeThoughts": True}),
        ("gemini-3-pro-preview", "low", {"thinkingLevel": "low", "includeThoughts": True}),
        ("gemini-3-pro-preview", "none", {"thinkingLevel": "minimal"}),
    ],
)
def test_reasoning_effort_mapping(model: str, effort: str, thinking: dict[str, Any]) -> None:
    request = _request({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": effort})
    body = json.loads(PROVIDER.build_request(request, model, False, False).body)
    assert body["generationConfig"]["thinkingConfig"] == thinking


# ---------------------------------------------------------------------------------------------------------
# whole answers


@pytest.mark.parametrize("path", RESPONSES, ids=[p.stem for p in RESPONSES])
def test_parse_response(path: Path) -> None:
    case = _load(path)
    response, usage = PROVIDER.parse_response(json.dumps(case["body"]).encode())
    assert abs(response.created - time.time()) < 60
    expected = {**case["response"], "created": response.created}
    if expected["id"] is None:  # the answer had no responseId: one is generated
        assert response.id.startswith("chatcmpl-")
        expected["id"] = response.id
    # Compared as Structs: the fixture is full Chat Completions JSON (a tool call's `type` included).
    assert response == msgspec.convert(expected, ChatResponse), case["description"]
    assert (msgspec.to_builtins(usage) if usage is not None else None) == case["usage"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not a GenerateContentResponse"),
        (b"<html>502 Bad Gateway</html>", "not a GenerateContentResponse"),
        (b"[1, 2]", "not a GenerateContentResponse"),
        (b'"hello"', "not a GenerateContentResponse"),
        (b'{"candidates": "many"}', "not a GenerateContentResponse"),
        (b"{}", "without candidates"),
    ],
    ids=["empty", "html", "array", "string", "wrong-type", "no-candidates"],
)
def test_parse_response_garbage(body: bytes, fragment: str) -> None:
    with pytest.raises(GatewayError) as info:
        PROVIDER.parse_response(body)
    assert info.value.code is Code.upstream_bad_response
    assert info.value.status == 502
    assert info.value.message.startswith("Gemini answered") and fragment in info.value.message


def test_parse_response_error_body() -> None:
    body = b'{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}'
    with pytest.raises(GatewayError) as info:
        PROVIDER.parse_response(body)
    assert (info.value.code, info.value.status, info.value.type) == (Code.upstream_error, 429, "rate_limit_error")


# ---------------------------------------------------------------------------------------------------------
# streams


def _run(pieces: list[bytes]) -> tuple[GeminiReader, list[ChatChunk]]:
    reader = GeminiReader()
    out: list[ChatChunk] = []
    for piece in pieces:
        out.extend(reader.feed(piece))
    return reader, out


def _check(reader: GeminiReader, out: list[ChatChunk], expected: dict[str, Any]) -> None:
    chunks = [msgspec.to_builtins(chunk) for chunk in out]
    for chunk in chunks:
        assert chunk.pop("created") == reader.created
    assert chunks == expected["chunks"], expected["description"]
    assert reader.done is expected["done"]
    assert reader.events == expected["events"]
    assert (reader.id, reader.model) == (expected["id"], expected["model"])
    assert (msgspec.to_builtins(reader.usage) if reader.usage is not None else None) == expected["usage"]
    failure = reader.failure
    if expected["failure"] is None:
        assert failure is None
    else:
        assert failure is not None and failure.code is Code.upstream_error
        assert {"status": failure.status, "type": failure.type, "message": failure.message} == expected["failure"]


def _transcript(path: Path) -> tuple[bytes, dict[str, Any]]:
    data = path.read_bytes()
    expected = _load(path.with_suffix(".json"))
    # The transcripts keep the real API's CRLF framing.
    assert data.count(b"\r\n\r\n") == expected["events"] and b"\n\n" not in data
    return data, expected


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_stream_whole(path: Path) -> None:
    data, expected = _transcript(path)
    _check(*_run([data]), expected)


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_stream_one_byte_at_a_time(path: Path) -> None:
    data, expected = _transcript(path)
    _check(*_run([data[i : i + 1] for i in range(len(data))]), expected)


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_stream_random_splits(path: Path) -> None:
    data, expected = _transcript(path)
    rng = random.Random(path.stem)
    for _ in range(25):
        cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 12))))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        _check(*_run(pieces), expected)


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_stream_lf_framing_reads_the_same(path: Path) -> None:
    data, expected = _transcript(path)
    _check(*_run([data.replace(b"\r\n", b"\n")]), expected)


def test_events_after_the_finish_only_update_usage() -> None:
    data, expected = _transcript(FIXTURES / "streams" / "text.sse")
    late = (
        b'data: {"candidates": [{"content": {"parts": [{"text": "late"}],"role": "model"},"index": 0}],'
        b'"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 22,"totalTokenCount": 30}}\r\n\r\n'
    )
    reader, out = _run([data, late])
    assert len(out) == len(expected["chunks"]) and reader.done
    assert reader.events == expected["events"] + 1
    assert reader.usage is not None and reader.usage.output_tokens == 22


def test_nothing_is_read_after_a_failure() -> None:
    data, _ = _transcript(FIXTURES / "streams" / "error.sse")
    reader, _ = _run([data])
    assert reader.failure is not None
    assert reader.feed(b'data: {"candidates": [{"content": {"parts": [{"text": "more"}]}}]}\r\n\r\n') == []


def test_stream_ignores_comments_and_foreign_events() -> None:
    reader, out = _run([b": keep-alive\r\n\r\n", b"data: not json\r\n\r\n", b'data: {"candidates": []}\r\n\r\n'])
    assert out == [] and not reader.done and reader.failure is None
    assert reader.events == 2


# ---------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("case", ERRORS, ids=[c["name"] for c in ERRORS])
def test_parse_error(case: dict[str, Any]) -> None:
    body = case["body"]
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    err = PROVIDER.parse_error(case["status"], raw)
    expected = case["expected"]
    if expected is None:
        assert err is None
        return
    assert err is not None and err.code is Code.upstream_error
    assert {"status": err.status, "type": err.type, "message": err.message} == expected


# ---------------------------------------------------------------------------------------------------------
# the mock upstream validates like the real API


async def test_mock_validates_and_answers(aiohttp_client) -> None:
    control = GeminiControl()
    client = await aiohttp_client(build_gemini_mock(control))
    key = {"x-goog-api-key": "AIza-test"}
    url = "/v1beta/models/gemini-2.5-flash:generateContent"
    good = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}

    bad_bodies = [
        {"contents": []},
        {"systemInstruction": {"parts": [{"text": "x"}]}},
        {"contents": [{"role": "assistant", "parts": [{"text": "Hi"}]}]},
        {"contents": [{"role": "user", "parts": [{"content": "Hi"}]}]},
        {"contents": [{"role": "user", "parts": []}]},
    ]
    for bad in bad_bodies:
        resp = await client.post(url, json=bad, headers=key)
        assert resp.status == 400, bad
        error = PROVIDER.parse_error(resp.status, await resp.read())
        assert error is not None and error.status == 400 and error.message.startswith("Gemini: ")
    resp = await client.post(url, json=good)  # no key
    assert resp.status == 400 and "API key" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1beta/models/gemini-2.5-flash:streamGenerateContent", json=good, headers=key)
    assert resp.status == 400  # streaming needs alt=sse

    # a body the translator built is accepted, and the answer parses
    upstream = PROVIDER.build_request(
        _request({"messages": [{"role": "user", "content": "Hi"}]}), "gemini-2.5-flash", False, False
    )
    resp = await client.post(upstream.path, data=upstream.body, headers=key)
    assert resp.status == 200
    response, usage = PROVIDER.parse_response(await resp.read())
    assert response.choices[0].message.content == "Hello from Gemini!"
    assert response.model == "gemini-2.5-flash" and usage is not None and usage.total_tokens == 14
    assert control.last.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert control.last.headers["x-goog-api-key"] == "AIza-test"
    assert control.last.body == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}

    upstream = PROVIDER.build_request(
        _request({"messages": [{"role": "user", "content": "Hi"}]}), "gemini-2.5-flash", True, False
    )
    resp = await client.post(upstream.path, data=upstream.body, headers=key)
    raw = await resp.read()
    assert resp.status == 200 and control.last.query == {"alt": "sse"} and raw.endswith(b"\r\n\r\n")
    reader, out = _run([raw[i : i + 7] for i in range(0, len(raw), 7)])
    assert "".join(c.choices[0].delta.content or "" for c in out) == "Hello from Gemini!"
    assert reader.done and out[-1].choices[0].finish_reason == "stop" and reader.usage is not None

    control.mode = "tool_call"
    resp = await client.post(upstream.path, data=upstream.body, headers=key)
    reader, out = _run([await resp.read()])
    calls = [call for c in out for call in c.choices[0].delta.tool_calls or ()]
    assert [(c.function.name, c.function.arguments) for c in calls if c.function] == [
        ("get_weather", '{"city":"Paris"}')
    ]
    assert out[-1].choices[0].finish_reason == "tool_calls"

    control.mode, control.status = "status", 503
    resp = await client.post(url, json=good, headers=key)
    assert resp.status == 503
    error = PROVIDER.parse_error(resp.status, await resp.read())
    assert error is not None and (error.status, error.type) == (503, "api_error")
