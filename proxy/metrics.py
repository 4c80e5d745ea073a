"""Prometheus metrics, named after the OpenTelemetry GenAI semantic conventions where they exist.

With several workers, prometheus-client runs in multiprocess mode: the serving command sets
`PROMETHEUS_MULTIPROC_DIR` before this module is imported, every worker writes its own files, and any
worker's `/metrics` aggregates them all. Labelled children are cached so a request costs a few
dictionary lookups, and label values are bounded: models and providers come from the config only.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate
from typing import Any, final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as mp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.meta import RequestMeta

_LABELS = ("surface", "model", "provider")
_DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5, 10, 30)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1)
_THROUGHPUT = (1, 5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 1000)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# ---------------------------------------------------------------------------------------------------------
# Single-process instruments. prometheus-client's own take a lock and walk the buckets in Python (about
# 2 us an observation); these keep plain per-series arrays and are exposed through the library's
# custom-collector API. Multiprocess mode needs the library's file-backed values, so it keeps them.


@final
class _HistogramSeries:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


@final
class _ValueSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _LeanMetric:
    """`.labels(*values)` like prometheus-client's metrics; `family()` for the collector."""

    def __init__(
        self, kind: str, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...] = ()
    ):
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = tuple(float(b) for b in buckets)
        self.series: dict[tuple[str, ...], _HistogramSeries | _ValueSeries] = {}

    def labels(self, *values: str) -> Any:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _HistogramSeries(self.bounds) if self.bounds else _ValueSeries()
        return series

    def family(self) -> Metric:
        if self.kind == "histogram":
            family: Metric = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
            for values, series in self.series.items():
                assert isinstance(series, _HistogramSeries)
                cumulative = list(accumulate(series.counts))
                family.add_metric(list(values), list(zip(les, cumulative, strict=True)), series.sum)  # type: ignore[attr-defined]
            return family
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.series.items():
            family.add_metric(list(values), series.value)  # type: ignore[union-attr,attr-defined]
        return family


class _LeanCollector(Collector):
    def __init__(self, metrics: list[_LeanMetric]):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return [m.family() for m in self.metrics]


