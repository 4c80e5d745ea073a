"""proxy.translators.openai: byte-preserving request rewrites, usage extraction and the chat stream state."""

from __future__ import annotations

import itertools
import json

import pytest

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.translators.openai import (
    DONE,
    GATEWAY_FIELDS,
    ChatStream,
    build_request,
    decode_request,
    inject_member,
    patch_members,
    response_view,
)

# ---------------------------------------------------------------------------------------------------------
# decode_request


@pytest.mark.parametrize(
    ("body", "code", "fragments", "param"),
    [
        (b"", Code.invalid_json, ("empty",), None),
        (b"{not json", Code.invalid_json, ("not valid JSON",), None),
        (b'{"model": "a",', Code.invalid_json, ("not valid JSON",), None),
        (b"[1, 2]", Code.invalid_request, ("Expected `object`, got `array`",), None),
        (b"5", Code.invalid_request, ("Expected `object`, got `int`",), None),
        (b'"hi"', Code.invalid_request, ("Expected `object`, got `str`",), None),
        (b'{"model": 5, "messages": []}', Code.invalid_request, ("Expected `str`, got `int`", "model"), "model"),
        (b'{"model": "m", "stream": "yes"}', Code.invalid_request, ("Expected `bool`", "stream"), "stream"),
        (b'{"meta": "please"}', Code.invalid_request, ("meta",), "meta"),
        (b'{"usage": 1}', Code.invalid_request, ("usage",), "usage"),
        (
            b'{"stream": true, "stream_options": {"include_usage": "y"}}',
            Code.invalid_request,
            ("stream_options.include_usage",),
            "stream_options.include_usage",
        ),
        (b'{"stream_options": []}', Code.invalid_request, ("stream_options",), "stream_options"),
        (b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", Code.invalid_json, ("too deeply",), None),
    ],
    ids=[
        "empty",
        "invalid",
        "truncated",
        "array",
        "number",
        "string",
        "model-int",
        "stream-str",
        "meta-str",
        "usage-int",
        "include-usage-str",
        "stream-options-array",
        "too-deep",
    ],
)
def test_decode_request_errors(body: bytes, code: Code, fragments: tuple[str, ...], param: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        decode_request(body)
    err = info.value
    assert err.code is code
    assert err.status == 400
    assert err.param == param
    for fragment in fragments:
        assert fragment in err.message, err.message


def test_decode_request_reads_the_members_it_needs() -> None:
    view = decode_request(
        b'{"model":"openai/gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
        b'"messages":[{"role":"user","content":"hi"}],"meta":true,"usage":false,"temperature":0.2}'
    )
    assert view.model == "openai/gpt-4o-mini"
    assert view.stream is True
    assert view.stream_options is not None and view.stream_options.include_usage is True
    assert bytes(view.messages) == b'[{"role":"user","content":"hi"}]'
    assert view.meta is True
    assert view.usage is False
    assert view.has_gateway_fields()


def test_decode_request_defaults() -> None:
    view = decode_request(b'{"messages": []}')
    assert view.stream is False
    assert view.stream_options is None
    assert not view.has_gateway_fields()


@pytest.mark.parametrize("field", GATEWAY_FIELDS)
def test_every_gateway_field_is_seen(field: str) -> None:
    value = b"true" if field in ("meta", "usage") else b"null"
    assert decode_request(b'{"model":"m","' + field.encode() + b'":' + value + b"}").has_gateway_fields()


# ---------------------------------------------------------------------------------------------------------
# build_request


def build(body: bytes, upstream: str = "gpt-4o-mini", streaming_surface: bool = True) -> tuple[bytes, bool]:
    return build_request(body, decode_request(body), upstream, streaming_surface)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        b'{ "model" : "gpt-4o-mini" ,\n  "messages": [ {"role":"user", "content":"hi"} ] }  ',
        b'{"model":"gpt-4o-mini","stream":false,"messages":[]}',
        b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
    ],
    ids=["compact", "odd-whitespace", "stream-false", "stream-with-usage"],
)
def test_body_naming_the_upstream_model_is_forwarded_untouched(body: bytes) -> None:
    out, _ = build(body)
    assert out is body


