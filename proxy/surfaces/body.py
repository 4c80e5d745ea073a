"""Reading a client's request body, for every handler: bounded in size and time, and valid UTF-8."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.config import ServerConfig
from proxy.errors import Code, GatewayError


async def read_body(request: web.Request, server: ServerConfig) -> bytes:
    """The whole body, within `server.max_body_bytes` and `server.body_timeout_s` (a slow upload must not
    hold a slot), checked to be UTF-8 (JSON's encoding) so that no decoder downstream meets bad bytes."""
    limit = server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise GatewayError(Code.payload_too_large, f"The request body is {length} bytes; the limit is {limit}.")
    try:
        content = request.content
        if length is not None and content.is_eof():  # the common case: it came with the headers
            body = content.read_nowait()  # the buffer as it is (`request.read()` copies it twice)
            if len(body) > limit:  # e.g. a small compressed body that decodes to a large one
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
        elif content.is_eof():
            body = await request.read()
        else:
            async with asyncio.timeout(server.body_timeout_s):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(Code.payload_too_large, f"The request body exceeds the limit of {limit} bytes.") from None
    except TimeoutError:
        raise GatewayError(
            Code.request_timeout,
            f"The request body did not arrive within {server.body_timeout_s:g} s (server.body_timeout_s).",
        ) from None
    except RequestPayloadError as e:  # e.g. a body that does not match its Content-Encoding
        reason = str(e).strip().splitlines()[-1].strip()
        raise GatewayError(Code.invalid_request, f"The request body could not be read: {reason}.") from None
    if not body.isascii():  # free for ASCII bodies (most SDKs escape non-ASCII); a decode otherwise
        try:
            body.decode()
        except UnicodeDecodeError as e:
            raise GatewayError(
                Code.invalid_json, f"The request body is not valid UTF-8 (byte {e.start} is {body[e.start]:#04x})."
            ) from None
    return body
