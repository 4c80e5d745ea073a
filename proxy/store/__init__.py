"""Stores: pick a backend by URL."""

from __future__ import annotations

from proxy.store.base import KeyRecord, Store, StoreError, Team
from proxy.store.sqlite import SqliteStore

__all__ = ["KeyRecord", "Store", "StoreError", "Team", "open_store"]


async def open_store(url: str) -> Store:
    """Open (and migrate) the store that `url` names."""
    if url.startswith("sqlite://"):
        store = SqliteStore(url)
    else:
        raise StoreError(f"unsupported store URL {url!r}: expected sqlite:///path")
    await store.open()
    return store
