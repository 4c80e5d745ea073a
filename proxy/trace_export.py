"""The trace exporter process (`python -m proxy.trace_export`), started by a worker's `proxy.telemetry.Tracer`.

Why a process: encoding spans in a thread of the worker cost the serving thread more than the encoding itself
(they share one GIL: on a 2-core VM, chat at 32 connections, the serving thread spent ~25 µs more per traced
request with the export thread busy than with its spans dropped). Here the worker's share is one `orjson.dumps`
of a request's figures (`Tracer.end`) and one pipe write every 250 ms.

Frames (`proxy.frames`), worker to child: `C` the configuration (JSON: endpoint, headers, timeout, protocol,
resource attributes, content limit; first, once: headers may hold an API key, never an argument), `B` finished
requests (`Tracer.end`'s lines, separated by newlines). Child to worker: `D` and an 8-byte count, spans an export
lost (the collector refused, timed out or is down). The child exits when its input closes, having exported
what it had.

Each request becomes one SERVER span (`{operation} {model}`), a CLIENT span per upstream attempt and a
`gen_ai.first_token` event, exported over OTLP/HTTP up to 512 requests a call: OTLP/JSON written here as bytes
(`http/json`), or that request parsed into protobuf (`http/protobuf`: slower, ~40 µs a span).
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import urllib.request
from collections.abc import Iterable
from typing import Any, Final, final

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

# A request, as `Tracer.end` writes it: one JSON array, in this order.
(TRACE_ID, SPAN_ID, PARENT_ID, STATE, ATTEMPT_IDS, REQUEST, SURFACE, MODEL, PROVIDER, UPSTREAM_MODEL, STATUS,
 ERROR_CODE, T_START, T_FIRST_TOKEN, T_END, ATTEMPTS, USAGE, COST, NATIVE_ID, WALL, EXTRA, FINISH_REASONS, SENT,
 ANSWER, STREAMED) = range(25)  # fmt: skip

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


def _frozen(pairs: list) -> tuple:
    """JSON [name, value] pairs as a hashable key (a value may be a list: the guardrail policies)."""
    return tuple((k, tuple(v) if type(v) is list else v) for k, v in pairs)


@final
class Encoder:
    """Finished requests as an OTLP/JSON export request, written as bytes: the attributes that repeat from
    request to request (operation, models, provider, team, key, request parameters, server address) are
    encoded once per distinct set, the rest through templates (~5 µs a request of two spans)."""

    __slots__ = ("_clients", "_servers", "capture_chars", "resource")

    def __init__(self, resource: dict[str, Any], capture_chars: int):
        self.resource = b"[%b]" % _attributes(resource.items())
        self.capture_chars = capture_chars  # content recorded per request (0: none)
        self._servers: dict[tuple, tuple[bytes, bytes]] = {}  # fixed attributes → (name, encoded attributes)
        self._clients: dict[tuple, tuple[bytes, bytes]] = {}

    def body(self, requests: list[list]) -> bytes:
        return _BODY % (self.resource, b",".join([self.request(request) for request in requests]))

    def request(self, r: list) -> bytes:
        """One request's spans: its SERVER span and a CLIENT span per upstream attempt."""
        surface, model, upstream_model, status, error_code = (
            r[SURFACE],
            r[MODEL],
            r[UPSTREAM_MODEL],
            r[STATUS],
            r[ERROR_CODE],
        )
        operation = OPERATIONS.get(surface, surface)
        key = (operation, model, r[PROVIDER], upstream_model, _frozen(r[REQUEST]), _frozen(r[EXTRA]))
        name, fixed = _memo(self._servers, key, _server)
        attempts = r[ATTEMPTS]
        varying = _STATUS_CODE % status + _ATTEMPTS % len(attempts)
        if r[NATIVE_ID]:
            varying += _RESPONSE_ID % orjson.dumps(r[NATIVE_ID])
        if r[USAGE] is not None:
            varying += _TOKENS % tuple(r[USAGE])
        if r[COST]:
            varying += _COST % r[COST]
        if r[FINISH_REASONS]:
            reasons = b",".join([b'{"stringValue":%b}' % orjson.dumps(reason) for reason in r[FINISH_REASONS]])
            varying += _FINISH_REASONS % reasons
        failed = status >= 400 or bool(error_code)
        if failed:
            varying += _ERROR_TYPE % orjson.dumps(error_code or str(status))
        if self.capture_chars and r[SENT]:
            from proxy import trace_content  # the surfaces' decoders: imported only when content is captured

            sent, answer = r[SENT].encode(), r[ANSWER].encode()
            for name_, text in trace_content.messages(surface, sent, answer, r[STREAMED], self.capture_chars):
                varying += _STRING % (name_.encode(), orjson.dumps(text))
        wall = r[WALL]
        tail = _FIRST_TOKEN % (wall + int(r[T_FIRST_TOKEN] * 1e9)) if r[T_FIRST_TOKEN] else b""
        if failed:
            tail += _FAILED
        trace_id, span_id = r[TRACE_ID].encode(), r[SPAN_ID]
        state = b'"traceState":%b,' % orjson.dumps(r[STATE]) if r[STATE] else b""
        parent = (b'"parentSpanId":"%016x",' % r[PARENT_ID] if r[PARENT_ID] else b"") + state
        start, end = wall + int(r[T_START] * 1e9), wall + int(r[T_END] * 1e9)
        spans = [_SPAN % (trace_id, span_id, parent, name, SERVER, start, end, fixed, varying, tail)]
        caller = b'"parentSpanId":"%016x",%b' % (span_id, state)
        ids = r[ATTEMPT_IDS]
        if len(ids) < len(attempts):  # attempts that sent no traceparent (a job's): spans with ids of their own
            ids += [(random.getrandbits(64) or 1, "") for _ in range(len(attempts) - len(ids))]
        for (who, code, started, ended), (attempt_id, address) in zip(attempts, ids, strict=False):
            name, fixed = _memo(self._clients, (operation, who, upstream_model or model, address), _client)
            varying = _STATUS_CODE % code
            tail = b""
            if not 0 < code < 400:
                varying += _ERROR_TYPE % orjson.dumps(str(code) if code else "unreachable")
                tail = _FAILED
            start, end = wall + int(started * 1e9), wall + int((ended or started) * 1e9)
            spans.append(_SPAN % (trace_id, attempt_id, caller, name, CLIENT, start, end, fixed, varying, tail))
        return b",".join(spans)


