"""TTLCache: one load per key at a time, loads that outlive a cancelled waiter, expiry, errors not kept."""

from __future__ import annotations

import asyncio

import pytest

from proxy.cache import Missing, TTLCache


class Loader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, key: str) -> str:
        self.calls.append(key)
        await self.release.wait()
        if self.fail:
            raise RuntimeError("store down")
        return key.upper()


async def test_concurrent_misses_share_one_load():
    loader = Loader()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=60)
    waiters = [asyncio.create_task(cache.load("a")) for _ in range(20)]
    await asyncio.sleep(0)
    loader.release.set()
    assert await asyncio.gather(*waiters) == ["A"] * 20
    assert loader.calls == ["a"]
    assert cache.fresh("a") == "A"


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


async def test_expired_entries_reload_and_errors_are_not_kept():
    loader = Loader()
    loader.release.set()
    cache: TTLCache[str, str] = TTLCache(loader, ttl=0)  # every entry is expired at once
    assert await cache.load("x") == "X"
    assert isinstance(cache.fresh("x"), Missing)
    loader.fail = True
    with pytest.raises(RuntimeError):
        await cache.load("x")
    loader.fail = False
    assert await cache.load("x") == "X"
    assert loader.calls == ["x", "x", "x"]


async def test_update_changes_a_cached_value_only():
    cache: TTLCache[str, int] = TTLCache(lambda k: asyncio.sleep(0, result=10), ttl=60)
    cache.update("t", lambda v: v - 3)  # not cached: nothing happens
    assert isinstance(cache.fresh("t"), Missing)
    await cache.load("t")
    cache.update("t", lambda v: v - 3)
    assert cache.fresh("t") == 7


async def test_size_is_bounded():
    cache: TTLCache[int, int] = TTLCache(lambda k: asyncio.sleep(0, result=k), ttl=60, max_entries=10)
    for k in range(25):
        await cache.load(k)
    assert sum(not isinstance(cache.fresh(k), Missing) for k in range(25)) <= 10
