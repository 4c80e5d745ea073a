"""Rate limits per key and per team (`rate_limits` in YAML): 429 `rate_limited`, Retry-After, and OpenAI's
`x-ratelimit-*` headers on every answer; the `openai` SDK waits and retries on its own."""

from __future__ import annotations

import asyncio
import time

import msgspec
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import ConfigError, SubjectLimits, load_config
from proxy.gateway import GATEWAY
from proxy.limits import RateLimiter, duration, estimate
from proxy.store.base import KeyRecord
from proxy.translators.openai import decode_request
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for
from tests.mock_videos import VideoControl, build_video_mock
from tests.test_videos import video_config

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def limited(aiohttp_client, mock, store_url: str, yaml_limits: str, tmp_path) -> TestClient:
    """A gateway on the mock whose config is the default one plus `yaml_limits` (a `rate_limits:` section)."""
    config = tmp_path / "gateway.yaml"
    config.write_text(DEFAULT_CONFIG.read_text() + "\n" + yaml_limits)
    return await aiohttp_client(build_app(load_config(config, env=env_for(mock, store_url))))


async def test_no_limit_configured_means_no_limiter_work_and_no_headers(gateway, key):
    assert not gateway.server.app[GATEWAY].limiter.active
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 200 and not [h for h in r.headers if h.lower().startswith("x-ratelimit")]


async def test_requests_a_minute_per_key(aiohttp_client, mock, store_url, make_key, tmp_path):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  key: {rpm: 3}\n", tmp_path)
    key, other = await make_key(), await make_key()
    seen = []
    for _ in range(3):
        r = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        assert r.status == 200
        seen.append(r.headers["x-ratelimit-remaining-requests"])
        assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert seen == ["2", "1", "0"]
    refused = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert refused.status == 429
    error = (await refused.json())["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert "3 requests a minute" in error["message"] and "Retry in" in error["message"]
    assert 15 <= int(refused.headers["retry-after"]) <= 20  # one request's share of the minute: 20 s
    assert 14_000 <= int(refused.headers["retry-after-ms"]) <= 20_000
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"]
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_rate_limited_total{limit="requests",subject="key"} 1.0' in metrics
    # another key of the same team is not held back by the first one's limit
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(other))).status == 200


async def test_a_refusal_is_recorded_and_costs_nothing(aiohttp_client, mock, store_url, make_key, tmp_path):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  key: {rpm: 1}\n", tmp_path)
    key = await make_key()
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    refused = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert refused.status == 429
    accountant = gw.server.app[GATEWAY].accountant
    await asyncio.wait_for(accountant.flush(), 10)
    record = await gw.get("/v1/generations", params={"id": refused.headers["x-request-id"]}, headers=auth(key))
    data = (await record.json())["data"]
    assert data["status_code"] == 429 and data["error_code"] == "rate_limited" and data["cost_nanos"] == 0


async def test_the_team_limit_holds_all_its_keys_together(aiohttp_client, mock, store_url, make_key, tmp_path):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  team: {rpm: 2}\n", tmp_path)
    first, second = await make_key(team="acme"), await make_key(team="acme")
    outsider = await make_key(team="globex")
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(first))).status == 200
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(second))).status == 200
    refused = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(first))
    assert refused.status == 429 and "team acme" in (await refused.json())["error"]["message"]
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(outsider))).status == 200


async def test_limits_on_one_model_add_to_those_on_all(aiohttp_client, mock, store_url, make_key, tmp_path):
    limits = "rate_limits:\n  key: {rpm: 5}\n  models:\n    openai/gpt-4o-mini:\n      key: {rpm: 1}\n"
    gw = await limited(aiohttp_client, mock, store_url, limits, tmp_path)
    key = await make_key()
    first = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert first.status == 200 and first.headers["x-ratelimit-limit-requests"] == "1"  # the tightest shows
    refused = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert refused.status == 429
    assert "for key " in (message := (await refused.json())["error"]["message"])
    assert "on openai/gpt-4o-mini: 1 requests a minute" in message
    other = await gw.post("/v1/chat/completions", json={**CHAT, "model": "openai/gpt-4o"}, headers=auth(key))
    assert other.status == 200 and other.headers["x-ratelimit-remaining-requests"] == "3"  # 5, less the two


