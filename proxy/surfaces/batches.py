"""Batches, in the shape of OpenAI's Batch API, on the provider that holds their input file.

`POST /v1/batches` takes a `batch` file uploaded through the gateway (its lines already name the provider's
model), checks the key and the team's credit for that model, and starts the batch at the file's provider.
The batch gets an id of the gateway's own (`batch_…`), recorded with its team. Every answer is the
provider's batch object with the gateway's ids (the batch, its input, output and error files) plus the
reference's `billing` (`{state, cost_nanos, currency}`) and `pricing_lines`.

Billing happens when results arrive: the first time the gateway sees the batch ended (`completed`, or
`cancelled`/`expired` with an output file) it reads the output file as it streams, sums the usage of every
successful result, and records the cost at the model's prices times `batch_discount` (pricing.yaml), once,
whichever instance sees it first. A batch that ended with nothing done (`failed`, or no output) is `void`:
recorded at zero.
"""

from __future__ import annotations

import secrets
import time

import msgspec
import orjson
from aiohttp import web

from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.meta import RequestMeta, Usage
from proxy.store.base import Job, KeyRecord
from proxy.surfaces.body import read_body
from proxy.surfaces.files import KIND as FILE
from proxy.surfaces.files import adopt
from proxy.surfaces.inference import admit
from proxy.surfaces.jobs import (
    TRANSPORT_ERRORS,
    account,
    bill,
    call,
    handler,
    listing,
    owned,
    passed_on,
    provider_error,
    raw_json,
    read_object,
    traced,
    upstream_of,
)
from proxy.translators.batch import BatchUsage
from proxy.translators.openai import patch_members
from proxy.upstream import Upstream

KIND = "batch"
SURFACE = "openai.batches"
ENDED = frozenset({"completed", "cancelled", "expired", "failed"})
_CHUNK = 64 * 1024


class _Create(msgspec.Struct):
    input_file_id: str = ""
    endpoint: str = ""


class _Batch(msgspec.Struct):
    """What the gateway reads of a provider's batch object; the rest is shown as it came."""

    id: str = ""
    status: str = ""
    endpoint: str = ""
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None


class _Billing(msgspec.Struct):
    billing: msgspec.Raw = msgspec.Raw(b"")  # Raw, not `Raw | None`: msgspec reads that union as "null only"
    pricing_lines: msgspec.Raw = msgspec.Raw(b"[]")


class _State(msgspec.Struct):
    state: str = "pending"


_PENDING = {"billing": b'{"state":"pending","cost_nanos":0,"currency":"USD"}', "pricing_lines": b"[]"}


