"""Inference surfaces: chat completions, responses, messages (streamed or not), embeddings, moderations,
JSON media (image generations, speech, rerank, OCR), and the model list.

One handler serves every inference surface: authenticate, read and check the body, resolve the model,
check credit, plan the translation (`proxy.translators.exchange`), forward to the first target and send
back what it answers in the client's own format, with meta when asked. Multipart uploads take the same
handler with their own `serve` step (`proxy.surfaces.media`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, final

import msgspec
import orjson
from aiohttp import web
from msgspec import UNSET

from proxy.access import META
from proxy.auth import token_from_headers
from proxy.client import ClientError, ConnectError, ConnectTimeout, Response
from proxy.config import ModelConfig, Target
from proxy.debug import Echo, wanted
from proxy.errors import Code, GatewayError, render
from proxy.gateway import GATEWAY, Gateway
from proxy.guardrails.policy import Guarded, Guardrails, Policy
from proxy.limits import estimate
from proxy.meta import RequestMeta, new_request_id
from proxy.metrics import Metrics
from proxy.resilience import (
    FALLBACK_STATUSES,
    RETRYABLE_STATUSES,
    Health,
    decode_prefs,
    order_targets,
    retry_after,
    retry_delay,
)
from proxy.response_cache import SURFACES as CACHED_SURFACES
from proxy.routing import Surface
from proxy.shared_limits import DOWN
from proxy.sse import SSE_HEADERS, SSEError
from proxy.store.base import KeyRecord
from proxy.surfaces.body import read_body
from proxy.surfaces.cached import answer_hit, entry_of
from proxy.translators.exchange import Exchange, Relay, plan
from proxy.translators.openai import RequestView, decode_request
from proxy.upstream import Upstream

log = logging.getLogger("proxy.surfaces.inference")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[web.Request, Gateway, Surface, str, RequestMeta], Awaitable[web.StreamResponse]]

DROPPED_HEADER = "x-gateway-dropped-params"  # request parameters the provider could not honour, left out
CLIENT_CLOSED = 499  # nginx's convention: the client went away before the answer was complete
_TRANSPORT_ERRORS = (ClientError,)  # the lean client's failures (its timeouts are TimeoutErrors too)
_encode = msgspec.json.Encoder().encode
_DRAIN_BYTES = 64 * 1024  # after [DONE], read at most this much ...
_DRAIN_S = 1.0  # ... for at most this long, before closing the upstream connection instead


def _check_required(view: object, surface: Surface) -> None:
    for field in surface.required:
        raw = getattr(view, field)
        if raw is UNSET:
            raise GatewayError(Code.invalid_request, f"Missing required field `{field}`.", param=field)
        first = bytes(raw)[:1]
        if field == "messages" and first != b"[":
            raise GatewayError(Code.invalid_request, "`messages` must be an array of message objects.", param=field)
        if field == "input" and first not in (b"[", b'"'):
            raise GatewayError(Code.invalid_request, "`input` must be a string or an array.", param=field)


def inference_handler(surface: Surface, default_model: str, metrics: Metrics, serve: Serve | None = None) -> Handler:
    """The aiohttp handler for an inference surface (any of the client APIs). `serve` reads the request and
    answers it (default: a JSON body, `_serve`); around it the handler keeps the meta, renders errors in the
    surface's shape, accounts the request and counts it in the metrics."""
    in_flight = metrics.in_flight.labels(surface.name)
    serve = serve or _serve

    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        meta = RequestMeta(new_request_id(), surface.name, time.perf_counter())
        request[META] = meta  # for the access log
        if gw.tracer is not None:
            meta.trace = gw.tracer.of(request.headers)
        in_flight.inc()
        try:
            response = await serve(request, gw, surface, default_model, meta)
            if not response.prepared:  # a stream sent these with its head
                if meta.limits is not None:
                    response.headers.update(meta.limits.headers)
                if meta.cache is not None:
                    response.headers.setdefault("x-cache", meta.cache.status)
            return response
        except GatewayError as e:
            meta.status, meta.error_code, meta.error_message = e.status, e.code.name, e.message
            if meta.limits is not None:  # admitted, then failed: the limits it counted against still show
                e.headers = {**meta.limits.headers, **e.headers}
            return render(e, meta.request_id, surface.dialect)
        except asyncio.CancelledError:
            if not meta.finished:
                meta.status = CLIENT_CLOSED
            raise
        except Exception:
            log.exception("request %s failed", meta.request_id)
            meta.status = 500
            return render(
                GatewayError(Code.internal_error, "The gateway failed to serve this request."),
                meta.request_id,
                surface.dialect,
            )
        finally:
            in_flight.dec()
            if meta.cache is not None:
                meta.cache.owner.end(
                    meta.cache, surface.name, meta.saved_nanos
                )  # waiters of a failed answer go on their own
            _account(gw, meta)  # first: it prices an abandoned stream, which metrics then count
            gw.metrics.record(meta, meta.t_end)
            if meta.trace is not None:
                gw.tracer.end(meta, time.perf_counter())  # type: ignore[union-attr]
            if meta.hold:  # after `_account`: its real cost is debited now
                gw.wallets.release(  # type: ignore[union-attr]
                    meta.team_id, meta.hold, meta.request_id if meta.hold_shared else ""
                )
            if meta.limits is not None:  # after `_account`: an abandoned stream's usage is estimated there
                usage = meta.usage
                used = (usage.input_tokens + usage.output_tokens) if usage is not None else 0
                gw.limiter.settle(meta.limits, used, time.monotonic())

    return handle


