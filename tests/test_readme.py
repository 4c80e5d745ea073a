"""The README's reference tables against the code, so that neither drifts: config keys, environment variables
of the shipped config, error codes, metrics and route surfaces (tests/test_config.py checks the surfaces)."""

from __future__ import annotations

import re

import msgspec

from proxy.config import GatewayConfig, ModelConfig, ProviderConfig
from proxy.errors import Code
from proxy.metrics import Metrics
from tests.conftest import DEFAULT_CONFIG, ROOT

README = (ROOT / "README.md").read_text()


def _row_names() -> set[str]:
    """The names in the first cell of every table row; `a.b.c`, `.d` names `a.b.c` and `a.b.d`."""
    names = set()
    for cell in re.findall(r"^\| (`[^|]+)\|", README, flags=re.MULTILINE):
        tokens = re.findall(r"`([^`]+)`", cell)
        for token in tokens:
            names.add(tokens[0].rpartition(".")[0] + token if token.startswith(".") else token)
    return names


ROW_NAMES = _row_names()


def _keys(struct: type, prefix: str) -> list[str]:
    """Every settable key under `prefix`, nested sections spelled out (`providers.<name>.timeouts.idle_s`)."""
    keys = []
    for field in msgspec.structs.fields(struct):
        kind = field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            keys += _keys(kind, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


SECTIONS = (
    r"(server|store|auth|meta|metrics|accounting|rate_limits|guardrails|cache|telemetry|dashboard|pricing"
    r"|providers|models)\."
)


def test_every_config_key_has_a_row_and_every_row_is_a_key() -> None:
    documented = {name for name in ROW_NAMES if re.match(SECTIONS, name)}
    keys = set()
    for field in msgspec.structs.fields(GatewayConfig):
        if field.name in ("source", "prices", "routes"):
            continue  # not read from YAML (the file and the price sheet it names); `routes` has its own row
        if field.name == "providers":
            keys |= set(_keys(ProviderConfig, "providers.<name>."))
        elif field.name == "models":
            keys |= set(_keys(ModelConfig, "models.<id>."))
        else:
            keys |= set(_keys(field.type, f"{field.name}."))
    assert "routes" in ROW_NAMES
    assert keys - documented == set(), "config keys the README's table lacks"
    assert documented - keys == set(), "README rows naming no config key"


def test_every_variable_of_the_shipped_config_is_in_the_readme() -> None:
    variables = set(re.findall(r"\$\{([A-Z0-9_]+)", DEFAULT_CONFIG.read_text()))
    missing = set()
    for name in variables:
        family = name.split("_")[0] + "_*"  # `GROQ_*` covers GROQ_BASE_URL and GROQ_API_KEY
        if f"`{name}`" not in README and name not in README and f"`{family}`" not in README:
            missing.add(name)
    assert missing == set()


def test_every_error_code_is_in_the_errors_table() -> None:
    table = README.partition("## Errors")[2].partition("\n## ")[0]
    documented: dict[str, str] = {}
    for status, codes in re.findall(r"^\| (\d{3}|any) \| ([^|]+) \|", table, flags=re.MULTILINE):
        for code in re.findall(r"`([a-z_]+)`", codes):
            documented[code] = status
    if "(`upstream_error`)" in table:  # the provider's status, whatever it is
        documented["upstream_error"] = "any"
    expected = {code.name: "any" if code is Code.upstream_error else str(code.status) for code in Code}
    assert documented == expected


def test_every_metric_is_in_the_metrics_table() -> None:
    exposed = {name.decode() for name in re.findall(rb"^# TYPE (\S+) ", Metrics().render()[0], flags=re.MULTILINE)}
    table = README.partition("## Metrics")[2].partition("\n## ")[0]
    documented = set(re.findall(r"^\| `([a-z_]+)`", table, flags=re.MULTILINE))
    counters = {name + "_total" for name in exposed if name + "_total" in documented}  # sampled as `x_total`
    assert (exposed - {c.removesuffix("_total") for c in counters}) | counters == documented
