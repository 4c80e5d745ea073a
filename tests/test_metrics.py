"""Prometheus exposition: names, labels, and values that add up (checked with prometheus-client's parser)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.meta import RequestMeta, Usage
from proxy.metrics import Metrics
from tests.conftest import auth


class Samples(dict):
    """Exposition samples, looked up as `got["name", label pairs...]` in any order."""

    def __getitem__(self, key: tuple) -> float:
        name, *labels = key
        flat = [pair for item in labels for pair in (item if isinstance(item[0], tuple) else (item,))]
        return super().__getitem__((name, tuple(sorted(flat))))


def samples(text: str) -> Samples:
    out = Samples()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            dict.__setitem__(out, (s.name, tuple(sorted(s.labels.items()))), s.value)
    return out


def finished(latency: float, provider: float, first_token: float | None, output_tokens: int) -> RequestMeta:
    meta = RequestMeta("r", "openai.chat", 100.0)
    meta.model, meta.provider, meta.status = "m/x", "p", 200
    meta.t_upstream_start, meta.t_upstream_end = 100.0, 100.0 + provider
    meta.t_first_token = 100.0 + first_token if first_token is not None else 0.0
    meta.usage = Usage(input_tokens=10, output_tokens=output_tokens, total_tokens=10 + output_tokens)
    return meta


def test_histograms_counters_and_gauges_add_up():
    metrics = Metrics()
    metrics.record(finished(0.30, 0.29, 0.1, 21), now=100.30)  # 0.3 s end to end
    metrics.record(finished(0.004, 0.0035, None, 1), now=100.004)
    gauge = metrics.in_flight.labels("openai.chat")
    gauge.inc()
    gauge.inc()
    gauge.dec()
    got = samples(metrics.render()[0].decode())
    lab = (("model", "m/x"), ("provider", "p"), ("surface", "openai.chat"))
    assert got["gateway_requests_total", lab, ("status", "200")] == 2
    assert got["gen_ai_server_request_duration_seconds_count", lab] == 2
    assert got["gen_ai_server_request_duration_seconds_sum", lab] == pytest.approx(0.304)
    assert got["gen_ai_server_request_duration_seconds_bucket", lab, ("le", "0.005")] == 1
    assert got["gen_ai_server_request_duration_seconds_bucket", lab, ("le", "0.25")] == 1
    assert got["gen_ai_server_request_duration_seconds_bucket", lab, ("le", "0.5")] == 2
    assert got["gen_ai_server_request_duration_seconds_bucket", lab, ("le", "+Inf")] == 2
    assert got["gen_ai_server_time_to_first_token_seconds_count", lab] == 1  # streams only
    assert got["gen_ai_server_time_per_output_token_seconds_sum", lab] == pytest.approx((0.29 - 0.1) / 20)
    assert got["gateway_overhead_seconds_sum", (("surface", "openai.chat"),)] == pytest.approx(0.0105)
    assert got["gen_ai_client_token_usage_total", lab, ("gen_ai_token_type", "output")] == 22
    assert got["gen_ai_client_token_usage_total", lab, ("gen_ai_token_type", "input")] == 20
    assert got["gateway_in_flight_requests", (("surface", "openai.chat"),)] == 1
    assert got["gateway_spend_usd_total", lab] == 0  # these metas were never priced


def test_a_value_on_a_bucket_bound_counts_in_that_bucket():
    metrics = Metrics()
    meta = finished(0.01, 0.005, None, 0)
    meta.t_start, meta.t_upstream_start, meta.t_upstream_end = 0.0, 0.0, 0.005
    metrics.record(meta, now=0.01)  # exactly 0.01 s: `le` means less than or equal
    got = samples(metrics.render()[0].decode())
    lab = (("model", "m/x"), ("provider", "p"), ("surface", "openai.chat"))
    assert got["gen_ai_server_request_duration_seconds_bucket", lab, ("le", "0.005")] == 0
    assert got["gen_ai_server_request_duration_seconds_bucket", lab, ("le", "0.01")] == 1


async def test_metrics_endpoint_after_traffic(gateway, key):
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for request in (chat, {**chat, "stream": True}):
        assert (await gateway.post("/v1/chat/completions", json=request, headers=auth(key))).status == 200
    await gateway.post("/v1/chat/completions", json={**chat, "model": "nope"}, headers=auth(key))
    r = await gateway.get("/metrics")
    assert r.headers["Content-Type"].startswith("text/plain")
    got = samples(await r.text())
    lab = (("model", "openai/gpt-4o-mini"), ("provider", "openai"), ("surface", "openai.chat"))
    assert got["gateway_requests_total", lab, ("status", "200")] == 2
    assert got["gen_ai_server_time_to_first_token_seconds_count", lab] == 1
    assert got["gen_ai_client_token_usage_total", lab, ("gen_ai_token_type", "output")] == 10
    assert got["gateway_spend_usd_total", lab] == pytest.approx(2 * 4_650 / 1e9)  # two priced requests
    # an unknown model is counted without inventing a label value for it
    unknown = (("model", ""), ("provider", ""), ("status", "404"), ("surface", "openai.chat"))
    assert got["gateway_requests_total", unknown] == 1
    assert got["gateway_in_flight_requests", (("surface", "openai.chat"),)] == 0


async def test_metrics_can_be_switched_off(aiohttp_client, config):
    from proxy.app import build_app

    config.metrics.enabled = False
    client = await aiohttp_client(build_app(config))
    assert (await client.get("/metrics")).status == 404
