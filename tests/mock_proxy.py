"""A tiny HTTP proxy and a tiny HTTP(S) origin for the egress tests, both on 127.0.0.1 and on the running loop.

`MockProxy` tunnels `CONNECT host:port` and forwards absolute-form requests (`GET http://host:port/path`),
recording every request head it gets; with `credentials` it answers 407 to requests without them, and with
`silent` it accepts connections and never answers. `Origin` answers every request with 200 and a body naming
what it saw (request line, client certificate, ALPN), then closes. Both are async context managers that close
their connections on exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Head:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased


async def _read_head(reader: asyncio.StreamReader) -> tuple[Head, bytes]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Head(method, target, headers), raw


class _Server:
    """Start on 127.0.0.1; on exit, close every connection (so each handler ends) and wait for the handlers."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._handlers.discard(handler)

    async def open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection of a handler's own, closed on exit too."""
        reader, writer = await asyncio.open_connection(host, port)
        self._writers.add(writer)
        return reader, writer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class MockProxy(_Server):
    def __init__(self, credentials: str = "", silent: bool = False) -> None:
        super().__init__()
        self.credentials = credentials  # "user:password" required in Proxy-Authorization (Basic); "": none
        self.silent = silent  # accept connections, never answer
        self.seen: list[Head] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.silent:
            await reader.read()  # until the client gives up
            return
        head, raw = await _read_head(reader)
        self.seen.append(head)
        if self.credentials:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if head.headers.get("proxy-authorization") != expected:
                writer.write(
                    b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="mock"\r\n'
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
        if head.method == "CONNECT":
            host, _, port = head.target.rpartition(":")
            up_reader, up_writer = await self.open(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute-form: the same head in origin-form, without the proxy's headers
            url = urlsplit(head.target)
            up_reader, up_writer = await self.open(url.hostname or "", url.port or 80)
            lines = raw.decode("latin-1").split("\r\n")
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [line for line in lines[1:] if not line.lower().startswith("proxy-")]
            up_writer.write("\r\n".join([f"{head.method} {path} HTTP/1.1", *kept]).encode("latin-1"))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


class Origin(_Server):
    """`https://{host}:port` with `tls`, else `http://…`; each answer's body: `<request line>|<client CN>|<ALPN>`."""

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(tls)
        self.host = host  # as named in `url` (`localhost` also resolves to the listening address)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_head(reader)
        cert = writer.get_extra_info("peercert") or {}
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        tls = writer.get_extra_info("ssl_object")
        alpn = tls.selected_alpn_protocol() if tls is not None else None
        body = f"{head.method} {head.target}|{names[0] if names else '-'}|{alpn or '-'}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
