"""proxy.config: `${VAR}` substitution, conversion, cross checks, and errors located by file, YAML path and line."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.config import ConfigError, GatewayConfig, format_path, load_config, substitute
from proxy.routing import SURFACES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "gateway.yaml"

# A small valid config; explicit routes keep it independent of the default routes.
BASE = """\
providers:
  openai:
    kind: openai
    base_url: https://api.openai.com/v1
models:
  openai/gpt-4o-mini:
    targets:
      - provider: openai
        model: gpt-4o-mini
routes:
  - {method: POST, path: /v1/chat/completions, surface: openai.chat}
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the only line of `text` containing `needle`."""
    lines = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"{needle!r} is on lines {lines}"
    return lines[0]


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    return load_config(write(tmp_path, text), env={} if env is None else env)


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[Path, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return path, info.value


def assert_located(err: ConfigError, file: Path, path: str, line: int | None, *fragments: str) -> None:
    assert err.file == str(file)
    assert err.path == path
    assert err.line == line
    where = f"{file}:{line}" if line else str(file)
    prefix = f"{where}: {path}: " if path else f"{where}: "
    assert str(err).startswith(prefix), str(err)
    assert str(err) == prefix + err.message
    for fragment in fragments:
        assert fragment in err.message, err.message


# ---------------------------------------------------------------------------------------------------------
# substitute


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A}", {"A": ""}, ""),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),  # `:-` also covers empty
        ("${A:-d}", {"A": "v"}, "v"),
        ("${A-d}", {}, "d"),
        ("${A-d}", {"A": ""}, ""),  # `-` covers unset only
        ("${A-d}", {"A": "v"}, "v"),
        ("${A:-}", {}, ""),
        ("${A-}", {}, ""),
        ("${A:-http://127.0.0.1:11434/v1}", {}, "http://127.0.0.1:11434/v1"),
        ("${A:-a b-c}", {}, "a b-c"),
        ("$$", {}, "$"),
        ("pa$$word", {}, "pa$word"),
        ("$$$$", {}, "$$"),
        ("$${A}", {"A": "x"}, "${A}"),  # an escaped dollar does not start a variable
        ("$$${A}", {"A": "x"}, "$x"),
        ("$A and $", {"A": "x"}, "$A and $"),  # only the braced form is a variable
        ("pre-${A}-${B:-b}-post", {"A": "1"}, "pre-1-b-post"),
        ("${A}", {"A": "${B}"}, "${B}"),  # a value is not substituted again
        ("${A_1}", {"A_1": "ok"}, "ok"),
        ("no variables", {}, "no variables"),
    ],
)
def test_substitute(value: str, env: dict[str, str], expected: str) -> None:
    assert substitute(value, env) == expected


@pytest.mark.parametrize("value", ["${A}", "x-${A}-y", "${B:-b}${A}"])
def test_substitute_missing_required_variable_raises_keyerror_naming_it(value: str) -> None:
    with pytest.raises(KeyError) as info:
        substitute(value, {})
    assert info.value.args == ("A",)


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        ([], "$"),
        (["server", "port"], "$.server.port"),
        (
            ["models", "openai/gpt-4o-mini", "targets", 0, "provider"],
            "$.models['openai/gpt-4o-mini'].targets[0].provider",
        ),
        (["routes", 3], "$.routes[3]"),
        (["providers", "my-provider"], "$.providers['my-provider']"),
        (["providers", "_p1"], "$.providers._p1"),
    ],
)
def test_format_path(segments: list[str | int], expected: str) -> None:
    assert format_path(segments) == expected


# ---------------------------------------------------------------------------------------------------------
# substitution while loading


@pytest.mark.parametrize(
    ("env", "port"),
    [({}, 9000), ({"PORT": ""}, 9000), ({"PORT": "7000"}, 7000), ({"PORT": "0"}, 0)],
)
def test_string_numbers_from_substitution_convert(tmp_path: Path, env: dict[str, str], port: int) -> None:
    config = load(tmp_path, BASE + "server:\n  port: ${PORT:-9000}\n", env)
    assert config.server.port == port
    assert type(config.server.port) is int


def test_substituted_scalars_convert_to_their_field_types(tmp_path: Path) -> None:
    text = (
        BASE
        + """\
server:
  workers: ${W:-3}
  access_log: ${LOG:-true}
  drain_timeout_s: ${DRAIN:-2.5}
