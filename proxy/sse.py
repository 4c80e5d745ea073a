"""Incremental Server-Sent Events framing.

`EventBuffer.feed(chunk)` returns the bytes of the complete events the chunk finishes, exactly as they
arrived, and keeps an unfinished event for the next chunk. Nothing is re-encoded: framing (LF or CRLF,
comments, `event:` lines) reaches the client untouched.
"""

from __future__ import annotations

import re
from typing import Final, final

# The head of every stream the gateway sends: no caching, and no buffering by a proxy in front (nginx).
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")
# Bytes tested as ints: `13 in data` is a plain memchr, several times faster than `b"\r" in data`.
_CR = 13
_LF = 10
# An event must never grow without bound: an upstream that never ends one is broken.
MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEError(Exception):
    """The upstream's event stream is not valid SSE."""


def _end_of_last_event(data: bytes) -> int:
    """The offset just past the last event boundary in `data`, 0 if it has none."""
    if _CR in data:
        return max((i + len(sep) for sep in _SEPARATORS if (i := data.rfind(sep)) >= 0), default=0)
    i = data.rfind(b"\n\n")
    return i + 2 if i >= 0 else 0


@final
class EventBuffer:
    __slots__ = ("_last3", "_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # an unfinished event, as it arrived
        self._size = 0
        self._last3 = b""  # the unfinished event's last three bytes

    def feed(self, chunk: bytes) -> bytes:
        """The complete events that `chunk` finishes (b"" if none), unchanged."""
        if self._parts:
            # A boundary can only be new in the chunk or straddle the tail's last bytes.
            if not _end_of_last_event(self._last3 + chunk):
                self._keep(chunk)
                return b""
            data = b"".join((*self._parts, chunk))
            self._parts, self._size, self._last3 = [], 0, b""
        else:
            data = chunk
        end = _end_of_last_event(data)
        if end == len(data):
            return data
        self._keep(data[end:])
        return data[:end]

    def _keep(self, part: bytes) -> None:
        self._parts.append(part)
        self._size += len(part)
        self._last3 = (self._last3 + part)[-3:]
        if self._size > MAX_EVENT_BYTES:
            raise SSEError(f"an upstream event exceeds {MAX_EVENT_BYTES} bytes without ending")

    @property
    def empty(self) -> bool:
        """No unfinished event is held."""
        return not self._parts

    @property
    def pending(self) -> bytes:
        """An unfinished event left when the stream ended (b"" when it ended cleanly)."""
        return b"".join(self._parts)


def split_events(data: bytes) -> list[bytes]:
    """Complete events (each with its terminator) from what `EventBuffer.feed` returned."""
    if _CR not in data:
        if data.find(b"\n\n") == len(data) - 2:  # the common case: one event
            return [data]
        parts = data.split(b"\n\n")
        events = [part + b"\n\n" for part in parts[:-1]]
    else:
        events, start = [], 0
        for match in _BOUNDARY.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        parts = [data[start:]]
    if parts[-1] and events:  # extra line ends after the last boundary belong to the last event
        events[-1] += parts[-1]
    return events


def event_data(event: bytes) -> bytes | None:
    """The event's `data` payload (data lines joined by LF), or None for a comment-only event."""
    if event[:5] == b"data:":
        line = event.rstrip(b"\r\n")
        if _LF not in line and _CR not in line:  # the common case: one data line
            return line[6:] if line[5:6] == b" " else line[5:]
    payload = [line[6:] if line[5:6] == b" " else line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    if not payload:
        return None
    return payload[0] if len(payload) == 1 else b"\n".join(payload)


def single_data(chunk: bytes) -> bytes | None:
    """The payload when `chunk` is exactly one whole one-line `data: ` event ending in LF LF, else None.

    The common shape of a provider's stream chunk, read here without framing it: a caller falls back to an
    `EventBuffer` on None.
    """
    if chunk[-2:] == b"\n\n" and chunk[:6] == b"data: ":
        payload = chunk[6:-2]
        if _LF not in payload and _CR not in payload:
            return payload
    return None


def data_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"
