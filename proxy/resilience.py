"""Which targets a request tries, and in what order; whether each is healthy; how long to wait between tries.

- `order_targets`: a model's targets in config order, or spread by weight when weights are set, then
  narrowed and reordered by the request's `provider` preferences (the reference's routing options).
- `Health`: one target's circuit breaker (closed → open after N failures in a row → half-open after a
  cool-down, when one request probes it) and its recent latency and throughput.
- `retry_delay` / `retry_after`: exponential backoff with full jitter, or what the provider asked for.

Pure bookkeeping on the event loop: no I/O, no locks (one loop per process).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Final, final

import msgspec
from msgspec import Raw, UnsetType

from proxy.config import BreakerConfig, ModelConfig, Target
from proxy.errors import Code, GatewayError

CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2
STATE_NAMES: Final = ("closed", "open", "half_open")

# Provider answers worth another try (elsewhere, or later): rate limited, or the provider's own failure.
# 529 is Anthropic's "overloaded".
RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 529})
# The gateway's own credentials refused: no point retrying this target, but another may serve.
FALLBACK_STATUSES: Final = frozenset({401, 403})

_EWMA: Final = 0.2  # weight of the newest sample in the running averages


# ---------------------------------------------------------------------------------------------------------
# the request's routing preferences


class ProviderPrefs(msgspec.Struct, kw_only=True):
    """The `provider` member of a request, as routing options. Others the reference lists (max_price,
    preferred_max_latency, preferred_min_throughput, require_parameters) are accepted and not acted on."""

    order: list[str] | None = None
    only: list[str] | None = None
    ignore: list[str] | None = None
    allow_fallbacks: bool = True
    sort: str | None = None


SORTS: Final = ("price", "latency", "throughput")
_prefs_decoder = msgspec.json.Decoder(str | ProviderPrefs)


def decode_prefs(raw: Raw | UnsetType) -> ProviderPrefs | None:
    """The request's `provider` member (a provider name, or routing options); 400 when malformed."""
    if isinstance(raw, UnsetType):
        return None
    try:
        value = _prefs_decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise GatewayError(
            Code.invalid_request,
            f"`provider` must be a provider name or an object of routing options "
            f"(order, only, ignore, allow_fallbacks, sort): {e}",
            param="provider",
        ) from None
    if isinstance(value, str):
        return ProviderPrefs(only=[value])
    if value.sort is not None and value.sort not in SORTS:
        raise GatewayError(
            Code.invalid_request,
            f"`provider.sort` must be one of {', '.join(SORTS)}, got {value.sort!r}.",
            param="provider.sort",
        )
    return value


def _weighted(targets: list[Target], rng: random.Random) -> list[Target]:
    """Weighted targets in a random order where each comes first in proportion to its weight (sorting by
    u^(1/w), Efraimidis-Spirakis), then the unweighted ones in config order as fallbacks."""
    weighted = [t for t in targets if t.weight]
    keyed = sorted(weighted, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True)  # type: ignore[operator]
    return keyed + [t for t in targets if not t.weight]


def order_targets(
    model_id: str,
    model: ModelConfig,
    prefs: ProviderPrefs | None,
    sort_key: Callable[[str, Target, str], float],
    rng: random.Random = random._inst,  # type: ignore[attr-defined]
) -> list[Target]:
    """The targets one request may try, best first; GatewayError(400) when its preferences exclude all.
    `sort_key(model_id, target, sort)` ranks targets for `prefs.sort` (lower first)."""
    targets = model.targets
    if model.weighted:
        targets = _weighted(targets, rng)
    if prefs is None:
        return targets
    offered = sorted({t.provider for t in targets})
    if prefs.only is not None:
        targets = [t for t in targets if t.provider in prefs.only]
    if prefs.ignore:
        targets = [t for t in targets if t.provider not in prefs.ignore]
    if not targets:
        raise GatewayError(
            Code.invalid_request,
            f"`provider` rules out every provider of {model_id!r} (it is served by: {', '.join(offered)}).",
            param="provider",
        )
    if prefs.sort is not None:
        targets = sorted(targets, key=lambda t: sort_key(model_id, t, prefs.sort))  # type: ignore[arg-type]
    if prefs.order:
        rank = {name: i for i, name in enumerate(prefs.order)}
        targets = sorted(targets, key=lambda t: rank.get(t.provider, len(rank)))
    return targets if prefs.allow_fallbacks else targets[:1]


# ---------------------------------------------------------------------------------------------------------
# circuit breakers


