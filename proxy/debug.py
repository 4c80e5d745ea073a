"""`echo_upstream_request` and `debug.return_upstream_*`: show a client what the gateway sent to the provider
and what came back (the reference's `upstream_request` / `upstream_response`), credentials redacted.

Asked for per request; nothing here runs otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, final

import msgspec
import orjson
from msgspec import UNSET, Raw, UnsetType
from yarl import URL

from proxy.errors import Code, GatewayError

REDACTED: Final = "[redacted]"
# Headers that carry a provider credential, whatever the provider kind.
_SECRET_HEADERS: Final = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization"})
_SECRET_QUERY: Final = frozenset({"key", "api_key", "apikey", "token", "access_token"})
MAX_CAPTURE: Final = 256 * 1024  # of a streamed answer, at most this much is returned


class _Debug(msgspec.Struct):
    enabled: bool = False
    return_upstream_request: bool = False
    return_upstream_response: bool = False


_debug_decoder = msgspec.json.Decoder(_Debug)
_bool_decoder = msgspec.json.Decoder(bool | None)


@final
class Echo:
    """What one request asked to see, and what was seen so far."""

    __slots__ = ("_captured", "_sent", "request", "response")

    def __init__(self, request: bool, response: bool):
        self.request = request
        self.response = response
        self._sent = b""
        self._captured = bytearray()

    def sent(self, url: URL, headers: Mapping[str, str], body: bytes, secret: str) -> None:
        if self.request:
            self._sent = upstream_request(url, headers, body, secret)

    def capture(self, chunk: bytes) -> None:
        """Keep a streamed answer's bytes (up to MAX_CAPTURE + one chunk)."""
        if self.response and len(self._captured) <= MAX_CAPTURE:
            self._captured += chunk

    def members(self, status: int, headers: Mapping[str, str], body: bytes | None, secret: str) -> bytes:
        """The members to add to the answer; `body` None for a stream (what `capture` kept is shown)."""
        parts = [self._sent] if self._sent else []
        if self.response:
            streamed = body is None
            shown = bytes(self._captured) if body is None else body
            parts.append(upstream_response(status, headers, shown, streamed, secret))
        return b",".join(parts)


def wanted(echo: Raw | UnsetType, debug: Raw | UnsetType) -> Echo | None:
    """The request's ask, from its `echo_upstream_request` and `debug` members; None when it asked nothing."""
    if echo is UNSET and debug is UNSET:
        return None
    try:
        want_request = bool(_bool_decoder.decode(echo)) if echo is not UNSET else False
        options = _debug_decoder.decode(debug) if debug is not UNSET and bytes(debug) != b"null" else _Debug()
    except msgspec.ValidationError as e:
        raise GatewayError(
            Code.invalid_request,
            f"Invalid request: {e} (echo_upstream_request is a boolean; debug is an object of booleans "
            "enabled, return_upstream_request, return_upstream_response)",
            param="debug" if debug is not UNSET else "echo_upstream_request",
        ) from None
    want_request = want_request or options.return_upstream_request
    if not want_request and not options.return_upstream_response:
        return None
    return Echo(want_request, options.return_upstream_response)


def _redact_headers(headers: Mapping[str, str], secret: str) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        hidden = name.lower() in _SECRET_HEADERS or (secret and secret in value)
        out[str(name)] = REDACTED if hidden else str(value)
    return out


def _redact_url(url: URL) -> str:
    if not any(name.lower() in _SECRET_QUERY for name in url.query):
        return str(url)
    return str(url.with_query({k: REDACTED if k.lower() in _SECRET_QUERY else v for k, v in url.query.items()}))


def _json_or_text(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def upstream_request(url: URL, headers: Mapping[str, str], body: bytes, secret: str) -> bytes:
    """The `"upstream_request":{…}` member."""
    echoed = {
        "method": "POST",
        "url": _redact_url(url),
        "headers": _redact_headers(headers, secret),
        "body": _json_or_text(body),
    }
    return b'"upstream_request":' + orjson.dumps(echoed)


def upstream_response(status: int, headers: Mapping[str, str], body: bytes, streamed: bool, secret: str) -> bytes:
    """The `"upstream_response":{…}` member: a whole body, or the raw events of a stream (capped)."""
    echoed: dict[str, Any] = {"status": status, "headers": _redact_headers(headers, secret)}
    if streamed:
        echoed["events"] = body[:MAX_CAPTURE].decode("utf-8", "replace")
        echoed["truncated"] = len(body) > MAX_CAPTURE
    else:
        echoed["body"] = _json_or_text(body)
    return b'"upstream_response":' + orjson.dumps(echoed)
