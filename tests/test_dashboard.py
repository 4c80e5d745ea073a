"""The web dashboard, over HTTP (the browser's view is tests/test_dashboard_browser.py): sign-in with a team's
management key or the operator's token, its session cookie and CSRF tokens, the overview's figures from the
rollups, a team never seeing another's, sign-out, the security headers, and `dashboard.enabled: false`."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal

import msgspec
import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import BreakerConfig, DashboardConfig, load_config
from proxy.dashboard import live
from proxy.gateway import GATEWAY
from tests.conftest import DEFAULT_CONFIG, auth, env_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(aiohttp_client, mock, store_url) -> TestClient:
    return await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))))


async def _form_token(client: TestClient) -> str:
    page = await client.get("/dashboard/signin")
    assert page.status == 200
    found = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert found
    return found.group(1)


async def sign_in(client: TestClient, credential: str, expect: int = 303) -> str:
    """Sign in through the form; returns the session's CSRF token (for sign-out)."""
    token = await _form_token(client)
    r = await client.post("/dashboard/signin", data={"csrf": token, "credential": credential}, allow_redirects=False)
    assert r.status == expect, await r.text()
    if expect != 303:
        return ""
    assert r.headers["Location"] == "/dashboard/overview"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    page = await client.get("/dashboard/overview")
    found = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert found
    return found.group(1)