async def _serve(
    request: web.Request, gw: Gateway, surface: Surface, default_model: str, meta: RequestMeta
) -> web.StreamResponse:
    key = await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]
    meta.team_id, meta.key_id, meta.key_limited = key.team_id, key.kid, key.limited
    body = await read_body(request, gw.config.server)
    meta.request_bytes = len(body)
    view = decode_request(body)
    _check_required(view, surface)
    bound = view.output_bound()  # guardrails redact text, never this
    if meta.trace is not None:
        meta.trace.request = _request_attributes(view, bound)
    name = view.model if view.model is not UNSET else default_model
    if not name:
        raise GatewayError(Code.invalid_request, "Missing required field `model`.", param="model")
    model_id, model = gw.routes.resolve(name, surface)
    meta.model = model_id
    policies = gw.guardrails.of(key)
    if policies:
        body, view = await _guard(gw.guardrails, policies, surface, body, view, model_id, key, meta)
    stream = surface.streaming and view.stream
    meta.stream = stream
    if meta.trace is not None and gw.tracer.capture:  # type: ignore[union-attr]
        meta.trace.sent = body  # as the provider gets it (redacted): read for the span when it is exported
    wants_meta = view.meta if isinstance(view.meta, bool) else gw.config.meta.always
    if surface.name in CACHED_SURFACES:
        hit = await _from_cache(request, gw, surface, body, view, key, meta, stream, wants_meta)
        if hit is not None:
            return hit
    tokens = estimate(len(body), bound, gw.limiter.default_output)
    await admit(gw, key, model_id, meta, tokens)

    prefs = decode_prefs(view.provider)
    targets = order_targets(model_id, model, prefs, gw.sort_key) if prefs or model.weighted else model.targets
    targets = gw.routes.usable(model_id, targets, key.team_name)
    echo = wanted(view.echo_upstream_request, view.debug)
    if stream and gw.config.server.max_streams_per_key:
        with gw.stream_slot(key.kid):
            return await _try_targets(
                request, gw, surface, body, view, model_id, model, targets, meta, wants_meta, echo
            )
    return await _try_targets(request, gw, surface, body, view, model_id, model, targets, meta, wants_meta, echo)


def _request_attributes(view: RequestView, bound: int | None) -> tuple[tuple[str, Any], ...]:
    """The request's gen_ai.request.* attributes (numbers the request names as numbers; `bound`: its output
    bound, `view.output_bound()`)."""
    if view.temperature is UNSET and view.top_p is UNSET:  # the common case
        return (("gen_ai.request.max_tokens", bound),) if bound is not None else ()
    out: list[tuple[str, Any]] = []
    if bound is not None:
        out.append(("gen_ai.request.max_tokens", bound))
    for name, raw in (("gen_ai.request.temperature", view.temperature), ("gen_ai.request.top_p", view.top_p)):
        if raw is not UNSET:
            try:
                out.append((name, float(bytes(raw))))
            except ValueError:
                continue
    return tuple(out)


