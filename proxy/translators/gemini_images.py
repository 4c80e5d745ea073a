"""OpenAI Images generations → Google's image models on the Gemini provider kind, and back. Pure: no I/O.

Two wires, chosen by the upstream model's name:
- Gemini image models (`gemini-2.5-flash-image`, …): `POST /v1beta/models/{model}:generateContent` with
  `generationConfig.responseModalities: ["IMAGE"]`, `candidateCount` and `imageConfig.aspectRatio`; each image
  comes back as a `candidates[].content.parts[].inlineData {mimeType, data}` part (ai.google.dev "Image
  generation"; `ImageConfig.aspectRatio` takes 1:1, 2:3, 3:2, 3:4, 4:3, 9:16, 16:9, 21:9 — js-genai types).
  Tokens are billed: `usageMetadata` as for chat.
- Imagen (`imagen-…`): `POST /v1beta/models/{model}:predict` with `{"instances": [{"prompt"}], "parameters":
  {"sampleCount", "aspectRatio"}}` → `predictions[] {bytesBase64Encoded, mimeType}` (ai.google.dev "Imagen").
  Imagen takes only 1:1, 3:4, 4:3, 9:16 and 16:9, and makes 4 images unless `sampleCount` says otherwise.
  `includeRaiReason` makes a filtered image come back as `{"raiFilteredReason": …}` instead of nothing.
  Billed per image.

Both answer base64 bytes, never a URL. A request that asks for what they cannot do is refused (400) unless
the provider has `drop_params`; an answer without an image is the provider's refusal (400, its reason) or not
an answer at all (502).
"""

from __future__ import annotations

import time
from typing import Final, final

import msgspec
import orjson

from proxy.errors import Code, GatewayError
from proxy.meta import Usage
from proxy.translators import gemini
from proxy.translators.neutral import UpstreamRequest, unsupported
from proxy.translators.openai import decode_body, inject_members

KIND: Final = gemini.KIND

# OpenAI `size` → Gemini `aspectRatio` ("auto", or no size: the model's default, 1:1).
ASPECT_RATIOS: Final = {
    "1024x1024": "1:1",
    "1536x1024": "3:2",
    "1792x1024": "16:9",
    "1024x1536": "2:3",
    "1024x1792": "9:16",
}
IMAGEN_RATIOS: Final = frozenset({"1:1", "3:4", "4:3", "9:16", "16:9"})  # no 3:2 or 2:3 ("Imagen" guide)

# OpenAI parameters Google's image APIs have no counterpart for, with the values that change nothing (these
# are left out); any other value is refused unless the provider has `drop_params`. `user` changes nothing in
# the answer and is always left out.
HONOURED: Final[dict[str, tuple[object, ...]]] = {
    "response_format": (None, "b64_json"),
    "quality": (None, "auto", "standard"),
    "style": (None,),
    "background": (None, "auto", "opaque"),
    "moderation": (None, "auto"),
    "output_format": (None, "png"),
    "output_compression": (None,),
    "partial_images": (None, 0),
}
_WHY: Final = {"response_format": "it answers the image bytes (b64_json), never a URL"}

MAX_REASON = 300  # characters of a refusal's text quoted in the error


class ImagesRequest(msgspec.Struct):
    """The members of an OpenAI Images request that are read; others are ignored."""

    prompt: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None


_request_decoder = msgspec.json.Decoder(ImagesRequest)


def is_imagen(upstream_model: str) -> bool:
    return upstream_model.removeprefix("models/").startswith("imagen-")


def _aspect_ratio(size: str | None, upstream_model: str, imagen: bool, drop: bool) -> str | None:
    if size is None or size == "auto":
        return None
    ratio = ASPECT_RATIOS.get(size)
    if ratio is not None and (not imagen or ratio in IMAGEN_RATIOS):
        return ratio
    if drop:
        return None
    sizes = [s for s, r in ASPECT_RATIOS.items() if not imagen or r in IMAGEN_RATIOS]
    raise GatewayError(
        Code.invalid_request,
        f"`size` {size!r} has no aspect ratio {upstream_model} can make: use one of {', '.join(sizes)} or auto, "
        f"or set `drop_params: true` on the provider in the gateway config to get its default (1:1).",
        param="size",
    )


def translate(
    body: bytes, upstream_model: str, stream: bool, drop_params: bool
) -> tuple[UpstreamRequest, ImagesFromGemini]:
    """The upstream request for an OpenAI Images generation, and the translator of its answer; GatewayError(400)
    when it asks for what the model cannot do."""
    request: ImagesRequest = decode_body(_request_decoder.decode, body)
    if stream:
        raise GatewayError(
            Code.invalid_request,
            "Streamed image generation (`stream: true`) is not available from this provider: ask without `stream`.",
            param="stream",
        )
    if not request.prompt:
        raise GatewayError(Code.invalid_request, "Missing required field `prompt`.", param="prompt")
    n = 1 if request.n is None else request.n
    if n < 1:
        raise GatewayError(Code.invalid_request, f"`n` must be at least 1, got {n}.", param="n")
    for name, honoured in HONOURED.items():
        if getattr(request, name) not in honoured and not drop_params:
            raise unsupported(name, KIND, _WHY.get(name, ""))
    imagen = is_imagen(upstream_model)
    ratio = _aspect_ratio(request.size, upstream_model, imagen, drop_params)
    if imagen:
        parameters: dict[str, object] = {"sampleCount": n, "includeRaiReason": True}
        if ratio is not None:
            parameters["aspectRatio"] = ratio
        payload: dict[str, object] = {"instances": [{"prompt": request.prompt}], "parameters": parameters}
        path = gemini.model_path(upstream_model, False, "predict")
    else:
        config: dict[str, object] = {"responseModalities": ["IMAGE"]}
        if n > 1:
            config["candidateCount"] = n
        if ratio is not None:
            config["imageConfig"] = {"aspectRatio": ratio}
        payload = {"contents": [{"role": "user", "parts": [{"text": request.prompt}]}], "generationConfig": config}
        path = gemini.model_path(upstream_model, False)
    return UpstreamRequest(path=path, body=orjson.dumps(payload)), ImagesFromGemini(imagen)


