"""One provider as the gateway calls it: its lean connection pool for the inference path (`proxy.client`),
an aiohttp session for the job, file and batch APIs, and the credentials, headers, timeouts and URLs
prepared once. Transport failures of either become the client-facing error here (`failure`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Mapping
from typing import final

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.client import BrokenResponse, ConnectTimeout, Pool, ReadTimeout, Response
from proxy.config import ProviderConfig
from proxy.egress import Egress
from proxy.errors import Code, GatewayError
from proxy.translators import suno
from proxy.translators.exchange import PROVIDERS

# Credential headers of the provider kinds that serve job surfaces only (no chat translator).
_JOB_KIND_AUTH = {"suno": suno.auth_headers}
_STREAMING_PHASES = ("streaming", "waiting for its first event")


@final
class Upstream:
    """One provider: a lean pool for inference requests, an aiohttp `ClientSession` for the rest."""

    __slots__ = (
        "_session",
        "_urls",
        "base_path",
        "base_url",
        "config",
        "egress",
        "headers",
        "host",
        "kind",
        "name",
        "pool",
        "retired",
        "timeout",
        "users",
    )

    def __init__(self, name: str, config: ProviderConfig):
        self.name = name
        self.config = config
        self.kind = config.kind
        self.base_url = config.base_url.rstrip("/")
        url = URL(self.base_url)
        self.base_path = url.raw_path.rstrip("/")
        self.host = url.host or ""  # its server.address, in traces
        t = config.timeouts
        # sock_read bounds the wait for the response headers (and each read of a job's answer).
        self.timeout = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.first_byte_s)
        headers = {"Content-Type": "application/json", "User-Agent": f"stats-gateway/{__version__}"}
        provider = PROVIDERS.get(config.kind)
        auth = provider.auth_headers if provider is not None else _JOB_KIND_AUTH[config.kind]
        headers.update(auth(config.api_key))
        headers.update(config.headers)
        self.headers = headers  # what every request carries (the aiohttp session's defaults too)
        self.egress = egress = Egress(self.base_url, config)  # direct or through a proxy; TLS settings
        self.pool = Pool(
            egress.connect,
            {"Host": egress.authority, **headers, "Accept-Encoding": "gzip, deflate", **egress.extra_headers},
            limit=config.max_connections,
            connect_s=t.connect_s,
            first_byte_s=t.first_byte_s,
            total_s=t.total_s,
            target_prefix=egress.target_prefix,
        )
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self.users = 0  # requests using it now
        self.retired = False  # replaced by a reload: closed when `users` comes back to 0

    async def post(
        self,
        path: str,
        body: bytes | AsyncIterable[bytes],
        headers: Mapping[str, str] | None = None,
        lines: bytes = b"",
    ) -> Response:
        """An inference request (`path` under the base URL) over the pool; its answer's head has arrived."""
        return await self.pool.request(self.base_path + path, body, headers, lines)

    @property
    def session(self) -> aiohttp.ClientSession:
        """aiohttp's client, for the job, file and batch APIs (made when first used)."""
        if self._session is None:
            tls, proxy = self.egress.aiohttp_options()
            connector = aiohttp.TCPConnector(limit=self.config.max_connections, ttl_dns_cache=300, **tls)
            self._session = aiohttp.ClientSession(
                **proxy,
                connector=connector,
                # Upstream cookies must never be stored: they would be replayed for every tenant's requests.
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=self.headers,
                timeout=self.timeout,
                read_bufsize=2**16,
            )
        return self._session

    def url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def close(self) -> None:
        self.pool.close()
        if self._session is not None:
            await self._session.close()

    def credentials_refused(self, status: int) -> GatewayError:
        """The client-facing error for a 401 or 403 from the provider: the client's key was fine, the gateway's
        credentials for this provider were not."""
        return GatewayError(
            Code.upstream_bad_response,
            f"The provider {self.name!r} rejected the gateway's credentials (HTTP {status}): check the api_key "
            f"configured for it.",
        )

    def failure(self, exc: BaseException, phase: str) -> GatewayError:
        """The client-facing error for a transport failure while `phase` (e.g. 'connecting')."""
        where = f"provider {self.name!r} ({self.base_url}){self.egress.via}"
        t = self.config.timeouts
        if isinstance(exc, asyncio.TimeoutError):
            if isinstance(exc, ConnectTimeout | aiohttp.ConnectionTimeoutError):
                limit = f"{t.connect_s:g} s to connect"
            elif isinstance(exc, ReadTimeout | aiohttp.SocketTimeoutError):
                streaming = phase in _STREAMING_PHASES
                limit = f"{t.idle_s:g} s between events" if streaming else f"{t.first_byte_s:g} s to answer"
            else:
                limit = f"{t.total_s:g} s in total"
            return GatewayError(Code.upstream_timeout, f"The {where} timed out while {phase} (limit: {limit}).")
        if isinstance(exc, BrokenResponse | aiohttp.ClientPayloadError):
            detail = f": {exc}" if isinstance(exc, BrokenResponse) else ""
            message = f"The {where} sent a broken response while {phase}{detail}."
            return GatewayError(Code.upstream_bad_response, message)
        detail = str(exc) or type(exc).__name__
        return GatewayError(Code.upstream_unreachable, f"Could not reach the {where} while {phase}: {detail}")
