"""Server floors: a pass-through proxy with the gateway's own upstream client and nothing else, behind aiohttp's
server or behind a bare HTTP/1.1 protocol (~60 lines); what is left of a request when the gateway does no work.

`python -m bench.floor_proxy --port P --upstream http://127.0.0.1:M --server aiohttp|lean`

Both send every request's body to the upstream as it came (a POST to the same path, through a
`proxy.upstream.Upstream` as the gateway makes one: a keep-alive pool of asyncio protocols with llhttp parsing)
and answer with the upstream's status and body: whole, or relayed event by event as a chunked body when the
upstream streams. `aiohttp`: an `aiohttp.web` application, as the gateway serves. `lean`: an `asyncio.Protocol`
parsing requests with `httptools`, answering each in one write; a measuring instrument only (no pipelining, no
limits, no error answers), not a server to deploy. The gap between the two is what aiohttp's server costs a
request (bench targets `floor-aiohttp`, `floor-lean`).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import final

import httptools
import msgspec
import uvloop
from aiohttp import web

from proxy.client import Response
from proxy.config import ProviderConfig
from proxy.upstream import Upstream

_SSE = "text/event-stream"


def make_upstream(upstream: str) -> Upstream:
    """The upstream as the gateway makes a provider (its pool, connection policy and request head), an
    OpenAI-style one with the bench's key."""
    config = msgspec.convert({"kind": "openai", "base_url": upstream, "api_key": "sk-bench"}, ProviderConfig)
    return Upstream("bench", config)


def _streams(resp: Response) -> bool:
    return resp.status == 200 and resp.content_type == _SSE


# --- behind aiohttp


def aiohttp_app(upstream: str) -> web.Application:
    app = web.Application()
    upstreams: list[Upstream] = []

    async def startup(app: web.Application) -> None:
        upstreams.append(make_upstream(upstream))

    async def forward(request: web.Request) -> web.StreamResponse:
        resp = await upstreams[0].post(request.path, await request.read())
        try:
            if not _streams(resp):
                return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
            out = web.StreamResponse(headers={"Content-Type": _SSE})
            await out.prepare(request)
            while chunk := await resp.readany():
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            resp.release()

    app.on_startup.append(startup)
    app.router.add_post("/{tail:.*}", forward)
    return app


# --- behind a bare protocol


@final
class _Lean(asyncio.Protocol):
    """One client connection: requests parsed by httptools, answered one after another."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes, bool]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.put_nowait((self.url, b"".join(self.body), self.parser.should_keep_alive()))
        self.url, self.body = b"", []

    async def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while True:
            url, body, keep_alive = await self.queue.get()
            try:
                resp = await self.upstream.post(url.decode(), body)
            except Exception:  # the upstream failed: no error answer here, the connection is closed
                transport.close()
                return
            try:
                if not _streams(resp):
                    data = await resp.read()
                    transport.write(
                        b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                        % (resp.status, resp.content_type.encode(), len(data), data)
                    )
                else:
                    transport.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                    )
                    while chunk := await resp.readany():
                        transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    transport.write(b"0\r\n\r\n")
            finally:
                resp.release()
            if not keep_alive:
                transport.close()
                return


async def serve_lean(host: str, port: int, upstream: str) -> None:
    target = make_upstream(upstream)
    server = await asyncio.get_running_loop().create_server(lambda: _Lean(target), host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000/v1")
    parser.add_argument("--server", choices=("aiohttp", "lean"), required=True)
    args = parser.parse_args()
    if args.server == "lean":
        uvloop.run(serve_lean(args.host, args.port, args.upstream))
    else:
        app = aiohttp_app(args.upstream)
        web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
