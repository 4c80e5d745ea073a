"""Fixtures: a mock upstream, the default config pointed at it, keys in a fresh store, a gateway client,
and a throwaway PostgreSQL server (bench/pg_server.py) with a fresh database per test (`pg_url`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import pytest
from aiohttp.test_utils import TestClient

from bench.pg_server import PgServer, find_bin_dir
from proxy.app import build_app
from proxy.auth import generate_key, hash_secret, split_key
from proxy.config import NANOS_PER_USD, GatewayConfig, load_config
from proxy.store import Store, open_store
from proxy.store.base import SCOPE_INFERENCE, SCOPE_MANAGEMENT, KeyRecord
from tests.mock_anthropic import AnthropicControl, build_anthropic_mock
from tests.mock_gemini import GeminiControl, build_gemini_mock
from tests.mock_upstream import MockControl, build_mock
from tests.redis_server import RedisServer

# The browser-test fixtures (browser, new_page, live_gateway): tests/browser.py.
pytest_plugins = ["tests.browser"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "gateway.yaml"

# Tests reach only their own servers on 127.0.0.1: a proxy set on the machine (CI behind one) must not take
# their traffic. The egress tests set these variables themselves, per test.
for _name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)


@dataclass
class Mock:
    url: str
    control: MockControl


@pytest.fixture
async def mock(aiohttp_server) -> Mock:
    control = MockControl()
    server = await aiohttp_server(build_mock(control), host="127.0.0.1")
    return Mock(url=str(server.make_url("/v1")), control=control)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/gateway.db"


def env_for(mock: Mock, store_url: str, **extra: str) -> dict[str, str]:
    """The environment of a gateway on `mock` and `store_url`; `extra` variables are added or override. The
    pid file and the accounting journal sit beside a SQLite store; with another store there is no pid file
    unless `GATEWAY_PID_FILE` names one, and the journal is the default's (`./data/journal/postgres-…`, emptied
    and removed at a clean stop) unless `GATEWAY_JOURNAL_DIR` names another."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_BASE_URL", "_API_KEY")) and k[:8] != "GATEWAY_"}
    sqlite = store_url.startswith("sqlite:///")
    folder = store_url.removeprefix("sqlite:///").rsplit("/", 1)[0]
    env.update(
        OPENAI_BASE_URL=mock.url,
        OPENAI_API_KEY="sk-upstream-secret",
        GATEWAY_STORE=store_url,
        GATEWAY_PID_FILE=folder + "/gateway.pid" if sqlite else "",
    )
    if sqlite and folder != ":memory:":
        env["GATEWAY_JOURNAL_DIR"] = folder + "/journal"
    env.update(extra)
    return env


@pytest.fixture
def config(mock: Mock, store_url: str) -> GatewayConfig:
    return load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))


MakeKey = Callable[..., Awaitable[str]]


@pytest.fixture
def make_key(store_url: str) -> MakeKey:
    async def make(team: str = "acme", credit_usd: float = 10.0, management: bool = False, name: str = "") -> str:
        store = await open_store(store_url)
        try:
            t = await store.ensure_team(team)
            kid, key = generate_key()
            scopes = (SCOPE_INFERENCE, SCOPE_MANAGEMENT) if management else (SCOPE_INFERENCE,)
            secret = split_key(key)[1]  # type: ignore[index]
            await store.create_key(team_id=t.id, kid=kid, secret_hash=hash_secret(secret), name=name, scopes=scopes)
            if credit_usd:
                await store.add_credit(t.id, int(credit_usd * NANOS_PER_USD))
            return key
        finally:
            await store.close()

    return make


@pytest.fixture
async def gateway(aiohttp_client, config: GatewayConfig) -> TestClient:
    return await aiohttp_client(build_app(config))


@pytest.fixture
async def key(make_key: MakeKey) -> str:
    return await make_key()


async def stored_key(store_url: str, kid: str) -> KeyRecord:
    """The key's record as the store has it now."""
    store = await open_store(store_url)
    try:
        record = await store.get_key(kid)
    finally:
        await store.close()
    assert record is not None
    return record


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL cluster for the session (skipped without the server binaries, except in CI)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        why = "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and there are {why}: install the `postgresql` package (see .ci/run)")
        pytest.skip(why)
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A new, empty database on the session's server: `postgresql://postgres:PASSWORD@127.0.0.1:PORT/test_N`."""
    return pg_server.create_database()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis for the session (skipped without `redis-server`, except in CI); a test may stop it."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running (started again if a test stopped it). Tests keep their keys apart with a
    `rate_limits.key_prefix` of their own."""
    if redis_server.process is None:
        redis_server.start()
    return redis_server.url


# ---------------------------------------------------------------------------------------------------------
# an Anthropic and a Gemini mock beside the OpenAI one, and a gateway on all three (translation tests)


@dataclass
class Claude:
    url: str
    control: AnthropicControl


@pytest.fixture
async def claude(aiohttp_server) -> Claude:
    control = AnthropicControl()
    server = await aiohttp_server(build_anthropic_mock(control), host="127.0.0.1")
    return Claude(url=str(server.make_url("")).rstrip("/"), control=control)


@dataclass
class Gemini:
    url: str
    control: GeminiControl


@pytest.fixture
async def gemini(aiohttp_server) -> Gemini:
    control = GeminiControl()
    server = await aiohttp_server(build_gemini_mock(control), host="127.0.0.1")
    return Gemini(url=str(server.make_url("")).rstrip("/"), control=control)


@pytest.fixture
async def gw(aiohttp_client, mock: Mock, claude: Claude, gemini: Gemini, store_url: str) -> TestClient:
    env = env_for(
        mock,
        store_url,
        ANTHROPIC_BASE_URL=claude.url,
        ANTHROPIC_API_KEY="sk-ant-secret",
        GEMINI_BASE_URL=gemini.url,
        GEMINI_API_KEY="gem-secret",
    )
    return await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))


@pytest.fixture
async def ant(gw: TestClient, key: str):
    sdk = anthropic.AsyncAnthropic(base_url=str(gw.make_url("")), api_key=key, max_retries=0, timeout=10)
    yield sdk
    await sdk.close()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store of each backend (the Postgres server starts only for the first test that needs it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    """An open store of each backend (`url`)."""
    opened = await open_store(url)
    try:
        yield opened
    finally:
        await opened.close()