def test_stream_on_a_non_streaming_surface_is_forwarded_untouched() -> None:
    body = b'{"model":"text-embedding-3-small","input":"x","stream":true}'
    out, wants_usage = build(body, "text-embedding-3-small", streaming_surface=False)
    assert out is body
    assert wants_usage is False


def test_model_rewrite_keeps_nested_bytes() -> None:
    messages = b'[ {"role" :  "user",\n\t"content":"h\\u00e9llo \\"q\\""} ,{"role":"assistant","content":"1.0e+2"}]'
    tools = b'[{"type":"function","function":{"name":"f","parameters":{"type":"object", "properties":{}}}}]'
    body = b'{"model":"openai/gpt-4o-mini", "messages":' + messages + b', "tools": ' + tools + b', "temperature": 1.50}'
    out, wants_usage = build(body)
    assert wants_usage is False
    assert out == (b'{"model":"gpt-4o-mini","messages":' + messages + b',"tools":' + tools + b',"temperature":1.50}')


def test_missing_model_is_added() -> None:
    out, _ = build(b'{"input": "x"}', "omni-moderation-latest", streaming_surface=False)
    assert out == b'{"input":"x","model":"omni-moderation-latest"}'


def test_upstream_model_name_is_json_encoded() -> None:
    out, _ = build(b'{"model":"a","messages":[]}', 'we"ird\\name')
    assert json.loads(out)["model"] == 'we"ird\\name'


@pytest.mark.parametrize("field", GATEWAY_FIELDS)
def test_gateway_fields_are_removed(field: str) -> None:
    value = b"true" if field in ("meta", "usage") else b'{"x": [1, 2]}'
    body = b'{"model":"gpt-4o-mini","' + field.encode() + b'":' + value + b',"messages":[ 1 ]}'
    out, _ = build(body)
    assert out == b'{"model":"gpt-4o-mini","messages":[ 1 ]}'


def test_all_gateway_fields_together_are_removed() -> None:
    body = (
        b'{"meta":true,"usage":true,"provider":{"order":["a"]},"provider_options":{},"debug":{"x":1},'
        b'"echo_upstream_request":true,"session_id":"s1","model":"openai/gpt-4o-mini","messages":[]}'
    )
    out, _ = build(body)
    assert out == b'{"model":"gpt-4o-mini","messages":[]}'


@pytest.mark.parametrize(
    ("body", "expected", "wants_usage"),
    [
        (
            b'{"model":"gpt-4o-mini","stream":true,"messages":[ ]}',
            b'{"model":"gpt-4o-mini","stream":true,"messages":[ ],"stream_options":{"include_usage":true}}',
            False,
        ),
        (
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_obfuscation": false},"messages":[]}',
            b'{"model":"gpt-4o-mini","stream":true,'
            b'"stream_options":{"include_obfuscation":false,"include_usage":true},"messages":[]}',
            False,
        ),
        (
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":false,"x":[1, 2]},"messages":[]}',
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true,"x":[1, 2]},"messages":[]}',
            False,
        ),
        (
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":null,"messages":[]}',
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
            False,
        ),
        (
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{},"messages":[]}',
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
            False,
        ),
        (
            b'{"model":"gpt-4o-mini","stream":true,"usage":true,"messages":[]}',
            b'{"model":"gpt-4o-mini","stream":true,"messages":[],"stream_options":{"include_usage":true}}',
            True,
        ),
        (
            b'{"model":"openai/gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"meta":true}',
            b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}',
            True,
        ),
    ],
    ids=["no-options", "other-options", "include-false", "null-options", "empty-options", "usage-true", "included"],
)
def test_stream_asks_for_usage(body: bytes, expected: bytes, wants_usage: bool) -> None:
    out, wants = build(body)
    assert out == expected
    assert wants is wants_usage
    assert json.loads(out)["stream_options"]["include_usage"] is True


@pytest.mark.parametrize(
    ("body", "wants_usage"),
    [
        (b'{"model":"gpt-4o-mini","messages":[]}', False),
        (b'{"model":"gpt-4o-mini","usage":true,"messages":[]}', True),
        (b'{"model":"gpt-4o-mini","usage":false,"messages":[]}', False),
        (b'{"model":"gpt-4o-mini","usage":null,"messages":[]}', False),
        (b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}', True),
    ],
)
def test_wants_usage(body: bytes, wants_usage: bool) -> None:
    assert build(body)[1] is wants_usage


