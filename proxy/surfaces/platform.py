"""Platform APIs of the reference surface: `{"ok": true, ...}` bodies, `{"ok": false, "error", "message"}` errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
import orjson
from aiohttp import web

from proxy.auth import KEY_PREFIX, token_from_headers
from proxy.credit import usd
from proxy.errors import PLATFORM, Code, GatewayError, render
from proxy.gateway import GATEWAY, Gateway
from proxy.meta import Usage, new_request_id
from proxy.store.base import Generation, KeyRecord, StoreError


def _record(g: Generation) -> dict:
    """A generation in the reference's field names."""
    timings = orjson.loads(bytes(g.timings))
    return {
        "created_at": _iso(g.created_at),
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


Platform = Callable[[web.Request, Gateway, KeyRecord], Awaitable[object]]


def platform_handler(serve: Platform, *, management: bool = False) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler: authenticate (a management key when asked), run `serve`, answer `{"ok": true, …}`."""

    async def handle(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        request_id = new_request_id()
        try:
            key = await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]
            if management and not key.management:
                raise GatewayError(
                    Code.forbidden, "This endpoint needs a management key (stats-gateway keys create --management)."
                )
            data = await serve(request, gw, key)
        except GatewayError as e:
            return render(e, request_id, PLATFORM)
        except StoreError as e:
            return render(GatewayError(Code.unavailable, f"The store is unavailable: {e}"), request_id, PLATFORM)
        return web.Response(
            body=msgspec.json.encode({"ok": True, "data": data}),
            headers={"Content-Type": "application/json", "x-request-id": request_id},
        )

    return handle


async def _generation(request: web.Request, gw: Gateway, key: KeyRecord) -> object:
    """`GET /v1/generations?id=…`: one of the calling team's records, by request id or provider response id."""
    wanted = request.query.get("id", "").strip()
    if not wanted:
        raise GatewayError(Code.invalid_request, "Pass the generation's id: GET /v1/generations?id=req_…")
    found = gw.accountant.lookup(key.team_id, wanted) if gw.accountant is not None else None
    if found is None:
        found = await gw.store.get_generation(key.team_id, wanted)  # type: ignore[union-attr]
    if found is None:
        raise GatewayError(Code.route_not_found, f"No generation {wanted!r} for this team.", status=404)
    return _record(found)


async def _key(request: web.Request, gw: Gateway, key: KeyRecord) -> object:
    """`GET /v1/key`: the calling key, never its secret."""
    return {
        "id": key.kid,
        "name": key.name,
        "prefix": f"{KEY_PREFIX}{key.kid}",
        "status": key.status,
        "scopes": list(key.scopes),
        "team_id": key.team_id,
        "team_name": key.team_name,
        "created_at": _iso(key.created_at * 1000),
    }


async def _credits(request: web.Request, gw: Gateway, key: KeyRecord) -> object:
    """`GET /v1/credits` (management): the team's balance, latest top-ups and spend."""
    credits = await gw.store.credits(key.team_id)  # type: ignore[union-attr]
    unwritten = gw.wallets.pending.get(key.team_id, 0) if gw.wallets is not None else 0
    balance = credits.balance_nanos - unwritten
    return {
        "team_id": key.team_id,
        "currency": "USD",
        "balance_nanos": balance,
        "balance": usd(balance),
        "minimum_nanos": gw.config.auth.min_balance_nanos,
        "top_ups": [
            {"amount_nanos": t.amount_nanos, "note": t.note, "created_at": _iso(t.created_at * 1000)}
            for t in credits.top_ups
        ],
        "spend": {
            "last_24h_nanos": credits.spend_24h_nanos + unwritten,
            "last_30d_nanos": credits.spend_30d_nanos + unwritten,
        },
    }


async def _pricing_models(request: web.Request, gw: Gateway, key: KeyRecord) -> object:
    """`GET /v1/pricing/models`: the price sheet of every priced model, as written in pricing.yaml."""
    prices = gw.config.prices
    if prices is None:
        return {"currency": "USD", "effective": None, "models": []}
    return {
        "currency": prices.currency,
        "effective": prices.effective,
        "models": [
            {"model_id": model_id, **msgspec.to_builtins(sheet)}
            for model_id, sheet in prices.models.items()
            if model_id in gw.config.models
        ],
    }


class _Usage(msgspec.Struct, forbid_unknown_fields=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


class _Calculate(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    usage: _Usage
    provider: str = ""


async def _pricing_calculate(request: web.Request, gw: Gateway, key: KeyRecord) -> object:
    """`POST /v1/pricing/calculate`: the cost of a usage for a model, by the code that bills requests."""
    try:
        ask = msgspec.json.decode(await request.read(), type=_Calculate)
    except (msgspec.DecodeError, RecursionError) as e:
        raise GatewayError(Code.invalid_request, f"Invalid request: {e}") from None
    if min(msgspec.to_builtins(ask.usage).values()) < 0:
        raise GatewayError(Code.invalid_request, "Token counts must be >= 0.", param="usage")
    model_id = ask.model if ask.model in gw.config.models else None
    if model_id is None:
        raise GatewayError(Code.model_not_found, f"The model {ask.model!r} is not configured.", param="model")
    providers = [t.provider for t in gw.config.models[model_id].targets]
    provider = ask.provider or providers[0]
    if provider not in providers:
        raise GatewayError(
            Code.invalid_request,
            f"{model_id!r} is not served by {provider!r} (its providers: {', '.join(providers)}).",
            param="provider",
        )
    tariff = gw.pricing.tariff(model_id, provider)
    if tariff is None:
        raise GatewayError(Code.model_not_supported, f"The model {model_id!r} has no prices.", param="model")
    u = ask.usage
    usage = Usage(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        cached_input_tokens=u.cached_tokens,
        cache_write_tokens=u.cache_write_tokens,
        reasoning_tokens=u.reasoning_tokens,
    )
    cost, lines = tariff.cost(usage)
    return {
        "model": model_id,
        "provider": provider,
        "cost_nanos": cost,
        "currency": tariff.currency,
        "effective": tariff.effective,
        "pricing_lines": lines,
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


HANDLERS = {
    "platform.generations": platform_handler(_generation),
    "platform.key": platform_handler(_key),
    "platform.credits": platform_handler(_credits, management=True),
    "platform.pricing_models": platform_handler(_pricing_models),
    "platform.pricing_calculate": platform_handler(_pricing_calculate),
}
