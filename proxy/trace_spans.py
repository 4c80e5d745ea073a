"""A finished request's spans as OTLP/JSON, written as bytes where the request ends (`proxy.telemetry.Tracer.end`).

Each request becomes one SERVER span (`{operation} {model}`), a CLIENT span per upstream attempt and a
`gen_ai.first_token` event. What repeats from request to request (operation, models, provider, team, key,
request parameters, server address, finish reasons) is encoded once per distinct set and kept; the rest goes
through templates, the common request's two spans (answered on its one attempt) in one, its fixed names and
attributes written in: about 2 µs a request in a microbenchmark on the 2-core VM. A batch is wrapped in an
export request (`EXPORT`) by the worker or by the exporter process (`proxy.trace_export`); with
`capture_content`, the exporter also renders the messages into the spans (`pending`, `with_content`), so that
the serving thread does not decode requests and answers for them. Trace and span ids are lowercase hex,
cut from blocks of random bytes (`new_trace_id`, `new_span_id`).
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, final

import orjson

if TYPE_CHECKING:
    from proxy.meta import RequestMeta
    from proxy.telemetry import Trace

# gen_ai.operation.name by surface (the conventions' names; a surface they do not name is its own), and
# gen_ai.provider.name by provider kind.
OPERATIONS: Final = {
    "openai.chat": "chat",
    "openai.responses": "chat",
    "anthropic.messages": "chat",
    "openai.embeddings": "embeddings",
    "openai.images.generations": "generate_content",
    "openai.images.edits": "generate_content",
    "openai.audio.speech": "generate_content",
    "openai.audio.transcriptions": "generate_content",
    "openai.audio.translations": "generate_content",
    "openai.videos": "generate_content",
    "music.generate": "generate_content",
}
PROVIDERS: Final = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
SERVER: Final = 2  # OTLP's SpanKind
CLIENT: Final = 3
_MEMO_MAX: Final = 4096  # distinct sets of fixed attributes kept encoded (per kind of set)

EXPORT: Final = (  # an export request: the resource's attributes, then the spans
    b'{"resourceSpans":[{"resource":{"attributes":[%b]},'
    b'"scopeSpans":[{"scope":{"name":"stats-gateway"},"spans":[%b]}]}]}'
)
# One span; its attributes: the fixed set (encoded once), then the varying ones, each with its leading comma.
_SPAN: Final = (
    b'{"traceId":"%b","spanId":"%b",%b"name":%b,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d",'
    b'"attributes":[%b%b]%b}'
)
_STATUS_CODE: Final = b',{"key":"http.response.status_code","value":{"intValue":"%d"}}'
_ATTEMPTS: Final = b',{"key":"gateway.attempts","value":{"intValue":"%d"}}'
_TOKENS: Final = (
    b',{"key":"gen_ai.usage.input_tokens","value":{"intValue":"%d"}}'
    b',{"key":"gen_ai.usage.output_tokens","value":{"intValue":"%d"}}'
)
_COST: Final = b',{"key":"gateway.cost_nanos","value":{"intValue":"%d"}}'
_RESPONSE_ID: Final = b',{"key":"gen_ai.response.id","value":{"stringValue":%b}}'
_ERROR_TYPE: Final = b',{"key":"error.type","value":{"stringValue":%b}}'
_FINISH_REASONS: Final = b',{"key":"gen_ai.response.finish_reasons","value":{"arrayValue":{"values":[%b]}}}'
_STRING: Final = b',{"key":"%b","value":{"stringValue":%b}}'
_FIRST_TOKEN: Final = b',"events":[{"name":"gen_ai.first_token","timeUnixNano":"%d"}]'
_FAILED: Final = b',"status":{"code":2}'  # OTLP's STATUS_CODE_ERROR
CONTENT: Final = b"\x00"  # where a span's content attributes go (never in JSON text: it writes \u0000)
# The common request in one template: answered on its one attempt, with usage, a cost and a response id; its
# SERVER span, then its CLIENT span. Each distinct set of fixed figures writes its names and fixed attributes
# into it once (`Encoder._answered_template`); what is left to fill is a request's own.
_ANSWERED: Final = (
    b'{"traceId":"%%b","spanId":"%%b",%%b"name":%b,"kind":2,"startTimeUnixNano":"%%d","endTimeUnixNano":"%%d",'
    b'"attributes":[%b'
    + (_STATUS_CODE + _ATTEMPTS % 1 + _RESPONSE_ID + _TOKENS + _COST).replace(b"%", b"%%")
    + b'%%b]%%b},{"traceId":"%%b","spanId":"%%b","parentSpanId":"%%b","name":%b,"kind":3,"startTimeUnixNano":"%%d",'
    b'"endTimeUnixNano":"%%d","attributes":[%b' + _STATUS_CODE.replace(b"%", b"%%") + b"]}"
)


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}


def attributes(pairs: Iterable[Any]) -> bytes:
    """OTLP/JSON attributes of (name, value) pairs, without the list's brackets."""
    return orjson.dumps([{"key": k, "value": _value(v)} for k, v in pairs])[1:-1]


