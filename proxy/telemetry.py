"""OpenTelemetry traces of inference requests, with the GenAI semantic conventions (`telemetry.traces`).

Off by default; on, it needs the `otel` extra (`pip install -e '.[otel]'`: the OpenTelemetry SDK and its
OTLP/HTTP exporter), and without it the gateway refuses to start with the command to run. Off, nothing here
imports OpenTelemetry and a request does no tracing work.

A request's spans are not built while it runs. At its start the gateway reads an incoming W3C `traceparent`
(its parent; its sampled flag decides, else `sample_ratio` of trace ids) and draws the ids it will use; each
upstream attempt gets its own span id, sent upstream in the attempt's `traceparent`. When the request has
ended, its figures (already in its meta: clock readings, attempts, usage, cost) go to a bounded queue; a
background thread turns them into one SERVER span (`{operation} {model}`), a CLIENT span per attempt and a
`gen_ai.first_token` event, and exports them with the SDK's OTLP/HTTP exporter, up to 512 requests a call
(gathered for at most a second). A full queue (a collector
down or slow) drops the request's spans, counted in `gateway_trace_spans_dropped_total`: never a delay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Final, final

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
_DELAY_S: Final = 1.0  # the longest a finished request's spans wait for others to go with them


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


@final
class Tracer:
    """Starts requests' traces and exports their spans from a background thread."""

    __slots__ = ("_dropped", "_exporter", "_logged_at", "_queue", "_thread", "ratio", "resource")

    def __init__(self, config: TracesConfig, dropped: Any = None):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise RuntimeError(
                f"telemetry.traces is on but OpenTelemetry is not installed ({e.name}): run {INSTALL}"
            ) from None
        service = os.environ.get("OTEL_SERVICE_NAME") or config.service_name
        self.resource = Resource.create({"service.name": service})
        headers = dict(config.headers) or None
        # endpoint and headers: the config's, else the standard OTEL_EXPORTER_OTLP_* variables (the SDK reads them)
        self._exporter = OTLPSpanExporter(endpoint=config.endpoint or None, headers=headers, timeout=config.timeout_s)
        self.ratio = _sample_ratio(config.sample_ratio)
        self._dropped = dropped  # gateway_trace_spans_dropped_total
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=config.max_queue)
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
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if self._dropped is not None:
                self._dropped.labels("queue_full").inc()
            if now - self._logged_at > 60:
                self._logged_at = now
                log.warning("traces: the export queue is full (the collector is down or slow); dropping spans")

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued (for at most `timeout`), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._exporter.shutdown()

    # -- the export thread

    def _export(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        while True:
            item = self._queue.get()
            batch = [item]
            until = time.monotonic() + _DELAY_S  # gather for a moment: one export call for many requests
            while len(batch) < _BATCH and item is not None:
                try:
                    item = self._queue.get(timeout=max(until - time.monotonic(), 0))
                except queue.Empty:
                    break
                batch.append(item)
            stop = None in batch
            spans = [span for entry in batch if entry is not None for span in self._spans(entry)]
            if spans:
                try:
                    result = self._exporter.export(spans)
                except Exception:  # the exporter's own failures: counted, never raised into the gateway
                    result = None
                if result is not SpanExportResult.SUCCESS and self._dropped is not None:
                    self._dropped.labels("export_failed").inc(len(spans))
            if stop:
                return

    def _spans(self, entry: tuple) -> list[Any]:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        (trace, surface, model, provider, upstream_model, status, error_code, t_start, t_first_token, t_end,
         attempts, usage, cost, native_id, wall, extra) = entry  # fmt: skip

        def ns(t: float) -> int:
            return wall + int(t * 1e9)

        flags = TraceFlags(TraceFlags.SAMPLED)
        state = TraceState.from_header([trace.state]) if trace.state else TraceState()
        context = SpanContext(trace.trace_id, trace.span_id, False, flags, state)
        parent = SpanContext(trace.trace_id, trace.parent_id, True, flags, state) if trace.parent_id else None
        scope = InstrumentationScope("stats-gateway")
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
        events = [Event("gen_ai.first_token", timestamp=ns(t_first_token))] if t_first_token else []
        server = ReadableSpan(
            f"{operation} {model}" if model else operation,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            events=events,
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR if failed else StatusCode.UNSET),
            start_time=ns(t_start),
            end_time=ns(t_end),
            instrumentation_scope=scope,
        )
        spans = [server]
        for (name, code, started, ended), (span_id, address) in zip(attempts, trace.attempt_ids, strict=False):
            ok = 0 < code < 400
            spans.append(
                ReadableSpan(
                    f"{operation} {upstream_model or model}",
                    context=SpanContext(trace.trace_id, span_id, False, flags, state),
                    parent=context,
                    resource=self.resource,
                    attributes={
                        "gen_ai.operation.name": operation,
                        "gen_ai.provider.name": PROVIDERS.get(name, name),
                        "gen_ai.request.model": upstream_model or model,
                        "http.response.status_code": code,
                        "server.address": address,
                        **({} if ok else {"error.type": str(code) if code else "unreachable"}),
                    },
                    kind=SpanKind.CLIENT,
                    status=Status(StatusCode.UNSET if ok else StatusCode.ERROR),
                    start_time=ns(started),
                    end_time=ns(ended or started),
                    instrumentation_scope=scope,
                )
            )
        return spans


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
