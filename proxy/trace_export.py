"""The trace exporter process (`python -m proxy.trace_export`), started by a worker's `proxy.telemetry.Tracer`.

Why a process: encoding spans in a thread of the worker cost the serving thread more than the encoding itself
(they share one GIL: on a 2-core VM, chat at 32 connections, the serving thread spent ~25 µs more per traced
request with the export thread busy than with its spans dropped). Here the worker's share is one `orjson.dumps`
of a request's figures (`Tracer.end`) and one pipe write every 250 ms.

Frames (`proxy.frames`), worker to child: `C` the configuration (JSON: endpoint, headers, timeout, protocol,
resource attributes, content limit; first, once: headers may hold an API key, never an argument), `B` finished
requests (`Tracer`'s hand-over: one JSON array, `[wall, [request, …]]`, each request a `Finished`). Child to
worker: `D` and an 8-byte count, spans an export lost (the collector refused, timed out or is down). The child
exits when its input closes, having exported what it had.

Each request becomes one SERVER span (`{operation} {model}`), a CLIENT span per upstream attempt and a
`gen_ai.first_token` event, exported over OTLP/HTTP up to 512 requests a call: OTLP/JSON written here as bytes
(`http/json`), or that request parsed into protobuf (`http/protobuf`: slower, ~40 µs a span).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import random
import ssl
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any, Final, final

import msgspec
import orjson

from proxy.frames import COUNT, ignore_signals, read_frame, write_frame

_BATCH: Final = 512  # requests exported in one call, at most
# gen_ai.operation.name by surface (the conventions' names; a surface they do not name is its own), and
# gen_ai.provider.name by provider kind.
OPERATIONS: Final = {
    "openai.chat": "chat",
    "openai.responses": "chat",
    "anthropic.messages": "chat",
    "openai.embeddings": "embeddings",
    "openai.images.generations": "generate_content",
    "openai.images.edits": "generate_content",
    "openai.audio.speech": "generate_content",
    "openai.audio.transcriptions": "generate_content",
    "openai.audio.translations": "generate_content",
    "openai.videos": "generate_content",
    "music.generate": "generate_content",
}
PROVIDERS: Final = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
SERVER: Final = 2  # OTLP's SpanKind
CLIENT: Final = 3


class Finished(msgspec.Struct, array_like=True):
    """A finished request, as `Tracer.end` keeps it (a JSON array, in this order). The members that are the same
    from request to request, or only copied into the spans, stay JSON text (`Raw`): no objects made for them."""

    trace_id: str
    span_id: int
    parent_id: int
    state: str
    attempt_ids: list[tuple[int, str]]  # (span id, server address) per attempt that sent a traceparent
    request: msgspec.Raw  # [[name, value], …]: gen_ai.request.* attributes
    surface: str
    model: str
    provider: str
    upstream_model: str
    status: int
    error_code: str
    t_start: float
    t_first_token: float
    t_end: float
    attempts: list[tuple[str, int, float, float | None]]  # (provider, status, start, end)
    usage: tuple[int, int] | None
    cost: int | None
    native_id: msgspec.Raw  # a JSON string
    gateway: msgspec.Raw  # [team, key id, cache status or "", [guardrail policy, …]]: the gateway's attributes
    finish_reasons: msgspec.Raw  # [reason, …]
    sent: str
    answer: str
    streamed: bool


_decode: Final = msgspec.json.Decoder(tuple[int, list[Finished]]).decode
_decode_loosely: Final = msgspec.json.Decoder(tuple[int, list[msgspec.Raw]]).decode
_decode_one: Final = msgspec.json.Decoder(Finished).decode


def decode_batch(payload: bytes) -> tuple[int, list[Finished], int]:
    """A hand-over's requests, in one call, with its `wall` (nanoseconds since the epoch at `perf_counter()` 0),
    and how many could not be read (0, unless a fault of ours: then the others are read one by one)."""
    try:
        wall, requests = _decode(payload)
        return wall, requests, 0
    except msgspec.DecodeError:
        pass
    try:
        wall, items = _decode_loosely(payload)
    except msgspec.DecodeError:
        return 0, [], 1
    requests, unread = [], 0
    for item in items:
        try:
            requests.append(_decode_one(item))
        except msgspec.DecodeError:
            unread += 1
    return wall, requests, unread


_MEMO_MAX: Final = 4096  # distinct sets of fixed attributes kept encoded (per span kind)
# One span; its attributes: the fixed set (encoded once), then the varying ones, each with its leading comma.
_SPAN: Final = (
    b'{"traceId":"%b","spanId":"%016x",%b"name":%b,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d",'
    b'"attributes":[%b%b]%b}'
)
_BODY: Final = (
    b'{"resourceSpans":[{"resource":{"attributes":%b},"scopeSpans":[{"scope":{"name":"stats-gateway"},"spans":[%b]}]}]}'
)
_STATUS_CODE: Final = b',{"key":"http.response.status_code","value":{"intValue":"%d"}}'
_ATTEMPTS: Final = b',{"key":"gateway.attempts","value":{"intValue":"%d"}}'
_TOKENS: Final = (
    b',{"key":"gen_ai.usage.input_tokens","value":{"intValue":"%d"}}'
    b',{"key":"gen_ai.usage.output_tokens","value":{"intValue":"%d"}}'
)
_COST: Final = b',{"key":"gateway.cost_nanos","value":{"intValue":"%d"}}'
_RESPONSE_ID: Final = b',{"key":"gen_ai.response.id","value":{"stringValue":%b}}'
_ERROR_TYPE: Final = b',{"key":"error.type","value":{"stringValue":%b}}'
_FINISH_REASONS: Final = b',{"key":"gen_ai.response.finish_reasons","value":{"arrayValue":{"values":[%b]}}}'
# The common varying attributes of a server span, in one template: a success with usage, a cost and a response id.
_ANSWERED: Final = _STATUS_CODE + _ATTEMPTS + _RESPONSE_ID + _TOKENS + _COST
_STRING: Final = b',{"key":"%b","value":{"stringValue":%b}}'
_FIRST_TOKEN: Final = b',"events":[{"name":"gen_ai.first_token","timeUnixNano":"%d"}]'
_FAILED: Final = b',"status":{"code":2}'  # OTLP's STATUS_CODE_ERROR


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _attributes(pairs: Iterable[Any]) -> bytes:
    """OTLP/JSON attributes of (name, value) pairs, without the list's brackets."""
    return orjson.dumps([{"key": k, "value": _value(v)} for k, v in pairs])[1:-1]