@final
class _Kind:
    """What a set of fixed figures makes, once: the server span's name and fixed attributes, and what the
    attempts' spans name."""

    __slots__ = ("attributes", "model", "name", "operation")

    def __init__(
        self,
        surface: str,
        model: str,
        provider: str,
        upstream_model: str,
        request: tuple[tuple[str, Any], ...],
        team: str,
        key_id: str,
        cache: str,
        policies: tuple[str, ...],
    ):
        self.operation = operation = OPERATIONS.get(surface, surface)
        self.model = upstream_model or model  # the attempts' model
        pairs: list[Any] = [("gen_ai.operation.name", operation), ("gen_ai.request.model", model)]
        if provider:
            pairs.append(("gen_ai.provider.name", PROVIDERS.get(provider, provider)))
        if upstream_model:
            pairs.append(("gen_ai.response.model", upstream_model))
        pairs += request
        pairs += [("gateway.team", team), ("gateway.key_id", key_id)]  # never a secret: the key by its id
        if cache:
            pairs.append(("gateway.cache", cache))
        if policies:
            pairs.append(("gateway.guardrails", policies))
        self.name = orjson.dumps(f"{operation} {model}" if model else operation)
        self.attributes = attributes(pairs)


@final
class Encoder:
    """Requests' spans as OTLP/JSON: `request` gives one request's spans, comma-separated (a batch of them is
    wrapped in an export request by the exporter process)."""

    __slots__ = ("_answered", "_clients", "_kinds", "_reasons", "capture_chars")

    def __init__(self, capture_chars: int):
        self.capture_chars = capture_chars  # content recorded per request (0: none)
        self._kinds: dict[tuple, _Kind] = {}  # fixed figures → what they make
        self._reasons: dict[tuple[str, ...], bytes] = {}  # finish reasons → their attribute
        self._clients: dict[tuple, tuple[bytes, bytes]] = {}  # (fixed figures, provider, address) → name, attributes
        self._answered: dict[tuple, bytes] = {}  # (*fixed figures, provider, address) → the common request's template

    def request(self, meta: RequestMeta, trace: Trace, reasons: tuple[str, ...], end: float, wall: int) -> bytes:
        """One request's spans: its SERVER span and a CLIENT span per upstream attempt. `wall`: nanoseconds
        since the epoch at `perf_counter()` 0. Raises `orjson.JSONEncodeError` on text that is not Unicode."""
        policies = tuple(found["policy"] for found in meta.guardrails) if meta.guardrails else ()
        finish = self._reasons.get(reasons) if reasons else b""
        if finish is None:
            finish = _memo(self._reasons, reasons, _finish_reasons)
        parent = b'"parentSpanId":"%b",' % trace.parent_id if trace.parent_id else b""
        first = _FIRST_TOKEN % (wall + int(meta.t_first_token * 1e9)) if meta.t_first_token else b""
        attempts, ids, usage, status, native = meta.attempts, trace.attempt_ids, meta.usage, meta.status, meta.native_id
        if (
            len(ids) == 1
            and len(attempts) == 1
            and usage is not None
            and meta.cost_nanos
            and native
            and status < 400
            and not meta.error_code
            and not trace.state
            and not (self.capture_chars and trace.sent)
            and 0 < attempts[0][1] < 400
        ):  # the common request, in one template
            (who, code, started, ended), (attempt_id, address) = attempts[0], ids[0]
            figures = (
                meta.surface, meta.model, meta.provider, meta.upstream_model, trace.request, meta.team_id,
                meta.key_id, meta.cache_status, policies, who, address,
            )  # fmt: skip
            answered = self._answered.get(figures)
            if answered is None:
                answered = _memo(self._answered, figures, self._answered_template)
            trace_id, span_id = trace.trace_id, trace.span_id
            return answered % (
                trace_id, span_id, parent, wall + int(meta.t_start * 1e9), wall + int(end * 1e9),
                status, orjson.dumps(native), usage.input_tokens, usage.output_tokens, meta.cost_nanos, finish, first,
                trace_id, attempt_id, span_id, wall + int(started * 1e9), wall + int((ended or started) * 1e9), code,
            )  # fmt: skip
        fixed = (
            meta.surface,
            meta.model,
            meta.provider,
            meta.upstream_model,
            trace.request,
            meta.team_id,
            meta.key_id,
            meta.cache_status,
            policies,
        )
        kind = self._kinds.get(fixed)
        if kind is None:
            kind = _memo(self._kinds, fixed, _Kind)
        return self._spans(meta, trace, end, wall, fixed, kind, finish, parent, first)

    def _answered_template(self, *figures: Any) -> bytes:
        """The common request's two spans for these figures (the server span's fixed figures, then the attempt's
        provider and address): `_ANSWERED` with what they make written in."""
        fixed, (provider, address) = figures[:-2], figures[-2:]
        kind = self._kinds.get(fixed) or _memo(self._kinds, fixed, _Kind)
        name, attributes = self._client(fixed, provider, address)
        parts = (kind.name, kind.attributes, name, attributes)
        return _ANSWERED % tuple(part.replace(b"%", b"%%") for part in parts)

    def _spans(
        self,
        meta: RequestMeta,
        trace: Trace,
        end: float,
        wall: int,
        fixed: tuple,
        kind: _Kind,
        finish: bytes,
        parent: bytes,
        first: bytes,
    ) -> bytes:
        """Any request's spans, attribute by attribute."""
        status, error_code, attempts, usage = meta.status, meta.error_code, meta.attempts, meta.usage
        failed = status >= 400 or bool(error_code)
        varying = _STATUS_CODE % status + _ATTEMPTS % len(attempts)
        if meta.native_id:
            varying += _RESPONSE_ID % orjson.dumps(meta.native_id)
        if usage is not None:
            varying += _TOKENS % (usage.input_tokens, usage.output_tokens)
        if meta.cost_nanos:
            varying += _COST % meta.cost_nanos
        varying += finish
        if failed:
            varying += _ERROR_TYPE % orjson.dumps(error_code or str(status))
        if self.capture_chars and trace.sent:
            varying += CONTENT  # where the exporter puts the messages (`with_content`)
        tail = first + _FAILED if failed else first
        trace_id, span_id = trace.trace_id, trace.span_id
        state = b'"traceState":%b,' % orjson.dumps(trace.state) if trace.state else b""
        start, finished = wall + int(meta.t_start * 1e9), wall + int(end * 1e9)
        server = (trace_id, span_id, parent + state, kind.name, SERVER, start, finished, kind.attributes, varying, tail)
        spans = [_SPAN % server]
        caller = b'"parentSpanId":"%b",%b' % (span_id, state)
        ids = trace.attempt_ids
        if len(ids) < len(attempts):  # attempts that sent no traceparent: spans with ids of their own
            ids = ids + [(new_span_id(), "") for _ in range(len(attempts) - len(ids))]
        for (who, code, started, ended), (attempt_id, address) in zip(attempts, ids, strict=False):
            name, fixed_attributes = _memo(self._clients, (fixed, who, address), self._client)
            if 0 < code < 400:
                varying, tail = _STATUS_CODE % code, b""
            else:
                varying = _STATUS_CODE % code + _ERROR_TYPE % orjson.dumps(str(code) if code else "unreachable")
                tail = _FAILED
            start, finished = wall + int(started * 1e9), wall + int((ended or started) * 1e9)
            spans.append(
                _SPAN % (trace_id, attempt_id, caller, name, CLIENT, start, finished, fixed_attributes, varying, tail)
            )
        return b",".join(spans)

    def _client(self, fixed: tuple, provider: str, address: str) -> tuple[bytes, bytes]:
        """A CLIENT span's name and fixed attributes: an attempt at `provider` (`address`) for these figures."""
        kind = self._kinds.get(fixed) or _memo(self._kinds, fixed, _Kind)
        operation, model = kind.operation, kind.model
        pairs = [
            ("gen_ai.operation.name", operation),
            ("gen_ai.provider.name", PROVIDERS.get(provider, provider)),
            ("gen_ai.request.model", model),
        ]
        if address:
            pairs.append(("server.address", address))
        return orjson.dumps(f"{operation} {model}"), attributes(pairs)


