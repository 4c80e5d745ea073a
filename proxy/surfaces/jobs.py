"""What the asynchronous-job surfaces (videos, music, files, batches) share: authentication and errors in
OpenAI's shape, a job looked up only within the caller's team, calls to the provider that made it, and the
gateway's public URL for links.

A job's id is the gateway's own (`video_…`, `music_…`, `file_…`, `batch_…`), recorded in the store with the
owning team (`Store.create_job`), so one team never reaches another's jobs and jobs outlive restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from proxy.auth import token_from_headers
from proxy.errors import Code, GatewayError, render
from proxy.gateway import GATEWAY, Gateway
from proxy.meta import RequestMeta, Usage, new_request_id
from proxy.store.base import Job, KeyRecord, StoreError
from proxy.upstream import Upstream

log = logging.getLogger("proxy.surfaces.jobs")

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
        raise GatewayError(Code.route_not_found, f"No {kind} {job_id!r}.", status=404)
    return job


def upstream_of(gw: Gateway, job: Job) -> Upstream:
    """The provider that holds `job`; 503 when the config no longer has it."""
    upstream = gw.upstreams.get(job.provider)
    if upstream is None:
        raise GatewayError(
            Code.unavailable, f"The provider {job.provider!r} that holds this {job.kind} is no longer configured."
        )
    return upstream


async def call(
    upstream: Upstream, method: str, path: str, doing: str, *, json: object = None, params: dict | None = None
) -> tuple[int, bytes]:
    """(status, body) of one call about a job; a provider that cannot be reached or fails (5xx) is a 502."""
    try:
        async with upstream.session.request(method, upstream.url(path), json=json, params=params) as resp:
            answer = await resp.read()
    except TRANSPORT_ERRORS as e:
        raise upstream.failure(e, doing) from None
    if resp.status >= 500:
        raise provider_error(upstream, resp.status, answer)
    return resp.status, answer


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


async def bill(gw: Gateway, job: Job, surface: str, usage: Usage) -> None:
    """Record a finished job's usage and cost, once, by whichever request (on whichever instance) first
    sees it finished: `Store.mark_job_billed` lets exactly one through."""
    if job.billed or not await gw.store.mark_job_billed(job.id):  # type: ignore[union-attr]
        return
    meta = RequestMeta(new_request_id(), surface, time.perf_counter())
    meta.team_id, meta.key_id, meta.model, meta.provider = job.team_id, job.key_id, job.model_id, job.provider
    meta.native_id, meta.status = job.upstream_id, 200
    meta.usage, meta.usage_source = usage, "reported"
    meta.tariff = gw.pricing.tariff(job.model_id, job.provider)
    meta.price(meta.tariff)
    meta.t_end = time.perf_counter()
    if gw.accountant is not None:
        gw.accountant.submit(meta)


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
