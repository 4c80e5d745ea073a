"""Discovery APIs from the config and the price catalogue: models, providers, endpoints, organisations."""

from __future__ import annotations

from decimal import Decimal

from aiohttp import web

from proxy.config import ModelConfig
from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.pricing import PER_MILLION, Tariff
from proxy.store.base import KeyRecord
from proxy.surfaces.platform import page, platform_handler

# What each endpoint id takes and gives, for the catalogue's input_types / output_types.
_TYPES: dict[str, tuple[list[str], list[str]]] = {
    "chat.completions": (["text"], ["text"]),
    "responses": (["text"], ["text"]),
    "messages": (["text"], ["text"]),
    "embeddings": (["text"], ["embedding"]),
    "moderations": (["text"], ["moderation"]),
    "images.generations": (["text"], ["image"]),
    "images.edits": (["text", "image"], ["image"]),
    "audio.speech": (["text"], ["audio"]),
    "audio.transcriptions": (["audio"], ["text"]),
    "audio.translations": (["audio"], ["text"]),
    "rerank": (["text"], ["ranking"]),
    "ocr": (["document", "image"], ["text"]),
    "video.generation": (["text", "image"], ["video"]),
    "music.generate": (["text"], ["audio"]),
}
_CHAT_PARAMETERS = [
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "tools",
    "tool_choice",
    "response_format",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "n",
    "user",
]


def _per_token(nanos_per_million: int) -> str:
    """USD per token as a plain decimal string (the reference's pricing format)."""
    return format((Decimal(nanos_per_million) / Decimal(PER_MILLION * 10**9)).normalize(), "f")


def _pricing(tariff: Tariff | None) -> dict | None:
    if tariff is None:
        return None
    return {
        "prompt": _per_token(tariff.input),
        "completion": _per_token(tariff.output),
        "request": _per_token(tariff.per_request * PER_MILLION),
        "image": "0",
        "input_cache_read": _per_token(tariff.cached_input),
        "input_cache_write": _per_token(tariff.cache_write),
    }


def _types(model: ModelConfig) -> tuple[list[str], list[str]]:
    inputs: list[str] = []
    outputs: list[str] = []
    for endpoint in model.endpoints:
        given, taken = _TYPES.get(endpoint, (["text"], ["text"]))
        inputs += [t for t in given if t not in inputs]
        outputs += [t for t in taken if t not in outputs]
    return inputs, outputs


def _model(gw: Gateway, model_id: str, model: ModelConfig) -> dict:
    inputs, outputs = _types(model)
    organisation = model_id.partition("/")[0]
    return {
        "id": model_id,
        "model_id": model_id,
        "name": model_id.partition("/")[2] or model_id,
        "organisation_id": organisation,
        "status": "active",
        "endpoints": list(model.endpoints),
        "input_types": inputs,
        "output_types": outputs,
        "supported_parameters": _CHAT_PARAMETERS if "chat.completions" in model.endpoints else ["user"],
        "providers": [
            {
                "api_provider_id": t.provider,
                "provider_model_slug": t.model,
                "endpoints": list(model.endpoints),
                "status": "active",
                "pricing": _pricing(gw.pricing.tariff(model_id, t.provider)),
            }
            for t in model.targets
        ],
        "pricing": _pricing(gw.pricing.tariff(model_id, model.targets[0].provider)),
        "top_provider": {"context_length": None, "max_completion_tokens": None},
    }


def _matches(record: dict, request: web.Request) -> bool:
    """The reference's catalogue filters: comma lists of endpoints, providers, types, params."""
    q = request.query

    def wanted(name: str) -> set[str]:
        return {v.strip() for v in q.get(name, "").split(",") if v.strip()}

    checks = [
        (wanted("endpoints"), set(record["endpoints"])),
        (wanted("provider"), {p["api_provider_id"] for p in record["providers"]}),
        (wanted("organisation"), {record["organisation_id"]}),
        (wanted("input_types"), set(record["input_types"])),
        (wanted("output_types"), set(record["output_types"])),
        (wanted("status"), {record["status"]}),
    ]
    if not all(not want or want & have for want, have in checks):
        return False
    params = wanted("params")
    return params <= set(record["supported_parameters"])


