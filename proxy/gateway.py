"""The state one gateway process serves from, hung off the aiohttp app (never module globals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, final

from aiohttp import web

from proxy.access import AccessLog
from proxy.accounting import Accountant
from proxy.auth import KeyCache
from proxy.config import GatewayConfig, Target
from proxy.credit import KeyBudgets, WalletCache
from proxy.errors import Code, GatewayError
from proxy.guardrails.policy import Guardrails
from proxy.limits import RateLimiter
from proxy.metrics import Metrics
from proxy.pricing import Pricing
from proxy.resilience import OPEN, STATE_NAMES, Health, HealthBoard
from proxy.response_cache import ResponseCache
from proxy.routing import RouteTable
from proxy.store.base import Store
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.telemetry import Tracer

log = logging.getLogger("proxy.health")

# Sections a reload cannot apply to a running server (listening socket, store, caches, route table).
_RESTART_ONLY = ("server", "store", "auth", "metrics", "accounting", "rate_limits", "cache", "telemetry")


@final
class Gateway:
    __slots__ = (
        "_closing",
        "access",
        "accountant",
        "budgets",
        "cache",
        "config",
        "draining",
        "guardrails",
        "health",
        "keys",
        "limiter",
        "max_hold_nanos",
        "metrics",
        "pricing",
        "retired",
        "routes",
        "store",
        "streams",
        "tracer",
        "upstreams",
        "wallets",
    )

    def __init__(self, config: GatewayConfig, routes: RouteTable, metrics: Metrics):
        self.config = config
        self.pricing = Pricing(config.prices)
        self.routes = routes
        self.metrics = metrics
        self.store: Store | None = None
        self.keys: KeyCache | None = None
        self.wallets: WalletCache | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.draining = False
        self.accountant: Accountant | None = None
        self.access: AccessLog | None = None
        self.budgets: KeyBudgets | None = None
        self.max_hold_nanos = config.auth.max_hold_nanos  # `auth` takes effect at a restart, as the limiter
        self.limiter = RateLimiter(config.rate_limits, metrics.rate_limited)  # `.active`: the config sets limits
        self.guardrails = self._guardrails(config)
        self.tracer: Tracer | None = None  # telemetry.traces: made in each worker (its export thread)
        self.cache = ResponseCache(config.cache, metrics.cache_requests, metrics.cache_saved, metrics.cache_errors)
        self.health = HealthBoard({name: p.breaker for name, p in config.providers.items()}, self._breaker_changed)
        self.streams: dict[str, int] = {}  # open streams per API key id, for server.max_streams_per_key
        self.retired: set[Upstream] = set()  # replaced by a reload, closed when their last request ends
        self._closing: set[asyncio.Task[None]] = set()

    def apply(self, config: GatewayConfig, routes: RouteTable) -> list[str]:
        """Serve new requests from a reloaded `config` (requests in flight keep what they started with).
        Returns the sections that changed but only take effect at a restart."""
        old = self.config
        later = [name for name in _RESTART_ONLY if getattr(config, name) != getattr(old, name)]
        if [(r.method, r.path, r.surface, r.default_model) for r in config.routes] != [
            (r.method, r.path, r.surface, r.default_model) for r in old.routes
        ]:
            later.append("routes")
        upstreams: dict[str, Upstream] = {}
        for name, provider in config.providers.items():
            current = self.upstreams.get(name)
            upstreams[name] = (
                current if current is not None and current.config == provider else Upstream(name, provider)
            )
        for name, current in self.upstreams.items():
            if upstreams.get(name) is not current:
                self.retire(current)
        self.config = config
        self.routes = routes
        self.pricing = Pricing(config.prices)
        if config.guardrails != old.guardrails:  # requests in flight keep the policies they started with
            self.guardrails = self._guardrails(config, self.guardrails)
        self.upstreams = upstreams
        self.health.configure({name: p.breaker for name, p in config.providers.items()})
        return later

    def _guardrails(self, config: GatewayConfig, old: Guardrails | None = None) -> Guardrails:
        metrics = self.metrics
        guardrails = Guardrails(config.guardrails, metrics.guardrail_matches, metrics.guardrail_errors)
        if old is not None:
            guardrails.session = old.session  # the webhooks' connections, kept across reloads
        return guardrails

    def retire(self, upstream: Upstream) -> None:
        """Close a replaced upstream's connections once no request uses them."""
        upstream.retired = True
        self.retired.add(upstream)
        if not upstream.users:
            self.release(upstream)

    def release(self, upstream: Upstream) -> None:
        """Called when a retired upstream's last request ends."""
        self.retired.discard(upstream)
        task = asyncio.get_running_loop().create_task(upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def sort_key(self, model_id: str, target: Target, sort: str) -> float:
        """A target's rank for a request's `provider.sort` (lower first; unknown last)."""
        if sort == "price":
            tariff = self.pricing.tariff(model_id, target.provider)
            return math.inf if tariff is None else float(tariff.input + tariff.output)
        health = self.health.of(target)
        if sort == "latency":
            return math.inf if health.latency_s is None else health.latency_s
        return math.inf if health.throughput_tps is None else -health.throughput_tps

    @contextlib.contextmanager
    def stream_slot(self, kid: str) -> Iterator[None]:
        """Hold one of the key's `server.max_streams_per_key` stream slots for the block (429 when none)."""
        limit = self.config.server.max_streams_per_key
        held = self.streams.get(kid, 0)
        if held >= limit:
            raise GatewayError(
                Code.too_many_streams,
                f"This key already has {held} streams open, the most this gateway allows per key "
                f"(server.max_streams_per_key). Retry when one ends.",
            )
        self.streams[kid] = held + 1
        try:
            yield
        finally:
            left = self.streams[kid] - 1
            if left:
                self.streams[kid] = left
            else:
                del self.streams[kid]

    def _breaker_changed(self, health: Health) -> None:
        self.metrics.breaker_state.labels(health.provider, health.model).set(health.state)
        if health.state == OPEN:
            log.warning(
                "circuit open for %s/%s after %d failures in a row (last: %s); next probe in %g s",
                health.provider,
                health.model,
                health.failures,
                health.last_error,
                health.cooldown_s,
            )
        else:
            log.info("circuit %s for %s/%s", STATE_NAMES[health.state], health.provider, health.model)


GATEWAY = web.AppKey("gateway", Gateway)
