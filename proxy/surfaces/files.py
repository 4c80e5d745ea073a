"""Files, in the shape of OpenAI's Files API, kept at an OpenAI-kind provider and owned by a team here.

`POST /v1/files` streams the client's form to the provider (never held in memory). A `batch` file is
checked line by line on its way and each line's model rewritten to the provider's name; it goes to the
provider of the model its lines name, and is spooled to disk first so that a bad line is refused before
anything is sent. Other files go to the provider named by `?provider=`, else to the first provider of kind
`openai`.

The gateway's id for a file (`file_…`) is derived from its team, provider and provider id, so the files a
batch produces get theirs when the batch is first seen with them. `GET /v1/files` lists the team's files as
the gateway recorded them; with `?provider=` it asks the provider instead, which only a provider whose
account is the team's own (`providers.<name>.team`) may answer: a shared account would show every team's
files, so it gets the reference's `file_list_not_supported_with_shared_gateway_key`.
"""

from __future__ import annotations

import hashlib
import time

import msgspec
import orjson
from aiohttp import web

from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.meta import RequestMeta
from proxy.routing import SURFACES
from proxy.store.base import Job, KeyRecord, StoreError
from proxy.surfaces.jobs import (
    TRANSPORT_ERRORS,
    call,
    download,
    handler,
    listing,
    owned,
    passed_on,
    provider_error,
    raw_json,
    read_object,
    remove,
    upstream_of,
)
from proxy.surfaces.media import Upload
from proxy.translators.batch import BatchLines
from proxy.translators.exchange import form_type
from proxy.translators.openai import patch_members
from proxy.upstream import Upstream

KIND = "file"


class _File(msgspec.Struct):
    id: str = ""
    status: str = ""
    purpose: str = ""


def file_id(team_id: str, provider: str, upstream_id: str) -> str:
    """The gateway's id for a provider's file held for a team: the same whoever computes it."""
    digest = hashlib.sha256(f"{team_id}\n{provider}\n{upstream_id}".encode()).hexdigest()
    return f"{KIND}_{digest[:32]}"


def _shown(raw: bytes, job_id: str) -> bytes:
    return patch_members(raw, {"id": orjson.dumps(job_id)})


async def adopt(gw: Gateway, owner: Job, upstream_id: str) -> str:
    """The gateway's id for a file the provider made for `owner` (a batch's output), recorded for its team
    on first sight (its object is filled in when it is first retrieved)."""
    job_id = file_id(owner.team_id, owner.provider, upstream_id)
    if await gw.store.get_job(owner.team_id, job_id) is None:  # type: ignore[union-attr]
        data = orjson.dumps({"id": job_id, "object": "file", "purpose": "batch_output"})
        job = _job(job_id, owner.team_id, owner.key_id, "", owner.provider, upstream_id, "processed", data)
        try:
            await gw.store.create_job(job)  # type: ignore[union-attr]
        except StoreError:
            if await gw.store.get_job(owner.team_id, job_id) is None:  # type: ignore[union-attr]
                raise  # not a concurrent request recording it first
    return job_id


def _job(
    job_id: str, team_id: str, key_id: str, model_id: str, provider: str, upstream_id: str, status: str, data: bytes
) -> Job:
    now = int(time.time())
    return Job(
        id=job_id,
        kind=KIND,
        team_id=team_id,
        key_id=key_id,
        model_id=model_id,  # a batch file: the model its lines call
        provider=provider,
        upstream_id=upstream_id,
        status=status,
        created_at=now,
        updated_at=now,
        billed=True,  # a file costs nothing
        data=msgspec.Raw(data),
    )


def _default_provider(gw: Gateway, named: str, key: KeyRecord) -> str:
    """The provider a non-batch file goes to: `named`, else the first of kind `openai`."""
    providers = gw.config.providers
    if named:
        config = providers.get(named)
        if config is None or config.kind not in ("openai", "openai-compatible"):
            kinds = [n for n, p in providers.items() if p.kind in ("openai", "openai-compatible")]
            raise GatewayError(
                Code.invalid_request,
                f"No provider {named!r} with OpenAI's Files API (these have it: {', '.join(kinds)}).",
                param="provider",
            )
        if config.team and config.team != key.team_name:
            raise GatewayError(Code.forbidden, f"The provider {named!r} is another team's own account.")
        return named
    for name, config in providers.items():
        if config.kind == "openai" and config.team in ("", key.team_name):
            return name
    raise GatewayError(Code.invalid_request, "No provider of kind `openai` is configured to hold files.")


