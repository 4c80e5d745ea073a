"""The dashboard's requests page: a team's latest requests (filtered by model, key and outcome, 50 a page,
older ones page by page) and one request's generation record, as `GET /v1/generations/{id}` has it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy.dashboard import views
from proxy.dashboard.keys import common, team_of
from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.store.base import Generation

PAGE = 50


def _figures(record: Generation) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        timings = orjson.loads(bytes(record.timings)) or {}
        usage = orjson.loads(bytes(record.usage)) or {}
    except orjson.JSONDecodeError:
        return {}, {}
    return (timings if isinstance(timings, dict) else {}), (usage if isinstance(usage, dict) else {})


def _tokens(usage: dict[str, Any]) -> str:
    known = [usage.get(k) for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)]
    return f"{sum(known):,}" if known else "—"


def ok(record: Generation) -> bool:
    return record.status_code < 400 and not record.error_code


def filters(request: web.Request) -> tuple[dict[str, str], bool | None]:
    """The page's filters (model, key, status) as chosen, and whether only failures (True) or successes (False)."""
    query = request.query
    chosen = {"model": query.get("model", ""), "key": query.get("key", ""), "status": query.get("status", "")}
    return chosen, {"ok": False, "error": True}.get(chosen["status"])


async def listing(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    team_id, team_name = await team_of(request, gw, signed)
    store = gw.store
    assert store is not None
    query = request.query
    chosen, failed = filters(request)
    try:
        before = int(query["before"]) if query.get("before") else None
    except ValueError:
        raise GatewayError(Code.invalid_request, "`before` must be a time in unix milliseconds.") from None
    rows, older, keys = [], "", []
    if team_id:
        keys = await store.list_keys(team_id)
        names = {k.kid: k.name or k.kid for k in keys}
        records = await store.recent_generations(
            team_id, limit=PAGE, before_ms=before, model=chosen["model"], key_id=chosen["key"], failed=failed
        )
        rows = [row(record, names) for record in records]
        if len(records) == PAGE:
            more = {k: v for k, v in {**chosen, "before": records[-1].created_at}.items() if v}
            if signed.session.role == "operator":
                more["team"] = team_name
            older = "/dashboard/requests?" + urlencode(more)
    live = {k: v for k, v in chosen.items() if v}
    if signed.session.role == "operator":
        live["team"] = team_name
    return views.html(
        "requests.html",
        live="/dashboard/requests/live?" + urlencode(live) if team_id and before is None else "",
        **common(gw, signed, team_name),
        title="Requests",
        current="/dashboard/requests",
        team_id=team_id,
        teams=sorted(t.name for t in await store.list_teams()) if signed.session.role == "operator" else [],
        keys=keys,
        chosen=chosen,
        rows=rows,
        older=older,
        error="",
    )


def row(record: Generation, key_names: dict[str, str]) -> dict[str, Any]:
    """One request as a line of the table (`_request_row.html`)."""
    timings, usage = _figures(record)
    return {
        "id": record.request_id,
        "created": record.created_at,
        "time": views.moment(record.created_at) + time_seconds(record.created_at),
        "key": key_names.get(record.key_id, record.key_id),
        "model": record.model_id or "—",
        "provider": record.provider or "—",
        "status": record.status_code if not record.error_code else f"{record.status_code} {record.error_code}",
        "ok": ok(record),
        "latency": views.ms(timings.get("latency_ms")),
        "ttft": views.ms(timings.get("ttft_ms")),
        "tokens": _tokens(usage),
        "cost": views.usd(record.cost_nanos),
    }


def time_seconds(created_ms: int) -> str:
    """The seconds of a time whose minutes `views.moment` wrote."""
    return f":{created_ms // 1000 % 60:02d}"


async def record(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """One request's generation record (the team's own only: another team's is absent)."""
    team_id, team_name = await team_of(request, gw, signed)
    request_id = request.match_info["request_id"]
    found = await gw.store.get_generation(team_id, request_id) if team_id else None  # type: ignore[union-attr]
    if found is None and team_id and gw.accountant is not None:
        found = gw.accountant.lookup(team_id, request_id)  # answered moments ago: not yet in the store
    if found is None:
        raise GatewayError(Code.not_found, f"No request {request_id!r} in this team.")
    timings, usage = _figures(found)
    summary = {
        "created": views.moment(found.created_at) + time_seconds(found.created_at) + " UTC",
        "endpoint": found.endpoint,
        "model": found.model_id,
        "provider": found.provider,
        "upstream_model": found.upstream_model,
        "key_id": found.key_id,
        "stream": found.stream,
        "status": found.status_code,
        "error": f"{found.error_code}: {found.error_message}" if found.error_code else None,
        "native_response_id": found.native_response_id or None,
        "cache": found.cache_status or None,
        "usage_source": found.usage_source,
    }
    return views.html(
        "request.html",
        **common(gw, signed, team_name),
        title="Request",
        current="/dashboard/requests",
        record=found,
        cards=[
            {"label": "Status", "value": found.status_code},
            {"label": "Latency", "value": views.ms(timings.get("latency_ms"))},
            {"label": "TTFT", "value": views.ms(timings.get("ttft_ms"))},
            {"label": "Tokens", "value": _tokens(usage)},
            {"label": "Cost", "value": views.usd(found.cost_nanos)},
        ],
        summary=_pretty({k: v for k, v in summary.items() if v is not None}),
        timings=_pretty(timings),
        usage=_pretty(usage),
        pricing=_pretty(orjson.loads(bytes(found.pricing_lines) or b"[]")),
    )


def _pretty(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
