"""The accounting writer process (`python -m proxy.usage_writer`), started by a worker's `proxy.recorder`.

It writes the worker's usage records to the store and answers with what it did. It stays small: a SQLite
store is served with blocking calls and plain `sqlite3` (~17 MB of interpreter and modules, ~25 MB resident
under load); only a PostgreSQL store brings asyncio and asyncpg. It exits when its standard input closes:
its worker stopped, however it stopped.

Frames, both ways: one byte of operation, four bytes of length (big-endian), the payload.
Worker to child: `U` the store URL (first, and once), `R` journal lines (separated by newlines), `S` sync.
Child to worker: `K` an 8-byte count (records new to the store; 0 for `U` and `S`), `E` an error message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct

HEAD = struct.Struct("!cI")
COUNT = struct.Struct("!q")


def _read(size: int) -> bytes:
    """Exactly `size` bytes of standard input; b"" when it closed first (the worker is gone)."""
    chunks, left = [], size
    while left:
        chunk = os.read(0, left)
        if not chunk:
            return b""
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _frame() -> tuple[bytes, bytes] | None:
    head = _read(HEAD.size)
    if not head:
        return None
    op, size = HEAD.unpack(head)
    payload = _read(size)
    return None if size and not payload else (op, payload)


def _answer(kind: bytes, body: bytes) -> None:
    data = memoryview(HEAD.pack(kind, len(body)) + body)
    while data:
        data = data[os.write(1, data) :]


def _serve_sqlite(url: str) -> None:
    import time

    from proxy.store import sqlite_usage

    path = sqlite_usage.sqlite_path(url)
    db = sqlite_usage.connect(path)
    _answer(b"K", COUNT.pack(0))
    while (frame := _frame()) is not None:
        op, payload = frame
        try:
            if op == b"R":
                _answer(b"K", COUNT.pack(sqlite_usage.record(db, _lines(payload), int(time.time()))))
            elif op == b"S":
                sqlite_usage.fsync_wal(path)
                _answer(b"K", COUNT.pack(0))
            else:
                _answer(b"E", f"unknown operation {op!r}".encode())
        except BrokenPipeError:
            break  # the worker is gone: what was committed stays, the rest is in its journal
        except Exception as e:  # the store's (locked, disk full) or a fault of ours: the worker retries the batch
            _answer(b"E", f"cannot record usage: {e}".encode())
    db.close()


def _serve_postgres(url: str) -> None:
    import asyncio

    from proxy.store import open_store
    from proxy.store.base import StoreError

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        store = await open_store(url, pool_min=1, pool_max=1)
        try:
            _answer(b"K", COUNT.pack(0))
            while (frame := await loop.run_in_executor(None, _frame)) is not None:
                op, payload = frame
                try:
                    if op == b"R":
                        _answer(b"K", COUNT.pack(await store.record(_lines(payload))))
                    elif op == b"S":
                        await store.sync()
                        _answer(b"K", COUNT.pack(0))
                    else:
                        _answer(b"E", f"unknown operation {op!r}".encode())
                except BrokenPipeError:
                    break
                except StoreError as e:
                    _answer(b"E", str(e).encode())
                except Exception as e:  # a fault of ours: the worker retries the batch
                    _answer(b"E", f"cannot record usage: {e}".encode())
        finally:
            await store.close()

    asyncio.run(serve())


def _lines(payload: bytes) -> list[bytes]:
    return [line for line in payload.split(b"\n") if line]  # a record's JSON never holds a raw newline


def main() -> None:
    # A terminal's Ctrl-C, or a signal meant for the whole group, is its worker's to act on: the worker flushes
    # through this process, which exits when the worker closes its input.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    frame = _frame()
    if frame is None or frame[0] != b"U":
        return
    url = frame[1].decode()
    try:
        if url.startswith("sqlite://"):
            _serve_sqlite(url)
        else:
            _serve_postgres(url)
    except Exception as e:  # the store cannot be opened: the worker reads why, and fails or retries
        with contextlib.suppress(OSError):  # the worker may be gone
            _answer(b"E", f"the accounting writer process cannot open the store: {e}".encode())


if __name__ == "__main__":
    main()
