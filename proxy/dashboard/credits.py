"""The dashboard's credits page: a team's balance, spend and top-ups (as `GET /v1/credits` gives them) and its
ledger of top-ups and daily spend; the operator adds credit to a team."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.config import NANOS_PER_USD
from proxy.credit import parse_usd
from proxy.credit import usd as exact_usd  # views.usd rounds from $1 up
from proxy.dashboard import views
from proxy.dashboard.keys import common, posted_form, team_of, team_query
from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.store.base import TopUp
from proxy.surfaces.platform import team_credits

_MAX_TOP_UP_NANOS = 1_000_000 * NANOS_PER_USD
DAY_MS = 86_400_000
LEDGER_DAYS = 30


async def _ledger(gw: Gateway, team_id: str, top_ups: list[TopUp]) -> list[dict[str, Any]]:
    """Money in and out, newest first: the latest top-ups (and adjustments) as the wallet's ledger has them, and each
    UTC day's spend over the last LEDGER_DAYS days, from the rollups (the requests the store has)."""
    assert gw.store is not None
    today = int(time.time() * 1000) // DAY_MS * DAY_MS
    view = await gw.store.overview(team_id, today - (LEDGER_DAYS - 1) * DAY_MS, today + DAY_MS, DAY_MS)
    lines = [
        {
            "at": t.created_at * 1000,
            "when": views.moment(t.created_at * 1000),
            "what": t.note or ("Top-up" if t.amount_nanos > 0 else "Adjustment"),
            "amount": ("+" if t.amount_nanos > 0 else "-") + views.usd(abs(t.amount_nanos)),
            "kind": "in" if t.amount_nanos > 0 else "out",
        }
        for t in top_ups
    ]
    lines += [
        {
            "at": day.start_ms + DAY_MS - 1,  # after the day's top-ups
            "when": time.strftime("%Y-%m-%d", time.gmtime(day.start_ms / 1000)),
            "what": f"Spend: {day.requests:,} request{'s' if day.requests != 1 else ''}",
            "amount": "-" + views.usd(day.cost_nanos),
            "kind": "out",
        }
        for day in view.series
        if day.requests
    ]
    return sorted(lines, key=lambda line: -line["at"])


async def page(
    request: web.Request, gw: Gateway, signed: views.Signed, *, status: int = 200, error: str = ""
) -> web.Response:
    team_id, team_name = await team_of(request, gw, signed)
    store = gw.store
    assert store is not None
    teams = sorted(t.name for t in await store.list_teams()) if signed.session.role == "operator" else []
    context: dict = {}
    if team_id:
        credits, unwritten = await team_credits(gw, team_id, top_ups=50)
        context = {
            "balance": views.usd(credits.balance_nanos - unwritten),
            "balance_exact": exact_usd(credits.balance_nanos - unwritten),  # shown on hover: to the nano-dollar
            "minimum": views.usd(gw.config.auth.min_balance_nanos),
            "spend_24h": views.usd(credits.spend_24h_nanos + unwritten),
            "spend_30d": views.usd(credits.spend_30d_nanos + unwritten),
            "ledger": await _ledger(gw, team_id, credits.top_ups),
        }
    return views.html(
        "credits.html",
        status=status,
        **common(gw, signed, team_name),
        title="Credits",
        current="/dashboard/credits",
        team_id=team_id,
        teams=teams,
        usd=views.usd,
        moment=views.moment,
        error=error,
        **context,
    )


async def add(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """The operator adds credit to the page's team (a team cannot top itself up here)."""
    team_id, team_name = await team_of(request, gw, signed)
    try:
        form = await posted_form(request, signed)
        if signed.session.role != "operator":
            raise GatewayError(Code.forbidden, "Only the operator adds credit.")
        if not team_id:
            raise GatewayError(Code.invalid_request, "Choose a team first.")
        text = str(form.get("amount_usd", "")).strip().lstrip("$")
        try:
            nanos = parse_usd(text)
        except ValueError:
            raise GatewayError(Code.invalid_request, "The amount must be in USD, like 25 or 12.50.") from None
        if not 0 < nanos <= _MAX_TOP_UP_NANOS:
            most = f"${_MAX_TOP_UP_NANOS // NANOS_PER_USD:,}"
            raise GatewayError(Code.invalid_request, f"The amount must be more than $0 and at most {most}.")
        note = str(form.get("note", "")).strip()[:200] or "dashboard"
        assert gw.store is not None and gw.wallets is not None
        await gw.store.add_credit(team_id, nanos, note=note)
        gw.wallets.adjust(team_id, nanos)  # this worker's cached balance, at once
    except GatewayError as e:
        return await page(request, gw, signed, status=e.status, error=e.message)
    return views.redirect("/dashboard/credits" + team_query(signed, team_name))


async def show(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    return await page(request, gw, signed)
