"""The lean upstream client (proxy/client.py) against raw HTTP servers on 127.0.0.1 that answer exactly what a
test scripts: keep-alive reuse, a stale pooled connection, framing, gzip, back-pressure, timeouts, uploads."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.client import (
    BrokenResponse,
    ConnectError,
    Connection,
    ConnectTimeout,
    Disconnected,
    Pool,
    ReadTimeout,
    TotalTimeout,
)

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server whose every connection runs `reply` for each request it reads (head + Content-Length or
    chunked body), recording what it received."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                lower = head.lower()
                if b"content-length:" in lower:
                    length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                elif b"transfer-encoding: chunked" in lower:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                self.requests.append((head, body))
                await self.reply(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def json_reply(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra, len(body), body)
        )
        await writer.drain()

    return reply


def pool_for(port: int, **timeouts: float) -> Pool:
    async def connect(factory: Callable[[], Connection], timeout: float) -> tuple[asyncio.Transport, Connection]:
        loop = asyncio.get_running_loop()
        return await loop.create_connection(factory, "127.0.0.1", port)  # type: ignore[return-value]

    settings = {"connect_s": 5.0, "first_byte_s": 5.0, "total_s": 10.0, **timeouts}
    return Pool(
        connect,
        {"Host": f"127.0.0.1:{port}", "Authorization": "Bearer up", "Content-Type": "application/json"},
        limit=8,
        **settings,
    )


async def test_keep_alive_reuses_one_connection_and_sends_one_head():
    async with Server(json_reply()) as server:
        pool = pool_for(server.port)
        for _ in range(5):
            resp = await pool.request("/v1/chat/completions", b'{"model":"m"}')
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.read() == b'{"ok":true}'
            resp.release()
        pool.close()
    assert server.connections == 1 and len(server.requests) == 5
    head, body = server.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer up\r\n" in head and b"Content-Length: 13\r\n" in head
    assert body == b'{"model":"m"}'


async def test_long_bodies_arrive_whole_on_a_kept_connection():
    """A body of 64 KB or more is written after its head instead of being copied into one message (a bytearray
    is copied still: its owner may change it); every body arrives whole, the connection kept."""
    bodies = [b"a" * (64 * 1024 - 1), b"b" * (64 * 1024), bytes(range(256)) * 4096, bytearray(b"c" * 100_000)]
    async with Server(json_reply()) as server:
        pool = pool_for(server.port)
        for body in bodies:
            resp = await pool.request("/v1/embeddings", body)
            assert resp.status == 200 and await resp.read() == b'{"ok":true}'
            resp.release()
        pool.close()
    assert server.connections == 1 and [body for _, body in server.requests] == [bytes(b) for b in bodies]
    assert all(b"Content-Length: %d\r\n" % len(b) in head for (head, _), b in zip(server.requests, bodies, strict=True))


async def test_per_request_headers_replace_the_providers_own():
    async with Server(json_reply()) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/x", b"--b--", {"content-type": "multipart/form-data; boundary=b"})
        await resp.read()
        resp.release()
        pool.close()
    head = server.requests[0][0].lower()
    assert head.count(b"content-type:") == 1 and b"content-type: multipart/form-data; boundary=b" in head


async def test_a_connection_the_provider_closed_while_idle_is_retried_once_on_a_new_one():
    answered: set[int] = set()

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if id(writer) in answered:  # a keep-alive connection the server has given up on: closed unanswered
            writer.close()
            return
        answered.add(id(writer))
        await json_reply()(reader, writer)

    async with Server(one_answer_per_connection) as server:
        pool = pool_for(server.port)
        first = await pool.request("/v1/a", b"{}")
        await first.read()
        first.release()
        second = await pool.request("/v1/a", b"{}")
        assert await second.read() == b'{"ok":true}'
        second.release()
        pool.close()
    # the second request went out on the pooled connection, found it dead, and was sent again on a new one
    assert server.connections == 2 and len(server.requests) == 3


async def test_a_server_that_never_answers_is_not_retried():
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with Server(drop) as server:
        pool = pool_for(server.port)
        with pytest.raises(Disconnected):
            await pool.request("/v1/a", b"{}")
        pool.close()
    assert len(server.requests) == 1  # a new connection that fails is the provider's answer: not sent again


async def test_chunked_body_and_body_ended_by_close():
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    for reply, expected in ((chunked, b"hello world"), (until_close, b"all of it")):
        async with Server(reply) as server:
            pool = pool_for(server.port)
            resp = await pool.request("/v1/a", b"{}")
            assert await resp.read() == expected
            resp.release()
            pool.close()


async def test_gzip_answers_are_decoded_and_broken_ones_are_a_broken_response():
    packed = gzip.compress(b'{"ok":"compressed"}')
    async with Server(json_reply(packed, b"Content-Encoding: gzip\r\n")) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/a", b"{}")
        assert await resp.read() == b'{"ok":"compressed"}'
        assert resp.headers["content-encoding"] == "gzip"
        resp.release()
        pool.close()
    async with Server(json_reply(b"not gzip at all", b"Content-Encoding: gzip\r\n")) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/a", b"{}")
        with pytest.raises(BrokenResponse, match="gzip"):
            await resp.read()
        resp.release()
        pool.close()


async def test_an_answer_cut_short_is_a_broken_response():
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async with Server(cut) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/a", b"{}")
        assert await resp.readany() == b"only this"  # what arrived is delivered before the failure
        with pytest.raises(BrokenResponse):
            await resp.readany()
        resp.release()
        pool.close()


async def test_garbage_is_a_broken_response():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()

    async with Server(garbage) as server:
        pool = pool_for(server.port)
        with pytest.raises(BrokenResponse, match="invalid HTTP"):
            await pool.request("/v1/a", b"{}")
        pool.close()


async def test_an_unread_answer_closes_its_connection_instead_of_returning_it():
    release = asyncio.Event()

    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf-")
        await writer.drain()
        await release.wait()

    async with Server(slow_body) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/a", b"{}")
        assert await resp.readany() == b"half-"
        resp.release()
        assert resp.conn.closed and pool.open == 0
        release.set()
        pool.close()


async def test_back_pressure_pauses_reading_until_the_consumer_catches_up():
    size = 4 * 1024 * 1024
    sent = asyncio.Event()

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        sent.set()

    async with Server(big) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/a", b"{}")
        resp.stream(5.0)
        await asyncio.sleep(0.2)  # a consumer that does not read: the buffer must stop growing
        assert resp.conn.reading_paused and resp.buffered < 1024 * 1024 and not sent.is_set()
        total = 0
        while chunk := await resp.readany():
            total += len(chunk)
        assert total == size and sent.is_set()
        resp.release()
        pool.close()


async def test_a_whole_answer_larger_than_the_buffer_bound_is_read_whole():
    size = 4 * 1024 * 1024
    body = b"[" + b"1," * (size // 2) + b"1]"
    async with Server(json_reply(body)) as server:
        pool = pool_for(server.port, first_byte_s=2)
        resp = await pool.request("/v1/embeddings", b"{}")
        await asyncio.sleep(0.1)  # more than HIGH_WATER arrives before the consumer asks: reading pauses
        assert await asyncio.wait_for(resp.read(), 5) == body
        resp.release()
        pool.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def test_first_byte_timeout_fires_on_time():
    async with Server(_silent) as server:
        pool = pool_for(server.port, first_byte_s=0.3)
        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            await pool.request("/v1/a", b"{}")
        assert 0.3 <= time.monotonic() - started < 0.4
        assert pool.open == 0
        pool.close()


async def test_idle_timeout_mid_stream_and_total_timeout():
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(b"6\r\ndata:x\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with Server(trickle) as server:
        pool = pool_for(server.port, first_byte_s=5, total_s=0.55)
        resp = await pool.request("/v1/a", b"{}")
        resp.stream(0.3)  # events every 0.1 s never hit the idle bound; the total one ends it
        started = time.monotonic()
        with pytest.raises(TotalTimeout):
            while await resp.readany():
                pass
        assert time.monotonic() - started < 0.6
        resp.release()
        pool.close()
    async with Server(json_reply()) as server:

        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata:x\r\n")
            await writer.drain()
            await asyncio.sleep(30)

        server.reply = stall
        pool = pool_for(server.port, first_byte_s=5)
        resp = await pool.request("/v1/a", b"{}")
        resp.stream(0.3)
        assert await resp.readany() == b"data:x"
        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            await resp.readany()
        assert 0.25 <= time.monotonic() - started < 0.4
        resp.release()
        pool.close()


async def test_connect_failures():
    pool = pool_for(1)  # nothing listens on port 1
    with pytest.raises(ConnectError):
        await pool.request("/v1/a", b"{}")
    assert pool.open == 0

    async def never(factory: Callable[[], Connection], timeout: float) -> tuple[asyncio.Transport, Connection]:
        await asyncio.sleep(30)
        raise AssertionError

    slow = Pool(never, {"Host": "x"}, limit=1, connect_s=0.2, first_byte_s=1, total_s=5)
    with pytest.raises(ConnectTimeout):
        await slow.request("/v1/a", b"{}")
    assert slow.open == 0


async def test_the_pool_limit_queues_requests_until_a_connection_is_free():
    gate = asyncio.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        await json_reply()(reader, writer)

    async with Server(gated) as server:
        pool = pool_for(server.port)
        pool.limit = 2

        async def one() -> bytes:
            resp = await pool.request("/v1/a", b"{}")
            try:
                return await resp.read()
            finally:
                resp.release()

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.sleep(0.1)
        assert server.connections == 2 and pool.open == 2
        gate.set()
        assert await asyncio.gather(*tasks) == [b'{"ok":true}'] * 6
        assert server.connections == 2
        pool.close()


async def test_a_streamed_upload_is_sent_chunked():
    async def parts() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"part%d;" % i
            await asyncio.sleep(0)

    async with Server(json_reply()) as server:
        pool = pool_for(server.port)
        resp = await pool.request("/v1/audio/transcriptions", parts(), {"Content-Type": "multipart/form-data"})
        assert await resp.read() == b'{"ok":true}'
        resp.release()
        pool.close()
    head, body = server.requests[0]
    assert b"Transfer-Encoding: chunked" in head and body == b"part0;part1;part2;"


async def test_cancelling_a_request_closes_its_connection():
    async with Server(_silent) as server:
        pool = pool_for(server.port)
        task = asyncio.create_task(pool.request("/v1/a", b"{}"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open == 0
        pool.close()
