"""proxy.sse: incremental SSE framing that hands back complete events byte for byte."""

from __future__ import annotations

import pytest

from proxy import sse
from proxy.sse import EventBuffer, SSEError, data_event, event_data, split_events

LF_STREAM = b'data: {"a":1}\n\n: ping\n\nevent: delta\nid: 7\ndata: {"b":2}\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n'
FRAMINGS = {
    "lf": LF_STREAM,
    "crlf": LF_STREAM.replace(b"\n", b"\r\n"),
    "cr": LF_STREAM.replace(b"\n", b"\r"),
}


def event_list(stream: bytes, sep: bytes) -> list[bytes]:
    return [part + sep + sep for part in stream.split(sep + sep)[:-1]]


SEPARATOR = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


def chunkings(data: bytes) -> dict[str, list[bytes]]:
    """The same bytes cut in awkward ways."""
    return {
        "whole": [data],
        "bytes": [data[i : i + 1] for i in range(len(data))],
        "by3": [data[i : i + 3] for i in range(0, len(data), 3)],
        "by7": [data[i : i + 7] for i in range(0, len(data), 7)],
        "halves": [data[: len(data) // 2], data[len(data) // 2 :]],
    }


def feed_all(chunks: list[bytes]) -> tuple[list[bytes], EventBuffer]:
    buffer = EventBuffer()
    return [buffer.feed(c) for c in chunks], buffer


# ---------------------------------------------------------------------------------------------------------
# EventBuffer


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("cut", ["whole", "bytes", "by3", "by7", "halves"])
def test_feed_returns_complete_events_unchanged(framing: str, cut: str) -> None:
    stream = FRAMINGS[framing]
    outs, buffer = feed_all(chunkings(stream)[cut])
    assert b"".join(outs) == stream
    assert buffer.pending == b""
    # Every output is a whole number of events: it ends on a boundary and splits into known events.
    events = event_list(stream, SEPARATOR[framing])
    for out in outs:
        if out:
            for event in split_events(out):
                assert event in events


@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_two_way_cut(framing: str) -> None:
    stream = FRAMINGS[framing]
    for i in range(len(stream) + 1):
        buffer = EventBuffer()
        first, second = buffer.feed(stream[:i]), buffer.feed(stream[i:])
        assert first + second == stream, i
        assert buffer.pending == b""
        # The first part gives back exactly the events it completes.
        assert stream[:i].startswith(first)
        assert len(stream[:i]) - len(first) < max(len(e) for e in event_list(stream, SEPARATOR[framing]))


@pytest.mark.parametrize(
    ("chunks", "outs"),
    [
        ([b"data: a\n", b"\n"], [b"", b"data: a\n\n"]),
        ([b"data: a\r\n", b"\r\n"], [b"", b"data: a\r\n\r\n"]),
        ([b"data: a\r\n\r", b"\n"], [b"", b"data: a\r\n\r\n"]),
        ([b"data: a\r", b"\n\r\n"], [b"", b"data: a\r\n\r\n"]),
        ([b"data: a\r", b"\r"], [b"", b"data: a\r\r"]),
        ([b"data: a\n\ndata: b", b"\n\n"], [b"data: a\n\n", b"data: b\n\n"]),
        ([b"data: a\n\nda", b"ta: b\n", b"\ndata: c\n\n"], [b"data: a\n\n", b"", b"data: b\n\ndata: c\n\n"]),
        ([b"da", b"ta", b": ", b"a", b"\n", b"\n"], [b"", b"", b"", b"", b"", b"data: a\n\n"]),
        ([b"", b"data: a\n\n", b""], [b"", b"data: a\n\n", b""]),
        ([b"data: a\n\n\n", b"data: b\n\n"], [b"data: a\n\n\n", b"data: b\n\n"]),
    ],
    ids=[
        "lf-straddle",
        "crlf-straddle-middle",
        "crlf-straddle-last-byte",
        "crlf-straddle-first-byte",
        "cr-straddle",
        "tail-kept",
        "three-chunks",
        "tiny-pieces",
        "empty-chunks",
        "extra-blank-line",
    ],
)
def test_feed_table(chunks: list[bytes], outs: list[bytes]) -> None:
    buffer = EventBuffer()
    assert [buffer.feed(c) for c in chunks] == outs
    assert buffer.pending == b""


def test_a_single_newline_does_not_end_an_event() -> None:
    buffer = EventBuffer()
    assert buffer.feed(b"data: a\ndata: b\n") == b""
    assert buffer.feed(b"data: c\n") == b""
    assert buffer.pending == b"data: a\ndata: b\ndata: c\n"
    assert buffer.feed(b"\n") == b"data: a\ndata: b\ndata: c\n\n"
    assert buffer.pending == b""


@pytest.mark.parametrize(
    ("chunks", "pending"),
    [
        ([b"data: a\n\ndata: b"], b"data: b"),
        ([b"data: a\n\nda", b"ta: b\n"], b"data: b\n"),
        ([b'data: {"x":', b"1}"], b'data: {"x":1}'),
        ([b"data: a\r\n"], b"data: a\r\n"),
        ([], b""),
    ],
)
def test_pending_is_the_unfinished_event(chunks: list[bytes], pending: bytes) -> None:
    _, buffer = feed_all(chunks)
    assert buffer.pending == pending


# ---------------------------------------------------------------------------------------------------------
# the size limit


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 16)
    return 16


def test_unfinished_event_over_the_limit_raises(small_limit: int) -> None:
    buffer = EventBuffer()
    assert buffer.feed(b"data: 123456789") == b""  # 15 bytes
    assert buffer.feed(b"0") == b""  # 16: at the limit, still fine
    with pytest.raises(SSEError, match=f"exceeds {small_limit} bytes"):
        buffer.feed(b"1")


def test_limit_applies_to_the_tail_after_complete_events(small_limit: int) -> None:
    buffer = EventBuffer()
    with pytest.raises(SSEError):
        buffer.feed(b"data: a\n\n" + b"x" * (small_limit + 1))


def test_limit_counts_one_event_not_the_stream(small_limit: int) -> None:
    buffer = EventBuffer()
    for _ in range(10):  # far more than the limit in total, each event under it
        assert buffer.feed(b"data: 12345") == b""
        assert buffer.feed(b"\n\n") == b"data: 12345\n\n"
    assert buffer.pending == b""


def test_limit_is_on_unfinished_events_only(small_limit: int) -> None:
    event = b"data: " + b"x" * 100 + b"\n\n"
    assert EventBuffer().feed(event) == event


def test_default_limit_is_eight_mib() -> None:
    assert sse.MAX_EVENT_BYTES == 8 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# split_events, event_data, data_event


@pytest.mark.parametrize(
    ("data", "events"),
    [
        (b"", []),
        (b"data: a\n\n", [b"data: a\n\n"]),
        (b"data: a\n\ndata: b\n\n", [b"data: a\n\n", b"data: b\n\n"]),
        (b": ping\n\ndata: a\n\n", [b": ping\n\n", b"data: a\n\n"]),
        (b"event: e\nid: 1\ndata: a\n\n", [b"event: e\nid: 1\ndata: a\n\n"]),
        (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]),
        (b"data: a\r\ndata: b\r\n\r\n", [b"data: a\r\ndata: b\r\n\r\n"]),
        (b"data: a\r\rdata: b\r\r", [b"data: a\r\r", b"data: b\r\r"]),
        (b"data: a\n\ndata: b\r\n\r\n", [b"data: a\n\n", b"data: b\r\n\r\n"]),
    ],
    ids=["empty", "one", "two", "comment", "fields", "crlf", "crlf-multiline", "cr", "mixed"],
)
def test_split_events(data: bytes, events: list[bytes]) -> None:
    assert split_events(data) == events
    assert b"".join(events) == data


