"""A small TTL cache for what the hot path reads from the store (keys, balances).

`fresh(key)` is a plain dictionary look-up. On a miss, `load(key)` runs the loader in a task of its own,
one at a time per key: concurrent misses share it, and a waiter's cancellation (a client that went
away) never cancels the load the others wait for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar, final

K = TypeVar("K")
V = TypeVar("V")


@final
class Missing:
    """The type of MISSING: what `fresh` answers for an absent or expired entry."""

    __slots__ = ()


MISSING: Final = Missing()


@final
class TTLCache(Generic[K, V]):
    __slots__ = ("_entries", "_loader", "_pending", "max_entries", "ttl")

    def __init__(self, loader: Callable[[K], Awaitable[V]], ttl: float, max_entries: int = 50_000):
        self._loader = loader
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[K, tuple[V, float]] = {}
        self._pending: dict[K, asyncio.Task[V]] = {}

    def fresh(self, key: K) -> V | Missing:
        """The cached value if it has not expired, else MISSING."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        return MISSING

    async def load(self, key: K) -> V:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key))
            task.add_done_callback(_retrieve)
            self._pending[key] = task
        return await asyncio.shield(task)

    async def _fetch(self, key: K) -> V:
        try:
            value = await self._loader(key)
        finally:
            del self._pending[key]
        if len(self._entries) >= self.max_entries:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[key] = (value, time.monotonic() + self.ttl)
        return value

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    def update(self, key: K, change: Callable[[V], V]) -> None:
        """Apply `change` to a cached value in place (its expiry unchanged); nothing if not cached."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (change(entry[0]), entry[1])


def _retrieve(task: asyncio.Task) -> None:
    """Mark a load's exception as seen even when every waiter has gone."""
    if not task.cancelled():
        task.exception()
