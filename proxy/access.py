"""The access log: one JSON line per request (`server.access_log: true`), written off the event loop.

A request's line is built from its `RequestMeta` when it ends (a few microseconds) and handed to a writer
thread, which writes whatever has queued up in one call. The event loop never waits on stderr. No secret
is logged: the key appears by its public id, never its secret, and no header or body is read.

Fields: `ts` (ISO 8601, UTC), `request_id`, `team_id`, `key_id`, `endpoint`, `model`, `provider`,
`upstream_model`, `stream`, `status`, `error` (the gateway's code, when it failed), `latency_ms`,
`ttft_ms`, `provider_latency_ms`, `attempts`, `input_tokens`, `output_tokens`, `cost_nanos`, `currency`, and
`trace_id` when the request is traced (`telemetry.traces`).
"""

from __future__ import annotations

import datetime
import queue
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import IO, Final, final

import orjson
from aiohttp import web

from proxy.meta import RequestMeta, new_request_id

_BATCH: Final = 256  # lines written per call, at most
_STOP: Final = b""
CLIENT_CLOSED: Final = 499
# The inference handler leaves its `RequestMeta` here; other routes get a line from what the middleware sees.
META: Final = web.RequestKey("meta", RequestMeta)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def line(meta: RequestMeta, now: float, wall: datetime.datetime) -> bytes:
    usage = meta.usage
    record = {
        "ts": wall.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": meta.request_id,
        "team_id": meta.team_id or None,
        "key_id": meta.key_id or None,
        "endpoint": meta.surface,
        "model": meta.model or None,
        "provider": meta.provider or None,
        "upstream_model": meta.upstream_model or None,
        "stream": meta.stream,
        "status": meta.status,
        "error": meta.error_code or None,
        "latency_ms": _ms(now - meta.t_start),
        "ttft_ms": _ms(meta.ttft()),
        "provider_latency_ms": _ms(meta.provider_latency()),
        "attempts": len(meta.attempts),
        "input_tokens": usage.input_tokens if usage is not None else None,
        "output_tokens": usage.output_tokens if usage is not None else None,
        "cost_nanos": meta.cost_nanos,
        "currency": meta.currency if meta.cost_nanos is not None else None,
    }
    if meta.trace is not None:
        record["trace_id"] = meta.trace.id
    return orjson.dumps(record) + b"\n"


@final
class AccessLog:
    """Queue lines from the event loop; a daemon thread writes them to `sink` (stderr by default)."""

    __slots__ = ("_queue", "_sink", "_thread")

    def __init__(self, sink: IO[bytes] | None = None):
        self._sink = sink if sink is not None else sys.stderr.buffer
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="access-log", daemon=True)
        self._thread.start()

    def record(self, meta: RequestMeta, now: float) -> None:
        self._queue.put(line(meta, now, datetime.datetime.now(datetime.UTC)))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _write(self) -> None:
        while True:
            lines = [self._queue.get()]
            while len(lines) < _BATCH:
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in lines
            try:
                self._sink.write(b"".join(lines))
                self._sink.flush()
            except (OSError, ValueError):  # a closed or broken stderr must not take the gateway down
                pass
            if stop:
                return


def middleware(access: AccessLog) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Log every request (installed only when the access log is on)."""

    @web.middleware
    async def log_access(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except BaseException:
            status = CLIENT_CLOSED if not request.transport or request.transport.is_closing() else 500
            raise
        finally:
            meta = request.get(META)
            if meta is None:
                meta = RequestMeta(new_request_id(), f"{request.method} {request.path}", started)
                meta.status = status
            access.record(meta, time.perf_counter())

    return log_access