@pytest.mark.parametrize("framing", FRAMINGS)
def test_split_events_of_a_stream(framing: str) -> None:
    stream = FRAMINGS[framing]
    events = split_events(stream)
    assert events == event_list(stream, SEPARATOR[framing])
    assert len(events) == 5


@pytest.mark.parametrize("data", [b"data: a\n\n\n", b"data: a\r\n\r\n\r\n", b"data: a\n\n\n\n\n"])
def test_split_events_keeps_every_byte_feed_returned(data: bytes) -> None:
    complete = EventBuffer().feed(data)
    assert complete == data
    assert b"".join(split_events(complete)) == complete


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        (b"data: hello\n\n", b"hello"),
        (b"data:hello\n\n", b"hello"),
        (b"data:  two spaces\n\n", b" two spaces"),
        (b"data: \n\n", b""),
        (b"data: [DONE]\n\n", b"[DONE]"),
        (b"data: [DONE]\r\n\r\n", b"[DONE]"),
        (b"data: a\ndata: b\n\n", b"a\nb"),
        (b"data: a\r\ndata: b\r\n\r\n", b"a\nb"),
        (b"data: a\rdata: b\r\r", b"a\nb"),
        (b'event: delta\nid: 3\nretry: 10\ndata: {"x":1}\n\n', b'{"x":1}'),
        (b": comment\ndata: x\n\n", b"x"),
        (b": ping\n\n", None),
        (b"event: only\n\n", None),
        (b"\n\n", None),
        (b" data: x\n\n", None),  # a field name is at the start of the line
    ],
)
def test_event_data(event: bytes, payload: bytes | None) -> None:
    assert event_data(event) == payload


def test_data_event() -> None:
    assert data_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert event_data(data_event(b"x")) == b"x"
