"""End to end: images, audio, rerank and OCR through the gateway to a mock upstream that checks what it gets."""

from __future__ import annotations

import hashlib

import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import GatewayConfig, load_config
from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.translators import media
from tests.conftest import DEFAULT_CONFIG, MakeKey, Mock, auth, env_for
from tests.mock_upstream import audio_sha256

UPSTREAM_KEY = "sk-upstream-secret"


def media_env(mock: Mock, store_url: str, **extra: str) -> dict[str, str]:
    """Every provider of the default config's media models on the mock, with the key the mock expects."""
    return env_for(
        mock,
        store_url,
        COHERE_BASE_URL=mock.url,
        COHERE_API_KEY=UPSTREAM_KEY,
        MISTRAL_BASE_URL=mock.url,
        MISTRAL_API_KEY=UPSTREAM_KEY,
        **extra,
    )


@pytest.fixture
def media_config(mock: Mock, store_url: str) -> GatewayConfig:
    return load_config(DEFAULT_CONFIG, env=media_env(mock, store_url))


@pytest.fixture
async def gw(aiohttp_client, media_config: GatewayConfig) -> TestClient:
    return await aiohttp_client(build_app(media_config))


async def record(gw: TestClient, key: str, request_id: str) -> dict:
    r = await gw.get("/v1/generations", params={"id": request_id}, headers=auth(key))
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


def lines(data: dict) -> dict[str, tuple]:
    return {line["meter"]: (line["quantity"], line["unit"], line["amount_nanos"]) for line in data["pricing_lines"]}


# ---------------------------------------------------------------------------------------------------------
# JSON in, JSON out


async def test_image_generation_is_passed_through_and_billed_per_image(gw, key, mock):
    body = b'{"model": "openai/dall-e-3", "prompt": "a red fox",  "n": 2, "size": "1024x1024", "meta": true}'
    r = await gw.post("/v1/images/generations", data=body, headers=auth(key))
    assert r.status == 200, await r.text()
    data = await r.json()
    assert len(data["data"]) == 2
    assert data["cost_nanos"] == 2 * 40_000_000 and data["currency"] == "USD"
    assert lines(data) == {"images": (2, "image", 80_000_000)}
    assert data["meta"]["model"] == "openai/dall-e-3" and data["meta"]["upstream_model"] == "dall-e-3"
    # only `model` was rewritten and the gateway's `meta` removed; the rest kept its bytes
    assert mock.control.last.body == b'{"model":"dall-e-3","prompt":"a red fox","n":2,"size":"1024x1024"}'
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["endpoint"] == "openai.images.generations" and rec["model_id"] == "openai/dall-e-3"
    assert rec["usage"]["images"] == 2 and rec["cost_nanos"] == 80_000_000
    assert "characters" not in rec["usage"]  # units not metered are left out


async def test_gpt_image_bills_its_tokens_and_counts_images(gw, key, mock):
    r = await gw.post("/v1/images/generations", json={"model": "gpt-image-1", "prompt": "fox"}, headers=auth(key))
    data = await r.json()
    assert data["usage"] == {"input_tokens": 50, "output_tokens": 1056, "total_tokens": 1106}
    assert lines(data) == {
        "input_tokens": (50, "1M tokens", 250_000),  # $5/M
        "output_tokens": (1056, "1M tokens", 42_240_000),  # $40/M
    }
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"]["images"] == 1 and rec["usage"]["prompt_tokens"] == 50


async def test_streamed_image_generation_is_relayed_with_its_usage(gw, key, mock):
    request = {"model": "openai/gpt-image-1", "prompt": "fox", "n": 2, "stream": True, "meta": True}
    r = await gw.post("/v1/images/generations", json=request, headers=auth(key))
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["X-Accel-Buffering"] == "no"
    text = await r.read()
    assert text.count(b"event: image_generation.completed\n") == 2  # the provider's framing, untouched
    final = orjson.loads(text.rstrip().rsplit(b"\n", 1)[-1].removeprefix(b"data: "))
    assert final["type"] == "gateway.meta" and final["meta"]["stream"] is True
    assert final["cost_nanos"] == 50 * 5_000 + 2 * 1056 * 40_000
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"]["images"] == 2 and rec["usage"]["completion_tokens"] == 2112 and rec["stream"] is True