async def test_a_team_signs_in_sees_its_figures_and_signs_out(gw, make_key):
    admin = await make_key(team="acme", management=True)
    for _ in range(3):
        assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(admin))).status == 200
    await gw.server.app[GATEWAY].accountant.flush()
    assert (await gw.get("/dashboard/overview", allow_redirects=False)).headers["Location"] == "/dashboard/signin"
    csrf = await sign_in(gw, admin)
    page = await gw.get("/dashboard/overview?range=1h")
    text = await page.text()
    assert page.status == 200 and "Team acme" in text
    requests = re.search(r'<div class="label">Requests</div><div class="value">(\d+)</div>', text)
    assert requests and requests.group(1) == "3"
    assert "openai/gpt-4o-mini" in text and "<circle" in text  # a top model, and points on the charts
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy and "'unsafe-inline'" not in policy
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"
    bad = await gw.post("/dashboard/signout", data={"csrf": "forged"}, allow_redirects=False)
    assert bad.status == 303
    assert (await gw.get("/dashboard/overview", allow_redirects=False)).status == 200  # a forged form ends nothing
    out = await gw.post("/dashboard/signout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert (await gw.get("/dashboard/overview", allow_redirects=False)).status == 303  # signed out


async def test_a_team_never_sees_another_team(gw, make_key):
    first = await make_key(team="first-team", management=True)
    second = await make_key(team="second-team", management=True)
    await gw.post("/v1/chat/completions", json=CHAT, headers=auth(first))
    await gw.server.app[GATEWAY].accountant.flush()
    await sign_in(gw, second)
    text = await (await gw.get("/dashboard/overview?range=1h&team=first-team")).text()
    assert "first-team" not in text and "gpt-4o-mini" not in text  # the team parameter is the operator's only
    assert re.search(r'<div class="label">Requests</div><div class="value">0</div>', text)


async def test_what_cannot_sign_in(gw, make_key):
    inference = await make_key(team="acme")
    await sign_in(gw, inference, expect=401)  # not a management key
    await sign_in(gw, "aistats_v1_admin_nope_" + "x" * 40, expect=401)
    r = await gw.post("/dashboard/signin", data={"csrf": "x", "credential": inference}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/dashboard/signin"  # no form token: a fresh form
    statuses = []
    for _ in range(10):
        form = {"csrf": await _form_token(gw), "credential": "wrong"}
        statuses.append((await gw.post("/dashboard/signin", data=form, allow_redirects=False)).status)
    assert statuses == [401] * 8 + [429] * 2  # 10 attempts a minute per client: 2 were made above


async def test_the_operator_sees_every_team(gw, make_key, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "operator-secret-of-the-test-0123456789")
    for team in ("alpha", "beta"):
        key = await make_key(team=team)
        await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await gw.server.app[GATEWAY].accountant.flush()
    await sign_in(gw, "operator-secret-of-the-test-0123456789")
    text = await (await gw.get("/dashboard/overview?range=1h")).text()
    assert "Operator" in text and re.search(r'<div class="label">Requests</div><div class="value">2</div>', text)
    text = await (await gw.get("/dashboard/overview?range=1h&team=beta")).text()
    assert "Overview · beta" in text and re.search(r'<div class="label">Requests</div><div class="value">1</div>', text)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "a-rotated-operator-secret-0123456789")
    assert (await gw.get("/dashboard/overview", allow_redirects=False)).status == 303  # rotated: the session ends


async def test_a_revoked_signing_key_ends_the_session(gw, make_key, store_url):
    from proxy.store import open_store
    from proxy.store.base import REVOKED

    admin = await make_key(team="acme", management=True)
    await sign_in(gw, admin)
    store = await open_store(store_url)
    try:
        await store.set_key_status(admin.split("_")[3], REVOKED)
    finally:
        await store.close()
    gw.server.app[GATEWAY].keys.forget(admin.split("_")[3])
    assert (await gw.get("/dashboard/overview", allow_redirects=False)).status == 303


async def test_off_removes_every_route(aiohttp_client, mock, store_url):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    client = await aiohttp_client(build_app(msgspec.structs.replace(config, dashboard=DashboardConfig(enabled=False))))
    for path in ("/dashboard", "/dashboard/signin", "/dashboard/overview", "/dashboard/static/dashboard.css"):
        assert (await client.get(path, allow_redirects=False)).status == 404


def test_operator_tokens_from_the_cli(store_url, monkeypatch, capsys):
    from proxy.__main__ import main

    monkeypatch.setenv("GATEWAY_STORE", store_url)
    config = ["--config", str(DEFAULT_CONFIG)]
    assert main(["admin-token", "create", "--name", "on-call", *config]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("aistats_v1_admin_")
    assert main(["admin-token", "list", *config]) == 0
    listed = capsys.readouterr().out
    token_id = token.removeprefix("aistats_v1_admin_").split("_")[0]
    assert token_id in listed and "on-call" in listed and token not in listed  # never the secret
    assert main(["admin-token", "revoke", token_id, *config]) == 0
    assert main(["admin-token", "revoke", token_id, *config]) == 1  # gone


async def test_an_operator_token_signs_in_until_revoked(gw, store_url):
    from proxy.auth import hash_secret
    from proxy.store import open_store

    token = "aistats_v1_admin_0123456789ab_" + "s" * 43
    store = await open_store(store_url)
    try:
        await store.create_admin_token("0123456789ab", hash_secret(token), "test")
        await sign_in(gw, token)
        assert "Operator" in await (await gw.get("/dashboard/overview")).text()
        assert await store.revoke_admin_token("0123456789ab")
    finally:
        await store.close()
    assert (await gw.get("/dashboard/overview", allow_redirects=False)).status == 303  # its session ended


async def _csrf_of(client: TestClient, path: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', await (await client.get(path)).text())
    assert found
    return found.group(1)


async def test_keys_are_made_changed_and_revoked_from_the_page(gw, make_key):
    admin = await make_key(team="acme", management=True)
    csrf = await sign_in(gw, admin)
    form = {"csrf": csrf, "name": "ci <bot>", "daily_limit_usd": "1.50", "rpm_limit": "60", "cache": "off"}
    form["allowed_models"] = "openai/gpt-4o-mini"
    page = await gw.post("/dashboard/keys", data=form)
    text = await page.text()
    assert page.status == 200 and "never shown again" in text and "ci &lt;bot&gt;" in text  # escaped
    secret = re.search(r'id="new-secret" readonly value="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    kid = secret.split("_")[3]
    assert "$1.50/day" in text and "60 rpm" in text and "cache off" in text and "1 model" in text
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status == 200
    refused = await gw.post("/v1/chat/completions", json={**CHAT, "model": "openai/gpt-4o"}, headers=auth(secret))
    assert refused.status == 403  # its allowed models, set in the page
    assert secret not in await (await gw.get("/dashboard/keys")).text()  # shown once

    bad = await gw.post("/dashboard/keys", data={"csrf": csrf, "rpm_limit": "many"})
    assert bad.status == 400 and "whole number" in await bad.text()
    for amount in ("NaN", "Infinity", "lots"):  # refused as amounts, never a failure of the page
        bad = await gw.post("/dashboard/keys", data={"csrf": csrf, "daily_limit_usd": amount})
        assert bad.status == 400 and "daily limit usd" in await bad.text()
    forged = await gw.post(f"/dashboard/keys/{kid}/status", data={"csrf": "forged", "status": "disabled"})
    assert (
        forged.status == 400 and (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status == 200
    )
    await gw.post(f"/dashboard/keys/{kid}/status", data={"csrf": csrf, "status": "disabled"})
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status == 401
    await gw.post(f"/dashboard/keys/{kid}/status", data={"csrf": csrf, "status": "active"})
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status == 200

    saved = await gw.post(f"/dashboard/keys/{kid}", data={"csrf": csrf, "name": "renamed"}, allow_redirects=False)
    assert saved.status == 303
    text = await (await gw.get("/dashboard/keys")).text()
    assert "renamed" in text and "$1.50/day" not in text  # the edit form sets every setting: empty clears

    unconfirmed = await gw.post(f"/dashboard/keys/{kid}/revoke", data={"csrf": csrf})
    assert unconfirmed.status == 400 and "Tick the box" in await unconfirmed.text()
    await gw.post(f"/dashboard/keys/{kid}/revoke", data={"csrf": csrf, "confirm": "on"})
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status == 401


async def test_a_team_cannot_touch_another_teams_keys(gw, make_key):
    other = await make_key(team="globex")
    admin = await make_key(team="acme", management=True)
    csrf = await sign_in(gw, admin)
    kid = other.split("_")[3]
    assert (await gw.get(f"/dashboard/keys/{kid}")).status == 404
    r = await gw.post(f"/dashboard/keys/{kid}/revoke", data={"csrf": csrf, "confirm": "on"})
    assert r.status == 400 and "No key" in await r.text()
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(other))).status == 200
    assert kid not in await (await gw.get("/dashboard/keys?team=globex")).text()


async def test_the_operator_manages_a_chosen_teams_keys(gw, make_key, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "operator-secret-of-the-test-0123456789")
    member = await make_key(team="globex")
    csrf = await sign_in(gw, "operator-secret-of-the-test-0123456789")
    assert "Choose a team" in await (await gw.get("/dashboard/keys")).text()
    text = await (await gw.get("/dashboard/keys?team=globex")).text()
    assert member.split("_")[3] in text
    page = await gw.post("/dashboard/keys?team=globex", data={"csrf": csrf, "name": "made by ops"})
    secret = re.search(r'id="new-secret" readonly value="([^"]+)"', await page.text()).group(1)  # type: ignore[union-attr]
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))).status == 200


