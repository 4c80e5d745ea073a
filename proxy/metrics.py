"""Prometheus metrics, named after the OpenTelemetry GenAI semantic conventions where they exist.

With several workers, prometheus-client runs in multiprocess mode: the serving command sets
`PROMETHEUS_MULTIPROC_DIR` before this module is imported, every worker writes its own files, and any
worker's `/metrics` aggregates them all. Labelled children are cached so a request costs a few
dictionary lookups, and label values are bounded: models and providers come from the config only.
"""

from __future__ import annotations

import os
from typing import final

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

from proxy.meta import RequestMeta

_LABELS = ("surface", "model", "provider")
_DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5, 10, 30)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1)
_THROUGHPUT = (1, 5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 1000)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@final
class Metrics:
    __slots__ = (
        "_children",
        "_counts",
        "duration",
        "in_flight",
        "multiprocess",
        "overhead",
        "registry",
        "requests",
        "throughput",
        "tokens",
        "tpot",
        "ttft",
        "upstream_duration",
    )

    def __init__(self) -> None:
        disable_created_metrics()  # `*_created` series double the output and nobody graphs them
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode the values live in files; metrics register nowhere and `render` collects.
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by surface, model, provider and HTTP status.",
            (*_LABELS, "status"),
            registry=reg,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being served now.",
            ("surface",),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "End-to-end request duration at the gateway.",
            _LABELS,
            buckets=_DURATION,
            registry=reg,
        )
        self.upstream_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of the provider call, first byte sent to last received.",
            _LABELS,
            buckets=_DURATION,
            registry=reg,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request's arrival to the first output token (streams).",
            _LABELS,
            buckets=_TTFT,
            registry=reg,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first (streams).",
            _LABELS,
            buckets=_TPOT,
            registry=reg,
        )
        self.throughput = Histogram(
            "gateway_output_throughput_tokens_per_second",
            "Output tokens per second of provider time.",
            _LABELS,
            buckets=_THROUGHPUT,
            registry=reg,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time the gateway adds: end-to-end duration minus provider duration.",
            ("surface",),
            buckets=_OVERHEAD,
            registry=reg,
        )
        self.tokens = Counter(
            "gen_ai_client_token_usage",
            "Tokens metered, by type (input, output).",
            (*_LABELS, "gen_ai_token_type"),
            registry=reg,
        )
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
            )
        duration, upstream, ttft, tpot, throughput, overhead, tok_in, tok_out = children
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
        usage = meta.usage
        if usage is not None:
            if usage.input_tokens:
                tok_in.inc(usage.input_tokens)
            if usage.output_tokens:
                tok_out.inc(usage.output_tokens)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