async def test_rerank_counts_the_search_units_billed(gw, key, mock):
    request = {"model": "cohere/rerank-v3.5", "query": "capital of France?", "documents": ["Paris", "Berlin"]}
    r = await gw.post("/v1/rerank", json=request, headers=auth(key))
    assert r.status == 200, await r.text()
    data = await r.json()
    assert [x["index"] for x in data["results"]] == [0, 1]
    assert lines(data) == {"searches": (1, "search", 2_000_000)}
    sent = mock.control.last
    assert sent.path == "/v1/rerank" and sent.json == {**request, "model": "rerank-v3.5"}
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"]["searches"] == 1 and rec["provider"] == "cohere" and rec["native_response_id"] == "rerank-mock"


async def test_ocr_counts_pages(gw, key, mock):
    document = {"type": "document_url", "document_url": "https://example.com/a.pdf"}
    r = await gw.post("/v1/ocr", json={"model": "mistral-ocr-latest", "document": document}, headers=auth(key))
    assert r.status == 200, await r.text()
    data = await r.json()
    assert len(data["pages"]) == 3 and lines(data) == {"pages": (3, "page", 3_000_000)}
    assert mock.control.last.json == {"model": "mistral-ocr-latest", "document": document}
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"]["pages"] == 3 and rec["provider"] == "mistral" and rec["cost_nanos"] == 3_000_000


# ---------------------------------------------------------------------------------------------------------
# speech: JSON in, audio out as it arrives


async def test_speech_is_relayed_as_it_arrives_with_its_content_type(gw, key, mock):
    mock.control.audio_bytes = 5 * 64 * 1024
    mock.control.gate_after = 1  # the mock holds the rest until the client has the first chunk
    text = "Hello, wörld!"
    request = {"model": "openai/tts-1", "voice": "alloy", "input": text, "response_format": "wav"}
    r = await gw.post("/v1/audio/speech", json=request, headers=auth(key))
    assert r.status == 200 and r.headers["Content-Type"] == "audio/wav"
    first = await r.content.readexactly(64 * 1024)
    mock.control.gate.set()
    rest = await r.read()
    assert hashlib.sha256(first + rest).hexdigest() == audio_sha256(5 * 64 * 1024)
    assert mock.control.last.json == {**request, "model": "tts-1"}
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"] == {**rec["usage"], "characters": len(text)}
    assert lines(rec) == {"characters": (13, "1M characters", 195_000)}  # 13 x $15/M
    assert rec["timings"]["ttft_ms"] is not None and rec["success"] is True


async def test_speech_cut_mid_body_never_ends_cleanly(gw, key, mock):
    mock.control.audio_bytes = 4 * 64 * 1024
    mock.control.mode = "truncate"
    r = await gw.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "hi"}, headers=auth(key))
    assert r.status == 200
    with pytest.raises(Exception) as info:
        await r.read()
    assert "payload" in type(info.value).__name__.lower() or "connection" in str(info.value).lower()
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["success"] is False and rec["error_code"] in ("upstream_bad_response", "upstream_unreachable")


async def test_speech_input_must_be_text(gw, key, mock):
    r = await gw.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": ["hi"]}, headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "input"
    assert mock.control.received == []


# ---------------------------------------------------------------------------------------------------------
# errors and fallbacks


