"""Operational endpoints: liveness, readiness, Prometheus, and the envelope for unknown routes."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from proxy.errors import Code, GatewayError, render
from proxy.gateway import GATEWAY
from proxy.meta import new_request_id
from proxy.store.base import StoreError

_JSON = "application/json"


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON, headers={"x-request-id": new_request_id()})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining, and the store answers within a second."""
    gw = request.app[GATEWAY]
    checks: dict[str, str] = {}
    ready = not gw.draining
    checks["lifecycle"] = "draining" if gw.draining else "serving"
    try:
        if gw.store is None:
            raise StoreError("not open")
        await asyncio.wait_for(gw.store.ping(), 1.0)
        checks["store"] = "ok"
    except (TimeoutError, StoreError) as e:
        ready = False
        checks["store"] = f"unavailable: {e}" if str(e) else "unavailable"
    targets = {(t.provider, t.model): t for m in gw.config.models.values() for t in m.targets}
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        "providers": sorted(gw.upstreams),
        "targets": gw.health.snapshot([targets[k] for k in sorted(targets)]),  # circuit breakers: not readiness
    }
    return web.Response(
        status=200 if ready else 503,
        body=orjson.dumps(body),
        content_type=_JSON,
        headers={"x-request-id": new_request_id()},
    )


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type, "x-request-id": new_request_id()})


def not_found(known: dict[str, set[str]]):
    """Catch-all: 405 with `Allow` for a known path and another method, else 404; both in the envelope."""

    async def handle(request: web.Request) -> web.Response:
        request_id = new_request_id()
        methods = known.get(request.path)
        if methods:
            resp = render(
                GatewayError(
                    Code.method_not_allowed,
                    f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(methods))}.",
                ),
                request_id,
            )
            resp.headers["Allow"] = ", ".join(sorted(methods))
            return resp
        return render(GatewayError(Code.route_not_found, f"No route for {request.method} {request.path}."), request_id)

    return handle
