"""Music jobs in the AI Stats Gateway's shape, on sunoapi.org-style providers (kind `suno`).

`POST /v1/music/generate` routes by model like a video job (auth, credit gate, the model's targets in order,
each behind its circuit breaker), and the provider's task gets an id of the gateway's own (`music_…`),
recorded in the store with the caller's team: a later `GET /v1/music/generate/{id}` is looked up within the
caller's team, so no team reaches another's jobs, and a job survives a restart. The GET asks the provider for
the task's state and keeps it; the first time it is seen completed, its minutes of audio are billed, exactly
once even when several gateways poll it (`jobs.bill`). The wire format is `proxy.translators.suno`'s.
"""

from __future__ import annotations

import time

import msgspec
import orjson
from aiohttp import web

from proxy.config import OPENAI_KINDS
from proxy.errors import GatewayError
from proxy.gateway import Gateway
from proxy.meta import RequestMeta, Usage
from proxy.store.base import KeyRecord
from proxy.surfaces.body import read_body
from proxy.surfaces.inference import circuits_open
from proxy.surfaces.jobs import (
    account,
    bill,
    call,
    handler,
    job_model,
    new_job,
    open_targets,
    owned,
    passed_on,
    provider_error,
    raw_json,
    read_object,
    traced,
    upstream_of,
)
from proxy.translators import suno
from proxy.translators.openai import patch_members

KIND = "music"
NATIVE_PATH = "/music/generate"  # at an OpenAI-kind upstream that serves this same API (another gateway)
SURFACE = "music.generate"
DONE = "completed"


async def create(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/music/generate` (JSON): start a task on the model's first available target."""
    meta = RequestMeta(request_id, SURFACE, time.perf_counter())
    meta.team_id, meta.key_id, meta.key_limited = key.team_id, key.kid, key.limited
    traced(request, gw, meta)
    try:
        body = await read_body(request, gw.config.server)
        meta.request_bytes = len(body)
        return await _start(gw, key, meta, body, request_id)
    except GatewayError as e:
        meta.status, meta.error_code, meta.error_message = e.status, e.code.name, e.message
        raise
    finally:
        account(gw, meta)  # the creation itself costs nothing: the task is billed when done


async def _start(gw: Gateway, key: KeyRecord, meta: RequestMeta, body: bytes, request_id: str) -> web.Response:
    """Send the task to the targets in order until one takes it. A refusal of the request itself (bad
    parameters) is the answer; an unreachable, failing, rate-limited or out-of-credit target hands it on."""
    ask = suno.decode_request(body)
    model_id, model = await job_model(gw, key, meta, ask.model, SURFACE)
    failure: GatewayError | None = None
    for target, health, upstream in open_targets(gw, meta, gw.routes.usable(model_id, model.targets, key.team_name)):
        native = upstream.config.kind in OPENAI_KINDS  # a gateway speaking this same music API
        if native:
            data = patch_members(body, {"model": orjson.dumps(target.model)})
        else:
            data = suno.build_request(body, ask, target.model)
        meta.upstream_started()
        try:
            path = NATIVE_PATH if native else suno.CREATE_PATH
            status, answer = await call(upstream, "POST", path, "starting a music task", data=data, meta=meta)
        except GatewayError as e:  # unreachable, or failing (5xx): nothing was started
            meta.upstream_ended(0)
            failure = e
            health.failure(e.message, time.monotonic())
            continue
        meta.upstream_ended(status)
        if native:
            if status == 429:
                failure = provider_error(upstream, status, answer)
                health.failure(failure.message, time.monotonic())
                continue
            health.success(meta.provider_latency())
            if status >= 400:
                meta.status = status
                return passed_on(status, answer, request_id)
            return await _created_native(gw, key, meta, upstream.name, model_id, answer, request_id)
        try:
            task_id = suno.read_created(upstream.name, status, answer)
        except GatewayError as e:
            if e.status >= 500 or e.status == 429:  # the provider's trouble: the next target may
                failure = e
                health.failure(e.message, time.monotonic())
                continue
            health.success(meta.provider_latency())
            meta.status = e.status
            raise
        health.success(meta.provider_latency())
        return await _created(gw, key, meta, upstream.name, model_id, task_id, request_id)
    raise failure or circuits_open(gw, model_id, model.targets)


async def _created(
    gw: Gateway, key: KeyRecord, meta: RequestMeta, provider: str, model_id: str, task_id: str, request_id: str
) -> web.Response:
    def shown(job_id: str, created_at: int) -> bytes:
        return suno.music_object(job_id, provider, model_id, task_id, created_at)

    data = await new_job(gw, key, KIND, model_id, provider, task_id, "queued", shown)
    meta.status, meta.native_id = 200, task_id
    return raw_json(data, request_id)


class _NativeUsage(msgspec.Struct):
    output_audio_seconds: float = 0.0


class _Native(msgspec.Struct):
    """What the gateway reads of a music object from an upstream speaking this API."""

    id: str = ""
    status: str = ""
    usage: _NativeUsage | None = None


async def _created_native(
    gw: Gateway, key: KeyRecord, meta: RequestMeta, provider: str, model_id: str, answer: bytes, request_id: str
) -> web.Response:
    seen = read_object(answer, _Native, provider, "sent no music task")

    def shown(job_id: str, created_at: int) -> bytes:
        return patch_members(answer, {"id": orjson.dumps(job_id), "model": orjson.dumps(model_id)})

    data = await new_job(gw, key, KIND, model_id, provider, seen.id, seen.status or "queued", shown)
    meta.status, meta.native_id = 200, seen.id
    return raw_json(data, request_id)


async def retrieve(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/music/generate/{id}`: the task's state, from the provider (and kept); billed when first seen
    completed."""
    job = await owned(request, gw, key.team_id, KIND)
    upstream = upstream_of(gw, job)
    if upstream.config.kind in OPENAI_KINDS:
        status, answer = await call(upstream, "GET", f"{NATIVE_PATH}/{job.upstream_id}", "reading a music task")
        if status >= 400:
            return passed_on(status, answer, request_id)
        seen = read_object(answer, _Native, upstream.name, "sent no music task")
        shown = patch_members(answer, {"id": orjson.dumps(job.id), "model": orjson.dumps(job.model_id)})
        await gw.store.update_job(job.id, status=seen.status or job.status, data=shown)  # type: ignore[union-attr]
        if seen.status == DONE:
            seconds = seen.usage.output_audio_seconds if seen.usage is not None else 0.0
            await bill(gw, job, SURFACE, Usage(audio_seconds=seconds))
        return raw_json(shown, request_id)
    status, answer = await call(
        upstream, "GET", suno.RECORD_PATH, "reading a music task's state", params={"taskId": job.upstream_id}
    )
    progress = suno.read_record(upstream.name, status, answer)
    shown = suno.music_object(job.id, job.provider, job.model_id, job.upstream_id, job.created_at, progress)
    await gw.store.update_job(job.id, status=progress.status, data=shown)  # type: ignore[union-attr]
    if progress.status == DONE:
        await bill(gw, job, SURFACE, Usage(audio_seconds=progress.seconds))
    return raw_json(shown, request_id)


HANDLERS = {
    "music.generate": handler(create),
    "music.get": handler(retrieve),
}
