"""Guardrails end to end: policies of the config, a team and a key, on every surface; block, redact and log on
requests and answers, streamed or not; max_tokens, prompt size, models; webhooks that answer, are slow, down
or talk nonsense. The checks themselves are tests/test_guardrail_detect.py's."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import ConfigError, GatewayConfig, load_config
from proxy.gateway import GATEWAY
from tests.conftest import DEFAULT_CONFIG, auth, env_for

MINI = "openai/gpt-4o-mini"
CLAUDE = "anthropic/claude-sonnet-4.6"
CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
PROMPT = f"Charge {CARD} and mail the receipt to {EMAIL}, thanks"

POLICIES = """
guardrails:
  policies:
    pii_redact: {check: pii, action: redact}
    pii_block: {check: pii, action: block, kinds: [CARD]}
    pii_log: {check: pii, action: log}
    secrets: {check: secrets, action: block}
    ceiling: {check: max_tokens, max: 100, action: clamp}
    ceiling_block: {check: max_tokens, max: 100, action: block}
    small: {check: prompt_tokens, max: 10, action: block}
    no_opus: {check: models, deny: [openai/gpt-4o]}
    answer_redact: {check: regex, patterns: {greeting: 'Hello there'}, stage: response, action: redact}
    answer_block: {check: regex, patterns: {greeting: 'Hello there'}, stage: response, action: block}
    stream_log: {check: regex, patterns: {tokens: 'tok2 tok3'}, stage: response, action: block}
