"""Stores: pick a backend by URL."""

from __future__ import annotations

from proxy.store.base import KeyRecord, Store, StoreError, Team, redact_url

__all__ = ["KeyRecord", "Store", "StoreError", "Team", "open_store", "redact_url"]

SCHEMES = "sqlite:///path or postgresql://user:password@host:5432/database (also postgres://)"


async def open_store(url: str, *, pool_min: int = 1, pool_max: int = 4) -> Store:
    """Open (and migrate) the store that `url` names. The pool sizes are Postgres's (per process)."""
    # Each backend is imported when it is used: the accounting writer process loads only its own.
    store: Store
    if url.startswith("sqlite://"):
        from proxy.store.sqlite import SqliteStore

        store = SqliteStore(url)
    elif url.startswith(("postgresql://", "postgres://")):
        from proxy.store.postgres import PostgresStore

        store = PostgresStore(url, pool_min=pool_min, pool_max=pool_max)
    else:
        raise StoreError(f"unsupported store URL {redact_url(url)!r}: expected {SCHEMES}")
    await store.open()
    return store