async def test_credits_a_team_reads_and_the_operator_adds(gw, make_key, monkeypatch):
    admin = await make_key(team="acme", credit_usd=10, management=True)
    await gw.post("/v1/chat/completions", json=CHAT, headers=auth(admin))
    csrf = await sign_in(gw, admin)
    text = await (await gw.get("/dashboard/credits")).text()
    assert "Credits · acme" in text
    spent = re.search(r'Spent, 24 hours</div><div class="value">\$([\d.]+)</div>', text)
    assert spent and float(spent.group(1)) > 0  # the request, written or not yet
    assert re.search(r'<td class="amount in">\+\$10\.00</td>', text)  # the top-up itself, in the ledger
    await gw.server.app[GATEWAY].accountant.flush()
    text = await (await gw.get("/dashboard/credits")).text()
    assert re.search(r'<td>Spend: 1 request</td><td class="amount out">-\$0\.0000\d+</td>', text)  # today's
    assert "Add credit" not in text
    refused = await gw.post("/dashboard/credits", data={"csrf": csrf, "amount_usd": "5"})
    assert refused.status == 403  # a team cannot top itself up

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "operator-secret-of-the-test-0123456789")
    gw.session.cookie_jar.clear()
    csrf = await sign_in(gw, "operator-secret-of-the-test-0123456789")
    bad = await gw.post("/dashboard/credits?team=acme", data={"csrf": csrf, "amount_usd": "-3"})
    assert bad.status == 400 and "more than $0" in await bad.text()
    for amount in ("NaN", "Infinity", "lots"):
        bad = await gw.post("/dashboard/credits?team=acme", data={"csrf": csrf, "amount_usd": amount})
        assert bad.status == 400 and "must be in USD" in await bad.text()
    added = await gw.post(
        "/dashboard/credits?team=acme", data={"csrf": csrf, "amount_usd": "25.5", "note": "invoice <7>"}
    )
    text = await added.text()
    assert (
        added.status == 200
        and "invoice &lt;7&gt;" in text
        and re.search(r'<td class="amount in">\+\$25\.50</td>', text)
    )
    balance = re.search(
        r'<div class="label">Balance</div><div class="value" title="\$([\d.]+) exactly">\$([\d.,]+)</div>', text
    )
    assert balance and balance.group(2) == "35.50"  # $10 + $25.50, less a request (shown to the cent)
    exact = Decimal(balance.group(1))  # to the nano-dollar, on hover: $35.50 less the request's fraction of a cent
    assert Decimal("35.4999") < exact < Decimal("35.50") and exact.as_tuple().exponent < -4


