"""How one provider's connections leave this machine: directly or through an HTTP proxy, and with which TLS.

One place for connection policy. `Egress(base_url, provider)` settles everything once, at start-up: the origin,
the proxy (the provider's `proxy:` setting, else `HTTPS_PROXY`/`HTTP_PROXY` unless `NO_PROXY` names the host),
and the `SSLContext` (certificates and host names always verified; `tls.ca_file` replaces the system CA store;
`tls.cert_file`/`key_file` present a client certificate). `connect()` opens one connection ready for HTTP/1.1
requests; `aiohttp_options()` gives the same policy to the paths that keep aiohttp's client.

An https origin behind a proxy is reached through a `CONNECT host:port` tunnel, then TLS inside it; a plain-http
origin behind a proxy gets absolute-form requests (`target_prefix`) with the proxy's credentials
(`extra_headers`). Proxies are spoken to in plain HTTP only (`http://` proxy URLs).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import ssl
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, final
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment

if TYPE_CHECKING:
    from proxy.config import ProviderConfig, TlsConfig

P = TypeVar("P", bound=asyncio.BaseProtocol)

PROXY_FORM = "http://[user:password@]host:port"
_MAX_ANSWER_HEAD = 64 * 1024  # the longest answer to CONNECT read before giving up on the proxy
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")


class ProxyRefused(OSError):
    """The proxy answered CONNECT with something other than 2xx, or closed the connection instead."""


class SettingError(ValueError):
    """A provider's egress setting that cannot be used; `field` is its path under the provider."""

    def __init__(self, field: tuple[str, ...], message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class _Proxy(NamedTuple):
    host: str
    port: int
    url: str  # scheme, host and port: never credentials
    login: str  # "" when the URL has no user
    password: str

    @property
    def authorization(self) -> str:
        """The Proxy-Authorization header value, or "" without credentials."""
        if not self.login:
            return ""
        return "Basic " + base64.b64encode(f"{self.login}:{self.password}".encode()).decode("ascii")


@final
class Egress:
    """How one provider's connections leave this machine: directly or through an HTTP proxy; TLS settings."""

    __slots__ = (
        "_connect_request",
        "_proxy",
        "_trust",
        "authority",
        "extra_headers",
        "host",
        "port",
        "ssl",
        "target_prefix",
        "tls",
        "via",
    )

    def __init__(self, base_url: str, config: ProviderConfig, environ: Mapping[str, str] | None = None) -> None:
        """`environ`: where `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` are read (default `os.environ`).
        Raises `SettingError` for an unusable proxy URL or TLS file."""
        origin = urlsplit(base_url)
        self.tls = origin.scheme == "https"
        self.host = origin.hostname or ""
        self.port = origin.port or (443 if self.tls else 80)
        bracketed = f"[{self.host}]" if ":" in self.host else self.host
        # The Host header: the port only when it is not the scheme's default.
        self.authority = bracketed if origin.port in (None, 443 if self.tls else 80) else f"{bracketed}:{self.port}"
        self.ssl = _tls_context(config.tls) if self.tls else None
        self._trust = f"only the CAs in {config.tls.ca_file}" if config.tls.ca_file else "the system CA store"
        proxy = _choose_proxy(
            origin.scheme, origin.netloc.rpartition("@")[2], config.proxy, os.environ if environ is None else environ
        )
        self._proxy = proxy
        self.via = f" via proxy {proxy.url}" if proxy else ""
        absolute = proxy is not None and not self.tls
        self.target_prefix = f"http://{self.authority}" if absolute else ""
        self.extra_headers = {"Proxy-Authorization": proxy.authorization} if absolute and proxy.login else {}
        self._connect_request = b""
        if proxy is not None and self.tls:
            target = f"{bracketed}:{self.port}"
            head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            if proxy.login:
                head += f"Proxy-Authorization: {proxy.authorization}\r\n"
            self._connect_request = (head + "\r\n").encode("latin-1")

    async def connect(self, factory: Callable[[], P], timeout: float) -> tuple[asyncio.Transport, P]:
        """A connection to the origin ready for HTTP/1.1 requests, within `timeout` seconds in all (TCP, CONNECT,
        TLS handshake); `connection_made` has been called once on the protocol. Raises OSError (ssl.SSLError
        included), ProxyRefused (an OSError), or TimeoutError (an OSError too: test for it first)."""
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                if self._proxy is None:
                    server_hostname = self.host if self.ssl is not None else None
                    return await loop.create_connection(  # type: ignore[return-value]
                        factory, self.host, self.port, ssl=self.ssl, server_hostname=server_hostname
                    )
                if self.ssl is None:  # absolute-form requests to the proxy itself
                    return await loop.create_connection(factory, self._proxy.host, self._proxy.port)  # type: ignore[return-value]
                return await self._tunnel(loop, factory, timeout)
        except TimeoutError:
            if deadline.expired():
                what = "TLS connection" if self.tls else "connection"
                raise TimeoutError(f"no {what} to {self.host}:{self.port}{self.via} within {timeout:g} s") from None
            raise
        except ssl.SSLCertVerificationError as e:
            raise self._explained(e) from None

    async def _tunnel(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], P], timeout: float
    ) -> tuple[asyncio.Transport, P]:
        assert self._proxy is not None and self.ssl is not None
        proxy = self._proxy
        raw, tunnel = await loop.create_connection(
            lambda: _Tunnel(self._connect_request, proxy.url, loop.create_future()), proxy.host, proxy.port
        )
        try:
            head, extra = await tunnel.answer
            status = _STATUS_LINE.match(head)
            if status is None:
                line = head.split(b"\r\n", 1)[0].decode("latin-1")[:200]
                raise ProxyRefused(f"proxy {proxy.url} did not answer CONNECT in HTTP: {line!r}")
            if not 200 <= int(status.group(1)) < 300:
                line = head.split(b"\r\n", 1)[0].decode("latin-1")[:200]
                hint = ""
                if status.group(1) == b"407":
                    hint = " (wrong proxy credentials?)" if proxy.login else " (it wants credentials: user:password@)"
                raise ProxyRefused(f"proxy {proxy.url} refused CONNECT {self.host}:{self.port}: {line}{hint}")
            if extra:  # a TLS server never speaks first: these bytes are not the origin's
                raise ProxyRefused(f"proxy {proxy.url} sent data after its answer to CONNECT")
            protocol = factory()
            transport = await loop.start_tls(
                raw, protocol, self.ssl, server_hostname=self.host, ssl_handshake_timeout=timeout
            )
        except BaseException:
            raw.close()
            raise
        if transport is None:  # the proxy closed the connection during the handshake
            raise ProxyRefused(f"proxy {proxy.url} closed the tunnel to {self.host}:{self.port}")
        # start_tls does not call it (the protocol was not told of the raw connection): it is ours to call.
        protocol.connection_made(transport)
        return transport, protocol  # type: ignore[return-value]

    def _explained(self, e: ssl.SSLCertVerificationError) -> ssl.SSLCertVerificationError:
        """`e`, saying which server and which trust store: what one needs to fix it."""
        message = f"{e.strerror or e} (server {self.host}:{self.port}{self.via}; trusting {self._trust})"
        explained = ssl.SSLCertVerificationError(e.errno, message)
        for name in ("library", "reason", "verify_code", "verify_message"):
            setattr(explained, name, getattr(e, name, None))
        return explained

    def aiohttp_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Keyword arguments for `aiohttp.TCPConnector` and for `aiohttp.ClientSession`: the same TLS and proxy."""
        connector: dict[str, Any] = {"ssl": self.ssl} if self.ssl is not None else {}
        session: dict[str, Any] = {}
        if self._proxy is not None:
            import aiohttp  # not needed on the inference path

            session["proxy"] = self._proxy.url
            if self._proxy.login:
                # Not in the proxy URL: aiohttp would show that URL, password included, in a 407's error message.
                # aiohttp 3.14 deprecates BasicAuth and the session's proxy_auth (for a per-request proxy_headers)
                # but still honours both; the session will warn.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    auth = aiohttp.BasicAuth(self._proxy.login, self._proxy.password, encoding="utf-8")
                session["proxy_auth"] = auth
        return connector, session


@final
class _Tunnel(asyncio.Protocol):
    """Sends CONNECT and reads the proxy's answer head; the transport then goes to TLS."""

    __slots__ = ("answer", "buffer", "proxy_url", "request", "transport")

    def __init__(self, request: bytes, proxy_url: str, answer: asyncio.Future[tuple[bytes, bytes]]):
        self.request = request
        self.proxy_url = proxy_url
        self.answer = answer  # (the head without its blank line, any bytes after it)
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass Transport
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            assert self.transport is not None
            self.transport.pause_reading()
            self.answer.set_result((bytes(self.buffer[:end]), bytes(self.buffer[end + 4 :])))
        elif len(self.buffer) > _MAX_ANSWER_HEAD:
            too_long = f"proxy {self.proxy_url} answered CONNECT with a head over {_MAX_ANSWER_HEAD} bytes"
            self.answer.set_exception(ProxyRefused(too_long))

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            reason = f": {exc}" if exc else ""
            closed = f"proxy {self.proxy_url} closed the connection before answering CONNECT{reason}"
            self.answer.set_exception(ProxyRefused(closed))


