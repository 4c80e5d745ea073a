"""What the asynchronous-job surfaces (videos, music, files, batches) share: authentication and errors in
OpenAI's shape, a job looked up only within the caller's team, calls to the provider that made it, and the
gateway's public URL for links.

A job's id is the gateway's own (`video_…`, `music_…`, `file_…`, `batch_…`), recorded in the store with the
owning team (`Store.create_job`), so one team never reaches another's jobs and jobs outlive restarts.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

import aiohttp
import msgspec
import orjson
from aiohttp import web
from yarl import URL

from proxy.auth import token_from_headers
from proxy.config import ModelConfig, Target
from proxy.errors import Code, GatewayError, render
from proxy.gateway import GATEWAY, Gateway
from proxy.meta import RequestMeta, Usage, new_request_id
from proxy.pricing import Tariff
from proxy.resilience import Health
from proxy.routing import SURFACES
from proxy.store.base import Job, KeyRecord, StoreError
from proxy.surfaces.inference import admit
from proxy.upstream import Upstream

log = logging.getLogger("proxy.surfaces.jobs")


class _HasId(Protocol):
    id: str


_Object = TypeVar("_Object", bound=_HasId)
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
Serve = Callable[[web.Request, Gateway, KeyRecord, str], Awaitable[web.StreamResponse]]


def handler(serve: Serve, *, signed: bool = False) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Authenticate (or, where `signed`, let `serve` check a signed link instead: it gets no key), then
    `serve`; every failure in OpenAI's error shape."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        request_id = new_request_id()
        try:
            key = None if signed and "signature" in request.query else await authenticate(request, gw)
            return await serve(request, gw, key, request_id)  # type: ignore[arg-type]
        except GatewayError as e:
            return render(e, request_id)
        except StoreError as e:
            return render(GatewayError(Code.unavailable, f"The store is unavailable: {e}"), request_id)
        except Exception:
            log.exception("request %s failed", request_id)
            return render(GatewayError(Code.internal_error, "The gateway failed to serve this request."), request_id)

    return handle


async def authenticate(request: web.Request, gw: Gateway) -> KeyRecord:
    return await gw.keys.authenticate(token_from_headers(request.headers))  # type: ignore[union-attr]


def json_response(data: object, request_id: str, status: int = 200) -> web.Response:
    return raw_json(orjson.dumps(data), request_id, status)


def raw_json(body: bytes, request_id: str, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers={"x-request-id": request_id})


async def owned(request: web.Request, gw: Gateway, team_id: str, kind: str) -> Job:
    """The caller's team's job of `kind` named by the path's `{id}`; 404 for any other (another team's
    included: its existence is not revealed)."""
    job_id = request.match_info.get("id", "")
    job = await gw.store.get_job(team_id, job_id) if job_id.startswith(kind + "_") else None  # type: ignore[union-attr]
    if job is None or job.kind != kind:
        raise GatewayError(Code.not_found, f"No {kind} {job_id!r}.")
    return job


async def job_model(gw: Gateway, key: KeyRecord, meta: RequestMeta, name: str, surface: str) -> tuple[str, ModelConfig]:
    """(public id, model) of the model a job's creation names, resolved for `surface`, once the key may use it
    (credit, budget)."""
    if not name:
        raise GatewayError(Code.invalid_request, "Missing required field `model`.", param="model")
    model_id, model = gw.routes.resolve(name, SURFACES[surface])
    meta.model = model_id
    await admit(gw, key, model_id, meta)  # its rate limits too: `account` settles them
    return model_id, model


def attempt_headers(meta: RequestMeta, upstream: Upstream) -> dict[str, str]:
    """The trace headers of an upstream attempt of a traced request (a `traceparent` naming the attempt's own
    span); none when it is not traced."""
    return meta.trace.upstream(upstream.host) if meta.trace is not None else {}


def open_targets(gw: Gateway, meta: RequestMeta, targets: list[Target]) -> Iterator[tuple[Target, Health, Upstream]]:
    """The targets to try a job's creation at, in order, skipping those whose circuit is open; `meta` names
    each one as it comes."""
    for target in targets:
        health = gw.health.of(target)
        if not health.acquire(time.monotonic()):
            continue  # open circuit: skip the target
        meta.provider, meta.upstream_model = target.provider, target.model
        yield target, health, gw.upstreams[target.provider]


async def new_job(
    gw: Gateway,
    key: KeyRecord,
    kind: str,
    model_id: str,
    provider: str,
    upstream_id: str,
    status: str,
    shown: Callable[[str, int], bytes],
) -> bytes:
    """Record a job just started at `provider` for the key's team under a new id of the gateway's own
    (`{kind}_…`). `shown(id, created_at)` is what the client sees of it: kept as the job's data, and returned."""
    job_id = kind + "_" + secrets.token_hex(12)
    now = int(time.time())
    data = shown(job_id, now)
    job = Job(
        job_id, kind, key.team_id, key.kid, model_id, provider, upstream_id, status, now, now, False, msgspec.Raw(data)
    )
    await gw.store.create_job(job)  # type: ignore[union-attr]
    return data


