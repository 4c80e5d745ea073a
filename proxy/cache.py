"""A small TTL cache for what the hot path reads from the store (keys, balances, spend).

`get(key)` never waits for the store. A fresh entry is a dictionary look-up. An expired one is answered
at once from its old value while one background task refreshes it (stale-while-revalidate). Only a key
never seen, or one too old to serve, returns MISSING and goes through `load(key)`: the loader runs in a
task of its own, one at a time per key, so concurrent misses and a refresh share it, and a waiter's
cancellation (a client that went away) never cancels the load the others wait for.

When the loader fails, the last value is served until it is `stale_s` old, counted from when the store
last answered for it (a WARNING is logged once per entry when that starts); after that, requests wait for
the store again and get the loader's error. `stale_s = 0` never serves a value past its TTL. `ttl = 0`
caches nothing: every `get` misses and every request reads the store, falling back to the last value
(within `stale_s`) only when that read fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar, final

K = TypeVar("K")
V = TypeVar("V")

log = logging.getLogger("proxy.cache")

RETRY_S = 1.0  # after a failed refresh, the next starts no sooner than this (one per entry in flight anyway)


@final
class Missing:
    """The type of MISSING: what `get` answers when the caller must wait for the store."""

    __slots__ = ()


MISSING: Final = Missing()


@final
class _Entry(Generic[V]):
    __slots__ = ("failing", "loaded", "retry_at", "value")

    def __init__(self, value: V, loaded: float):
        self.value = value
        self.loaded = loaded  # time.monotonic() when the store last answered for it
        self.retry_at = 0.0  # no refresh starts before this (set by a failed one)
        self.failing = False  # served stale because the store failed: logged once


@final
class TTLCache(Generic[K, V]):
    __slots__ = ("_entries", "_loader", "_pending", "max_entries", "name", "stale_s", "ttl")

    def __init__(
        self,
        loader: Callable[[K], Awaitable[V]],
        ttl: float,
        *,
        stale_s: float = 0.0,
        max_entries: int = 50_000,
        name: str = "entry",
    ):
        self._loader = loader
        self.ttl = ttl
        self.stale_s = stale_s
        self.max_entries = max_entries
        self.name = name  # what an entry is, for the log: "key", "team balance"
        self._entries: dict[K, _Entry[V]] = {}
        self._pending: dict[K, asyncio.Task[V]] = {}

    def get(self, key: K) -> V | Missing:
        """The cached value, fresh or (while a refresh runs or after one failed) stale; MISSING when the
        caller must `load` it: never seen, not cached (ttl 0), or older than `stale_s`."""
        entry = self._entries.get(key)
        if entry is None:
            return MISSING
        now = time.monotonic()
        age = now - entry.loaded
        if age < self.ttl:
            return entry.value
        if age >= self.stale_s or not self.ttl:
            return MISSING
        if now >= entry.retry_at and key not in self._pending:
            self._start(key)
        return entry.value

    async def load(self, key: K) -> V:
        """Wait for the store's value (one load per key at a time); if it fails, the last value while it
        is younger than `stale_s`, else the loader's error."""
        task = self._pending.get(key) or self._start(key)
        try:
            return await asyncio.shield(task)
        except Exception:
            entry = self._entries.get(key)
            if entry is None or time.monotonic() - entry.loaded >= self.stale_s:
                raise
            return entry.value

    def _start(self, key: K) -> asyncio.Task[V]:
        task = asyncio.get_running_loop().create_task(self._fetch(key))
        task.add_done_callback(_retrieve)
        self._pending[key] = task
        return task

    async def _fetch(self, key: K) -> V:
        me = asyncio.current_task()
        try:
            value = await self._loader(key)
        except Exception as e:
            if self._release(key, me):
                self._failed(key, e)
            raise
        except BaseException:
            self._release(key, me)
            raise
        if self._release(key, me):
            self._put(key, value)
        return value

    def _release(self, key: K, task: asyncio.Task | None) -> bool:
        """Whether `task` was still the key's load (the key was not forgotten meanwhile); it is no more."""
        if self._pending.get(key) is task:
            del self._pending[key]
            return True
        return False

    def _put(self, key: K, value: V) -> None:
        old = self._entries.get(key)
        if old is None and len(self._entries) >= self.max_entries:
            self._evict()
        elif old is not None and old.failing:
            log.info("%s %s: read from the store again", self.name, key)
        self._entries[key] = _Entry(value, time.monotonic())

    def _failed(self, key: K, error: Exception) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        now = time.monotonic()
        entry.retry_at = now + RETRY_S
        age = now - entry.loaded
        if not entry.failing and age < self.stale_s:
            entry.failing = True
            log.warning(
                "%s %s: the store cannot be read (%s); serving the value read %.1f s ago until it is %g s old",
                self.name,
                key,
                error,
                age,
                self.stale_s,
            )

    def _evict(self) -> None:
        """Make room: drop what can no longer be served; everything, if that is not enough."""
        oldest = time.monotonic() - max(self.ttl, self.stale_s)
        self._entries = {k: e for k, e in self._entries.items() if e.loaded > oldest}
        if len(self._entries) >= self.max_entries:
            self._entries.clear()

    def forget(self, key: K) -> None:
        """Drop an entry (it changed in the store): the next `get` misses. A load in flight for it is no
        longer cached when it ends (it may have read the old value)."""
        self._entries.pop(key, None)
        self._pending.pop(key, None)

    def update(self, key: K, change: Callable[[V], V]) -> None:
        """Apply `change` to a cached value in place, fresh or stale (its age unchanged); nothing if absent."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.value = change(entry.value)


def _retrieve(task: asyncio.Task) -> None:
    """Mark a load's exception as seen even when every waiter has gone."""
    if not task.cancelled():
        task.exception()