"""


async def _gateway(aiohttp_client, mock, claude, store_url, extra: str = "", default: str = "") -> TestClient:
    text = DEFAULT_CONFIG.read_text() + POLICIES + extra + (f"  default: [{default}]\n" if default else "")
    env = env_for(mock, store_url, ANTHROPIC_BASE_URL=claude.url, ANTHROPIC_API_KEY="sk-ant-secret")
    return await aiohttp_client(build_app(config_from(text, store_url, env)))


def config_from(text: str, store_url: str, env: dict[str, str]) -> GatewayConfig:
    """`text` as the config file (beside the test's store; the prices by their absolute path)."""
    file = Path(store_url.removeprefix("sqlite:///")).parent / "gateway.yaml"
    file.write_text(text + f"pricing: {{file: {DEFAULT_CONFIG.parent / 'pricing.yaml'}}}\n")
    return load_config(file, env=env)


async def _key(gw: TestClient, make_key, policies: list[str]) -> str:
    admin = await make_key(management=True)
    made = await gw.post("/v1/keys", json={"name": "guarded", "guardrails": policies}, headers=auth(admin))
    assert made.status == 200, await made.text()
    return (await made.json())["key"]


def _chat(content: str = PROMPT, **extra) -> dict:
    return {"model": MINI, "messages": [{"role": "user", "content": content}], **extra}


async def _record(gw: TestClient, key: str, request_id: str) -> dict:
    await asyncio.wait_for(gw.server.app[GATEWAY].accountant.flush(), 10)
    answer = await gw.get("/v1/generations", params={"id": request_id}, headers=auth(key))
    return (await answer.json())["data"]


async def test_no_policy_means_no_guardrail_work(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await make_key()
    r = await gw.post("/v1/chat/completions", json=_chat(), headers=auth(key))
    assert r.status == 200 and mock.control.last.json["messages"][0]["content"] == PROMPT
    assert gw.server.app[GATEWAY].guardrails.of(await _key_record(gw, key)) == ()


async def _key_record(gw: TestClient, key: str):
    return await gw.server.app[GATEWAY].keys.authenticate(key)


async def test_redact_shows_the_provider_placeholders_and_changes_nothing_else(
    aiohttp_client, mock, claude, store_url, make_key
):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["pii_redact"])
    body = orjson.dumps(_chat(temperature=0.25, user="u-7", metadata={"ticket": "T-1"}))
    r = await gw.post("/v1/chat/completions", data=body, headers={**auth(key), "Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    sent = mock.control.last.body
    expected = body.replace(CARD.encode(), b"[CARD]").replace(EMAIL.encode(), b"[EMAIL]")
    assert sent == expected.replace(b'"openai/gpt-4o-mini"', b'"gpt-4o-mini"')  # byte for byte, but the model
    record = await _record(gw, key, r.headers["x-request-id"])
    assert record["guardrails"] == [
        {"policy": "pii_redact", "stage": "request", "action": "redact", "kinds": {"CARD": 1, "EMAIL": 1}}
    ]
    assert CARD not in orjson.dumps(record).decode() and EMAIL not in orjson.dumps(record).decode()
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_guardrail_matches_total{action="redact",policy="pii_redact",stage="request"} 1.0' in metrics


async def test_a_client_that_escapes_differently_is_still_redacted(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["pii_redact"])
    body = orjson.dumps(_chat()).replace(b"@", b"\\u0040")  # JSON's other spelling of the same text
    r = await gw.post("/v1/chat/completions", data=body, headers={**auth(key), "Content-Type": "application/json"})
    assert r.status == 200
    assert mock.control.last.json["messages"][0]["content"] == "Charge [CARD] and mail the receipt to [EMAIL], thanks"


async def test_block_names_the_policy_never_the_text(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["pii_block"])
    before = len(mock.control.received)
    r = await gw.post("/v1/chat/completions", json=_chat(), headers=auth(key))
    error = (await r.json())["error"]
    assert r.status == 400 and error["code"] == "guardrail_blocked"
    assert "'pii_block'" in error["message"] and "1 CARD" in error["message"] and CARD not in error["message"]
    assert len(mock.control.received) == before  # the provider never saw it
    record = await _record(gw, key, r.headers["x-request-id"])
    assert record["error_code"] == "guardrail_blocked" and record["cost_nanos"] == 0
    assert record["guardrails"] == [
        {"policy": "pii_block", "stage": "request", "action": "block", "kinds": {"CARD": 1}}
    ]
    # an email alone is not what this policy looks for
    assert (await gw.post("/v1/chat/completions", json=_chat(f"mail {EMAIL}"), headers=auth(key))).status == 200
    # a 16-digit number that fails the Luhn check is not a card
    assert (await gw.post("/v1/chat/completions", json=_chat("4111 1111 1111 1112"), headers=auth(key))).status == 200


async def test_log_lets_the_request_through_as_it_was(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["pii_log"])
    r = await gw.post("/v1/chat/completions", json=_chat(meta=True), headers=auth(key))
    assert r.status == 200 and mock.control.last.json["messages"][0]["content"] == PROMPT
    logged = [{"policy": "pii_log", "stage": "request", "action": "log", "kinds": {"CARD": 1, "EMAIL": 1}}]
    assert (await r.json())["meta"]["guardrails"] == logged
    assert (await _record(gw, key, r.headers["x-request-id"]))["guardrails"] == logged


@pytest.mark.parametrize("stream", [False, True])
async def test_every_surface_is_covered_by_one_policy(aiohttp_client, mock, claude, store_url, make_key, stream):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["pii_redact"])
    tool_result = f"the customer's card is {CARD}"
    chat = {
        "model": MINI,
        "stream": stream,
        "messages": [
            {"role": "system", "content": f"Escalate to {EMAIL}"},
            {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
            {"role": "assistant", "tool_calls": [_call()]},
            {"role": "tool", "tool_call_id": "call_1", "content": tool_result},
        ],
    }
    r = await gw.post("/v1/chat/completions", json=chat, headers=auth(key))
    assert r.status == 200 and await r.read()
    sent = mock.control.last.body.decode()
    assert CARD not in sent and EMAIL not in sent and sent.count("[CARD]") == 2 and "[EMAIL]" in sent

    messages = {
        "model": CLAUDE,
        "max_tokens": 50,
        "stream": stream,
        "system": f"Escalate to {EMAIL}",
        "messages": [
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": tool_result}]},
        ],
    }
    r = await gw.post("/v1/messages", json=messages, headers=auth(key))
    assert r.status == 200, await r.text()
    await r.read()
    sent = claude.control.last.body.decode()
    assert CARD not in sent and EMAIL not in sent and sent.count("[CARD]") == 2

    responses = {"model": MINI, "stream": stream, "instructions": f"Escalate to {EMAIL}", "input": PROMPT}
    r = await gw.post("/v1/responses", json=responses, headers=auth(key))
    assert r.status == 200, await r.text()
    await r.read()
    sent = mock.control.last.body.decode()
    assert CARD not in sent and EMAIL not in sent and "[CARD]" in sent and "[EMAIL]" in sent

    if not stream:
        embed = {"model": "openai/text-embedding-3-small", "input": [PROMPT, "nothing here"]}
        r = await gw.post("/v1/embeddings", json=embed, headers=auth(key))
        assert r.status == 200
        assert mock.control.last.json["input"] == [
            "Charge [CARD] and mail the receipt to [EMAIL], thanks",
            "nothing here",
        ]


def _call() -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "order"}'}}


async def test_team_and_default_policies_apply_with_the_keys_own(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url, "  teams:\n    globex: [secrets]\n", "pii_log")
    acme, globex = await make_key(team="acme"), await make_key(team="globex")
    secret = "use sk-proj-" + "a1B2" * 12 + " for it"
    assert (await gw.post("/v1/chat/completions", json=_chat(secret), headers=auth(acme))).status == 200
    refused = await gw.post("/v1/chat/completions", json=_chat(secret), headers=auth(globex))
    assert refused.status == 400 and "'secrets'" in (await refused.json())["error"]["message"]
    r = await gw.post("/v1/chat/completions", json=_chat(meta=True), headers=auth(acme))
    assert [f["policy"] for f in (await r.json())["meta"]["guardrails"]] == ["pii_log"]  # the default one


async def test_max_tokens_clamped_or_blocked(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    clamped = await _key(gw, make_key, ["ceiling"])
    assert (
        await gw.post("/v1/chat/completions", json=_chat("hi", max_tokens=5000), headers=auth(clamped))
    ).status == 200
    assert mock.control.last.json["max_tokens"] == 100
    await gw.post("/v1/chat/completions", json=_chat("hi", max_completion_tokens=50), headers=auth(clamped))
    assert mock.control.last.json["max_completion_tokens"] == 50 and "max_tokens" not in mock.control.last.json
    await gw.post("/v1/chat/completions", json=_chat("hi"), headers=auth(clamped))
    assert mock.control.last.json["max_tokens"] == 100  # none named: the ceiling is set
    blocked = await _key(gw, make_key, ["ceiling_block"])
    r = await gw.post("/v1/chat/completions", json=_chat("hi", max_tokens=5000), headers=auth(blocked))
    assert r.status == 400 and "max_tokens 5000 is over its ceiling of 100" in (await r.json())["error"]["message"]
    assert (await gw.post("/v1/chat/completions", json=_chat("hi", max_tokens=80), headers=auth(blocked))).status == 200


async def test_prompt_size_and_models(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["small", "no_opus"])
    assert (await gw.post("/v1/chat/completions", json=_chat("short"), headers=auth(key))).status == 200
    r = await gw.post("/v1/chat/completions", json=_chat("x" * 400), headers=auth(key))
    assert r.status == 400 and "about 100 tokens is over 10" in (await r.json())["error"]["message"]
    r = await gw.post("/v1/chat/completions", json={**_chat("hi"), "model": "openai/gpt-4o"}, headers=auth(key))
    assert r.status == 400 and "'openai/gpt-4o' is not allowed" in (await r.json())["error"]["message"]


async def test_answers_redacted_or_withheld(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["answer_redact"])
    r = await gw.post("/v1/chat/completions", json=_chat("hi"), headers=auth(key))
    assert (await r.json())["choices"][0]["message"]["content"] == "[GREETING]!"
    blocked = await _key(gw, make_key, ["answer_block"])
    r = await gw.post("/v1/chat/completions", json=_chat("hi"), headers=auth(blocked))
    error = (await r.json())["error"]
    assert (
        r.status == 400
        and error["code"] == "guardrail_blocked"
        and "answer to this request was withheld" in error["message"]
    )
    record = await _record(gw, blocked, r.headers["x-request-id"])
    assert record["cost_nanos"] > 0  # the provider made the answer: it is paid for, though withheld


async def test_a_streamed_answer_is_logged_not_cut(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["stream_log"])  # `block` on a stream: logged (the events are out already)
    r = await gw.post("/v1/chat/completions", json=_chat("hi", stream=True), headers=auth(key))
    body = await r.read()
    assert r.status == 200 and body.endswith(b"data: [DONE]\n\n") and b"tok2" in body
    record = await _record(gw, key, r.headers["x-request-id"])
    assert record["guardrails"] == [
        {"policy": "stream_log", "stage": "response", "action": "log", "kinds": {"TOKENS": 1}}  # across two events
    ]


# -- webhooks


class Hook:
    """A guardrail service: answers `verdict` (or misbehaves as `mode` says) and keeps what it was sent."""

    def __init__(self) -> None:
        self.mode = "ok"  # ok | slow | garbage | status
        self.flagged = False
        self.received: list[dict] = []
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        if self.mode == "slow":
            await self.release.wait()
        if self.mode == "garbage":
            return web.Response(text="<html>oops</html>")
        if self.mode == "status":
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"flagged": self.flagged, "reason": "toxic" if self.flagged else ""})


@pytest.fixture
async def hook(aiohttp_server):
    service = Hook()
    app = web.Application()
    app.router.add_post("/check", service.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    service.url = str(server.make_url("/check"))  # type: ignore[attr-defined]
    yield service
    service.release.set()


def _hooks(url: str) -> str:
    return (
        f"    hook_open: {{check: webhook, url: '{url}', timeout_ms: 300, action: block}}\n"
        f"    hook_closed: {{check: webhook, url: '{url}', timeout_ms: 300, action: block, on_error: closed}}\n"
        f"    hook_log: {{check: webhook, url: '{url}', action: log, stage: both}}\n"
    )


async def test_a_webhook_sees_the_redacted_texts_and_may_block(aiohttp_client, mock, claude, store_url, make_key, hook):
    gw = await _gateway(aiohttp_client, mock, claude, store_url, _hooks(hook.url))
    key = await _key(gw, make_key, ["pii_redact", "hook_open"])
    r = await gw.post("/v1/chat/completions", json=_chat(), headers=auth(key))
    assert r.status == 200
    sent = hook.received[-1]
    assert sent["texts"] == ["Charge [CARD] and mail the receipt to [EMAIL], thanks"]  # after the redaction
    assert sent["policy"] == "hook_open" and sent["stage"] == "request" and sent["model"] == MINI
    hook.flagged = True
    r = await gw.post("/v1/chat/completions", json=_chat(), headers=auth(key))
    assert r.status == 400 and "'hook_open': toxic" in (await r.json())["error"]["message"]


async def test_a_webhook_logs_answers_too(aiohttp_client, mock, claude, store_url, make_key, hook):
    gw = await _gateway(aiohttp_client, mock, claude, store_url, _hooks(hook.url))
    key = await _key(gw, make_key, ["hook_log"])
    hook.flagged = True
    r = await gw.post("/v1/chat/completions", json=_chat("hi", meta=True), headers=auth(key))
    assert r.status == 200
    assert [(f["stage"], f["action"]) for f in (await r.json())["meta"]["guardrails"]] == [
        ("request", "log"),
        ("response", "log"),
    ]
    assert hook.received[-1]["stage"] == "response" and "Hello there!" in hook.received[-1]["texts"]


@pytest.mark.parametrize("mode", ["slow", "garbage", "status", "down"])
async def test_a_failing_webhook_is_open_or_closed(
    aiohttp_client, mock, claude, store_url, make_key, hook, caplog, mode
):
    url = "http://127.0.0.1:9/check" if mode == "down" else hook.url  # port 9 (discard): nothing listens
    gw = await _gateway(aiohttp_client, mock, claude, store_url, _hooks(url))
    hook.mode = mode
    open_key = await _key(gw, make_key, ["hook_open"])
    closed_key = await _key(gw, make_key, ["hook_closed"])
    with caplog.at_level(logging.WARNING, logger="proxy.guardrails"):
        started = asyncio.get_running_loop().time()
        r = await gw.post("/v1/chat/completions", json=_chat(meta=True), headers=auth(open_key))
        assert r.status == 200  # open: it goes on unchecked
        assert asyncio.get_running_loop().time() - started < 5  # bounded by timeout_ms, not by the service
        finding = (await r.json())["meta"]["guardrails"][0]
        assert finding["policy"] == "hook_open" and finding["action"] == "error" and finding["reason"]
        r = await gw.post("/v1/chat/completions", json=_chat(), headers=auth(closed_key))
        assert r.status == 503 and "'hook_closed' could not check" in (await r.json())["error"]["message"]
    assert "guardrail 'hook_open': the webhook" in caplog.text
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_guardrail_errors_total{policy="hook_open"} 1.0' in metrics


def test_policy_errors_name_their_place(tmp_path):
    cases = [
        ("    p: {check: pii, action: clamp}\n", r"policies\.p\.action: expected one of block, redact, log"),
        ("    p: {check: pii, kinds: [EMAIL, SHOE]}\n", r"policies\.p\.kinds\[1\]: expected one of EMAIL"),
        ("    p: {check: regex, patterns: {x: 'a('}}\n", r"policies\.p\.patterns: .*x"),
        ("    p: {check: models, deny: [openai/gpt-9]}\n", r"policies\.p\.deny\[0\]: unknown model"),
        ("    p: {check: max_tokens, stage: response, max: 5}\n", r"policies\.p\.stage: a max_tokens check runs on"),
        ("    p: {check: webhook, url: ftp://x}\n", r"policies\.p\.url: expected an http"),
        ("    p: {check: pii}\n  default: [q]\n", r"guardrails\.default\[0\]: unknown policy 'q'"),
    ]
    for policy, error in cases:
        config = tmp_path / "gateway.yaml"
        config.write_text(DEFAULT_CONFIG.read_text() + "\nguardrails:\n  policies:\n" + policy)
        with pytest.raises(ConfigError, match=error):
            load_config(config, env={})


async def test_a_speech_input_is_checked(aiohttp_client, mock, claude, store_url, make_key):
    gw = await _gateway(aiohttp_client, mock, claude, store_url)
    key = await _key(gw, make_key, ["pii_redact"])
    speech = {"model": "openai/gpt-4o-mini-tts", "input": f"Call me at {EMAIL}", "voice": "alloy"}
    r = await gw.post("/v1/audio/speech", json=speech, headers=auth(key))
    assert r.status == 200 and await r.read()
    assert mock.control.last.json["input"] == "Call me at [EMAIL]"
