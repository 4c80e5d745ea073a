"""Frames between a worker and its helper processes (the accounting writer, `proxy.usage_writer`; the trace
exporter, `proxy.trace_export`): one byte of operation, four bytes of length (big-endian), the payload. The
child's side reads its standard input and writes its standard output with blocking calls; the worker's side
(`spawn`, `receive`) is asyncio's."""

from __future__ import annotations

import io
import os
import signal
import struct
import sys
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # the children never import asyncio for this (the SQLite writer runs without it)
    import asyncio

HEAD: Final = struct.Struct("!cI")
COUNT: Final = struct.Struct("!q")
_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child runs this same package


async def spawn(module: str) -> asyncio.subprocess.Process:
    """Start `python -m <module>` of this package, its standard input and output piped to the worker."""
    import asyncio

    path = os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH"))))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
    )


async def receive(stream: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next frame a child wrote (asyncio.IncompleteReadError when it closed its output first)."""
    op, size = HEAD.unpack(await stream.readexactly(HEAD.size))
    return op, await stream.readexactly(size)


def frame(op: bytes, payload: bytes) -> bytes:
    return HEAD.pack(op, len(payload)) + payload


_stdin: io.BufferedReader | None = None


def _read(size: int) -> bytes:
    """Exactly `size` bytes of standard input (read straight into one buffer of that size, the small ones
    through a read-ahead); b"" when it closed first (the worker is gone)."""
    global _stdin
    if _stdin is None:
        _stdin = open(0, "rb", buffering=1 << 16, closefd=False)  # noqa: SIM115 (for the process's life)
    data = _stdin.read(size)
    return data if len(data) == size else b""


def read_frame() -> tuple[bytes, bytes] | None:
    """The next frame of standard input; None when it closed."""
    head = _read(HEAD.size)
    if not head:
        return None
    op, size = HEAD.unpack(head)
    payload = _read(size)
    return None if size and not payload else (op, payload)


def write_frame(op: bytes, payload: bytes) -> None:
    """A frame to standard output, whole."""
    data = memoryview(frame(op, payload))
    while data:
        data = data[os.write(1, data) :]


def ignore_signals() -> None:
    """A terminal's Ctrl-C, or a signal meant for the whole group, is the worker's to act on: the child finishes
    through the worker, and exits when the worker closes its input."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
