"""The dashboard's routes: sign-in and sign-out, the overview, and its stylesheet."""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import jinja2
from aiohttp import web

from proxy.auth import hash_secret, split_key
from proxy.dashboard import charts, credits, keys, live, providers, requests
from proxy.dashboard.charts import Series
from proxy.errors import GatewayError
from proxy.gateway import GATEWAY, Gateway
from proxy.store.base import ACTIVE, DashboardSession, Overview, StoreError

log = logging.getLogger("proxy.dashboard")

HERE: Final = Path(__file__).parent
ADMIN_PREFIX: Final = "aistats_v1_admin_"
ENV_TOKEN: Final = "env:"  # an operator session's token, GATEWAY_ADMIN_TOKEN: "env:" and 16 hex of its hash
COOKIE: Final = "gw_session"
SIGNIN_COOKIE: Final = "gw_signin"  # the sign-in form's CSRF token (no session yet)
STATIC: Final = "/dashboard/static"
STATIC_FILES: Final = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
# Only this origin's stylesheet, script, images and event streams (nothing inline), no frame, forms posted here only.
POLICY: Final = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGES: Final = (
    ("/dashboard/overview", "Overview"),
    ("/dashboard/requests", "Requests"),
    ("/dashboard/keys", "Keys"),
    ("/dashboard/credits", "Credits"),
    ("/dashboard/providers", "Providers"),
)
# Range → (length, step) in milliseconds; a step is a multiple of the rollups' (minutes up to a day, hours past it).
RANGES: Final = {
    "1h": (3_600_000, 60_000),
    "24h": (86_400_000, 1_800_000),
    "7d": (7 * 86_400_000, 3 * 3_600_000),
    "30d": (30 * 86_400_000, 12 * 3_600_000),
}
RANGE_LABELS: Final = (("1h", "Last hour"), ("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days"))
SIGNIN_PER_MINUTE: Final = 10  # attempts per client address, per worker

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every value a user controls (key, team and model names) is escaped
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def add_routes(app: web.Application) -> None:
    """The dashboard's routes (only when `dashboard.enabled`: off, none of them exists)."""
    app[ATTEMPTS] = _Attempts()
    app[live.FEED] = live.LiveFeed()
    app.on_shutdown.append(app[live.FEED].close)
    router = app.router
    router.add_get("/dashboard", _home)
    router.add_get("/dashboard/", _home)
    router.add_get("/dashboard/signin", _signin_page)
    router.add_post("/dashboard/signin", _signin)
    router.add_post("/dashboard/signout", _signout)
    router.add_get("/dashboard/overview", _page(_overview))
    router.add_get("/dashboard/keys", _page(keys.listing))
    router.add_post("/dashboard/keys", _page(keys.create))
    router.add_get("/dashboard/keys/{kid}", _page(keys.edit))
    router.add_post("/dashboard/keys/{kid}", _page(keys.save))
    router.add_post("/dashboard/keys/{kid}/status", _page(keys.status))
    router.add_post("/dashboard/keys/{kid}/revoke", _page(keys.revoke))
    router.add_get("/dashboard/requests", _page(requests.listing))
    router.add_get("/dashboard/requests/live", _page(live.stream))
    router.add_get("/dashboard/requests/{request_id}", _page(requests.record))
    router.add_get("/dashboard/credits", _page(credits.show))
    router.add_post("/dashboard/credits", _page(credits.add))
    router.add_get("/dashboard/providers", _page(providers.show))
    router.add_get(STATIC + "/{name}", _static)


# -- responses


def secure_headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def html(template: str, status: int = 200, **context: Any) -> web.Response:
    context.setdefault("session", None)
    body = _templates.get_template(template).render(static=STATIC, **context)
    return secure_headers(web.Response(text=body, status=status, content_type="text/html"))  # type: ignore[return-value]


def fragment(template: str, **context: Any) -> str:
    """A piece of a page (a table row a live stream sends)."""
    return _templates.get_template(template).render(**context)


