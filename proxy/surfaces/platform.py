"""Platform APIs of the reference surface: `{"ok": true, ...}` bodies, `{"ok": false, "error", "message"}` errors."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import orjson
from aiohttp import web

from proxy.auth import token_from_headers
from proxy.errors import PLATFORM, Code, GatewayError, render
from proxy.gateway import GATEWAY
from proxy.meta import new_request_id
from proxy.store.base import Generation, StoreError


def _record(g: Generation) -> dict:
    """A generation in the reference's field names."""
    timings = orjson.loads(bytes(g.timings))
    return {
        "created_at": datetime.fromtimestamp(g.created_at / 1000, UTC).isoformat(timespec="milliseconds"),
        "request_id": g.request_id,
        "team_id": g.team_id,
        "key_id": g.key_id,
        "app_id": None,
        "endpoint": g.endpoint,
        "model_id": g.model_id,
        "provider": g.provider,
        "upstream_model": g.upstream_model,
        "native_response_id": g.native_response_id or None,
        "stream": g.stream,
        "byok": False,
        "status_code": g.status_code,
        "success": g.success,
        "error_code": g.error_code or None,
        "error_message": g.error_message or None,
        "latency_ms": timings.get("latency_ms"),
        "generation_ms": timings.get("generation_ms"),
        "throughput": timings.get("throughput_tps"),
        "timings": timings,
        "usage": orjson.loads(bytes(g.usage)),
        "usage_source": g.usage_source,
        "cost_nanos": g.cost_nanos,
        "currency": g.currency,
        "pricing_lines": orjson.loads(bytes(g.pricing_lines)),
    }


async def generations_handler(request: web.Request) -> web.Response:
    """`GET /v1/generations?id=…`: one of the calling team's records, by request id or provider response id."""
    gw = request.app[GATEWAY]
    request_id = new_request_id()
    try:
        key = await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]
        wanted = request.query.get("id", "").strip()
        if not wanted:
            raise GatewayError(Code.invalid_request, "Pass the generation's id: GET /v1/generations?id=req_…")
        found = gw.accountant.lookup(key.team_id, wanted) if gw.accountant is not None else None
        if found is None:
            try:
                found = await gw.store.get_generation(key.team_id, wanted)  # type: ignore[union-attr]
            except StoreError as e:
                raise GatewayError(Code.unavailable, "The store is unavailable; retry shortly.") from e
        if found is None:
            raise GatewayError(Code.route_not_found, f"No generation {wanted!r} for this team.", status=404)
    except GatewayError as e:
        return render(e, request_id, PLATFORM)
    return web.Response(
        body=msgspec.json.encode({"ok": True, "data": _record(found)}),
        headers={"Content-Type": "application/json", "x-request-id": request_id},
    )