# ---------------------------------------------------------------------------------------------------------
# patch_members, inject_member


@pytest.mark.parametrize(
    ("body", "set_members", "drop", "expected"),
    [
        (b'{"a": [1,  2], "b":{"c" : 1}}', {}, (), b'{"a":[1,  2],"b":{"c" : 1}}'),
        (b'{"a": [1,  2], "b":{"c" : 1}}', {"a": b"3"}, (), b'{"a":3,"b":{"c" : 1}}'),
        (b'{"a": [1,  2], "b":{"c" : 1}}', {"z": b"null"}, ("b",), b'{"a":[1,  2],"z":null}'),
        (b'{"a":1}', {}, ("missing",), b'{"a":1}'),
        (b"{}", {"k": b'"v"'}, (), b'{"k":"v"}'),
        (b'{"a":1,"usage":{"x":1}}', {}, ("usage",), b'{"a":1}'),
    ],
)
def test_patch_members(body: bytes, set_members: dict[str, bytes], drop: tuple[str, ...], expected: bytes) -> None:
    assert patch_members(body, set_members, drop) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", b'{"meta":{"x":1}}'),
        (b"{ }", b'{"meta":{"x":1}}'),
        (b'{"a":1}', b'{"a":1,"meta":{"x":1}}'),
        (b'{"a":1}\n', b'{"a":1,"meta":{"x":1}}'),
        (b'{\n  "a": 1\n}\n', b'{\n  "a": 1,"meta":{"x":1}}'),
        (b"[1]", b"[1]"),
        (b"", b""),
        (b"not json", b"not json"),
    ],
)
def test_inject_member(body: bytes, expected: bytes) -> None:
    assert inject_member(body, "meta", b'{"x":1}') == expected


# ---------------------------------------------------------------------------------------------------------
# response_usage


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (b'{"id":"x","choices":[]}', None),
        (b'{"usage":null}', None),
        (b"{}", None),
        (
            b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}',
            Usage(input_tokens=3, output_tokens=4, total_tokens=7),
        ),
        (
            b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,'
            b'"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},'
            b'"completion_tokens_details":{"reasoning_tokens":2,"accepted_prediction_tokens":0}}}',
            Usage(input_tokens=10, output_tokens=5, total_tokens=15, cached_input_tokens=4, reasoning_tokens=2),
        ),
        (
            b'{"usage":{"prompt_tokens":8,"total_tokens":8,"prompt_tokens_details":null,'
            b'"completion_tokens_details":{"reasoning_tokens":null}}}',
            Usage(input_tokens=8, output_tokens=0, total_tokens=8),
        ),
        (
            b'{"object":"list","data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":2,"total_tokens":2}}',
            Usage(input_tokens=2, total_tokens=2),
        ),
    ],
    ids=["none", "null", "empty", "no-total", "details", "null-details", "embeddings"],
)
def test_response_usage(body: bytes, usage: Usage | None) -> None:
    assert response_view(body)[0] == usage


