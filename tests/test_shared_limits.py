"""Rate limits and credit holds shared through Redis (`rate_limits.url`): two gateways on one Redis count
together; Redis down means what `rate_limits.on_redis_error` says, with one WARNING and a metric.

Needs Debian's `redis-server` (skipped without it, except in CI, which installs it)."""

from __future__ import annotations

import asyncio
import itertools
import logging

import msgspec
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import ConfigError, SubjectLimits, load_config
from proxy.errors import GatewayError
from proxy.gateway import GATEWAY
from proxy.limits import RateLimiter
from proxy.shared_limits import SharedLimits
from proxy.store.base import KeyRecord
from tests.conftest import DEFAULT_CONFIG, auth, env_for
from tests.test_credit_holds import _fire, _tokens_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
_prefixes = itertools.count()


async def _gateways(aiohttp_client, mock, store_url, tmp_path, limits: str, count: int = 2) -> list[TestClient]:
    """`count` gateways on one store, one mock and (per `limits`, a `rate_limits:` section) one Redis; each
    with its own journal, as separate instances would have. A prefix of its own keeps each test's keys apart."""
    config = tmp_path / "gateway.yaml"
    prefix = f"test{next(_prefixes)}:"
    pricing = f"pricing: {{file: {DEFAULT_CONFIG.parent / 'pricing.yaml'}}}\n"  # the prices, for the holds
    config.write_text(DEFAULT_CONFIG.read_text() + "\n" + pricing + limits.replace("PREFIX", prefix))
    clients = []
    for n in range(count):
        env = env_for(mock, store_url, GATEWAY_JOURNAL_DIR=str(tmp_path / f"journal{n}"))
        clients.append(await aiohttp_client(build_app(load_config(config, env=env))))
    return clients


async def _post(client: TestClient, key: str, body: dict = CHAT):
    return await client.post("/v1/chat/completions", json=body, headers=auth(key))


async def test_two_gateways_share_a_keys_requests_a_minute(
    aiohttp_client, mock, store_url, make_key, tmp_path, redis_url
):
    limits = f"rate_limits:\n  url: {redis_url}\n  key_prefix: 'PREFIX'\n  key: {{rpm: 3}}\n"
    first, second = await _gateways(aiohttp_client, mock, store_url, tmp_path, limits)
    key = await make_key()
    answers = [await _post(gw, key) for gw in (first, second, first)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    refused = await _post(second, key)
    assert refused.status == 429
    assert "3 requests a minute" in (await refused.json())["error"]["message"]
    assert 15 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await _post(first, await make_key())).status == 200  # another key has its own bucket


async def test_without_redis_each_gateway_counts_alone(aiohttp_client, mock, store_url, make_key, tmp_path):
    first, second = await _gateways(aiohttp_client, mock, store_url, tmp_path, "rate_limits:\n  key: {rpm: 1}\n")
    key = await make_key()
    assert [(await _post(gw, key)).status for gw in (first, second, first)] == [200, 200, 429]


async def test_tokens_are_settled_in_redis(aiohttp_client, mock, store_url, make_key, tmp_path, redis_url):
    limits = f"rate_limits:\n  url: {redis_url}\n  key_prefix: 'PREFIX'\n  team: {{tpm: 1000}}\n"
    first, second = await _gateways(aiohttp_client, mock, store_url, tmp_path, limits)
    key = await make_key()
    r = await _post(first, key, {**CHAT, "max_tokens": 600})  # reserves ~620; the mock uses 16
    assert r.status == 200 and int(r.headers["x-ratelimit-remaining-tokens"]) < 400
    shared = first.server.app[GATEWAY].limiter.shared
    await asyncio.wait_for(asyncio.gather(*shared._tasks), 5)  # the settlement, sent in the background
    r = await _post(second, key, {**CHAT, "max_tokens": 600})  # fits only because the first gave back ~600
    assert r.status == 200, await r.text()
    assert 330 <= int(r.headers["x-ratelimit-remaining-tokens"]) <= 370  # 1000 - the first's 16 - its own ~620


async def test_concurrency_slots_are_shared_and_freed(aiohttp_client, mock, store_url, make_key, tmp_path, redis_url):
    limits = f"rate_limits:\n  url: {redis_url}\n  key_prefix: 'PREFIX'\n  key: {{concurrency: 1}}\n"
    first, second = await _gateways(aiohttp_client, mock, store_url, tmp_path, limits)
    key = await make_key()
    mock.control.gate_after = 1  # the stream waits after its first event, until the gate opens
    stream = await _post(first, key, {**CHAT, "stream": True})
    assert stream.status == 200
    await stream.content.readline()
    refused = await _post(second, key)
    assert refused.status == 429 and "at most 1 requests in flight" in (await refused.json())["error"]["message"]
    mock.control.gate.set()
    assert (await stream.read()).endswith(b"data: [DONE]\n\n")
    shared = first.server.app[GATEWAY].limiter.shared
    await asyncio.wait_for(asyncio.gather(*shared._tasks), 5)
    assert (await _post(second, key)).status == 200