async def _from_cache(
    request: web.Request,
    gw: Gateway,
    surface: Surface,
    body: bytes,
    view: RequestView,
    key: KeyRecord,
    meta: RequestMeta,
    stream: bool,
    wants_meta: bool,
) -> web.Response | None:
    """The cache's answer when it has one for this request (and the cache is on for it); else None, having
    noted in `meta.cache` what the request's answer is to the cache (kept or not, others waiting for it)."""
    cache = gw.cache
    lookup = cache.lookup(request.headers, key, surface.name, meta.model, body)
    if lookup is None:
        return None
    if meta.guarded is not None and meta.guarded.answers:  # answers must go through response policies
        lookup = cache.bypass()
    meta.cache, meta.cache_status = lookup, lookup.status.lower()
    if not lookup.read:
        return None
    entry = await cache.get(lookup)
    if entry is None and lookup.store:
        entry = await cache.join(lookup)  # an identical request in flight: its answer
    if entry is None:
        return None
    await gw.wallets.funded(key.team_id, key.team_name)  # type: ignore[union-attr]
    wants_usage = bool(view.usage) or bool(view.stream_options and view.stream_options.include_usage)
    hit = answer_hit(gw, entry, meta, stream, wants_usage, wants_meta, body)
    if hit is None:  # an entry that cannot be read after all: the provider answers, and replaces it
        lookup.status = "MISS"
        meta.cache_status = "miss"
    return hit


async def _guard(
    guardrails: Guardrails,
    policies: tuple[Policy, ...],
    surface: Surface,
    body: bytes,
    view: RequestView,
    model_id: str,
    key: KeyRecord,
    meta: RequestMeta,
) -> tuple[bytes, RequestView]:
    """The request policies of the key (GatewayError when one blocks); the body and view to go on with."""
    found: list[dict[str, Any]] = []
    meta.guardrails = found  # what matched is recorded, a block's too
    meta.guarded = Guarded(guardrails, policies, (key.team_name, key.kid), view.stream is True)
    checked = await guardrails.check_request(policies, surface.name, body, view.output_bound(), model_id, key, found)
    return (body, view) if checked is body else (checked, decode_request(checked))


async def admit(
    gw: Gateway, key: KeyRecord, model_id: str, meta: RequestMeta | None = None, tokens: tuple[int, int] = (0, 0)
) -> None:
    """May this key's request for `model_id` go upstream: the model allowed, credit (with the request's
    worst-case cost held, from `tokens`: its estimated prompt and output) and budget left, room in the record
    queue, and (with `meta`: a request of `inference_handler`, which releases and settles these at the end)
    room in the key's and team's rate limits. GatewayError (403, 402, 503, 429) when not."""
    if key.allowed_models and model_id not in key.allowed_models:
        raise GatewayError(
            Code.forbidden,
            f"This key may not use {model_id!r} (it may use: {', '.join(key.allowed_models)}).",
            param="model",
        )
    hold = _hold(gw, model_id, tokens) if meta is not None and tokens[1] else 0
    limited = meta is not None and (gw.limiter.active or key.rate_limited)
    shared = gw.limiter.shared
    if shared is not None and meta is not None and (hold or limited):
        balance = await gw.wallets.funded(key.team_id, key.team_name)  # type: ignore[union-attr]
        await _gates(gw, key)
        wallet = (balance, gw.wallets.min_balance_nanos)  # type: ignore[union-attr]
        admission = await shared.admit(key, tokens[0] + tokens[1], model_id, meta.request_id, limited, hold, wallet)
        if admission is not DOWN:
            meta.limits, meta.hold, meta.hold_shared = admission, hold, bool(hold)
            return
        limited = limited and shared.on_error == "local"  # Redis is down: this worker's own limits, or none
    await gw.wallets.check(key.team_id, key.team_name, hold)  # type: ignore[union-attr]
    try:
        await _gates(gw, key)
        if limited and meta is not None:
            meta.limits = gw.limiter.admit(key, tokens[0] + tokens[1], time.monotonic(), model_id)
    except BaseException:
        gw.wallets.release(key.team_id, hold)  # type: ignore[union-attr]
        raise
    if meta is not None:
        meta.hold = hold


async def _gates(gw: Gateway, key: KeyRecord) -> None:
    """The key's cost limits, and room in the record queue."""
    await gw.budgets.check(key)  # type: ignore[union-attr]
    if gw.accountant is not None and gw.accountant.backlogged:
        raise GatewayError(Code.unavailable, "Usage records are waiting for the store; retry shortly.")


