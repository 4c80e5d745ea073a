"""The dashboard's keys page: a team's keys, and creating, editing, disabling, enabling and revoking them,
through the management API's own code (`proxy.surfaces.platform`: the same checks, the same effects)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import quote

import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from proxy.config import NANOS_PER_USD
from proxy.credit import parse_usd
from proxy.dashboard import views
from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.store.base import KeyRecord
from proxy.surfaces.platform import KeyChange, NewKey, change_key, create_key, revoke_key, team_key


async def team_of(request: web.Request, gw: Gateway, signed: views.Signed) -> tuple[str, str]:
    """(team id, team name) the page is about: the session's team, or the one the operator picked (`?team=`)."""
    session = signed.session
    if session.role != "operator":
        return session.team_id, signed.team_name
    name = request.query.get("team", "")
    team = await gw.store.get_team(name) if name else None  # type: ignore[union-attr]
    return (team.id, team.name) if team is not None else ("", "")


def team_query(signed: views.Signed, team_name: str) -> str:
    return f"?team={quote(team_name)}" if signed.session.role == "operator" and team_name else ""


async def posted_form(request: web.Request, signed: views.Signed) -> MultiDictProxy[Any]:
    """The posted form, once its CSRF token is the session's (GatewayError otherwise)."""
    form = await request.post()
    if not views.same(str(form.get("csrf", "")), signed.session.csrf):
        raise GatewayError(Code.forbidden, "This form is not from this session's page: reload the page and try again.")
    return form


def _limits(form: MultiDictProxy[Any]) -> dict[str, Any]:
    """A key's settings from the form, as the management API's members (every one set: empty means none)."""
    out: dict[str, Any] = {"name": str(form.get("name", "")).strip()}
    out["allowed_models"] = [str(m) for m in form.getall("allowed_models", [])]
    out["guardrails"] = [str(g) for g in form.getall("guardrails", [])]
    for field, member in (
        ("daily_limit_usd", "daily_limit_cost_nanos"),
        ("monthly_limit_usd", "monthly_limit_cost_nanos"),
    ):
        text = str(form.get(field, "")).strip().lstrip("$")
        try:
            out[member] = parse_usd(text) if text else None
        except ValueError as e:
            raise GatewayError(Code.invalid_request, f"{field.replace('_', ' ')}: {e}.") from None
    for member in ("rpm_limit", "tpm_limit", "concurrency_limit"):
        text = str(form.get(member, "")).strip()
        if text and not text.isdigit():
            raise GatewayError(Code.invalid_request, f"{member.replace('_', ' ')} must be a whole number.")
        out[member] = int(text) if text else None
    out["cache"] = {"on": True, "off": False}.get(str(form.get("cache", "")))
    return out


async def _page(
    request: web.Request, gw: Gateway, signed: views.Signed, *, status: int = 200, **extra: Any
) -> web.Response:
    team_id, team_name = await team_of(request, gw, signed)
    store = gw.store
    assert store is not None
    teams = sorted(t.name for t in await store.list_teams()) if signed.session.role == "operator" else []
    keys = await store.list_keys(team_id) if team_id else []
    return views.html(
        "keys.html",
        status=status,
        **common(gw, signed, team_name),
        title="Keys",
        current="/dashboard/keys",
        team_id=team_id,
        teams=teams,
        keys=keys,
        limits=_summary,
        moment=views.moment,
        created=extra.get("created"),
        secret=extra.get("secret", ""),
        error=extra.get("error", ""),
    )


def common(gw: Gateway, signed: views.Signed, team_name: str) -> dict[str, Any]:
    """What every page about one team shows: the navigation, the session, the team, the configured choices."""
    return {
        "session": signed.session,
        "team_name": team_name,
        "pages": views.PAGES,
        "team_query": team_query(signed, team_name),
        "models": sorted(gw.config.models),
        "policies": sorted(gw.config.guardrails.policies),
        "usd_value": _usd_value,
    }


