"""The accounting writer process (`python -m proxy.usage_writer`), started by a worker's `proxy.recorder`.

It writes the worker's usage records to the store and answers with what it did. It stays small: a SQLite
store is served with blocking calls and plain `sqlite3` (~17 MB of interpreter and modules, ~25 MB resident
under load); only a PostgreSQL store brings asyncio and asyncpg. It exits when its standard input closes:
its worker stopped, however it stopped.

Frames (`proxy.frames`), both ways: one byte of operation, four bytes of length (big-endian), the payload.
Worker to child: `U` the store URL (first, and once), `R` journal lines (separated by newlines), `S` sync.
Child to worker: `K` an 8-byte count (records new to the store; 0 for `U` and `S`), `E` an error message.
"""

from __future__ import annotations

import contextlib

from proxy.frames import COUNT, ignore_signals, read_frame, write_frame


def _serve_sqlite(url: str) -> None:
    import time

    from proxy.store import sqlite_usage

    path = sqlite_usage.sqlite_path(url)
    db = sqlite_usage.connect(path)
    write_frame(b"K", COUNT.pack(0))
    while (frame := read_frame()) is not None:
        op, payload = frame
        try:
            if op == b"R":
                write_frame(b"K", COUNT.pack(sqlite_usage.record(db, _lines(payload), int(time.time()))))
            elif op == b"S":
                sqlite_usage.fsync_wal(path)
                write_frame(b"K", COUNT.pack(0))
            else:
                write_frame(b"E", f"unknown operation {op!r}".encode())
        except BrokenPipeError:
            break  # the worker is gone: what was committed stays, the rest is in its journal
        except Exception as e:  # the store's (locked, disk full) or a fault of ours: the worker retries the batch
            write_frame(b"E", f"cannot record usage: {e}".encode())
    db.close()


def _serve_postgres(url: str) -> None:
    import asyncio

    from proxy.store import open_store
    from proxy.store.base import StoreError

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        store = await open_store(url, pool_min=1, pool_max=1)
        try:
            write_frame(b"K", COUNT.pack(0))
            while (frame := await loop.run_in_executor(None, read_frame)) is not None:
                op, payload = frame
                try:
                    if op == b"R":
                        write_frame(b"K", COUNT.pack(await store.record(_lines(payload))))
                    elif op == b"S":
                        await store.sync()
                        write_frame(b"K", COUNT.pack(0))
                    else:
                        write_frame(b"E", f"unknown operation {op!r}".encode())
                except BrokenPipeError:
                    break
                except StoreError as e:
                    write_frame(b"E", str(e).encode())
                except Exception as e:  # a fault of ours: the worker retries the batch
                    write_frame(b"E", f"cannot record usage: {e}".encode())
        finally:
            await store.close()

    asyncio.run(serve())


def _lines(payload: bytes) -> list[bytes]:
    return [line for line in payload.split(b"\n") if line]  # a record's JSON never holds a raw newline


def main() -> None:
    ignore_signals()  # the worker flushes through this process, which exits when the worker closes its input
    frame = read_frame()
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
            write_frame(b"E", f"the accounting writer process cannot open the store: {e}".encode())


if __name__ == "__main__":
    main()