def _hold(gw: Gateway, model_id: str, tokens: tuple[int, int]) -> int:
    """A request's worst-case cost (its prompt and output bound at the model's highest prices), capped by
    `auth.max_hold_usd`: held against its team's wallet while it runs. 0 for an unpriced model."""
    cap = gw.max_hold_nanos
    prices = gw.pricing.worst(model_id) if cap else None
    if prices is None:
        return 0
    prompt, output = tokens
    worst = (prompt * prices[0] + output * prices[1]) // 1_000_000 + prices[2]
    return worst if worst < cap else cap


async def _try_targets(
    request: web.Request,
    gw: Gateway,
    surface: Surface,
    body: bytes,
    view: RequestView,
    model_id: str,
    model: ModelConfig,
    targets: list[Target],
    meta: RequestMeta,
    wants_meta: bool,
    echo: Echo | None,
) -> web.StreamResponse:
    """Try the targets in order, each up to `retries` more times, until one answers; never once the
    client has received a byte. Out of tries: the last failure, as the client's error."""
    failure: Retry | None = None
    unplannable: GatewayError | None = None
    for target in targets:
        health = gw.health.of(target)
        upstream = gw.upstreams[target.provider]
        try:
            exchange = plan(
                surface.name,
                upstream.kind,
                body,
                view,
                target.model,
                model_id,
                meta.stream,
                upstream.config.drop_params,
                request.headers,
                upstream.config.strict_params,
            )
        except GatewayError as e:  # this provider cannot take the request as asked; another may
            unplannable = unplannable or e
            continue
        meta.dropped_params = exchange.upstream.dropped
        for retry in range(model.retries + 1):
            if retry:
                assert failure is not None
                delay = retry_delay(retry, model.backoff_s, failure.retry_after)
                if delay > model.max_retry_wait_s:
                    break  # the provider asks for longer than we wait: the next target, or its answer
                await asyncio.sleep(delay)
            if not health.acquire(time.monotonic()):
                break  # open circuit (or its one probe is in flight): skip the target
            meta.provider, meta.upstream_model = target.provider, target.model
            meta.tariff = gw.pricing.tariff(model_id, target.provider)
            try:
                return await attempt(request, gw, upstream, exchange, health, meta, wants_meta, echo)
            except Retry as r:
                failure = r
                if not r.same_target:
                    break
    if failure is not None:
        return failure.answer(meta)
    if unplannable is not None:
        raise unplannable
    raise circuits_open(gw, model_id, targets)


def circuits_open(gw: Gateway, model_id: str, targets: Sequence[Target]) -> GatewayError:
    """The 503 when no target of `model_id` may be tried: their circuits are open."""
    now = time.monotonic()
    wait = min((gw.health.of(t).retry_in(now) for t in targets), default=0.0)
    return GatewayError(
        Code.unavailable,
        f"Every provider of {model_id!r} is failing: their circuits are open after repeated errors. "
        f"Retry in {max(wait, 1.0):.0f} s at most (sooner when a request still in flight there succeeds).",
    )


@final
class Retry(Exception):
    """An attempt that failed before the client received anything: worth another try (`same_target`: at
    the same target, after `retry_after` or a backoff). `answer` is what the client gets when none is left."""

    def __init__(
        self,
        error: GatewayError,
        same_target: bool = True,
        retry_after: float | None = None,
        reply: web.Response | None = None,
        status: int = 0,
    ):
        super().__init__(error.message)
        self.error = error
        self.status = status  # the provider's HTTP status, 0 when it gave none
        self.same_target = same_target
        self.retry_after = retry_after
        self.reply = reply  # the provider's own error answer, as the client would get it

    def answer(self, meta: RequestMeta) -> web.Response:
        if self.reply is not None:
            meta.status = self.reply.status
            meta.error_code, meta.error_message = Code.upstream_error.name, self.error.message
            return self.reply
        raise self.error


