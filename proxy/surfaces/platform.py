"""Platform APIs of the reference surface: `{"ok": true, ...}` bodies, `{"ok": false, "error", "message"}` errors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

import msgspec
import orjson
from aiohttp import web

from proxy.auth import KEY_PREFIX, generate_key, hash_secret, split_key, token_from_headers
from proxy.credit import usd
from proxy.errors import PLATFORM, Code, GatewayError, render
from proxy.gateway import GATEWAY, Gateway
from proxy.meta import Usage, new_request_id
from proxy.store.base import (
    ACTIVE,
    DISABLED,
    REVOKED,
    SCOPE_INFERENCE,
    SCOPE_MANAGEMENT,
    Credits,
    Generation,
    KeyRecord,
    StoreError,
)
from proxy.surfaces.body import read_body

log = logging.getLogger("proxy.surfaces.platform")
T = TypeVar("T")
_INT64_MAX = 2**63 - 1  # the store keeps 64-bit integers


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
        "guardrails": orjson.loads(g.guardrails) if g.guardrails else [],
        "cache_status": g.cache_status,
        "saved_nanos": g.saved_nanos,
    }


Platform = Callable[[web.Request, Gateway, KeyRecord], Awaitable[dict]]


def platform_handler(serve: Platform, *, management: bool = False) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler: authenticate (a management key when asked), run `serve`, and answer what it
    returns merged into `{"ok": true}` (one object under `data`, listings at the top level)."""

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
        except Exception:
            log.exception("request %s failed", request_id)
            error = GatewayError(Code.internal_error, "The gateway failed to serve this request.")
            return render(error, request_id, PLATFORM)
        return web.Response(
            body=msgspec.json.encode({"ok": True, **data}),
            headers={"Content-Type": "application/json", "x-request-id": request_id},
        )

    return handle


def _decode(body: bytes, shape: type[T]) -> T:
    """`body` decoded as `shape`; anything that is not such a JSON object is a 400."""
    try:
        return msgspec.json.decode(body, type=shape)
    except msgspec.DecodeError as e:  # also a ValidationError: a member of the wrong type
        raise GatewayError(Code.invalid_request, f"Invalid request: {e}") from None
    except RecursionError:
        raise GatewayError(Code.invalid_request, "Invalid request: the JSON nests too deeply.") from None


