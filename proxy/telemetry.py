"""OpenTelemetry traces of inference requests, with the GenAI semantic conventions (`telemetry.traces`).

Off by default; on, it needs the `otel` extra (`pip install -e '.[otel]'`: the OpenTelemetry SDK and its
OTLP/HTTP exporter), and without it the gateway refuses to start with the command to run. Off, nothing here
imports OpenTelemetry and a request does no tracing work.

A request's spans are not built while it runs. At its start the gateway reads an incoming W3C `traceparent`
(its parent; its sampled flag decides, else `sample_ratio` of requests) and takes the ids it will use; each
upstream attempt gets its own span id, sent upstream in the attempt's `traceparent`. When the request has
ended, its spans are written from its meta as OTLP/JSON bytes (`proxy.trace_spans`: clock readings, attempts,
usage, cost, finish reasons) and kept. In `http/json` without captured content, the worker sends them to the
collector itself (`proxy.trace_collector`): 128 requests an export, a full batch at once unless an export is
on its way, the rest every 250 ms. Otherwise every 250 ms they go down a pipe to this worker's trace exporter
process (`proxy.trace_export`), 512 requests a frame, which makes protobuf of them or renders their messages,
and sends them. The worker never waits for either: requests beyond `max_queue` (or while the pipe is full) are
dropped and counted in `gateway_trace_spans_dropped_total`; so are spans an export could not deliver. A dead
exporter process is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, final

import orjson

from proxy import trace_collector, trace_content, trace_spans
from proxy.frames import COUNT, HEAD, frame, receive, spawn
from proxy.trace_spans import new_span_id, new_trace_id

if TYPE_CHECKING:
    from proxy.config import TracesConfig
    from proxy.meta import RequestMeta

log = logging.getLogger("proxy.telemetry")

INSTALL: Final = "pip install -e '.[otel]'"
_TRACEPARENT: Final = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
STREAM_CONTENT_BYTES: Final = 1 << 20
STREAM_END_BYTES: Final = 64 << 10
_DELAY_S: Final = 0.25  # how often finished requests go to the exporter process
_BATCH: Final = 512  # requests a hand-over frame to the exporter process holds, at most
# Requests an export the worker sends itself holds, at most; a full one is sent at once when no export is on
# its way (under load, every ~20 ms: holding the spans for less time costs less CPU than fewer, larger exports).
_SEND_BATCH: Final = 128
_PIPE_LIMIT: Final = 16 << 20  # bytes waiting for the exporter to read, beyond which requests are dropped


@final
class Trace:
    """The ids one request's spans will have (lowercase hex, as ASCII bytes), drawn when it starts."""

    __slots__ = (
        "answer",
        "attempt_ids",
        "parent_id",
        "reasons",
        "request",
        "sent",
        "span_id",
        "state",
        "streamed",
        "trace_id",
    )

    def __init__(self, trace_id: bytes, span_id: bytes, parent_id: bytes, state: str):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # the caller's span, when a traceparent came in (else b"")
        self.state = state  # the incoming tracestate, passed on
        self.attempt_ids: list[tuple[bytes, str]] = []  # (span id, server address) per upstream attempt, in order
        self.request: tuple[tuple[str, Any], ...] = ()  # gen_ai.request.* attributes read from the request
        self.answer = b""  # the client's answer (whole, or the stream's end): its finish reasons
        self.reasons: tuple[str, ...] | None = None  # they, when read with the answer's usage (else from `answer`)
        self.streamed = False
        self.sent = b""  # the request as sent on, when content is captured

    @property
    def id(self) -> str:
        """The trace id, as the W3C header, meta and the access log write it."""
        return self.trace_id.decode()

    def upstream(self, address: str) -> dict[str, str]:
        """The headers of the next upstream attempt (to `address`): a traceparent naming its own span."""
        headers = {"traceparent": f"00-{self.id}-{self._attempt(address).decode()}-01"}
        if self.state:
            headers["tracestate"] = self.state
        return headers

    def upstream_lines(self, address: str) -> bytes:
        """The same headers, as lines of a request head (`proxy.client.Pool.request`'s `lines`)."""
        lines = _TRACEPARENT_LINE % (self.trace_id, self._attempt(address))
        if self.state:
            lines += b"tracestate: %b\r\n" % self.state.encode()
        return lines

    def _attempt(self, address: str) -> bytes:
        span_id = new_span_id()
        self.attempt_ids.append((span_id, address))
        return span_id


