"""The trace exporter process (`python -m proxy.trace_export`), started by a worker's `proxy.telemetry.Tracer`
when its traces are sent as `http/protobuf` or with captured content (in `http/json` without content the worker
sends them itself: `proxy.trace_collector`).

The worker writes each finished request's spans as OTLP/JSON where the request ends (`proxy.trace_spans`) and
hands them here every 250 ms, a batch of up to 512 requests a frame; this process wraps each batch in an export
request with the resource's attributes and sends it to the collector (OTLP/HTTP), as it is (`http/json`) or
parsed into protobuf (`http/protobuf`: slower, ~40 µs a span). Its sending, which blocks, and a collector that
is slow or down stay out of the worker's way.

Frames (`proxy.frames`), worker to child: `C` the configuration (JSON: endpoint, headers, timeout, protocol,
resource attributes, content limit; first, once: headers may hold an API key, never an argument), `B` a batch
(the count of its spans, 8 bytes, then their OTLP/JSON, comma-separated), or, when content is captured, `P` a
batch to render first (the count, then a JSON array of `proxy.trace_spans.pending` texts). Child to worker:
`D` and an 8-byte count, spans an export lost (the collector refused, timed out or is down). The child exits
when its input closes, having exported what it had.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import ssl
import urllib.parse
import urllib.request
from typing import Final, final

import orjson

from proxy.frames import COUNT, ignore_signals, read_frame, write_frame
from proxy.trace_spans import EXPORT, attributes, with_content


def protobuf(body: bytes) -> bytes:
    """An OTLP/JSON export request as protobuf (OTLP/JSON writes ids in hex where proto3's JSON has base64)."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    data = orjson.loads(body)
    for resource_spans in data["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64encode(bytes.fromhex(span[name])).decode()
    return json_format.ParseDict(data, ExportTraceServiceRequest()).SerializeToString()


@final
class Sender:
    """POSTs export requests to the collector (OTLP/HTTP), as JSON or protobuf, over one keep-alive connection
    (HTTPS verified as the standard library does: its default context, `SSL_CERT_FILE`), opened again when the
    collector closed it. Through an `HTTP(S)_PROXY` the environment names for the collector (`NO_PROXY` honoured),
    each export is a request of its own through `urllib`."""

    __slots__ = ("_conn", "_direct", "_reused", "endpoint", "headers", "protobuf", "target", "timeout")

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float, protobuf: bool):
        self.endpoint = endpoint
        self.protobuf = protobuf
        kind = "application/x-protobuf" if protobuf else "application/json"
        self.headers = {**headers, "Content-Type": kind}
        self.timeout = timeout
        url = urllib.parse.urlsplit(endpoint)
        self.target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            port = url.port
        except ValueError:  # not a port: urllib refuses it, each export counted lost
            port = -1
        proxied = url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.hostname or "")
        direct = url.scheme in _SCHEMES and bool(url.hostname) and port != -1 and not proxied
        # (scheme, host, port) to keep a connection to; None: urllib (a proxy, or a URL it will refuse)
        self._direct = (url.scheme, url.hostname, port) if direct else None
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False  # the connection has carried an export already

    def send(self, body: bytes) -> bool:
        data = protobuf(body) if self.protobuf else body
        if self._direct is None:
            return self._send_through_urllib(data)
        while True:
            reused = self._reused and self._conn is not None
            try:
                conn = self._connection()
                conn.request("POST", self.target, body=data, headers=self.headers)
                answer = conn.getresponse()
                answer.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused:  # the collector had closed the idle connection: once more, on a new one
                    continue
                return False
            except (OSError, http.client.HTTPException, ValueError):  # refused, timed out, not HTTP
                self.close()
                return False
            self._reused = True
            if answer.will_close:
                self.close()
            return 200 <= answer.status < 300

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            scheme, host, port = self._direct  # type: ignore[misc]
            if scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self._reused = False
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send_through_urllib(self, data: bytes) -> bool:
        request = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
                return 200 <= answer.status < 300
        except (OSError, ValueError):  # refused, timed out, an HTTP error status, a bad URL
            return False


_SCHEMES: Final = ("http", "https")


def export(resource: bytes, sender: Sender, batch: bytes) -> int:
    """Export a hand-over's batch (its spans' count, then their OTLP/JSON), wrapped with the `resource`'s
    attributes; returns how many spans were lost."""
    if len(batch) < COUNT.size:
        _complain(f"a batch of {len(batch)} bytes cannot be read")
        return 0
    spans = COUNT.unpack_from(batch)[0]
    try:
        ok = sender.send(EXPORT % (resource, memoryview(batch)[COUNT.size :]))
    except Exception as e:  # a fault of ours (an answer that cannot be read): counted, never fatal
        _complain(f"exporting {spans} spans failed: {e!r}")
        ok = False
    return 0 if ok else spans


def _rendered(batch: bytes, limit: int) -> bytes | None:
    """A batch of requests whose content is to render (its spans' count, then a JSON array of `pending` texts)
    as one of spans; None when it cannot be read."""
    try:
        return batch[: COUNT.size] + with_content(batch[COUNT.size :], limit)
    except Exception as e:  # a fault of ours: counted, never fatal
        _complain(f"rendering the content of {len(batch)} bytes of spans failed: {e!r}")
        return None


def _complain(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"traces: {message}\n".encode())


def main() -> None:
    ignore_signals()  # the worker stops it by closing its input, after its last requests
    first = read_frame()
    if first is None or first[0] != b"C":
        return
    config = orjson.loads(first[1])
    resource = attributes(config["resource"].items())
    sender = Sender(config["endpoint"], config["headers"], config["timeout"], config["protocol"] == "http/protobuf")
    limit = config["capture_chars"]
    while (frame := read_frame()) is not None:
        op, batch = frame
        if op == b"P":
            rendered = _rendered(batch, limit)
            lost = export(resource, sender, rendered) if rendered is not None else COUNT.unpack_from(batch)[0]
        elif op == b"B":
            lost = export(resource, sender, batch)
        else:
            continue
        if lost:
            try:
                write_frame(b"D", COUNT.pack(lost))
            except BrokenPipeError:
                break
    sender.close()


if __name__ == "__main__":
    main()
