"""The Grafana dashboard (`systemd/grafana-stats-gateway.json`) against a live exposition: every query parses as
PromQL (promql-parser, the Rust crate's bindings) and selects only metrics and labels that a gateway on the
mocks exports after traffic that makes each of them appear; legends name only labels the query returns."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import build_app
from proxy.config import load_config
from tests.conftest import DEFAULT_CONFIG, ROOT, auth, env_for

DASHBOARD = ROOT / "systemd" / "grafana-stats-gateway.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables, as a dashboard at its defaults would fill them in.
BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "6h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# On top of the default config: each feature the dashboard graphs, on, so that its metrics have series.
FEATURES = """
rate_limits:
  models:
    openai/gpt-4o:
      key: {rpm: 1}
guardrails:
  policies:
    pii_log: {check: pii, action: log}
  default: [pii_log]
cache: {enabled: true}
"""

Labels = frozenset[str]


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but rows, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def substitute(text: str, values: dict[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"{text!r} uses ${name}, which is neither a dashboard variable nor Grafana's")
        return values[name]

    return _VARIABLE.sub(value, text)


def label_values_query(variable: dict[str, Any]) -> tuple[str, str]:
    """A query variable's `label_values(selector, label)`, as (selector, label)."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    m = _LABEL_VALUES.fullmatch(text.strip())
    assert m, f"variable {variable['name']}: expected label_values(selector, label), got {text!r}"
    return m.group(1), m.group(2)


# ---------------------------------------------------------------------------------------------------------
# what a query returns: the labels of its result, checked against the exposition on the way up


