"""Per-request timings and usage, measured on one monotonic clock (`time.perf_counter`).

A `RequestMeta` lives for one request. Handlers stamp it at fixed points; `as_dict()` derives the
reference's figures: latency, provider latency, TTFT, generation time, TPOT, throughput, overhead.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final, final

import msgspec
import orjson

if TYPE_CHECKING:
    from proxy.guardrails.policy import Guarded
    from proxy.limits import Admission
    from proxy.pricing import Tariff
    from proxy.response_cache import Lookup
    from proxy.telemetry import Trace


class Usage(msgspec.Struct, omit_defaults=True):
    """Token counts, and units of media, in the gateway's neutral terms (zero: not metered)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0  # images generated or edited
    characters: int = 0  # characters of text spoken (text to speech)
    audio_seconds: float = 0.0  # audio transcribed or translated, or music generated
    pages: int = 0  # pages read (OCR)
    searches: int = 0  # rerank searches (search units)
    video_seconds: float = 0.0  # seconds of video generated

    def units(self) -> bool:
        """Whether any media unit was metered."""
        return any(getattr(self, name) for name in MEDIA_UNITS)


MEDIA_UNITS: Final = ("images", "characters", "audio_seconds", "pages", "searches", "video_seconds")


def _process_tag() -> str:
    return os.urandom(4).hex()


_tag = _process_tag()
_serial = itertools.count()


def _forked() -> None:  # a worker must not share its parent's tag (ids would collide)
    global _tag, _serial
    _tag, _serial = _process_tag(), itertools.count()


os.register_at_fork(after_in_child=_forked)


def new_request_id() -> str:
    """`req_` and 24 hex digits: milliseconds since the epoch, a random tag per process, a counter. Ids sort by
    time (the store's index grows at its end instead of at random places) and cost no system call."""
    return f"req_{time.time_ns() // 1_000_000:011x}{_tag}{next(_serial) & 0xFFFFF:05x}"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _provider_latency(upstream_start: float, upstream_end: float) -> float | None:
    return upstream_end - upstream_start if upstream_start and upstream_end else None


def _generation(upstream_start: float, first_token: float, upstream_end: float) -> float | None:
    if first_token and upstream_end:
        return upstream_end - first_token
    return _provider_latency(upstream_start, upstream_end)


def _tpot(first_token: float, upstream_end: float, output_tokens: int) -> float | None:
    if not first_token or not upstream_end or output_tokens < 2:
        return None
    return (upstream_end - first_token) / (output_tokens - 1)


def _throughput(provider: float | None, output_tokens: int) -> float | None:
    return output_tokens / provider if provider and output_tokens else None


def timing_figures(
    start: float,
    upstream_start: float,
    first_token: float,
    upstream_end: float,
    now: float,
    output_tokens: int,
    attempts: Iterable[Sequence],
) -> dict:
    """A request's timing figures (and attempts) from its clock readings (`time.perf_counter()`; 0: did not
    happen), as `meta` and the generation record show them (`RequestMeta.timings`, and the journal's lines
    made rows, `proxy.records`)."""
    latency = now - start
    provider = _provider_latency(upstream_start, upstream_end)
    ttft = first_token - start if first_token else None
    generation = _generation(upstream_start, first_token, upstream_end)
    tpot = _tpot(first_token, upstream_end, output_tokens)
    throughput = _throughput(provider, output_tokens)
    return {
        "latency_ms": _ms(latency),
        "provider_latency_ms": None if provider is None else _ms(provider),
        "ttft_ms": None if ttft is None else _ms(ttft),
        "generation_ms": None if generation is None else _ms(generation),
        "tpot_ms": None if tpot is None else _ms(tpot),
        "throughput_tps": None if throughput is None else round(throughput, 3),
        "output_speed_tps": None if not tpot else round(1.0 / tpot, 3),
        "gateway_overhead_ms": None if provider is None else _ms(max(latency - provider, 0.0)),
        "attempts": [
            {"provider": name, "status": status, "duration_ms": _ms(end - begun)}
            for name, status, begun, end in attempts
        ],
    }


