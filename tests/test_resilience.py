"""Fallbacks, retries, timeouts and circuit breakers, against two mock upstreams that misbehave on cue.

`openai/gpt-4o-mini` is given a second target, provider `backup` (another mock): the primary refuses,
stalls, resets, rate-limits or answers garbage, and the tests check who answered, what the client saw,
what `meta.attempts` says and how long it took.
"""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import BreakerConfig, GatewayConfig, ModelConfig, ProviderConfig, Target, load_config
from proxy.errors import GatewayError
from proxy.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Health,
    ProviderPrefs,
    decode_prefs,
    order_targets,
    retry_after,
    retry_delay,
)
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for
from tests.mock_upstream import MockControl, build_mock

MODEL = "openai/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "meta": True}


# ---------------------------------------------------------------------------------------------------------
# order_targets, prefs


def _model(*providers: str, weights: tuple[float | None, ...] = ()) -> ModelConfig:
    targets = [
        Target(provider=p, model=f"{p}-m", weight=weights[i] if i < len(weights) else None)
        for i, p in enumerate(providers)
    ]
    return ModelConfig(targets=targets)


def _no_sort(model_id: str, target: Target, sort: str) -> float:
    return 0.0


def _providers(targets: list[Target]) -> list[str]:
    return [t.provider for t in targets]


def test_targets_keep_config_order_without_prefs() -> None:
    assert _providers(order_targets("m", _model("a", "b", "c"), None, _no_sort)) == ["a", "b", "c"]


def test_weights_spread_first_choices_in_proportion() -> None:
    model = _model("a", "b", "c", weights=(3.0, 1.0, None))
    rng = random.Random(7)
    firsts = {"a": 0, "b": 0, "c": 0}
    for _ in range(4000):
        order = _providers(order_targets("m", model, None, _no_sort, rng))
        assert order[-1] == "c"  # the unweighted target is the fallback
        firsts[order[0]] += 1
    assert firsts["c"] == 0
    assert 0.72 < firsts["a"] / 4000 < 0.78  # 3:1


@pytest.mark.parametrize(
    ("prefs", "expected"),
    [
        (ProviderPrefs(order=["c", "a"]), ["c", "a", "b"]),
        (ProviderPrefs(only=["b", "c"]), ["b", "c"]),
        (ProviderPrefs(ignore=["a"]), ["b", "c"]),
        (ProviderPrefs(allow_fallbacks=False), ["a"]),
        (ProviderPrefs(order=["b"], allow_fallbacks=False), ["b"]),
        (ProviderPrefs(order=["nobody", "c"]), ["c", "a", "b"]),
    ],
)
def test_prefs_narrow_and_reorder(prefs: ProviderPrefs, expected: list[str]) -> None:
    assert _providers(order_targets("m", _model("a", "b", "c"), prefs, _no_sort)) == expected


def test_prefs_sort_uses_the_ranking_and_order_wins_over_it() -> None:
    price = {"a": 3.0, "b": 1.0, "c": 2.0}

    def key(model_id: str, target: Target, sort: str) -> float:
        assert (model_id, sort) == ("m", "price")
        return price[target.provider]

    model = _model("a", "b", "c")
    assert _providers(order_targets("m", model, ProviderPrefs(sort="price"), key)) == ["b", "c", "a"]
    assert _providers(order_targets("m", model, ProviderPrefs(sort="price", order=["a"]), key)) == ["a", "b", "c"]


def test_prefs_that_rule_out_everything_are_a_400() -> None:
    with pytest.raises(GatewayError) as info:
        order_targets("m", _model("a", "b"), ProviderPrefs(only=["z"]), _no_sort)
    assert info.value.status == 400 and info.value.param == "provider"
    assert "a, b" in info.value.message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'"backup"', ProviderPrefs(only=["backup"])),
        (b'{"order": ["x"], "allow_fallbacks": false}', ProviderPrefs(order=["x"], allow_fallbacks=False)),
        (b'{"sort": "latency", "max_price": {"prompt": 1}}', ProviderPrefs(sort="latency")),
    ],
)
def test_decode_prefs(raw: bytes, expected: ProviderPrefs) -> None:
    import msgspec

    assert decode_prefs(msgspec.Raw(raw)) == expected


@pytest.mark.parametrize("raw", [b"42", b'{"order": "x"}', b'{"sort": "cheapest"}', b'{"allow_fallbacks": "no"}'])
def test_bad_prefs_are_a_400_naming_provider(raw: bytes) -> None:
    import msgspec

    with pytest.raises(GatewayError) as info:
        decode_prefs(msgspec.Raw(raw))
    assert info.value.status == 400 and (info.value.param or "").startswith("provider")