@final
class Encoder:
    """Finished requests as an OTLP/JSON export request, written as bytes: the attributes that repeat from
    request to request (operation, models, provider, team, key, request parameters, server address, finish
    reasons) are encoded once per distinct set, keyed by their JSON text as the line has it; the rest through
    templates, a success's in one. About 6.5 µs a request of two spans, and 2 µs to decode its line (a batch in
    one `msgspec` call), on the 2-core VM."""

    __slots__ = ("_clients", "_reasons", "_servers", "capture_chars", "resource")

    def __init__(self, resource: dict[str, Any], capture_chars: int):
        self.resource = b"[%b]" % _attributes(resource.items())
        self.capture_chars = capture_chars  # content recorded per request (0: none)
        self._servers: dict[tuple, tuple[bytes, bytes]] = {}  # fixed attributes → (name, encoded attributes)
        self._reasons: dict[bytes, bytes] = {}  # finish reasons (JSON) → their attribute
        self._clients: dict[tuple, tuple[bytes, bytes]] = {}

    def body(self, requests: list[Finished], wall: int) -> bytes:
        return _BODY % (self.resource, b",".join([self.request(request, wall) for request in requests]))

    def request(self, r: Finished, wall: int) -> bytes:
        """One request's spans: its SERVER span and a CLIENT span per upstream attempt."""
        surface, model, upstream_model = r.surface, r.model, r.upstream_model
        status, error_code = r.status, r.error_code
        operation = OPERATIONS.get(surface, surface)
        key = (operation, model, r.provider, upstream_model, bytes(r.request), bytes(r.gateway))
        name, fixed = _memo(self._servers, key, _server)
        attempts, usage, cost, native = r.attempts, r.usage, r.cost, r.native_id
        failed = status >= 400 or bool(error_code)
        answered = len(native) > 2  # not ""
        if usage is not None and cost and answered and not failed:  # the common case, in one go
            varying = _ANSWERED % (status, len(attempts), bytes(native), usage[0], usage[1], cost)
        else:
            varying = _STATUS_CODE % status + _ATTEMPTS % len(attempts)
            if answered:
                varying += _RESPONSE_ID % bytes(native)
            if usage is not None:
                varying += _TOKENS % usage
            if cost:
                varying += _COST % cost
        if len(r.finish_reasons) > 2:  # not []
            varying += _memo(self._reasons, bytes(r.finish_reasons), _finish_reasons)
        if failed:
            varying += _ERROR_TYPE % orjson.dumps(error_code or str(status))
        if self.capture_chars and r.sent:
            from proxy import trace_content  # the surfaces' decoders: imported only when content is captured

            sent, answer = r.sent.encode(), r.answer.encode()
            for name_, text in trace_content.messages(surface, sent, answer, r.streamed, self.capture_chars):
                varying += _STRING % (name_.encode(), orjson.dumps(text))
        tail = _FIRST_TOKEN % (wall + int(r.t_first_token * 1e9)) if r.t_first_token else b""
        if failed:
            tail += _FAILED
        trace_id, span_id = r.trace_id.encode(), r.span_id
        state = b'"traceState":%b,' % orjson.dumps(r.state) if r.state else b""
        parent = (b'"parentSpanId":"%016x",' % r.parent_id if r.parent_id else b"") + state
        start, end = wall + int(r.t_start * 1e9), wall + int(r.t_end * 1e9)
        spans = [_SPAN % (trace_id, span_id, parent, name, SERVER, start, end, fixed, varying, tail)]
        caller = b'"parentSpanId":"%016x",%b' % (span_id, state)
        ids = r.attempt_ids
        if len(ids) < len(attempts):  # attempts that sent no traceparent (none yet): spans with ids of their own
            ids += [(random.getrandbits(64) or 1, "") for _ in range(len(attempts) - len(ids))]
        clients = self._clients
        for (who, code, started, ended), (attempt_id, address) in zip(attempts, ids, strict=False):
            name, fixed = _memo(clients, (operation, who, upstream_model or model, address), _client)
            if 0 < code < 400:
                varying, tail = _STATUS_CODE % code, b""
            else:
                varying = _STATUS_CODE % code + _ERROR_TYPE % orjson.dumps(str(code) if code else "unreachable")
                tail = _FAILED
            start, end = wall + int(started * 1e9), wall + int((ended or started) * 1e9)
            spans.append(_SPAN % (trace_id, attempt_id, caller, name, CLIENT, start, end, fixed, varying, tail))
        return b",".join(spans)


