"""The dashboard in a real browser (the system Chromium, driven by Playwright: tests/browser.py), as a person would
use it: a gateway process serves traffic, a team signs in with its management key, sees the overview's charts
with data in them (light, dark, and on a phone), its requests and one request's record, its credits, and signs
out; another team signs in and sees none of the first team's figures; a key made in the page serves the `openai`
SDK until it is revoked there. No page logs a console error. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from playwright.async_api import expect

from tests.browser import assert_no_console_errors, screenshot

pytestmark = pytest.mark.timeout(90)
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _traffic(url: str, key: str, count: int) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for body in [CHAT, {**CHAT, "stream": True}] * (count // 2):
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()


async def _sign_in(page, url: str, credential: str) -> None:
    await page.goto(f"{url}/dashboard")
    await page.get_by_label("Management key or operator token").fill(credential)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/dashboard/overview")


async def _requests_shown(page, url: str, expected: str) -> str:
    """The overview's request count once the gateway's writer has stored the traffic (bounded wait)."""
    async with asyncio.timeout(15):
        while True:
            await page.goto(f"{url}/dashboard/overview?range=1h")
            shown = await page.locator(".card", has_text="Requests").locator(".value").inner_text()
            if shown == expected:
                return shown
            await asyncio.sleep(0.2)  # the records reach the store within ~50 ms, from another process


async def test_a_team_sees_its_traffic_and_another_team_does_not(live_gateway, new_page):
    url = live_gateway.url
    first = await live_gateway.make_key(team="acme", credit_usd=5, management=True)
    second = await live_gateway.make_key(team="globex", credit_usd=5, management=True)
    await _traffic(url, first, 6)

    page = await new_page()
    await page.goto(f"{url}/dashboard")
    await screenshot(page, "signin-light")
    await _sign_in(page, url, first)
    assert await _requests_shown(page, url, "6") == "6"
    assert await page.locator("svg.chart circle").count() > 0  # points on the charts
    assert await page.get_by_text("openai/gpt-4o-mini").count() >= 1  # the top model
    await screenshot(page, "overview-light")
    await page.get_by_role("link", name="30 days").click()
    await page.wait_for_url("**range=30d")
    assert await page.locator(".card", has_text="Requests").locator(".value").inner_text() == "6"
    await page.get_by_role("link", name="Requests").click()
    await page.wait_for_url("**/dashboard/requests")
    assert await page.locator("tbody tr").count() == 6
    await screenshot(page, "requests-light")
    await page.locator("tbody tr").first.get_by_role("link").click()
    await page.get_by_role("heading", name="Pricing lines").wait_for()  # one request's record
    await screenshot(page, "request-light")
    await page.get_by_role("link", name="Credits").click()
    await page.wait_for_url("**/dashboard/credits")
    assert await page.locator(".card", has_text="Balance").locator(".value").inner_text() == "$5.00"  # less cents
    await screenshot(page, "credits-light")
    assert_no_console_errors(page)
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/dashboard/signin")

    dark = await new_page(dark=True)
    await _sign_in(dark, url, first)
    await _requests_shown(dark, url, "6")
    background = await dark.evaluate("getComputedStyle(document.body).backgroundColor")
    assert (
        re.fullmatch(r"rgb\((\d+), (\d+), (\d+)\)", background)
        and sum(int(c) for c in re.findall(r"\d+", background)) < 150
    )  # the dark theme, from the browser's preference
    await screenshot(dark, "overview-dark")
    assert_no_console_errors(dark)

    phone = await new_page(phone=True)
    await _sign_in(phone, url, first)
    await _requests_shown(phone, url, "6")
    overflow = await phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0  # nothing wider than the phone's screen
    await screenshot(phone, "overview-phone")

    other = await new_page()
    await _sign_in(other, url, second)
    await other.goto(f"{url}/dashboard/overview?range=1h&team=acme")
    text = await other.locator("main").inner_text()
    assert "acme" not in text and "gpt-4o-mini" not in text
    assert await other.locator(".card", has_text="Requests").locator(".value").inner_text() == "0"
    assert_no_console_errors(other)


async def test_a_key_made_in_the_page_works_with_the_sdk_until_revoked(live_gateway, new_page):
    import openai

    url = live_gateway.url
    admin = await live_gateway.make_key(team="acme", credit_usd=5, management=True)
    page = await new_page()
    await _sign_in(page, url, admin)
    await page.get_by_role("link", name="Keys").click()
    await page.wait_for_url("**/dashboard/keys")
    await page.get_by_label("Name").fill("notebook")
    await page.get_by_label("Requests a minute").fill("100")
    await page.get_by_role("button", name="Create key").click()
    secret = await page.get_by_label("The new key").input_value()
    await page.get_by_role("button", name="Copy").click()
    await page.get_by_role("button", name="Copied").wait_for()  # the page's script ran (CSP allows its file)
    await screenshot(page, "keys-created")

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    answer = await client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content

    row = page.get_by_role("row", name=re.compile("notebook"))
    await row.get_by_label("sure").check()
    await row.get_by_role("button", name="Revoke").click()
    await page.wait_for_url("**/dashboard/keys")
    assert await page.get_by_role("row", name=re.compile("notebook")).get_by_text("revoked").count() == 1
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert_no_console_errors(page)


async def test_live_requests_and_the_providers_page(live_gateway, new_page):
    url = live_gateway.url
    admin = await live_gateway.make_key(team="acme", credit_usd=5, management=True)
    await _traffic(url, admin, 2)
    page = await new_page()
    await _sign_in(page, url, admin)
    await _requests_shown(page, url, "2")
    await page.goto(f"{url}/dashboard/requests")
    rows = page.locator("tbody tr[data-created]")
    assert await rows.count() == 2
    await page.get_by_role("button", name="Live").click()
    await page.get_by_text("Live: new requests appear").wait_for()
    await _traffic(url, admin, 4)  # appended as they are recorded, without reloading the page
    await expect(rows).to_have_count(6, timeout=15_000)
    assert await page.locator("tbody tr.fresh").count() == 4
    times = await rows.evaluate_all("rows => rows.map(r => Number(r.dataset.created))")
    assert times == sorted(times, reverse=True)  # newest first
    await screenshot(page, "requests-live")
    await page.get_by_role("button", name="Pause").click()
    await page.get_by_text("Paused.").wait_for()
    assert_no_console_errors(page)

    await page.get_by_role("link", name="Providers").click()
    await page.wait_for_url("**/dashboard/providers")
    provider = page.get_by_role("row", name=re.compile(r"^openai openai "))
    assert "6" in await provider.inner_text() and "0.0%" in await provider.inner_text()
    assert await provider.locator(".state.closed").count() == 1
    price = page.get_by_role("row", name="openai/gpt-4o-mini chat.completions, responses")
    assert "$0.15" in await price.inner_text() and "$0.60" in await price.inner_text()
    await screenshot(page, "providers-light")
    dark = await new_page(dark=True)
    await _sign_in(dark, url, admin)
    await dark.goto(f"{url}/dashboard/providers")
    await screenshot(dark, "providers-dark")
    assert_no_console_errors(dark)
