"""The response cache: what makes two requests the same, hits as JSON and as streams (read by the official
SDKs), no-cache / no-store / max-age, TTL, team isolation, single-flight, and Redis: shared by two gateways,
and down mid-run."""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import anthropic
import openai
import orjson
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import GatewayConfig, load_config
from proxy.gateway import GATEWAY
from proxy.response_cache import canonical
from tests.conftest import DEFAULT_CONFIG, auth, env_for

MINI = "openai/gpt-4o-mini"
CLAUDE = "anthropic/claude-sonnet-4.6"
CHAT = {"model": MINI, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
_prefixes = itertools.count()


def _config(store_url: str, env: dict[str, str], cache: str) -> GatewayConfig:
    file = Path(store_url.removeprefix("sqlite:///")).parent / f"gateway{next(_prefixes)}.yaml"
    pricing = f"pricing: {{file: {DEFAULT_CONFIG.parent / 'pricing.yaml'}}}\n"
    file.write_text(DEFAULT_CONFIG.read_text() + "\n" + cache + pricing)
    return load_config(file, env=env)


async def _gateway(aiohttp_client, mock, claude, store_url, cache: str = "cache: {enabled: true}\n", **env):
    environment = env_for(mock, store_url, ANTHROPIC_BASE_URL=claude.url, ANTHROPIC_API_KEY="sk-ant-x", **env)
    return await aiohttp_client(build_app(_config(store_url, environment, cache)))


async def _post(gw: TestClient, key: str, body: dict = CHAT, path: str = "/v1/chat/completions", **headers):
    return await gw.post(path, json=body, headers={**auth(key), **headers})


def _upstream_calls(mock) -> int:
    return len(mock.control.received)


# -- the key


def test_what_makes_two_requests_the_same():
    base = canonical(orjson.dumps({**CHAT, "temperature": 0.5, "max_tokens": 100}))
    assert base is not None
    reordered = b'{"max_tokens": 100.0,  "temperature":0.5, "messages":[{"content":"What is the capital of France?",' \
        b'"role":"user"}], "model": "other", "stream": true, "stream_options": {"include_usage": true}, ' \
        b'"user": "u-1", "metadata": {"a": "b"}, "meta": true, "provider": {"order": ["openai"]}}'  # fmt: skip
    assert canonical(reordered) == base  # order, spacing, 100.0 vs 100, delivery and gateway members: the same
    assert canonical(orjson.dumps({**CHAT, "temperature": 0.7, "max_tokens": 100})) != base
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert canonical(orjson.dumps({**CHAT, "temperature": 0.5, "max_tokens": 100, "tools": tools})) != base
    assert canonical(orjson.dumps({**CHAT, "n": 2})) is None  # several samples: not kept
    assert canonical(orjson.dumps({**CHAT, "logprobs": True})) is None
    assert canonical(orjson.dumps({**CHAT, "n": 1, "logprobs": False})) is not None


# -- hits


async def test_a_hit_never_reaches_the_provider_and_costs_nothing(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    first = await _post(gw, key, {**CHAT, "meta": True})
    assert first.status == 200 and first.headers["x-cache"] == "MISS"
    paid = await first.json()
    calls = _upstream_calls(mock)
    second = await _post(gw, key, {**CHAT, "meta": True})
    hit = await second.json()
    assert second.status == 200 and second.headers["x-cache"] == "HIT" and _upstream_calls(mock) == calls
    assert hit["choices"][0]["message"]["content"] == paid["choices"][0]["message"]["content"] == "Hello there!"
    assert hit["usage"]["prompt_tokens"] == paid["usage"]["prompt_tokens"]  # the original tokens
    assert hit["cost_nanos"] == 0 and paid["cost_nanos"] > 0
    assert hit["meta"]["cache"]["status"] == "hit" and hit["meta"]["cache"]["age_s"] >= 0
    assert hit["meta"]["cache"]["key"] == paid["meta"]["cache"]["key"]
    await asyncio.wait_for(gw.server.app[GATEWAY].accountant.flush(), 10)
    record = await gw.get("/v1/generations", params={"id": second.headers["x-request-id"]}, headers=auth(key))
    data = (await record.json())["data"]
    assert data["cache_status"] == "hit" and data["saved_nanos"] == paid["cost_nanos"] and data["cost_nanos"] == 0
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_cache_requests_total{result="hit"} 1.0' in metrics
    assert 'gateway_cache_requests_total{result="miss"} 1.0' in metrics
    assert 'gateway_cache_saved_usd_total{surface="openai.chat"}' in metrics


async def test_hit_price_ratio_charges_a_fraction(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url, "cache: {enabled: true, hit_price_ratio: 0.5}\n")
    key = await make_key()
    paid = await (await _post(gw, key)).json()
    hit = await (await _post(gw, key)).json()
    assert hit["cost_nanos"] == paid["cost_nanos"] // 2


async def test_streams_replayed_from_a_json_answer_and_back(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    assert (await _post(gw, key)).headers["x-cache"] == "MISS"  # made as JSON
    calls = _upstream_calls(mock)
    sdk = openai.AsyncOpenAI(api_key=key, base_url=str(gw.make_url("/v1")), max_retries=0)
    stream = await sdk.chat.completions.create(model=MINI, messages=CHAT["messages"], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello there!" and _upstream_calls(mock) == calls  # replayed as a stream

    streamed = {**CHAT, "messages": [{"role": "user", "content": "Count to five"}], "stream": True}
    first = await _post(gw, key, streamed)
    assert first.headers["x-cache"] == "MISS"
    made = await first.read()
    assert made.endswith(b"data: [DONE]\n\n")
    calls = _upstream_calls(mock)
    again = await sdk.chat.completions.create(model=MINI, messages=streamed["messages"])  # as JSON this time
    assert again.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 " and _upstream_calls(mock) == calls


async def test_the_anthropic_sdk_reads_a_replayed_stream(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    sdk = anthropic.AsyncAnthropic(api_key=key, base_url=str(gw.make_url("")), max_retries=0)
    ask = {"model": CLAUDE, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    made = await sdk.messages.create(**ask)
    calls = len(claude.control.received)
    async with sdk.messages.stream(**ask) as stream:
        replayed = await stream.get_final_message()
    assert len(claude.control.received) == calls
    assert replayed.content[0].text == made.content[0].text and replayed.usage.output_tokens == made.usage.output_tokens


async def test_embeddings_are_cached_as_they_came(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    body = {"model": "openai/text-embedding-3-small", "input": "hello"}
    first = await _post(gw, key, body, "/v1/embeddings")
    second = await _post(gw, key, body, "/v1/embeddings")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert (await second.json())["data"] == (await first.json())["data"]


# -- when


async def test_no_cache_no_store_and_max_age(aiohttp_client, mock, claude, store_url, make_key, monkeypatch):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    assert (await _post(gw, key, **{"Cache-Control": "no-store"})).headers["x-cache"] == "BYPASS"
    assert (await _post(gw, key)).headers["x-cache"] == "MISS"  # no-store kept nothing
    calls = _upstream_calls(mock)
    fresh = await _post(gw, key, **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS" and _upstream_calls(mock) == calls + 1  # asked the provider again
    assert (await _post(gw, key)).headers["x-cache"] == "HIT"
    import proxy.response_cache as module

    now = module.time.time()
    monkeypatch.setattr(module.time, "time", lambda: now + 30)  # the entry is 30 s old
    assert (await _post(gw, key, **{"Cache-Control": "max-age=10"})).headers["x-cache"] == "MISS"
    assert (await _post(gw, key, **{"Cache-Control": "max-age=60"})).headers["x-cache"] == "HIT"


async def test_ttl(aiohttp_client, mock, claude, store_url, make_key, monkeypatch):
    gw = await _gateway(aiohttp_client, mock, claude, store_url, "cache: {enabled: true, ttl_s: 60, max_ttl_s: 120}\n")
    key = await make_key()
    import proxy.response_cache as module

    start = module.time.time()
    clock = {"now": start}
    monkeypatch.setattr(module.time, "time", lambda: clock["now"])
    await _post(gw, key)
    await _post(gw, key, {**CHAT, "temperature": 0}, **{"x-gateway-cache-ttl": "1000"})  # capped at 120 s
    clock["now"] = start + 59
    assert (await _post(gw, key)).headers["x-cache"] == "HIT"
    clock["now"] = start + 61
    assert (await _post(gw, key)).headers["x-cache"] == "MISS"  # expired, made again
    assert (await _post(gw, key, {**CHAT, "temperature": 0})).headers["x-cache"] == "HIT"
    clock["now"] = start + 121
    assert (await _post(gw, key, {**CHAT, "temperature": 0})).headers["x-cache"] == "MISS"


async def test_off_by_default_and_on_per_team_key_or_request(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url, "cache: {teams: {globex: true}}\n")
    acme, globex = await make_key(team="acme"), await make_key(team="globex")
    plain = await _post(gw, acme)
    assert "x-cache" not in plain.headers  # off: no cache work at all
    assert (await _post(gw, acme, **{"x-gateway-cache": "on"})).headers["x-cache"] == "MISS"  # opted in
    assert (await _post(gw, acme, **{"x-gateway-cache": "on"})).headers["x-cache"] == "HIT"
    assert (await _post(gw, globex)).headers["x-cache"] == "MISS"  # its team has it on
    assert "x-cache" not in (await _post(gw, globex, **{"x-gateway-cache": "off"})).headers
    admin = await make_key(team="acme", management=True)
    made = await (await gw.post("/v1/keys", json={"cache": True}, headers=auth(admin))).json()
    assert (await _post(gw, made["key"])).headers["x-cache"] == "HIT"  # the key's own setting; the team's entry


async def test_teams_never_share_entries_unless_global(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    acme, globex = await make_key(team="acme"), await make_key(team="globex")
    await _post(gw, acme)
    assert (await _post(gw, globex)).headers["x-cache"] == "MISS"
    shared = await _gateway(aiohttp_client, mock, claude, store_url, "cache: {enabled: true, scope: global}\n")
    await _post(shared, acme)
    assert (await _post(shared, globex)).headers["x-cache"] == "HIT"


async def test_failures_and_cut_streams_are_not_kept(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    mock.control.mode = "status"  # every try fails
    assert (await _post(gw, key)).status >= 500
    mock.control.mode = "ok"
    assert (await _post(gw, key)).headers["x-cache"] == "MISS"  # the error was not kept
    mock.control.script = ["truncate"]
    cut = await _post(gw, key, {**CHAT, "stream": True, "temperature": 1})
    await cut.read()
    again = await _post(gw, key, {**CHAT, "stream": True, "temperature": 1})
    assert again.headers["x-cache"] == "MISS"


# -- single flight


async def test_identical_requests_wait_for_the_first(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    mock.control.gate_after = 1  # the first (streamed) answer waits after its first event
    leader = await _post(gw, key, {**CHAT, "stream": True})
    await leader.content.readline()
    calls = _upstream_calls(mock)
    followers = [asyncio.create_task(_post(gw, key)) for _ in range(5)]
    done, _ = await asyncio.wait(followers, timeout=0.2)
    assert not done  # they wait for the leader rather than go upstream
    mock.control.gate.set()
    await leader.read()
    answers = await asyncio.wait_for(asyncio.gather(*followers), 10)
    assert [a.headers["x-cache"] for a in answers] == ["HIT"] * 5 and _upstream_calls(mock) == calls
    assert {(await a.json())["choices"][0]["message"]["content"] for a in answers} == {"tok0 tok1 tok2 tok3 tok4 "}


async def test_a_failed_leader_releases_its_followers(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    mock.control.gate_after = 1
    mock.control.script = ["reset_mid_stream"]
    leader = await _post(gw, key, {**CHAT, "stream": True})
    await leader.content.readline()
    follower = asyncio.create_task(_post(gw, key))
    done, _ = await asyncio.wait([follower], timeout=0.2)
    assert not done  # waiting for the leader
    mock.control.gate.set()
    await leader.read()  # its stream breaks: nothing is kept
    answer = await asyncio.wait_for(follower, 10)
    assert answer.status == 200 and answer.headers["x-cache"] == "MISS"  # it went upstream on its own


# -- Redis


async def test_two_gateways_share_a_redis_cache(aiohttp_client, mock, claude, store_url, make_key, redis_url, tmp_path):
    cache = f"cache: {{enabled: true, url: '{redis_url}', key_prefix: 'cache{next(_prefixes)}:'}}\n"
    first = await _gateway(aiohttp_client, mock, claude, store_url, cache, GATEWAY_JOURNAL_DIR=str(tmp_path / "j1"))
    second = await _gateway(aiohttp_client, mock, claude, store_url, cache, GATEWAY_JOURNAL_DIR=str(tmp_path / "j2"))
    key = await make_key()
    long = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}  # compressed in Redis
    assert (await _post(first, key, long)).headers["x-cache"] == "MISS"
    await asyncio.wait_for(asyncio.gather(*first.server.app[GATEWAY].cache._tasks), 5)  # written in the background
    calls = _upstream_calls(mock)
    hit = await _post(second, key, long)
    assert hit.headers["x-cache"] == "HIT" and _upstream_calls(mock) == calls
    assert (await hit.json())["choices"][0]["message"]["content"] == "Hello there!"


async def test_redis_down_mid_run_is_a_miss(aiohttp_client, mock, claude, store_url, make_key, redis_server, caplog):
    cache = (
        f"cache: {{enabled: true, url: '{redis_server.url}', timeout_ms: 200, key_prefix: 'down{next(_prefixes)}:'}}\n"
    )
    gw = await _gateway(aiohttp_client, mock, claude, store_url, cache)
    key = await make_key()
    assert (await _post(gw, key)).headers["x-cache"] == "MISS"
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="proxy.cache"):
        answers = [await _post(gw, key, {**CHAT, "temperature": t / 10}) for t in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.headers["x-cache"] for a in answers] == ["MISS"] * 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert (await _post(gw, key)).headers["x-cache"] == "HIT"  # this worker's own entry still serves
    metrics = await (await gw.get("/metrics")).text()
    assert "gateway_cache_errors_total" in metrics
    redis_server.start()  # for the tests after this one