# ---------------------------------------------------------------------------------------------------------
# answers


class _InlineData(msgspec.Struct, rename="camel"):
    mime_type: str = ""
    data: str = ""


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False  # Gemini 3 image models show draft images as thoughts: not the answer
    inline_data: _InlineData | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    finish_message: str | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None
    block_reason_message: str | None = None


class _Answer(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: gemini.GeminiUsage | None = None
    response_id: str = ""


class _Prediction(msgspec.Struct, rename="camel"):
    bytes_base64_encoded: str = ""
    mime_type: str = ""
    rai_filtered_reason: str = ""


class _Predictions(msgspec.Struct):
    predictions: list[_Prediction] = []


_answer_decoder = msgspec.json.Decoder(_Answer)
_predictions_decoder = msgspec.json.Decoder(_Predictions)


def _refused(who: str, reason: str) -> GatewayError:
    """The provider declined to make the image (a safety block, or words instead of a picture): final."""
    return GatewayError(Code.content_policy_violation, f"{who} refused to generate the image: {reason}")


def _bad(who: str, what: str) -> GatewayError:
    return GatewayError(Code.upstream_bad_response, f"{who} answered {what}.")


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= MAX_REASON else text[:MAX_REASON] + "…")


def _gemini_images(answer: _Answer) -> list[_InlineData]:
    """The images of a generateContent answer; the refusal or the 502 when there are none."""
    images = [
        part.inline_data
        for candidate in answer.candidates
        for part in (candidate.content.parts if candidate.content is not None else ())
        if part.inline_data is not None and part.inline_data.data and not part.thought
    ]
    if images:
        return images
    feedback = answer.prompt_feedback
    if feedback is not None and feedback.block_reason:
        detail = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
        raise _refused("Gemini", f"the prompt was blocked ({feedback.block_reason}){detail}.")
    for candidate in answer.candidates:
        reason = candidate.finish_reason or ""
        if gemini.FINISH_REASONS.get(reason) == "content_filter":
            detail = f": {candidate.finish_message}" if candidate.finish_message else ""
            raise _refused("Gemini", f"it stopped for {reason}{detail}.")
    text = "".join(
        part.text or ""
        for candidate in answer.candidates
        for part in (candidate.content.parts if candidate.content is not None else ())
        if not part.thought
    )
    if text.strip():
        raise _refused("Gemini", f"it answered with text instead of an image: {_quote(text)}.")
    reasons = ", ".join(c.finish_reason for c in answer.candidates if c.finish_reason) or "none"
    raise _bad("Gemini", f"without an image, a block reason or a text (finishReason: {reasons})")


def _imagen_images(body: bytes) -> list[_InlineData]:
    try:
        answer = _predictions_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _bad("Imagen", f"with a body that is not a prediction response ({e})") from None
    images = [_InlineData(p.mime_type, p.bytes_base64_encoded) for p in answer.predictions if p.bytes_base64_encoded]
    if images:
        return images
    reasons = [p.rai_filtered_reason for p in answer.predictions if p.rai_filtered_reason]
    if reasons:
        raise _refused("Imagen", " ".join(dict.fromkeys(reasons)))
    raise _bad("Imagen", "without an image or a reason for filtering it")


@final
class ImagesFromGemini:
    """One request's answer: Gemini's or Imagen's whole answer read (`read`), then rendered in OpenAI's Images
    shape (`render`). Implements `exchange.WholeAnswer`."""

    __slots__ = ("_images", "imagen", "usage")

    def __init__(self, imagen: bool):
        self.imagen = imagen
        self._images: list[_InlineData] = []
        self.usage: Usage | None = None  # the tokens shown to the client (Gemini models only)

    def read(self, body: bytes) -> tuple[Usage | None, str]:
        """(usage, the provider's id); GatewayError: the provider's refusal (400) or not an answer (502)."""
        if self.imagen:
            self._images = _imagen_images(body)
            return Usage(images=len(self._images)), ""
        try:
            answer = _answer_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as e:
            raise _bad("Gemini", f"with a body that is not a GenerateContentResponse JSON object ({e})") from None
        self._images = _gemini_images(answer)
        usage = answer.usage_metadata.neutral() if answer.usage_metadata is not None else Usage()
        self.usage = usage if answer.usage_metadata is not None else None
        usage.images = len(self._images)
        return usage, answer.response_id

    def render(self, extra: bytes) -> bytes:
        """The OpenAI Images answer (after `read`), with `extra` members added."""
        mime = self._images[0].mime_type if self._images else ""
        out: dict[str, object] = {
            "created": int(time.time()),
            "data": [{"b64_json": image.data} for image in self._images],
            "output_format": mime.removeprefix("image/") or "png",
        }
        if self.usage is not None:
            tokens = self.usage.input_tokens  # the prompt is text only
            out["usage"] = {
                "input_tokens": tokens,
                "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
                "output_tokens": self.usage.output_tokens,
                "total_tokens": self.usage.total_tokens,
            }
        return inject_members(orjson.dumps(out), extra)

    def error(self, status: int, body: bytes) -> GatewayError | None:
        """An error answer (`{"error": {…}}`, as for chat) as the client's error."""
        return gemini.parse_error(status, body)