@final
class Health:
    """One target's circuit breaker, and its recent latency (first byte) and throughput."""

    __slots__ = (
        "cooldown_s",
        "failures",
        "last_error",
        "latency_s",
        "model",
        "on_change",
        "opened_at",
        "probing",
        "provider",
        "state",
        "threshold",
        "throughput_tps",
    )

    def __init__(self, provider: str, model: str, config: BreakerConfig, on_change: Callable[[Health], None]):
        self.provider = provider
        self.model = model
        self.threshold = config.failures
        self.cooldown_s = config.cooldown_s
        self.on_change = on_change
        self.state = CLOSED
        self.failures = 0  # in a row
        self.opened_at = 0.0
        self.probing = False  # half-open: the one probe is in flight
        self.last_error = ""
        self.latency_s: float | None = None
        self.throughput_tps: float | None = None

    def ready(self, now: float) -> bool:
        """Whether a request may try this target now (no side effect)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now - self.opened_at >= self.cooldown_s
        return not self.probing

    def acquire(self, now: float) -> bool:
        """Take a try at this target: always when closed; as the one probe when its cool-down is over."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self.opened_at < self.cooldown_s:
                return False
            self._set(HALF_OPEN)
        if self.probing:
            return False
        self.probing = True
        return True

    def success(self, latency_s: float | None = None) -> None:
        self.failures = 0
        self.probing = False
        if latency_s is not None:
            self.latency_s = latency_s if self.latency_s is None else _ewma(self.latency_s, latency_s)
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self, error: str, now: float) -> None:
        self.failures += 1
        self.probing = False
        self.last_error = error
        if self.state == HALF_OPEN or (self.threshold and self.failures >= self.threshold and self.state == CLOSED):
            self.opened_at = now
            self._set(OPEN)

    def release(self) -> None:
        """A try that ended without a verdict (the client went away): let another probe."""
        self.probing = False

    def observe_throughput(self, tps: float) -> None:
        self.throughput_tps = tps if self.throughput_tps is None else _ewma(self.throughput_tps, tps)

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        return max(self.opened_at + self.cooldown_s - now, 0.0) if self.state == OPEN else 0.0

    def as_dict(self, now: float) -> dict[str, object]:
        out: dict[str, object] = {
            "provider": self.provider,
            "model": self.model,
            "state": STATE_NAMES[self.state],
            "consecutive_failures": self.failures,
            "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000.0, 1),
            "throughput_tps": None if self.throughput_tps is None else round(self.throughput_tps, 1),
        }
        if self.state == OPEN:
            out["retry_in_s"] = round(self.retry_in(now), 1)
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    def _set(self, state: int) -> None:
        self.state = state
        self.on_change(self)


def _ewma(old: float, new: float) -> float:
    return old + _EWMA * (new - old)


@final
class HealthBoard:
    """Every target's `Health`, created on first use from its provider's breaker settings."""

    __slots__ = ("_board", "_breakers", "_on_change")

    def __init__(self, breakers: Mapping[str, BreakerConfig], on_change: Callable[[Health], None]):
        self._breakers = breakers
        self._on_change = on_change
        self._board: dict[tuple[str, str], Health] = {}

    def of(self, target: Target) -> Health:
        health = self._board.get((target.provider, target.model))
        if health is None:
            config = self._breakers.get(target.provider) or BreakerConfig()
            health = self._board[(target.provider, target.model)] = Health(
                target.provider, target.model, config, self._on_change
            )
        return health

    def configure(self, breakers: Mapping[str, BreakerConfig]) -> None:
        """New breaker settings (a reload); each target keeps its state and counts."""
        self._breakers = breakers
        for (provider, _), health in self._board.items():
            config = breakers.get(provider) or BreakerConfig()
            health.threshold, health.cooldown_s = config.failures, config.cooldown_s

    def snapshot(self, targets: list[Target]) -> list[dict[str, object]]:
        now = time.monotonic()
        return [self.of(t).as_dict(now) for t in targets]


# ---------------------------------------------------------------------------------------------------------
# waiting between tries


def retry_delay(retry: int, backoff_s: float, asked_s: float | None, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    """Seconds to wait before retry number `retry` (1-based): what the provider asked for, or a random
    delay up to `backoff_s` * 2^(retry-1) ("full jitter", so that retrying clients do not synchronise)."""
    if asked_s is not None:
        return asked_s
    return rng.uniform(0.0, backoff_s * (2.0 ** (retry - 1)))


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a provider asked for: `retry-after-ms` (OpenAI), or `Retry-After` in seconds or as an
    HTTP date. None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    text = headers.get("retry-after")
    if not text:
        return None
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
