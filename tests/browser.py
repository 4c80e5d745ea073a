"""Browser-test harness: a headless system Chromium driven by Playwright, pages that record their console errors,
and a real gateway process to point them at. Registered as a plugin by tests/conftest.py, so a test only asks for
the fixtures and imports the helpers:

    from tests.browser import assert_no_console_errors, screenshot

    async def test_sign_in(live_gateway, new_page):
        key = await live_gateway.make_key(team="acme", management=True)
        page = await new_page(dark=True)
        await page.goto(live_gateway.url + "/dashboard")
        ...
        await screenshot(page, "signed-in")
        assert_no_console_errors(page)

Fixtures (all function-scoped: Playwright's async objects belong to the event loop that made them, and
pytest-asyncio gives each test a loop of its own, so a session-scoped browser fails with "attached to a different
loop"; a launch costs about half a second):

- `browser`: Debian's `chromium` (`executable_path`, never a browser downloaded by `playwright install`). Skipped
  without it or without the `playwright` package, except when `CI` is set: then the test fails and says what to
  install (like tests/test_store.py's PostgreSQL).
- `new_page(dark=False, phone=False, base_url=None)`: a page in a context of its own (1280x800, or 390x844 as a
  touch phone), whose console errors and uncaught exceptions are recorded for `console_errors(page)` and
  `assert_no_console_errors(page)`; `screenshot(page, name)` saves `<tmp_path>/screenshots/<name>.png`.
- `live_gateway`: `python -m proxy serve` on the `mock` upstream and a fresh SQLite store (tests/conftest.py),
  ready before the test and killed after it; `run_gateway(env, folder, config)` starts one on another config.

Events reach the recorder in the order the browser sent them: an error raised while a page loads is recorded when
`goto` returns; one raised later (a timer, a failed fetch) once the test has awaited something that happens after it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.conftest import DEFAULT_CONFIG, ROOT, Mock, env_for
from tests.test_cli import _start, _wait_ready

if TYPE_CHECKING:  # playwright is imported when a browser is asked for: without it the other tests still run
    from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Error, Page, ViewportSize

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
TIMEOUT_MS = 10_000  # every Playwright action and navigation: a missing element fails the test in 10 s, not 120
KEY_TIMEOUT_S = 60

NewPage = Callable[..., Awaitable["Page"]]


def chromium_path() -> str:
    return shutil.which("chromium") or "/usr/bin/chromium"


def _require_browser() -> str:
    """The Chromium to launch; skips the test without it or without playwright (fails when CI is set)."""
    path = chromium_path()
    if importlib.util.find_spec("playwright") is None:
        why, fix = "the playwright package is not installed", "pip install -e '.[test]'"
    elif not os.access(path, os.X_OK):
        why, fix = f"no Chromium at {path}", "apt-get install chromium fonts-dejavu-core (see .ci/run)"
    else:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {why}: {fix}")
    pytest.skip(why)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    path = _require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=path, headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield chromium
        finally:
            await chromium.close()


# ---------------------------------------------------------------------------------------------------------
# pages that record their errors


@dataclass
class _Record:
    screenshots: Path
    errors: list[str] = field(default_factory=list)


_RECORDS: weakref.WeakKeyDictionary[Page, _Record] = weakref.WeakKeyDictionary()


def _record(page: Page) -> _Record:
    record = _RECORDS.get(page)
    assert record is not None, "not a page made by the new_page fixture"
    return record


@pytest.fixture
async def new_page(browser: Browser, tmp_path: Path) -> AsyncIterator[NewPage]:
    contexts: list[BrowserContext] = []

    async def make(*, dark: bool = False, phone: bool = False, base_url: str | None = None) -> Page:
        context = await browser.new_context(
            viewport=PHONE if phone else DESKTOP,
            is_mobile=phone,
            has_touch=phone,
            color_scheme="dark" if dark else "light",
            base_url=base_url,
        )
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = await context.new_page()
        record = _RECORDS[page] = _Record(screenshots=tmp_path / "screenshots")

        def on_console(message: ConsoleMessage) -> None:
            where = message.location
            # Chromium fetches /favicon.ico itself for a page that names no icon (a JSON one, say), whenever it
            # gets to it, and logs "Failed to load resource: ... 404 (Not Found)" when the origin has none.
            if message.type == "error" and urlsplit(where["url"]).path != "/favicon.ico":
                record.errors.append(f"console.error: {message.text} ({where['url']}:{where['lineNumber']})")

        def on_page_error(error: Error) -> None:
            record.errors.append(f"uncaught: {error.stack or error.message}")

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        return page

    yield make
    for context in contexts:
        await context.close()


def console_errors(page: Page) -> list[str]:
    """The page's `console.error` messages (the browser's own too, e.g. a failed load) and uncaught exceptions."""
    return list(_record(page).errors)


def assert_no_console_errors(page: Page, *, ignore: tuple[str, ...] = ()) -> None:
    """Fails with every recorded error, except those containing one of the `ignore` strings."""
    errors = [e for e in _record(page).errors if not any(part in e for part in ignore)]
    assert not errors, f"{page.url} logged {len(errors)} error(s):\n" + "\n".join(errors)


async def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Saves the page as `<tmp_path>/screenshots/<name>.png` and returns the path."""
    path = _record(page).screenshots / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=path, full_page=full_page)
    return path


# ---------------------------------------------------------------------------------------------------------
# a real gateway process


@dataclass
class LiveGateway:
    url: str  # http://127.0.0.1:PORT
    store_url: str
    env: dict[str, str]
    config: Path
    log: Path
    process: asyncio.subprocess.Process

    async def make_key(self, team: str = "acme", credit_usd: float = 10.0, management: bool = False) -> str:
        """A new key from `stats-gateway keys create` (the whole `aistats_v1_sk_…` string a user signs in with)."""
        args = ["keys", "create", "--config", str(self.config), "--team", team]
        if credit_usd:
            args += ["--credit", f"{credit_usd:g}"]
        if management:
            args.append("--management")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, cwd=ROOT, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), KEY_TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, f"keys create {' '.join(args[3:])} exited {proc.returncode}:\n{err.decode()}"
        return out.decode().strip().splitlines()[-1]


@asynccontextmanager
async def run_gateway(env: dict[str, str], folder: Path, config: Path = DEFAULT_CONFIG) -> AsyncIterator[LiveGateway]:
    """`python -m proxy serve` on 127.0.0.1 (a port the OS picks, read from its log in `folder`), one worker, ready
    (GET /readyz answered 200, within 20 s) when yielded; killed on exit."""
    args = ("--config", str(config), "--host", "127.0.0.1", "--workers", "1")
    try:
        proc, url, log = await _start(env, folder, *args)
    except ProcessLookupError:  # _start kills the gateway even when it has exited: show why it did
        raise AssertionError(f"the gateway exited at start:\n{(folder / 'gateway.log').read_text()}") from None
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
        yield LiveGateway(url, env["GATEWAY_STORE"], env, config, log, proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def live_gateway(mock: Mock, store_url: str, tmp_path: Path) -> AsyncIterator[LiveGateway]:
    async with run_gateway(env_for(mock, store_url), tmp_path) as gateway:
        yield gateway