def pending(spans: bytes, meta: RequestMeta, trace: Trace) -> bytes:
    """A request's spans with content still to render (`CONTENT` marks where), and what it is rendered from:
    one JSON text, `[spans, surface, request as sent, answer, streamed]`, for the exporter process."""
    answer = trace.answer.decode("utf-8", "replace")
    return orjson.dumps((spans.decode(), meta.surface, trace.sent.decode("utf-8", "replace"), answer, trace.streamed))


def with_content(items: bytes, limit: int) -> bytes:
    """Requests' spans (comma-separated) from a JSON array of `pending` texts, their content rendered: the
    request's and the answer's messages in the conventions' shape, `limit` characters of text at most each.
    Raises ValueError (orjson's) when `items` cannot be read."""
    from proxy import trace_content  # the surfaces' decoders: imported only when content is captured

    out = []
    for spans, surface, sent, answer, streamed in orjson.loads(items):
        before, marked, after = spans.partition(CONTENT.decode())
        if not marked:
            out.append(spans.encode())
            continue
        content = trace_content.messages(surface, sent.encode(), answer.encode(), streamed, limit)
        rendered = b"".join([_STRING % (name.encode(), orjson.dumps(text)) for name, text in content])
        out.append(before.encode() + rendered + after.encode())
    return b",".join(out)