def _memo(memo: dict[tuple, tuple[bytes, bytes]], key: tuple, make: Any) -> tuple[bytes, bytes]:
    try:
        done = memo.get(key)
    except TypeError:  # a value that cannot be hashed: encoded each time
        return make(*key)
    if done is None:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        done = memo[key] = make(*key)
    return done


def _server(
    operation: str, model: str, provider: str, upstream_model: str, request: tuple, extra: tuple
) -> tuple[bytes, bytes]:
    pairs: list[tuple[str, Any]] = [("gen_ai.operation.name", operation), ("gen_ai.request.model", model)]
    if provider:
        pairs.append(("gen_ai.provider.name", PROVIDERS.get(provider, provider)))
    if upstream_model:
        pairs.append(("gen_ai.response.model", upstream_model))
    return orjson.dumps(f"{operation} {model}" if model else operation), _attributes([*pairs, *request, *extra])


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
    """POSTs export requests to the collector (OTLP/HTTP), as JSON or protobuf."""

    __slots__ = ("endpoint", "headers", "protobuf", "timeout")

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float, protobuf: bool):
        self.endpoint = endpoint
        self.protobuf = protobuf
        kind = "application/x-protobuf" if protobuf else "application/json"
        self.headers = {**headers, "Content-Type": kind}
        self.timeout = timeout

    def send(self, body: bytes) -> bool:
        data = protobuf(body) if self.protobuf else body
        request = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
                return 200 <= answer.status < 300
        except (OSError, ValueError):  # refused, timed out, an HTTP error status, a bad URL
            return False


def export(encoder: Encoder, sender: Sender, lines: list[bytes]) -> int:
    """Export requests' spans, `_BATCH` requests a call; returns how many spans were lost."""
    lost = 0
    for start in range(0, len(lines), _BATCH):
        requests = [orjson.loads(line) for line in lines[start : start + _BATCH]]
        try:
            ok = sender.send(encoder.body(requests))
        except Exception as e:  # a fault of ours (an answer that cannot be read): counted, never fatal
            with contextlib.suppress(OSError):
                os.write(2, f"traces: exporting the spans of {len(requests)} requests failed: {e!r}\n".encode())
            ok = False
        if not ok:
            lost += sum(1 + len(r[ATTEMPTS]) for r in requests)
    return lost


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
        lost = export(encoder, sender, [line for line in frame[1].split(b"\n") if line])
        if lost:
            try:
                write_frame(b"D", COUNT.pack(lost))
            except BrokenPipeError:
                return


if __name__ == "__main__":
    main()