def test_limits_on_an_unknown_model_are_a_config_error(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        DEFAULT_CONFIG.read_text() + "\nrate_limits:\n  models:\n    openai/gpt-5-turbo:\n      key: {rpm: 1}\n"
    )
    where = r"gateway\.yaml:\d+: \$\.rate_limits\.models\['openai/gpt-5-turbo'\]"
    with pytest.raises(ConfigError, match=where + r": unknown model \(expected one of: openai/"):
        load_config(config, env={})


async def test_tokens_a_minute_reserve_the_estimate_and_settle_the_real_use(
    aiohttp_client, mock, store_url, make_key, tmp_path
):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  key: {tpm: 1000}\n", tmp_path)
    key = await make_key()
    body = {**CHAT, "max_tokens": 400}
    r = await gw.post("/v1/chat/completions", json=body, headers=auth(key))
    assert r.status == 200
    reserved_left = int(r.headers["x-ratelimit-remaining-tokens"])
    assert r.headers["x-ratelimit-limit-tokens"] == "1000" and 550 <= reserved_left <= 600  # 400 + the prompt
    # the mock used 16 tokens: what was reserved beyond them was given back when the answer ended, so the second
    # request leaves 16 fewer than the first did (not 424 fewer)
    r = await gw.post("/v1/chat/completions", json=body, headers=auth(key))
    assert r.status == 200 and reserved_left - 17 <= int(r.headers["x-ratelimit-remaining-tokens"]) <= reserved_left
    r = await gw.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000}, headers=auth(key))
    assert r.status == 429 and r.headers["x-should-retry"] == "false"  # could never fit: the SDKs give up
    assert "exceed the 1000 tokens a minute of key" in (await r.json())["error"]["message"]


async def test_concurrency_per_key(aiohttp_client, mock, store_url, make_key, tmp_path):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  key: {concurrency: 1}\n", tmp_path)
    key = await make_key()
    mock.control.gate_after = 1  # the stream waits after its first event, until the gate opens
    stream = await gw.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert stream.status == 200
    await stream.content.readline()  # the first stream is open
    refused = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert refused.status == 429 and "at most 1 requests in flight" in (await refused.json())["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    mock.control.gate.set()
    assert (await stream.read()).endswith(b"data: [DONE]\n\n")
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200  # the slot is free


async def test_the_openai_sdk_waits_and_retries_by_itself(aiohttp_client, mock, store_url, make_key, tmp_path):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  key: {rpm: 120}\n", tmp_path)
    key = await make_key()
    for _ in range(120):  # the minute's burst, spent
        assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    client = openai.AsyncOpenAI(api_key=key, base_url=str(gw.make_url("/v1")), max_retries=2, timeout=20)
    started = time.monotonic()
    answer = await client.chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    waited = time.monotonic() - started
    assert answer.http_response.status_code == 200 and answer.parse().choices
    assert 0.2 <= waited < 5  # it was refused, waited the half second Retry-After-Ms named, and got through


async def test_a_keys_own_limits_through_the_keys_api(aiohttp_client, mock, store_url, make_key, tmp_path):
    gw = await limited(aiohttp_client, mock, store_url, "rate_limits:\n  key: {rpm: 1}\n", tmp_path)
    admin = await make_key(management=True)
    made = await gw.post("/v1/keys", json={"name": "batch job", "rpm_limit": 2}, headers=auth(admin))
    assert made.status == 200, await made.text()
    created = await made.json()
    assert created["data"]["rpm_limit"] == 2 and created["data"]["tpm_limit"] is None
    own = created["key"]
    for _ in range(2):  # its own 2 a minute, not the default 1
        r = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(own))
        assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "2"
    assert (await gw.post("/v1/chat/completions", json=CHAT, headers=auth(own))).status == 429
    kid = created["data"]["id"]
    cleared = await gw.patch(f"/v1/keys/{kid}", json={"rpm_limit": 0}, headers=auth(admin))  # 0: none at all
    assert cleared.status == 200 and (await cleared.json())["data"]["rpm_limit"] == 0
    for _ in range(3):
        r = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(own))
        assert r.status == 200 and "x-ratelimit-limit-requests" not in r.headers
    bad = await gw.patch(f"/v1/keys/{kid}", json={"tpm_limit": -1}, headers=auth(admin))
    refusal = await bad.json()
    assert bad.status == 400 and refusal["error"] == "invalid_request" and "`tpm_limit` must be" in refusal["message"]
    back = await gw.patch(f"/v1/keys/{kid}", json={"rpm_limit": None, "name": "renamed"}, headers=auth(admin))
    assert (await back.json())["data"]["rpm_limit"] is None  # the default again


