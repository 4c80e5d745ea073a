"""Pooled HTTP clients, one per provider, with its credentials, headers and timeouts prepared once."""

from __future__ import annotations

import asyncio
from typing import final

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.config import ProviderConfig
from proxy.errors import Code, GatewayError
from proxy.translators.exchange import PROVIDERS


@final
class Upstream:
    """One provider: a `ClientSession` with a connection pool, and its URLs parsed once."""

    __slots__ = ("_urls", "base_url", "config", "kind", "name", "session", "timeout")

    def __init__(self, name: str, config: ProviderConfig):
        self.name = name
        self.config = config
        self.kind = config.kind
        self.base_url = config.base_url.rstrip("/")
        t = config.timeouts
        self.timeout = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.read_s)
        headers = {"Content-Type": "application/json", "User-Agent": f"stats-gateway/{__version__}"}
        headers.update(PROVIDERS[config.kind].auth_headers(config.api_key))
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

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def close(self) -> None:
        await self.session.close()

    def failure(self, exc: BaseException, phase: str) -> GatewayError:
        """The client-facing error for a transport failure while `phase` (e.g. 'connecting')."""
        where = f"provider {self.name!r} ({self.base_url})"
        if isinstance(exc, asyncio.TimeoutError):
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                limit = f"{self.config.timeouts.connect_s:g} s to connect"
            elif isinstance(exc, aiohttp.SocketTimeoutError):
                limit = f"{self.config.timeouts.read_s:g} s between bytes"
            else:
                limit = f"{self.config.timeouts.total_s:g} s in total"
            return GatewayError(Code.upstream_timeout, f"The {where} timed out while {phase} (limit: {limit}).")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return GatewayError(Code.upstream_bad_response, f"The {where} sent a broken response while {phase}.")
        detail = str(exc) or type(exc).__name__
        return GatewayError(Code.upstream_unreachable, f"Could not reach the {where} while {phase}: {detail}")