async def test_credit_holds_are_shared(aiohttp_client, mock, store_url, make_key, tmp_path, redis_url):
    gateways = await _gateways(
        aiohttp_client, mock, store_url, tmp_path, f"rate_limits:\n  url: {redis_url}\n  key_prefix: 'PREFIX'\n", 3
    )
    key = await make_key(credit_usd=1.50)  # $0.50 above the default $1.00 minimum
    mock.control.gate_after = 1
    tokens = _tokens_for(gateways[0].server.app[GATEWAY], 0.10)
    answers = [a for batch in await asyncio.gather(*(_fire(gw, key, tokens, 17) for gw in gateways)) for a in batch]
    statuses = sorted(a.status for a in answers)
    assert statuses.count(200) == 4 and statuses.count(402) == 47, statuses  # across the three, as in one
    assert not any(gw.server.app[GATEWAY].wallets.holds for gw in gateways)  # held in Redis, not in a process
    mock.control.gate.set()
    for answer in answers:
        await answer.read()
    for gw in gateways:
        await asyncio.wait_for(asyncio.gather(*gw.server.app[GATEWAY].limiter.shared._tasks), 5)
    again = await _fire(gateways[2], key, tokens, 1)
    assert again[0].status == 200  # the holds ended with their requests
    await again[0].read()


@pytest.mark.parametrize(
    ("choice", "statuses"),
    [("local", [200, 429]), ("open", [200, 200]), ("closed", [503, 503])],
)
async def test_redis_down(aiohttp_client, mock, store_url, make_key, tmp_path, redis_server, caplog, choice, statuses):
    limits = (
        f"rate_limits:\n  url: {redis_server.url}\n  key_prefix: 'PREFIX'\n  timeout_ms: 200\n"
        f"  on_redis_error: {choice}\n  key: {{rpm: 1}}\n"
    )
    (gw,) = await _gateways(aiohttp_client, mock, store_url, tmp_path, limits, 1)
    key = await make_key()
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger="proxy.limits"):
        answers = [await _post(gw, key) for _ in range(2)]
    assert [a.status for a in answers] == statuses
    if choice == "closed":
        assert "Redis, which does not answer" in (await answers[0].json())["error"]["message"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text  # once an outage, not once a request
    assert f"on_redis_error: {choice}" in warnings[0].getMessage() and "127.0.0.1" in warnings[0].getMessage()
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_redis_errors_total{use="limits"} 1.0' in metrics  # the second request did not try again
    redis_server.start()
    shared = gw.server.app[GATEWAY].limiter.shared
    shared.link.retry_at = 0.0  # rather than wait RETRY_S for the next try
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="proxy.limits"):
        back = await _post(gw, await make_key())
    assert back.status == 200 and back.headers["x-ratelimit-remaining-requests"] == "0"  # counted in Redis again
    assert "answers again" in caplog.text


def test_a_rate_limits_url_that_is_not_redis_is_a_config_error(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(DEFAULT_CONFIG.read_text() + "\nrate_limits:\n  url: http://user:secret@cache:6379\n")
    with pytest.raises(ConfigError, match=r"\$\.rate_limits\.url: expected a redis://") as caught:
        load_config(config, env={})
    assert "secret" not in str(caught.value)


async def test_an_admission_whose_client_left_gives_back_what_redis_took(redis_url):
    config = msgspec.structs.replace(
        load_config(DEFAULT_CONFIG, env={}).rate_limits,
        url=redis_url,
        key_prefix=f"test{next(_prefixes)}:",
        key=SubjectLimits(rpm=2, concurrency=1),
    )
    limiter = RateLimiter(config)
    shared = SharedLimits(config, limiter)
    key = KeyRecord("k1", "team_1", "acme", b"", ("inference",), "active", "", 0)
    try:
        left = asyncio.create_task(shared.admit(key, 0, "", "req-left", True))
        await asyncio.sleep(0)  # queued for the batch, which is sent on the next turn
        left.cancel()  # the client leaves while Redis admits it
        with pytest.raises(asyncio.CancelledError):
            await left
        while shared._tasks:  # the batch, then the ends giving its slot and request back
            await asyncio.wait_for(asyncio.gather(*shared._tasks), 5)
        admitted = await shared.admit(key, 0, "", "req-stays", True)
        assert admitted.headers["x-ratelimit-remaining-requests"] == "1"  # the one that left was refunded
        with pytest.raises(GatewayError) as refused:  # the slot is this one's
            await shared.admit(key, 0, "", "req-third", True)
        assert "at most 1 requests in flight" in refused.value.message
    finally:
        await shared.close()
