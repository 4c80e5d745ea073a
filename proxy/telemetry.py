"""OpenTelemetry traces of inference requests, with the GenAI semantic conventions (`telemetry.traces`).

Off by default; on, it needs the `otel` extra (`pip install -e '.[otel]'`: the OpenTelemetry SDK and its
OTLP/HTTP exporter), and without it the gateway refuses to start with the command to run. Off, nothing here
imports OpenTelemetry and a request does no tracing work.

A request's spans are not built while it runs. At its start the gateway reads an incoming W3C `traceparent`
(its parent; its sampled flag decides, else `sample_ratio` of trace ids) and draws the ids it will use; each
upstream attempt gets its own span id, sent upstream in the attempt's `traceparent`. When the request has
ended, its figures (already in its meta: clock readings, attempts, usage, cost) are appended to a bounded
buffer; every 250 ms a background thread takes them, turns them into one SERVER span (`{operation} {model}`),
a CLIENT span per attempt and a `gen_ai.first_token` event, and exports them over OTLP/HTTP, up to 512
requests a call: as JSON encoded here (`http/json`, the default: a few µs a span), or as protobuf through the
SDK's exporter (`http/protobuf`: its encoder costs ~35 µs a span, in a thread that shares the GIL with
serving). A full buffer (a collector down or slow) drops the request's spans, counted in
`gateway_trace_spans_dropped_total`: never a delay.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Final, final

import orjson

if TYPE_CHECKING:
    from proxy.config import TracesConfig
    from proxy.meta import RequestMeta

log = logging.getLogger("proxy.telemetry")

INSTALL: Final = "pip install -e '.[otel]'"
_TRACEPARENT: Final = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# gen_ai.operation.name and gen_ai.provider.name by surface and provider kind.
OPERATIONS: Final = {
    "openai.chat": "chat",
    "openai.responses": "chat",
    "anthropic.messages": "chat",
    "openai.embeddings": "embeddings",
    "openai.images": "generate_content",
    "openai.speech": "generate_content",
}
PROVIDERS: Final = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
_BATCH: Final = 512  # requests exported in one call, at most
_DELAY_S: Final = 0.25  # how often the export thread takes what has finished


@final
class Trace:
    """The ids one request's spans will have, drawn when it starts."""

    __slots__ = ("attempt_ids", "parent_id", "request", "span_id", "state", "trace_id")

    def __init__(self, trace_id: int, span_id: int, parent_id: int | None, state: str):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # the caller's span, when a traceparent came in
        self.state = state  # the incoming tracestate, passed on
        self.attempt_ids: list[tuple[int, str]] = []  # (span id, server address) per upstream attempt, in order
        self.request: dict[str, Any] = {}  # gen_ai.request.* attributes read from the request

    def upstream(self, address: str) -> dict[str, str]:
        """The headers of the next upstream attempt (to `address`): a traceparent naming its own span."""
        span_id = random.getrandbits(64) or 1
        self.attempt_ids.append((span_id, address))
        headers = {"traceparent": f"00-{self.trace_id:032x}-{span_id:016x}-01"}
        if self.state:
            headers["tracestate"] = self.state
        return headers

    @property
    def id(self) -> str:
        return f"{self.trace_id:032x}"


SERVER: Final = 2  # OTLP's SpanKind
CLIENT: Final = 3
_ERROR: Final = 2  # OTLP's StatusCode


@final
class SpanRecord:
    """One span, as plain figures: what either encoder turns into OTLP."""

    __slots__ = ("attributes", "end", "error", "events", "kind", "name", "parent_id", "span_id", "start", "trace")

    def __init__(self, trace: Trace, span_id: int, parent_id: int | None, name: str, kind: int, start: int, end: int,
                 attributes: dict[str, Any], events: list[tuple[str, int]], error: bool):  # fmt: skip
        self.trace = trace
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.start = start
        self.end = end
        self.attributes = attributes
        self.events = events  # (name, epoch ns)
        self.error = error


