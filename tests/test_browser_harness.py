"""The browser harness itself (tests/browser.py): the system Chromium opens a real gateway process's pages, signs a
request with a key made by the CLI, renders text into screenshots, and its pages record console errors."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.browser import assert_no_console_errors, console_errors, screenshot

BROKEN = """<!doctype html><meta charset="utf-8"><title>broken</title>
<p>a page with a bug</p>
<script>console.error("deliberate console error"); undefinedDashboardCall();</script>"""
TEXT = '<p id="t" style="margin:0;font:40px sans-serif">Tokens 12,345</p>'
CLIP = {"x": 0, "y": 0, "width": 400, "height": 60}


@pytest.mark.timeout(30)
async def test_live_gateway_in_the_browser(live_gateway, new_page):
    page = await new_page()
    response = await page.goto(live_gateway.url + "/healthz")
    assert response is not None and response.status == 200
    shot = await screenshot(page, "healthz")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.parent.name == "screenshots"

    key = await live_gateway.make_key(team="acme", credit_usd=5)
    status = await page.evaluate(
        "async key => (await fetch('/v1/models', {headers: {Authorization: 'Bearer ' + key}})).status", key
    )
    assert status == 200
    assert_no_console_errors(page)


async def test_text_renders_and_errors_are_recorded(new_page, aiohttp_server):
    async def broken(_: web.Request) -> web.Response:
        return web.Response(text=BROKEN, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", broken)
    server = await aiohttp_server(app, host="127.0.0.1")

    page = await new_page(dark=True, phone=True, base_url=str(server.make_url("")))
    assert page.viewport_size == {"width": 390, "height": 844}
    await page.goto("/")
    errors = console_errors(page)
    assert len(errors) == 2, errors
    assert errors[0].startswith("console.error: deliberate console error (http://127.0.0.1:")
    assert "undefinedDashboardCall is not defined" in errors[1]
    with pytest.raises(AssertionError, match="logged 2 error"):
        assert_no_console_errors(page)
    assert_no_console_errors(page, ignore=("deliberate", "undefinedDashboardCall"))
    assert await page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")

    # Fonts: without any installed, Chromium draws no glyphs and the clip with text equals the one without.
    await page.set_content(TEXT)
    await screenshot(page, "text")
    with_text = await page.screenshot(clip=CLIP)
    await page.eval_on_selector("#t", "p => { p.style.color = 'transparent' }")
    assert await page.screenshot(clip=CLIP) != with_text, "no text rendered: install fonts-dejavu-core"