class Exposition:
    """The samples of `/metrics`: each sample name's label names and values, and those that only ever read 0
    (counters and histograms the traffic did not reach)."""

    def __init__(self, text: str):
        self.labels: dict[str, set[str]] = {}
        self.values: dict[tuple[str, str], set[str]] = {}
        counted: set[str] = set()  # counters' and histograms' samples (a gauge at 0 says something)
        nonzero: set[str] = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                for label, value in sample.labels.items():
                    self.values.setdefault((sample.name, label), set()).add(value)
                if family.type != "gauge":
                    counted.add(sample.name)
                if sample.value:
                    nonzero.add(sample.name)
        self.zero = counted - nonzero

    def selector(self, vs: pq.VectorSelector) -> Labels:
        name = vs.name
        assert name is not None, f"{vs}: select a metric by name"
        assert name in self.labels, f"{name} is not in the exposition (it has {sorted(self.labels)})"
        assert name not in self.zero, f"{name} is 0 in every series: the test's traffic does not exercise it"
        have = frozenset(self.labels[name])
        matchers = [*vs.matchers.matchers, *(m for group in vs.matchers.or_matchers for m in group)]
        for matcher in matchers:
            assert matcher.name in have, f"{vs}: {name} has no label {matcher.name!r} (it has {sorted(have)})"
        return have

    def result(self, expr: Any) -> Labels | None:
        """The label names of `expr`'s result (None: a scalar or a string), after checking that every label
        it matches, groups by, or joins on is one its operands have."""
        if isinstance(expr, pq.VectorSelector):
            return self.selector(expr)
        if isinstance(expr, pq.MatrixSelector):
            return self.selector(expr.vector_selector)
        if isinstance(expr, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
            return self.result(expr.expr)
        if isinstance(expr, (pq.NumberLiteral, pq.StringLiteral)):
            return None
        if isinstance(expr, pq.Call):
            return self._call(expr)
        if isinstance(expr, pq.AggregateExpr):
            return self._aggregate(expr)
        if isinstance(expr, pq.BinaryExpr):
            return self._binary(expr)
        raise AssertionError(f"no rule for {type(expr).__name__}: {expr}")

    def _call(self, call: pq.Call) -> Labels | None:
        args = [self.result(arg) for arg in call.args]
        vectors = [labels for labels in args if labels is not None]
        name = call.func.name
        if name == "histogram_quantile":
            assert "le" in vectors[0], f"{call}: histogram_quantile needs `le` kept (sum by (le, ...))"
            return vectors[0] - {"le"}
        if name == "label_replace":  # (v, dst, replacement, src, regex)
            dst, src = call.args[1].val, call.args[3].val
            assert src in vectors[0], f"{call}: the vector has no label {src!r} to replace from"
            return vectors[0] | {dst}
        if name in ("scalar", "time"):
            return None
        return vectors[0] if vectors else frozenset()

    def _aggregate(self, agg: pq.AggregateExpr) -> Labels:
        inner = self.result(agg.expr)
        assert inner is not None, f"{agg}: aggregates a scalar"
        modifier = agg.modifier
        grouping = frozenset(modifier.labels) if modifier is not None else frozenset()
        missing = grouping - inner
        assert not missing, f"{agg}: groups by {sorted(missing)}, which the vector does not have ({sorted(inner)})"
        if str(agg.op) in ("topk", "bottomk", "limitk", "limit_ratio"):
            return inner  # these keep their series whole
        if modifier is None:
            return frozenset()
        return grouping if modifier.type == pq.AggModifierType.By else inner - grouping

    def _binary(self, binary: pq.BinaryExpr) -> Labels | None:
        lhs, rhs = self.result(binary.lhs), self.result(binary.rhs)
        if lhs is None or rhs is None:
            return rhs if lhs is None else lhs
        modifier = binary.modifier
        matching = modifier.matching if modifier is not None else None
        if matching is None:  # one to one on every label: sides with different label names never match
            assert lhs == rhs, f"{binary}: the sides' labels differ ({sorted(lhs)} vs {sorted(rhs)}): no match"
        elif matching.type == pq.LabelModifierType.Include:  # on (...)
            on = frozenset(matching.labels)
            assert on <= lhs and on <= rhs, f"{binary}: on {sorted(on)}, not labels of both sides"
        else:  # ignoring (...)
            ignoring = frozenset(matching.labels)
            assert lhs - ignoring == rhs - ignoring, f"{binary}: the sides' other labels differ"
        group = frozenset(modifier.group_labels or ()) if modifier is not None else frozenset()
        return lhs | group


# ---------------------------------------------------------------------------------------------------------


def test_the_dashboard_is_grafana_shaped():
    dashboard = load()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"  # imports onto any Prometheus
    for name in ("surface", "model", "provider"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DS
        assert variables[name]["multi"] and variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) >= 5 and dashboard["panels"][0]["type"] == "row"  # every panel is in a row
    assert any(row["collapsed"] and row["panels"] for row in rows)  # so `panels()` has nested ones to find
    ids = [p["id"] for p in (*rows, *panels(dashboard))]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == DS, where
        assert panel["targets"], f"{where}: no query"
        assert panel["fieldConfig"]["defaults"]["unit"], f"{where}: no unit"
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: refIds repeat"
        for t in panel["targets"]:
            assert t["datasource"] == DS and t["expr"] and t["legendFormat"], where


def test_a_mistake_is_caught():
    """The checks below fail on what they are meant to catch (a check that cannot fail proves nothing)."""
    exposition = Exposition('# TYPE m counter\nm_total{surface="a",status="200"} 1\n# TYPE n counter\nn_total 0\n')
    assert exposition.result(pq.parse("sum by (surface) (rate(m_total[5m]))")) == {"surface"}
    for bad, why in (
        ("rate(o_total[5m])", "not in the exposition"),
        ("rate(n_total[5m])", "0 in every series"),
        ('m_total{model="x"}', "no label 'model'"),
        ("sum by (model) (m_total)", "groups by ['model']"),
        ("histogram_quantile(0.5, sum by (surface) (rate(m_total[5m])))", "needs `le`"),
        ("sum by (surface) (m_total) / sum by (status) (m_total)", "labels differ"),
    ):
        with pytest.raises(AssertionError, match=re.escape(why)):
            exposition.result(pq.parse(bad))
    with pytest.raises(ValueError):
        pq.parse("sum by (surface) (rate(m_total[5m])")
    with pytest.raises(AssertionError, match=r"\$nope"):
        substitute("m_total{surface=~'$nope'}", BUILTINS)


async def traffic(aiohttp_client, mock, store_url: str, make_key, tmp_path: Path) -> str:
    """`/metrics` of a gateway on the mock after a request of each kind the dashboard graphs."""
    file = tmp_path / "gateway.yaml"
    file.write_text(
        DEFAULT_CONFIG.read_text() + FEATURES + f"pricing: {{file: {DEFAULT_CONFIG.parent / 'pricing.yaml'}}}\n"
    )
    config = load_config(file, env=env_for(mock, store_url))
    config.providers["openai"].breaker.failures = 2  # a failing request's two attempts open its breaker
    client = await aiohttp_client(build_app(config))
    key = auth(await make_key())
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    stream = {**chat, "messages": [{"role": "user", "content": "hi, streamed"}], "stream": True}
    for body in (chat, chat, stream):  # a cache miss, its hit, a stream (not a hit: TTFT and TPOT are observed)
        assert (await client.post("/v1/chat/completions", json=body, headers=key)).status == 200
    pii = {**chat, "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]}
    assert (await client.post("/v1/chat/completions", json=pii, headers=key)).status == 200  # a guardrail match
    statuses = []
    for n in range(2):  # two different requests: a cache hit would not count against the limit
        limited = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": f"hi {n}"}]}
        statuses.append((await client.post("/v1/chat/completions", json=limited, headers=key)).status)
    assert statuses == [200, 429]  # a rate-limit refusal
    mock.control.script = ["status", "status"]  # the upstream fails both attempts: 5xx, and the breaker opens
    failed = await client.post("/v1/chat/completions", json={**chat, "max_tokens": 7}, headers=key)
    assert failed.status >= 500
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


async def test_every_query_selects_what_the_gateway_exports(aiohttp_client, mock, store_url, make_key, tmp_path):
    exposition = Exposition(await traffic(aiohttp_client, mock, store_url, make_key, tmp_path))
    dashboard = load()
    values = dict(BUILTINS)
    problems: list[str] = []
    for variable in dashboard["templating"]["list"]:
        name = variable["name"]
        if variable["type"] == "datasource":
            values[name] = "prometheus"
            continue
        # each query variable: a real selector and label, and an example value for the queries taken from
        # the exposition (the variables before it are already known)
        selector, label = label_values_query(variable)
        try:
            vs = pq.parse(substitute(selector, values))
            assert isinstance(vs, pq.VectorSelector) and vs.name is not None, f"{selector!r}: not a metric selector"
            assert label in exposition.selector(vs), f"{vs.name} has no label {label!r}"
            values[name] = min(v for v in exposition.values[(vs.name, label)] if v)
        except (AssertionError, ValueError) as e:
            problems.append(f"variable {name}: {e}")
    checked = 0
    for panel in panels(dashboard):
        for target in panel["targets"]:
            where = f"{panel['title']!r} {target['refId']}"
            try:
                result = exposition.result(pq.parse(substitute(target["expr"], values)))
                unknown = set(_LEGEND.findall(target["legendFormat"])) - (result or set())
                assert not unknown, (
                    f"the legend names {sorted(unknown)}, not labels of the result {sorted(result or ())}"
                )
                checked += 1
            except (AssertionError, ValueError) as e:
                problems.append(f"{where}: {e}\n    {target['expr']}")
    assert not problems, "\n".join(problems)
    assert checked >= 30