async def create(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/batches` `{input_file_id, endpoint, completion_window, metadata?}`."""
    body = await read_body(request, gw.config.server)
    try:
        ask = msgspec.json.decode(body, type=_Create)
    except msgspec.DecodeError as e:
        raise GatewayError(Code.invalid_request, f"Invalid request: {e}") from None
    if not ask.input_file_id:
        raise GatewayError(Code.invalid_request, "Missing required field `input_file_id`.", param="input_file_id")
    file = await gw.store.get_job(key.team_id, ask.input_file_id)  # type: ignore[union-attr]
    if file is None or file.kind != FILE:
        raise GatewayError(Code.not_found, f"No file {ask.input_file_id!r}.")
    if not file.model_id:
        raise GatewayError(
            Code.invalid_request,
            f"The file {file.id!r} was not uploaded with purpose `batch`: its lines were not checked.",
            param="input_file_id",
        )
    upstream = upstream_of(gw, file)
    meta = RequestMeta(request_id, SURFACE, time.perf_counter())
    meta.team_id, meta.key_id, meta.model, meta.provider = key.team_id, key.kid, file.model_id, upstream.name
    traced(request, gw, meta)
    try:
        await admit(gw, key, file.model_id, meta)  # its rate limits too: `account` settles them
        return await _start(gw, key, file, upstream, body, meta, request_id)
    except GatewayError as e:
        meta.status, meta.error_code, meta.error_message = e.status, e.code.name, e.message
        raise
    finally:
        account(gw, meta)  # the creation costs nothing: the batch is billed when its results arrive


async def _start(
    gw: Gateway, key: KeyRecord, file: Job, upstream: Upstream, body: bytes, meta: RequestMeta, request_id: str
) -> web.Response:
    sent = patch_members(body, {"input_file_id": orjson.dumps(file.upstream_id)})
    meta.upstream_started()
    status, answer = await call(upstream, "POST", "/batches", "creating a batch", data=sent, meta=meta)
    meta.upstream_ended(status)
    meta.status = status
    if status >= 400:
        return passed_on(status, answer, request_id)
    seen = read_object(answer, _Batch, upstream.name, "started no batch")
    now = int(time.time())
    job = Job(
        id=f"{KIND}_{secrets.token_hex(12)}",
        kind=KIND,
        team_id=key.team_id,
        key_id=key.kid,
        model_id=file.model_id,
        provider=upstream.name,
        upstream_id=seen.id,
        status=seen.status or "validating",
        created_at=now,
        updated_at=now,
        billed=False,
        data=msgspec.Raw(b"{}"),
    )
    shown = await _shown(gw, job, answer, seen, _PENDING)
    await gw.store.create_job(msgspec.structs.replace(job, data=msgspec.Raw(shown)))  # type: ignore[union-attr]
    return raw_json(shown, request_id)


def _decode(answer: bytes, upstream: Upstream) -> _Batch:
    try:
        return msgspec.json.decode(answer, type=_Batch)
    except msgspec.DecodeError:
        raise GatewayError(Code.upstream_bad_response, f"The provider {upstream.name!r} sent a broken batch.") from None


async def _shown(gw: Gateway, job: Job, answer: bytes, seen: _Batch, billing: dict[str, bytes]) -> bytes:
    """The provider's batch object with the gateway's ids and the billing members."""
    members = {"id": orjson.dumps(job.id), **billing}
    for name in ("input_file_id", "output_file_id", "error_file_id"):
        upstream_id = getattr(seen, name)
        if upstream_id:
            members[name] = orjson.dumps(await adopt(gw, job, upstream_id))
    return patch_members(answer, members)


async def retrieve(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/batches/{id}`: the batch from the provider; billed when first seen ended."""
    job = await owned(request, gw, key.team_id, KIND)
    return await _refresh(gw, job, "GET", f"/batches/{job.upstream_id}", request_id)


async def cancel(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`POST /v1/batches/{id}/cancel`: cancelled at the provider; what it finished is still billed."""
    job = await owned(request, gw, key.team_id, KIND)
    return await _refresh(gw, job, "POST", f"/batches/{job.upstream_id}/cancel", request_id)


async def _refresh(gw: Gateway, job: Job, method: str, path: str, request_id: str) -> web.StreamResponse:
    upstream = upstream_of(gw, job)
    status, answer = await call(upstream, method, path, "reading a batch" if method == "GET" else "cancelling a batch")
    if status >= 400:
        return passed_on(status, answer, request_id)
    seen = _decode(answer, upstream)
    billing = _stored_billing(job)
    if seen.status in ENDED and msgspec.json.decode(billing["billing"], type=_State).state == "pending":
        billing = await _settle(gw, job, upstream, seen)
    shown = await _shown(gw, job, answer, seen, billing)
    await gw.store.update_job(job.id, status=seen.status or job.status, data=shown)  # type: ignore[union-attr]
    return raw_json(shown, request_id)


def _stored_billing(job: Job) -> dict[str, bytes]:
    stored = msgspec.json.decode(job.data, type=_Billing)
    if not stored.billing:
        return dict(_PENDING)
    return {"billing": bytes(stored.billing), "pricing_lines": bytes(stored.pricing_lines)}


async def _settle(gw: Gateway, job: Job, upstream: Upstream, seen: _Batch) -> dict[str, bytes]:
    """Bill an ended batch (once) from its output file's results; its billing members."""
    usage = Usage()
    if seen.output_file_id:
        usage = await _results_usage(upstream, seen.output_file_id, seen.endpoint)
    meta = await bill(gw, job, SURFACE, usage, gw.pricing.batch_tariff(job.model_id, job.provider))
    done = bool(seen.output_file_id) and seen.status != "failed"
    state = "settled" if done else "void"
    billing = {"state": state, "cost_nanos": meta.cost_nanos or 0, "currency": meta.currency or gw.pricing.currency}
    return {"billing": orjson.dumps(billing), "pricing_lines": orjson.dumps(meta.pricing_lines or [])}


async def _results_usage(upstream: Upstream, output_file_id: str, endpoint: str) -> Usage:
    """The summed usage of a batch's output file, read as it streams (never held whole)."""
    summed = BatchUsage(endpoint)
    try:
        async with upstream.session.get(upstream.url(f"/files/{output_file_id}/content")) as resp:
            if resp.status >= 400:
                raise provider_error(upstream, resp.status, await resp.read())
            async for chunk in resp.content.iter_chunked(_CHUNK):
                summed.feed(chunk)
    except TRANSPORT_ERRORS as e:
        raise upstream.failure(e, "reading a batch's results") from None
    return summed.finish()


async def list_batches(request: web.Request, gw: Gateway, key: KeyRecord, request_id: str) -> web.StreamResponse:
    """`GET /v1/batches?limit=&after=`: the team's batches, newest first, as last seen."""
    return await listing(request, gw, key.team_id, KIND, request_id)


HANDLERS = {
    "openai.batches": handler(create),
    "openai.batches_list": handler(list_batches),
    "openai.batches_get": handler(retrieve),
    "openai.batches_cancel": handler(cancel),
}
