"""TTLCache: one load per key at a time, loads that outlive a cancelled waiter, stale-while-revalidate, stale
values served while the store fails (up to `stale_s`, one warning), expiry, errors not kept; and a key revoked
through one gateway is refused by another sharing the store within the documented bound."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy import cache as cache_module
from proxy.app import build_app
from proxy.auth import generate_key, hash_secret, split_key
from proxy.cache import Missing, TTLCache
from proxy.config import load_config
from proxy.store import open_store
from proxy.store.base import SCOPE_INFERENCE, SCOPE_MANAGEMENT
from tests.conftest import DEFAULT_CONFIG, auth, env_for


class Loader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.fail = False
        self.version = 0  # bumped by a test: what the store holds now

    async def __call__(self, key: str) -> str:
        self.calls.append(key)
        await self.release.wait()
        if self.fail:
            raise RuntimeError("store down")
        return f"{key.upper()}{self.version or ''}"


class Clock:
    """A stand-in for the `time` module inside proxy.cache only (asyncio keeps the real clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(cache_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


async def settle() -> None:
    """Let background refreshes run to their end (the loader answers at once once released)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_misses_share_one_load():
    loader = Loader()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=60)
    waiters = [asyncio.create_task(cache.load("a")) for _ in range(20)]
    await asyncio.sleep(0)
    loader.release.set()
    assert await asyncio.gather(*waiters) == ["A"] * 20
    assert loader.calls == ["a"]
    assert cache.get("a") == "A"


async def test_a_cancelled_waiter_does_not_cancel_the_load():
    loader = Loader()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=60)
    first = asyncio.create_task(cache.load("k"))
    second = asyncio.create_task(cache.load("k"))
    await asyncio.sleep(0)
    first.cancel()
    loader.release.set()
    assert await second == "K"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert loader.calls == ["k"]


async def test_ttl_zero_caches_nothing_and_errors_are_not_kept():
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=0)  # every request reads the store
    assert await cache.load("x") == "X"
    assert isinstance(cache.get("x"), Missing)
    loader.fail = True
    with pytest.raises(RuntimeError):
        await cache.load("x")  # stale_s 0: no fallback
    loader.fail = False
    assert await cache.load("x") == "X"
    assert loader.calls == ["x", "x", "x"]


async def test_ttl_zero_falls_back_to_the_last_value_only_when_the_store_fails(clock: Clock):
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=0, stale_s=30)
    assert await cache.load("x") == "X"
    loader.version = 2
    assert isinstance(cache.get("x"), Missing)  # no stale-while-revalidate without a TTL: changes seen at once
    assert await cache.load("x") == "X2"
    loader.fail = True
    clock.now += 29
    assert await cache.load("x") == "X2"
    clock.now += 2
    with pytest.raises(RuntimeError):
        await cache.load("x")


async def test_an_expired_entry_is_served_at_once_while_one_refresh_runs(clock: Clock):
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=5, stale_s=300)
    assert await cache.load("k") == "K"
    loader.release.clear()  # the store is slow from now on
    loader.version = 2
    clock.now += 4.9
    assert cache.get("k") == "K"
    assert loader.calls == ["k"]  # fresh: no refresh
    clock.now += 0.2
    assert [cache.get("k") for _ in range(50)] == ["K"] * 50  # expired: the old value, no waiting ...
    await settle()
    assert loader.calls == ["k", "k"]  # ... and one refresh for all of them
    waiter = asyncio.create_task(cache.load("k"))  # a miss (after a forget, say) shares the refresh in flight
    loader.release.set()
    assert await waiter == "K2"
    assert cache.get("k") == "K2"
    assert loader.calls == ["k", "k"]


async def test_a_failing_store_serves_the_last_value_until_stale_s(clock: Clock, caplog: pytest.LogCaptureFixture):
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=5, stale_s=60, name="key")
    assert await cache.load("k") == "K"
    loader.fail = True
    caplog.set_level(logging.INFO, logger="proxy.cache")
    for _ in range(40):  # 40 s of requests, one every second: one warning, a refresh tried about each second
        clock.now += 1
        assert cache.get("k") == "K"
        await settle()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "key k" in warnings[0].getMessage() and "store down" in warnings[0].getMessage()
    assert 30 <= len(loader.calls) <= 37  # the first refresh at 5 s, then one per RETRY_S at most
    calls = len(loader.calls)
    assert [cache.get("k") for _ in range(100)] == ["K"] * 100
    await settle()
    assert len(loader.calls) == calls  # many requests in one instant: no new refresh before RETRY_S

    clock.now += 20  # 60 s old: too old to serve; the miss path waits for the store, and gets its error
    assert isinstance(cache.get("k"), Missing)
    with pytest.raises(RuntimeError):
        await cache.load("k")

    loader.fail = False
    loader.version = 3
    assert await cache.load("k") == "K3"
    assert any("read from the store again" in r.getMessage() for r in caplog.records)
    loader.fail = True
    clock.now += 6
    assert cache.get("k") == "K3"
    await settle()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2  # a new outage: warned again


async def test_stale_s_zero_never_serves_past_the_ttl(clock: Clock):
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=5, stale_s=0)
    await cache.load("k")
    clock.now += 5
    assert isinstance(cache.get("k"), Missing)
    loader.fail = True
    with pytest.raises(RuntimeError):
        await cache.load("k")


async def test_update_changes_a_cached_value_only_fresh_or_stale(clock: Clock):
    loads = 0

    async def balance(key: str) -> int:
        nonlocal loads
        loads += 1
        if loads > 1:
            raise RuntimeError("store down")
        return 10

    cache: TTLCache[str, int] = TTLCache(balance, ttl=5, stale_s=300)
    cache.update("t", lambda v: v - 3)  # not cached: nothing happens
    assert isinstance(cache.get("t"), Missing)
    await cache.load("t")
    cache.update("t", lambda v: v - 3)
    assert cache.get("t") == 7
    clock.now += 10
    assert cache.get("t") == 7  # stale; its refresh fails
    await settle()
    cache.update("t", lambda v: v - 3)  # debits go on while the store is down
    assert cache.get("t") == 4


async def test_forget_drops_an_entry_and_the_refresh_in_flight(clock: Clock):
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=5, stale_s=300)
    await cache.load("k")
    loader.release.clear()
    clock.now += 6
    assert cache.get("k") == "K"  # a refresh starts, reading what the store holds now ...
    await settle()
    cache.forget("k")  # ... and the key changes here (a management API call)
    loader.version = 2
    loader.release.set()
    await settle()
    assert isinstance(cache.get("k"), Missing)  # the old read is not cached
    assert await cache.load("k") == "K2"


async def test_size_is_bounded():
    cache: TTLCache[int, int] = TTLCache(lambda k: asyncio.sleep(0, result=k), ttl=60, max_entries=10)
    for k in range(25):
        await cache.load(k)
    assert sum(not isinstance(cache.get(k), Missing) for k in range(25)) <= 10


# --- two gateways on one store ---------------------------------------------------------------------------

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TTL_S = 0.5


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    return request.getfixturevalue("pg_url")


async def _keys(url: str) -> tuple[str, str]:
    """An inference key and a management key of one team with credit."""
    store = await open_store(url)
    try:
        team = await store.ensure_team("acme")
        await store.add_credit(team.id, 10_000_000_000)
        made = []
        for scopes in ((SCOPE_INFERENCE,), (SCOPE_INFERENCE, SCOPE_MANAGEMENT)):
            kid, key = generate_key()
            secret = split_key(key)[1]  # type: ignore[index]
            await store.create_key(team_id=team.id, kid=kid, secret_hash=hash_secret(secret), name="", scopes=scopes)
            made.append(key)
        return made[0], made[1]
    finally:
        await store.close()


async def test_a_key_revoked_through_one_gateway_is_refused_by_another_within_the_bound(
    aiohttp_client, mock, shared_store: str, tmp_path: Path
):
    key, admin = await _keys(shared_store)
    clients = []
    for _ in range(2):
        config = load_config(DEFAULT_CONFIG, env=env_for(mock, shared_store))
        config.auth.cache_ttl_s = TTL_S
        clients.append(await aiohttp_client(build_app(config)))
    one, other = clients
    for gateway in clients:  # both have the key cached
        assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200

    kid = split_key(key)[0]  # type: ignore[index]
    r = await one.delete(f"/v1/keys/{kid}", headers=auth(admin))
    assert r.status == 200, await r.text()
    revoked = time.monotonic()
    assert (await one.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 401  # at once here

    # Elsewhere: within cache_ttl_s + one store round trip (the first request after expiry still passes on
    # the stale record while the refresh runs). Poll with a deadline well past the bound.
    while True:
        status = (await other.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status
        if status == 401:
            break
        assert status == 200
        assert time.monotonic() - revoked < TTL_S + 5, "the other gateway never refused the revoked key"
        await asyncio.sleep(0.02)
    assert time.monotonic() - revoked < TTL_S + 1.0  # the bound, with room for a slow machine
