"""Video jobs, in the shape of OpenAI's Videos API, on any OpenAI-compatible provider.

`POST /v1/videos` routes by model like a chat request (auth, credit gate, targets in order, breaker), and
the provider's job gets an id of the gateway's own (`video_…`), recorded in the store with its team: every
later call is looked up by that id within the caller's team, so nobody reaches another team's jobs, and a
job survives a restart. `GET /v1/videos/{id}` asks the provider for the job's state and keeps it; the first
time a job is seen completed (there, or when its content is downloaded) its seconds of video are billed,
exactly once even when several gateways poll it (`Store.mark_job_billed`). `GET …/content` relays the
provider's bytes as they come, range requests included; `POST …/download_url` signs a link to it that works
without a key until it expires. `POST …/cancel` answers the reference's structured 501.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import msgspec
import orjson
from aiohttp import web

from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.meta import RequestMeta, Usage
from proxy.routing import SURFACES
from proxy.store.base import KeyRecord
from proxy.surfaces.body import read_body
from proxy.surfaces.inference import circuits_open
from proxy.surfaces.jobs import (
    TRANSPORT_ERRORS,
    account,
    attempt_headers,
    bill,
    call,
    download,
    handler,
    job_model,
    json_response,
    listing,
    new_job,
    open_targets,
    owned,
    passed_on,
    provider_error,
    public_url,
    read_object,
    remove,
    traced,
    upstream_of,
)
from proxy.surfaces.media import Upload
from proxy.translators.exchange import form_type
from proxy.translators.openai import patch_members
from proxy.upstream import Upstream

log = logging.getLogger("proxy.surfaces.videos")

KIND = "video"
SURFACE = "openai.videos"
DONE = "completed"
LINK_TTL_S = 3600  # a download link's default lifetime
LINK_MAX_TTL_S = 7 * 86_400


class _Create(msgspec.Struct):
    model: str = ""


class _Video(msgspec.Struct):
    """What the gateway reads of a provider's video object; the rest is kept as it came."""

    id: str = ""
    status: str = ""
    seconds: str | int | float | None = None


def _shown(raw: bytes, job_id: str) -> bytes:
    """The provider's object with the gateway's id in place of the provider's."""
    return patch_members(raw, {"id": orjson.dumps(job_id)})


