"""Pooled HTTP clients, one per provider, with its credentials, headers and timeouts prepared once."""

from __future__ import annotations

import asyncio
from typing import final

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.config import ProviderConfig
from proxy.errors import Code, GatewayError
from proxy.translators import suno
from proxy.translators.exchange import PROVIDERS

# Credential headers of the provider kinds that serve job surfaces only (no chat translator).
_JOB_KIND_AUTH = {"suno": suno.auth_headers}


@final
class Upstream:
    """One provider: a `ClientSession` with a connection pool, and its URLs parsed once."""

    __slots__ = ("_urls", "base_url", "config", "kind", "name", "retired", "session", "timeout", "users")

    def __init__(self, name: str, config: ProviderConfig):
        self.name = name
        self.config = config
        self.kind = config.kind
        self.base_url = config.base_url.rstrip("/")
        t = config.timeouts
        # sock_read bounds the wait for the response headers; `idle` narrows it for a stream's body.
        self.timeout = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.first_byte_s)
        headers = {"Content-Type": "application/json", "User-Agent": f"stats-gateway/{__version__}"}
        provider = PROVIDERS.get(config.kind)
        auth = provider.auth_headers if provider is not None else _JOB_KIND_AUTH[config.kind]
        headers.update(auth(config.api_key))
        headers.update(config.headers)
        connector = aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector,
            # Upstream cookies must never be stored: they would be replayed for every tenant's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=headers,
            timeout=self.timeout,
            read_bufsize=2**16,
        )
        self._urls: dict[str, URL] = {}
        self.users = 0  # requests using it now
        self.retired = False  # replaced by a reload: closed when `users` comes back to 0

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    def idle(self, resp: aiohttp.ClientResponse) -> None:
        """From now on, bound the silence between reads of `resp`'s body by `timeouts.idle_s` (the
        connection's read timer, restarted; aiohttp has no per-response setting for it)."""
        idle = self.config.timeouts.idle_s
        if idle == self.config.timeouts.first_byte_s or resp.connection is None:
            return
        protocol = resp.connection.protocol
        if protocol is not None:
            protocol.read_timeout = idle
            protocol.start_timeout()

    async def close(self) -> None:
        await self.session.close()

    def failure(self, exc: BaseException, phase: str) -> GatewayError:
        """The client-facing error for a transport failure while `phase` (e.g. 'connecting')."""
        where = f"provider {self.name!r} ({self.base_url})"
        if isinstance(exc, asyncio.TimeoutError):
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                limit = f"{self.config.timeouts.connect_s:g} s to connect"
            elif isinstance(exc, aiohttp.SocketTimeoutError):
                t = self.config.timeouts
                idle = phase in ("streaming", "waiting for its first event")
                limit = f"{t.idle_s:g} s between events" if idle else f"{t.first_byte_s:g} s to answer"
            else:
                limit = f"{self.config.timeouts.total_s:g} s in total"
            return GatewayError(Code.upstream_timeout, f"The {where} timed out while {phase} (limit: {limit}).")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return GatewayError(Code.upstream_bad_response, f"The {where} sent a broken response while {phase}.")
        detail = str(exc) or type(exc).__name__
        return GatewayError(Code.upstream_unreachable, f"Could not reach the {where} while {phase}: {detail}")
