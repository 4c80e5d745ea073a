"""The state one gateway process serves from, hung off the aiohttp app (never module globals)."""

from __future__ import annotations

from typing import final

from aiohttp import web

from proxy.accounting import Accountant
from proxy.auth import KeyCache
from proxy.config import GatewayConfig
from proxy.credit import KeyBudgets, WalletCache
from proxy.metrics import Metrics
from proxy.pricing import Pricing
from proxy.routing import RouteTable
from proxy.store.base import Store
from proxy.upstream import Upstream


@final
class Gateway:
    __slots__ = (
        "accountant",
        "budgets",
        "config",
        "draining",
        "keys",
        "metrics",
        "pricing",
        "routes",
        "store",
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


GATEWAY = web.AppKey("gateway", Gateway)