# ---------------------------------------------------------------------------------------------------------
# proxies


def parse_proxy(url: str) -> _Proxy:
    """`http://[user:password@]host[:port]` (scheme optional, port 80 by default); ValueError otherwise."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    expected = f"expected {PROXY_FORM}, got {redact(text)!r}"
    if parts.scheme == "https":
        raise ValueError(f"{expected}: https:// proxies are not supported (the proxy itself is spoken to in HTTP)")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{expected}: its port is not a number 1-65535") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(expected)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    login, password = unquote(parts.username or ""), unquote(parts.password or "")
    return _Proxy(host, port, f"http://{shown}:{port}", login, password)


def redact(url: str) -> str:
    """`url` with the password of its userinfo replaced by `***`."""
    return re.sub(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?[^/@:]*):[^/]*@", r"\1:***@", url)


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{'http'|'https'|'no': (variable, value)}: the rules of urllib.request.getproxies_environment (a lower-case
    variable wins over its upper-case one, even empty), applied to `environ`."""
    found = {}
    for scheme in ("http", "https", "no"):
        lower = f"{scheme}_proxy"
        name = lower if lower in environ else lower.upper()
        if environ.get(name):
            found[scheme] = (name, environ[name])
    return found


def _choose_proxy(scheme: str, netloc: str, setting: str, environ: Mapping[str, str]) -> _Proxy | None:
    """The proxy for an origin: the provider's `proxy:` setting ("direct": none), else the environment's."""
    if setting == "direct":
        return None
    if setting:
        try:
            return parse_proxy(setting)
        except ValueError as e:
            raise SettingError(("proxy",), str(e)) from None
    proxies = _environment_proxies(environ)
    if scheme not in proxies:
        return None
    if "no" in proxies and proxy_bypass_environment(netloc, {"no": proxies["no"][1]}):
        return None
    variable, value = proxies[scheme]
    try:
        return parse_proxy(value)
    except ValueError as e:
        raise SettingError(("proxy",), f"{variable} in the environment: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# TLS


@functools.cache
def _system_context() -> ssl.SSLContext:
    """The context of every provider without TLS files: loading the system store takes ~20 ms, so it is made
    once per process (as aiohttp does) and never changed after."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client context for `tls`: certificates and host names always verified. Raises SettingError."""
    if not (tls.ca_file or tls.cert_file or tls.key_file):
        return _system_context()
    if tls.key_file and not tls.cert_file:
        raise SettingError(("tls", "key_file"), "a key_file needs a cert_file (the client certificate)")
    for field in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, field)
        if path and not Path(path).is_file():
            problem = "is not a file" if Path(path).exists() else "does not exist"
            raise SettingError(("tls", field), f"expected a PEM file, but {path} {problem}")
    if tls.ca_file:
        try:
            ctx = ssl.create_default_context(cafile=tls.ca_file)  # only these CAs: the system store is not loaded
        except ssl.SSLError as e:
            found = "none found" if e.reason == "NO_CERTIFICATE_OR_CRL_FOUND" else "one of them cannot be parsed"
            raise SettingError(("tls", "ca_file"), f"expected PEM CA certificates in {tls.ca_file}: {found}") from None
    else:
        ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    if tls.cert_file:
        _load_client_certificate(ctx, tls)
    return ctx


def _load_client_certificate(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    """Present the certificate in `tls.cert_file`, with the key in `key_file` or else in `cert_file` too."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.cert_file)  # parses alone?
    except ssl.SSLError:
        raise SettingError(
            ("tls", "cert_file"), f"expected a PEM client certificate in {tls.cert_file}: none that can be parsed"
        ) from None
    field, path = ("key_file", tls.key_file) if tls.key_file else ("cert_file", tls.cert_file)
    text = Path(path).read_text(encoding="ascii", errors="replace")
    if "PRIVATE KEY-----" not in text:
        alone = "" if tls.key_file else " (put it there too, or name its file in key_file)"
        raise SettingError(("tls", field), f"expected a PEM private key in {path}, found none{alone}")
    if "ENCRYPTED" in text:
        raise SettingError(("tls", field), f"the private key in {path} is encrypted: give it unencrypted")
    try:
        # A password is given so that OpenSSL never prompts on a terminal; the key is not encrypted anyway.
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None, password=b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            message = f"the private key in {path} does not match the certificate in {tls.cert_file}"
        else:
            message = f"expected a PEM private key in {path}: it cannot be parsed"
        raise SettingError(("tls", field), message) from None