async def test_requests_are_listed_filtered_and_opened(gw, make_key):
    admin = await make_key(team="acme", management=True)
    other = await make_key(team="globex")
    for body in (CHAT, {**CHAT, "model": "openai/gpt-4o"}, {**CHAT, "model": "no-such-model"}):
        await gw.post("/v1/chat/completions", json=body, headers=auth(admin))
    theirs = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(other))
    await gw.server.app[GATEWAY].accountant.flush()
    await sign_in(gw, admin)
    text = await (await gw.get("/dashboard/requests")).text()
    assert text.count("/dashboard/requests/req_") == 3 and theirs.headers["x-request-id"] not in text
    failed = await (await gw.get("/dashboard/requests?status=error")).text()
    assert failed.count("/dashboard/requests/req_") == 1 and "model_not_found" in failed
    only = await (await gw.get("/dashboard/requests?model=openai/gpt-4o")).text()
    assert only.count("/dashboard/requests/req_") == 1
    request_id = re.search(r"/dashboard/requests/(req_[^\"?]+)", only).group(1)  # type: ignore[union-attr]
    page = await gw.get(f"/dashboard/requests/{request_id}")
    detail = await page.text()
    assert page.status == 200 and "Pricing lines" in detail and "openai/gpt-4o" in detail and "latency_ms" in detail
    assert (await gw.get(f"/dashboard/requests/{theirs.headers['x-request-id']}")).status == 404  # another team's


def _row(text: str, *cells: str) -> list[str]:
    """The cells of the first table row holding these cells, in order (tags stripped)."""
    for row in re.findall(r"<tr>(.*?)</tr>", text, re.S):
        found = [re.sub(r"<[^>]+>", " ", c).split() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        shown = [" ".join(c) for c in found]
        if all(cell in shown for cell in cells):
            return shown
    raise AssertionError(f"no row with {cells}")


async def test_providers_show_breakers_error_rates_and_prices(aiohttp_client, mock, store_url, make_key, monkeypatch):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.providers["openai"].breaker = BreakerConfig(failures=2, cooldown_s=600)
    config.models["openai/gpt-4o-mini"].retries = 0
    client = await aiohttp_client(build_app(config))
    admin = await make_key(team="acme", management=True)
    other = await make_key(team="other")
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(other))).status == 200
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(admin))).status == 200
    mock.control.mode, mock.control.status = "status", 500
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(admin))).status >= 500
    await client.server.app[GATEWAY].accountant.flush()

    await sign_in(client, admin)
    page = await client.get("/dashboard/providers?team=other")
    text = await page.text()
    assert page.status == 200 and "Providers · acme" in text
    # openai answered acme 5 requests, 2 failed (the other team's request is not acme's); its one target is open
    openai = _row(text, "openai", "openai")
    assert openai[3:7] == ["5", "40.0%", "5", "40.0%"] and "1 open" in openai[2]
    target = _row(text, "openai/gpt-4o-mini", "gpt-4o-mini")
    assert target[4].startswith("open") and target[5].startswith("2 last:") and target[8:10] == ["5", "40.0%"]
    assert "Calls since start" not in text  # every team's traffic: the operator's only
    price = _row(text, "openai/gpt-4o-mini", "chat.completions, responses, messages")
    assert price[4:7] == ["$0.15", "$0.60", "$0.075"]

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "operator-secret-of-the-test-0123456789")
    operator = await aiohttp_client(client.server)
    await sign_in(operator, "operator-secret-of-the-test-0123456789")
    text = await (await operator.get("/dashboard/providers")).text()
    openai = _row(text, "openai", "openai")
    assert openai[3:5] == ["6", "33.3%"] and openai[-2:] == ["4", "500: 2"]  # every team's; calls since start
    text = await (await operator.get("/dashboard/providers?team=other")).text()
    assert _row(text, "openai", "openai")[3:5] == ["1", "0.0%"]


async def _event(response, timeout: float = 5.0) -> tuple[str, dict]:
    """The next event of a server-sent stream (comments skipped), within `timeout` seconds."""
    name, data = "", b""
    while True:
        line = await asyncio.wait_for(response.content.readline(), timeout)
        assert line, "the stream ended"
        line = line.rstrip(b"\n")
        if not line:
            if name:
                return name, orjson.loads(data)
            continue
        field, _, value = line.partition(b": ")
        if field == b"event":
            name = value.decode()
        elif field == b"data":
            data += value