async def create(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/videos`, JSON or a multipart form (a reference image; the `openai` SDK always sends a
    form): start a job on the model's first available target."""
    meta = RequestMeta(request_id, SURFACE, time.perf_counter())
    meta.team_id, meta.key_id, meta.key_limited = key.team_id, key.kid, key.limited
    traced(request, gw, meta)
    try:
        if request.content_type == "multipart/form-data":
            upload = await Upload.open(request, gw.config.server, meta)
            try:
                return await _start(gw, key, meta, await upload.until_key(), upload, request_id)
            finally:
                meta.request_bytes = upload.received
                upload.close()
        body = await read_body(request, gw.config.server)
        try:
            ask = msgspec.json.decode(body, type=_Create)
        except msgspec.DecodeError as e:
            raise GatewayError(Code.invalid_request, f"Invalid request: {e}") from None
        return await _start(gw, key, meta, ask.model, body, request_id)
    except GatewayError as e:
        meta.status, meta.error_code, meta.error_message = e.status, e.code.name, e.message
        raise
    finally:
        account(gw, meta)  # the creation itself costs nothing: the video is billed when done


async def _start(
    gw: Gateway, key: KeyRecord, meta: RequestMeta, name: str, body: bytes | Upload, request_id: str
) -> web.Response:
    """Send the job to the targets in order until one takes it. A form is read as it is sent, so once a
    provider has begun to read it no other is tried."""
    model_id, model = await job_model(gw, key, meta, name, SURFACE)
    failure: GatewayError | None = None
    for target, health, upstream in open_targets(gw, meta, gw.routes.usable(model_id, model.targets, key.team_name)):
        if isinstance(body, Upload):
            body.key_value = target.model
            data: object = body.payload()
            headers = {"Content-Type": form_type(body.boundary)}
        else:
            data, headers = patch_members(body, {"model": orjson.dumps(target.model)}), {}
        headers.update(attempt_headers(meta, upstream))
        meta.upstream_started()
        try:
            async with upstream.session.post(upstream.url("/videos"), data=data, headers=headers or None) as resp:
                answer = await resp.read()
        except TRANSPORT_ERRORS as e:
            meta.upstream_ended(0)
            if isinstance(body, Upload) and body.error is not None:
                raise body.error from None  # the client's form failed, not the provider
            failure = upstream.failure(e, "creating a video")
            health.failure(failure.message, time.monotonic())
            if isinstance(body, Upload) and body.started:
                raise failure from None
            continue
        meta.upstream_ended(resp.status)
        if resp.status >= 500 or resp.status == 429:  # nothing was started: the next target may
            failure = provider_error(upstream, resp.status, answer)
            health.failure(failure.message, time.monotonic())
            if isinstance(body, Upload) and body.started:
                raise failure
            continue
        health.success(meta.provider_latency())
        if resp.status >= 400:
            meta.status = resp.status
            return passed_on(resp.status, answer, request_id)
        return await _created(gw, key, meta, upstream, model_id, answer, request_id)
    raise failure or circuits_open(gw, model_id, model.targets)


async def _created(
    gw: Gateway, key: KeyRecord, meta: RequestMeta, upstream: Upstream, model_id: str, answer: bytes, request_id: str
) -> web.Response:
    video = read_object(answer, _Video, upstream.name, "started no video")
    status = video.status or "queued"
    shown = await new_job(
        gw, key, KIND, model_id, upstream.name, video.id, status, lambda job_id, _: _shown(answer, job_id)
    )
    meta.status, meta.native_id = 200, video.id
    return web.Response(body=shown, content_type="application/json", headers={"x-request-id": request_id})


async def retrieve(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/videos/{id}`: the job's state, from the provider (and kept); billed when first seen done."""
    job = await owned(request, gw, key.team_id, KIND)
    upstream = upstream_of(gw, job)
    status, answer = await call(upstream, "GET", f"/videos/{job.upstream_id}", "reading a video's state")
    if status >= 400:
        return passed_on(status, answer, request_id)
    try:
        video = msgspec.json.decode(answer, type=_Video)
    except msgspec.DecodeError:
        error = GatewayError(Code.upstream_bad_response, f"The provider {upstream.name!r} sent a broken video object.")
        raise error from None
    shown = _shown(answer, job.id)
    await gw.store.update_job(job.id, status=video.status or job.status, data=shown)  # type: ignore[union-attr]
    if video.status == DONE:
        await bill(gw, job, SURFACE, Usage(video_seconds=_seconds(video.seconds)))
    return web.Response(body=shown, content_type="application/json", headers={"x-request-id": request_id})


def _seconds(value: str | int | float | None) -> float:
    try:
        return max(float(value or 0), 0.0)
    except ValueError:
        return 0.0


async def list_videos(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/videos?limit=&after=`: the team's videos, newest first, as last seen (no provider call)."""
    return await listing(request, gw, key.team_id, KIND, request_id)


async def content(request: web.Request, gw: Gateway, key: KeyRecord | None, request_id: str) -> web.StreamResponse:
    """`GET /v1/videos/{id}/content[?variant=]`: the provider's bytes relayed as they come (`Range` too),
    with a key, or with a download link's `expires`, `team` and `signature` instead."""
    team_id = key.team_id if key is not None else _verified_team(request, gw)
    job = await owned(request, gw, team_id, KIND)
    upstream = upstream_of(gw, job)
    params = {"variant": request.query["variant"]} if "variant" in request.query else None
    headers = {"Range": request.headers["Range"]} if "Range" in request.headers else None
    path = f"/videos/{job.upstream_id}/content"
    out = await download(request, upstream, path, "downloading a video", request_id, params=params, headers=headers)
    if not job.billed and out.status in (200, 206) and not params:  # only a finished video has content
        seen = msgspec.json.decode(bytes(job.data), type=_Video)
        await bill(gw, job, SURFACE, Usage(video_seconds=_seconds(seen.seconds)))
    return out


def _signature(gw: Gateway, team_id: str, job_id: str, expires: int) -> str:
    message = f"{team_id}\n{job_id}\n{expires}".encode()
    return hmac.new(gw.config.server.url_signing_key.encode(), message, hashlib.sha256).hexdigest()


def _verified_team(request: web.Request, gw: Gateway) -> str:
    """The team a download link was signed for, if the link is intact and unexpired."""
    query = request.query
    team_id, signature = query.get("team", ""), query.get("signature", "")
    try:
        expires = int(query.get("expires", ""))
    except ValueError:
        expires = 0
    expected = _signature(gw, team_id, request.match_info.get("id", ""), expires)
    if not hmac.compare_digest(expected, signature):
        raise GatewayError(Code.invalid_api_key, "This download link is not valid: ask for a new one.", status=403)
    if expires < time.time():
        raise GatewayError(Code.invalid_api_key, "This download link has expired: ask for a new one.", status=403)
    return team_id


async def download_url(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/videos/{id}/download_url[?expires_in=S]`: a link to the content that needs no key until it
    expires (default an hour, at most a week)."""
    job = await owned(request, gw, key.team_id, KIND)
    try:
        ttl = int(request.query.get("expires_in", str(LINK_TTL_S)))
    except ValueError:
        ttl = 0
    if not 1 <= ttl <= LINK_MAX_TTL_S:
        raise GatewayError(
            Code.invalid_request, f"`expires_in` must be 1 to {LINK_MAX_TTL_S} seconds.", param="expires_in"
        )
    expires = int(time.time()) + ttl
    query = {"expires": str(expires), "team": job.team_id, "signature": _signature(gw, job.team_id, job.id, expires)}
    url = public_url(request).with_path(f"/v1/videos/{job.id}/content").with_query(query)
    return json_response(
        {"object": "video.download_url", "id": job.id, "url": str(url), "expires_at": expires}, request_id
    )


async def delete(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`DELETE /v1/videos/{id}`: deleted at the provider (already gone there is fine), then here."""
    job = await owned(request, gw, key.team_id, KIND)
    return await remove(gw, job, f"/videos/{job.upstream_id}", "video.deleted", request_id)


async def cancel(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/videos/{id}/cancel`: not offered, as in the reference: its structured 501."""
    job = await owned(request, gw, key.team_id, KIND)
    return json_response(
        {
            "status_code": 501,
            "error": "not_implemented_yet",
            "description": f"Cancelling a video job is not implemented yet; {job.id} goes on. "
            "DELETE /v1/videos/{id} removes it once it has finished.",
        },
        request_id,
        status=501,
    )


async def models(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/videos/models`: the models that make videos, in OpenAI's list shape."""
    endpoint = SURFACES[SURFACE].endpoint
    data = [
        {"id": model_id, "object": "model", "created": m.created, "owned_by": m.owned_by or model_id.partition("/")[0]}
        for model_id, m in gw.config.models.items()
        if endpoint in m.endpoints
    ]
    return json_response({"object": "list", "data": data}, request_id)


HANDLERS = {
    "openai.videos": handler(create),
    "openai.videos_list": handler(list_videos),
    "openai.videos_models": handler(models),
    "openai.videos_get": handler(retrieve),
    "openai.videos_content": handler(content, signed=True),
    "openai.videos_download_url": handler(download_url),
    "openai.videos_delete": handler(delete),
    "openai.videos_cancel": handler(cancel),
}