def same(given: str, expected: str) -> bool:
    """A token a form sent is the expected one (compared in constant time)."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def redirect(location: str) -> web.Response:
    return secure_headers(web.Response(status=303, headers={"Location": location}))  # type: ignore[return-value]


def _secure(request: web.Request) -> bool:
    """The client reached us over TLS (directly, or through a proxy that says so)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() == "https"


def _set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/dashboard", httponly=True, samesite="Strict", secure=_secure(request)
    )


# -- sessions


@dataclass(frozen=True)
class Signed:
    session: DashboardSession
    team_name: str  # "" for the operator


async def signed_in(request: web.Request, gw: Gateway) -> Signed | None:
    """The request's live session: its cookie names one the store has, not expired, and (for a team) the key
    it signed in with is still active."""
    token = request.cookies.get(COOKIE, "")
    if not token or not token.isascii():
        return None
    store = gw.store
    assert store is not None and gw.keys is not None
    session = await store.get_session(hash_secret(token), int(time.time() * 1000))
    if session is None:
        return None
    if session.role == "operator":  # while its token lasts
        if session.key_id.startswith(ENV_TOKEN):  # the same GATEWAY_ADMIN_TOKEN still: a rotated one ends it
            live = session.key_id == _env_token_id()
        else:
            live = await store.admin_token_live(session.key_id)
        return Signed(session, "") if live else None
    key = await gw.keys.record(session.key_id)
    if key is None or key.status != ACTIVE or key.team_id != session.team_id:
        return None
    return Signed(session, key.team_name)


Page = Callable[[web.Request, Gateway, Signed], Awaitable[web.StreamResponse]]