async def attempt(
    request: web.Request,
    gw: Gateway,
    upstream: Upstream,
    exchange: Exchange,
    health: Health,
    meta: RequestMeta,
    wants_meta: bool,
    echo: Echo | None,
) -> web.StreamResponse:
    """One call to one target. Raises `Retry` for a failure the client has not seen."""
    up = exchange.upstream
    if echo is not None:
        echo.sent(upstream.url(up.path), {**upstream.headers, **up.headers}, up.body, upstream.config.api_key)
    verdict = False
    upstream.users += 1
    meta.upstream_started()
    try:
        try:
            data = up.body if exchange.upload is None else exchange.upload.payload()
            # A traced request's attempt names its own span as the provider's parent.
            lines = meta.trace.upstream_lines(upstream.host) if meta.trace is not None else b""
            resp = await upstream.post(up.path, data, up.headers or None, lines)
        except _TRANSPORT_ERRORS as e:
            meta.upstream_ended(0)
            if exchange.upload is not None and exchange.upload.error is not None:
                raise exchange.upload.error from None  # the client's upload failed, not the provider
            connecting = isinstance(e, ConnectError | ConnectTimeout)
            error = upstream.failure(e, "connecting" if connecting else "waiting for its answer")
            verdict = _failed(gw, health, meta, error.code.name, error.message)
            raise Retry(error) from None
        except GatewayError:  # reading the client's upload failed: its error is the answer
            meta.upstream_ended(0)
            raise
        try:
            status = resp.status
            if status in RETRYABLE_STATUSES or status in FALLBACK_STATUSES:
                raise await _refused(resp, upstream, meta, exchange)
            first_byte = time.perf_counter() - meta.t_upstream_start
            if meta.stream and status == 200 and resp.content_type == "text/event-stream":
                resp.stream(upstream.config.timeouts.idle_s)
                relay = exchange.relay(meta.request_id, wants_meta)
                out = await _stream(request, resp, upstream, meta, relay, echo)
            elif exchange.raw and status < 300 and "json" not in resp.content_type:
                resp.stream(upstream.config.timeouts.idle_s)
                out = await _relay_bytes(request, resp, upstream, meta, exchange)
            else:
                out = await _respond(resp, upstream, meta, exchange, wants_meta, echo)
        except Retry as r:
            outcome = str(r.status) if r.status else r.error.code.name
            verdict = _failed(gw, health, meta, outcome, r.error.message)
            raise
        except GatewayError:  # the provider's answer to a request it will not serve: it is healthy
            gw.metrics.attempt(meta.provider, meta.upstream_model, str(status))
            health.success()
            verdict = True
            raise
        finally:
            resp.release()  # returns the connection to the pool, or closes it if the body was not read to the end
        if meta.error_code and meta.status == 200:  # the stream broke after it began
            verdict = _failed(gw, health, meta, meta.error_code, meta.error_message)
        else:
            gw.metrics.attempt(meta.provider, meta.upstream_model, "ok" if status < 400 else str(status))
            health.success(first_byte)
            if status < 400 and (tps := meta.throughput()) is not None:
                health.observe_throughput(tps)
            verdict = True
        return out
    finally:
        if not verdict:
            health.release()  # the client went away mid-try
        upstream.users -= 1
        if upstream.retired and not upstream.users:
            gw.release(upstream)


def _failed(gw: Gateway, health: Health, meta: RequestMeta, outcome: str, message: str) -> bool:
    """Count a failed try against its target (a 429 is the provider's limit, not its health)."""
    gw.metrics.attempt(meta.provider, meta.upstream_model, outcome)
    if outcome == "429":
        health.release()
    else:
        health.failure(message, time.monotonic())
    return True


async def _refused(resp: Response, upstream: Upstream, meta: RequestMeta, exchange: Exchange) -> Retry:
    """A provider's error answer worth trying elsewhere (429, 5xx, its credentials refused), with what the
    client gets if no other try succeeds."""
    try:
        data = await resp.read()
    except _TRANSPORT_ERRORS:
        data = b""
    meta.upstream_ended(resp.status)
    reply: web.Response | None = None
    try:
        reply = _upstream_error(resp, data, upstream, meta, exchange)
        error = GatewayError(
            Code.upstream_error, f"The provider {upstream.name!r} answered HTTP {resp.status}.", status=resp.status
        )
    except GatewayError as e:
        error = e
    asked = retry_after(resp.headers)
    if reply is not None and "retry-after" in resp.headers:
        reply.headers["retry-after"] = resp.headers["retry-after"]  # the SDKs honour it
    same_target = resp.status not in FALLBACK_STATUSES
    return Retry(error, same_target=same_target, retry_after=asked, reply=reply, status=resp.status)