auth:
  min_balance_usd: ${MIN:-2.50}
"""
    )
    config = load(tmp_path, text, {"W": "4"})
    assert config.server.workers == 4
    assert config.server.access_log is True
    assert config.server.drain_timeout_s == 2.5
    assert config.auth.min_balance_usd == Decimal("2.50")
    assert config.auth.min_balance_nanos == 2_500_000_000


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${KEY-fallback}", {}, "fallback"),
        ("${KEY-fallback}", {"KEY": ""}, ""),
        ("${KEY-fallback}", {"KEY": "sk-1"}, "sk-1"),
        ("${KEY:-fallback}", {}, "fallback"),
        ("${KEY:-fallback}", {"KEY": ""}, "fallback"),
        ("${KEY:-fallback}", {"KEY": "sk-1"}, "sk-1"),
        ("${KEY}", {"KEY": ""}, ""),
    ],
)
def test_defaults_while_loading(tmp_path: Path, template: str, env: dict[str, str], expected: str) -> None:
    config = load(tmp_path, BASE.replace("kind: openai\n", f"kind: openai\n    api_key: {template}\n"), env)
    assert config.providers["openai"].api_key == expected


def test_dash_default_with_empty_value_for_a_number_is_a_type_error(tmp_path: Path) -> None:
    text = BASE + "server:\n  port: ${PORT-9000}\n"
    file, err = load_error(tmp_path, text, {"PORT": ""})
    assert_located(err, file, "$.server.port", line_of(text, "port:"), "Expected `int`, got `str`")


def test_double_dollar_is_a_literal_dollar(tmp_path: Path) -> None:
    text = BASE.replace("kind: openai\n", "kind: openai\n    api_key: pa$$w${X}rd$${Y}\n")
    config = load(tmp_path, text, {"X": "0"})
    assert config.providers["openai"].api_key == "pa$w0rd${Y}"


def test_substitution_reaches_nested_maps_and_lists(tmp_path: Path) -> None:
    text = """\
        providers:
          openai:
            kind: openai
            base_url: ${OPENAI_BASE_URL:-https://api.openai.com/v1}
            api_key: ${OPENAI_API_KEY}
            headers:
              X-Team: ${TEAM:-core}
        models:
          openai/gpt-4o-mini:
            aliases: ["${ALIAS:-mini}", fixed]
            targets: [{provider: openai, model: "${UPSTREAM_MODEL:-gpt-4o-mini}"}]
        routes:
          - {method: POST, path: "${CHAT_PATH:-/v1/chat/completions}", surface: openai.chat}
        """
    config = load(tmp_path, text, {"OPENAI_API_KEY": "sk-1", "OPENAI_BASE_URL": "", "UPSTREAM_MODEL": "gpt-x"})
    provider = config.providers["openai"]
    assert provider.base_url == "https://api.openai.com/v1"
    assert provider.api_key == "sk-1"
    assert provider.headers == {"X-Team": "core"}
    model = config.models["openai/gpt-4o-mini"]
    assert model.aliases == ["mini", "fixed"]
    assert model.targets[0].model == "gpt-x"
    assert config.routes[0].path == "/v1/chat/completions"


def test_env_is_the_only_source_of_variables(tmp_path: Path) -> None:
    # HOME (or PATH) is set in os.environ; with an explicit env the loader must not look there.
    text = BASE.replace("kind: openai\n", "kind: openai\n    api_key: ${PATH}\n")
    file, err = load_error(tmp_path, text, {})
    assert_located(err, file, "$.providers.openai.api_key", line_of(text, "api_key"), "PATH")


@pytest.mark.parametrize(
    ("text", "needle", "path", "variable"),
    [
        (
            BASE.replace("base_url: https://api.openai.com/v1", "base_url: ${OPENAI_BASE_URL}"),
            "base_url",
            "$.providers.openai.base_url",
            "OPENAI_BASE_URL",
        ),
        (
            BASE.replace("model: gpt-4o-mini", "model: gpt-${SIZE}"),
            "model: gpt-",
            "$.models['openai/gpt-4o-mini'].targets[0].model",
            "SIZE",
        ),
        (
            BASE + "  - {method: POST, path: '${EMB_PATH}', surface: openai.embeddings}\n",
            "EMB_PATH",
            "$.routes[1].path",
            "EMB_PATH",
        ),
        (BASE + "server:\n  host: ${HOST:-}\n  port: ${PORT}\n", "port:", "$.server.port", "PORT"),
    ],
    ids=["provider", "nested-list", "route", "after-an-allowed-empty"],
)
def test_missing_required_variable_names_it_and_its_path(
    tmp_path: Path, text: str, needle: str, path: str, variable: str
) -> None:
    file, err = load_error(tmp_path, text, {})
    assert_located(err, file, path, line_of(text, needle), f"environment variable {variable} is not set")
    assert f"${{{variable}:-}}" in err.message  # says how to allow it empty


# ---------------------------------------------------------------------------------------------------------
# located errors


MODELS_TWO_TARGETS = """\
providers:
  openai:
    kind: openai
    base_url: https://api.openai.com/v1
  groq:
    kind: openai-compatible
    base_url: https://api.groq.com/openai/v1
models:
  openai/gpt-4o-mini:
    endpoints: [chat.completions]
    targets:
      - provider: openai
        model: gpt-4o-mini
      - provider: groq
        model: llama
routes:
  - {method: POST, path: /v1/chat/completions, surface: openai.chat}
"""

ERROR_CASES = [
    # (id, yaml, needle (the line the error must point at), yaml path, message fragments)
    (
        "dangling-provider",
        BASE.replace("- provider: openai", "- provider: nowhere"),
        "provider: nowhere",
        "$.models['openai/gpt-4o-mini'].targets[0].provider",
        ("unknown provider 'nowhere'", "(expected one of: openai)"),
    ),
    (
        "header-timeout",
        BASE + "server:\n  header_timeout_s: 0\n",
        "header_timeout_s:",
        "$.server.header_timeout_s",
        ("expected a duration > 0 seconds",),
    ),
    (
        "max-connections",
        BASE + "server:\n  max_connections: -1\n",
        "max_connections:",
        "$.server.max_connections",
        ("expected 0 (no limit) or more",),
    ),
    (
        "dangling-provider-second-target",
        MODELS_TWO_TARGETS.replace("- provider: groq", "- provider: grok"),
        "provider: grok",
        "$.models['openai/gpt-4o-mini'].targets[1].provider",
        ("unknown provider 'grok'", "(expected one of: groq, openai)"),
    ),
    (
        "dangling-provider-flow-style",
        "providers: {}\nmodels:\n  a/b:\n    targets: [{provider: nowhere, model: b}]\nroutes: []\n",
        "targets:",
        "$.models['a/b'].targets[0].provider",
        ("unknown provider 'nowhere'", "none defined"),
    ),
    (
        "unknown-endpoint",
        MODELS_TWO_TARGETS.replace("[chat.completions]", "\n      - chat.completions\n      - chat  # typo"),
        "# typo",
        "$.models['openai/gpt-4o-mini'].endpoints[1]",
        ("unknown endpoint 'chat'", "chat.completions", "embeddings"),
    ),
    (
        "empty-targets",
        BASE.replace("targets:\n      - provider: openai\n        model: gpt-4o-mini", "targets: []"),
        "targets: []",
        "$.models['openai/gpt-4o-mini'].targets",
        ("expected at least one target",),
    ),
    (
        "unknown-field-in-target",
        BASE.replace("model: gpt-4o-mini", "model: gpt-4o-mini\n        priority: 2"),
        "priority",  # the unknown key's own line
        "$.models['openai/gpt-4o-mini'].targets[0]",
        ("unknown field `priority`",),
    ),
    (
        "unknown-field-in-model",
        BASE.replace("  openai/gpt-4o-mini:\n", "  openai/gpt-4o-mini:\n    timeouts_s: 3\n"),
        "timeouts_s",
        "$.models['openai/gpt-4o-mini']",
        ("unknown field `timeouts_s`",),
    ),
    (
        "missing-target-model",
        BASE.replace("\n        model: gpt-4o-mini", ""),
        "- provider: openai",
        "$.models['openai/gpt-4o-mini'].targets[0]",
        ("missing required field `model`",),
    ),
    (
        "port-not-a-number",
        BASE + 'server:\n  host: 0.0.0.0\n  port: "abc"\n',
        'port: "abc"',
        "$.server.port",
        ("Expected `int`, got `str`",),
    ),
    (
        "port-out-of-range",
        BASE + "server:\n  port: 70000\n",
        "port: 70000",
        "$.server.port",
        ("expected a port number 0-65535, got 70000",),
    ),
    (
        "workers-zero",
        BASE + "server:\n  workers: 0\n",
        "workers: 0",
        "$.server.workers",
        ("expected at least 1 worker",),
    ),
    (
        "max-body-too-small",
        BASE + "server:\n  max_body_bytes: 10\n",
        "max_body_bytes",
        "$.server.max_body_bytes",
        ("expected at least 1024 bytes",),
    ),
    (
        "negative-cache-ttl",
        BASE + "auth:\n  cache_ttl_s: -1\n",
        "cache_ttl_s",
        "$.auth.cache_ttl_s",
        ("expected a duration >= 0 seconds",),
    ),
    (
        "store-unsupported",
        BASE + "store:\n  url: mysql://db/gw\n",
        "url: mysql",
        "$.store.url",
        ("expected a sqlite:///path or postgresql://", "'mysql://db/gw'"),
    ),
    (
        "connect-timeout-not-a-number",
        BASE.replace("kind: openai\n", "kind: openai\n    timeouts:\n      idle_s: 60\n      connect_s: soon\n"),
        "connect_s",
        "$.providers.openai.timeouts.connect_s",
        ("Expected `float`, got `str`",),
    ),
    (
        "connect-timeout-zero",
        BASE.replace("kind: openai\n", "kind: openai\n    timeouts:\n      idle_s: 60\n      connect_s: 0\n"),
        "connect_s",
        "$.providers.openai.timeouts.connect_s",
        ("expected a duration > 0 seconds",),
    ),
    (
        "bad-base-url",
        BASE.replace("https://api.openai.com/v1", "api.openai.com/v1"),
        "base_url",
        "$.providers.openai.base_url",
        ("expected an http(s) URL", "'api.openai.com/v1'"),
    ),
    (
        "base-url-no-host",
        BASE.replace("https://api.openai.com/v1", "https:///v1"),
        "base_url",
        "$.providers.openai.base_url",
        ("expected an http(s) URL",),
    ),
    (
        "unknown-provider-kind",
        BASE.replace("kind: openai\n", "kind: azure\n"),
        "kind: azure",
        "$.providers.openai.kind",
        ("'azure'",),
    ),
    (
        "missing-base-url",
        BASE.replace("    base_url: https://api.openai.com/v1\n", ""),
        "openai:",  # a mapping entry is located at its key
        "$.providers.openai",
        ("missing required field `base_url`",),
    ),
    (
        "max-connections-zero",
        BASE.replace("kind: openai\n", "kind: openai\n    max_connections: 0\n"),
        "max_connections",
        "$.providers.openai.max_connections",
        ("expected at least 1",),
    ),
    (
        "duplicate-route",
        BASE
        + "  - {method: GET, path: /v1/models, surface: openai.models}\n"
        + "  - {method: post, path: /v1/chat/completions, surface: openai.chat}\n",
        "method: post",
        "$.routes[2]",
        ("duplicate route POST /v1/chat/completions (also routes[0])",),
    ),
    (
        "route-path-without-slash",
        BASE.replace("path: /v1/chat/completions", "path: v1/chat"),
        "path: v1/chat",
        "$.routes[0].path",
        ("expected a path starting with '/'", "'v1/chat'"),
    ),
    (
        "route-unknown-default-model",
        BASE + "  - {method: POST, path: /v1/embeddings, surface: openai.embeddings, default_model: nope/none}\n",
        "nope/none",
        "$.routes[1].default_model",
        ("unknown model 'nope/none'",),
    ),
    (
        "route-unknown-field",
        BASE + "  - {method: POST, path: /v1/embeddings, surface: openai.embeddings, extra: 1}\n",
        "extra: 1",
        "$.routes[1]",
        ("unknown field `extra`",),
    ),
    (
        "models-not-a-map",
        "server:\n  port: 1\nmodels:\n  - openai/gpt-4o-mini\nroutes: []\n",
        "models:",
        "$.models",
        ("Expected `object`, got `array`",),
    ),
    (
        "source-is-not-a-key",
        BASE + "source: elsewhere.yaml\n",
        "source:",
        "$.source",
        ("unknown field `source`",),
    ),
]


@pytest.mark.parametrize(
    ("text", "needle", "path", "fragments"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_errors_name_file_path_and_line(
    tmp_path: Path, text: str, needle: str, path: str, fragments: tuple[str, ...]
) -> None:
    file, err = load_error(tmp_path, text)
    assert_located(err, file, path, line_of(text, needle), *fragments)


def test_error_from_a_substituted_value_points_at_its_line(tmp_path: Path) -> None:
    text = BASE.replace("https://api.openai.com/v1", "${OPENAI_BASE_URL:-https://api.openai.com/v1}")
    file, err = load_error(tmp_path, text, {"OPENAI_BASE_URL": "localhost:8000"})
    assert_located(err, file, "$.providers.openai.base_url", line_of(text, "base_url"), "'localhost:8000'")


@pytest.mark.parametrize(
    ("text", "path", "field"),
    [
        (BASE + "server:\n  host: 0.0.0.0\n  port: 1\n  bogus: 3\n", "$.server", "bogus"),
        (BASE + "bogus: 3\n", "$", "bogus"),
        (
            BASE.replace("base_url: https://api.openai.com/v1\n", "base_url: https://x.test/v1\n    colour: b\n"),
            "$.providers.openai",
            "colour",
        ),
        (BASE.replace("routes:\n  - {", "routes:\n  - {extra: 1, "), "$.routes[0]", "extra"),
    ],
    ids=["server", "top-level", "provider", "route"],
)
def test_unknown_key_is_rejected_at_its_line(tmp_path: Path, text: str, path: str, field: str) -> None:
    file, err = load_error(tmp_path, text)
    # msgspec names the object holding the unknown key; naming the key itself would be fine too.
    assert err.path in (path, format_path([*_segments(path), field]))
    assert_located(err, file, err.path, line_of(text, field), f"unknown field `{field}`")


def _segments(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")[1:] if p]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("server:\n  port: 1\n  host: [a\nfoo: 1\n", 4, "not valid YAML: expected ',' or ']'"),
        ("server:\n\tport: 1\n", 2, "not valid YAML: found character '\\t'"),
        ("a: 1\n---\nb: 2\n", 2, "not valid YAML"),
        ("server: {port: 1\n", 2, "not valid YAML"),
    ],
    ids=["unclosed-flow-list", "tab", "two-documents", "unclosed-flow-map"],
)
def test_invalid_yaml(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    file, err = load_error(tmp_path, text)
    assert_located(err, file, "", line, fragment)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "list"), ("hello\n", "str"), ("42\n", "int"), ("\n\n- a\n", "list")],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    file, err = load_error(tmp_path, text)
    first = line_of(text, text.strip().splitlines()[0])
    assert_located(err, file, "$", first, f"expected a mapping at the top level, got {kind}")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    err = info.value
    assert (err.file, err.path, err.line) == (str(missing), "", None)
    assert str(err).startswith(f"{missing}: cannot read the config file")


def test_config_error_formatting() -> None:
    err = ConfigError(Path("a/b.yaml"), "$.server.port", "bad", 7)
    assert (err.file, err.path, err.message, err.line) == ("a/b.yaml", "$.server.port", "bad", 7)
    assert str(err) == "a/b.yaml:7: $.server.port: bad"
    assert str(ConfigError("f.yaml", "", "bad")) == "f.yaml: bad"
    assert str(ConfigError("f.yaml", "$.x", "bad")) == "f.yaml: $.x: bad"


# ---------------------------------------------------------------------------------------------------------
# values and defaults


def test_small_config_loads_with_defaults(tmp_path: Path) -> None:
    file = write(tmp_path, BASE)
    config = load_config(file, env={})
    assert config.source == str(file)
    assert (config.server.host, config.server.port, config.server.workers) == ("127.0.0.1", 8080, 1)
    assert config.store.url == "sqlite:///./data/gateway.db"
    provider = config.providers["openai"]
    assert (provider.kind, provider.base_url, provider.api_key, provider.headers) == (
        "openai",
        "https://api.openai.com/v1",
        "",
        {},
    )
    assert (provider.timeouts.connect_s, provider.timeouts.idle_s, provider.timeouts.total_s) == (10.0, 300.0, 900.0)
    model = config.models["openai/gpt-4o-mini"]
    assert model.endpoints == ["chat.completions", "responses", "messages"]
    assert [(t.provider, t.model) for t in model.targets] == [("openai", "gpt-4o-mini")]
    assert [(r.method, r.path, r.surface) for r in config.routes] == [("POST", "/v1/chat/completions", "openai.chat")]


def test_route_methods_are_upper_cased(tmp_path: Path) -> None:
    config = load(tmp_path, BASE.replace("method: POST", "method: post"))
    assert config.routes[0].method == "POST"


def test_omitted_routes_do_not_share_state_between_loads(tmp_path: Path) -> None:
    text = BASE.split("routes:")[0] + (
        "  openai/omni-moderation-latest:\n"
        "    endpoints: [moderations]\n"
        "    targets: [{provider: openai, model: omni-moderation-latest}]\n"
    )
    first = load(tmp_path, text)
    first.routes[0].method = "PATCH"
    second = load(tmp_path, text)
    assert second.routes[0].method == "POST" and second.routes[0].path == "/v1/chat/completions"
    moderation = [r.default_model for r in second.routes if r.surface == "openai.moderations"]
    assert moderation == ["openai/omni-moderation-latest"]


@pytest.mark.parametrize(
    "text", [BASE.split("routes:")[0], "", "# only a comment\n"], ids=["no-routes", "empty", "comment"]
)
def test_config_without_routes_loads_with_the_default_routes(tmp_path: Path, text: str) -> None:
    """The same routes as the shipped config, so every surface answers (images, audio, videos, music, files,
    batches, OCR and rerank included), and each surface once."""
    # (A regression: the default moderations route once named a default model the config need not define.)
    config = load(tmp_path, text)
    shipped = load_config(DEFAULT_CONFIG, env={})
    assert [(r.method, r.path, r.surface) for r in config.routes] == [
        (r.method, r.path, r.surface) for r in shipped.routes
    ]
    assert sorted(r.surface for r in config.routes) == sorted(SURFACES)
    assert [r.default_model for r in config.routes if r.surface == "openai.moderations"] == [""]


def test_empty_file_gets_every_default(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert (config.server.host, config.server.port, config.server.max_body_bytes) == ("127.0.0.1", 8080, 16777216)
    assert (config.providers, config.models) == ({}, {})
    assert config.meta.always is False
    assert config.metrics.enabled is True


# ---------------------------------------------------------------------------------------------------------
# the shipped config


def test_shipped_config_loads_on_defaults_and_every_target_resolves() -> None:
    config = load_config(DEFAULT_CONFIG, env={})
    assert config.source == str(DEFAULT_CONFIG)
    assert (config.server.host, config.server.port, config.server.workers) == ("127.0.0.1", 8080, 1)
    assert config.store.url == "sqlite:///./data/gateway.db"
    assert config.auth.min_balance_usd == Decimal("1.00")
    assert config.providers["openai"].base_url == "https://api.openai.com/v1"
    assert config.providers["ollama"].base_url == "http://127.0.0.1:11434/v1"
    assert config.providers["anthropic"].base_url == "https://api.anthropic.com"
    assert config.providers["google"].base_url == "https://generativelanguage.googleapis.com"
    assert (config.providers["anthropic"].kind, config.providers["google"].kind) == ("anthropic", "gemini")
    assert all(p.api_key == "" for p in config.providers.values())
    assert config.models
    for model_id, model in config.models.items():
        assert model.targets, model_id
        for target in model.targets:
            assert target.provider in config.providers, (model_id, target.provider)
            assert target.model, model_id
    assert [(r.method, r.path) for r in config.routes] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/moderations"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/edits"),
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/v1/audio/translations"),
        ("POST", "/v1/rerank"),
        ("POST", "/v1/ocr"),
        ("POST", "/v1/music/generate"),
        ("GET", "/v1/music/generate/{id}"),
        ("POST", "/v1/videos"),
        ("GET", "/v1/videos"),
        ("GET", "/v1/videos/models"),
        ("GET", "/v1/videos/{id}"),
        ("DELETE", "/v1/videos/{id}"),
        ("GET", "/v1/videos/{id}/content"),
        ("POST", "/v1/videos/{id}/download_url"),
        ("POST", "/v1/videos/{id}/cancel"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("GET", "/v1/files/{id}"),
        ("DELETE", "/v1/files/{id}"),
        ("GET", "/v1/files/{id}/content"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/batches/{id}"),
        ("POST", "/v1/batches/{id}/cancel"),
        ("GET", "/v1/models"),
        ("GET", "/v1/generations"),
        ("GET", "/v1/key"),
        ("GET", "/v1/credits"),
        ("GET", "/v1/pricing/models"),
        ("POST", "/v1/pricing/calculate"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("PATCH", "/v1/keys/{id}"),
        ("DELETE", "/v1/keys/{id}"),
        ("GET", "/v1/activity"),
        ("GET", "/v1/gateway/models"),
        ("GET", "/v1/gateway/models/me"),
        ("GET", "/v1/data/models"),
        ("GET", "/v1/providers"),
        ("GET", "/v1/endpoints"),
        ("GET", "/v1/organisations"),
        ("GET", "/v1/workspaces"),
    ]


def test_shipped_config_takes_its_environment() -> None:
    env = {
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_PORT": "9001",
        "GATEWAY_WORKERS": "2",
        "GATEWAY_STORE": "sqlite:////var/lib/gw.db",
        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
        "OPENAI_API_KEY": "sk-test",
        "GROQ_BASE_URL": "",  # empty: `:-` takes the default
    }
    config = load_config(DEFAULT_CONFIG, env=env)
    assert (config.server.host, config.server.port, config.server.workers) == ("0.0.0.0", 9001, 2)
    assert config.store.url == "sqlite:////var/lib/gw.db"
    assert config.providers["openai"].base_url == "http://127.0.0.1:1/v1"
    assert config.providers["openai"].api_key == "sk-test"
    assert config.providers["groq"].base_url == "https://api.groq.com/openai/v1"


def test_default_routes_give_moderations_a_model_when_it_is_configured(tmp_path: Path) -> None:
    text = (
        BASE.split("routes:")[0]
        + "  openai/omni-moderation-latest:\n"
        + "    endpoints: [moderations]\n"
        + "    targets: [{provider: openai, model: m}]\n"
    )
    config = load_config(write(tmp_path, text), env={})
    moderation = [r.default_model for r in config.routes if r.surface == "openai.moderations"]
    assert moderation == ["openai/omni-moderation-latest"]


def test_embeddings_on_a_claude_provider_fail_at_start_up(tmp_path: Path) -> None:
    text = """\
providers:
  claude:
    kind: anthropic
    base_url: https://api.anthropic.com
models:
  anthropic/embedder:
    endpoints: [embeddings]
    targets: [{provider: claude, model: x}]
"""
    _, err = load_error(tmp_path, text)
    assert err.path == "$.models['anthropic/embedder'].endpoints[0]"
    assert "OpenAI-kind providers only" in err.message and "'claude' is anthropic" in err.message


def test_anthropic_and_gemini_providers_and_drop_params_load(tmp_path: Path) -> None:
    text = """\
providers:
  claude: {kind: anthropic, base_url: "https://api.anthropic.com", drop_params: true}
  google: {kind: gemini, base_url: "https://generativelanguage.googleapis.com"}
models:
  a/claude: {targets: [{provider: claude, model: c}]}
  g/gemini: {targets: [{provider: google, model: g}]}
"""
    config = load(tmp_path, text)
    assert config.providers["claude"].drop_params is True and config.providers["google"].drop_params is False
    assert config.models["g/gemini"].endpoints == ["chat.completions", "responses", "messages"]


def test_url_signing_key_is_random_per_process_unless_set(tmp_path: Path) -> None:
    file = tmp_path / "gateway.yaml"
    file.write_text("server:\n  url_signing_key: ${GATEWAY_URL_SIGNING_KEY:-}\n")
    first, again = load_config(file, env={}), load_config(file, env={})
    assert len(first.server.url_signing_key) >= 32  # made up, the same for every load (workers, reloads)
    assert first.server.url_signing_key == again.server.url_signing_key
    chosen = load_config(file, env={"GATEWAY_URL_SIGNING_KEY": "shared-by-every-instance"})
    assert chosen.server.url_signing_key == "shared-by-every-instance"


def test_the_readme_names_every_surface_and_only_those() -> None:
    """The README's `routes` row lists the surfaces a route may name: the same set as the code."""
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `routes` |"))
    listed = row.partition("`surface` is one of ")[2].partition(";")[0]
    assert [name.strip(" `") for name in listed.split(",")] == list(SURFACES)
