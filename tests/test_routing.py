"""proxy.routing: the route table and model resolution (id, bare name, upstream name, alias)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError, GatewayConfig, load_config
from proxy.errors import Code, GatewayError
from proxy.routing import SURFACES, RouteTable

ROOT = Path(__file__).resolve().parent.parent
CHAT, EMBEDDINGS, MODERATIONS = SURFACES["openai.chat"], SURFACES["openai.embeddings"], SURFACES["openai.moderations"]

CONFIG = """\
providers:
  openai: {kind: openai, base_url: "https://api.openai.com/v1"}
  azure: {kind: openai-compatible, base_url: "https://example.openai.azure.com/v1"}
models:
  openai/gpt-4o-mini:
    targets: [{provider: openai, model: gpt-4o-mini-2024-07-18}]
    aliases: [mini, fast]
  openai/gpt-4o:
    targets: [{provider: openai, model: gpt-4o}]
  azure/gpt-4o:
    targets: [{provider: azure, model: gpt4o-deployment}]
  openai/shared-a:
    targets: [{provider: openai, model: a}]
    aliases: [house]
  openai/shared-b:
    targets: [{provider: openai, model: b}]
    aliases: [house]
  openai/text-embedding-3-small:
    endpoints: [embeddings]
    targets: [{provider: openai, model: text-embedding-3-small}]
  openai/omni-moderation-latest:
    endpoints: [moderations]
    targets: [{provider: openai, model: omni-moderation-latest}]
  local/both:
    endpoints: [chat.completions, embeddings]
    targets: [{provider: openai, model: both-upstream}]
  local/self-alias:
    targets: [{provider: openai, model: openai/gpt-4o}]
    aliases: [openai/gpt-4o-mini]
routes:
  - {method: POST, path: /v1/chat/completions, surface: openai.chat}
  - {method: POST, path: /v1/embeddings, surface: openai.embeddings}
  - {method: post, path: /v1/moderations, surface: openai.moderations, default_model: openai/omni-moderation-latest}
  - {method: GET, path: /v1/models, surface: openai.models}