def _ids(html: str) -> list[str]:
    return re.findall(r'href="/dashboard/requests/([^"?]+)', html)


async def test_live_mode_streams_new_requests_as_they_are_recorded(
    aiohttp_client, mock, store_url, make_key, monkeypatch
):
    monkeypatch.setattr(live, "TICK_S", 0.2)
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.dashboard.live_interval_s = 0.1
    client = await aiohttp_client(build_app(config))
    gateway = client.server.app[GATEWAY]
    admin = await make_key(team="acme", management=True, name="ops")
    rival = await make_key(team="rival")

    async def chat(key: str, model: str = "openai/gpt-4o-mini") -> str:
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=auth(key))
        assert r.status == 200
        return r.headers["x-request-id"]

    first = await chat(admin)
    await gateway.accountant.flush()
    await sign_in(client, admin)
    page = await (await client.get("/dashboard/requests")).text()
    url = re.search(r'data-live="([^"]+)"', page).group(1)
    stream = await client.get(url.replace("&amp;", "&"))
    assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Content-Security-Policy"].startswith("default-src 'none'")
    name, data = await _event(stream)
    assert name == "rows" and data["reset"] and _ids(data["html"]) == [first]  # the table as the page has it

    watcher = await aiohttp_client(client.server)  # another person of the team, in another session
    await sign_in(watcher, await make_key(team="acme", management=True))
    filtered = await watcher.get("/dashboard/requests/live?model=openai/o3")  # another model only
    assert _ids((await _event(filtered))[1]["html"]) == []
    await chat(rival)  # another team's: never in acme's stream
    second, third = await chat(admin), await chat(admin, "openai/o3")
    await gateway.accountant.flush()
    seen: list[str] = []
    while len(seen) < 2:
        name, data = await _event(stream)
        assert name == "rows" and not data.get("reset")
        assert "ops" in data["html"]  # the key's name
        seen += _ids(data["html"])
    assert sorted(seen) == sorted([second, third])
    assert _ids((await _event(filtered))[1]["html"]) == [third]

    for _ in range(3):  # quiet: comments keep the stream open, and nothing is sent twice
        assert (await asyncio.wait_for(stream.content.readline(), 2)).startswith(b": ping")
        assert await asyncio.wait_for(stream.content.readline(), 2) == b"\n"

    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert (await client.post("/dashboard/signout", data={"csrf": csrf}, allow_redirects=False)).status == 303
    name, data = await _event(stream)
    assert name == "end" and "Signed out" in data["reason"]
    assert await asyncio.wait_for(stream.content.read(), 2) == b""  # and the stream is over
    await client.server.app[live.FEED].close(client.server.app)  # the gateway stopping ends the other
    name, data = await _event(filtered)
    assert name == "end" and "stopping" in data["reason"]
    assert not client.server.app[live.FEED].channels  # nobody watches: nothing is polled


GUARDED = """
guardrails:
  policies:
    pii: {check: pii, action: redact}
    no_o3: {check: models, deny: [openai/o3]}
  default: [pii, no_o3]
rate_limits:
  key: {rpm: 3}
"""


async def test_the_overview_counts_rate_limit_refusals_and_guardrail_matches(aiohttp_client, mock, store_url, make_key):
    from tests.test_guardrails import config_from

    config = config_from(DEFAULT_CONFIG.read_text() + GUARDED, store_url, env_for(mock, store_url))
    client = await aiohttp_client(build_app(config))
    admin = await make_key(team="acme", management=True)
    email = {**CHAT, "messages": [{"role": "user", "content": "mail me at jo@example.com"}]}
    statuses = [
        (await client.post("/v1/chat/completions", json=body, headers=auth(admin))).status
        for body in (CHAT, email, {**CHAT, "model": "openai/o3"}, CHAT, CHAT, CHAT)
    ]
    assert statuses == [200, 200, 400, 200, 429, 429]  # redacted, blocked (not counted), then over 3 a minute
    await client.server.app[GATEWAY].accountant.flush()
    await sign_in(client, admin)
    text = await (await client.get("/dashboard/overview?range=1h")).text()

    def card(label: str) -> tuple[str, str]:
        found = re.search(rf'<div class="label">{label}</div><div class="value">([^<]+)</div>'
                          r'(?:<div class="note">([^<]*)</div>)?', text)  # fmt: skip
        assert found, label
        return found.group(1), found.group(2) or ""

    assert card("Requests") == ("6", "3 errors")
    assert card("Rate-limited") == ("2", "33.3% of requests")
    assert card("Guardrail matches") == ("2", "1 blocked")
