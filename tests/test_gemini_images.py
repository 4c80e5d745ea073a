"""Image generations from Google (Gemini image models and Imagen) through the OpenAI Images surface: the pure
translator (proxy.translators.gemini_images), table-driven, then end to end with the openai SDK against a mock
Gemini API on 127.0.0.1 that checks the key and records what it receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import ConfigError, load_config
from proxy.errors import Code, GatewayError
from proxy.translators import gemini_images
from proxy.translators.exchange import plan
from proxy.translators.openai import decode_request
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for

FLASH = "google/gemini-2.5-flash-image"
IMAGEN = "google/imagen-4.0-generate-001"
KEY = "gem-secret"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
IMAGE_TOKENS = 1290  # an image of up to 1024x1024 from gemini-2.5-flash-image
PROMPT_TOKENS = 9


def _image_part(mime: str = "image/png") -> dict[str, Any]:
    return {"inlineData": {"mimeType": mime, "data": PNG}}


def _generated(count: int) -> dict[str, Any]:
    """A generateContent answer with `count` candidates of one image each."""
    return {
        "candidates": [
            {"content": {"parts": [_image_part()], "role": "model"}, "finishReason": "STOP", "index": i}
            for i in range(count)
        ],
        "usageMetadata": {
            "promptTokenCount": PROMPT_TOKENS,
            "candidatesTokenCount": IMAGE_TOKENS * count,
            "totalTokenCount": PROMPT_TOKENS + IMAGE_TOKENS * count,
        },
        "modelVersion": "gemini-2.5-flash-image",
        "responseId": "gem-response-1",
    }


def _predicted(count: int) -> dict[str, Any]:
    return {"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": PNG} for _ in range(count)]}


BLOCKED_PROMPT = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 8}}
IMAGE_SAFETY = {
    "candidates": [{"finishReason": "IMAGE_SAFETY", "finishMessage": "Unable to show the generated image."}]
}
TEXT_ONLY = {"candidates": [{"content": {"parts": [{"text": "I can't draw that."}]}, "finishReason": "STOP"}]}
EMPTY = {"candidates": [{"content": {"parts": []}, "finishReason": "STOP"}]}
FILTERED = {"predictions": [{"raiFilteredReason": "Your current safety filter threshold filtered out the image."}]}


# ---------------------------------------------------------------------------------------------------------
# the translator: requests


def _translate(request: dict[str, Any], model: str = "gemini-2.5-flash-image", drop: bool = False):
    upstream, answer = gemini_images.translate(orjson.dumps(request), model, False, drop)
    return upstream.path, orjson.loads(upstream.body), answer


def test_a_gemini_model_is_asked_through_generate_content() -> None:
    path, body, answer = _translate({"model": FLASH, "prompt": "a red fox", "n": 2, "size": "1536x1024", "user": "u"})
    assert path == "/v1beta/models/gemini-2.5-flash-image:generateContent" and not answer.imagen
    assert body == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "candidateCount": 2,
            "imageConfig": {"aspectRatio": "3:2"},
        },
    }
    _, body, _ = _translate({"prompt": "a red fox", "n": 1, "response_format": "b64_json", "quality": "auto"})
    assert body["generationConfig"] == {"responseModalities": ["IMAGE"]}  # one image, the default size


def test_an_imagen_model_is_asked_through_predict() -> None:
    path, body, answer = _translate({"prompt": "a red fox", "size": "1024x1792"}, "imagen-4.0-generate-001")
    assert path == "/v1beta/models/imagen-4.0-generate-001:predict" and answer.imagen
    # sampleCount always: Imagen makes 4 unless told
    assert body == {
        "instances": [{"prompt": "a red fox"}],
        "parameters": {"sampleCount": 1, "includeRaiReason": True, "aspectRatio": "9:16"},
    }


@pytest.mark.parametrize(
    ("size", "flash", "imagen"),
    [
        ("1024x1024", "1:1", "1:1"),
        ("1536x1024", "3:2", None),  # Imagen has no 3:2 …
        ("1024x1536", "2:3", None),  # … nor 2:3
        ("1792x1024", "16:9", "16:9"),
        ("1024x1792", "9:16", "9:16"),
        ("auto", "", ""),
        ("512x512", None, None),
    ],
)
def test_sizes_map_to_aspect_ratios(size: str, flash: str | None, imagen: str | None) -> None:
    for model, expected in (("gemini-2.5-flash-image", flash), ("imagen-4.0-fast-generate-001", imagen)):
        request = {"prompt": "fox", "size": size}
        if expected is None:
            with pytest.raises(GatewayError) as e:
                _translate(request, model)
            assert e.value.status == 400 and e.value.param == "size" and repr(size) in e.value.message
            _, body, _ = _translate(request, model, drop=True)  # drop_params: the model's default
        else:
            _, body, _ = _translate(request, model)
        ratio = body.get("parameters", {}).get("aspectRatio") or body.get("generationConfig", {}).get("imageConfig")
        if expected:
            assert ratio in (expected, {"aspectRatio": expected}), (model, size)
        else:
            assert ratio is None, (model, size)


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"prompt": "fox", "response_format": "url"}, "response_format"),
        ({"prompt": "fox", "quality": "hd"}, "quality"),
        ({"prompt": "fox", "style": "vivid"}, "style"),
        ({"prompt": "fox", "background": "transparent"}, "background"),
        ({"prompt": "fox", "output_format": "webp"}, "output_format"),
    ],
)
def test_what_google_cannot_do_is_refused_unless_dropped(request_: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as e:
        _translate(request_)
    assert e.value.status == 400 and e.value.param == param and f"`{param}`" in e.value.message
    assert "drop_params" in e.value.message
    _, body, _ = _translate(request_, drop=True)
    assert body["generationConfig"] == {"responseModalities": ["IMAGE"]}


@pytest.mark.parametrize(
    ("request_", "param"),
    [({"n": 1}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "fox", "n": 0}, "n"), ({"prompt": 3}, "prompt")],
)
def test_a_request_without_a_prompt_or_images_is_a_400(request_: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as e:
        _translate(request_)
    assert e.value.status == 400 and e.value.param == param


def test_streaming_is_refused_when_planned() -> None:
    body = b'{"model": "google/gemini-2.5-flash-image", "prompt": "fox", "stream": true}'
    with pytest.raises(GatewayError) as e:
        plan("openai.images.generations", "gemini", body, decode_request(body), "m", FLASH, True, False, {})
    assert e.value.status == 400 and e.value.param == "stream" and "not available from this provider" in e.value.message


# ---------------------------------------------------------------------------------------------------------
# the translator: answers


def test_a_gemini_answer_becomes_openais_with_its_tokens() -> None:
    _, _, answer = _translate({"prompt": "fox", "n": 2})
    usage, native_id = answer.read(orjson.dumps(_generated(2)))
    assert native_id == "gem-response-1"
    assert (usage.images, usage.input_tokens, usage.output_tokens) == (2, PROMPT_TOKENS, 2 * IMAGE_TOKENS)
    out = orjson.loads(answer.render(b'"cost_nanos":1'))
    assert out["data"] == [{"b64_json": PNG}, {"b64_json": PNG}] and out["output_format"] == "png"
    assert out["usage"] == {
        "input_tokens": PROMPT_TOKENS,
        "input_tokens_details": {"text_tokens": PROMPT_TOKENS, "image_tokens": 0},
        "output_tokens": 2 * IMAGE_TOKENS,
        "total_tokens": PROMPT_TOKENS + 2 * IMAGE_TOKENS,
    }
    assert isinstance(out["created"], int) and out["cost_nanos"] == 1


def test_thought_images_and_text_beside_the_image_are_left_out() -> None:
    _, _, answer = _translate({"prompt": "fox"})
    parts = [{"text": "Here it is"}, {**_image_part(), "thought": True}, _image_part("image/jpeg")]
    usage, _ = answer.read(orjson.dumps({"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}))
    out = orjson.loads(answer.render(b""))
    assert usage.images == 1 and len(out["data"]) == 1 and out["output_format"] == "jpeg" and "usage" not in out


def test_an_imagen_answer_is_billed_per_image() -> None:
    _, _, answer = _translate({"prompt": "fox", "n": 2}, "imagen-4.0-generate-001")
    usage, _ = answer.read(orjson.dumps(_predicted(2)))
    assert usage.images == 2 and usage.input_tokens == 0
    out = orjson.loads(answer.render(b""))
    assert out["data"] == [{"b64_json": PNG}] * 2 and "usage" not in out


@pytest.mark.parametrize(
    ("model", "body", "code", "words"),
    [
        ("gemini-2.5-flash-image", BLOCKED_PROMPT, Code.content_policy_violation, "prompt was blocked (SAFETY)"),
        ("gemini-2.5-flash-image", IMAGE_SAFETY, Code.content_policy_violation, "IMAGE_SAFETY: Unable to show"),
        ("gemini-2.5-flash-image", TEXT_ONLY, Code.content_policy_violation, "text instead of an image"),
        ("gemini-2.5-flash-image", EMPTY, Code.upstream_bad_response, "without an image"),
        ("gemini-2.5-flash-image", {}, Code.upstream_bad_response, "without an image"),
        ("gemini-2.5-flash-image", [1], Code.upstream_bad_response, "not a GenerateContentResponse"),
        ("imagen-4.0-generate-001", FILTERED, Code.content_policy_violation, "safety filter threshold"),
        ("imagen-4.0-generate-001", {}, Code.upstream_bad_response, "without an image"),
        ("imagen-4.0-generate-001", {"predictions": 3}, Code.upstream_bad_response, "not a prediction"),
    ],
)
def test_an_answer_without_an_image_is_a_refusal_or_a_502(model: str, body: Any, code: Code, words: str) -> None:
    _, _, answer = _translate({"prompt": "fox"}, model)
    with pytest.raises(GatewayError) as e:
        answer.read(orjson.dumps(body))
    assert e.value.code is code and words in e.value.message
    assert e.value.status == (400 if code is Code.content_policy_violation else 502)
    assert e.value.type == ("invalid_request_error" if e.value.status == 400 else "upstream_error")


# ---------------------------------------------------------------------------------------------------------
# end to end: a mock Gemini API


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class GoogleControl:
    answer: Any = None  # the JSON answered (bytes: as they are); None: the images asked for
    status: int = 200
    received: list[Received] = field(default_factory=list)


def build_google_mock(control: GoogleControl) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        payload = await request.json()
        control.received.append(Received(request.path, dict(request.headers), payload))
        if request.headers.get("x-goog-api-key") != KEY:
            error = {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}
            error["details"] = [{"reason": "API_KEY_INVALID"}]
            return web.json_response({"error": error}, status=400)
        method = request.match_info["name"].partition(":")[2]
        if isinstance(control.answer, bytes):
            return web.Response(body=control.answer, status=control.status, content_type="application/json")
        if control.answer is not None:
            return web.json_response(control.answer, status=control.status)
        if method == "predict":
            return web.json_response(_predicted(payload["parameters"]["sampleCount"]))
        return web.json_response(_generated(payload["generationConfig"].get("candidateCount", 1)))

    app = web.Application()
    app.router.add_post("/v1beta/models/{name}", handle)
    return app


@pytest.fixture
async def google(aiohttp_server) -> tuple[str, GoogleControl]:
    control = GoogleControl()
    server = await aiohttp_server(build_google_mock(control), host="127.0.0.1")
    return str(server.make_url("")).rstrip("/"), control


@pytest.fixture
def control(google: tuple[str, GoogleControl]) -> GoogleControl:
    return google[1]


@pytest.fixture
async def gw(aiohttp_client, mock: Mock, google: tuple[str, GoogleControl], store_url: str) -> TestClient:
    env = env_for(mock, store_url, GEMINI_BASE_URL=google[0], GEMINI_API_KEY=KEY)
    return await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))


@pytest.fixture
async def sdk(gw: TestClient, key: str):
    client = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=key, max_retries=0, timeout=10)
    yield client
    await client.close()


async def _record(gw: TestClient, key: str, request_id: str) -> dict:
    r = await gw.get("/v1/generations", params={"id": request_id}, headers=auth(key))
    assert r.status == 200, await r.text()
    return (await r.json())["data"]


async def test_the_openai_sdk_gets_gemini_images_billed_by_their_tokens(sdk, gw, key, control) -> None:
    raw = await sdk.images.with_raw_response.generate(
        model=FLASH, prompt="a red fox", size="1792x1024", extra_body={"meta": True}
    )
    images = raw.parse()
    assert images.data[0].b64_json == PNG and images.output_format == "png"
    assert images.usage.input_tokens == PROMPT_TOKENS and images.usage.output_tokens == IMAGE_TOKENS
    cost = PROMPT_TOKENS * 300 + IMAGE_TOKENS * 30_000  # $0.30/M in, $30/M out
    extra = images.model_extra
    assert extra["cost_nanos"] == cost and extra["currency"] == "USD"
    lines = {line["meter"]: line["amount_nanos"] for line in extra["pricing_lines"]}
    assert lines == {"input_tokens": PROMPT_TOKENS * 300, "output_tokens": IMAGE_TOKENS * 30_000}
    meta = extra["meta"]
    assert (meta["provider"], meta["model"], meta["upstream_model"]) == ("google", FLASH, "gemini-2.5-flash-image")
    (sent,) = control.received
    assert sent.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY and "Authorization" not in sent.headers
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox"}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
    }
    rec = await _record(gw, key, raw.headers["x-request-id"])
    assert rec["endpoint"] == "openai.images.generations" and rec["provider"] == "google"
    assert rec["usage"]["images"] == 1 and rec["cost_nanos"] == cost


async def test_imagen_makes_two_images_billed_per_image(sdk, gw, key, control) -> None:
    raw = await sdk.images.with_raw_response.generate(model=IMAGEN, prompt="a red fox", n=2, size="1024x1024")
    images = raw.parse()
    assert [image.b64_json for image in images.data] == [PNG, PNG]
    assert images.model_extra["cost_nanos"] == 2 * 40_000_000  # 2 x $0.04
    assert images.model_extra["pricing_lines"][0]["meter"] == "images"
    (sent,) = control.received
    assert sent.path == "/v1beta/models/imagen-4.0-generate-001:predict" and sent.headers["x-goog-api-key"] == KEY
    assert sent.body == {
        "instances": [{"prompt": "a red fox"}],
        "parameters": {"sampleCount": 2, "includeRaiReason": True, "aspectRatio": "1:1"},
    }
    rec = await _record(gw, key, raw.headers["x-request-id"])
    assert rec["usage"]["images"] == 2 and rec["cost_nanos"] == 80_000_000


async def test_a_url_is_refused_before_google_is_asked(sdk, control) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.images.generate(model=FLASH, prompt="a red fox", response_format="url")
    error = e.value.body
    assert error["param"] == "response_format" and "`response_format`" in error["message"]
    assert control.received == []


async def test_an_imagen_size_it_cannot_make_is_refused(sdk, control) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.images.generate(model=IMAGEN, prompt="a red fox", size="1536x1024")
    assert e.value.body["param"] == "size" and "1792x1024" in e.value.body["message"]
    assert control.received == []


async def test_streaming_is_not_available_from_google(gw, key, control) -> None:
    r = await gw.post(
        "/v1/images/generations", json={"model": FLASH, "prompt": "fox", "stream": True}, headers=auth(key)
    )
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["param"] == "stream" and "not available from this provider" in error["message"]
    assert control.received == []


@pytest.mark.parametrize(
    ("model", "answer", "words"),
    [(FLASH, BLOCKED_PROMPT, "the prompt was blocked (SAFETY)"), (IMAGEN, FILTERED, "safety filter threshold")],
)
async def test_a_safety_block_is_the_providers_refusal(sdk, gw, key, control, model, answer, words) -> None:
    control.answer = answer
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.images.generate(model=model, prompt="something it will not draw")
    assert e.value.code == "content_policy_violation" and words in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    assert len(control.received) == 1  # a refusal is final: not tried again
    rec = await _record(gw, key, e.value.response.headers["x-request-id"])
    assert rec["error_code"] == "content_policy_violation" and rec["cost_nanos"] == 0


@pytest.mark.parametrize("answer", [EMPTY, b"<html>gateway timeout</html>"])
async def test_a_broken_answer_is_a_502(gw, key, control, answer) -> None:
    control.answer = answer
    r = await gw.post("/v1/images/generations", json={"model": FLASH, "prompt": "fox"}, headers=auth(key))
    assert r.status == 502
    error = (await r.json())["error"]
    assert error["code"] == "upstream_bad_response" and "Gemini answered" in error["message"]
    assert len(control.received) == 2  # another try might have got an answer (retries: 1)


async def test_googles_error_reaches_the_client_in_openais_shape(sdk, control) -> None:
    control.status = 400
    control.answer = {"error": {"code": 400, "message": "Multiple candidates is not enabled.", "status": "INVALID"}}
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.images.generate(model=FLASH, prompt="fox", n=3)
    assert e.value.body["message"] == "Gemini: Multiple candidates is not enabled."
    assert control.received[0].body["generationConfig"]["candidateCount"] == 3


# ---------------------------------------------------------------------------------------------------------
# configuration


def test_a_gemini_provider_may_serve_image_generations_only(tmp_path: Path) -> None:
    text = """\
providers:
  google: {kind: gemini, base_url: "https://generativelanguage.googleapis.com"}
models:
  g/imagen: {endpoints: [images.generations], targets: [{provider: google, model: imagen-4.0-generate-001}]}
"""
    file = tmp_path / "gateway.yaml"
    file.write_text(text)
    assert load_config(file, env={}).models["g/imagen"].endpoints == ["images.generations"]
    file.write_text(text.replace("[images.generations]", "[images.generations, images.edits]"))
    with pytest.raises(ConfigError) as e:
        load_config(file, env={})
    assert e.value.path == "$.models['g/imagen'].endpoints[1]" and "OpenAI-kind providers only" in e.value.message