async def _respond(
    resp: Response,
    upstream: Upstream,
    meta: RequestMeta,
    exchange: Exchange,
    wants_meta: bool,
    echo: Echo | None,
) -> web.Response:
    try:
        data = await resp.read()
    except _TRANSPORT_ERRORS as e:
        meta.upstream_ended(0)
        raise Retry(upstream.failure(e, "reading its response")) from None
    meta.upstream_ended(resp.status)
    if resp.status >= 400:
        return _upstream_error(resp, data, upstream, meta, exchange)
    try:
        meta.usage, meta.native_id = exchange.read(data, meta.trace is not None)
    except GatewayError as e:  # not an answer at all: another try may get one
        if e.code is Code.content_policy_violation:
            raise  # unless the provider refused what was asked (an image blocked for safety): final
        raise Retry(GatewayError(e.code, f"The provider {upstream.name!r}: {e.message}")) from None
    guarded = meta.guarded
    redactions = None
    if guarded is not None and guarded.answers and resp.status < 300:  # before `meta` is rendered: it tells
        redactions = await guarded.check_answer(data, meta)
    cost = meta.price(meta.tariff)
    members = [cost] if cost and meta.surface != "anthropic.messages" else []  # Messages stay Anthropic-shaped
    if echo is not None:
        members.append(echo.members(resp.status, resp.headers, data, upstream.config.api_key))
    if wants_meta:
        members.append(b'"meta":' + _encode(meta.as_dict()))
    upstream_data = data
    data = exchange.render(data, meta.usage, b",".join(members))
    lookup = meta.cache
    if lookup is not None and lookup.store and resp.status < 300:
        answer = exchange.parsed or upstream_data  # neutral when translated, else the provider's own JSON
        lookup.owner.finish(lookup, entry_of(lookup.owner, lookup, meta, answer, False))
    if redactions:
        data = guarded.redact(data, redactions)  # type: ignore[union-attr]
    if meta.trace is not None:
        meta.trace.answer = data  # its content, when captured (and its finish reasons, unless `read` gave them)
        meta.trace.reasons = exchange.reasons
    meta.status = resp.status
    headers = {"Content-Type": "application/json", "x-request-id": meta.request_id}
    if meta.dropped_params:
        headers[DROPPED_HEADER] = ",".join(meta.dropped_params)
    return web.Response(body=data, status=resp.status, headers=headers)


def _upstream_error(
    resp: Response, data: bytes, upstream: Upstream, meta: RequestMeta, exchange: Exchange
) -> web.Response:
    """An upstream error status: its JSON body passes through when the client speaks the provider's format,
    or is translated into the client's; anything else is wrapped in our envelope."""
    if resp.status in (401, 403):
        raise upstream.credentials_refused(resp.status)
    meta.status = resp.status
    if not exchange.native and "json" in resp.content_type:
        translated = exchange.error(resp.status, data)
        if translated is not None:
            raise translated
    elif "json" in resp.content_type:  # application/json, application/problem+json, …
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            return web.Response(
                body=data,
                status=resp.status,
                headers={"Content-Type": "application/json", "x-request-id": meta.request_id},
            )
    snippet = data[:300].decode("utf-8", "replace").strip()
    raise GatewayError(
        Code.upstream_bad_response,
        f"The provider {upstream.name!r} answered HTTP {resp.status}: {snippet or '(empty body)'}",
        status=resp.status,
    )


async def _stream(
    request: web.Request,
    resp: Response,
    upstream: Upstream,
    meta: RequestMeta,
    state: Relay,
    echo: Echo | None,
) -> web.StreamResponse:
    try:
        return await _relay(request, resp, upstream, meta, state, echo)
    finally:  # also when the client went away: what was streamed is the basis of an estimate
        meta.streamed_events, meta.native_id = state.events, state.id
        if meta.usage is None:
            meta.usage = state.usage


