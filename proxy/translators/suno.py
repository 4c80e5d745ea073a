"""The gateway's music surface ↔ a sunoapi.org-style provider (kind `suno`). Pure: bytes in; bytes, data and
errors out. No I/O.

The provider's API (docs.sunoapi.org: "Generate Music", "Get Music Generation Details"; Bearer auth, JSON):
- create: `POST {base_url}/api/v1/generate` with `prompt`, `customMode`, `instrumental`, `model`, `style`,
  `title` and `callBackUrl` (required) → `{"code": 200, "msg": "success", "data": {"taskId": "…"}}`.
- status: `GET {base_url}/api/v1/generate/record-info?taskId=…` → `{"code": 200, "data": {"taskId", "status",
  "response": {"sunoData": [{"id", "audioUrl", "streamAudioUrl", "imageUrl", "title", "tags", "duration"}]},
  "errorCode", "errorMessage"}}`; `response` is null until there is audio.
Errors come in an HTTP 200 too, with another `code`: its ApiResponse schema lists 400 invalid parameters,
401 unauthorized, 404 bad method or path, 405 rate limit exceeded, 413 theme or prompt too long, 429
insufficient credits, 430 call frequency too high, 455 system maintenance, 500 server error.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar

import msgspec
import orjson

from proxy.errors import Code, GatewayError
from proxy.translators.openai import patch_members

CREATE_PATH: Final = "/api/v1/generate"
RECORD_PATH: Final = "/api/v1/generate/record-info"
# `callBackUrl` is required by the provider; the gateway polls instead, so without the client's own URL it
# sends this one (the provider's notice goes nowhere).
CALLBACK_PLACEHOLDER: Final = "https://localhost/unused"

# The client's members that are the gateway's to translate; every other member is passed on as it came
# (the provider's own options: `negativeTags`, `vocalGender`, `styleWeight`, `personaId`, …).
_TRANSLATED: Final = ("lyrics", "tags", "duration", "callback_url")
T = TypeVar("T")

# The provider's task states → the gateway's (any other *FAILED or *ERROR is failed; an unknown one, queued).
_STATES: Final = {
    "PENDING": "in_progress",
    "TEXT_SUCCESS": "in_progress",
    "FIRST_SUCCESS": "in_progress",
    "SUCCESS": "completed",
    "CALLBACK_EXCEPTION": "failed",
}
# A refusal's `code` → (the client's HTTP status, error type). Codes not here are the provider's own failure.
_REFUSALS: Final = {
    400: (400, "invalid_request_error"),  # invalid parameters
    413: (400, "invalid_request_error"),  # theme or prompt too long
    429: (503, "upstream_error"),  # the gateway's account at the provider is out of credits: not the client's wallet
    405: (429, "rate_limit_error"),  # rate limit exceeded
    430: (429, "rate_limit_error"),  # call frequency too high
    455: (503, "upstream_error"),  # system maintenance
}


class MusicRequest(msgspec.Struct):
    """The members of a `POST /v1/music/generate` body the gateway reads; the rest stay bytes."""

    model: str = ""
    prompt: str = ""
    lyrics: str = ""
    title: str = ""
    style: str = ""
    tags: str = ""
    instrumental: bool = False
    duration: float | None = None  # not offered by the provider: dropped
    callback_url: str = ""


class _Created(msgspec.Struct):
    taskId: str = ""


class _Track(msgspec.Struct):
    id: str = ""
    audioUrl: str | None = None
    streamAudioUrl: str | None = None
    imageUrl: str | None = None
    title: str | None = None
    tags: str | None = None
    duration: float | None = None


class _Response(msgspec.Struct):
    sunoData: list[_Track] | None = None


class _Task(msgspec.Struct):
    taskId: str = ""
    status: str = ""
    response: _Response | None = None
    errorCode: int | str | None = None
    errorMessage: str | None = None


class _Answer(msgspec.Struct, Generic[T]):
    """Every answer's envelope: `code` 200, or a refusal with its `msg`."""

    code: int | None = None
    msg: str | None = None
    data: T | None = None


class Progress(msgspec.Struct, frozen=True):
    """A task's state in the gateway's terms."""

    status: str  # queued | in_progress | completed | failed
    output: list[dict]
    seconds: float  # the output's total duration
    error: dict | None = None


_request = msgspec.json.Decoder(MusicRequest)
_create_answer = msgspec.json.Decoder(_Answer[_Created])
_record_answer = msgspec.json.Decoder(_Answer[_Task])


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def decode_request(body: bytes) -> MusicRequest:
    """The members the gateway reads; GatewayError(400) naming what is wrong."""
    try:
        return _request.decode(body)
    except msgspec.DecodeError as e:
        raise GatewayError(Code.invalid_request, f"Invalid request: {e}") from None