async def test_json_endpoints_fall_back_to_the_next_target_on_a_500(aiohttp_client, mock, store_url, make_key: MakeKey):
    from proxy.config import ProviderConfig, Target

    config = load_config(DEFAULT_CONFIG, env=media_env(mock, store_url))
    config.providers["backup"] = ProviderConfig(kind="openai-compatible", base_url=mock.url, api_key=UPSTREAM_KEY)
    for model_id in ("openai/dall-e-3", "openai/tts-1", "cohere/rerank-v3.5", "mistral/mistral-ocr-latest"):
        model = config.models[model_id]
        model.retries = 0
        model.targets.append(Target(provider="backup", model=model.targets[0].model))
    gw = await aiohttp_client(build_app(config))
    key = await make_key()
    requests = {
        "/v1/images/generations": {"model": "openai/dall-e-3", "prompt": "fox"},
        "/v1/audio/speech": {"model": "openai/tts-1", "voice": "alloy", "input": "hi"},
        "/v1/rerank": {"model": "cohere/rerank-v3.5", "query": "q", "documents": ["a"]},
        "/v1/ocr": {"model": "mistral/mistral-ocr-latest", "document": {"type": "document_url", "document_url": "x"}},
    }
    for path, request in requests.items():
        mock.control.script = ["status"]  # the first target answers 500, the second 200
        r = await gw.post(path, json=request, headers=auth(key))
        assert r.status == 200, (path, await r.text())
        await r.read()
        rec = await record(gw, key, r.headers["x-request-id"])
        first = config.models[request["model"]].targets[0].provider
        attempts = [(a["provider"], a["status"]) for a in rec["timings"]["attempts"]]
        assert attempts == [(first, 500), ("backup", 200)], path
        assert rec["provider"] == "backup" and rec["success"] is True and rec["cost_nanos"] > 0, path


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/images/generations", {"prompt": "fox"}, 400, "invalid_request"),
        ("/v1/images/generations", {"model": "openai/dall-e-4", "prompt": "fox"}, 404, "model_not_found"),
        ("/v1/audio/speech", {"model": "openai/gpt-4o-mini", "input": "hi"}, 400, "model_not_supported"),
        ("/v1/rerank", {"model": "openai/tts-1", "query": "q", "documents": []}, 400, "model_not_supported"),
        ("/v1/ocr", {"model": "nobody/ocr"}, 404, "model_not_found"),
    ],
)
async def test_json_endpoint_errors(gw, key, mock, path, body, status, code):
    r = await gw.post(path, json=body, headers=auth(key))
    assert r.status == status
    error = (await r.json())["error"]
    assert error["code"] == code and error["param"] == "model"
    assert mock.control.received == []


async def test_media_endpoints_need_a_key_and_credit(gw, make_key, mock):
    r = await gw.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi"})
    assert r.status == 401
    poor = await make_key(team="poor", credit_usd=0.5)
    r = await gw.post("/v1/ocr", json={"model": "mistral-ocr-latest", "document": {}}, headers=auth(poor))
    assert r.status == 402 and (await r.json())["error"]["code"] == "insufficient_credits"
    assert mock.control.received == []


async def test_metrics_count_media_requests(gw, key, mock):
    await (
        await gw.post("/v1/rerank", json={"model": "rerank-v3.5", "query": "q", "documents": ["a"]}, headers=auth(key))
    ).read()
    text = await (await gw.get("/metrics")).text()
    counted = [line for line in text.splitlines() if line.startswith("gateway_requests_total{")]
    assert any('surface="rerank"' in c and 'model="cohere/rerank-v3.5"' in c and c.endswith(" 1.0") for c in counted)


# ---------------------------------------------------------------------------------------------------------
# multipart uploads

