"""The gateway's error codes and the envelopes they are rendered into.

Errors are data: a handler raises `GatewayError(Code.X, message)`; one place (`render`) turns it into
the client surface's own error shape so that SDKs raise their usual exception.
"""

from __future__ import annotations

import enum
from typing import Final

import orjson
from aiohttp import web


class Code(enum.Enum):
    """A gateway error code, with its HTTP status and OpenAI-style error `type`."""

    status: int
    type: str

    def __new__(cls, status: int, type_: str) -> Code:
        # Members share (status, type) pairs; a running number keeps Enum from making them aliases.
        member = object.__new__(cls)
        member._value_ = len(cls.__members__)
        member.status = status
        member.type = type_
        return member

    invalid_json = (400, "invalid_request_error")
    invalid_request = (400, "invalid_request_error")
    model_not_supported = (400, "invalid_request_error")
    ambiguous_model = (400, "invalid_request_error")
    content_policy_violation = (400, "invalid_request_error")  # the provider refused to make it (OpenAI's code)
    guardrail_blocked = (400, "invalid_request_error")  # a guardrail policy of the gateway refused it
    invalid_api_key = (401, "authentication_error")
    insufficient_credits = (402, "insufficient_credits")
    key_budget_exceeded = (402, "insufficient_credits")
    forbidden = (403, "permission_error")
    model_not_found = (404, "not_found_error")
    route_not_found = (404, "not_found_error")  # no route for this method and path
    not_found = (404, "not_found_error")  # the route exists; the object asked for does not (or is another team's)
    method_not_allowed = (405, "invalid_request_error")
    request_timeout = (408, "invalid_request_error")
    payload_too_large = (413, "invalid_request_error")
    too_many_streams = (429, "rate_limit_error")
    rate_limited = (429, "rate_limit_error")  # a key's or team's requests, tokens or concurrency a minute
    internal_error = (500, "api_error")
    upstream_unreachable = (502, "upstream_error")
    upstream_bad_response = (502, "upstream_error")
    upstream_timeout = (504, "upstream_error")
    upstream_error = (502, "upstream_error")  # the provider answered an error: its status and type are kept
    unavailable = (503, "api_error")


class GatewayError(Exception):
    """An error the gateway answers with its envelope."""

    __slots__ = ("code", "headers", "message", "param", "status", "type")

    def __init__(
        self, code: Code, message: str, *, param: str | None = None, status: int | None = None, type: str = ""
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status or code.status
        self.type = type or code.type  # a provider's own error type, when it sent one
        self.headers: dict[str, str] = {}  # sent with the error (a 429's Retry-After)


# Dialects: how an error is shaped for the client that asked.
OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"
PLATFORM: Final = "platform"


def error_body(err: GatewayError, request_id: str | None, dialect: str = OPENAI) -> dict:
    """The JSON object for `err` in the client's dialect."""
    if dialect == PLATFORM:
        body: dict = {"ok": False, "error": err.code.name, "message": err.message}
    elif dialect == ANTHROPIC:
        body = {"type": "error", "error": {"type": err.type, "message": err.message}}
    else:
        body = {
            "error": {
                "message": err.message,
                "type": err.type,
                "code": err.code.name,
                "param": err.param,
            }
        }
    if request_id:
        body["request_id"] = request_id
    return body


def render(err: GatewayError, request_id: str | None, dialect: str = OPENAI) -> web.Response:
    """`err` as an HTTP response carrying the envelope and the request id."""
    headers = {"x-request-id": request_id} if request_id else {}
    if err.headers:
        headers.update(err.headers)
    return web.Response(
        status=err.status,
        body=orjson.dumps(error_body(err, request_id, dialect)),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(err: GatewayError, request_id: str | None) -> bytes:
    """A final SSE event in the OpenAI stream idiom: the `openai` SDK raises `APIError` on it."""
    return b"data: " + orjson.dumps(error_body(err, request_id)) + b"\n\n"