def _usd_value(nanos: int | None) -> str:
    return "" if nanos is None else format(Decimal(nanos) / NANOS_PER_USD, "f")


def _summary(key: KeyRecord) -> str:
    parts = []
    if key.allowed_models:
        parts.append(f"{len(key.allowed_models)} model{'s' if len(key.allowed_models) > 1 else ''}")
    for nanos, period in ((key.daily_limit_cost_nanos, "day"), (key.monthly_limit_cost_nanos, "month")):
        if nanos is not None:
            parts.append(f"{views.usd(nanos)}/{period}")
    for value, unit in ((key.rpm_limit, "rpm"), (key.tpm_limit, "tpm"), (key.concurrency_limit, "at once")):
        if value is not None:
            parts.append(f"{value:,} {unit}" if value else f"no {unit} limit")
    if key.guardrails:
        parts.append("guardrails: " + ", ".join(key.guardrails))
    if key.cache is not None:
        parts.append("cache " + ("on" if key.cache else "off"))
    return " · ".join(parts) or "defaults"


async def listing(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    return await _page(request, gw, signed)


async def create(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """Create a key of the page's team; the answer shows its secret, once."""
    team_id, _ = await team_of(request, gw, signed)
    try:
        form = await posted_form(request, signed)
        if not team_id:
            raise GatewayError(Code.invalid_request, "Choose a team first.")
        fields = _limits(form)
        ask = msgspec.convert({**fields, "management": form.get("management") == "on"}, NewKey)
        secret, record = await create_key(gw, team_id, ask)
    except (GatewayError, msgspec.ValidationError) as e:
        return await _page(request, gw, signed, status=400, error=_message(e))
    return await _page(request, gw, signed, created=record, secret=secret)


async def edit(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    team_id, team_name = await team_of(request, gw, signed)
    key = await team_key(gw, team_id, request.match_info["kid"])
    return views.html("key.html", **common(gw, signed, team_name), title="Key", current="/dashboard/keys", key=key,
                      error="")  # fmt: skip


async def save(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """A key's name and settings, from its edit form."""
    team_id, team_name = await team_of(request, gw, signed)
    kid = request.match_info["kid"]
    try:
        form = await posted_form(request, signed)
        await change_key(gw, team_id, kid, msgspec.convert(_limits(form), KeyChange))
    except (GatewayError, msgspec.ValidationError) as e:
        if isinstance(e, GatewayError) and e.code is Code.not_found:
            raise
        key = await team_key(gw, team_id, kid)
        return views.html("key.html", status=400, **common(gw, signed, team_name), title="Key",
                          current="/dashboard/keys", key=key, error=_message(e))  # fmt: skip
    return views.redirect("/dashboard/keys" + team_query(signed, team_name))


async def status(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """Disable or enable a key."""
    team_id, team_name = await team_of(request, gw, signed)
    try:
        form = await posted_form(request, signed)
        await change_key(gw, team_id, request.match_info["kid"], KeyChange(status=str(form.get("status", ""))))
    except GatewayError as e:
        return await _page(request, gw, signed, status=400, error=_message(e))
    return views.redirect("/dashboard/keys" + team_query(signed, team_name))


async def revoke(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """Revoke a key, for good (the form's box must be ticked)."""
    team_id, team_name = await team_of(request, gw, signed)
    try:
        form = await posted_form(request, signed)
        if form.get("confirm") != "on":
            raise GatewayError(Code.invalid_request, "Tick the box beside Revoke to revoke a key: it cannot be undone.")
        await revoke_key(gw, team_id, request.match_info["kid"])
    except GatewayError as e:
        return await _page(request, gw, signed, status=400, error=_message(e))
    return views.redirect("/dashboard/keys" + team_query(signed, team_name))


def _message(error: Exception) -> str:
    return error.message if isinstance(error, GatewayError) else f"Invalid settings: {error}"
