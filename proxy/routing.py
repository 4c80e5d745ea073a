"""The route table (method + path → surface) and model resolution (name → model and its targets)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import final

from proxy.config import GatewayConfig, ModelConfig, RouteConfig, Target, fail_at
from proxy.errors import ANTHROPIC, OPENAI, Code, GatewayError


@dataclass(frozen=True, slots=True)
class Surface:
    """A client-facing API: its name in the route table and the endpoint id models declare."""

    name: str
    endpoint: str
    upstream_path: str
    streaming: bool = False
    required: tuple[str, ...] = ()
    dialect: str = OPENAI  # how its errors are shaped
    multipart: bool = False  # the body is a multipart/form-data upload, streamed to one target (never read whole)


# The surfaces this gateway speaks. Routes name them; models declare the endpoint ids.
SURFACES: dict[str, Surface] = {
    s.name: s
    for s in (
        Surface("openai.chat", "chat.completions", "/chat/completions", streaming=True, required=("messages",)),
        Surface("openai.responses", "responses", "/responses", streaming=True, required=("input",)),
        Surface(
            "anthropic.messages", "messages", "/v1/messages", streaming=True, required=("messages",), dialect=ANTHROPIC
        ),
        # Token counting for any model that serves Messages (`proxy.surfaces.tokens`): not billed.
        Surface("anthropic.count_tokens", "messages", "/v1/messages/count_tokens", dialect=ANTHROPIC),
        Surface("openai.embeddings", "embeddings", "/embeddings", required=("input",)),
        Surface("openai.moderations", "moderations", "/moderations", required=("input",)),
        Surface("openai.images.generations", "images.generations", "/images/generations", streaming=True),
        Surface("openai.images.edits", "images.edits", "/images/edits", streaming=True, multipart=True),
        Surface("openai.audio.speech", "audio.speech", "/audio/speech", required=("input",)),
        Surface(
            "openai.audio.transcriptions",
            "audio.transcriptions",
            "/audio/transcriptions",
            streaming=True,
            multipart=True,
        ),
        Surface("openai.audio.translations", "audio.translations", "/audio/translations", multipart=True),
        Surface("rerank", "rerank", "/rerank"),
        Surface("ocr", "ocr", "/ocr"),
        Surface("music.generate", "music.generate", "/api/v1/generate"),
        Surface("music.get", "", ""),
        Surface("openai.videos", "video.generation", "/videos"),
        Surface("openai.videos_list", "", ""),
        Surface("openai.videos_models", "", ""),
        Surface("openai.videos_get", "", ""),
        Surface("openai.videos_content", "", ""),
        Surface("openai.videos_download_url", "", ""),
        Surface("openai.videos_delete", "", ""),
        Surface("openai.videos_cancel", "", ""),
        *(Surface(f"openai.files{s}", "", "") for s in ("", "_list", "_get", "_content", "_delete")),
        *(Surface(f"openai.batches{s}", "", "") for s in ("", "_list", "_get", "_cancel")),
        Surface("openai.models", "", ""),
        Surface("platform.generations", "", ""),
        Surface("platform.key", "", ""),
        Surface("platform.credits", "", ""),
        Surface("platform.pricing_models", "", ""),
        Surface("platform.pricing_calculate", "", ""),
        Surface("platform.keys_list", "", ""),
        Surface("platform.keys_create", "", ""),
        Surface("platform.keys_update", "", ""),
        Surface("platform.keys_revoke", "", ""),
        Surface("platform.activity", "", ""),
        Surface("catalogue.models", "", ""),
        Surface("catalogue.models_me", "", ""),
        Surface("catalogue.data_models", "", ""),
        Surface("catalogue.providers", "", ""),
        Surface("catalogue.endpoints", "", ""),
        Surface("catalogue.organisations", "", ""),
        Surface("catalogue.workspaces", "", ""),
    )
}


@final
class RouteTable:
    """Routes and models from the config, checked once at start-up."""

    __slots__ = ("_aliases", "_owned", "config", "models", "routes")

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.models: dict[str, ModelConfig] = config.models
        # Providers whose key is one team's own account (`providers.<name>.team`): only that team's requests use them.
        self._owned = {name: p.team for name, p in config.providers.items() if p.team}
        self.routes: list[tuple[RouteConfig, Surface]] = []
        for i, route in enumerate(config.routes):
            surface = SURFACES.get(route.surface)
            if surface is None:
                fail_at(
                    config,
                    ["routes", i, "surface"],
                    f"unknown surface {route.surface!r} (expected one of: {', '.join(SURFACES)})",
                )
                continue
            if route.default_model and surface.endpoint not in config.models[route.default_model].endpoints:
                fail_at(
                    config,
                    ["routes", i, "default_model"],
                    f"model {route.default_model!r} does not serve {surface.endpoint}",
                )
            self.routes.append((route, surface))
        # Other names a model answers to: its bare name after the provider prefix, its targets'
        # upstream names and its configured aliases. A name claimed by two models is ambiguous.
        aliases: dict[str, set[str]] = {}
        for model_id, model in config.models.items():
            names = {model_id.partition("/")[2], *(t.model for t in model.targets), *model.aliases}
            for name in names - {"", model_id}:
                aliases.setdefault(name, set()).add(model_id)
        self._aliases = {name: sorted(ids) for name, ids in aliases.items() if name not in config.models}

    def usable(self, model_id: str, targets: list[Target], team_name: str) -> list[Target]:
        """`targets` without those at another team's own provider account; 403 when none is left."""
        owned = self._owned
        if not owned:
            return targets
        left = [t for t in targets if owned.get(t.provider, team_name) == team_name]
        if not left:
            raise GatewayError(
                Code.forbidden, f"{model_id!r} is served only by another team's own provider account.", param="model"
            )
        return left

    def resolve(self, name: str, surface: Surface) -> tuple[str, ModelConfig]:
        """(public id, model) for a requested model name that serves `surface`."""
        model = self.models.get(name)
        model_id = name
        if model is None:
            ids = self._aliases.get(name)
            if ids is None:
                raise GatewayError(Code.model_not_found, self._unknown(name), param="model")
            if len(ids) > 1:
                raise GatewayError(
                    Code.ambiguous_model,
                    f"The model name {name!r} is ambiguous: it matches {', '.join(ids)}. Use one of those ids.",
                    param="model",
                )
            model_id = ids[0]
            model = self.models[model_id]
        if surface.endpoint not in model.endpoints:
            raise GatewayError(
                Code.model_not_supported,
                f"The model {model_id!r} does not serve {surface.endpoint} (it serves: {', '.join(model.endpoints)}).",
                param="model",
            )
        return model_id, model

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, [*self.models, *self._aliases], n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"The model {name!r} is not configured on this gateway.{hint} GET /v1/models lists the models it serves."