def _page(page: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        try:
            signed = await signed_in(request, gw)
            if signed is None:
                return redirect("/dashboard/signin")
            return await page(request, gw, signed)
        except GatewayError as e:  # a key of another team (404), a store that is down (503), …
            return html("error.html", status=e.status, title="Error", error=e.message)
        except StoreError as e:
            return html("error.html", status=503, title="Unavailable", error=f"The store is unavailable: {e}")
        except Exception:
            log.exception("dashboard page %s failed", request.path)
            message = "The dashboard failed to show this page (the gateway's log says why)."
            return html("error.html", status=500, title="Error", error=message)

    return handle


async def _home(request: web.Request) -> web.StreamResponse:
    return redirect("/dashboard/overview")


async def _signin_page(request: web.Request) -> web.StreamResponse:
    csrf = secrets.token_urlsafe(24)
    response = html("signin.html", title="Sign in", error="", csrf=csrf)
    _set_cookie(response, request, SIGNIN_COOKIE, csrf, 3600)
    return response


class _Attempts:
    """Sign-in attempts per client address over the last minute (per worker; the table is bounded)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        if len(self.times) > 10_000:  # a scan from many addresses: forget those idle for a minute
            self.times = {a: t for a, t in self.times.items() if t[-1] > now - 60}
        recent = [t for t in self.times.get(address, ()) if t > now - 60]
        recent.append(now)
        self.times[address] = recent[-SIGNIN_PER_MINUTE - 1 :]
        return len(recent) <= SIGNIN_PER_MINUTE


ATTEMPTS: Final = web.AppKey("dashboard_attempts", _Attempts)


async def _signin(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    form = await request.post()
    csrf = str(form.get("csrf", ""))
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not same(csrf, expected):
        return redirect("/dashboard/signin")  # a form from elsewhere, or an old one: a fresh form
    if not request.app[ATTEMPTS].allow(request.remote or ""):
        return html("signin.html", status=429, title="Sign in", csrf=csrf,
                     error=f"Too many attempts: at most {SIGNIN_PER_MINUTE} a minute. Try again shortly.")  # fmt: skip
    credential = str(form.get("credential", "")).strip()
    try:
        found = await _credential(gw, credential)
    except StoreError as e:
        return html("signin.html", status=503, title="Sign in", csrf=csrf, error=f"The store is unavailable: {e}")
    if found is None:
        return html("signin.html", status=401, title="Sign in", csrf=csrf,
                     error="That is neither a management key of a team nor the operator's token.")  # fmt: skip
    role, team_id, key_id = found
    token = secrets.token_urlsafe(32)
    now_ms = int(time.time() * 1000)
    ttl_s = gw.config.dashboard.session_ttl_s
    session = DashboardSession(
        token_hash=hash_secret(token),
        role=role,
        team_id=team_id,
        key_id=key_id,
        csrf=secrets.token_urlsafe(24),
        created_at=now_ms,
        expires_at=now_ms + int(ttl_s * 1000),
    )
    assert gw.store is not None
    await gw.store.create_session(session)
    response = redirect("/dashboard/overview")
    _set_cookie(response, request, COOKIE, token, int(ttl_s))
    response.del_cookie(SIGNIN_COOKIE, path="/dashboard")
    return response


async def _credential(gw: Gateway, credential: str) -> tuple[str, str, str] | None:
    """(role, team id, key id) of a management key or of the operator's token; None for anything else."""
    assert gw.store is not None and gw.keys is not None
    if credential.startswith(ADMIN_PREFIX):
        token_id = await gw.store.admin_token(hash_secret(credential))
        return ("operator", "", token_id) if token_id else None
    configured = os.environ.get("GATEWAY_ADMIN_TOKEN", "")
    if configured and hmac.compare_digest(hash_secret(credential), hash_secret(configured)):
        return "operator", "", _env_token_id()
    parts = split_key(credential)
    if parts is None:
        return None
    try:
        key = await gw.keys.authenticate(credential)
    except GatewayError:
        return None
    if not key.management:
        return None
    return "team", key.team_id, key.kid


def _env_token_id() -> str:
    configured = os.environ.get("GATEWAY_ADMIN_TOKEN", "")
    return ENV_TOKEN + hash_secret(configured).hex()[:16] if configured else ""


async def _signout(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    form = await request.post()
    signed = await signed_in(request, gw)
    if signed is not None:
        if not same(str(form.get("csrf", "")), signed.session.csrf):
            return redirect("/dashboard/overview")  # a form from elsewhere: the session goes on
        assert gw.store is not None
        await gw.store.delete_session(signed.session.token_hash)
    response = redirect("/dashboard/signin")
    response.del_cookie(COOKIE, path="/dashboard")
    return response


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    kind = STATIC_FILES.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    response = web.Response(body=(HERE / "static" / name).read_bytes(), content_type=kind)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return secure_headers(response)


# -- pages


def usd(nanos: float) -> str:
    """Dollars, with two decimals from a dollar up and three significant digits below (fractions of a cent)."""
    usd = nanos / 1e9
    if usd == 0:
        return "$0"
    if abs(usd) >= 1:
        return f"${usd:,.2f}"
    decimals = max(2, 2 - math.floor(math.log10(abs(usd))))
    return f"${usd:.{decimals}f}"


def _count(value: float) -> str:
    value = float(value)
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.0f} ms" if value >= 10 or value == 0 else f"{value:.1f} ms"


def moment(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


async def _overview(request: web.Request, gw: Gateway, signed: Signed) -> web.StreamResponse:
    store = gw.store
    assert store is not None
    chosen = request.query.get("range", "24h")
    if chosen not in RANGES:
        chosen = "24h"
    length, step = RANGES[chosen]
    session = signed.session
    team_id, team_name, teams = session.team_id, signed.team_name, []
    if session.role == "operator":
        teams = sorted(team.name for team in await store.list_teams())
        wanted = request.query.get("team", "")
        team = await store.get_team(wanted) if wanted else None
        team_id, team_name = (team.id, team.name) if team is not None else ("", "")
    until = (int(time.time() * 1000) // step + 1) * step
    view = await store.overview(team_id or None, until - length, until, step)
    return html(
        "overview.html",
        title="Overview",
        session=session,
        team_name=team_name,
        teams=teams,
        team_query=f"&team={quote(team_name)}" if session.role == "operator" and team_name else "",
        pages=PAGES,
        current="/dashboard/overview",
        ranges=RANGE_LABELS,
        range=chosen,
        cards=_cards(view, gw),
        charts=_charts(view),
        tops=_tops(view, {k.kid: k.name for k in await store.list_keys(team_id or None)}),
        rollup="minute" if view.rollup_step_ms == 60_000 else "hour",
        since=moment(view.since_ms),
        until=moment(view.until_ms),
    )


def _cards(view: Overview, gw: Gateway) -> list[dict[str, str]]:
    t = view.totals
    error_rate = t.errors / t.requests if t.requests else 0.0
    tokens = f"{_count(t.input_tokens)} in · {_count(t.output_tokens)} out"
    cards = [
        {"label": "Requests", "value": _count(t.requests), "note": f"{t.errors:,} errors"},
        {"label": "Spend", "value": usd(t.cost_nanos), "note": ""},
        {"label": "Tokens", "value": _count(t.input_tokens + t.output_tokens), "note": tokens},
        {"label": "Error rate", "value": f"{error_rate:.1%}", "note": ""},
        {"label": "Latency p50 / p95", "value": ms(t.latency_p50_ms), "note": f"p95 {ms(t.latency_p95_ms)}"},
        {"label": "TTFT p50 / p95", "value": ms(t.ttft_p50_ms), "note": f"p95 {ms(t.ttft_p95_ms)}"},
    ]
    if t.cache_hits:
        hit_rate = t.cache_hits / t.requests if t.requests else 0.0
        cards.append({"label": "Cache hits", "value": f"{hit_rate:.1%}", "note": f"{usd(t.saved_nanos)} saved"})
    if t.rate_limited or gw.limiter.active:  # configured, or keys of their own refused some
        share = f"{t.rate_limited / t.requests:.1%} of requests" if t.requests else ""
        cards.append({"label": "Rate-limited", "value": _count(t.rate_limited), "note": share})
    if t.guarded or gw.config.guardrails.policies:
        cards.append({"label": "Guardrail matches", "value": _count(t.guarded), "note": f"{t.blocked:,} blocked"})
    return cards


def _charts(view: Overview) -> list[dict[str, Any]]:
    starts = [p.start_ms for p in view.series]
    points = view.series

    def chart(title: str, series: list[Series], fmt: Callable[[float], str]) -> dict[str, Any]:
        legend = [s.name for s in series] if len(series) > 1 else []
        return {"title": title, "legend": legend, "svg": charts.time_series(title, starts, view.step_ms, series, fmt)}

    def pair(first: str, second: str, name1: str, name2: str) -> list[Series]:
        return [
            Series(name1, [getattr(p, first) for p in points], "s1"),
            Series(name2, [getattr(p, second) for p in points], "s2"),
        ]

    return [
        chart("Requests", pair("requests", "errors", "requests", "errors"), _count),
        chart("Spend (USD)", [Series("spend", [p.cost_nanos for p in points], "s1")], usd),
        chart("Latency", pair("latency_p50_ms", "latency_p95_ms", "p50", "p95"), ms),
        chart("Time to first token", pair("ttft_p50_ms", "ttft_p95_ms", "p50", "p95"), ms),
    ]


def _tops(view: Overview, key_names: dict[str, str]) -> list[dict[str, Any]]:
    def top(title: str, rows: list, names: dict[str, str] | None = None) -> dict[str, Any]:
        shown = []
        for row in rows:
            label = f"{names[row.name]} ({row.name})" if names and names.get(row.name) else row.name
            shown.append((label, float(row.cost_nanos), f"{usd(row.cost_nanos)} · {row.requests:,} req"))
        return {"title": title, "svg": charts.bars(title, shown)}

    return [
        top("Top models by spend", view.top_models),
        top("Top providers by spend", view.top_providers),
        top("Top keys by spend", view.top_keys, key_names),
    ]