@pytest.mark.parametrize(
    "body", [b"", b"nope", b"[1]", b'{"usage":"x"}', b'{"usage":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"]
)
def test_response_usage_rejects_bodies_that_are_not_json_objects(body: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        response_view(body)
    assert info.value.code is Code.upstream_bad_response
    assert info.value.status == 502


# ---------------------------------------------------------------------------------------------------------
# ChatStream

HEAD = '"id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini-2024-07-18"'
USAGE_JSON = (
    '{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,'
    '"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":1}}'
)
USAGE = Usage(input_tokens=9, output_tokens=3, total_tokens=12, cached_input_tokens=4, reasoning_tokens=1)


def chunk(choices: str, usage: str = "null") -> bytes:
    return ("data: {" + HEAD + ',"choices":' + choices + ',"usage":' + usage + "}\n\n").encode()


ROLE = chunk('[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]')
HEL = chunk('[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]')
LO = chunk('[{"index":0,"delta":{"content":"lo!"},"finish_reason":null}]')
FINISH = chunk('[{"index":0,"delta":{},"finish_reason":"stop"}]')
USAGE_CHUNK = chunk("[]", USAGE_JSON)
PING = b": ping\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
TRANSCRIPT = [PING, ROLE, HEL, PING, LO, FINISH, USAGE_CHUNK, DONE_EVENT]
STREAM = b"".join(TRANSCRIPT)


def cuts(data: bytes) -> dict[str, list[bytes]]:
    ends, pos = [], 0
    for event in TRANSCRIPT:
        pos += len(event)
        ends.append(pos)
    mids = sorted({0, *(e - len(ev) // 2 for e, ev in zip(ends, TRANSCRIPT, strict=True)), len(data)})
    between_newlines = sorted({0, *(e - 1 for e in ends), len(data)})
    return {
        "whole": [data],
        "one-byte": [data[i : i + 1] for i in range(len(data))],
        "by-5": [data[i : i + 5] for i in range(0, len(data), 5)],
        "by-64": [data[i : i + 64] for i in range(0, len(data), 64)],
        "mid-event": [data[a:b] for a, b in itertools.pairwise(mids)],
        "between-newlines": [data[a:b] for a, b in itertools.pairwise(between_newlines)],
        "events": list(TRANSCRIPT),
    }


CUTS = list(cuts(STREAM))


def run(chunks: list[bytes], wants_usage: bool, wants_meta: bool) -> tuple[ChatStream, bytes]:
    state = ChatStream(wants_usage, wants_meta)
    out = b"".join(state.feed(c) for c in chunks)
    return state, out


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize(("wants_usage", "forwarded"), [(False, False), (True, True)])
def test_stream_forwards_everything_but_withheld_usage(cut: str, wants_usage: bool, forwarded: bool) -> None:
    state, out = run(cuts(STREAM)[cut], wants_usage, wants_meta=False)
    assert out == b"".join([PING, ROLE, HEL, PING, LO, FINISH])
    # a usage chunk the client asked for is kept to carry the cost, and sent just before [DONE]
    assert state.finish(None) == (USAGE_CHUNK if forwarded else b"") + DONE
    assert state.done and not state.truncated
    assert state.usage == USAGE
    assert state.first_token
    assert (state.id, state.model, state.created) == ("chatcmpl-9", "gpt-4o-mini-2024-07-18", 1700000000)


def test_stream_at_every_two_way_cut() -> None:
    for i in range(len(STREAM) + 1):
        state, out = run([STREAM[:i], STREAM[i:]], wants_usage=False, wants_meta=False)
        assert out + state.finish(None) == STREAM.replace(USAGE_CHUNK, b""), i
        assert state.usage == USAGE, i


def test_crlf_framed_stream() -> None:
    crlf = [event.replace(b"\n", b"\r\n") for event in TRANSCRIPT]
    data = b"".join(crlf)
    for chunks in ([data], [data[i : i + 3] for i in range(0, len(data), 3)]):
        state, out = run(chunks, wants_usage=False, wants_meta=False)
        assert out == b"".join(crlf[:6])  # the usage chunk withheld, [DONE] left to finish()
        assert state.done and not state.truncated
        assert state.usage == USAGE
        assert state.first_token
        assert state.finish(None) == DONE


def test_first_token_waits_for_content() -> None:
    state = ChatStream(False, False)
    assert state.feed(PING + ROLE) == PING + ROLE
    assert not state.first_token
    assert state.id == "chatcmpl-9"
    assert state.feed(HEL[:-1]) == b""
    assert not state.first_token  # an unfinished event does not count
    assert state.feed(HEL[-1:]) == HEL
    assert state.first_token


@pytest.mark.parametrize(
    ("delta", "is_token"),
    [
        ('{"content":"x"}', True),
        ('{"content":""}', False),
        ('{"content":null}', False),
        ('{"role":"assistant"}', False),
        ("{}", False),
        ('{"reasoning_content":"thinking"}', True),
        ('{"refusal":"no"}', True),
    ],
)
def test_first_token_from_a_delta(delta: str, is_token: bool) -> None:
    state = ChatStream(False, False)
    event = chunk('[{"index":0,"delta":' + delta + "}]")
    assert state.feed(event) == event
    assert state.first_token is is_token


TOOL_CALL = chunk(
    '[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    '"function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]'
)


@pytest.mark.parametrize(
    "event",
    [TOOL_CALL, chunk('[{"index":0,"delta":{"function_call":{"name":"f","arguments":""}}}]')],
    ids=["tool_calls", "function_call"],
)
def test_first_token_from_tool_calls(event: bytes) -> None:
    state = ChatStream(False, False)
    assert state.feed(event) == event
    assert state.first_token
    assert state.id == "chatcmpl-9"


def test_tool_call_stream_is_forwarded_and_metered() -> None:
    # Whatever happens to first_token, the bytes and the separate usage chunk are handled.
    state, out = run([ROLE, TOOL_CALL, FINISH, USAGE_CHUNK, DONE_EVENT], wants_usage=False, wants_meta=False)
    assert out == ROLE + TOOL_CALL + FINISH
    assert state.usage == USAGE
    assert state.done


def test_stream_without_done_is_truncated() -> None:
    state, out = run([ROLE, HEL, LO[:20]], wants_usage=False, wants_meta=False)
    assert out == ROLE + HEL
    assert state.truncated
    assert not state.done
    assert state.usage is None


def test_stream_ending_after_complete_events_without_done_is_truncated() -> None:
    state, out = run([ROLE, HEL, FINISH, USAGE_CHUNK], wants_usage=True, wants_meta=False)
    assert out == ROLE + HEL + FINISH
    assert state.truncated
    assert state.usage == USAGE
    assert state.abort() == USAGE_CHUNK  # still delivered, before the error event
    assert state.abort() == b""


def test_nothing_after_done_is_forwarded() -> None:
    state = ChatStream(False, False)
    assert state.feed(HEL + DONE_EVENT + LO) == HEL
    assert state.done
    assert state.feed(LO) == b""
    assert state.feed(b"data: junk\n\n") == b""


@pytest.mark.parametrize("done", [b"data:[DONE]\n\n", b"data: [DONE] \n\n", b"data: [DONE]\r\n\r\n"])
def test_done_spellings(done: bytes) -> None:
    state = ChatStream(False, False)
    assert state.feed(HEL + done) == HEL
    assert state.done


@pytest.mark.parametrize("first_token", [False, True])
@pytest.mark.parametrize("wants_usage", [False, True])
def test_usage_riding_on_a_content_chunk(first_token: bool, wants_usage: bool) -> None:
    usage_content = (
        "data: {" + HEAD + ',"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}],'
        '"usage":' + USAGE_JSON + "}\n\n"
    ).encode()
    state = ChatStream(wants_usage, False)
    if first_token:
        assert state.feed(HEL) == HEL
    out = state.feed(usage_content)
    if wants_usage:
        assert out == usage_content
    else:
        stripped = "data: {" + HEAD + ',"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}\n\n'
        assert out == stripped.encode()
    assert state.usage == USAGE
    assert state.first_token


def test_usage_riding_on_a_tool_call_chunk_is_metered_and_stripped() -> None:
    data = (
        "data: {" + HEAD + ',"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]},'
        '"finish_reason":"tool_calls"}],"usage":' + USAGE_JSON + "}\n\n"
    ).encode()
    state = ChatStream(False, False)
    out = state.feed(ROLE + data)
    assert state.usage == USAGE
    assert state.first_token
    assert out.startswith(ROLE)  # the role chunk's own `"usage":null` is the upstream's, untouched
    assert b'"usage"' not in out[len(ROLE) :] and b'"tool_calls":[{"index":0' in out[len(ROLE) :]


def test_usage_null_on_content_chunks_is_not_usage() -> None:
    state, out = run([ROLE, HEL, FINISH, DONE_EVENT], wants_usage=False, wants_meta=False)
    assert out == ROLE + HEL + FINISH
    assert state.usage is None


def test_usage_key_inside_content_is_not_usage() -> None:
    tricky = chunk('[{"index":0,"delta":{"content":"the \\"usage\\":{ field"}}]')
    state, out = run([ROLE, HEL, tricky, DONE_EVENT], wants_usage=False, wants_meta=False)
    assert out == ROLE + HEL + tricky
    assert state.usage is None


def test_unparseable_data_is_forwarded() -> None:
    state = ChatStream(False, False)
    odd = b'data: {"usage":{broken\n\n'
    assert state.feed(odd) == odd
    assert state.feed(b"data: not json\n\n") == b"data: not json\n\n"
    assert not state.first_token


# finish


META = b'{"request_id":"req_1","latency_ms":12.5}'


def test_finish_without_meta_is_done() -> None:
    state, _ = run([ROLE, HEL, FINISH, USAGE_CHUNK, DONE_EVENT], wants_usage=False, wants_meta=False)
    assert state.finish(None) == b"data: [DONE]\n\n"


@pytest.mark.parametrize("cut", CUTS)
def test_finish_merges_meta_into_the_held_usage_chunk(cut: str) -> None:
    state, out = run(cuts(STREAM)[cut], wants_usage=True, wants_meta=True)
    assert out == b"".join([PING, ROLE, HEL, PING, LO, FINISH])  # the usage chunk is held for meta
    final = state.finish(META)
    assert final.endswith(b"\n\ndata: [DONE]\n\n")
    assert final == USAGE_CHUNK[: -len(b"}\n\n")] + b',"meta":' + META + b"}\n\n" + DONE
    body = json.loads(final[len(b"data: ") : -len(b"\n\n" + DONE)])
    assert body["usage"] == json.loads(USAGE_JSON)
    assert body["meta"] == json.loads(META)
    assert body["choices"] == []


def test_finish_meta_without_usage_wanted_strips_usage_from_the_held_chunk() -> None:
    state, out = run([STREAM], wants_usage=False, wants_meta=True)
    assert out == b"".join([PING, ROLE, HEL, PING, LO, FINISH])
    final = state.finish(META)
    body = json.loads(final[len(b"data: ") : -len(b"\n\n" + DONE)])
    assert "usage" not in body
    assert body == {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [],
        "meta": json.loads(META),
    }
    assert final.endswith(b"}\n\n" + DONE)


def test_finish_none_returns_the_held_chunk_then_done() -> None:
    state, _ = run([STREAM], wants_usage=True, wants_meta=True)
    assert state.finish(None) == USAGE_CHUNK + DONE
    state, _ = run([STREAM], wants_usage=False, wants_meta=True)
    stripped = ("data: {" + HEAD + ',"choices":[]}\n\n').encode()
    assert state.finish(None) == stripped + DONE


def test_finish_with_meta_and_no_usage_chunk_is_a_standalone_chunk() -> None:
    state, out = run([ROLE, HEL, FINISH, DONE_EVENT], wants_usage=False, wants_meta=True)
    assert out == ROLE + HEL + FINISH
    assert state.finish(META) == (
        b'data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-4o-mini-2024-07-18","choices":[],"meta":' + META + b"}\n\n" + DONE
    )


def test_finish_merges_cost_and_meta_into_the_usage_chunk() -> None:
    state, out = run([STREAM], wants_usage=True, wants_meta=False)
    assert USAGE_CHUNK not in out
    final = state.finish(META, b'"cost_nanos":7,"currency":"USD","pricing_lines":[]')
    assert json.loads(final[len(b"data: ") : -len(b"\n\n" + DONE)]) == {
        **json.loads(USAGE_CHUNK[len(b"data: ") : -2]),
        "cost_nanos": 7,
        "currency": "USD",
        "pricing_lines": [],
        "meta": json.loads(META),
    }


def test_cost_is_not_sent_to_a_client_that_did_not_ask_for_usage() -> None:
    state, _ = run([STREAM], wants_usage=False, wants_meta=False)
    assert state.finish(None, b'"cost_nanos":7,"currency":"USD","pricing_lines":[]') == DONE


def test_finish_on_an_empty_stream() -> None:
    state = ChatStream(False, True)
    assert state.truncated
    assert state.finish(None) == DONE
    assert state.finish(b"{}") == (
        b'data: {"id":"","object":"chat.completion.chunk","created":0,"model":"","choices":[],"meta":{}}\n\n' + DONE
    )
