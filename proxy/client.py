"""The inference path's HTTP/1.1 client: a keep-alive pool of asyncio protocols per provider, made for one job.

aiohttp's client is general (cookies, redirects, proxies per request, a request object per call, header
merging, a connector with its own timers): about half of what a bare aiohttp proxy spends per request.
The gateway knows its traffic: POSTs of bytes it already holds (or one streamed upload) to a handful of
origins, answers read as they arrive. So a request here is one `transport.write` of a head encoded once
per provider and path (only `Content-Length` and per-request headers are spliced) followed by the body,
and the answer is parsed by llhttp (`httptools`) as it arrives.

Semantics kept from the aiohttp client it replaces:
- timeouts: `connect_s` to open a connection (TCP, proxy tunnel, TLS), `first_byte_s` from the request
  sent to the response head (and between reads of a whole answer), `idle_s` between reads of a body once
  `Response.stream()` is called, `total_s` for the whole exchange; one timer per exchange, re-armed only
  when it fires (data arriving costs a clock read, not a timer);
- a pooled connection that the provider closed while it was idle fails before any byte of the answer:
  the request is sent again once on a new connection (its body is bytes we still hold);
- chunked and content-length bodies, a body ended by the connection's close, gzip/deflate answers decoded;
- back-pressure: reading from the provider pauses while `HIGH_WATER` bytes wait for the consumer (a slow
  client) and resumes below `LOW_WATER`; uploads wait for the socket to drain;
- a response not read to its end closes its connection; one read to its end returns it to the pool.

Connection policy (direct or through a proxy, TLS settings) is `proxy.egress`'s: the pool only asks it for
a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Final, final
from urllib.parse import quote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER: Final = 256 * 1024  # body bytes buffered before reading from the provider pauses
LOW_WATER: Final = 64 * 1024  # ... and below which it resumes
KEEPALIVE_S: Final = 15.0  # an idle pooled connection is closed after this (aiohttp's default too)
_MAX_HEADS: Final = 512  # encoded request heads cached per pool (paths come from the config's models)
_JOINED_BODY: Final = 64 * 1024  # a body this long or longer is written after its head, not joined to it
_SAFE_PATH: Final = "/:@!$&'()*+,;=-._~%?"  # left as they are when a path is percent-encoded


class ClientError(Exception):
    """The exchange with the provider failed; `str()` says how (never a credential)."""


class ConnectError(ClientError):
    """No connection could be opened (refused, unreachable, name unknown, TLS or proxy failure)."""


class Disconnected(ClientError):
    """The provider closed the connection before its answer began."""


class BrokenResponse(ClientError):
    """The answer was not valid HTTP, was cut short, or its encoding could not be decoded."""


class ConnectTimeout(ClientError, TimeoutError):
    """Opening the connection took longer than `connect_s`."""


class ReadTimeout(ClientError, TimeoutError):
    """The provider was silent for longer than `first_byte_s` (before its head) or `idle_s` (streaming)."""


class TotalTimeout(ClientError, TimeoutError):
    """The whole exchange took longer than `total_s`."""


Connect = Callable[[Callable[[], "Connection"], float], Awaitable[tuple[asyncio.Transport, "Connection"]]]


@final
class Connection(asyncio.Protocol):
    """One connection to the provider: parses what arrives into the current `Response`."""

    __slots__ = (
        "_drained",
        "_parser",
        "closed",
        "counted",
        "exchange",
        "idle_since",
        "pool",
        "reading_paused",
        "transport",
        "used",
        "writing_paused",
    )

    def __init__(self, pool: Pool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.exchange: Response | None = None
        self.closed = False
        self.counted = False  # holds one of the pool's `limit` places
        self.used = 0  # exchanges begun on this connection
        self.idle_since = 0.0
        self.reading_paused = False
        self.writing_paused = False
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.done:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        exchange.last = exchange.loop.time()
        exchange.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            exchange.fail(BrokenResponse(f"invalid HTTP answer ({e})"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport: an HTTP/1.1 answer cannot continue after the peer's FIN

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        exchange = self.exchange
        if exchange is not None and not exchange.done:
            exchange.ended_by_close(exc)
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(Disconnected("the connection closed while the request was being sent"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.exchange.raw_headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self.exchange.headers_complete(self._parser.get_status_code())  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.exchange.body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.complete(self._parser.should_keep_alive())

    # used by Response and Pool
    async def drain(self) -> None:
        while self.writing_paused and not self.closed:
            self._drained = self.pool.loop.create_future()
            await self._drained

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.lost(self)


@final
class Response:
    """One exchange's answer: its status and headers once the head has arrived, then its body."""

    __slots__ = (
        "_chunks",
        "_collect",
        "_deadline",
        "_decoder",
        "_error",
        "_framed",
        "_headers",
        "_keep_alive",
        "_phase_s",
        "_released",
        "_timer",
        "_waiter",
        "buffered",
        "conn",
        "content_encoding",
        "content_type",
        "done",
        "eof",
        "head_done",
        "last",
        "loop",
        "raw_headers",
        "received",
        "status",
        "streaming",
    )

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop, deadline: float):
        self.conn = conn
        self.loop = loop
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_type = ""
        self.content_encoding = ""
        self.head_done = False
        self.done = False  # nothing more will arrive (complete, failed or closed)
        self.eof = False  # the body arrived to its end
        self.streaming = False
        self.received = False  # any byte of the answer arrived
        self.buffered = 0
        self.last = loop.time()  # when the provider last sent something (or was last waited for)
        self._chunks: deque[bytes] = deque()
        self._collect = False  # `read()` wants the whole body: no back-pressure
        self._decoder: zlib._Decompress | None = None
        self._deadline = deadline
        self._phase_s = 0.0
        self._headers: CIMultiDictProxy[str] | None = None
        self._error: ClientError | None = None
        self._framed = False
        self._keep_alive = False
        self._released = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # armed by `sent`

    # --- what the connection feeds
    def headers_complete(self, status: int) -> None:
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self.raw_headers.clear()
            return
        self.status = status
        for name, value in self.raw_headers:
            lower = name.lower()
            if lower == b"content-type":
                self.content_type = value.partition(b";")[0].strip().lower().decode("latin-1")
            elif lower == b"content-encoding":
                self.content_encoding = value.strip().lower().decode("latin-1")
            elif lower == b"content-length" or lower == b"transfer-encoding":
                self._framed = True
        if self.content_encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.content_encoding == "deflate":
            self._decoder = zlib.decompressobj()
        self.head_done = True
        self._wake()

    def body(self, data: bytes) -> None:
        if not self.head_done:
            return  # an interim answer's body (none is allowed)
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as e:
                self.fail(BrokenResponse(f"its {self.content_encoding} body could not be decoded ({e})"))
                self.conn.close()
                return
            if not data:
                return
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self._collect:
            self.conn.pause_reading()
        self._wake()

    def complete(self, keep_alive: bool) -> None:
        """The answer arrived whole (`keep_alive`: its connection may carry another exchange)."""
        if not self.head_done or self.done:
            return  # the end of an interim answer, or of one that already failed
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error as e:
                self.fail(BrokenResponse(f"its {self.content_encoding} body could not be decoded ({e})"))
                return
            if rest:
                self._chunks.append(rest)
                self.buffered += len(rest)
        self.eof = self.done = True
        self._keep_alive = keep_alive
        self._stop_timer()
        self._wake()

    def ended_by_close(self, exc: Exception | None) -> None:
        if self.head_done and not self._framed and exc is None:
            self.complete(False)  # a body delimited by the connection's close
        elif not self.head_done:
            detail = f": {exc}" if exc else ""
            self.fail(Disconnected(f"Server disconnected{detail}"))
        else:
            self.fail(BrokenResponse("the connection closed before the answer's end"))

    def fail(self, error: ClientError) -> None:
        if self.done:
            return
        self._error = error
        self.done = True
        self._stop_timer()
        self._wake()

    # --- timers
    def _on_timer(self) -> None:
        self._timer = None
        if self.done:
            return
        now = self.loop.time()
        if now < self._deadline:
            if self.conn.reading_paused:
                self.last = now  # the consumer is behind (a slow client), not the provider
            limit = self.last + self._phase_s
            if now < limit:
                self._timer = self.loop.call_at(min(self._deadline, limit), self._on_timer)
                return
            self.fail(ReadTimeout("it went silent mid-answer" if self.streaming else "no answer in time"))
        else:
            self.fail(TotalTimeout("the exchange took too long"))
        self.conn.close()

    def _arm(self, phase_s: float) -> None:
        """Bound the silence from now on by `phase_s` (and the exchange by its deadline)."""
        self.last = self.loop.time()
        self._phase_s = phase_s
        when = min(self._deadline, self.last + phase_s)
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first and re-arms itself for the new bound
            timer.cancel()
        if not self.done:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stream(self, idle_s: float) -> None:
        """From now on the silence between reads of the body is bounded by `idle_s` (a stream's events)."""
        self.streaming = True
        self._arm(idle_s)

    def sent(self, first_byte_s: float) -> None:
        """The request's last byte is written: the provider has `first_byte_s` to begin its answer."""
        self._arm(first_byte_s)

    # --- what the consumer calls
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def head(self) -> None:
        """Wait for the status line and headers."""
        while not self.head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def readany(self) -> bytes:
        """What arrived of the body since the last call (waiting for something); b"" at its end."""
        while not self._chunks:
            if self.eof:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        if len(chunks) != 0:
            chunks.clear()
        self.buffered = 0
        if self.conn.reading_paused:
            self.conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body (held in memory: the caller bounds what it asks for this way)."""
        self._collect = True
        self.conn.resume_reading()  # paused if more than HIGH_WATER arrived before this call
        while not self.eof:
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        return data

    def is_eof(self) -> bool:
        return self.eof and not self._chunks

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The response headers (built when first asked: error paths and debugging only)."""
        if self._headers is None:
            pairs = ((n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers)
            self._headers = CIMultiDictProxy(CIMultiDict(pairs))
        return self._headers

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body was read to its end,
        else it is closed (a provider cannot be left writing into a connection someone else will use)."""
        if self._released:
            return
        self._released = True
        self._stop_timer()
        conn = self.conn
        if self.eof and self._keep_alive and not conn.closed:
            conn.exchange = None
            conn.resume_reading()  # paused for a buffer the consumer has read (or dropped)
            conn.pool.put(conn)
        else:
            if not self.done:
                self.done = True
            conn.close()

    def close(self) -> None:
        """Abandon the answer and its connection."""
        self._keep_alive = False
        self.release()


@final
class Pool:
    """Keep-alive connections to one provider's origin (per worker process), at most `limit` open."""

    __slots__ = (
        "_heads",
        "_idle",
        "_names",
        "_sweep",
        "_waiters",
        "closed",
        "connect",
        "connect_s",
        "first_byte_s",
        "headers",
        "limit",
        "loop",
        "open",
        "target_prefix",
        "total_s",
    )

    def __init__(
        self,
        connect: Connect,
        headers: Mapping[str, str],
        *,
        limit: int,
        connect_s: float,
        first_byte_s: float,
        total_s: float,
        target_prefix: str = "",
    ):
        self.loop = asyncio.get_running_loop()
        self.connect = connect
        self.headers = dict(headers)  # sent with every request, in this order (Host first)
        self._names = {name.lower(): name for name in self.headers}
        self.limit = limit
        self.connect_s = connect_s
        self.first_byte_s = first_byte_s
        self.total_s = total_s
        self.target_prefix = target_prefix  # "" or `http://host:port`, when a plain-HTTP proxy needs absolute-form
        self.open = 0  # connections open or opening
        self.closed = False
        self._idle: deque[Connection] = deque()  # most recently used on the right
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._heads: dict[str, bytes] = {}
        self._sweep: asyncio.TimerHandle | None = None

    # --- request heads
    def _head(self, path: str, extra: Mapping[str, str] | None) -> bytes:
        """`POST <path> HTTP/1.1` and the headers, up to (not including) Content-Length/Transfer-Encoding."""
        if not extra:
            head = self._heads.get(path)
            if head is None:
                if len(self._heads) >= _MAX_HEADS:
                    self._heads.clear()
                head = self._heads[path] = _encode_head(self.target_prefix + _quote(path), self.headers)
            return head
        lowered = self._names
        if not any(name.lower() in lowered for name in extra):  # added to the provider's (a traceparent)
            return self._head(path, None) + _encode_lines(extra)
        merged = dict(self.headers)
        for name, value in extra.items():
            old = lowered.get(name.lower())
            if old is not None:
                del merged[old]
            merged[name] = value
        return _encode_head(self.target_prefix + _quote(path), merged)

    # --- the exchange
    async def request(
        self,
        path: str,
        body: bytes | AsyncIterable[bytes],
        headers: Mapping[str, str] | None = None,
        lines: bytes = b"",
    ) -> Response:
        """Send a POST and wait for the answer's head. `lines`: more headers, as encoded lines of the head
        (each ending in CRLF; a trace's). Raises a `ClientError` (a `TimeoutError` for timeouts)."""
        loop = self.loop
        deadline = loop.time() + self.total_s
        head = self._head(path, headers) + lines
        streamed = not isinstance(body, (bytes, bytearray))
        if not streamed:
            joined = len(body) < _JOINED_BODY or not isinstance(body, bytes)  # type: ignore[arg-type]
            if joined:
                message = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)  # type: ignore[arg-type]
            else:  # a long body is not copied into the message: written after its head as it is
                message = b"%sContent-Length: %d\r\n\r\n" % (head, len(body))  # type: ignore[arg-type]
        for again in (False, True):
            conn = self._take() or await self._open(deadline)
            reused = conn.used > 0
            conn.used += 1
            resp = conn.exchange = Response(conn, loop, deadline)
            try:
                if streamed:
                    resp.sent(self.total_s)  # while the upload is read from the client, only the total bound
                    await _send_chunked(conn, head, body)  # type: ignore[arg-type]
                elif joined:
                    conn.transport.write(message)  # type: ignore[union-attr]
                else:
                    conn.transport.writelines((message, body))  # type: ignore[union-attr, arg-type]
                resp.sent(self.first_byte_s)
                await resp.head()
            except Disconnected:
                resp.close()
                if reused and not again and not streamed and not resp.received:
                    continue  # the provider had closed the idle connection: once more, on a new one
                raise
            except BaseException:
                resp.close()
                raise
            return resp
        raise AssertionError("unreachable")

    # --- connections
    def _take(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _open(self, deadline: float) -> Connection:
        loop = self.loop
        while self.open >= self.limit:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise TotalTimeout("no connection to the provider became free in time") from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            conn = self._take()
            if conn is not None:
                return conn
        if self.closed:
            raise ConnectError("the gateway is shutting down")
        self.open += 1
        try:
            limit = min(self.connect_s, deadline - loop.time())
            async with asyncio.timeout(limit):
                _, conn = await self.connect(lambda: Connection(self), limit)
        except TimeoutError:
            self._opened_failed()
            if loop.time() >= deadline:
                raise TotalTimeout("the exchange took too long") from None
            raise ConnectTimeout(f"no connection within {self.connect_s:g} s") from None
        except OSError as e:
            self._opened_failed()
            raise ConnectError(str(e) or type(e).__name__) from None
        except BaseException:
            self._opened_failed()
            raise
        conn.counted = True
        return conn

    def _opened_failed(self) -> None:
        self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put(self, conn: Connection) -> None:
        """A connection free for the next exchange."""
        if self.closed:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake_one()
        if self._sweep is None:
            self._sweep = self.loop.call_later(KEEPALIVE_S, self._expire)

    def lost(self, conn: Connection) -> None:
        """A connection closed (by either side): it no longer counts against the limit."""
        if not conn.counted:
            return
        conn.counted = False
        self.open -= 1
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._wake_one()

    def _expire(self) -> None:
        """Close connections idle for longer than KEEPALIVE_S (the oldest are on the left)."""
        self._sweep = None
        cutoff = self.loop.time() - KEEPALIVE_S
        idle = self._idle
        while idle and idle[0].idle_since <= cutoff:
            idle.popleft().close()
        if idle:
            self._sweep = self.loop.call_at(idle[0].idle_since + KEEPALIVE_S, self._expire)

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            self._idle.pop().close()


def _quote(path: str) -> str:
    return path if path.isascii() and " " not in path else quote(path, safe=_SAFE_PATH)


def _encode_head(target: str, headers: Mapping[str, str]) -> bytes:
    return f"POST {target} HTTP/1.1\r\n".encode("latin-1") + _encode_lines(headers)


def _encode_lines(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break in its name or value")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


async def _send_chunked(conn: Connection, head: bytes, body: AsyncIterable[bytes]) -> None:
    """Send `head` and `body` with chunked transfer coding, waiting for the socket whenever it is full."""
    transport = conn.transport
    assert transport is not None
    transport.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
    async for chunk in body:
        if conn.closed:
            raise Disconnected("the connection closed while the request was being sent")
        if chunk:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            if conn.writing_paused:
                await conn.drain()
    transport.write(b"0\r\n\r\n")
