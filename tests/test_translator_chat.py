"""proxy.translators.chat, provider side: an OpenAI-kind stream read into neutral chunks.

The reader reads a chunk that is exactly one `data:` event without framing it; everything else goes
through the event buffer. Both paths must give the same chunks, whatever the cut.
"""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import Code
from proxy.meta import Usage
from proxy.sse import event_data, single_data
from proxy.translators.chat import ChatReader
from proxy.translators.neutral import ChatChunk


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(delta: object, finish: str | None = None, **extra: object) -> bytes:
    return _event(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 7,
            "model": "gpt-x",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
    )


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    b": keep-alive\n\n",
    _chunk({"content": "Hel"}),
    _chunk({"content": "lo\n"}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
    _chunk(None, "tool_calls"),  # `"delta": null`: some compatible servers
    _event({"id": "chatcmpl-1", "created": 7, "model": "gpt-x", "choices": [], "usage": USAGE}),
    b"data: [DONE]\n\n",
]


def _read(chunks: list[bytes]) -> tuple[list[ChatChunk], ChatReader]:
    reader = ChatReader()
    out: list[ChatChunk] = []
    for chunk in chunks:
        out += reader.feed(chunk)
    return out, reader


def _texts(chunks: list[ChatChunk]) -> list[tuple[str | None, str | None, str | None]]:
    out = []
    for chunk in chunks:
        for c in chunk.choices:
            args = c.delta.tool_calls[0].function.arguments if c.delta.tool_calls else None  # type: ignore[union-attr]
            out.append((c.delta.content, args, c.finish_reason))
    return out


EXPECTED = [("", None, None), ("Hel", None, None), ("lo\n", None, None), (None, '{"a"', None), (None, ":1}", None)]
EXPECTED.append((None, None, "tool_calls"))


def _cuts() -> dict[str, list[bytes]]:
    whole = b"".join(STREAM)
    return {
        "one event per chunk": STREAM,
        "all in one chunk": [whole],
        "crlf": [e.replace(b"\n", b"\r\n") for e in STREAM],
        "two events per chunk": [b"".join(STREAM[i : i + 2]) for i in range(0, len(STREAM), 2)],
        "byte by byte": [whole[i : i + 1] for i in range(len(whole))],
        "cut inside the terminator": [e for ev in STREAM for e in (ev[:-1], ev[-1:])],
    }


@pytest.mark.parametrize("cut", list(_cuts()))
def test_every_framing_reads_the_same(cut: str) -> None:
    chunks, reader = _read(_cuts()[cut])
    assert _texts(chunks) == EXPECTED
    assert reader.done and reader.failure is None
    assert reader.usage == Usage(input_tokens=5, output_tokens=3, total_tokens=8)
    assert (reader.id, reader.created, reader.model) == ("chatcmpl-1", 7, "gpt-x")
    assert reader.events == 8  # data events, [DONE] included; the comment is not one


def test_every_two_way_cut() -> None:
    whole = b"".join(STREAM)
    for i in range(1, len(whole)):
        chunks, reader = _read([whole[:i], whole[i:]])
        assert _texts(chunks) == EXPECTED, i
        assert reader.done


def test_missing_delta_is_an_empty_one() -> None:
    event = _event({"id": "c", "choices": [{"index": 0, "finish_reason": "stop"}]})
    chunks, _ = _read([event])
    assert chunks[0].choices[0].delta.content is None
    assert chunks[0].choices[0].finish_reason == "stop"


def test_nothing_is_read_after_done() -> None:
    chunks, reader = _read([b"data: [DONE]\n\n", _chunk({"content": "late"})])
    assert chunks == [] and reader.done


def test_unparseable_events_are_skipped() -> None:
    chunks, reader = _read([b"data: {not json\n\n", _event([1, 2]), _chunk({"content": "ok"})])
    assert _texts(chunks) == [("ok", None, None)]
    assert not reader.done


def test_error_event_ends_the_stream_as_a_failure() -> None:
    error = _event({"error": {"message": "overloaded", "type": "server_error"}})
    chunks, reader = _read([_chunk({"content": "a"}), error, _chunk({"content": "b"})])
    assert _texts(chunks) == [("a", None, None)]
    assert reader.done and reader.failure is not None
    assert reader.failure.code is Code.upstream_error
    assert "overloaded" in reader.failure.message


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: {"a":1}\n\n',
        b"data: [DONE]\n\n",
        b"data: \n\n",
        b'data: {"a":"x\\ny"}\n\n',  # an escaped newline is not a line end
    ],
)
def test_single_data_reads_one_whole_event(chunk: bytes) -> None:
    assert single_data(chunk) == event_data(chunk)


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: {"a":1}\n',  # unfinished
        b'data: {"a":1}',
        b'data: {"a":1}\n\ndata: {"b":2}\n\n',  # two events
        b"data: a\ndata: b\n\n",  # two data lines
        b'data: {"a":1}\r\n\r\n',
        b"data: a\r\rdata: b\n\n",  # CR-framed events before the end
        b'event: x\ndata: {"a":1}\n\n',
        b": comment\n\n",
        b'data:{"a":1}\n\n',  # no space: left to the full parser
        b"",
    ],
)
def test_single_data_declines_everything_else(chunk: bytes) -> None:
    assert single_data(chunk) is None
