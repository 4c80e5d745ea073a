"""The dashboard's providers page: each provider's and target's circuit breaker and recent error rate, and the
model catalogue with its prices.

- Error rates are the requests each provider served (their final attempt) over the last 5 minutes and hour, from
  the minute rollups: every instance's, and only the team's own for a team.
- Breaker states are the worst over this instance's workers (the `gateway_upstream_breaker_state` gauge); the
  consecutive failures, last error, latency and throughput are those the worker serving the page saw.
- Attempts by outcome (every call to a provider, retries and fallbacks included) are counted since this instance
  started, over every team: only the operator sees them.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from aiohttp import web

from proxy.config import NANOS_PER_USD
from proxy.dashboard import views
from proxy.dashboard.keys import common, team_of
from proxy.gateway import Gateway
from proxy.pricing import Tariff
from proxy.resilience import STATE_NAMES
from proxy.store.base import TargetUsage

RECENT_MS = 5 * 60_000
HOUR_MS = 3_600_000
# A tariff's unit prices besides tokens: (field, unit shown after the price).
_UNITS = (
    ("per_image", "image"),
    ("per_audio_minute", "audio minute"),
    ("per_video_second", "video second"),
    ("per_mchar", "1M characters"),
    ("per_page", "page"),
    ("per_search", "search"),
)


class _Usage:
    """Requests and errors of one model or provider over the last 5 minutes and hour."""

    __slots__ = ("errors", "errors_hour", "latency_hour", "requests", "requests_hour")

    def __init__(self) -> None:
        self.requests = self.errors = self.requests_hour = self.errors_hour = 0
        self.latency_hour = 0.0

    def add(self, row: TargetUsage, recent: bool) -> None:
        if recent:
            self.requests += row.requests
            self.errors += row.errors
        else:
            self.requests_hour += row.requests
            self.errors_hour += row.errors
            self.latency_hour += row.latency_ms_sum

    def shown(self) -> dict[str, str]:
        def rate(errors: int, requests: int) -> str:
            return f"{errors / requests:.1%}" if requests else "—"

        mean = self.latency_hour / self.requests_hour if self.requests_hour else None
        return {
            "requests": f"{self.requests:,}",
            "error_rate": rate(self.errors, self.requests),
            "requests_hour": f"{self.requests_hour:,}",
            "error_rate_hour": rate(self.errors_hour, self.requests_hour),
            "latency_hour": views.ms(mean),
            "failing": "bad" if self.requests and self.errors / self.requests >= 0.5 else "",
        }


def _breakers_and_attempts(gw: Gateway) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], dict[str, float]]]:
    """Breaker states (worst over workers) and attempts by outcome, per (provider, upstream model)."""
    states: dict[tuple[str, str], int] = {}
    attempts: dict[tuple[str, str], dict[str, float]] = {}
    for name, labels, value in gw.metrics.samples("gateway_upstream_breaker_state", "gateway_upstream_attempts"):
        target = (labels.get("provider", ""), labels.get("upstream_model", ""))
        if name == "gateway_upstream_breaker_state":
            states[target] = max(states.get(target, 0), int(value))
        elif name == "gateway_upstream_attempts_total" and value:
            outcomes = attempts.setdefault(target, {})
            outcomes[labels.get("outcome", "")] = outcomes.get(labels.get("outcome", ""), 0) + value
    return states, attempts


def _attempts_text(outcomes: dict[str, float]) -> tuple[str, str]:
    """(calls that succeeded, the failed ones by outcome), as shown."""
    ok = outcomes.get("ok", 0)
    failed = sorted(((n, o) for o, n in outcomes.items() if o != "ok"), reverse=True)
    return f"{ok:,.0f}", " · ".join(f"{o}: {n:,.0f}" for n, o in failed) or "none"


def _price(nanos: int) -> str:
    """A price as the catalogue has it, exact (cents at least): $0.075, $2.50, $40.00."""
    value = (Decimal(nanos) / NANOS_PER_USD).normalize()
    if value.as_tuple().exponent > -2:  # type: ignore[operator]
        value = value.quantize(Decimal("0.01"))
    return "$" + format(value, ",f")


def _prices(tariff: Tariff | None) -> dict[str, str]:
    if tariff is None:
        return {"input": "—", "output": "—", "cached": "—", "other": "not priced: requests cost nothing"}
    other = [f"{_price(tariff.per_request)} a request"] if tariff.per_request else []
    other += [f"{_price(getattr(tariff, f))} per {unit}" for f, unit in _UNITS if getattr(tariff, f)]
    if tariff.currency != "USD":
        other.append(tariff.currency)
    return {
        "input": _price(tariff.input),
        "output": _price(tariff.output),
        "cached": _price(tariff.cached_input) if tariff.cached_input else "—",
        "other": " · ".join(other) or "—",
    }


async def show(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    team_id, team_name = await team_of(request, gw, signed)
    store = gw.store
    assert store is not None
    operator = signed.session.role == "operator"
    now_ms = int(time.time() * 1000)
    scope = team_id or (None if operator else signed.session.team_id)
    hour, recent = await asyncio.gather(
        store.target_usage(scope, now_ms - HOUR_MS), store.target_usage(scope, now_ms - RECENT_MS)
    )
    # Reading every worker's metric files is file I/O: off the event loop.
    states, attempts = await asyncio.to_thread(_breakers_and_attempts, gw)
    by_provider: dict[str, _Usage] = {}
    by_target: dict[tuple[str, str], _Usage] = {}
    for rows, is_recent in ((hour, False), (recent, True)):
        for row in rows:
            by_provider.setdefault(row.provider, _Usage()).add(row, is_recent)
            by_target.setdefault((row.model_id, row.provider), _Usage()).add(row, is_recent)

    config = gw.config
    now = time.monotonic()
    targets: list[dict[str, Any]] = []
    catalogue: list[dict[str, Any]] = []
    breakers: dict[str, dict[str, int]] = {}
    for model_id, model in sorted(config.models.items()):
        for order, target in enumerate(model.targets, 1):
            health = gw.health.of(target).as_dict(now)
            state = STATE_NAMES[states.get((target.provider, target.model), 0)]
            counts = breakers.setdefault(target.provider, {})
            counts[state] = counts.get(state, 0) + 1
            ok, failed = _attempts_text(attempts.get((target.provider, target.model), {}))
            targets.append(
                {
                    "model": model_id,
                    "provider": target.provider,
                    "upstream_model": target.model,
                    "role": f"weight {target.weight:g}" if model.weighted else ("first" if order == 1 else f"#{order}"),
                    "state": state,
                    "failures": health["consecutive_failures"],
                    "last_error": health.get("last_error", ""),
                    "retry_in": health.get("retry_in_s"),
                    "latency": views.ms(health["latency_ms"]),  # type: ignore[arg-type]
                    "throughput": "—" if health["throughput_tps"] is None else f"{health['throughput_tps']} tok/s",
                    "usage": by_target.get((model_id, target.provider), _Usage()).shown(),
                    "attempts_ok": ok,
                    "attempts_failed": failed,
                }
            )
            catalogue.append(
                {
                    "model": model_id,
                    "endpoints": ", ".join(model.endpoints),
                    "provider": target.provider,
                    "upstream_model": target.model,
                    **_prices(gw.pricing.tariff(model_id, target.provider)),
                }
            )
    providers = []
    for name, provider in sorted(config.providers.items()):
        provider_attempts: dict[str, float] = {}
        for (attempted, _), outcomes in attempts.items():
            if attempted == name:
                for outcome, n in outcomes.items():
                    provider_attempts[outcome] = provider_attempts.get(outcome, 0) + n
        ok, failed = _attempts_text(provider_attempts)
        counts = breakers.get(name, {})
        providers.append(
            {
                "name": name,
                "kind": provider.kind,
                "breakers": " · ".join(f"{counts[s]} {s.replace('_', '-')}" for s in STATE_NAMES if counts.get(s))
                or "no target",
                "open": bool(counts.get("open") or counts.get("half_open")),
                "usage": by_provider.get(name, _Usage()).shown(),
                "attempts_ok": ok,
                "attempts_failed": failed,
            }
        )
    return views.html(
        "providers.html",
        **common(gw, signed, team_name),
        title="Providers",
        current="/dashboard/providers",
        teams=sorted(t.name for t in await store.list_teams()) if operator else [],
        operator=operator,
        workers=gw.metrics.multiprocess,
        providers=providers,
        targets=targets,
        catalogue=catalogue,
        error="",
    )
