"""The accounting writer process: a worker's usage records written to the store by a child process.

Why a process: on a 2-core VM (chat at 32 connections, one worker, SQLite), with the store's writes in a
thread of the worker, the worker's serving thread spent ~40 µs more per request than with the same writes
in another process, on top of the thread's own CPU: the two share one GIL. In `python -m bench` (c=32,
4 rounds) the gateway answered 6,222 requests/s at 166 CPU µs each with the child, 5,789 at 180 with the
thread (`gateway-thread`). The child costs ~21 µs a record (making the row ~8 µs, SQLite's insert ~7 µs)
and about 25 MB resident (17 MB of it the interpreter and modules).

`Recorder` stands in for the store in `Accountant`: `record(lines)` and `sync()`, the only two calls the
accountant makes, go to the child over its standard input and come back on its standard output. The child
(`python -m proxy.usage_writer`) opens the store itself (its URL is the first message, never an argument:
`ps` would show a password) and applies each batch in one transaction, as the worker would. A batch the
child took but never acknowledged (it died) is sent again to a new child: the store skips records it has.

The child's side, and the frames both sides exchange, are in `proxy.usage_writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import final

from proxy.frames import COUNT, frame, receive, spawn
from proxy.store.base import StoreError

log = logging.getLogger("proxy.accounting")

START_TIMEOUT_S = 30.0  # the child starts Python and opens the store (a PostgreSQL server may be slow)
STOP_TIMEOUT_S = 5.0


class RecorderError(Exception):
    """The writer process failed or is gone (a StoreError to the accountant: the batch is tried again)."""


@final
class Recorder:
    """The store's writes, through a child process started on first use and again after it died."""

    __slots__ = ("_lock", "_proc", "url")

    def __init__(self, url: str):
        self.url = url
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one exchange at a time

    async def start(self) -> None:
        """Start the child and have it open the store (at start-up: a store it cannot open is found now)."""
        async with self._lock:
            await self._started()

    async def record(self, lines: Sequence[bytes]) -> int:
        """`Store.record`, in the child."""
        if not lines:
            return 0
        return await self._call(b"R", b"\n".join(lines))  # a line may end in its newline (live) or not (replay)

    async def sync(self) -> None:
        """`Store.sync`, in the child."""
        await self._call(b"S", b"")

    async def _call(self, op: bytes, payload: bytes) -> int:
        async with self._lock:
            try:
                proc = await self._started()
                return await _exchange(proc, op, payload)
            except (RecorderError, OSError, asyncio.IncompleteReadError) as e:
                await self._kill()
                raise StoreError(f"the accounting writer process failed: {e or type(e).__name__}") from e
            except asyncio.CancelledError:  # mid-exchange: its answer would be read as the next call's
                self._abandon()
                raise

    async def _started(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        proc = await spawn("proxy.usage_writer")
        self._proc = proc
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await _exchange(proc, b"U", self.url.encode())
        except BaseException:
            await self._kill()
            raise
        return proc

    def _abandon(self) -> None:
        """Kill the child without waiting (a cancelled caller cannot wait): asyncio reaps it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def close(self) -> None:
        """Stop the child: its input closes, it finishes what it does and exits (killed if it hangs)."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.returncode is not None:
                return
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.warning("the accounting writer process did not stop in %.0f s: killed", STOP_TIMEOUT_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def _exchange(proc: asyncio.subprocess.Process, op: bytes, payload: bytes) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(frame(op, payload))
    await proc.stdin.drain()
    kind, body = await receive(proc.stdout)
    if kind == b"K":
        return COUNT.unpack(body)[0]
    if kind == b"E":
        raise StoreError(body.decode(errors="replace"))
    raise RecorderError(f"unexpected answer {kind!r} from the accounting writer process")