def _memo(memo: dict, key: Any, make: Any) -> Any:
    """What `make(*key)` (`make(key)` for bytes) gives, made once per distinct key (at most _MEMO_MAX kept)."""
    done = memo.get(key)
    if done is None:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        done = memo[key] = make(key) if type(key) is bytes else make(*key)
    return done


def _finish_reasons(reasons: bytes) -> bytes:
    values = b",".join([b'{"stringValue":%b}' % orjson.dumps(reason) for reason in orjson.loads(reasons)])
    return _FINISH_REASONS % values


def _server(
    operation: str, model: str, provider: str, upstream_model: str, request: bytes, gateway: bytes
) -> tuple[bytes, bytes]:
    pairs: list[Any] = [("gen_ai.operation.name", operation), ("gen_ai.request.model", model)]
    if provider:
        pairs.append(("gen_ai.provider.name", PROVIDERS.get(provider, provider)))
    if upstream_model:
        pairs.append(("gen_ai.response.model", upstream_model))
    pairs += orjson.loads(request)
    team, key_id, cache, policies = orjson.loads(gateway)  # never a secret: the key by its id
    pairs += [("gateway.team", team), ("gateway.key_id", key_id)]
    if cache:
        pairs.append(("gateway.cache", cache))
    if policies:
        pairs.append(("gateway.guardrails", policies))
    return orjson.dumps(f"{operation} {model}" if model else operation), _attributes(pairs)


def _client(operation: str, provider: str, model: str, address: str) -> tuple[bytes, bytes]:
    pairs = [
        ("gen_ai.operation.name", operation),
        ("gen_ai.provider.name", PROVIDERS.get(provider, provider)),
        ("gen_ai.request.model", model),
    ]
    if address:
        pairs.append(("server.address", address))
    return orjson.dumps(f"{operation} {model}"), _attributes(pairs)


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


def export(encoder: Encoder, sender: Sender, payload: bytes) -> int:
    """Export a hand-over's spans, `_BATCH` requests a call; returns how many spans were lost (a request that
    cannot be read counts one)."""
    try:
        wall, requests, lost = decode_batch(payload)
    except Exception as e:  # a fault of ours: counted, never fatal
        _complain(f"reading {len(payload)} bytes of finished requests failed: {e!r}")
        return 1
    if lost:
        _complain(f"{lost} finished requests could not be read")
    for start in range(0, len(requests), _BATCH):
        batch = requests[start : start + _BATCH]
        try:
            ok = sender.send(encoder.body(batch, wall))
        except Exception as e:  # a fault of ours (an answer that cannot be read): counted, never fatal
            _complain(f"exporting the spans of {len(batch)} requests failed: {e!r}")
            ok = False
        if not ok:
            lost += sum(1 + len(r.attempts) for r in batch)
    return lost


def _complain(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"traces: {message}\n".encode())


def main() -> None:
    ignore_signals()  # the worker stops it by closing its input, after its last requests
    first = read_frame()
    if first is None or first[0] != b"C":
        return
    config = orjson.loads(first[1])
    encoder = Encoder(config["resource"], config["capture_chars"])
    sender = Sender(config["endpoint"], config["headers"], config["timeout"], config["protocol"] == "http/protobuf")
    while (frame := read_frame()) is not None:
        if frame[0] != b"B":
            continue
        lost = export(encoder, sender, frame[1])
        if lost:
            try:
                write_frame(b"D", COUNT.pack(lost))
            except BrokenPipeError:
                break
    sender.close()


if __name__ == "__main__":
    main()