def _ids(size: int) -> Callable[[], bytes]:
    """What gives ids of `size` random bytes, in lowercase hex (ASCII bytes), one at a time from `_drawn`."""
    ids: Iterator[bytes] = iter(())

    def take() -> bytes:
        nonlocal ids
        for found in ids:
            return found
        ids = _drawn(size)
        return take()

    return take


def _drawn(size: int) -> Iterator[bytes]:
    """Ids of `size` random bytes, in hex, drawn 4 KB at a time (one draw and one split instead of drawing and
    formatting each); never all zeros, which W3C and OTLP read as none."""
    ids = binascii.hexlify(os.urandom(_ID_BLOCK), b" ", size).split()
    zero = b"00" * size
    while zero in ids:
        ids.remove(zero)
    return iter(ids)


_ID_BLOCK: Final = 4096  # random bytes drawn at once: 256 trace ids, or 512 span ids
new_trace_id: Final = _ids(16)  # a trace id: 128 random bits, as 32 hex digits
new_span_id: Final = _ids(8)  # a span id: 64 random bits, as 16 hex digits


def _memo(memo: dict, key: Any, make: Any) -> Any:
    """What `make(*key)` gives, made once per distinct key (at most _MEMO_MAX kept)."""
    done = memo.get(key)
    if done is None:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        done = memo[key] = make(*key)
    return done


def _finish_reasons(*reasons: str) -> bytes:
    return _FINISH_REASONS % b",".join([b'{"stringValue":%b}' % orjson.dumps(reason) for reason in reasons])