# ---------------------------------------------------------------------------------------------------------
# Health (circuit breaker)


def _health(failures: int = 3, cooldown_s: float = 10.0) -> tuple[Health, list[int]]:
    changes: list[int] = []
    health = Health(
        "p", "m", BreakerConfig(failures=failures, cooldown_s=cooldown_s), lambda h: changes.append(h.state)
    )
    return health, changes


def test_breaker_opens_after_failures_in_a_row_only() -> None:
    health, changes = _health(failures=3)
    health.failure("boom", 0.0)
    health.failure("boom", 0.0)
    health.success()
    health.failure("boom", 0.0)
    health.failure("boom", 0.0)
    assert health.state == CLOSED and health.acquire(0.0)
    health.failure("boom", 5.0)
    assert health.state == OPEN and changes == [OPEN]
    assert not health.ready(14.9) and not health.acquire(14.9)
    assert health.retry_in(10.0) == pytest.approx(5.0)


def test_half_open_lets_one_probe_through() -> None:
    health, changes = _health(failures=1, cooldown_s=10.0)
    health.failure("boom", 0.0)
    assert health.ready(10.0)
    assert health.acquire(10.0) and health.state == HALF_OPEN
    assert not health.ready(10.0) and not health.acquire(10.0)  # the probe is in flight
    health.success(0.05)
    assert health.state == CLOSED and changes == [OPEN, HALF_OPEN, CLOSED]
    assert health.latency_s == pytest.approx(0.05)


def test_a_failed_probe_opens_again_and_a_released_one_frees_the_slot() -> None:
    health, _ = _health(failures=1, cooldown_s=10.0)
    health.failure("boom", 0.0)
    assert health.acquire(10.0)
    health.release()
    assert health.acquire(10.0)
    health.failure("again", 10.0)
    assert health.state == OPEN and not health.acquire(19.0) and health.acquire(20.0)


def test_breaker_with_zero_failures_never_opens() -> None:
    health, _ = _health(failures=0)
    for _ in range(50):
        health.failure("boom", 0.0)
    assert health.state == CLOSED


# ---------------------------------------------------------------------------------------------------------
# retry delays