async def create(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/files` (multipart: `file`, `purpose`, and what else the provider takes)."""
    meta = RequestMeta(request_id, "openai.files", time.perf_counter())
    upload = await Upload.open(request, gw.config.server, meta, key="purpose")
    try:
        purpose = await upload.until_key()
        if not purpose:
            raise GatewayError(Code.invalid_request, "Missing required form field `purpose`.", param="purpose")
        upload.key_value = purpose
        model_id = ""
        if purpose == "batch":
            if upload.holds("file"):
                raise GatewayError(
                    Code.invalid_request,
                    "A batch file must come after `purpose` in the form (e.g. curl -F purpose=batch -F file=@in.jsonl)",
                    param="file",
                )
            providers = gw.config.providers.items()  # not another team's own account
            kinds = {name: p.kind for name, p in providers if p.team in ("", key.team_name)}
            lines = BatchLines(lambda name, surface: gw.routes.resolve(name, SURFACES[surface]), kinds)
            await upload.hold_rest("file", lines.feed, lines.finish)
            if lines.target is None:
                raise GatewayError(Code.invalid_request, "Missing required form field `file`.", param="file")
            model_id, provider = lines.model_id, lines.target.provider
            if key.allowed_models and model_id not in key.allowed_models:
                raise GatewayError(Code.forbidden, f"This key may not use {model_id!r}.", param="file")
        else:
            provider = _default_provider(gw, request.query.get("provider", ""), key)
        upstream = gw.upstreams[provider]
        meta.model, meta.provider = model_id, provider
        meta.upstream_started()
        status, answer = await _send(upstream, upload)
        meta.upstream_ended(status)
        meta.status = status
        if status >= 400:
            return passed_on(status, answer, request_id)
        return await _created(gw, key, upstream, model_id, answer, request_id)
    except GatewayError as e:
        meta.status = e.status
        raise
    finally:
        upload.close()
        meta.request_bytes = upload.received
        meta.t_end = time.perf_counter()
        gw.metrics.record(meta, meta.t_end)  # counted, not recorded as a generation: a file costs nothing


async def _send(upstream: Upstream, upload: Upload) -> tuple[int, bytes]:
    headers = {"Content-Type": form_type(upload.boundary)}
    try:
        async with upstream.session.post(upstream.url("/files"), data=upload.payload(), headers=headers) as resp:
            answer = await resp.read()
    except TRANSPORT_ERRORS as e:
        if upload.error is not None:
            raise upload.error from None  # the client's form failed, not the provider
        raise upstream.failure(e, "uploading a file") from None
    if resp.status >= 500:
        raise provider_error(upstream, resp.status, answer)
    return resp.status, answer


async def _created(
    gw: Gateway, key: KeyRecord, upstream: Upstream, model_id: str, answer: bytes, request_id: str
) -> web.Response:
    seen = read_object(answer, _File, upstream.name, "kept no file")
    job_id = file_id(key.team_id, upstream.name, seen.id)
    shown = _shown(answer, job_id)
    job = _job(job_id, key.team_id, key.kid, model_id, upstream.name, seen.id, seen.status or "uploaded", shown)
    await gw.store.create_job(job)  # type: ignore[union-attr]
    return raw_json(shown, request_id)


async def retrieve(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/files/{id}`: the file's object, from the provider (and kept)."""
    job = await owned(request, gw, key.team_id, KIND)
    status, answer = await call(upstream_of(gw, job), "GET", f"/files/{job.upstream_id}", "reading a file")
    if status >= 400:
        return passed_on(status, answer, request_id)
    shown = _shown(answer, job.id)
    try:
        seen = msgspec.json.decode(answer, type=_File)
    except msgspec.DecodeError:
        raise GatewayError(Code.upstream_bad_response, "The provider sent a broken file object.") from None
    await gw.store.update_job(job.id, status=seen.status or job.status, data=shown)  # type: ignore[union-attr]
    return raw_json(shown, request_id)


async def content(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/files/{id}/content`: the provider's bytes, relayed as they come."""
    job = await owned(request, gw, key.team_id, KIND)
    path = f"/files/{job.upstream_id}/content"
    return await download(request, upstream_of(gw, job), path, "downloading a file", request_id)


async def delete(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`DELETE /v1/files/{id}`: deleted at the provider (already gone there is fine), then here."""
    job = await owned(request, gw, key.team_id, KIND)
    return await remove(gw, job, f"/files/{job.upstream_id}", "file", request_id)


async def list_files(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/files`: the team's files as recorded here; `?provider=` asks that provider, which only a
    provider account of the team's own may answer."""
    named = request.query.get("provider", "")
    if not named:
        return await listing(request, gw, key.team_id, KIND, request_id)
    config = gw.config.providers.get(named)
    if config is None:
        raise GatewayError(Code.invalid_request, f"No provider {named!r}.", param="provider")
    if config.team != key.team_name:
        return raw_json(
            orjson.dumps(
                {
                    "ok": False,
                    "error": "not_supported",
                    "reason": "file_list_not_supported_with_shared_gateway_key",
                    "message": f"The provider {named!r} holds files for every team on one shared key, so its list "
                    "cannot be shown. GET /v1/files (without `provider`) lists this team's files.",
                    "request_id": request_id,
                }
            ),
            request_id,
            status=400,
        )
    upstream = gw.upstreams[named]
    params = {k: v for k, v in request.query.items() if k in ("purpose", "limit", "after", "order")}
    status, answer = await call(upstream, "GET", "/files", "listing files", params=params)
    if status >= 400:
        return passed_on(status, answer, request_id)
    return raw_json(await _own_listing(gw, key, upstream, answer), request_id)


class _Listed(msgspec.Struct):
    data: list[msgspec.Raw] = []


async def _own_listing(gw: Gateway, key: KeyRecord, upstream: Upstream, answer: bytes) -> bytes:
    """A team-owned provider's file list with the gateway's ids (each file recorded for the team)."""
    try:
        listed = msgspec.json.decode(answer, type=_Listed)
    except msgspec.DecodeError:
        raise GatewayError(Code.upstream_bad_response, "The provider sent a broken file list.") from None
    owner = _job("", key.team_id, key.kid, "", upstream.name, "", "", b"{}")
    data = []
    for raw in listed.data:
        seen = msgspec.json.decode(raw, type=_File)
        data.append(_shown(bytes(raw), await adopt(gw, owner, seen.id)))
    return patch_members(answer, {"data": b"[" + b",".join(data) + b"]"})


HANDLERS = {
    "openai.files": handler(create),
    "openai.files_list": handler(list_files),
    "openai.files_get": handler(retrieve),
    "openai.files_content": handler(content),
    "openai.files_delete": handler(delete),
}