@final
class RequestMeta:
    __slots__ = (
        "accounted",
        "attempts",
        "cache",
        "cache_status",
        "cost_nanos",
        "currency",
        "dropped_params",
        "error_code",
        "error_message",
        "finished",
        "guarded",
        "guardrails",
        "hold",
        "hold_shared",
        "key_id",
        "key_limited",
        "limits",
        "model",
        "native_id",
        "pricing_json",
        "pricing_lines",
        "provider",
        "request_bytes",
        "request_id",
        "saved_nanos",
        "status",
        "stream",
        "streamed_events",
        "surface",
        "t_end",
        "t_first_token",
        "t_start",
        "t_upstream_end",
        "t_upstream_start",
        "tariff",
        "team_id",
        "trace",
        "upstream_model",
        "usage",
        "usage_source",
    )

    def __init__(self, request_id: str, surface: str, t_start: float):
        self.request_id = request_id
        self.surface = surface
        self.t_start = t_start
        self.model = ""
        self.provider = ""
        self.upstream_model = ""
        self.stream = False
        self.status = 0
        self.finished = False  # the whole response reached the client's connection
        self.t_upstream_start = 0.0
        self.t_first_token = 0.0
        self.t_upstream_end = 0.0
        self.usage: Usage | None = None
        self.cost_nanos: int | None = None  # None: the model is not priced
        self.currency = "USD"
        self.pricing_lines: list[dict] = []
        self.pricing_json = b"[]"  # `pricing_lines` as JSON, made once for the answer and the record
        self.attempts: list[tuple[str, int, float, float]] = []  # (provider, status, start, end)
        self.dropped_params: tuple[str, ...] = ()  # request parameters the provider could not honour, left out
        # for accounting
        self.team_id = ""
        self.key_id = ""
        self.key_limited = False  # the key has cost limits: its spend is counted
        self.tariff: Tariff | None = None
        self.request_bytes = 0
        self.streamed_events = 0
        self.usage_source = "reported"
        self.native_id = ""
        self.error_code = ""
        self.error_message = ""
        self.t_end = 0.0
        self.hold = 0  # nano-dollars of its team's wallet it holds while it runs (its worst-case cost)
        self.hold_shared = False  # the hold is in Redis (rate_limits.url), else in this process
        self.limits: Admission | None = None  # what it holds of the rate limits, and their headers
        self.accounted = False  # handed to the accountant (its record is journaled): a second submit is a no-op
        # What its guardrail policies did: [{"policy", "stage", "action", "kinds": {KIND: count}}] (never the
        # matched text); None: no policy applied or matched
        self.guardrails: list[dict] | None = None
        self.guarded: Guarded | None = None  # its guardrail policies, for its answer (none: no guardrail work)
        self.trace: Trace | None = None  # its OpenTelemetry ids (None: not traced)
        self.cache: Lookup | None = None  # its dealings with the response cache (None: the cache is off for it)
        # What the response cache did: '' (not involved), 'hit', 'miss' or 'bypass'; on a hit, the nanos the
        # answer would have cost (its own `cost_nanos` is then 0 or a fraction)
        self.cache_status = ""
        self.saved_nanos = 0

    def price(self, tariff: Tariff | None) -> bytes:
        """Cost this request's usage; the `cost_nanos`, `currency`, `pricing_lines` members (b"" if unpriced)."""
        if tariff is None:
            return b""
        self.cost_nanos, self.pricing_lines = tariff.cost(self.usage)
        self.currency = tariff.currency
        self.pricing_json = orjson.dumps(self.pricing_lines)
        return b'"cost_nanos":%d,"currency":%s,"pricing_lines":%s' % (
            self.cost_nanos,
            orjson.dumps(self.currency),
            self.pricing_json,
        )

    def upstream_started(self) -> None:
        self.t_upstream_start = time.perf_counter()

    def upstream_ended(self, status: int) -> None:
        self.t_upstream_end = time.perf_counter()
        self.attempts.append((self.provider, status, self.t_upstream_start, self.t_upstream_end))

    # Derived figures, in seconds; None where not measured.
    def latency(self, now: float | None = None) -> float:
        return (now or time.perf_counter()) - self.t_start

    def provider_latency(self) -> float | None:
        return _provider_latency(self.t_upstream_start, self.t_upstream_end)

    def ttft(self) -> float | None:
        return self.t_first_token - self.t_start if self.t_first_token else None

    def generation(self) -> float | None:
        return _generation(self.t_upstream_start, self.t_first_token, self.t_upstream_end)

    def tpot(self) -> float | None:
        """Time per output token after the first: (provider duration - TTFT) / (output tokens - 1)."""
        return _tpot(self.t_first_token, self.t_upstream_end, self.usage.output_tokens if self.usage else 0)

    def throughput(self) -> float | None:
        """Output tokens per second of provider time."""
        return _throughput(self.provider_latency(), self.usage.output_tokens if self.usage else 0)

    def timings(self, now: float) -> dict:
        """The timing figures (and attempts), as meta and the generation record show them."""
        output_tokens = self.usage.output_tokens if self.usage else 0
        return timing_figures(
            self.t_start,
            self.t_upstream_start,
            self.t_first_token,
            self.t_upstream_end,
            now,
            output_tokens,
            self.attempts,
        )

    def as_dict(self, now: float | None = None) -> dict:
        """The `meta` object of a response (`dropped_params` only when a parameter was left out, `guardrails`
        only when a policy acted)."""
        out = {
            "request_id": self.request_id,
            "provider": self.provider,
            "model": self.model,
            "upstream_model": self.upstream_model,
            "endpoint": self.surface,
            "stream": self.stream,
            **self.timings(now or time.perf_counter()),
            "cost_nanos": self.cost_nanos,
        }
        if self.dropped_params:
            out["dropped_params"] = list(self.dropped_params)
        if self.guardrails:
            out["guardrails"] = self.guardrails
        if self.cache is not None:
            out["cache"] = self.cache.as_dict()
        if self.trace is not None:
            out["trace_id"] = self.trace.id
        return out
