"""API keys: format, hashing, and the cached key → team lookup on the hot path.

A key reads `aistats_v1_sk_<kid>_<secret>`. Only `sha256(secret)` is stored; verification compares
digests in constant time. Lookups are cached per kid for `auth.cache_ttl_s`, so a request with a
known key does no database round trip. An expired entry still answers while it is refreshed in the
background, so a key revoked elsewhere stops working within that TTL plus one store round trip (or, while
the store cannot be read, once the cached record is `auth.stale_s` old).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final, final

from proxy.cache import Missing, TTLCache
from proxy.errors import Code, GatewayError
from proxy.store.base import ACTIVE, KeyRecord, Store, StoreError

KEY_PREFIX: Final = "aistats_v1_sk_"


def generate_key() -> tuple[str, str]:
    """A new (kid, full key). The kid is public; the rest of the key is the secret."""
    kid = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return kid, f"{KEY_PREFIX}{kid}_{secret}"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_key(token: str) -> tuple[str, str] | None:
    """(kid, secret) of a well-formed key, else None."""
    # Keys are ASCII. A header with other bytes arrives decoded with surrogate escapes, which neither
    # the store nor the hash could encode: such a token is simply not a key.
    if not token.startswith(KEY_PREFIX) or not token.isascii():
        return None
    kid, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not kid or len(secret) < 16:
        return None
    return kid, secret


def token_from_headers(headers) -> str | None:
    """The key from `Authorization: Bearer …`, or from `x-api-key` (Anthropic-style clients)."""
    value = headers.get("Authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer":
            return token.strip() or None
        return value  # another scheme: refused as an invalid key, not reported as missing
    return headers.get("x-api-key") or None


_INVALID = "Invalid API key. Send `Authorization: Bearer aistats_v1_sk_…` with a key from `stats-gateway keys create`."


@final
class KeyCache:
    """kid → KeyRecord (or None for an unknown kid), each entry fresh for `ttl` seconds and served stale
    for up to `stale_s` while the store cannot be read."""

    __slots__ = ("_cache", "store")

    def __init__(self, store: Store, ttl: float, stale_s: float = 0.0):
        self.store = store
        self._cache: TTLCache[str, KeyRecord | None] = TTLCache(self._fetch, ttl, stale_s=stale_s, name="key")

    async def authenticate(self, token: str | None) -> KeyRecord:
        """The active key `token` names; `GatewayError(invalid_api_key)` otherwise."""
        if not token:
            raise GatewayError(Code.invalid_api_key, "Missing API key. " + _INVALID.partition(". ")[2])
        parts = split_key(token)
        if parts is None:
            raise GatewayError(Code.invalid_api_key, _INVALID)
        kid, secret = parts
        record = await self.record(kid)
        if record is None or not hmac.compare_digest(record.secret_hash, hash_secret(secret)):
            raise GatewayError(Code.invalid_api_key, _INVALID)
        if record.status != ACTIVE:
            raise GatewayError(Code.invalid_api_key, f"This API key ({kid}) is {record.status}.")
        return record

    async def record(self, kid: str) -> KeyRecord | None:
        """The key `kid` names as the cache has it (read from the store when not cached), whatever its status."""
        record = self._cache.get(kid)
        if isinstance(record, Missing):
            record = await self._cache.load(kid)
        return record

    def forget(self, kid: str) -> None:
        """Drop a cached key (after it changed here), so the next request reads the store."""
        self._cache.forget(kid)

    async def _fetch(self, kid: str) -> KeyRecord | None:
        try:
            return await self.store.get_key(kid)
        except StoreError as e:
            raise GatewayError(Code.unavailable, "The key store is unavailable; retry shortly.") from e