async def _relay(
    request: web.Request,
    resp: Response,
    upstream: Upstream,
    meta: RequestMeta,
    state: Relay,
    echo: Echo | None,
) -> web.StreamResponse:
    out = web.StreamResponse(status=200, headers={**SSE_HEADERS, "x-request-id": meta.request_id})
    if meta.limits is not None:
        out.headers.update(meta.limits.headers)
    if meta.cache is not None:
        out.headers["x-cache"] = meta.cache.status
    if meta.dropped_params:
        out.headers[DROPPED_HEADER] = ",".join(meta.dropped_params)
    content = resp
    try:
        # The client's response starts with the provider's first bytes: until then, a failure is retried.
        chunk = await content.readany()
    except (*_TRANSPORT_ERRORS, SSEError) as e:
        meta.upstream_ended(0)
        raise Retry(upstream.failure(e, "waiting for its first event")) from None
    if not chunk:
        meta.upstream_ended(0)
        raise Retry(GatewayError(Code.upstream_bad_response, f"The provider {upstream.name!r} sent an empty stream."))
    await out.prepare(request)
    meta.status = 200
    guarded = meta.guarded
    scan = guarded.scan if guarded is not None else None  # what the response policies see at the end
    scan_limit = guarded.scan_limit if guarded is not None else 0
    lookup = meta.cache
    keep = bytearray() if lookup is not None and lookup.store else None  # the stream, for the cache
    keep_limit = lookup.owner.config.max_entry_bytes * 4 if lookup is not None else 0  # events outweigh JSON
    traced = bytearray() if meta.trace is not None else None  # the stream's end, for its trace
    traced_limit = request.app[GATEWAY].tracer.stream_bytes if traced is not None else 0  # type: ignore[union-attr]
    try:
        while True:
            if echo is not None:
                echo.capture(chunk)
            data = state.feed(chunk)
            if state.first_token and not meta.t_first_token:
                meta.t_first_token = time.perf_counter()
            if data:
                await out.write(data)
                if scan is not None and len(scan) < scan_limit:
                    scan += data
                if keep is not None:
                    if len(keep) < keep_limit:
                        keep += data
                    else:
                        keep = None  # too big to keep: not cached
                if traced is not None:
                    traced += data
                    if len(traced) > traced_limit:  # its end is enough for the finish reasons
                        del traced[: len(traced) - traced_limit // 2]
            if state.done:
                break
            chunk = await content.readany()
            if not chunk:
                break
    except (*_TRANSPORT_ERRORS, SSEError) as e:
        meta.upstream_ended(0)
        if isinstance(e, SSEError):
            error = GatewayError(
                Code.upstream_bad_response, f"The provider {upstream.name!r} sent a broken stream: {e}"
            )
        else:
            error = upstream.failure(e, "streaming")
        await _end_with_error(request, out, state, meta, error)
        resp.close()
        return out
    except ConnectionError:  # the client went away: stop reading; the upstream connection is closed
        meta.status = CLIENT_CLOSED
        resp.close()
        return out
    meta.upstream_ended(200)
    meta.usage = state.usage
    if state.failure is not None:  # the provider sent an error event; it reached the client in its idiom
        meta.error_code, meta.error_message = state.failure.code.name, state.failure.message
        resp.close()
        return out
    if state.truncated:
        error = GatewayError(
            Code.upstream_bad_response,
            f"The provider {upstream.name!r} closed the stream before it finished (no [DONE] received).",
        )
        await _end_with_error(request, out, state, meta, error)
        return out
    cost = meta.price(meta.tariff)
    if meta.surface == "anthropic.messages":
        cost = b""  # Messages stay Anthropic-shaped: cost is in meta when asked
    echoed = echo.members(resp.status, resp.headers, None, upstream.config.api_key) if echo is not None else b""
    if scan:  # what the response policies find in the text the client has had: for the record and meta
        guarded.check_stream(meta)  # type: ignore[union-attr]
    closing = state.finish(_encode(meta.as_dict()) if state.wants_meta else None, cost, echoed)
    _settle(request, meta, state)
    await _write_quietly(out, closing)
    with contextlib.suppress(ConnectionError):
        await out.write_eof()  # the client's stream is complete before the upstream's is drained
        meta.finished = True
    if traced is not None:
        meta.trace.answer, meta.trace.streamed = bytes(traced + closing), True  # type: ignore[union-attr]
    if keep and meta.finished and lookup is not None:  # the whole stream, as the client got it
        keep += closing
        lookup.owner.finish(lookup, entry_of(lookup.owner, lookup, meta, bytes(keep), True))
    await _drain(resp)
    return out


async def _relay_bytes(
    request: web.Request, resp: Response, upstream: Upstream, meta: RequestMeta, exchange: Exchange
) -> web.StreamResponse:
    """A successful answer that is not JSON (speech audio, a transcription as text, SRT or VTT), relayed as
    it arrives with the provider's Content-Type; never read whole. Until its first bytes reach the client a
    failure may be retried. After, a failure closes the client's connection before the body's end, so the
    client sees an incomplete body, never a clean one."""
    headers = {"Content-Type": resp.headers.get("Content-Type", "application/octet-stream")}
    if resp.content_type == "text/event-stream":  # e.g. speech with stream_format=sse
        headers.update(SSE_HEADERS)
    headers["x-request-id"] = meta.request_id
    if meta.limits is not None:
        headers.update(meta.limits.headers)
    content = resp
    try:
        chunk = await content.readany()
    except _TRANSPORT_ERRORS as e:
        meta.upstream_ended(0)
        raise Retry(upstream.failure(e, "waiting for its first bytes")) from None
    out = web.StreamResponse(status=resp.status, headers=headers)
    await out.prepare(request)
    meta.status = resp.status
    if exchange.usage is not None:
        meta.usage = exchange.usage  # billed by the provider for the request, whatever the client reads of it
    try:
        if chunk:
            meta.t_first_token = time.perf_counter()
        while chunk:
            await out.write(chunk)
            chunk = await content.readany()
    except _TRANSPORT_ERRORS as e:
        meta.upstream_ended(0)
        error = upstream.failure(e, "streaming")
        meta.error_code, meta.error_message = error.code.name, error.message
        if request.transport is not None:
            request.transport.close()  # no clean end: the client must not take a cut answer for a whole one
        resp.close()
        return out
    except ConnectionError:  # the client went away
        meta.status = CLIENT_CLOSED
        resp.close()
        return out
    meta.upstream_ended(resp.status)
    meta.price(meta.tariff)
    _settle(request, meta, None)
    with contextlib.suppress(ConnectionError):
        await out.write_eof()
        meta.finished = True
    return out


async def _end_with_error(
    request: web.Request, out: web.StreamResponse, state: Relay, meta: RequestMeta, error: GatewayError
) -> None:
    """End a stream that cannot finish: the usage chunk if it was asked for and held, then an error event."""
    meta.error_code, meta.error_message = error.code.name, error.message
    closing = state.abort() + state.error(error, meta.request_id)
    _settle(request, meta, state)
    await _write_quietly(out, closing)


def _settle(request: web.Request, meta: RequestMeta, state: Relay | None) -> None:
    """Account the request now, before its last bytes are written: its record is in the journal when the
    client has the whole answer, so a crash after that loses nothing (the handler's own submit is then a
    no-op). A JSON answer needs no call: the handler accounts it before aiohttp writes it."""
    if state is not None:
        meta.streamed_events, meta.native_id = state.events, state.id
        if meta.usage is None:
            meta.usage = state.usage
    _account(request.app[GATEWAY], meta)


def _account(gw: Gateway, meta: RequestMeta) -> None:
    """End the request's clock and hand it to the accountant (once: a second call records nothing more)."""
    meta.t_end = time.perf_counter()
    if meta.team_id and gw.accountant is not None:
        gw.accountant.submit(meta)


async def _drain(content: Response) -> None:
    """Read what follows `[DONE]` (normally just the end of the chunked body, which may come a moment
    later), so that the upstream connection goes back to the pool instead of being closed."""
    budget = _DRAIN_BYTES
    with contextlib.suppress(*_TRANSPORT_ERRORS):
        async with asyncio.timeout(_DRAIN_S):
            while budget > 0 and not content.is_eof():
                chunk = await content.readany()
                if not chunk:
                    break
                budget -= len(chunk)


async def _write_quietly(out: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await out.write(data)


async def models_handler(request: web.Request) -> web.StreamResponse:
    """`GET /v1/models`: the configured models in OpenAI's list format (authenticated, no credit needed)."""
    gw = request.app[GATEWAY]
    request_id = new_request_id()
    try:
        await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]
    except GatewayError as e:
        return render(e, request_id)
    data = [
        {
            "id": model_id,
            "object": "model",
            "created": model.created,
            "owned_by": model.owned_by or model_id.partition("/")[0] or "gateway",
        }
        for model_id, model in gw.config.models.items()
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}),
        headers={"Content-Type": "application/json", "x-request-id": request_id},
    )