def read_object(answer: bytes, kind: type[_Object], provider: str, nothing: str) -> _Object:
    """The provider's object (a video, task, file, batch) in `answer`; a 502 "The provider … {nothing}" when
    the answer is not one with an id."""
    try:
        seen = msgspec.json.decode(answer, type=kind)
    except msgspec.DecodeError:
        seen = None
    if seen is None or not seen.id:
        raise GatewayError(Code.upstream_bad_response, f"The provider {provider!r} {nothing}: {answer[:200]!r}")
    return seen


def upstream_of(gw: Gateway, job: Job) -> Upstream:
    """The provider that holds `job`; 503 when the config no longer has it."""
    upstream = gw.upstreams.get(job.provider)
    if upstream is None:
        raise GatewayError(
            Code.unavailable, f"The provider {job.provider!r} that holds this {job.kind} is no longer configured."
        )
    return upstream


async def call(
    upstream: Upstream,
    method: str,
    path: str,
    doing: str,
    *,
    data: bytes | None = None,
    params: dict | None = None,
    meta: RequestMeta | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one call about a job (`data`: a JSON body; `meta`: the traced request it is an attempt
    of); a provider that cannot be reached or fails (5xx) is a 502."""
    headers = {"Content-Type": "application/json"} if data is not None else None
    if meta is not None and meta.trace is not None:
        headers = {**(headers or {}), **attempt_headers(meta, upstream)}
    try:
        async with upstream.session.request(
            method, upstream.url(path), data=data, params=params, headers=headers
        ) as resp:
            answer = await resp.read()
    except TRANSPORT_ERRORS as e:
        raise upstream.failure(e, doing) from None
    if resp.status >= 500:
        raise provider_error(upstream, resp.status, answer)
    return resp.status, answer


_RELAYED_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "Content-Disposition",
    "ETag",
    "Last-Modified",
)
_CHUNK = 64 * 1024


async def download(
    request: web.Request,
    upstream: Upstream,
    path: str,
    doing: str,
    request_id: str,
    *,
    params: dict | None = None,
    headers: dict | None = None,
) -> web.StreamResponse:
    """The provider's bytes at `path`, relayed to the client as they come (never held), with their type,
    length and range headers; its refusal (4xx) as it came. A failure once the client has headers closes the
    connection before the end, so a cut download never looks whole."""
    try:
        resp = await upstream.session.get(upstream.url(path), params=params, headers=headers)
    except TRANSPORT_ERRORS as e:
        raise upstream.failure(e, doing) from None
    try:
        if resp.status >= 400:
            answer = await resp.read()
            if resp.status >= 500:
                raise provider_error(upstream, resp.status, answer)
            return passed_on(resp.status, answer, request_id)
        out = web.StreamResponse(status=resp.status, headers={"x-request-id": request_id})
        for name in _RELAYED_HEADERS:
            if name in resp.headers:
                out.headers[name] = resp.headers[name]
        await out.prepare(request)
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                await out.write(chunk)
        except TRANSPORT_ERRORS:
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out
    finally:
        resp.release()


async def remove(gw: Gateway, job: Job, path: str, obj: str, request_id: str) -> web.Response:
    """Delete a job's thing at the provider (already gone there is fine), then the job here; OpenAI's
    `{id, object, deleted}` answer."""
    status, answer = await call(upstream_of(gw, job), "DELETE", path, f"deleting a {job.kind}")
    if status >= 400 and status != 404:
        return passed_on(status, answer, request_id)
    await gw.store.delete_job(job.team_id, job.id)  # type: ignore[union-attr]
    return json_response({"id": job.id, "object": obj, "deleted": True}, request_id)


def provider_error(upstream: Upstream, status: int, answer: bytes) -> GatewayError:
    snippet = answer[:300].decode(errors="replace")
    return GatewayError(Code.upstream_error, f"The provider {upstream.name!r} answered HTTP {status}: {snippet}")


def passed_on(status: int, answer: bytes, request_id: str) -> web.Response:
    """A provider's refusal (4xx), as it came when it is JSON; else in the gateway's envelope."""
    try:
        orjson.loads(answer)
    except orjson.JSONDecodeError:
        error = GatewayError(Code.upstream_error, f"The provider answered HTTP {status}.", status=status)
        return render(error, request_id)
    return raw_json(answer, request_id, status)


async def bill(gw: Gateway, job: Job, surface: str, usage: Usage, tariff: Tariff | None = None) -> RequestMeta:
    """A finished job's usage priced (at `tariff`, else the model's), and recorded once, by whichever
    request (on whichever instance) first sees it finished: `Store.mark_job_billed` lets exactly one through.
    The priced meta either way."""
    meta = RequestMeta(new_request_id(), surface, time.perf_counter())
    meta.team_id, meta.key_id, meta.model, meta.provider = job.team_id, job.key_id, job.model_id, job.provider
    meta.native_id, meta.status = job.upstream_id, 200
    meta.usage, meta.usage_source = usage, "reported"
    meta.tariff = tariff or gw.pricing.tariff(job.model_id, job.provider)
    meta.price(meta.tariff)
    meta.t_end = time.perf_counter()
    if job.billed or not await gw.store.mark_job_billed(job.id):  # type: ignore[union-attr]
        return meta
    if gw.accountant is not None:
        gw.accountant.submit(meta)
    gw.metrics.settled(meta)
    return meta


def traced(request: web.Request, gw: Gateway, meta: RequestMeta) -> None:
    """Start the trace of a request that creates a job (`account` ends it): its spans say what it asked of
    which provider, not what the job later made."""
    if gw.tracer is not None:
        meta.trace = gw.tracer.of(request.headers)


def account(gw: Gateway, meta: RequestMeta) -> None:
    """Record a request about a job (its generation record, its metrics and its trace), whatever its outcome."""
    meta.t_end = time.perf_counter()
    if gw.accountant is not None:
        gw.accountant.submit(meta)
    gw.metrics.record(meta, meta.t_end)
    if meta.trace is not None:
        gw.tracer.end(meta, meta.t_end)  # type: ignore[union-attr]
    if meta.limits is not None:  # a creation counted against the rate limits: it uses no tokens
        gw.limiter.settle(meta.limits, 0, time.monotonic())


async def listing(request: web.Request, gw: Gateway, team_id: str, kind: str, request_id: str) -> web.Response:
    """`GET` of a job collection (`?limit=&after=`): the team's jobs of `kind`, newest first, as last seen
    (no provider call), in OpenAI's list shape."""
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise GatewayError(Code.invalid_request, "`limit` must be an integer from 1 to 100.", param="limit")
    jobs = await gw.store.list_jobs(team_id, kind, limit=limit + 1, after=request.query.get("after", ""))  # type: ignore[union-attr]
    page = jobs[:limit]
    body = b'{"object":"list","data":[%s],"first_id":%s,"last_id":%s,"has_more":%s}' % (
        b",".join(bytes(job.data) for job in page),
        orjson.dumps(page[0].id if page else None),
        orjson.dumps(page[-1].id if page else None),
        b"true" if len(jobs) > limit else b"false",
    )
    return raw_json(body, request_id)


def public_url(request: web.Request) -> URL:
    """This request's URL as the client sees it: behind a TLS-terminating proxy, its `X-Forwarded-Proto`
    and `X-Forwarded-Host` (a forged value only misleads the caller about its own link)."""
    url = request.url
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    if proto in ("http", "https"):
        url = url.with_scheme(proto)
    if host:
        url = url.join(URL(f"//{host}")).with_path(request.path)
    return url
