"""The client side of each connection: how many may be open, and how long a request head may take.

aiohttp's own protocol (`RequestHandler`) serves every connection; `Edge` makes it with two bounds an
internet-facing proxy needs (nginx's `client_header_timeout` and `worker_connections`):

- **Head timeout.** A request head must arrive whole within `server.header_timeout_s` of the connection
  opening or of the previous answer on it. aiohttp's keep-alive timer, armed at both moments, measures
  it: a connection still waiting for a head then is closed. One that sent part of a head gets a 408 in the
  gateway's envelope first; a silent one (or an idle keep-alive connection) is just closed, as nginx does.
- **Connection cap.** With `server.max_connections` open (per worker process), a new connection is answered
  at once with a 503 in the envelope (`Retry-After: 1`, `Connection: close`) and closed, without reading
  anything from it; those already open are not touched.

Both cost nothing per request: one comparison per chunk received, one counter per connection.
(Two of aiohttp's internals are read: the handler's `_waiter`, pending while it waits for a head, and the
server's `_kwargs`, the handler settings. tests/test_edge.py fails if either changes.)
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import final

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import Code, GatewayError, error_body
from proxy.meta import new_request_id

log = logging.getLogger("proxy.edge")

SPARE_FDS = 256  # descriptors beside client connections: the store, the journal, listening sockets, logs


def raise_fd_limit(max_connections: int) -> None:
    """Raise this process's soft descriptor limit toward what `max_connections` needs (a client connection may
    hold an upstream one too), up to the hard limit; warn when even that is short. (systemd's unit sets
    LimitNOFILE=65536; a shell often gives 1024, where the cap would be the kernel's EMFILE, not ours.)"""
    if not max_connections:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("cannot raise the descriptor limit: %s", e)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "server.max_connections is %d but this process may open only %d files (ulimit -n); past about %d "
            "connections new ones fail in the kernel instead of getting a 503: lower max_connections or raise "
            "the limit (LimitNOFILE= in the systemd unit)",
            max_connections,
            soft,
            (soft - SPARE_FDS) // 2,
        )


def _answer(status_line: bytes, err: GatewayError, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection: the envelope of `err`, with a request id."""
    request_id = new_request_id()
    body = orjson.dumps(error_body(err, request_id))
    return (
        b"HTTP/1.1 "
        + status_line
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nx-request-id: %s\r\n"
        % (len(body), request_id.encode())
        + extra
        + b"Connection: close\r\n\r\n"
        + body
    )


@final
class Edge:
    """Makes the protocol for each accepted connection, and counts those open (per worker process)."""

    __slots__ = ("_full", "_late", "max_connections", "open", "server")

    def __init__(self, server: web.Server, header_timeout_s: float, max_connections: int):
        self.server = server
        self.max_connections = max_connections  # 0: no cap
        self.open = 0
        self._late = (
            b"408 Request Timeout",
            GatewayError(
                Code.request_timeout,
                f"The request head did not arrive within {header_timeout_s:g} s of the connection opening or of "
                f"the previous answer on it (server.header_timeout_s).",
            ),
        )
        self._full = (
            b"503 Service Unavailable",
            GatewayError(
                Code.unavailable,
                f"The gateway has {max_connections} client connections open, its limit "
                f"(server.max_connections); retry shortly, or reuse a connection.",
            ),
            b"Retry-After: 1\r\n",
        )

    def __call__(self) -> asyncio.Protocol:
        # `Server.__call__` makes a plain RequestHandler the same way.
        return _Connection(self, self.server, loop=asyncio.get_running_loop(), **self.server._kwargs)


@final
class EdgeSite(web.BaseSite):
    """A listening TCP socket whose connections `edge` makes (aiohttp's `TCPSite`, with our protocol)."""

    __slots__ = ("_edge", "_host", "_port", "_reuse_port")

    def __init__(
        self, runner: web.BaseRunner, edge: Edge, host: str, port: int, *, reuse_port: bool = False, backlog: int = 128
    ):
        super().__init__(runner, backlog=backlog)
        self._edge, self._host, self._port, self._reuse_port = edge, host, port, reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()  # registered with the runner, which stops it on cleanup
        self._server = await asyncio.get_running_loop().create_server(
            self._edge, self._host, self._port, backlog=self._backlog, reuse_address=True, reuse_port=self._reuse_port
        )


@final
class _Connection(RequestHandler):
    __slots__ = ("_counted", "_edge", "_partial")

    def __init__(self, edge: Edge, server: web.Server, **kwargs: object):
        super().__init__(server, **kwargs)  # type: ignore[arg-type]
        self._edge = edge
        self._counted = False
        self._partial = False  # bytes of a head arrived, and the head is not whole yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        edge = self._edge
        if edge.max_connections and edge.open >= edge.max_connections:
            transport.write(_answer(*edge._full))  # type: ignore[attr-defined]
            transport.close()
            return
        edge.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return  # refused at the cap: aiohttp never knew it
        self._counted = False
        self._edge.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter
        self._partial = waiter is not None and not waiter.done()  # still waiting: no whole head yet

    def force_close(self) -> None:
        # The head timeout lands here (aiohttp's keep-alive timer, while the handler waits for a head), as do
        # a shutdown and a lost connection: a client that sent part of a head is told why, if it can be.
        transport = self.transport
        if self._partial and transport is not None and not transport.is_closing():
            self._partial = False
            transport.write(_answer(*self._edge._late))
        super().force_close()