def test_backoff_is_full_jitter_doubling() -> None:
    rng = random.Random(1)
    for retry, cap in ((1, 0.25), (2, 0.5), (3, 1.0)):
        delays = [retry_delay(retry, 0.25, None, rng) for _ in range(500)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > cap * 0.9  # spread over the whole range
    assert retry_delay(1, 0.25, 3.0) == 3.0  # the provider's ask wins


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "350", "retry-after": "2"}, 0.35),
        ({"retry-after": "Wed, 25 Nov 2026 10:00:05 GMT"}, 5.0),
        ({"retry-after": "Wed, 25 Nov 2026 09:00:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now = 1795600800.0  # 2026-11-25 10:00:00 UTC
    assert retry_after(headers, now) == (None if expected is None else pytest.approx(expected))


# ---------------------------------------------------------------------------------------------------------
# end to end: two mocks


@pytest.fixture
async def backup(aiohttp_server) -> Mock:
    control = MockControl()
    server = await aiohttp_server(build_mock(control), host="127.0.0.1")
    return Mock(url=str(server.make_url("/v1")), control=control)


@pytest.fixture
def two_targets(mock: Mock, backup: Mock, store_url: str) -> GatewayConfig:
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.providers["backup"] = ProviderConfig(kind="openai-compatible", base_url=backup.url, api_key="sk-backup")
    model = config.models[MODEL]
    model.targets.append(Target(provider="backup", model="backup-mini"))
    model.backoff_s = 0.01
    return config


async def _client(aiohttp_client, config: GatewayConfig) -> TestClient:
    return await aiohttp_client(build_app(config))


def _attempts(body: dict) -> list[tuple[str, int]]:
    return [(a["provider"], a["status"]) for a in body["meta"]["attempts"]]


@pytest.mark.parametrize("mode", ["status", "plain_error", "reset", "not_json", "truncated_json"])
async def test_a_failing_primary_falls_back(aiohttp_client, two_targets, mock, backup, key, mode) -> None:
    mock.control.mode, mock.control.status = mode, 503
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["meta"]["provider"] == "backup" and body["meta"]["upstream_model"] == "backup-mini"
    assert len(mock.control.received) == 2  # one retry (retries: 1), then the fallback
    assert len(backup.control.received) == 1
    statuses = [s for _, s in _attempts(body)]
    assert _attempts(body)[-1] == ("backup", 200) and len(statuses) == 3
    assert body["meta"]["model"] == MODEL


async def test_a_retry_on_the_same_target_can_succeed(aiohttp_client, two_targets, mock, backup, key) -> None:
    mock.control.script, mock.control.status = ["status"], 500
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    body = await r.json()
    assert r.status == 200 and _attempts(body) == [("openai", 500), ("openai", 200)]
    assert backup.control.received == []


async def test_retry_after_is_honoured(aiohttp_client, two_targets, mock, backup, key) -> None:
    mock.control.script, mock.control.status = ["status"], 429
    mock.control.headers = {"Retry-After": "1"}
    two_targets.models[MODEL].max_retry_wait_s = 2.0
    client = await _client(aiohttp_client, two_targets)
    started = time.monotonic()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    elapsed = time.monotonic() - started
    body = await r.json()
    assert _attempts(body) == [("openai", 429), ("openai", 200)]
    assert 1.0 <= elapsed < 1.5


async def test_a_longer_retry_after_moves_on_at_once(aiohttp_client, two_targets, mock, backup, key) -> None:
    mock.control.mode, mock.control.status = "status", 429
    mock.control.headers = {"Retry-After": "30"}
    client = await _client(aiohttp_client, two_targets)
    started = time.monotonic()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert time.monotonic() - started < 1.0
    assert _attempts(await r.json()) == [("openai", 429), ("backup", 200)]


async def test_out_of_tries_the_last_answer_reaches_the_client(aiohttp_client, two_targets, mock, backup, key) -> None:
    for m in (mock, backup):
        m.control.mode, m.control.status = "status", 429
        m.control.headers = {"Retry-After": "0"}
        m.control.error_body = b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit"}}'
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 429
    assert await r.read() == backup.control.error_body  # the provider's own answer, as it came
    assert r.headers["retry-after"] == "0"
    assert len(mock.control.received) == 2 and len(backup.control.received) == 2


async def test_a_client_error_is_not_retried(aiohttp_client, two_targets, mock, backup, key) -> None:
    mock.control.mode, mock.control.status = "status", 400
    mock.control.error_body = b'{"error": {"message": "bad tools", "type": "invalid_request_error", "code": null}}'
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 400 and await r.read() == mock.control.error_body
    assert len(mock.control.received) == 1 and backup.control.received == []


async def test_the_gateways_rejected_credentials_skip_to_the_next_target(
    aiohttp_client, two_targets, mock, backup, key
) -> None:
    mock.control.mode, mock.control.status = "status", 401
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert _attempts(await r.json()) == [("openai", 401), ("backup", 200)]  # no retry of a 401


async def test_provider_prefs_pick_the_targets(aiohttp_client, two_targets, mock, backup, key) -> None:
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json={**CHAT, "provider": "backup"}, headers=auth(key))
    assert (await r.json())["meta"]["provider"] == "backup" and mock.control.received == []
    mock.control.mode, mock.control.status = "status", 500
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "provider": {"allow_fallbacks": False}}, headers=auth(key)
    )
    assert r.status == 500 and len(backup.control.received) == 1  # no fallback to backup
    r = await client.post("/v1/chat/completions", json={**CHAT, "provider": {"sort": "nope"}}, headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "provider.sort"
    r = await client.post("/v1/chat/completions", json={**CHAT, "provider": {"only": ["x"]}}, headers=auth(key))
    assert r.status == 400 and "served by: backup, openai" in (await r.json())["error"]["message"]


async def test_a_stream_falls_back_while_nothing_was_sent(aiohttp_client, two_targets, mock, backup, key) -> None:
    two_targets.providers["openai"].timeouts.idle_s = 0.3
    two_targets.models[MODEL].retries = 0
    mock.control.mode, mock.control.stall_s = "silent_stream", 5
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    text = await asyncio.wait_for(r.text(), 5)
    assert r.status == 200 and text.endswith("data: [DONE]\n\n")
    meta = orjson.loads([line for line in text.splitlines() if '"meta"' in line][-1][6:])["meta"]
    assert [(a["provider"], a["status"]) for a in meta["attempts"]] == [("openai", 0), ("backup", 200)]


async def test_a_stream_that_broke_after_it_began_is_not_retried(
    aiohttp_client, two_targets, mock, backup, key
) -> None:
    mock.control.mode = "reset_mid_stream"
    client = await _client(aiohttp_client, two_targets)
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    text = await asyncio.wait_for(r.text(), 5)
    assert "tok0" in text and "data: [DONE]" not in text
    assert '"error"' in text.strip().split("\n\n")[-1]
    assert backup.control.received == [] and len(mock.control.received) == 1


# ---------------------------------------------------------------------------------------------------------
# timeouts: each fires within 10% of its setting


async def _timed_error(client: TestClient, key: str, body: dict) -> tuple[float, str]:
    started = time.monotonic()
    r = await client.post("/v1/chat/completions", json=body, headers=auth(key))
    text = await asyncio.wait_for(r.text(), 10)
    return time.monotonic() - started, text


async def test_first_byte_timeout(aiohttp_client, config, mock, key) -> None:
    config.providers["openai"].timeouts.first_byte_s = 1.0
    config.models[MODEL].retries = 0
    mock.control.mode, mock.control.stall_s = "stall", 5
    elapsed, text = await _timed_error(await _client(aiohttp_client, config), key, CHAT)
    assert "upstream_timeout" in text and "1 s to answer" in text
    assert 1.0 <= elapsed < 1.1


async def test_idle_timeout_mid_stream(aiohttp_client, config, mock, key) -> None:
    config.providers["openai"].timeouts.idle_s = 1.0
    mock.control.gate_after = 2  # silent after two events, never released
    client = await _client(aiohttp_client, config)
    started = time.monotonic()
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    await asyncio.wait_for(mock.control.first_sent.wait(), 5)
    text = await asyncio.wait_for(r.text(), 5)
    silent_for = time.monotonic() - started
    assert "tok1" in text and "1 s between events" in text.strip().split("\n\n")[-1]
    assert 1.0 <= silent_for < 1.1  # the stream's own start (a few ms) is inside the measure


async def test_total_timeout(aiohttp_client, config, mock, key) -> None:
    config.providers["openai"].timeouts.total_s = 1.0
    config.models[MODEL].retries = 0
    mock.control.gate_after = 1
    client = await _client(aiohttp_client, config)
    elapsed, text = await _timed_error(client, key, {**CHAT, "stream": True})
    assert "1 s in total" in text
    assert 1.0 <= elapsed < 1.1


# ---------------------------------------------------------------------------------------------------------
# circuit breaker, end to end


async def test_breaker_opens_skips_and_closes(aiohttp_client, two_targets, mock, backup, key) -> None:
    two_targets.providers["openai"].breaker = BreakerConfig(failures=2, cooldown_s=0.5)
    two_targets.models[MODEL].retries = 0
    mock.control.mode, mock.control.status = "status", 500
    client = await _client(aiohttp_client, two_targets)
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        assert _attempts(await r.json()) == [("openai", 500), ("backup", 200)]
    ready = await (await client.get("/readyz")).json()
    [primary] = [t for t in ready["targets"] if (t["provider"], t["model"]) == ("openai", "gpt-4o-mini")]
    assert primary["state"] == "open" and primary["consecutive_failures"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_upstream_breaker_state{provider="openai",upstream_model="gpt-4o-mini"} 1.0' in metrics
    assert 'gateway_upstream_attempts_total{outcome="500",provider="openai",upstream_model="gpt-4o-mini"} 2.0' in (
        metrics
    )

    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))  # open: straight to backup
    assert _attempts(await r.json()) == [("backup", 200)] and len(mock.control.received) == 2

    mock.control.mode = "ok"
    await asyncio.sleep(0.55)  # the cool-down itself is what is tested: no event marks its end
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))  # the probe
    assert _attempts(await r.json()) == [("openai", 200)]
    ready = await (await client.get("/readyz")).json()
    assert [t["state"] for t in ready["targets"] if t["model"] == "gpt-4o-mini"] == ["closed"]


async def test_every_circuit_open_is_a_503_with_a_wait(aiohttp_client, config, mock, key) -> None:
    config.providers["openai"].breaker = BreakerConfig(failures=1, cooldown_s=30)
    config.models[MODEL].retries = 0
    mock.control.mode = "reset"
    client = await _client(aiohttp_client, config)
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 502
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    body = await r.json()
    assert (
        r.status == 503
        and "circuits are open" in body["error"]["message"]
        and "Retry in 30 s at most" in (body["error"]["message"])
    )
    assert len(mock.control.received) == 1


# ---------------------------------------------------------------------------------------------------------
# streams per key


async def test_streams_per_key_are_limited(aiohttp_client, config, mock, key) -> None:
    config.server.max_streams_per_key = 1
    mock.control.gate_after = 1
    client = await _client(aiohttp_client, config)
    first = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    await asyncio.wait_for(mock.control.first_sent.wait(), 5)
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    body = await r.json()
    assert r.status == 429 and body["error"]["code"] == "too_many_streams"
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 200  # plain requests are not streams
    mock.control.gate.set()
    assert (await first.text()).endswith("data: [DONE]\n\n")
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert r.status == 200 and (await r.text()).endswith("data: [DONE]\n\n")
