"""Batch files (OpenAI's JSONL: one request per line) on their way in, and their results on their way out.

In: every line is checked and its `body.model` rewritten from the gateway's model name to the provider's,
as the file streams through (`BatchLines.feed`), so a bad line is a 400 naming its number before anything
reaches the provider. A batch runs one model at one provider (OpenAI's rule), taken from the first line.

Out: the usage of every successful result line of an output file, summed (`BatchUsage`), for the bill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

import msgspec
import orjson
from msgspec import Raw

from proxy.config import ModelConfig, Target
from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.translators import openai, responses_native

# The endpoints a batch line may call, and the surface each is routed as.
SURFACE_OF: Final = {
    "/v1/chat/completions": "openai.chat",
    "/v1/embeddings": "openai.embeddings",
    "/v1/responses": "openai.responses",
    "/v1/moderations": "openai.moderations",
}
BATCH_KINDS: Final = frozenset({"openai", "openai-compatible"})  # provider kinds with OpenAI's Batch API
MAX_LINE: Final = 16 * 1024 * 1024

Resolve = Callable[[str, str], tuple[str, ModelConfig]]  # (model name, surface name) -> (model id, model)


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    custom_id: str
    method: str
    url: str
    body: Raw


class _Model(msgspec.Struct):
    model: str = ""


_line_decoder = msgspec.json.Decoder(_Line)
_model_decoder = msgspec.json.Decoder(_Model)
_encoder = msgspec.json.Encoder()


@final
class BatchLines:
    """A batch input file, rewritten line by line as it streams: `feed` each chunk, then `finish`; both
    return the bytes to send on. `model_id`, `target` and `url` are those of the first line; every other
    line must name the same model and endpoint."""

    __slots__ = ("_kinds", "_partial", "_resolve", "count", "model_id", "target", "url")

    def __init__(self, resolve: Resolve, kinds: dict[str, str]):
        self._resolve = resolve
        self._kinds = kinds  # provider name -> kind
        self._partial = b""
        self.count = 0
        self.model_id = ""
        self.url = ""
        self.target: Target | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._partial = data
            if len(data) > MAX_LINE:
                raise self._error(f"is longer than {MAX_LINE} bytes", self.count + 1)
            return b""
        self._partial = data[end + 1 :]
        return b"".join(self._line(line) for line in data[:end].split(b"\n"))

    def finish(self) -> bytes:
        out = self._line(self._partial)
        self._partial = b""
        if not self.count:
            raise GatewayError(Code.invalid_request, "The batch file has no requests: one JSON object a line.")
        return out

    def _line(self, line: bytes) -> bytes:
        line = line.rstrip(b"\r")
        if not line.strip():
            return b""
        self.count += 1
        number = self.count
        try:
            request = _line_decoder.decode(line)
            name = _model_decoder.decode(request.body).model
        except msgspec.DecodeError as e:
            raise self._error(
                f"is not a batch request ({{custom_id, method, url, body}} with a JSON object body): {e}", number
            ) from None
        if request.method != "POST":
            raise self._error(f"has method {request.method!r}; batch requests are POST", number)
        surface = SURFACE_OF.get(request.url)
        if surface is None:
            raise self._error(f"calls {request.url!r}; a batch may call {', '.join(SURFACE_OF)}", number)
        if not name:
            raise self._error("has no `body.model`", number)
        try:
            model_id, model = self._resolve(name, surface)
        except GatewayError as e:
            raise self._error(e.message, number) from None
        if self.target is None:
            self.model_id, self.url = model_id, request.url
            self.target = next((t for t in model.targets if self._kinds.get(t.provider) in BATCH_KINDS), None)
            if self.target is None:
                raise self._error(f"names {model_id!r}, which has no provider with OpenAI's Batch API", number)
        elif model_id != self.model_id or request.url != self.url:
            raise self._error(
                f"calls {model_id!r} at {request.url}; a batch runs one model at one endpoint, as its first line "
                f"does ({self.model_id!r} at {self.url})",
                number,
            )
        body = openai.patch_members(request.body, {"model": orjson.dumps(self.target.model)})
        return _encoder.encode(_Line(request.custom_id, request.method, request.url, Raw(body))) + b"\n"

    @staticmethod
    def _error(what: str, number: int) -> GatewayError:
        return GatewayError(Code.invalid_request, f"Line {number} of the batch file {what}.", param="file")


# ---------------------------------------------------------------------------------------------------------
# results


class _Response(msgspec.Struct):
    status_code: int = 0
    body: Raw = Raw(b"")  # Raw, not `Raw | None`: msgspec reads that union as "null only"


class _Result(msgspec.Struct):
    response: _Response | None = None


_result_decoder = msgspec.json.Decoder(_Result)
_SUMMED: Final = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


@final
class BatchUsage:
    """The usage of an output file's successful results, summed as its lines stream by (`feed`, `finish`)."""

    __slots__ = ("_partial", "_read", "requests", "usage")

    def __init__(self, url: str):
        self._read = responses_native.response_usage if url == "/v1/responses" else openai.response_view
        self._partial = b""
        self.usage = Usage()
        self.requests = 0  # results with a usage

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._partial = data
            return
        self._partial = data[end + 1 :]
        for line in data[:end].split(b"\n"):
            self._line(line)

    def finish(self) -> Usage:
        self._line(self._partial)
        self._partial = b""
        return self.usage

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            result = _result_decoder.decode(line)
            if result.response is None or not result.response.body or result.response.status_code >= 400:
                return
            usage, _ = self._read(bytes(result.response.body))
        except (msgspec.DecodeError, GatewayError):
            return  # a line that is not a result bills nothing
        if usage is None:
            return
        self.requests += 1
        for name in _SUMMED:
            setattr(self.usage, name, getattr(self.usage, name) + getattr(usage, name))
