"""The state one gateway process serves from, hung off the aiohttp app (never module globals)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import final

from aiohttp import web

from proxy.accounting import Accountant
from proxy.auth import KeyCache
from proxy.config import GatewayConfig, Target
from proxy.credit import KeyBudgets, WalletCache
from proxy.errors import Code, GatewayError
from proxy.metrics import Metrics
from proxy.pricing import Pricing
from proxy.resilience import OPEN, STATE_NAMES, Health, HealthBoard
from proxy.routing import RouteTable
from proxy.store.base import Store
from proxy.upstream import Upstream

log = logging.getLogger("proxy.health")


@final
class Gateway:
    __slots__ = (
        "accountant",
        "budgets",
        "config",
        "draining",
        "health",
        "keys",
        "metrics",
        "pricing",
        "routes",
        "store",
        "streams",
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
        self.budgets: KeyBudgets | None = None
        self.health = HealthBoard({name: p.breaker for name, p in config.providers.items()}, self._breaker_changed)
        self.streams: dict[str, int] = {}  # open streams per API key id, for server.max_streams_per_key

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
