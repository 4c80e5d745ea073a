"""The response cache: an identical request answered from a stored answer instead of the provider.

What makes two requests identical (`Lookup.key`): the team (unless `cache.scope: global`), the surface, the
resolved model id and the body canonicalised: JSON with sorted members, integral floats as integers, and
without what does not change the answer (`stream`, `stream_options`, `user`, `metadata`, `model` and the
gateway's own members). So a streamed and a non-streamed request for the same thing share one entry.

An entry keeps the answer in the neutral form (`proxy.translators.neutral`) with its usage and what it cost,
so it is replayed in the surface's shape, as JSON or as a stream, whichever way it was first produced.
Embeddings keep their JSON as it came.

Where: an LRU of each worker, bounded in bytes; with `cache.url`, Redis behind it, shared by every worker and
instance (entries compressed above `compress_above`). Redis down or slow is a miss (one WARNING per outage, an
INFO when it is back, `gateway_cache_errors_total`), never a failed request.

Identical requests that arrive while the first is in flight wait for its answer (single-flight, per worker,
at most `cache.wait_s`); if it fails, they go on their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, final

import msgspec
import orjson

from proxy.meta import Usage
from proxy.redis_link import RedisDown, RedisLink
from proxy.translators.neutral import ChatResponse
from proxy.translators.openai import GATEWAY_FIELDS

if TYPE_CHECKING:
    from proxy.config import CacheConfig
    from proxy.store.base import KeyRecord

log = logging.getLogger("proxy.cache")

SURFACES: Final = frozenset({"openai.chat", "openai.responses", "anthropic.messages", "openai.embeddings"})
RAW: Final = frozenset({"openai.embeddings"})  # kept as their JSON: no neutral form, never streamed
# Members that do not change the answer (or say how it is delivered): out of the key.
_IGNORED: Final = frozenset({"model", "stream", "stream_options", "user", "metadata", *GATEWAY_FIELDS})
# Requests whose answers the cache does not keep: several samples (`n` > 1: each request asks for fresh
# ones); token log-probabilities, audio, extended thinking (its blocks' signatures) and Responses' `include`
# (encrypted reasoning), which the neutral form does not carry; and stateful Responses.
_UNCACHEABLE: Final = ("logprobs", "top_logprobs", "audio", "modalities", "prediction", "thinking", "include",
                       "background", "previous_response_id", "conversation", "prompt")  # fmt: skip
_HEADER: Final = "x-gateway-cache"  # on | off: this request, whatever its key says
_TTL_HEADER: Final = "x-gateway-cache-ttl"  # seconds an answer stored by this request lives (≤ max_ttl_s)
_RETRY_S: Final = 5.0  # while Redis is down, how often it is tried again
_DIGESTS: Final = 8192  # request bodies whose key is remembered


NEUTRAL: Final = 0  # `answer` holds it
JSON: Final = 1  # `raw` is the answer's JSON in the surface's shape, as the provider sent it (no gateway members)
EVENTS: Final = 2  # `raw` is the stream the client got (read into neutral form when first replayed otherwise)


class Entry(msgspec.Struct, array_like=True, dict=True):
    """A stored answer, in the form it was cheapest to keep when it was made (`form`); a hit turns it into
    what it needs once, and its `__dict__` keeps that (and answers already rendered): never stored."""

    created_ms: int
    expires_ms: int
    usage: Usage | None
    cost_nanos: int  # what the answer cost when it was made
    provider: str
    upstream_model: str
    form: int
    answer: ChatResponse | None = None
    raw: bytes = b""

    def age_s(self, now_ms: int) -> float:
        return max(now_ms - self.created_ms, 0) / 1000


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


@final
class Lookup:
    """One request's dealings with the cache: whether it may read and write, its key, and its outcome."""

    __slots__ = ("age_s", "key", "max_age_s", "owner", "read", "status", "store", "ttl_s", "waiters")

    def __init__(self, owner: ResponseCache, key: str, read: bool, store: bool, max_age_s: float | None, ttl_s: float):
        self.owner = owner
        self.key = key
        self.read = read
        self.store = store
        self.max_age_s = max_age_s
        self.ttl_s = ttl_s
        self.status = "BYPASS" if not read and not store else "MISS"
        self.age_s = 0.0
        self.waiters: asyncio.Future[Entry | None] | None = None  # set when this request leads a single flight

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status.lower(), "age_s": round(self.age_s, 3), "key": self.key[:16]}


