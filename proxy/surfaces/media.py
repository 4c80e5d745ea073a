"""Multipart uploads (audio transcriptions and translations, image edits), streamed to the provider.

The client's form is read part by part as it arrives and re-emitted upstream under the same boundary: the
`model` field rewritten to the upstream name, every other field and file passed on with its bytes
unchanged (part headers are re-emitted as `Name: value` lines, in their order). The gateway routes on
`model`, so the parts before it are held: short text fields in memory (64 KiB each, 256 KiB in all),
anything else in one anonymous temporary file, deleted when the request ends. Nothing else of the upload is
kept: memory stays at a few chunks, whatever its size.

An upload is consumed as it is sent, so it goes to one target: the first in order whose circuit is not
open. It is never sent twice: a failure once its first byte has been read from the client is the answer.
Only a target that could not be reached at all (the body untouched) hands it to the next one.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, TypeVar, final

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import parse_content_disposition

from proxy.auth import token_from_headers
from proxy.config import ServerConfig, Target
from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.meta import RequestMeta
from proxy.metrics import Metrics
from proxy.resilience import order_targets
from proxy.routing import Surface
from proxy.surfaces.inference import CLIENT_CLOSED, Handler, Retry, admit, attempt, circuits_open, inference_handler
from proxy.translators.exchange import upload_exchange
from proxy.translators.media import closing, part_head

CHUNK = 64 * 1024  # what one read from the client (and one write upstream) moves at most
HELD_TEXT = 64 * 1024  # a text field before `model` is held in memory up to this; longer ones are spooled
HELD_MEMORY = 256 * 1024  # all text fields held in memory before `model`; more are spooled
MAX_HELD_PARTS = 1000  # parts before `model`
MODEL_FIELD_MAX = 1024
T = TypeVar("T")


def upload_handler(surface: Surface, default_model: str, metrics: Metrics) -> Handler:
    """The aiohttp handler for a multipart surface: the inference handler around `_serve_upload`."""
    return inference_handler(surface, default_model, metrics, serve=_serve_upload)


async def _serve_upload(
    request: web.Request, gw: Gateway, surface: Surface, default_model: str, meta: RequestMeta
) -> web.StreamResponse:
    key = await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]
    meta.team_id, meta.key_id, meta.key_limited = key.team_id, key.kid, key.limited
    upload = await Upload.open(request, gw.config.server, meta)
    try:
        name = await upload.until_key() or default_model
        if not name:
            raise GatewayError(Code.invalid_request, "Missing required form field `model`.", param="model")
        model_id, model = gw.routes.resolve(name, surface)
        meta.model = model_id
        await admit(gw, key, model_id, meta)
        targets = order_targets(model_id, model, None, gw.sort_key) if model.weighted else model.targets
        targets = gw.routes.usable(model_id, targets, key.team_name)
        return await _send(request, gw, surface, upload, model_id, targets, meta)
    finally:
        meta.request_bytes = upload.received
        upload.close()


async def _send(
    request: web.Request,
    gw: Gateway,
    surface: Surface,
    upload: Upload,
    model_id: str,
    targets: list[Target],
    meta: RequestMeta,
) -> web.StreamResponse:
    """Send the upload to the first target whose circuit lets it through; to the next only if the first
    could not be reached before any of the body was read."""
    failure: Retry | None = None
    for target in targets:
        health = gw.health.of(target)
        if not health.acquire(time.monotonic()):
            continue  # open circuit (or its one probe is in flight)
        upstream = gw.upstreams[target.provider]
        meta.provider, meta.upstream_model = target.provider, target.model
        meta.tariff = gw.pricing.tariff(model_id, target.provider)
        upload.key_value = target.model
        exchange = upload_exchange(surface.name, upload, upload.boundary, model_id)
        try:
            return await attempt(request, gw, upstream, exchange, health, meta, gw.config.meta.always, None)
        except Retry as r:
            if upload.started:
                return r.answer(meta)  # the upload was being consumed: it cannot be sent again
            failure = r
    if failure is not None:
        return failure.answer(meta)
    raise circuits_open(gw, model_id, targets)


@final
class Upload:
    """A client's multipart/form-data body, read once, as the provider takes it (an `exchange.Upload`)."""

    __slots__ = (
        "_held",
        "_in_memory",
        "_key",
        "_meta",
        "_model_headers",
        "_reader",
        "_request",
        "_spool",
        "boundary",
        "error",
        "idle_s",
        "key_value",
        "limit",
        "started",
    )

    def __init__(
        self,
        request: web.Request,
        reader: MultipartReader,
        boundary: str,
        server: ServerConfig,
        meta: RequestMeta,
        key: str = "model",
    ):
        self._request = request
        self._key = key  # the field the gateway needs before sending anything (media: `model`)
        self._reader = reader
        self._meta = meta
        self.boundary = boundary
        self.limit = server.max_upload_bytes
        self.idle_s = server.body_timeout_s  # the longest the client may pause while sending
        # Parts before `model`: their headers, and their bytes or (offset, length) in the spool.
        self._held: list[tuple[list[tuple[str, str]], bytes | tuple[int, int]]] = []
        self._in_memory = 0
        self._spool: IO[bytes] | None = None
        self._model_headers: list[tuple[str, str]] | None = None
        self.key_value = ""  # what the key field is sent upstream with (media: the upstream model's name)
        self.started = False  # the provider began to take the body: it cannot be sent elsewhere
        self.error: GatewayError | None = None

    @classmethod
    async def open(cls, request: web.Request, server: ServerConfig, meta: RequestMeta, key: str = "model") -> Upload:
        """The upload of `request`; GatewayError 400 unless it is multipart/form-data, 413 when its declared
        length is over `server.max_upload_bytes`."""
        content_type = request.headers.get("Content-Type", "")
        mimetype = parse_mimetype(content_type)
        boundary = mimetype.parameters.get("boundary", "")
        if (mimetype.type, mimetype.subtype) != ("multipart", "form-data") or not boundary:
            got = _printable(content_type[:100]) if content_type else "no Content-Type"
            raise GatewayError(
                Code.invalid_request,
                f"Expected a multipart/form-data body with a boundary (a file upload), got {got}.",
            )
        length = request.content_length
        if length is not None and length > server.max_upload_bytes:
            raise GatewayError(
                Code.payload_too_large,
                f"The upload is {length} bytes; the limit is {server.max_upload_bytes} (server.max_upload_bytes).",
            )
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError) as e:
            raise GatewayError(
                Code.invalid_request, f"The multipart body cannot be read: {_printable(str(e))}"
            ) from None
        return cls(request, reader, boundary, server, meta, key)

    @property
    def received(self) -> int:
        """Bytes of the body read from the client so far."""
        return self._request.content.total_bytes

    async def until_key(self) -> str:
        """Read the parts up to the key field (holding the ones before it) and return its value; "" when
        the form ends without one."""
        key = self._key
        while (part := await self._next_part()) is not None:
            headers = list(part.headers.items())
            if part.name == key:
                value = await self._small(part, MODEL_FIELD_MAX, key)
                self._model_headers = headers
                try:
                    return value.decode().strip()
                except UnicodeDecodeError:
                    raise self._fail(GatewayError(Code.invalid_request, f"`{key}` must be UTF-8 text.")) from None
            if len(self._held) >= MAX_HELD_PARTS:
                raise self._fail(
                    GatewayError(Code.invalid_request, f"More than {MAX_HELD_PARTS} form parts come before `{key}`.")
                )
            if part.filename is None:  # a text field: in memory unless it is long
                value = b""
                while not part.at_eof() and len(value) <= HELD_TEXT:
                    value += await self._read(part.read_chunk(CHUNK))
                if part.at_eof() and self._in_memory + len(value) <= HELD_MEMORY:
                    self._in_memory += len(value)
                    self._note(part, value)
                    self._held.append((headers, value))
                    continue
                self._held.append((headers, await self._spooled(part, value)))
            else:  # a file: never in memory
                self._held.append((headers, await self._spooled(part, b"")))
        return ""

    def holds(self, name: str) -> bool:
        """Whether a part called `name` came before the key field (and is held as it came)."""
        return any(_part_name(headers) == name for headers, _ in self._held)

    async def hold_rest(self, name: str, rewrite: Callable[[bytes], bytes], finish: Callable[[], bytes]) -> None:
        """Read the rest of the form now, spooling it; the part called `name` goes through `rewrite` chunk by
        chunk, then `finish` (their output is what the provider gets). For a body the gateway must check whole
        before sending any of it (a batch file)."""
        while (part := await self._next_part()) is not None:
            if part.name == self._key:
                raise self._fail(GatewayError(Code.invalid_request, f"The form has two `{self._key}` fields."))
            headers = [(k, v) for k, v in part.headers.items() if k.lower() != "content-length"]
            if part.name != name:
                self._held.append((headers, await self._spooled(part, b"")))
                continue
            start, length = await self._spooled(part, b"", rewrite)
            tail = finish()
            if tail:
                await asyncio.to_thread(self._spool.write, tail)  # type: ignore[union-attr]
            self._held.append((headers, (start, length + len(tail))))

    def payload(self) -> AsyncIterator[bytes]:
        """The form as the provider gets it (once): held parts, the rewritten `model`, then the rest as it
        comes from the client."""
        return self._emit()

    async def _emit(self) -> AsyncIterator[bytes]:
        self.started = True
        boundary = self.boundary.encode()
        for headers, value in self._held:
            yield part_head(boundary, headers)
            if isinstance(value, bytes):
                yield value
            else:
                async for chunk in self._unspool(*value):
                    yield chunk
            yield b"\r\n"
        key_headers = self._model_headers or [("Content-Disposition", f'form-data; name="{self._key}"')]
        yield part_head(boundary, key_headers) + self.key_value.encode() + b"\r\n"
        while (part := await self._next_part()) is not None:
            if part.name == self._key:
                message = f"The form has two `{self._key}` fields."
                raise self._fail(GatewayError(Code.invalid_request, message, param=self._key))
            yield part_head(boundary, part.headers.items())
            if part.name == "stream" and part.filename is None:
                value = await self._small(part, 64, "stream")
                self._note(part, value)
                yield value
            else:
                while not part.at_eof():
                    chunk = await self._read(part.read_chunk(CHUNK))
                    if chunk:
                        yield chunk
            yield b"\r\n"
        yield closing(boundary)

    def close(self) -> None:
        """Delete the spooled parts (an anonymous temporary file: closing it frees its disk space)."""
        if self._spool is not None:
            self._spool.close()

    # reading the client's body

    async def _next_part(self) -> BodyPartReader | None:
        part = await self._read(self._reader.next())
        if part is None or isinstance(part, BodyPartReader):
            return part
        raise self._fail(GatewayError(Code.invalid_request, "A nested multipart part is not supported in a form."))

    async def _small(self, part: BodyPartReader, most: int, name: str) -> bytes:
        value = b""
        while not part.at_eof():
            value += await self._read(part.read_chunk(CHUNK))
            if len(value) > most:
                raise self._fail(
                    GatewayError(Code.invalid_request, f"The form field `{name}` is over {most} bytes.", param=name)
                )
        return value

    async def _spooled(
        self, part: BodyPartReader, first: bytes, rewrite: Callable[[bytes], bytes] | None = None
    ) -> tuple[int, int]:
        """`first` and the rest of `part` (through `rewrite` if given), appended to the spool (an anonymous
        temporary file: disk, never memory); where they are in it."""
        if self._spool is None:
            self._spool = await asyncio.to_thread(tempfile.TemporaryFile)
        spool = self._spool
        start = await asyncio.to_thread(spool.seek, 0, 2)
        length = 0
        chunk = first
        while True:
            if chunk and rewrite is not None:
                chunk = rewrite(chunk)
            if chunk:
                await asyncio.to_thread(spool.write, chunk)
                length += len(chunk)
            if part.at_eof():
                return start, length
            chunk = await self._read(part.read_chunk(CHUNK))

    async def _unspool(self, start: int, length: int) -> AsyncIterator[bytes]:
        assert self._spool is not None
        spool = self._spool
        await asyncio.to_thread(spool.seek, start)
        while length > 0:
            chunk = await asyncio.to_thread(spool.read, min(CHUNK, length))
            if not chunk:
                raise OSError("the spooled upload is shorter than what was written")
            length -= len(chunk)
            yield chunk

    def _note(self, part: BodyPartReader, value: bytes) -> None:
        """A text field the gateway reads on its way: `stream` (an event-stream answer is relayed as such)."""
        if part.name == "stream":
            self._meta.stream = value.strip().lower() == b"true"

    async def _read(self, step: Awaitable[T]) -> T:
        """One read from the client, within the limits: `idle_s` of silence, `limit` bytes in all."""
        try:
            async with asyncio.timeout(self.idle_s):
                result = await step
        except TimeoutError:
            raise self._fail(
                GatewayError(
                    Code.request_timeout,
                    f"The upload stalled: nothing arrived for {self.idle_s:g} s (server.body_timeout_s).",
                )
            ) from None
        except ConnectionError:
            raise self._fail(
                GatewayError(
                    Code.invalid_request, "The client closed the connection during the upload.", status=CLIENT_CLOSED
                )
            ) from None
        except GatewayError as e:
            raise self._fail(e) from None
        except web.HTTPRequestEntityTooLarge:
            raise self._fail(self._too_large()) from None
        except Exception as e:  # the parser's complaint: a malformed body
            reason = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
            raise self._fail(
                GatewayError(Code.invalid_request, f"The multipart body is malformed: {_printable(reason[:300])}")
            ) from None
        if self._request.content.total_bytes > self.limit:
            raise self._fail(self._too_large())
        return result

    def _too_large(self) -> GatewayError:
        return GatewayError(
            Code.payload_too_large, f"The upload exceeds the limit of {self.limit} bytes (server.max_upload_bytes)."
        )

    def _fail(self, error: GatewayError) -> GatewayError:
        self.error = self.error or error
        return self.error


def _part_name(headers: list[tuple[str, str]]) -> str:
    disposition = next((v for k, v in headers if k.lower() == "content-disposition"), "")
    return parse_content_disposition(disposition)[1].get("name", "")


def _printable(text: str) -> str:
    """`text` safe to put in a JSON error: header bytes that are not UTF-8 arrive as lone surrogates."""
    return text.encode("utf-8", "backslashreplace").decode()