async def _models(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/gateway/models`: the catalogue, filtered (`endpoints`, `provider`, `organisation`,
    `input_types`, `output_types`, `params`, `status`), paginated (`limit` ≤ 250, `offset`)."""
    limit, offset = page(request)
    if request.query.get("availability", "active") not in ("active", "all"):
        raise GatewayError(Code.invalid_request, "`availability` must be 'active' or 'all'.", param="availability")
    records = [_model(gw, mid, m) for mid, m in gw.config.models.items()]
    records = [r for r in records if _matches(r, request)]
    return {"limit": limit, "offset": offset, "total": len(records), "models": records[offset : offset + limit]}


async def _models_me(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/gateway/models/me`: the catalogue as this key may use it (its allowed models, if limited)."""
    answer = await _models(request, gw, key)
    if key.allowed_models:
        allowed = [
            r
            for r in (_model(gw, m, gw.config.models[m]) for m in key.allowed_models if m in gw.config.models)
            if _matches(r, request)
        ]
        answer.update(total=len(allowed), models=allowed[answer["offset"] : answer["offset"] + answer["limit"]])
    return answer


async def _data_models(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/data/models`: the source catalogue (models and their organisations)."""
    limit, offset = page(request)
    models = []
    for model_id, model in gw.config.models.items():
        inputs, outputs = _types(model)
        organisation = model_id.partition("/")[0]
        models.append(
            {
                "model_id": model_id,
                "name": model_id.partition("/")[2] or model_id,
                "release_date": None,
                "status": "active",
                "input_types": inputs,
                "output_types": outputs,
                "organisation": {"organisation_id": organisation, "name": organisation},
            }
        )
    return {"limit": limit, "offset": offset, "total": len(models), "models": models[offset : offset + limit]}


async def _providers(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/providers`: the configured providers (never their URLs or keys)."""
    served: dict[str, int] = {}
    for model in gw.config.models.values():
        for t in model.targets:
            served[t.provider] = served.get(t.provider, 0) + 1
    providers = [
        {
            "api_provider_id": name,
            "api_provider_name": name,
            "kind": p.kind,
            "link": None,
            "country_code": None,
            "models": served.get(name, 0),
        }
        for name, p in gw.config.providers.items()
    ]
    return {"total": len(providers), "providers": providers}


async def _endpoints(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/endpoints`: the inference endpoints with their paths and how many models serve them."""
    endpoints = []
    for route, surface in gw.routes.routes:
        if not surface.endpoint:
            continue
        count = sum(surface.endpoint in m.endpoints for m in gw.config.models.values())
        endpoints.append(
            {
                "endpoint_id": surface.endpoint,
                "method": route.method,
                "path": route.path,
                "surface": surface.name,
                "models": count,
            }
        )
    return {"total": len(endpoints), "endpoints": endpoints}


async def _organisations(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/organisations`: who makes the models, from the ids' prefixes."""
    counts: dict[str, int] = {}
    for model_id in gw.config.models:
        organisation = model_id.partition("/")[0]
        counts[organisation] = counts.get(organisation, 0) + 1
    organisations = [{"organisation_id": o, "name": o, "models": n} for o, n in counts.items()]
    return {"total": len(organisations), "organisations": organisations}


async def _workspaces(request: web.Request, gw: Gateway, key: KeyRecord) -> dict:
    """`GET /v1/workspaces` (management): the team's workspace (one per team in this gateway)."""
    return {"total": 1, "workspaces": [{"id": key.team_id, "name": key.team_name, "team_id": key.team_id}]}


HANDLERS = {
    "catalogue.models": platform_handler(_models),
    "catalogue.models_me": platform_handler(_models_me),
    "catalogue.data_models": platform_handler(_data_models),
    "catalogue.providers": platform_handler(_providers),
    "catalogue.endpoints": platform_handler(_endpoints),
    "catalogue.organisations": platform_handler(_organisations),
    "catalogue.workspaces": platform_handler(_workspaces, management=True),
}
