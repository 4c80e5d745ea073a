"""`POST /v1/messages/count_tokens` for every model: passed through to Anthropic, translated to Gemini's
`countTokens` and to OpenAI's `/responses/input_tokens`, refused for servers that cannot count; never billed."""

from __future__ import annotations

import anthropic
import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests import mock_anthropic, mock_gemini, mock_upstream
from tests.conftest import Claude, Gemini, Mock, auth

ASK = {
    "system": "Be brief.",
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]},
    ],
    "tools": [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ],
}


async def test_the_anthropic_sdk_counts_with_an_anthropic_model_passed_through(ant, claude: Claude) -> None:
    counted = await ant.messages.count_tokens(
        model="anthropic/claude-sonnet-4.6",
        extra_body={"meta": True},  # the gateway's own member: not passed on
        **ASK,  # type: ignore[arg-type]
    )
    assert counted.input_tokens == mock_anthropic.COUNTED_TOKENS
    sent = claude.control.last
    assert sent.path == "/v1/messages/count_tokens" and sent.headers["x-api-key"] == "sk-ant-secret"
    assert orjson.loads(sent.body) == {**ASK, "model": "claude-sonnet-4-6"}  # as asked, the model renamed


async def test_a_gemini_model_counts_through_count_tokens(ant, gemini: Gemini) -> None:
    counted = await ant.messages.count_tokens(model="google/gemini-2.5-flash", **ASK)  # type: ignore[arg-type]
    assert counted.input_tokens == mock_gemini.COUNTED_TOKENS
    sent = gemini.control.last
    assert sent.path == "/v1beta/models/gemini-2.5-flash:countTokens"
    generate = sent.body["generateContentRequest"]
    assert generate["model"] == "models/gemini-2.5-flash" and "generationConfig" not in generate
    assert generate["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [turn["role"] for turn in generate["contents"]] == ["user", "model", "user"]
    assert generate["contents"][1]["parts"][0]["functionCall"] == {"name": "get_weather", "args": {"city": "Paris"}}
    assert generate["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"


async def test_an_openai_model_counts_through_responses_input_tokens(ant, mock: Mock) -> None:
    counted = await ant.messages.count_tokens(model="openai/gpt-4o-mini", **ASK)  # type: ignore[arg-type]
    assert counted.input_tokens == mock_upstream.COUNTED_TOKENS
    sent = mock.control.last
    assert sent.path == "/v1/responses/input_tokens"
    assert orjson.loads(sent.body) == {
        "model": "gpt-4o-mini",
        "input": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "toolu_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "toolu_1", "output": "Sunny, 21 C"},
        ],
        "tools": [
            {
                "type": "function",
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
    }


async def test_a_model_whose_providers_cannot_count_gets_400_naming_them(gw: TestClient, key: str, mock: Mock) -> None:
    before = len(mock.control.received)
    r = await gw.post(
        "/v1/messages/count_tokens",
        json={"model": "groq/llama-3.3-70b-versatile", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(key),
    )
    body = await r.json()
    assert r.status == 400 and body["type"] == "error", body
    assert (
        "'groq' (openai-compatible)" in body["error"]["message"]
        and "no token-counting endpoint" in body["error"]["message"]
    )
    assert len(mock.control.received) == before  # nothing was sent


async def test_counting_is_not_billed_nor_recorded_but_is_counted_in_metrics(
    gw: TestClient, key: str, make_key
) -> None:
    manager = await make_key(management=True, credit_usd=0)  # the same team's

    async def balance() -> int:
        r = await gw.get("/v1/credits", headers=auth(manager))
        assert r.status == 200, await r.text()
        return (await r.json())["data"]["balance_nanos"]

    before = await balance()
    r = await gw.post(
        "/v1/messages/count_tokens", json={"model": "anthropic/claude-sonnet-4.6", **ASK}, headers=auth(key)
    )
    assert r.status == 200 and await r.json() == {"input_tokens": mock_anthropic.COUNTED_TOKENS}
    request_id = r.headers["x-request-id"]
    assert await balance() == before
    found = await gw.get("/v1/generations", params={"id": request_id}, headers=auth(key))
    assert found.status == 404
    metrics = await (await gw.get("/metrics")).text()
    assert any('surface="anthropic.count_tokens"' in line and 'status="200"' in line for line in metrics.splitlines())


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[]", 400, "JSON object"),
        (orjson.dumps({"model": "anthropic/claude-sonnet-4.6"}), 400, "`messages`"),
        (orjson.dumps({"model": "nope/none", "messages": []}), 404, "not configured"),
    ],
    ids=["malformed", "not-an-object", "no-messages", "unknown-model"],
)
async def test_bad_requests_get_the_anthropic_error_shape(
    gw: TestClient, key: str, body: bytes, status: int, fragment: str
) -> None:
    r = await gw.post("/v1/messages/count_tokens", data=body, headers={**auth(key), "Content-Type": "application/json"})
    answer = await r.json()
    assert r.status == status and answer["type"] == "error" and fragment in answer["error"]["message"], answer


async def test_a_bad_key_gets_401(gw: TestClient) -> None:
    r = await gw.post(
        "/v1/messages/count_tokens", json={"model": "anthropic/claude-sonnet-4.6", **ASK}, headers=auth("sk-bad")
    )
    assert r.status == 401 and (await r.json())["type"] == "error"


async def test_a_provider_refusal_keeps_its_status_and_type(ant, claude: Claude) -> None:
    claude.control.mode = "status"  # 529 overloaded_error
    with pytest.raises(anthropic.APIStatusError) as e:
        await ant.messages.count_tokens(model="anthropic/claude-sonnet-4.6", **ASK)  # type: ignore[arg-type]
    assert e.value.status_code == 529
    assert e.value.body["error"]["type"] == "overloaded_error" and "Overloaded" in e.value.body["error"]["message"]