def build_request(body: bytes, ask: MusicRequest, upstream_model: str) -> bytes:
    """The provider's create body. Custom mode when `lyrics`, `style`/`tags` or `title` is given: then the
    provider sings `prompt` as lyrics, so `lyrics` takes its place."""
    custom = bool(ask.lyrics or ask.style or ask.tags or ask.title)
    members = {
        "prompt": ask.lyrics or ask.prompt if custom else ask.prompt,
        "customMode": custom,
        "instrumental": ask.instrumental,
        "model": upstream_model,
        "style": ask.style or ask.tags,
        "title": ask.title,
        "callBackUrl": ask.callback_url or CALLBACK_PLACEHOLDER,
    }
    return patch_members(body, {name: orjson.dumps(value) for name, value in members.items()}, drop=_TRANSLATED)


def read_created(provider: str, status: int, answer: bytes) -> str:
    """The task id of a create answer; GatewayError for a refusal (a `code` other than 200, in an HTTP 200
    too) or an answer that is not the provider's."""
    created = _data(_create_answer, provider, status, answer)
    if not created.taskId:
        raise _broken(provider, answer)
    return created.taskId


def read_record(provider: str, status: int, answer: bytes) -> Progress:
    """A status answer in the gateway's terms; GatewayError as `read_created`."""
    task = _data(_record_answer, provider, status, answer)
    tracks = task.response.sunoData if task.response is not None and task.response.sunoData else []
    output = [
        {
            "index": i,
            "id": t.id,
            "audio_url": t.audioUrl,
            "stream_audio_url": t.streamAudioUrl,
            "image_url": t.imageUrl,
            "title": t.title,
            "tags": t.tags,
            "duration": t.duration,
        }
        for i, t in enumerate(tracks)
    ]
    state = _STATES.get(task.status) or ("failed" if task.status.endswith(("FAILED", "ERROR")) else "queued")
    error = None
    if state == "failed":
        error = {"code": task.errorCode or task.status, "message": task.errorMessage or task.status}
    return Progress(state, output, round(sum(t.duration or 0.0 for t in tracks), 3), error)


def music_object(
    job_id: str, provider: str, model_id: str, task_id: str, created_at: int, progress: Progress | None = None
) -> bytes:
    """The gateway's music object: `usage` once completed, `error` when failed."""
    progress = progress or Progress("queued", [], 0.0)
    shown: dict = {
        "id": job_id,
        "object": "music",
        "status": progress.status,
        "provider": provider,
        "model": model_id,
        "nativeResponseId": task_id,
        "created_at": created_at,
        "output": progress.output,
    }
    if progress.status == "completed":
        shown["usage"] = {"output_audio_count": len(progress.output), "output_audio_seconds": progress.seconds}
    if progress.error is not None:
        shown["error"] = progress.error
    return orjson.dumps(shown)


def _data(decoder: msgspec.json.Decoder[_Answer[T]], provider: str, status: int, answer: bytes) -> T:
    """The `data` of an answer whose `code` is 200; else the refusal as the client's error."""
    if status >= 500:
        raise _failed(provider, f"HTTP {status}", answer[:300].decode(errors="replace"))
    try:
        envelope: _Answer[T] | None = decoder.decode(answer)
    except msgspec.DecodeError:
        if status < 300:
            raise _broken(provider, answer) from None
        envelope = None
    code = envelope.code if envelope is not None and envelope.code is not None else status
    if envelope is not None and code == 200 and status < 300:
        if envelope.data is None:
            raise _broken(provider, answer)
        return envelope.data
    message = envelope.msg if envelope is not None and envelope.msg else answer[:300].decode(errors="replace")
    # An HTTP 429 is a rate limit, whatever its body; the envelope's code 429 is out of credits.
    refusal = (429, "rate_limit_error") if status == 429 else _REFUSALS.get(code)
    if refusal is None:
        raise _failed(provider, f"code {code}", message)
    status, kind = refusal
    text = f"The provider {provider!r} refused the task (code {code}): {message}"
    raise GatewayError(Code.upstream_error, text, status=status, type=kind)


def _failed(provider: str, what: str, detail: str) -> GatewayError:
    return GatewayError(Code.upstream_error, f"The provider {provider!r} answered {what}: {detail}")


def _broken(provider: str, answer: bytes) -> GatewayError:
    return GatewayError(Code.upstream_bad_response, f"The provider {provider!r} sent no task: {answer[:200]!r}")