@final
class Tracer:
    """Starts requests' traces and exports their spans from a background thread."""

    __slots__ = ("_dropped", "_export_batch", "_logged_at", "_max", "_pending", "_stop", "_thread", "ratio", "resource")

    def __init__(self, config: TracesConfig, dropped: Any = None):
        try:
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise RuntimeError(
                f"telemetry.traces is on but OpenTelemetry is not installed ({e.name}): run {INSTALL}"
            ) from None
        # service.name and OTEL_RESOURCE_ATTRIBUTES, merged the SDK's way
        service = os.environ.get("OTEL_SERVICE_NAME") or config.service_name
        self.resource = Resource.create({"service.name": service})
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or config.protocol
        ).strip()
        if protocol == "http/protobuf":
            self._export_batch = _ProtobufExporter(config, self.resource).export
        elif protocol == "http/json":
            self._export_batch = _JsonExporter(config, self.resource).export
        else:
            raise RuntimeError(
                f"telemetry.traces: the OTLP protocol {protocol!r} is not supported (http/json, http/protobuf)"
            )
        self.ratio = _sample_ratio(config.sample_ratio)
        self._dropped = dropped  # gateway_trace_spans_dropped_total
        # Finished requests, taken by the export thread once a `_DELAY_S`: appending never wakes it (a wake-up
        # per request, each a handover of the GIL, would cost more than the spans).
        self._pending: collections.deque[tuple] = collections.deque()
        self._max = config.max_queue
        self._stop = threading.Event()
        self._logged_at = 0.0
        self._thread = threading.Thread(target=self._export, name="otlp-export", daemon=True)
        self._thread.start()

    def start(self, traceparent: str | None, tracestate: str | None) -> Trace | None:
        """A request's trace, or None when it is not sampled."""
        parent = _TRACEPARENT.match(traceparent.strip().lower()) if traceparent else None
        if parent is not None and int(parent.group(1), 16) and int(parent.group(2), 16):
            if not int(parent.group(3), 16) & 1:
                return None  # the caller's trace is not sampled: neither is this part of it
            trace_id, parent_id = int(parent.group(1), 16), int(parent.group(2), 16)
            return Trace(trace_id, random.getrandbits(64) or 1, parent_id, tracestate or "")
        if self.ratio <= 0 or (self.ratio < 1 and random.random() >= self.ratio):
            return None
        return Trace(random.getrandbits(128) or 1, random.getrandbits(64) or 1, None, "")

    def end(self, meta: RequestMeta, now: float, attributes: dict[str, Any]) -> None:
        """Hand a finished request's figures to the export thread (dropped, and counted, when it is behind)."""
        trace = meta.trace
        if trace is None:
            return
        wall = time.time_ns() - int(now * 1e9)  # perf_counter seconds → epoch nanoseconds
        item = (trace, meta.surface, meta.model, meta.provider, meta.upstream_model, meta.status, meta.error_code,
                meta.t_start, meta.t_first_token, meta.t_end or now, list(meta.attempts), meta.usage, meta.cost_nanos,
                meta.native_id, wall, attributes)  # fmt: skip
        if len(self._pending) < self._max:
            self._pending.append(item)
        else:
            if self._dropped is not None:
                self._dropped.labels("queue_full").inc()
            if now - self._logged_at > 60:
                self._logged_at = now
                log.warning("traces: the export queue is full (the collector is down or slow); dropping spans")

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued (for at most `timeout`), then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    # -- the export thread

    def _export(self) -> None:
        pending = self._pending
        while True:
            stopping = self._stop.wait(_DELAY_S)
            while pending:
                batch = [pending.popleft() for _ in range(min(len(pending), _BATCH))]
                spans = [span for entry in batch for span in _records(entry)]
                try:
                    ok = self._export_batch(spans)
                except Exception:  # an encoder's or exporter's failure: counted, never raised into the gateway
                    log.exception("traces: exporting %d spans failed", len(spans))
                    ok = False
                if not ok and self._dropped is not None:
                    self._dropped.labels("export_failed").inc(len(spans))
            if stopping:
                return


def _records(entry: tuple) -> list[SpanRecord]:
    """A finished request's spans: its SERVER span and a CLIENT span per upstream attempt."""
    (trace, surface, model, provider, upstream_model, status, error_code, t_start, t_first_token, t_end,
     attempts, usage, cost, native_id, wall, extra) = entry  # fmt: skip
    operation = OPERATIONS.get(surface, surface)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "http.response.status_code": status,
        **trace.request,
        **extra,
    }
    if provider:
        attributes["gen_ai.provider.name"] = PROVIDERS.get(provider, provider)
    if upstream_model:
        attributes["gen_ai.response.model"] = upstream_model
    if native_id:
        attributes["gen_ai.response.id"] = native_id
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
    if cost:
        attributes["gateway.cost_nanos"] = cost
    attributes["gateway.attempts"] = len(attempts)
    failed = status >= 400 or bool(error_code)
    if failed:
        attributes["error.type"] = error_code or str(status)
    events = [("gen_ai.first_token", wall + int(t_first_token * 1e9))] if t_first_token else []
    name = f"{operation} {model}" if model else operation
    spans = [
        SpanRecord(
            trace,
            trace.span_id,
            trace.parent_id,
            name,
            SERVER,
            wall + int(t_start * 1e9),
            wall + int(t_end * 1e9),
            attributes,
            events,
            failed,
        )
    ]
    for (who, code, started, ended), (span_id, address) in zip(attempts, trace.attempt_ids, strict=False):
        ok = 0 < code < 400
        client = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDERS.get(who, who),
            "gen_ai.request.model": upstream_model or model,
            "http.response.status_code": code,
            "server.address": address,
        }
        if not ok:
            client["error.type"] = str(code) if code else "unreachable"
        spans.append(
            SpanRecord(
                trace,
                span_id,
                trace.span_id,
                f"{operation} {upstream_model or model}",
                CLIENT,
                wall + int(started * 1e9),
                wall + int((ended or started) * 1e9),
                client,
                [],
                not ok,
            )
        )
    return spans