def canonical(body: bytes) -> bytes | None:
    """The request's members that make its answer, as canonical JSON; None when its answer is not kept."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    n = data.get("n")
    if (n is not None and n != 1) or any(data.get(name) not in (None, False) for name in _UNCACHEABLE):
        return None
    tools = data.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type", "function") != "function" for t in tools):
        return None  # a provider's built-in tools (web search, …) answer with items the neutral form drops
    kept = {name: _normal(value) for name, value in data.items() if name not in _IGNORED}
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


def _normal(value: Any) -> Any:
    """Integral floats as integers (`1.0` and `1` ask for the same), through lists and objects."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {name: _normal(member) for name, member in value.items()}
    if isinstance(value, list):
        return [_normal(item) for item in value]
    return value


@final
class _Lru:
    """Entries by key, least recently used first, bounded in bytes."""

    __slots__ = ("_entries", "bytes", "limit")

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()

    def get(self, key: str, now_ms: int) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry = found[0]
        if entry.expires_ms <= now_ms:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, size: int) -> None:
        if size > self.limit:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (entry, size)
        self.bytes += size
        while self.bytes > self.limit:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, size = self._entries.pop(key)
        self.bytes -= size

    def __len__(self) -> int:
        return len(self._entries)


@final
class ResponseCache:
    """The configured cache: who it is on for, its key for a request, and its stores."""

    __slots__ = (
        "_digests",
        "_flights",
        "_lru",
        "_redis",
        "_tasks",
        "config",
        "requests",
        "saved",
    )

    def __init__(self, config: CacheConfig, requests: Any = None, saved: Any = None, errors: Any = None):
        self.config = config
        self.requests = requests  # gateway_cache_requests_total{result}
        self.saved = saved  # gateway_cache_saved_usd_total
        self._lru = _Lru(config.max_bytes)
        self._digests: dict[bytes, str] = {}  # sha256 of (scope, surface, model, body) → its key ("": not kept)
        self._flights: dict[str, asyncio.Future[Entry | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._redis: RedisLink | None = None
        if config.url:  # `gateway_cache_errors_total{op}` counts its failures
            meanwhile = "the cache is this worker's own"
            self._redis = RedisLink(config.url, config.timeout_ms / 1000, "cache.url", meanwhile, _RETRY_S, log, errors)

    def on_for(self, key: KeyRecord) -> bool:
        """Whether `key`'s requests use the cache unless they say otherwise: its own setting, else its team's,
        else the default."""
        own = getattr(key, "cache", None)
        if own is not None:
            return bool(own)
        return self.config.teams.get(key.team_name, self.config.enabled)

    def lookup(
        self, headers: Mapping[str, str], key: KeyRecord, surface: str, model: str, body: bytes
    ) -> Lookup | None:
        """How this request deals with the cache; None when the cache is not on for it at all."""
        asked = headers.get(_HEADER)
        if asked is not None:
            asked = asked.strip().lower()
            if asked == "off" or (asked != "on" and not self.on_for(key)):
                return None
        elif not self.on_for(key):
            return None
        read = store = True
        max_age = None
        control = headers.get("cache-control")
        if control:
            directives = {d.strip().partition("=")[0].lower(): d.partition("=")[2] for d in control.split(",")}
            read, store = "no-cache" not in directives and "no-store" not in directives, "no-store" not in directives
            max_age = _seconds(directives.get("max-age"))
            if not store:
                return self.bypass()
        asked_ttl = headers.get(_TTL_HEADER)
        ttl = min(_seconds(asked_ttl) or self.config.ttl_s, self.config.max_ttl_s) if asked_ttl else self.config.ttl_s
        scope = key.team_id if self.config.scope == "team" else "*"
        prefix = f"{scope}\0{surface}\0{model}\0".encode()
        # The same bytes make the same key: remembered, so that repeated requests skip canonicalising.
        exact = hashlib.sha256(prefix + body).digest()
        digest = self._digests.get(exact)
        if digest is None:
            canon = canonical(body)
            digest = "" if canon is None else hashlib.sha256(prefix + canon).hexdigest()
            if len(self._digests) >= _DIGESTS:
                self._digests.clear()
            self._digests[exact] = digest
        if not digest:
            return self.bypass()
        return Lookup(self, digest, read, store, max_age, ttl)

    def bypass(self) -> Lookup:
        """A request the cache is on for but that it neither reads nor keeps."""
        return Lookup(self, "", False, False, None, 0)

    # -- reading

    async def get(self, lookup: Lookup) -> Entry | None:
        """The entry for `lookup`, fresh enough for it (its max-age), from this worker or Redis; None: a miss."""
        now_ms = int(time.time() * 1000)
        entry = self._lru.get(lookup.key, now_ms)
        if entry is None and self._redis is not None:
            entry = await self._redis_get(lookup.key, now_ms)
        if entry is not None and lookup.max_age_s is not None and entry.age_s(now_ms) > lookup.max_age_s:
            return None
        if entry is not None:
            lookup.status, lookup.age_s = "HIT", entry.age_s(now_ms)
        return entry

    async def join(self, lookup: Lookup) -> Entry | None:
        """An identical request is in flight: its entry, once it has one (None when it failed, or after
        `wait_s`). None at once when there is none: this request leads, and `finish` tells the others."""
        flight = self._flights.get(lookup.key)
        if flight is None:
            lookup.waiters = self._flights[lookup.key] = asyncio.get_running_loop().create_future()
            return None
        try:
            entry = await asyncio.wait_for(asyncio.shield(flight), self.config.wait_s)
        except TimeoutError:
            return None
        if entry is not None:
            lookup.status, lookup.age_s = "HIT", entry.age_s(int(time.time() * 1000))
        return entry

    # -- writing

    def finish(self, lookup: Lookup, entry: Entry | None) -> None:
        """The request that `lookup` is ends: store its entry (None: nothing to keep) and wake its waiters."""
        if entry is not None and lookup.store:
            self.put(lookup.key, entry)
        flight = lookup.waiters
        if flight is not None:
            lookup.waiters = None
            if self._flights.get(lookup.key) is flight:
                del self._flights[lookup.key]
            if not flight.done():
                flight.set_result(entry)

    def entry(self, lookup: Lookup, usage: Usage | None, cost: int, provider: str, upstream_model: str, form: int,
              answer: ChatResponse | None = None, raw: bytes = b"") -> Entry:  # fmt: skip
        now_ms = int(time.time() * 1000)
        expires = now_ms + int(lookup.ttl_s * 1000)
        return Entry(now_ms, expires, usage, cost, provider, upstream_model, form, answer, raw)

    def put(self, key: str, entry: Entry) -> None:
        # Kept as made: its bytes (and a bound for the rest) are its size; encoded only for Redis.
        data = _encode(entry) if entry.form == NEUTRAL or self._redis is not None else b""
        size = len(data) or len(entry.raw) + 512
        if size > self.config.max_entry_bytes:
            return
        self._lru.put(key, entry, size + len(key) + 200)  # plus what the objects around it take
        if self._redis is not None:
            task = asyncio.get_running_loop().create_task(self._redis_put(key, entry, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def end(self, lookup: Lookup, surface: str, saved_nanos: int) -> None:
        """The request ends: release any request waiting for its answer (that it did not make) and count it."""
        if lookup.waiters is not None:
            self.finish(lookup, None)
        if self.requests is not None:
            self.requests.labels(lookup.status.lower()).inc()
        if saved_nanos and self.saved is not None:
            self.saved.labels(surface).inc(saved_nanos / 1_000_000_000)

    # -- Redis

    async def _redis_get(self, key: str, now_ms: int) -> Entry | None:
        data = await self._redis_call("GET", self.config.key_prefix + key)
        if not data:
            return None
        try:
            entry = _decode(zlib.decompress(data[1:]) if data[:1] == b"z" else data[1:])
        except (msgspec.DecodeError, zlib.error):
            return None  # another version's entry, or garbage: a miss
        if entry.expires_ms <= now_ms:
            return None
        self._lru.put(key, entry, len(data) + len(key) + 200)
        return entry

    async def _redis_put(self, key: str, entry: Entry, data: bytes) -> None:
        value = b"z" + zlib.compress(data, 1) if len(data) > self.config.compress_above else b"r" + data
        ttl_ms = max(entry.expires_ms - int(time.time() * 1000), 1)
        await self._redis_call("SET", self.config.key_prefix + key, value, "PX", ttl_ms)

    async def _redis_call(self, *command: Any) -> Any:
        """The command's answer; None when Redis is down or fails (a miss, or an entry not kept)."""
        assert self._redis is not None
        try:
            return await self._redis.call(lambda client: client.execute_command(*command), command[0].lower())
        except RedisDown:
            return None

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if self._redis is not None:
            await self._redis.close()


def _seconds(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text.strip().strip('"'))
    except ValueError:
        return None
    return value if value >= 0 else None