@final
class Metrics:
    __slots__ = (
        "_attempts",
        "_children",
        "_counts",
        "backlog",
        "breaker_state",
        "cache_errors",
        "cache_requests",
        "cache_saved",
        "duration",
        "guardrail_errors",
        "guardrail_matches",
        "in_flight",
        "multiprocess",
        "overhead",
        "rate_limited",
        "redis_errors",
        "registry",
        "requests",
        "spend",
        "throughput",
        "tokens",
        "tpot",
        "trace_dropped",
        "ttft",
        "upstream_attempts",
        "upstream_duration",
    )

    def __init__(self) -> None:
        disable_created_metrics()  # `*_created` series double the output and nobody graphs them
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        lean: list[_LeanMetric] = []

        def make(
            kind: str, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = (), mode: str = ""
        ) -> Any:
            if not self.multiprocess:
                lean.append(_LeanMetric(kind, name, doc, labels, buckets))
                return lean[-1]
            # Values live in per-process files; `render` collects them all. Metrics register nowhere.
            if kind == "histogram":
                return Histogram(name, doc, labels, buckets=buckets, registry=None)
            if kind == "gauge":
                return Gauge(name, doc, labels, registry=None, multiprocess_mode=mode or "livesum")
            return Counter(name, doc, labels, registry=None)

        self.requests = make(
            "counter",
            "gateway_requests",
            "Requests answered, by surface, model, provider and HTTP status.",
            (*_LABELS, "status"),
        )
        self.in_flight = make("gauge", "gateway_in_flight_requests", "Requests being served now.", ("surface",))
        self.duration = make(
            "histogram",
            "gen_ai_server_request_duration_seconds",
            "End-to-end request duration at the gateway.",
            _LABELS,
            _DURATION,
        )
        self.upstream_duration = make(
            "histogram",
            "gen_ai_client_operation_duration_seconds",
            "Duration of the provider call, first byte sent to last received.",
            _LABELS,
            _DURATION,
        )
        self.ttft = make(
            "histogram",
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request's arrival to the first output token (streams).",
            _LABELS,
            _TTFT,
        )
        self.tpot = make(
            "histogram",
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first (streams).",
            _LABELS,
            _TPOT,
        )
        self.throughput = make(
            "histogram",
            "gateway_output_throughput_tokens_per_second",
            "Output tokens per second of provider time.",
            _LABELS,
            _THROUGHPUT,
        )
        self.overhead = make(
            "histogram",
            "gateway_overhead_seconds",
            "Time the gateway adds: end-to-end duration minus provider duration.",
            ("surface",),
            _OVERHEAD,
        )
        self.spend = make(
            "counter",
            "gateway_spend_usd",
            "What requests cost, in USD (exact amounts are in the generation records).",
            _LABELS,
        )
        self.tokens = make(
            "counter",
            "gen_ai_client_token_usage",
            "Tokens metered, by type (input, output).",
            (*_LABELS, "gen_ai_token_type"),
        )
        self.upstream_attempts = make(
            "counter",
            "gateway_upstream_attempts",
            "Calls to providers, by provider, upstream model and outcome (ok, an HTTP status, timeout, unreachable, "
            "broken).",
            ("provider", "upstream_model", "outcome"),
        )
        self.breaker_state = make(
            "gauge",
            "gateway_upstream_breaker_state",
            "Circuit breaker per target: 0 closed, 1 open, 2 half-open (the worst over workers).",
            ("provider", "upstream_model"),
            mode="livemax",
        )
        self.rate_limited = make(
            "counter",
            "gateway_rate_limited",
            "Requests refused by a rate limit, by subject (key, team) and limit (requests, tokens, concurrency).",
            ("subject", "limit"),
        )
        self.guardrail_matches = make(
            "counter",
            "gateway_guardrail_matches",
            "Guardrail policies that matched, by policy, stage (request, response) and action (block, redact, log, "
            "clamp).",
            ("policy", "stage", "action"),
        )
        self.guardrail_errors = make(
            "counter",
            "gateway_guardrail_errors",
            "Guardrail webhooks that failed (down, slow, a bad answer), by policy; `on_error` said what followed.",
            ("policy",),
        )
        self.cache_requests = make(
            "counter",
            "gateway_cache_requests",
            "Requests the response cache was on for, by result (hit, miss, bypass).",
            ("result",),
        )
        self.cache_saved = make(
            "counter",
            "gateway_cache_saved_usd",
            "What the answers served from the response cache would have cost, less what hits were charged (USD), by "
            "surface.",
            ("surface",),
        )
        self.cache_errors = make(
            "counter",
            "gateway_cache_errors",
            "Calls to the response cache's Redis that failed or timed out, by operation (get: a miss; set: not kept).",
            ("op",),
        )
        self.backlog = make(
            "gauge",
            "gateway_accounting_backlog",
            "Usage records waiting for the store (summed over workers), by writer (process, thread); new requests "
            "get 503 at accounting.max_backlog.",
            ("writer",),
        )
        self.trace_dropped = make(
            "counter",
            "gateway_trace_spans_dropped",
            "Traced requests whose spans were not exported, by reason (queue_full: the collector is behind; "
            "export_failed: spans it refused or did not take).",
            ("reason",),
        )
        self.redis_errors = make(
            "counter",
            "gateway_redis_errors",
            "Redis calls that failed or timed out, by use (limits: rate limits and credit holds); the gateway "
            "went on as `rate_limits.on_redis_error` says.",
            ("use",),
        )
        if lean:
            self.registry.register(_LeanCollector(lean))
        self._attempts: dict[tuple[str, str, str], Any] = {}
        self._children: dict[tuple[str, str, str], tuple] = {}
        self._counts: dict[tuple[str, str, str, int], object] = {}

    def record(self, meta: RequestMeta, now: float) -> None:
        """Account one finished request (any outcome)."""
        key = (meta.surface, meta.model, meta.provider)
        count = self._counts.get((*key, meta.status))
        if count is None:
            count = self._counts[(*key, meta.status)] = self.requests.labels(*key, str(meta.status))
        count.inc()  # type: ignore[attr-defined]
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.duration.labels(*key),
                self.upstream_duration.labels(*key),
                self.ttft.labels(*key),
                self.tpot.labels(*key),
                self.throughput.labels(*key),
                self.overhead.labels(meta.surface),
                self.tokens.labels(*key, "input"),
                self.tokens.labels(*key, "output"),
                self.spend.labels(*key),
            )
        duration, upstream, ttft, tpot, throughput, overhead, tok_in, tok_out, spend = children
        latency = now - meta.t_start
        duration.observe(latency)
        provider = meta.provider_latency()
        if provider is not None:
            upstream.observe(provider)
            overhead.observe(max(latency - provider, 0.0))
        first = meta.ttft()
        if first is not None:
            ttft.observe(first)
        per_token = meta.tpot()
        if per_token is not None:
            tpot.observe(per_token)
        rate = meta.throughput()
        if rate is not None:
            throughput.observe(rate)
        if meta.cost_nanos:
            spend.inc(meta.cost_nanos / 1e9)
        usage = meta.usage
        if usage is not None:
            if usage.input_tokens:
                tok_in.inc(usage.input_tokens)
            if usage.output_tokens:
                tok_out.inc(usage.output_tokens)

    def settled(self, meta: RequestMeta) -> None:
        """Account the bill of an asynchronous job when its results arrive (its requests were recorded when
        they were made): spend and tokens only."""
        key = (meta.surface, meta.model, meta.provider)
        if meta.cost_nanos:
            self.spend.labels(*key).inc(meta.cost_nanos / 1e9)
        usage = meta.usage
        if usage is not None:
            if usage.input_tokens:
                self.tokens.labels(*key, "input").inc(usage.input_tokens)
            if usage.output_tokens:
                self.tokens.labels(*key, "output").inc(usage.output_tokens)

    def attempt(self, provider: str, model: str, outcome: str) -> None:
        """Count one call to a provider (outcomes are few: `ok`, a status, or a transport failure's kind)."""
        key = (provider, model, outcome)
        counter = self._attempts.get(key)
        if counter is None:
            counter = self._attempts[key] = self.upstream_attempts.labels(*key)
        counter.inc()

    def samples(self, *names: str) -> list[tuple[str, dict[str, str], float]]:
        """The current samples (name, labels, value) of these metrics, every worker's in multiprocess mode (which
        reads their files: call it off the event loop). A counter's sample names end in `_total`."""
        wanted = set(names)
        return [
            (sample.name, sample.labels, sample.value)
            for family in self._collecting().collect()
            if family.name in wanted
            for sample in family.samples
        ]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self._collecting()), CONTENT_TYPE_LATEST

    def _collecting(self) -> CollectorRegistry:
        """This process's registry, or in multiprocess mode one that reads every worker's files."""
        if not self.multiprocess:
            return self.registry
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        return registry