# -- encoders and exporters


def _headers(config: TracesConfig) -> dict[str, str]:
    """The config's headers, else OTEL_EXPORTER_OTLP_(TRACES_)HEADERS (`k=v,k2=v2`, URL-encoded)."""
    if config.headers:
        return dict(config.headers)
    raw = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or os.environ.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    out = {}
    for pair in raw.split(","):
        name, _, value = pair.partition("=")
        if name.strip():
            out[urllib.parse.unquote(name.strip())] = urllib.parse.unquote(value.strip())
    return out


def _endpoint(config: TracesConfig) -> str:
    """The config's endpoint, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT/v1/traces."""
    if config.endpoint:
        return config.endpoint
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


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


@final
class _JsonExporter:
    """OTLP/HTTP with JSON bodies (`http/json`): encoded with orjson, a few µs a span."""

    __slots__ = ("endpoint", "headers", "resource", "timeout")

    def __init__(self, config: TracesConfig, resource: Any):
        self.endpoint = _endpoint(config)
        self.headers = {**_headers(config), "Content-Type": "application/json"}
        self.timeout = config.timeout_s
        self.resource = [{"key": k, "value": _value(v)} for k, v in resource.attributes.items()]

    def export(self, spans: list[SpanRecord]) -> bool:
        encoded = []
        for span in spans:
            trace = span.trace
            out: dict[str, Any] = {
                "traceId": f"{trace.trace_id:032x}",
                "spanId": f"{span.span_id:016x}",
                "name": span.name,
                "kind": span.kind,
                "startTimeUnixNano": str(span.start),
                "endTimeUnixNano": str(span.end),
                "attributes": [{"key": k, "value": _value(v)} for k, v in span.attributes.items()],
            }
            if span.parent_id:
                out["parentSpanId"] = f"{span.parent_id:016x}"
            if trace.state:
                out["traceState"] = trace.state
            if span.events:
                out["events"] = [{"name": n, "timeUnixNano": str(t)} for n, t in span.events]
            if span.error:
                out["status"] = {"code": _ERROR}
            encoded.append(out)
        body = orjson.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": self.resource},
                        "scopeSpans": [{"scope": {"name": "stats-gateway"}, "spans": encoded}],
                    }
                ]
            }
        )
        request = urllib.request.Request(self.endpoint, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
                return 200 <= answer.status < 300
        except (OSError, ValueError):  # refused, timed out, an HTTP error status, a bad URL
            return False


@final
class _ProtobufExporter:
    """OTLP/HTTP with protobuf bodies (`http/protobuf`): the SDK's exporter and encoder (slower: ~40 µs a span)."""

    __slots__ = ("_exporter", "resource")

    def __init__(self, config: TracesConfig, resource: Any):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self.resource = resource
        self._exporter = OTLPSpanExporter(
            endpoint=_endpoint(config), headers=_headers(config) or None, timeout=config.timeout_s
        )

    def export(self, spans: list[SpanRecord]) -> bool:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        flags = TraceFlags(TraceFlags.SAMPLED)
        scope = InstrumentationScope("stats-gateway")
        readable = []
        for span in spans:
            trace = span.trace
            state = TraceState.from_header([trace.state]) if trace.state else TraceState()
            parent = SpanContext(trace.trace_id, span.parent_id, True, flags, state) if span.parent_id else None
            readable.append(
                ReadableSpan(
                    span.name,
                    context=SpanContext(trace.trace_id, span.span_id, False, flags, state),
                    parent=parent,
                    resource=self.resource,
                    attributes=span.attributes,
                    events=[Event(name, timestamp=t) for name, t in span.events],
                    kind=SpanKind.SERVER if span.kind == SERVER else SpanKind.CLIENT,
                    status=Status(StatusCode.ERROR if span.error else StatusCode.UNSET),
                    start_time=span.start,
                    end_time=span.end,
                    instrumentation_scope=scope,
                )
            )
        return self._exporter.export(readable) is SpanExportResult.SUCCESS


def _sample_ratio(configured: float) -> float:
    """The share of traces started here that are kept: OTEL_TRACES_SAMPLER(_ARG) when set, else the config's."""
    sampler = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            return min(max(float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1")), 0.0), 1.0)
        except ValueError:
            return 1.0
    return configured