async def _generation(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/generations?id=…`: one of the calling team's records, by request id, by the id of a job the
    gateway handed out (`video_…`, a music task's, `batch_…`: its billed record once billed, else the one of
    its creation), or by a provider's response id (the same for a job's provider id)."""
    wanted = request.query.get("id", "").strip()
    if not wanted:
        raise GatewayError(Code.invalid_request, "Pass the generation's id: GET /v1/generations?id=req_…")
    store = gw.store
    assert store is not None
    found = gw.accountant.lookup(key.team_id, wanted) if gw.accountant is not None else None
    if found is None:
        found = await store.get_generation(key.team_id, wanted)
    if found is None and (job := await store.get_job(key.team_id, wanted)) is not None:
        found = await store.get_generation(key.team_id, job.upstream_id)
    if found is None:
        raise GatewayError(Code.not_found, f"No generation {wanted!r} for this team.")
    return {"data": _record(found)}


async def _key(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/key`: the calling key, never its secret."""
    return {"data": _key_record(key)}


def _key_record(key: KeyRecord) -> dict:
    return {
        "id": key.kid,
        "name": key.name,
        "prefix": f"{KEY_PREFIX}{key.kid}",
        "status": key.status,
        "scopes": list(key.scopes),
        "team_id": key.team_id,
        "team_name": key.team_name,
        "created_at": _iso(key.created_at * 1000),
        "allowed_models": list(key.allowed_models),
        "daily_limit_cost_nanos": key.daily_limit_cost_nanos,
        "monthly_limit_cost_nanos": key.monthly_limit_cost_nanos,
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
        "concurrency_limit": key.concurrency_limit,
        "guardrails": list(key.guardrails),
        "cache": key.cache,
    }


async def team_credits(gw: Gateway, team_id: str, top_ups: int = 20) -> tuple[Credits, int]:
    """The team's credits as the store has them, and the cost of its requests not yet written there (this
    worker's): the balance is the first's less the second, the spend the first's plus it."""
    credits = await gw.store.credits(team_id, top_ups)  # type: ignore[union-attr]
    return credits, gw.wallets.pending.get(team_id, 0) if gw.wallets is not None else 0


async def _credits(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/credits` (management): the team's balance, latest top-ups and spend."""
    credits, unwritten = await team_credits(gw, key.team_id)
    balance = credits.balance_nanos - unwritten
    return {
        "data": {
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
    }


async def _pricing_models(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/pricing/models`: the price sheet of every priced model, as written in pricing.yaml."""
    prices = gw.config.prices
    if prices is None:
        return {"data": {"currency": "USD", "effective": None, "models": []}}
    return {
        "data": {
            "currency": prices.currency,
            "effective": prices.effective,
            "models": [
                {"model_id": model_id, **msgspec.to_builtins(sheet)}
                for model_id, sheet in prices.models.items()
                if model_id in gw.config.models
            ],
        }
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


async def _pricing_calculate(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`POST /v1/pricing/calculate`: the cost of a usage for a model, by the code that bills requests."""
    ask = _decode(await read_body(request, gw.config.server), _Calculate)
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
        "data": {
            "model": model_id,
            "provider": provider,
            "cost_nanos": cost,
            "currency": tariff.currency,
            "effective": tariff.effective,
            "pricing_lines": lines,
        }
    }


def page(request: web.Request, default: int = 100, most: int = 250) -> tuple[int, int]:
    """(limit, offset) from the query, within bounds."""
    try:
        limit = int(request.query.get("limit", default))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise GatewayError(Code.invalid_request, "`limit` and `offset` must be integers.") from None
    if not 1 <= limit <= most or not 0 <= offset <= _INT64_MAX:  # the store takes 64-bit offsets
        raise GatewayError(Code.invalid_request, f"Expected 1 <= limit <= {most} and 0 <= offset <= {_INT64_MAX}.")
    return limit, offset


async def _keys_list(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/keys` (management): the team's keys, never their secrets."""
    limit, offset = page(request)
    keys = await gw.store.list_keys(key.team_id)  # type: ignore[union-attr]
    return {
        "limit": limit,
        "offset": offset,
        "total": len(keys),
        "keys": [_key_record(k) for k in keys[offset : offset + limit]],
    }


class _Limits(msgspec.Struct, forbid_unknown_fields=True):
    """Per-key limits as sent by a client; absent keeps what is there, null clears it."""

    allowed_models: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    daily_limit_cost_nanos: int | msgspec.UnsetType | None = msgspec.UNSET
    monthly_limit_cost_nanos: int | msgspec.UnsetType | None = msgspec.UNSET
    # rate limits (null: the config's `rate_limits.key` default; 0: none for this key)
    rpm_limit: int | msgspec.UnsetType | None = msgspec.UNSET
    tpm_limit: int | msgspec.UnsetType | None = msgspec.UNSET
    concurrency_limit: int | msgspec.UnsetType | None = msgspec.UNSET
    guardrails: list[str] | msgspec.UnsetType | None = msgspec.UNSET  # names of `guardrails.policies`
    # the response cache: true, false, or null (the config's default for its team); any JSON value is taken
    # here, so that `_check_limits` can refuse a wrong one naming `cache`
    cache: object = msgspec.UNSET

    def touched(self) -> bool:
        return any(getattr(self, f) is not msgspec.UNSET for f in _Limits.__struct_fields__)


class NewKey(_Limits, forbid_unknown_fields=True):
    name: str = ""
    management: bool = False


# (allowed models, daily, monthly, (rpm, tpm, concurrency), guardrails, cache)
_Resolved = tuple[
    tuple[str, ...], int | None, int | None, tuple[int | None, int | None, int | None], tuple[str, ...], bool | None
]
_RATES = ("rpm_limit", "tpm_limit", "concurrency_limit")
_MAX_NAME = 200


def _check_name(name: str) -> str:
    """A key's name as people read it in listings: printable, at most `_MAX_NAME` characters."""
    if len(name) > _MAX_NAME:
        raise GatewayError(Code.invalid_request, f"`name` must be at most {_MAX_NAME} characters.", param="name")
    if not name.isprintable():
        raise GatewayError(
            Code.invalid_request, "`name` must not hold control characters (newlines, NUL, …).", param="name"
        )
    return name


def _check_limits(gw: Gateway, limits: _Limits, target: KeyRecord | None = None) -> _Resolved:
    """(allowed models, daily, monthly, (rpm, tpm, concurrency), guardrails, cache) once `limits` apply to
    `target` (a new key when None); checked before anything is written, so that a refused request changes
    nothing."""

    def pick(value: object, current: object) -> object:
        return current if value is msgspec.UNSET else value

    models = pick(limits.allowed_models, list(target.allowed_models) if target else []) or []
    unknown = [m for m in models if m not in gw.config.models]  # type: ignore[union-attr]
    if unknown:
        raise GatewayError(
            Code.invalid_request, f"Unknown models in allowed_models: {', '.join(unknown)}.", param="allowed_models"
        )
    daily = pick(limits.daily_limit_cost_nanos, target.daily_limit_cost_nanos if target else None)
    monthly = pick(limits.monthly_limit_cost_nanos, target.monthly_limit_cost_nanos if target else None)
    for name, value in (("daily_limit_cost_nanos", daily), ("monthly_limit_cost_nanos", monthly)):
        if value is not None and value < 0:  # type: ignore[operator]
            raise GatewayError(Code.invalid_request, f"`{name}` must be >= 0 or null.", param=name)
        if value is not None and value > _INT64_MAX:  # type: ignore[operator]
            raise GatewayError(Code.invalid_request, f"`{name}` must be at most {_INT64_MAX}.", param=name)
    rates = tuple(pick(getattr(limits, name), getattr(target, name) if target else None) for name in _RATES)
    for name, value in zip(_RATES, rates, strict=True):
        if value is not None and not 0 <= value <= _INT64_MAX:  # type: ignore[operator]
            raise GatewayError(
                Code.invalid_request,
                f"`{name}` must be a whole number from 0 (no limit) to {_INT64_MAX}, or null (the gateway's default).",
                param=name,
            )
    guardrails = pick(limits.guardrails, list(target.guardrails) if target else []) or []
    policies = gw.config.guardrails.policies
    # Only the names sent are checked: a policy the config has since dropped does not block other changes.
    unknown = [g for g in limits.guardrails or () if g not in policies]  # type: ignore[union-attr]
    if unknown:
        raise GatewayError(
            Code.invalid_request,
            f"Unknown policies in guardrails: {', '.join(unknown)} "
            f"(the gateway's: {', '.join(policies) or 'none defined'}).",
            param="guardrails",
        )
    cache = pick(limits.cache, target.cache if target else None)
    if cache is not None and not isinstance(cache, bool):
        raise GatewayError(
            Code.invalid_request,
            "`cache` must be true (cache this key's answers), false (never) or null (the gateway's default for "
            f"its team), got {_quoted(cache)}.",
            param="cache",
        )
    # each policy once, in the order given
    return tuple(models), daily, monthly, rates, tuple(dict.fromkeys(guardrails)), cache  # type: ignore[return-value]


def _quoted(value: object, most: int = 40) -> str:
    """A value a client sent, as JSON, cut short for a message."""
    text = msgspec.json.encode(value).decode()  # (orjson refuses integers beyond 64 bits)
    return text if len(text) <= most else text[: most - 1] + "…"


async def _apply_limits(gw: Gateway, kid: str, resolved: _Resolved) -> None:
    models, daily, monthly, (rpm, tpm, concurrency), guardrails, cache = resolved
    await gw.store.set_key_limits(  # type: ignore[union-attr]
        kid, allowed_models=models, daily_nanos=daily, monthly_nanos=monthly
    )
    await gw.store.set_key_rate_limits(kid, rpm=rpm, tpm=tpm, concurrency=concurrency)  # type: ignore[union-attr]
    await gw.store.set_key_guardrails(kid, guardrails=guardrails)  # type: ignore[union-attr]
    await gw.store.set_key_cache(kid, cache=cache)  # type: ignore[union-attr]


async def _keys_create(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`POST /v1/keys` (management): a new key for the caller's team; the secret is in this answer only."""
    ask = _decode(await read_body(request, gw.config.server) or b"{}", NewKey)
    secret_key, record = await create_key(gw, key.team_id, ask)
    return {"key": secret_key, "data": _key_record(record)}


async def create_key(gw: Gateway, team_id: str, ask: NewKey) -> tuple[str, KeyRecord]:
    """A new key of the team (its secret, shown once, and its record): the management API's and the dashboard's."""
    _check_name(ask.name)
    limits = _check_limits(gw, ask) if ask.touched() else None
    kid, secret_key = generate_key()
    scopes = (SCOPE_INFERENCE, SCOPE_MANAGEMENT) if ask.management else (SCOPE_INFERENCE,)
    secret = split_key(secret_key)[1]  # type: ignore[index]
    record = await gw.store.create_key(  # type: ignore[union-attr]
        team_id=team_id, kid=kid, secret_hash=hash_secret(secret), name=ask.name, scopes=scopes
    )
    if limits is not None:
        await _apply_limits(gw, kid, limits)
        record = await gw.store.get_key(kid)  # type: ignore[union-attr,assignment]
    return secret_key, record


async def team_key(gw: Gateway, team_id: str, kid: str) -> KeyRecord:
    """The key `kid`, if it belongs to the team (else 404, as if absent)."""
    target = await gw.store.get_key(kid) if kid else None  # type: ignore[union-attr]
    if target is None or target.team_id != team_id:
        raise GatewayError(Code.not_found, f"No key {kid!r} in this team.")
    return target


class KeyChange(_Limits, forbid_unknown_fields=True):
    name: str | None = None
    status: str | None = None


async def _keys_update(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`PATCH /v1/keys/{id}` (management): rename, disable or re-enable a key of the team."""
    change = _decode(await read_body(request, gw.config.server) or b"{}", KeyChange)
    return {"data": _key_record(await change_key(gw, key.team_id, request.match_info.get("id", ""), change))}


async def change_key(gw: Gateway, team_id: str, kid: str, change: KeyChange) -> KeyRecord:
    """Rename, disable or re-enable a key of the team, or change its limits (all checked before any is written)."""
    target = await team_key(gw, team_id, kid)
    if change.status not in (None, ACTIVE, DISABLED):
        raise GatewayError(
            Code.invalid_request, "`status` must be 'active' or 'disabled' (DELETE revokes).", param="status"
        )
    if target.status == REVOKED:
        raise GatewayError(Code.invalid_request, f"Key {target.kid!r} is revoked; it cannot change.")
    if change.name is not None:
        _check_name(change.name)
    limits = _check_limits(gw, change, target) if change.touched() else None
    if change.name is not None:
        await gw.store.rename_key(target.kid, change.name)  # type: ignore[union-attr]
    if change.status is not None:
        await gw.store.set_key_status(target.kid, change.status)  # type: ignore[union-attr]
    if limits is not None:
        await _apply_limits(gw, target.kid, limits)
    gw.keys.forget(target.kid)  # type: ignore[union-attr]
    return await gw.store.get_key(target.kid)  # type: ignore[union-attr,return-value]


async def _keys_revoke(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`DELETE /v1/keys/{id}` (management): revoke a key of the team, for good."""
    return {"data": _key_record(await revoke_key(gw, key.team_id, request.match_info.get("id", "")))}


async def revoke_key(gw: Gateway, team_id: str, kid: str) -> KeyRecord:
    """Revoke a key of the team, for good (this worker refuses it at once, the others within auth.cache_ttl_s)."""
    target = await team_key(gw, team_id, kid)
    await gw.store.set_key_status(target.kid, REVOKED)  # type: ignore[union-attr]
    gw.keys.forget(target.kid)  # type: ignore[union-attr]
    return await gw.store.get_key(target.kid)  # type: ignore[union-attr,return-value]


def _day(text: str, name: str) -> int:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise GatewayError(
            Code.invalid_request, f"`{name}` must be a date YYYY-MM-DD, got {text!r}.", param=name
        ) from None
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


async def _activity(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/activity` (management): daily rows per model and provider (with the response cache's hits and
    what they saved); `from`/`to` dates (UTC, inclusive; default the last 30 days), `model`, `key`, `limit`
    (≤ 250), `offset`."""
    limit, offset = page(request)
    today = datetime.now(UTC).date()
    since = _day(request.query.get("from", (today - timedelta(days=29)).isoformat()), "from")
    until = _day(request.query.get("to", today.isoformat()), "to") + 86_400_000
    if gw.accountant is not None:
        await gw.accountant.flush()  # what was served is what is reported
    total, rows = await gw.store.activity(  # type: ignore[union-attr]
        key.team_id,
        since_ms=since,
        until_ms=until,
        model=request.query.get("model", ""),
        key_id=request.query.get("key", ""),
        limit=limit,
        offset=offset,
    )
    activity = [
        {
            "date": day,
            "model": model,
            "model_permaslug": model,
            "endpoint_id": endpoint,
            "provider_name": provider,
            "usage": usd(cost),
            "usage_nanos": cost,
            "byok_usage_inference": 0,
            "requests": requests,
            "prompt_tokens": prompt or 0,
            "completion_tokens": completion or 0,
            "reasoning_tokens": reasoning or 0,
            "cache_hits": hits,
            "saved_usd": usd(saved),
            "saved_nanos": saved,
        }
        for day, model, provider, endpoint, cost, requests, prompt, completion, reasoning, hits, saved in rows
    ]
    return {"limit": limit, "offset": offset, "total": total, "activity": activity}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


HANDLERS = {
    "platform.generations": platform_handler(_generation),
    "platform.key": platform_handler(_key),
    "platform.credits": platform_handler(_credits, management=True),
    "platform.pricing_models": platform_handler(_pricing_models),
    "platform.pricing_calculate": platform_handler(_pricing_calculate),
    "platform.keys_list": platform_handler(_keys_list, management=True),
    "platform.keys_create": platform_handler(_keys_create, management=True),
    "platform.keys_update": platform_handler(_keys_update, management=True),
    "platform.keys_revoke": platform_handler(_keys_revoke, management=True),
    "platform.activity": platform_handler(_activity, management=True),
}