BOUNDARY = "gw-test-boundary-7d1f"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def field(name: str, value: bytes | str, filename: str | None = None, content_type: str | None = None) -> bytes:
    """One part of a form, as a client sends it."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + (value.encode() if isinstance(value, str) else value) + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


AUDIO = bytes(range(256)) * 1200 + b"\r\n--gw-test-boundary-7d1 not quite a boundary\r\n"  # ~300 KB


async def test_transcription_streams_the_file_and_rewrites_only_the_model(gw, key, mock):
    body = form(
        field("model", "openai/whisper-1"),
        field("file", AUDIO, filename="speech.mp3", content_type="audio/mpeg"),
        field("language", "en"),
        field("prompt", "naïve café"),
        field("response_format", "json"),
    )
    r = await gw.post("/v1/audio/transcriptions", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200, await r.text()
    data = await r.json()
    assert data["text"] == "Hello there!" and data["usage"] == {"type": "duration", "seconds": 9}
    assert lines(data) == {"audio_seconds": (9.0, "minute", 900_000)}  # 9 s at $0.006 a minute
    (sent,) = mock.control.forms
    assert sent.path == "/v1/audio/transcriptions" and sent.headers["Content-Type"] == FORM_TYPE
    assert sent.names == ["model", "file", "language", "prompt", "response_format"]
    assert sent.field("model").value == "whisper-1"
    upload = sent.field("file")
    assert (upload.filename, upload.size, upload.sha256) == ("speech.mp3", len(AUDIO), sha(AUDIO))
    assert upload.headers["Content-Type"] == "audio/mpeg"
    assert (sent.field("language").value, sent.field("prompt").value) == ("en", "naïve café")
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["endpoint"] == "openai.audio.transcriptions" and rec["usage"]["audio_seconds"] == 9
    assert rec["cost_nanos"] == 900_000 and rec["stream"] is False


async def test_a_file_before_the_model_is_spooled_to_disk_and_deleted(gw, key, mock, monkeypatch):
    from proxy.surfaces import media

    spools = []
    real = media.tempfile.TemporaryFile

    def tracked():  # type: ignore[no-untyped-def]
        spools.append(real())
        return spools[-1]

    monkeypatch.setattr(media.tempfile, "TemporaryFile", tracked)
    long_prompt = "word " * 20_000  # 100 KB: over what a field before `model` may hold in memory
    body = form(
        field("file", AUDIO, filename="a.wav", content_type="audio/wav"),
        field("prompt", long_prompt),
        field("temperature", "0.2"),
        field("extra", AUDIO[::-1], filename="b.wav"),
        field("model", "whisper-1"),
        field("response_format", "text"),
    )
    r = await gw.post("/v1/audio/translations", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain") and await r.text() == "Hello there!\n"
    (sent,) = mock.control.forms
    assert sent.path == "/v1/audio/translations"
    assert sent.names == ["file", "prompt", "temperature", "extra", "model", "response_format"]  # the client's order
    assert (sent.field("file").sha256, sent.field("extra").sha256) == (sha(AUDIO), sha(AUDIO[::-1]))
    assert (sent.field("prompt").value, sent.field("temperature").value) == (long_prompt, "0.2")
    assert sent.field("model").value == "whisper-1"
    assert len(spools) == 1 and spools[0].closed  # the parts went to one file on disk, and it is gone
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"] == {} and rec["usage_source"] == "none" and rec["cost_nanos"] == 0  # text: no usage


async def test_translation_is_billed_by_the_minute(gw, key, mock):
    body = form(field("model", "openai/whisper-1"), field("file", AUDIO, filename="fr.mp3"))
    r = await gw.post("/v1/audio/translations", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200 and (await r.json())["cost_nanos"] == 900_000
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["endpoint"] == "openai.audio.translations" and rec["usage"]["audio_seconds"] == 9
    assert lines(rec) == {"audio_seconds": (9.0, "minute", 900_000)}


@pytest.mark.parametrize(
    ("fmt", "content_type", "start", "seconds"),
    [
        ("srt", "text/plain", "1\n00:00:00,000", None),
        ("vtt", "text/vtt", "WEBVTT", None),
        ("verbose_json", "application/json", '{"task": "transcribe"', 8.47),
    ],
)
async def test_transcription_formats_pass_through(gw, key, mock, fmt, content_type, start, seconds):
    body = form(
        field("model", "whisper-1"), field("file", b"RIFF....", filename="a.wav"), field("response_format", fmt)
    )
    r = await gw.post("/v1/audio/transcriptions", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200 and r.headers["Content-Type"].startswith(content_type)
    assert (await r.text()).startswith(start)
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"].get("audio_seconds") == seconds
    assert rec["cost_nanos"] == (847_000 if seconds else 0)  # 8.47 s = 8,470 ms at 100 nanos a ms


async def test_streamed_transcription_is_relayed_and_its_tokens_billed(gw, key, mock):
    body = form(
        field("model", "openai/gpt-4o-transcribe"),
        field("file", AUDIO, filename="a.mp3"),
        field("stream", "true"),
    )
    r = await gw.post("/v1/audio/transcriptions", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = [orjson.loads(line[6:]) for line in (await r.read()).split(b"\n") if line.startswith(b"data: ")]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["stream"] is True and rec["usage"]["prompt_tokens"] == 40 and rec["usage"]["completion_tokens"] == 3
    assert rec["cost_nanos"] == 40 * 6_000 + 3 * 10_000


async def test_image_edit_carries_its_images_and_mask(gw, key, mock):
    image, mask = b"\x89PNG" + bytes(5000), b"\x89PNG" + bytes(range(256)) * 10
    body = form(
        field("image[]", image, filename="a.png", content_type="image/png"),
        field("image[]", image[::-1], filename="b.png", content_type="image/png"),
        field("mask", mask, filename="mask.png", content_type="image/png"),
        field("prompt", "add a hat"),
        field("model", "openai/gpt-image-1"),
        field("n", "2"),
    )
    r = await gw.post("/v1/images/edits", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200, await r.text()
    assert len((await r.json())["data"]) == 2
    (sent,) = mock.control.forms
    assert [(p.name, p.filename, p.sha256) for p in sent.parts if p.filename] == [
        ("image[]", "a.png", sha(image)),
        ("image[]", "b.png", sha(image[::-1])),
        ("mask", "mask.png", sha(mask)),
    ]
    assert sent.field("model").value == "gpt-image-1"
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["usage"]["images"] == 2 and rec["endpoint"] == "openai.images.edits"
    assert rec["cost_nanos"] == 50 * 5_000 + 2112 * 40_000


async def test_an_upload_is_never_sent_twice(aiohttp_client, mock, store_url, make_key: MakeKey):
    from proxy.config import ProviderConfig, Target

    config = load_config(DEFAULT_CONFIG, env=media_env(mock, store_url))
    config.providers["backup"] = ProviderConfig(kind="openai", base_url=mock.url, api_key=UPSTREAM_KEY)
    config.models["openai/whisper-1"].targets.append(Target(provider="backup", model="whisper-1"))
    gw = await aiohttp_client(build_app(config))
    key = await make_key()
    mock.control.mode = "status"
    body = form(field("model", "whisper-1"), field("file", AUDIO, filename="a.mp3"))
    r = await gw.post("/v1/audio/transcriptions", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 500 and (await r.json())["error"]["message"] == "upstream says no"
    assert len(mock.control.forms) == 1  # neither retried at the same target nor sent to the backup
    rec = await record(gw, key, r.headers["x-request-id"])
    assert [a["status"] for a in rec["timings"]["attempts"]] == [500]


async def test_an_unreachable_target_hands_the_untouched_upload_to_the_next(
    aiohttp_client, mock, store_url, make_key: MakeKey
):
    from proxy.config import ProviderConfig, Target

    config = load_config(DEFAULT_CONFIG, env=media_env(mock, store_url))
    config.providers["down"] = ProviderConfig(kind="openai", base_url="http://127.0.0.1:9/v1", api_key=UPSTREAM_KEY)
    config.models["openai/whisper-1"].targets.insert(0, Target(provider="down", model="whisper-1"))
    gw = await aiohttp_client(build_app(config))
    key = await make_key()
    body = form(field("model", "whisper-1"), field("file", AUDIO, filename="a.mp3"))
    r = await gw.post("/v1/audio/transcriptions", data=body, headers={**auth(key), "Content-Type": FORM_TYPE})
    assert r.status == 200, await r.text()
    assert mock.control.forms[0].field("file").sha256 == sha(AUDIO)
    rec = await record(gw, key, r.headers["x-request-id"])
    assert [(a["provider"], a["status"]) for a in rec["timings"]["attempts"]] == [("down", 0), ("openai", 200)]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"model": "whisper-1"}', "application/json", 400, "invalid_request"),
        (form(field("file", b"abc", filename="a.mp3")), FORM_TYPE, 400, "invalid_request"),  # no model
        (form(field("model", "whisper-9"), field("file", b"abc", filename="a.mp3")), FORM_TYPE, 404, "model_not_found"),
        (form(field("model", "tts-1"), field("file", b"abc", filename="a.mp3")), FORM_TYPE, 400, "model_not_supported"),
        (b"--" + BOUNDARY.encode() + b"\r\nno headers end here", FORM_TYPE, 400, "invalid_request"),
        (form(field("model", "x" * 5000)), FORM_TYPE, 400, "invalid_request"),
        (
            form(*(field(f"f{i}", "x") for i in range(1001)), field("model", "whisper-1")),
            FORM_TYPE,
            400,
            "invalid_request",
        ),
    ],
    ids=[
        "not-multipart",
        "no-model",
        "unknown-model",
        "wrong-endpoint",
        "malformed",
        "long-model",
        "parts-before-model",
    ],
)
async def test_upload_errors(gw, key, mock, body, content_type, status, code):
    r = await gw.post("/v1/audio/transcriptions", data=body, headers={**auth(key), "Content-Type": content_type})
    assert r.status == status, await r.text()
    assert (await r.json())["error"]["code"] == code
    assert mock.control.forms == []


async def test_uploads_over_the_limit_get_413(aiohttp_client, mock, store_url, make_key: MakeKey):
    config = load_config(DEFAULT_CONFIG, env=media_env(mock, store_url))
    config.server.max_upload_bytes = 64 * 1024
    gw = await aiohttp_client(build_app(config))
    key = await make_key()
    body = form(field("model", "whisper-1"), field("file", AUDIO, filename="a.mp3"))
    headers = {**auth(key), "Content-Type": FORM_TYPE}
    r = await gw.post("/v1/audio/transcriptions", data=body, headers=headers)  # declared too long
    assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"

    async def chunked():  # no Content-Length: found too long while it streams upstream
        for i in range(0, len(body), 16 * 1024):
            yield body[i : i + 16 * 1024]

    r = await gw.post("/v1/audio/transcriptions", data=chunked(), headers=headers)
    assert r.status == 413, await r.text()
    rec = await record(gw, key, r.headers["x-request-id"])
    assert rec["error_code"] == "payload_too_large" and rec["cost_nanos"] == 0


# ---------------------------------------------------------------------------------------------------------
# the official SDK


async def test_the_openai_sdk_speaks_transcribes_and_draws_through_the_gateway(gw, key, mock):
    import openai

    sdk = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=key, max_retries=0, timeout=10)
    try:
        mock.control.audio_bytes = 3 * 64 * 1024 + 17
        async with sdk.audio.speech.with_streaming_response.create(
            model="openai/gpt-4o-mini-tts", voice="alloy", input="Hello there"
        ) as response:
            assert response.headers["content-type"] == "audio/mpeg"
            audio = b"".join([chunk async for chunk in response.iter_bytes()])
        assert sha(audio) == audio_sha256(3 * 64 * 1024 + 17)

        transcript = await sdk.audio.transcriptions.create(
            model="openai/whisper-1", file=("speech.mp3", AUDIO, "audio/mpeg"), language="en"
        )
        assert transcript.text == "Hello there!"
        (sent,) = mock.control.forms
        assert (sent.field("file").sha256, sent.field("model").value) == (sha(AUDIO), "whisper-1")
        assert sent.names == ["model", "language", "file"]  # fields first: nothing had to be spooled

        images = await sdk.images.generate(model="openai/dall-e-3", prompt="a red fox", n=1)
        assert images.data[0].b64_json == "aW1hZ2U="
    finally:
        await sdk.close()


# ---------------------------------------------------------------------------------------------------------
# 200 MB each way through a real gateway process, in constant memory

BIG = 200 * 1024 * 1024
RSS_GROWTH_LIMIT = 20 * 1024 * 1024


async def test_200_mb_each_way_keep_the_gateways_memory_flat(mock, store_url, tmp_path):
    import asyncio

    import aiohttp

    from bench.procs import rss_bytes
    from tests.mock_upstream import AUDIO_BLOCK
    from tests.test_cli import _start, _wait_ready, cli

    env = media_env(mock, store_url)
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    proc, url, _ = await _start(env, tmp_path)
    sent = hashlib.sha256()

    async def upload(size: int):  # the form, generated as it is sent: never whole in this process either
        yield (
            field("model", "openai/whisper-1")
            + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'.encode()
        )
        left = size
        while left:
            chunk = AUDIO_BLOCK[: min(left, len(AUDIO_BLOCK))]
            sent.update(chunk)
            left -= len(chunk)
            yield chunk
        yield b"\r\n" + field("response_format", "json") + f"--{BOUNDARY}--\r\n".encode()

    async def transcribe(session: aiohttp.ClientSession, size: int) -> None:
        headers = {**auth(key), "Content-Type": FORM_TYPE}
        async with session.post(url + "/v1/audio/transcriptions", data=upload(size), headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()

    async def speak(session: aiohttp.ClientSession, size: int) -> str:
        mock.control.audio_bytes = size
        received = hashlib.sha256()
        request = {"model": "tts-1", "voice": "alloy", "input": "a long read"}
        async with session.post(url + "/v1/audio/speech", json=request, headers=auth(key)) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(64 * 1024):
                received.update(chunk)
        return received.hexdigest()

    samples: list[int] = []

    async def watch() -> None:
        while True:
            samples.append(rss_bytes(proc.pid))
            await asyncio.sleep(0.02)  # sampling, not synchronisation

    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
            for _ in range(3):  # warm up: pools, buffers and code paths at their working size
                await transcribe(session, 8 * 1024 * 1024)
                await speak(session, 8 * 1024 * 1024)
            baseline = rss_bytes(proc.pid)
            growth: dict[str, float] = {}
            watcher = asyncio.ensure_future(watch())
            try:
                sent = hashlib.sha256()
                await transcribe(session, BIG)
                growth["upload"], uploaded = max(samples) - baseline, len(samples)
                samples.clear()
                assert await speak(session, BIG) == audio_sha256(BIG)
                growth["download"], downloaded = max(samples) - baseline, len(samples)
            finally:
                watcher.cancel()
        form = mock.control.forms[-1]
        assert (form.field("file").size, form.field("file").sha256) == (BIG, sent.hexdigest())
        assert min(uploaded, downloaded) >= 10, "too few RSS samples to measure anything"
        print(
            f"\ngateway RSS {baseline / 2**20:.1f} MiB at rest; peak growth: upload {growth['upload'] / 2**20:.2f} MiB"
            f" ({uploaded} samples), download {growth['download'] / 2**20:.2f} MiB ({downloaded} samples)"
        )
        assert max(growth.values()) < RSS_GROWTH_LIMIT, growth
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


# ---------------------------------------------------------------------------------------------------------
# proxy.translators.media: usage read from answers (pure)


@pytest.mark.parametrize(
    ("reader", "body", "usage"),
    [
        ("images", b'{"created": 1, "data": [{"url": "u"}, {"url": "v"}]}', Usage(images=2)),
        (
            "images",
            b'{"data": [{"b64_json": "x"}], "usage": {"input_tokens": 9, "output_tokens": 272, "total_tokens": 281,'
            b' "input_tokens_details": {"text_tokens": 9, "image_tokens": 0}}}',
            Usage(images=1, input_tokens=9, output_tokens=272, total_tokens=281),
        ),
        ("transcript", b'{"text": "hi"}', None),
        ("transcript", b'{"text": "hi", "usage": {"type": "duration", "seconds": 3.5}}', Usage(audio_seconds=3.5)),
        ("transcript", b'{"task": "transcribe", "duration": 8.47, "text": "hi"}', Usage(audio_seconds=8.47)),
        (
            "transcript",
            b'{"text": "hi", "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 2, "total_tokens": 16}}',
            Usage(input_tokens=14, output_tokens=2, total_tokens=16),
        ),
        ("rerank", b'{"id": "r", "results": []}', Usage(searches=1)),
        ("rerank", b'{"id": "r", "meta": {"billed_units": {"search_units": 2}}}', Usage(searches=2)),
        ("rerank", b'{"usage": {"total_tokens": 12}}', Usage(searches=1, input_tokens=12, total_tokens=12)),
        ("rerank", b'{"usage": {"search_units": 3}}', Usage(searches=3)),
        ("ocr", b'{"pages": [{}, {}], "usage_info": {"pages_processed": 5}}', Usage(pages=5)),
        ("ocr", b'{"pages": [{}, {}]}', Usage(pages=2)),
    ],
)
def test_usage_of_media_answers(reader, body, usage):
    read = {"images": media.images_usage, "transcript": media.transcript_usage, "rerank": media.rerank_usage}
    got, _ = read.get(reader, media.ocr_usage)(body)
    assert got == usage


def test_an_answer_that_is_not_json_is_a_bad_response():
    with pytest.raises(GatewayError) as info:
        media.ocr_usage(b"<html>")
    assert info.value.code is Code.upstream_bad_response


def test_event_relay_forwards_chunks_as_they_come_and_reads_usage_from_final_events():
    relay = media.EventRelay(wants_meta=False)
    usage = b'{"type":"tokens","input_tokens":4,"output_tokens":1}'
    done = b'data: {"type":"transcript.text.done","text":"hi","usage":' + usage + b"}\n\n"
    stream = b'data: {"type":"transcript.text.delta","delta":"hi"}\n\n' + done
    out = b"".join(relay.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))  # split mid-event
    assert out == stream and relay.first_token and relay.events == 2
    assert relay.usage == Usage(input_tokens=4, output_tokens=1, total_tokens=5) and not relay.truncated
    assert relay.finish(None) == b""  # nothing added unless meta was asked for
    cut = media.EventRelay(wants_meta=True)
    cut.feed(b'data: {"type":"image_generation.partial_image","b64_json":"x"}\n\n')
    assert cut.truncated and cut.usage is None
    assert cut.finish(b"{}", b'"cost_nanos":0').startswith(b'data: {"type":"gateway.meta","cost_nanos":0,"meta":{}}')
    failing = media.EventRelay(wants_meta=False)
    failing.feed(b'data: {"type":"error","message":"no"}\n\n')
    assert failing.failure is not None and failing.failure.message == "no"


async def test_a_quoted_boundary_stays_quoted(gw, key, mock):
    boundary = "odd boundary:1"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\n'
        ).encode()
        + AUDIO
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {**auth(key), "Content-Type": f'multipart/form-data; boundary="{boundary}"'}
    r = await gw.post("/v1/audio/transcriptions", data=body, headers=headers)
    assert r.status == 200, await r.text()
    (sent,) = mock.control.forms
    assert sent.headers["Content-Type"] == f'multipart/form-data; boundary="{boundary}"'
    assert sent.field("file").sha256 == sha(AUDIO)