async def test_a_key_may_be_limited_where_the_config_limits_nothing(aiohttp_client, mock, store_url, make_key):
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))))
    admin = await make_key(management=True)
    made = await (
        await client.post("/v1/keys", json={"concurrency_limit": 1, "tpm_limit": 500}, headers=auth(admin))
    ).json()
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers=auth(made["key"]))
    assert r.status == 200 and r.headers["x-ratelimit-limit-tokens"] == "500"
    assert (
        "x-ratelimit-limit-tokens"
        not in (await client.post("/v1/chat/completions", json=CHAT, headers=auth(admin))).headers
    )


async def test_video_creations_count_against_the_keys_requests(
    aiohttp_client, aiohttp_server, store_url, make_key, tmp_path
):
    server = await aiohttp_server(build_video_mock(VideoControl()), host="127.0.0.1")
    mock = Mock(url=str(server.make_url("/v1")), control=None)  # type: ignore[arg-type]
    config = video_config(tmp_path)
    config.write_text(config.read_text() + "\nrate_limits:\n  key: {rpm: 1, concurrency: 1}\n")
    gw = await aiohttp_client(build_app(load_config(config, env=env_for(mock, store_url))))
    key = await make_key()
    body = {"model": "openai/sora-2", "prompt": "a cat", "seconds": "4"}
    assert (await gw.post("/v1/videos", json=body, headers=auth(key))).status == 200
    refused = await gw.post("/v1/videos", json=body, headers=auth(key))
    assert refused.status == 429 and refused.headers["x-ratelimit-limit-requests"] == "1"
    assert "1 requests a minute" in (await refused.json())["error"]["message"]
    assert gw.server.app[GATEWAY].limiter._key_rule.in_flight == {}  # the creation's slot ended with it


@pytest.mark.parametrize(
    ("body", "bound"),
    [
        (b'{"max_tokens": 100}', 100),
        (b'{"max_completion_tokens": 7, "max_tokens": 100}', 7),
        (b'{"max_output_tokens": 9}', 9),
        (b'{"messages": []}', None),
        (b'{"max_tokens": "lots"}', None),  # not a number: the provider's to refuse, as before
        (b'{"max_tokens": null, "max_output_tokens": 12}', 12),
    ],
)
def test_the_output_bound_of_any_surface(body: bytes, bound: int | None):
    assert decode_request(body).output_bound() == bound
    assert estimate(len(body), bound, 1024) == (len(body) // 4, 1024 if bound is None else bound)


def test_an_admission_with_every_limit_stays_in_microseconds():
    """Key and team, each with requests, tokens and concurrency limits: admit and settle, per request. About
    5.6 µs on the 2-core VM of the README (2.0 µs with one requests-a-minute limit, 4.1 µs with a key's
    requests and tokens); the bound leaves room for a slower, busier machine."""
    config = load_config(DEFAULT_CONFIG, env={}).rate_limits
    config = msgspec.structs.replace(
        config,
        key=SubjectLimits(rpm=10**9, tpm=10**12, concurrency=10**6),
        team=SubjectLimits(rpm=10**9, tpm=10**12, concurrency=10**6),
    )
    limiter = RateLimiter(config)
    keys = [KeyRecord(f"k{i}", f"team_{i % 5}", "acme", b"", ("inference",), "active", "", 0) for i in range(50)]
    tokens = len(orjson.dumps({**CHAT, "max_tokens": 256})) // 4 + 256
    n = 20_000
    started = time.perf_counter()
    for i in range(n):
        limiter.settle(limiter.admit(keys[i % 50], tokens, started), 40, started)
    per_request = (time.perf_counter() - started) / n
    assert per_request < 15e-6, f"{per_request * 1e6:.2f} µs"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.12, "120ms"), (0.0004, "0ms"), (1.5, "1.5s"), (59.9994, "59.999s"), (360, "6m0s")]
)
def test_reset_durations_read_like_openais(seconds: float, text: str):
    assert duration(seconds) == text


def test_a_negative_limit_is_a_config_error(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(DEFAULT_CONFIG.read_text() + "\nrate_limits:\n  team: {tpm: -5}\n")
    with pytest.raises(ConfigError, match=r"rate_limits\.team\.tpm.*expected a whole number >= 0"):
        load_config(config, env={})