"""


def load(tmp_path: Path, text: str) -> GatewayConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path, env={})


@pytest.fixture
def table(tmp_path: Path) -> RouteTable:
    return RouteTable(load(tmp_path, CONFIG))


def line_of(text: str, needle: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("name", "surface", "model_id"),
    [
        ("openai/gpt-4o-mini", "openai.chat", "openai/gpt-4o-mini"),  # public id
        ("gpt-4o-mini", "openai.chat", "openai/gpt-4o-mini"),  # bare name after the prefix
        ("gpt-4o-mini-2024-07-18", "openai.chat", "openai/gpt-4o-mini"),  # the target's upstream name
        ("mini", "openai.chat", "openai/gpt-4o-mini"),  # configured aliases
        ("fast", "openai.chat", "openai/gpt-4o-mini"),
        ("openai/gpt-4o", "openai.chat", "openai/gpt-4o"),
        ("azure/gpt-4o", "openai.chat", "azure/gpt-4o"),
        ("gpt4o-deployment", "openai.chat", "azure/gpt-4o"),
        ("text-embedding-3-small", "openai.embeddings", "openai/text-embedding-3-small"),
        ("openai/omni-moderation-latest", "openai.moderations", "openai/omni-moderation-latest"),
        ("omni-moderation-latest", "openai.moderations", "openai/omni-moderation-latest"),
        ("both", "openai.chat", "local/both"),
        ("both", "openai.embeddings", "local/both"),
        ("both-upstream", "openai.embeddings", "local/both"),
        ("shared-a", "openai.chat", "openai/shared-a"),
        ("self-alias", "openai.chat", "local/self-alias"),
    ],
)
def test_resolve(table: RouteTable, name: str, surface: str, model_id: str) -> None:
    resolved_id, model = table.resolve(name, SURFACES[surface])
    assert resolved_id == model_id
    assert model is table.models[model_id]


@pytest.mark.parametrize("name", ["openai/gpt-4o", "openai/gpt-4o-mini"])
def test_a_model_id_wins_over_another_models_alias_or_target(table: RouteTable, name: str) -> None:
    # local/self-alias names openai/gpt-4o as its upstream model and openai/gpt-4o-mini as an alias.
    assert table.resolve(name, CHAT)[0] == name


@pytest.mark.parametrize(
    ("name", "ids"),
    [("gpt-4o", ["azure/gpt-4o", "openai/gpt-4o"]), ("house", ["openai/shared-a", "openai/shared-b"])],
    ids=["bare-name", "alias"],
)
def test_a_name_two_models_share_is_ambiguous(table: RouteTable, name: str, ids: list[str]) -> None:
    with pytest.raises(GatewayError) as info:
        table.resolve(name, CHAT)
    err = info.value
    assert err.code is Code.ambiguous_model
    assert (err.status, err.param) == (400, "model")
    assert f"{name!r} is ambiguous" in err.message
    assert f"{ids[0]}, {ids[1]}" in err.message  # both ids, sorted


@pytest.mark.parametrize(
    ("name", "suggestions"),
    [
        ("gpt-4o-mnii", ["'gpt-4o-mini'"]),
        ("openai/gpt-4o-mni", ["'openai/gpt-4o-mini'"]),
        ("text-embeding-3-small", ["'text-embedding-3-small'"]),
        ("mimi", ["'mini'"]),
    ],
)
def test_unknown_near_miss_gets_a_hint(table: RouteTable, name: str, suggestions: list[str]) -> None:
    with pytest.raises(GatewayError) as info:
        table.resolve(name, CHAT)
    err = info.value
    assert err.code is Code.model_not_found
    assert (err.status, err.param) == (404, "model")
    assert err.message.startswith(f"The model {name!r} is not configured on this gateway. Did you mean ")
    hint = err.message.split("Did you mean ", 1)[1].split("?", 1)[0]
    for suggestion in suggestions:
        assert suggestion in hint
    assert len(hint.split(", ")) <= 3
    assert "GET /v1/models" in err.message


@pytest.mark.parametrize("name", ["zzz", "", "claude-3-opus-20240229", "OPENAI/GPT-4O-MINI-XL-PRO-MAX"])
def test_unknown_far_name_has_no_hint(table: RouteTable, name: str) -> None:
    with pytest.raises(GatewayError) as info:
        table.resolve(name, CHAT)
    err = info.value
    assert err.code is Code.model_not_found
    assert "Did you mean" not in err.message
    assert err.message == (
        f"The model {name!r} is not configured on this gateway. GET /v1/models lists the models it serves."
    )


@pytest.mark.parametrize(
    ("name", "surface_name", "model_id", "serves"),
    [
        ("openai/text-embedding-3-small", "openai.chat", "openai/text-embedding-3-small", "embeddings"),
        ("text-embedding-3-small", "openai.chat", "openai/text-embedding-3-small", "embeddings"),
        ("gpt-4o-mini", "openai.embeddings", "openai/gpt-4o-mini", "chat.completions, responses, messages"),
        ("mini", "openai.moderations", "openai/gpt-4o-mini", "chat.completions, responses, messages"),
        ("local/both", "openai.moderations", "local/both", "chat.completions, embeddings"),
    ],
)
def test_model_not_serving_the_surface(
    table: RouteTable, name: str, surface_name: str, model_id: str, serves: str
) -> None:
    surface = SURFACES[surface_name]
    with pytest.raises(GatewayError) as info:
        table.resolve(name, surface)
    err = info.value
    assert err.code is Code.model_not_supported
    assert (err.status, err.param) == (400, "model")
    assert err.message == f"The model {model_id!r} does not serve {surface.endpoint} (it serves: {serves})."


def test_routes_are_paired_with_their_surfaces(table: RouteTable) -> None:
    assert [(r.method, r.path, s.name) for r, s in table.routes] == [
        ("POST", "/v1/chat/completions", "openai.chat"),
        ("POST", "/v1/embeddings", "openai.embeddings"),
        ("POST", "/v1/moderations", "openai.moderations"),
        ("GET", "/v1/models", "openai.models"),
    ]
    assert table.routes[2][0].default_model == "openai/omni-moderation-latest"


def test_surfaces() -> None:
    assert {name: (s.endpoint, s.upstream_path, s.streaming) for name, s in SURFACES.items()} == {
        "openai.chat": ("chat.completions", "/chat/completions", True),
        "openai.responses": ("responses", "/responses", True),
        "anthropic.messages": ("messages", "/v1/messages", True),
        "anthropic.count_tokens": ("messages", "/v1/messages/count_tokens", False),
        "openai.embeddings": ("embeddings", "/embeddings", False),
        "openai.moderations": ("moderations", "/moderations", False),
        "openai.images.generations": ("images.generations", "/images/generations", True),
        "openai.images.edits": ("images.edits", "/images/edits", True),
        "openai.audio.speech": ("audio.speech", "/audio/speech", False),
        "openai.audio.transcriptions": ("audio.transcriptions", "/audio/transcriptions", True),
        "openai.audio.translations": ("audio.translations", "/audio/translations", False),
        "rerank": ("rerank", "/rerank", False),
        "ocr": ("ocr", "/ocr", False),
        "music.generate": ("music.generate", "/api/v1/generate", False),
        "music.get": ("", "", False),
        "openai.videos": ("video.generation", "/videos", False),
        **{f"openai.videos_{n}": ("", "", False) for n in ("list", "models", "get", "content", "download_url")},
        "openai.videos_delete": ("", "", False),
        "openai.videos_cancel": ("", "", False),
        **{f"openai.files{s}": ("", "", False) for s in ("", "_list", "_get", "_content", "_delete")},
        **{f"openai.batches{s}": ("", "", False) for s in ("", "_list", "_get", "_cancel")},
        "openai.models": ("", "", False),
        "platform.generations": ("", "", False),
        "platform.key": ("", "", False),
        "platform.credits": ("", "", False),
        "platform.pricing_models": ("", "", False),
        "platform.pricing_calculate": ("", "", False),
        "platform.keys_list": ("", "", False),
        "platform.keys_create": ("", "", False),
        "platform.keys_update": ("", "", False),
        "platform.keys_revoke": ("", "", False),
        "platform.activity": ("", "", False),
        "catalogue.models": ("", "", False),
        "catalogue.models_me": ("", "", False),
        "catalogue.data_models": ("", "", False),
        "catalogue.providers": ("", "", False),
        "catalogue.endpoints": ("", "", False),
        "catalogue.organisations": ("", "", False),
        "catalogue.workspaces": ("", "", False),
    }
    assert CHAT.required == ("messages",)
    assert EMBEDDINGS.required == MODERATIONS.required == ("input",)


def test_unknown_surface_is_a_config_error(tmp_path: Path) -> None:
    text = CONFIG.replace("surface: openai.embeddings}", "surface: openai.embedding}")
    config = load(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        RouteTable(config)
    err = info.value
    assert err.file == config.source == str(tmp_path / "gateway.yaml")
    assert err.path == "$.routes[1].surface"
    assert err.line == line_of(text, "openai.embedding}")
    assert str(err).startswith(f"{err.file}:{err.line}: $.routes[1].surface: unknown surface 'openai.embedding'")
    for name in SURFACES:
        assert name in err.message


def test_default_model_must_serve_the_route_surface(tmp_path: Path) -> None:
    text = CONFIG.replace("default_model: openai/omni-moderation-latest", "default_model: openai/gpt-4o-mini")
    config = load(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        RouteTable(config)
    err = info.value
    assert err.path == "$.routes[2].default_model"
    assert err.line == line_of(text, "default_model")
    assert "'openai/gpt-4o-mini' does not serve moderations" in err.message


def test_shipped_config_resolves_every_model() -> None:
    config = load_config(ROOT / "config" / "gateway.yaml", env={})
    table = RouteTable(config)
    by_endpoint = {s.endpoint: s for s in SURFACES.values() if s.endpoint}
    for model_id, model in config.models.items():
        for endpoint in model.endpoints:
            surface = by_endpoint[endpoint]
            assert table.resolve(model_id, surface) == (model_id, model)
            assert table.resolve(model_id.partition("/")[2], surface)[0] == model_id
            for target in model.targets:
                assert target.provider in config.providers
                assert table.resolve(target.model, surface)[0] == model_id


def test_a_teams_own_provider_serves_only_that_team(tmp_path: Path) -> None:
    text = CONFIG.replace(
        '  azure: {kind: openai-compatible, base_url: "https://example.openai.azure.com/v1"}',
        '  azure: {kind: openai-compatible, base_url: "https://example.openai.azure.com/v1", team: acme}',
    ).replace(
        "  azure/gpt-4o:\n    targets: [{provider: azure, model: gpt4o-deployment}]",
        "  azure/gpt-4o:\n    targets: [{provider: azure, model: gpt4o-deployment}, {provider: openai, model: gpt-4o}]",
    )
    table = RouteTable(load(tmp_path, text))
    _, model = table.resolve("azure/gpt-4o", CHAT)
    assert [t.provider for t in table.usable("azure/gpt-4o", model.targets, "acme")] == ["azure", "openai"]
    assert [t.provider for t in table.usable("azure/gpt-4o", model.targets, "rival")] == ["openai"]
    only_own = model.targets[:1]
    with pytest.raises(GatewayError) as info:
        table.usable("azure/gpt-4o", only_own, "rival")
    assert info.value.code is Code.forbidden and "another team's own provider account" in info.value.message
    shared = RouteTable(load(tmp_path, CONFIG))
    assert shared.usable("azure/gpt-4o", only_own, "rival") is only_own  # no owned provider: untouched