_TRACEPARENT_LINE: Final = b"traceparent: 00-%b-%b-01\r\n"


@final
class Tracer:
    """Starts requests' traces, and sends finished ones to the collector (or hands them to the exporter process)."""

    __slots__ = (
        "_batch",
        "_batch_max",
        "_batch_spans",
        "_batches",
        "_collector",
        "_config",
        "_content",
        "_direct",
        "_dropped",
        "_encoder",
        "_endpoint",
        "_flusher",
        "_headers",
        "_logged_at",
        "_max",
        "_proc",
        "_reader",
        "_requests",
        "_sending",
        "_timeout",
        "_wall",
        "_wrap",
        "capture",
        "ratio",
        "stream_bytes",
    )

    def __init__(self, config: TracesConfig, dropped: Any = None):
        try:
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise RuntimeError(
                f"telemetry.traces is on but OpenTelemetry is not installed ({e.name}): run {INSTALL}"
            ) from None
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or config.protocol
        ).strip()
        if protocol not in ("http/json", "http/protobuf"):
            raise RuntimeError(
                f"telemetry.traces: the OTLP protocol {protocol!r} is not supported (http/json, http/protobuf)"
            )
        if protocol == "http/protobuf":
            try:  # the exporter process's encoder: the messages the OTLP/HTTP exporter of the extra brings
                import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
            except ImportError as e:
                raise RuntimeError(
                    f"telemetry.traces: http/protobuf needs opentelemetry-proto ({e.name}): run {INSTALL}"
                ) from None
        # service.name and OTEL_RESOURCE_ATTRIBUTES, merged the SDK's way
        service = os.environ.get("OTEL_SERVICE_NAME") or config.service_name
        resource = Resource.create({"service.name": service})
        self._endpoint, self._headers, self._timeout = _endpoint(config), _headers(config), config.timeout_s
        trace_collector.check_endpoint(self._endpoint)
        # An export request's text before and after its spans (`trace_spans.EXPORT`, with the resource's attributes)
        before, between, after = trace_spans.EXPORT.split(b"%b")
        self._wrap = (before + trace_spans.attributes(resource.attributes.items()) + between, after)
        # http/json without content: sent from here (`proxy.trace_collector`); else through the exporter process
        self._direct = protocol == "http/json" and not config.capture_content
        self._batch_max = _SEND_BATCH if self._direct else _BATCH
        self._collector: trace_collector.Collector | None = None
        self._config = orjson.dumps(
            {
                "endpoint": self._endpoint,
                "headers": self._headers,
                "timeout": config.timeout_s,
                "protocol": protocol,
                "resource": dict(resource.attributes),
                "capture_chars": config.max_content_chars if config.capture_content else 0,
            }
        )
        self.capture = config.capture_content  # the request as sent is kept for the span
        # A traced stream's events kept for its span: its whole answer when content is captured (up to 1 MB),
        # else its end (the finish reasons); beyond, the older half is let go.
        self.stream_bytes = STREAM_CONTENT_BYTES if self.capture else STREAM_END_BYTES
        self.ratio = _sample_ratio(config.sample_ratio)
        self._dropped = dropped  # gateway_trace_spans_dropped_total
        self._max = config.max_queue
        self._encoder = trace_spans.Encoder(config.max_content_chars if config.capture_content else 0)
        self._content = config.capture_content  # hand-overs hold `pending` requests (frames `P`), not spans (`B`)
        self._wall = _wall()
        # Finished requests' spans until the next hand-over, in batches: (its spans' count, its payload) once it
        # is closed, the requests' spans (bytes: not objects the garbage collector would walk) while it is open.
        self._batches: list[tuple[int, bytes]] = []  # closed
        self._batch: list[bytes] = []
        self._batch_spans = 0
        self._requests = 0  # kept, in all batches
        self._logged_at = -1e9
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._sending: asyncio.Task[None] | None = None  # the collector's export in progress

    async def open(self) -> None:
        """Start the exporter process (at start-up: one that cannot start fails the start), or the collector's
        client, and the hand-overs."""
        if self._direct:
            self._collector = trace_collector.Collector(self._endpoint, self._headers, self._timeout)
        else:
            await self._started()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    def of(self, headers: Mapping[str, str]) -> Trace | None:
        """A request's trace (its parent from its `traceparent` and `tracestate`), or None when not sampled."""
        traceparent = headers.get("traceparent")
        if traceparent is None:  # the common case: a trace of its own, sampled or not
            ratio = self.ratio
            if ratio < 1 and (ratio <= 0 or random.random() >= ratio):
                return None
            return Trace(new_trace_id(), new_span_id(), b"", "")
        return self.start(traceparent, headers.get("tracestate"))

    def start(self, traceparent: str | None, tracestate: str | None) -> Trace | None:
        """A request's trace, or None when it is not sampled."""
        parent = _TRACEPARENT.match(traceparent.strip().lower()) if traceparent else None
        if parent is not None and int(parent.group(1), 16) and int(parent.group(2), 16):
            if not int(parent.group(3), 16) & 1:
                return None  # the caller's trace is not sampled: neither is this part of it
            trace_id, parent_id = parent.group(1).encode(), parent.group(2).encode()
            return Trace(trace_id, new_span_id(), parent_id, _state(tracestate))
        if self.ratio <= 0 or (self.ratio < 1 and random.random() >= self.ratio):
            return None
        return Trace(new_trace_id(), new_span_id(), b"", "")

    def end(self, meta: RequestMeta, now: float) -> None:
        """Write a finished request's spans (OTLP/JSON, `proxy.trace_spans`) into the current batch (sent, or
        handed to the exporter process, when it is full or at the next hand-over); dropped, and counted, when
        `max_queue` requests wait. Written now, so that nothing of the request outlives it: keeping its figures
        to write them later, in one loop, cost more CPU in place (memory held longer; measured in
        docs/telemetry.md)."""
        trace = meta.trace
        if trace is None:
            return
        spans = 1 + max(len(trace.attempt_ids), len(meta.attempts))
        if self._requests >= self._max:
            self._drop("queue_full", spans)
            return
        reasons, answer = trace.reasons, trace.answer
        if reasons is None:
            reasons = trace_content.finish_reasons(meta.surface, answer, trace.streamed) if answer else ()
        try:
            written = self._encoder.request(meta, trace, reasons, meta.t_end or now, self._wall)
            if self._content:  # rendered by the exporter process
                written = trace_spans.pending(written, meta, trace)
        except (orjson.JSONEncodeError, UnicodeEncodeError):  # text that is not Unicode (a lone surrogate)
            if self._dropped is not None:
                self._dropped.labels("export_failed").inc(spans)
            log.warning("traces: spans dropped: their request's figures hold text that is not Unicode")
            return
        batch = self._batch
        if len(batch) >= self._batch_max:
            self._close_batch()
            batch = self._batch
            self._send_kept()  # now, when the worker sends its exports itself: less held
        batch.append(written)
        self._batch_spans += spans
        self._requests += 1

    async def close(self, timeout: float = 5.0) -> None:
        """Hand over what is kept and stop: the collector's client once it has sent it, or the exporter process
        once it has exported it (killed after `timeout`). Spans not sent by then are counted lost."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        collector, self._collector = self._collector, None
        if collector is not None:
            try:
                async with asyncio.timeout(timeout):
                    if self._sending is not None:
                        await self._sending
                    await self._send(collector, self._take())
            except TimeoutError:
                log.warning("traces: the collector did not take the last spans in %.0f s: dropped", timeout)
                if self._sending is not None:
                    self._sending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._sending  # its spans, counted
            collector.close()
            return
        with contextlib.suppress(OSError, RuntimeError):
            await self._flush()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
                if self._reader is not None:
                    await self._reader  # the spans it lost, counted
        except TimeoutError:
            log.warning("traces: the exporter process did not finish in %.0f s: killed", timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # -- the hand-overs

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(_DELAY_S)
            try:
                await self._flush()
            except Exception:  # the exporter cannot be started now: tried again at the next hand-over
                log.exception("traces: cannot hand spans to the exporter process")

    async def _flush(self) -> None:
        if not self._requests:
            return
        if self._collector is not None:
            self._send_kept()
            return
        try:
            proc = await self._started()
        except BaseException:
            self._drop("export_failed", self._taken())  # no exporter to take them: counted, then the failure is told
            raise
        stdin = proc.stdin
        assert stdin is not None and stdin.transport is not None
        if stdin.transport.get_write_buffer_size() > _PIPE_LIMIT:  # the exporter is stuck on the collector
            self._drop("queue_full", self._taken())
            return
        stdin.writelines(self.handover())  # no drain: its bound is checked above

    def _send_kept(self) -> None:
        """Send what is kept to the collector, unless an export is on its way: one at a time, so that while the
        collector is slow the requests that end wait here (`max_queue` at most)."""
        sending, collector = self._sending, self._collector
        if collector is not None and (sending is None or sending.done()):
            self._sending = asyncio.get_running_loop().create_task(self._send(collector, self._take()))

    async def _send(self, collector: trace_collector.Collector, batches: list[tuple[int, bytes]]) -> None:
        """Export the batches in turn; the spans of those the collector does not take are counted lost, and so
        are those left when this is cancelled."""
        done = 0
        try:
            for spans, payload in batches:
                if not await collector.send(payload):
                    self._lost(spans)
                done += 1
        finally:
            self._lost(sum(spans for spans, _ in batches[done:]))

    def handover(self) -> list[bytes]:
        """The frames that hand the kept requests' spans to the exporter process, a batch (`_BATCH` requests at
        most) a frame: the spans it holds, as a count, then their OTLP/JSON, comma-separated (`B`), or, when
        content is captured, a JSON array of `trace_spans.pending` texts (`P`). Nothing is kept after it."""
        op = b"P" if self._content else b"B"
        frames = []
        for spans, payload in self._take():
            frames += (HEAD.pack(op, COUNT.size + len(payload)) + COUNT.pack(spans), payload)
        return frames

    def _take(self) -> list[tuple[int, bytes]]:
        """The kept batches, (spans, payload) each; nothing is kept after it."""
        if self._batch:
            self._close_batch()
        batches, self._batches, self._requests = self._batches, [], 0
        self._wall = _wall()  # read again for the next batches: the system clock may have been set
        return batches

    def _close_batch(self) -> None:
        batch = self._batch
        if self._direct:  # the export request the collector gets, in one copy
            batch[0] = self._wrap[0] + batch[0]
            batch[-1] += self._wrap[1]  # (the same request, when it is alone)
        payload = b",".join(batch)
        self._batches.append((self._batch_spans, b"[%b]" % payload if self._content else payload))
        self._batch, self._batch_spans = [], 0

    def _taken(self) -> int:
        """The spans kept, let go of (for the caller to count them lost)."""
        return sum(spans for spans, _ in self._take())

    def _lost(self, spans: int) -> None:
        if spans and self._dropped is not None:
            self._dropped.labels("export_failed").inc(spans)

    async def _started(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        if proc is not None:
            log.warning("traces: the exporter process exited (status %s); starting another", proc.returncode)
        proc = await spawn("proxy.trace_export")
        assert proc.stdin is not None
        proc.stdin.write(frame(b"C", self._config))
        self._proc = proc
        self._reader = asyncio.get_running_loop().create_task(self._read_losses(proc))
        return proc

    async def _read_losses(self, proc: asyncio.subprocess.Process) -> None:
        """Count the spans the exporter reports lost, until it exits."""
        assert proc.stdout is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                op, payload = await receive(proc.stdout)
                if op == b"D" and self._dropped is not None:
                    self._dropped.labels("export_failed").inc(COUNT.unpack(payload)[0])

    def _drop(self, reason: str, spans: int) -> None:
        if self._dropped is not None:
            self._dropped.labels(reason).inc(spans)
        now = time.monotonic()
        if now - self._logged_at > 60:
            self._logged_at = now
            log.warning("traces: the exporter is behind (the collector is down or slow); dropping spans")


# -- the clock, W3C headers and the configuration


def _wall() -> int:
    """Nanoseconds since the epoch at `perf_counter()` 0: what turns the requests' clock readings into times."""
    return time.time_ns() - int(time.perf_counter() * 1e9)


def _state(tracestate: str | None) -> str:
    """An incoming `tracestate`, passed on as it is when it is what W3C allows (printable ASCII); else none."""
    if not tracestate or not tracestate.isascii() or not tracestate.isprintable() or len(tracestate) > 512:
        return ""
    return tracestate


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
