"""Any surface to any provider, end to end: the official SDKs against the gateway, mock providers behind it
that validate what they receive as the real APIs do."""

from __future__ import annotations

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.config import load_config
from tests.conftest import DEFAULT_CONFIG, Claude, Gemini, Mock, env_for

CLAUDE = "anthropic/claude-haiku-4.5"
GPT = "openai/gpt-4o-mini"
GEMINI = "google/gemini-2.5-flash"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
async def oai(gw: TestClient, key: str):
    sdk = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=key, max_retries=0, timeout=10)
    yield sdk
    await sdk.close()


# ---------------------------------------------------------------------------------------------------------
# the openai SDK against a Claude model


async def test_openai_sdk_to_claude(oai, claude: Claude) -> None:
    completion = await oai.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        stop=["\n\n"],
        temperature=0.2,
    )
    assert completion.choices[0].message.content == "Hello from Claude!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == CLAUDE
    # input 20 + cache reads 5 + cache writes 3: OpenAI counts every prompt token
    assert completion.usage.prompt_tokens == 28 and completion.usage.completion_tokens == 7
    assert completion.usage.prompt_tokens_details.cached_tokens == 5
    sent = claude.control.last
    assert sent.headers["x-api-key"] == "sk-ant-secret" and sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers
    assert sent.json == {
        "model": "claude-haiku-4-5",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "system": [{"type": "text", "text": "Be brief."}],
        "max_tokens": 4096,
        "temperature": 0.2,
        "stop_sequences": ["\n\n"],
    }


async def test_openai_sdk_stream_helper_to_claude(oai, claude: Claude) -> None:
    claude.control.events = 4
    async with oai.chat.completions.stream(
        model=CLAUDE, messages=[{"role": "user", "content": "hi"}], stream_options={"include_usage": True}
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.total_tokens == 35
    assert claude.control.last.json["stream"] is True


async def test_openai_sdk_tools_to_claude(oai, claude: Claude) -> None:
    claude.control.mode = "tool_call"
    completion = await oai.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, orjson.loads(call.function.arguments)) == (
        "toolu_01",
        "get_weather",
        {"city": "Paris"},
    )
    sent = claude.control.last.json
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


async def test_openai_sdk_streamed_tool_call_from_claude(oai, claude: Claude) -> None:
    claude.control.mode = "tool_call"
    async with oai.chat.completions.stream(
        model=CLAUDE, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "tok0 tok1 tok2 "
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_results_and_images_reach_claude_in_its_shape(oai, claude: Claude) -> None:
    await oai.chat.completions.create(
        model=CLAUDE,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture, and the weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_9", "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL],
    )
    turns = claude.control.last.json["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    assert turns[0]["content"][2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
    assert turns[1]["content"] == [
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": [{"type": "text", "text": "Sunny, 21 C"}]}
    ]


async def test_structured_output_and_reasoning_to_claude(oai, claude: Claude) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    await oai.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        reasoning_effort="medium",
    )
    sent = claude.control.last.json
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert sent["max_tokens"] > 4096


async def test_reasoning_from_claude_reaches_openai_clients(oai, claude: Claude) -> None:
    claude.control.mode = "thinking"
    completion = await oai.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hm"}])
    message = completion.choices[0].message
    assert message.content == "Hello from Claude!"
    assert message.model_extra["reasoning_content"] == "Let me think."


async def test_parameter_claude_cannot_honour_is_named(oai, claude: Claude) -> None:
    """A parameter whose loss would change the answer (`n`, OpenAI-only `logit_bias`) is a 400 naming it."""
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hi"}], n=2)
    assert err.value.body["param"] == "n"
    assert "drop_params" in err.value.body["message"]
    assert not claude.control.received
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(
            model=CLAUDE, messages=[{"role": "user", "content": "hi"}], logit_bias={"42": 3}
        )
    assert err.value.body["param"] == "logit_bias"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_hint_claude_cannot_honour_is_dropped_and_the_answer_says_so(oai, claude: Claude, stream) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=CLAUDE,
        messages=[{"role": "user", "content": "hi"}],
        seed=7,
        presence_penalty=0.5,
        stream=stream,
        extra_body={"meta": True},
    )
    assert raw.headers["x-gateway-dropped-params"] == "seed,presence_penalty"
    answer = raw.parse()
    if stream:
        chunks = [chunk async for chunk in answer]
        meta = next(c.model_extra["meta"] for c in chunks if c.model_extra and "meta" in c.model_extra)
    else:
        meta = answer.model_extra["meta"]
    assert meta["dropped_params"] == ["seed", "presence_penalty"]
    sent = claude.control.last.json
    assert "seed" not in sent and "presence_penalty" not in sent and sent["messages"][0]["role"] == "user"


async def _claude_gateway(aiohttp_client, mock: Mock, claude: Claude, store_url: str, tmp_path, setting: str):
    """A gateway whose Anthropic provider has `setting` (a line of YAML) added."""
    text = DEFAULT_CONFIG.read_text().replace(
        "    api_key: ${ANTHROPIC_API_KEY:-}\n", f"    api_key: ${{ANTHROPIC_API_KEY:-}}\n    {setting}\n"
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    env = env_for(mock, store_url, ANTHROPIC_BASE_URL=claude.url, ANTHROPIC_API_KEY="k")
    return await aiohttp_client(build_app(load_config(path, env=env)))


async def test_strict_params_refuses_even_the_hints(
    aiohttp_client, mock: Mock, claude: Claude, store_url: str, key: str, tmp_path
) -> None:
    client = await _claude_gateway(aiohttp_client, mock, claude, store_url, tmp_path, "strict_params: true")
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "seed": 1},
        headers={"Authorization": f"Bearer {key}"},
    )
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "seed" and "strict_params" in error["message"]
    assert not claude.control.received


async def test_drop_params_lets_them_through(
    aiohttp_client, mock: Mock, claude: Claude, store_url: str, key: str, tmp_path
) -> None:
    client = await _claude_gateway(aiohttp_client, mock, claude, store_url, tmp_path, "drop_params: true")
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "seed": 1, "logit_bias": {"1": 2}},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200, await resp.text()
    assert "seed" not in claude.control.last.json


async def test_claude_errors_reach_openai_clients_in_openai_shape(oai, claude: Claude) -> None:
    claude.control.mode = "status"
    claude.control.status = 429
    claude.control.error_body = b'{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}'
    with pytest.raises(openai.RateLimitError) as err:
        await oai.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["message"] == "Anthropic: Slow down"
    assert err.value.body["type"] == "rate_limit_error"


async def test_claude_error_mid_stream_ends_the_openai_stream_with_an_error(oai, claude: Claude) -> None:
    claude.control.mode = "error_mid_stream"
    stream = await oai.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hi"}], stream=True)
    text = ""
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == "tok0 tok1 "
    assert "Overloaded" in str(err.value)


async def test_claude_stream_cut_short_ends_with_an_error(oai, claude: Claude) -> None:
    claude.control.mode = "truncate"
    stream = await oai.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


# ---------------------------------------------------------------------------------------------------------
# the anthropic SDK against an OpenAI model, and against a Claude model (pass-through)


async def test_anthropic_sdk_to_openai_model(ant, mock: Mock) -> None:
    message = await ant.messages.create(
        model=GPT,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hi"}],
        stop_sequences=["END"],
    )
    assert message.content[0].text == "Hello there!"
    assert message.stop_reason == "end_turn"
    assert message.model == GPT
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 5)
    sent = mock.control.last.json
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 100 and sent["stop"] == ["END"]


async def test_anthropic_sdk_stream_helper_to_openai_model(ant, mock: Mock) -> None:
    async with ant.messages.stream(model=GPT, max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_message()
    assert final.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5
    assert mock.control.last.json["stream_options"] == {"include_usage": True}


async def test_anthropic_sdk_tools_to_openai_model(ant, mock: Mock) -> None:
    mock.control.mode = "tool_call"
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    message = await ant.messages.create(
        model=GPT, max_tokens=50, messages=[{"role": "user", "content": "Weather?"}], tools=tools
    )
    assert message.stop_reason == "tool_use"
    block = next(b for b in message.content if b.type == "tool_use")
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})
    assert mock.control.last.json["tools"][0]["function"]["name"] == "get_weather"
    async with ant.messages.stream(
        model=GPT, max_tokens=50, messages=[{"role": "user", "content": "Weather?"}], tools=tools
    ) as stream:
        final = await stream.get_final_message()
    block = next(b for b in final.content if b.type == "tool_use")
    assert block.input == {"city": "Paris"} and final.stop_reason == "tool_use"


async def test_anthropic_sdk_to_claude_passes_bytes_through(ant, claude: Claude) -> None:
    message = await ant.messages.create(
        model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "hi"}], extra_body={"meta": True}
    )
    assert message.content[0].text == "Hello from Claude!"
    assert message.model_extra["meta"]["provider"] == "anthropic"
    sent = claude.control.last
    assert sent.json == {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    async with ant.messages.stream(
        model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "hi"}], extra_body={"meta": True}
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "tok0 tok1 tok2 "
    assert final.usage.output_tokens == 7


async def test_anthropic_sdk_errors_are_anthropic_shaped(ant, mock: Mock) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await ant.messages.create(model="no/such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"
    mock.control.mode = "status"
    mock.control.status = 429
    mock.control.error_body = b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}}'
    with pytest.raises(anthropic.RateLimitError) as err:
        await ant.messages.create(model=GPT, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["message"] == "Rate limit reached"


async def test_anthropic_sdk_bad_key_is_anthropic_shaped(gw: TestClient) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=str(gw.make_url("")), api_key="nope", max_retries=0, timeout=10)
    try:
        with pytest.raises(anthropic.AuthenticationError):
            await sdk.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    finally:
        await sdk.close()


async def test_metering_and_meta_on_a_translated_stream(oai, claude: Claude, gw: TestClient) -> None:
    stream = await oai.chat.completions.create(
        model=CLAUDE, messages=[{"role": "user", "content": "hi"}], stream=True, extra_body={"meta": True}
    )
    chunks = [chunk async for chunk in stream]
    meta = chunks[-1].model_extra["meta"]
    assert meta["provider"] == "anthropic" and meta["upstream_model"] == "claude-haiku-4-5"
    assert meta["cost_nanos"] > 0 and meta["ttft_ms"] is not None
    assert all(c.usage is None for c in chunks)  # usage was not asked for


# ---------------------------------------------------------------------------------------------------------
# Gemini behind the openai and anthropic SDKs


async def test_openai_sdk_to_gemini(oai, gemini: Gemini) -> None:
    completion = await oai.chat.completions.create(
        model=GEMINI,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=50,
        response_format={"type": "json_object"},
    )
    assert completion.choices[0].message.content == "Hello from Gemini!"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 5)
    sent = gemini.control.last
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == "gem-secret"
    assert sent.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent.body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert sent.body["generationConfig"]["maxOutputTokens"] == 50
    assert sent.body["generationConfig"]["responseMimeType"] == "application/json"


async def test_openai_sdk_stream_helper_to_gemini(oai, gemini: Gemini) -> None:
    async with oai.chat.completions.stream(
        model=GEMINI, messages=[{"role": "user", "content": "hi"}], stream_options={"include_usage": True}
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from Gemini!"
    assert final.usage is not None and final.usage.total_tokens == 14
    assert gemini.control.last.query.get("alt") == "sse"


async def test_openai_sdk_tools_to_gemini_streamed_and_not(oai, gemini: Gemini) -> None:
    gemini.control.mode = "tool_call"
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    completion = await oai.chat.completions.create(model=GEMINI, messages=messages, tools=[WEATHER_TOOL])
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, orjson.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    declarations = gemini.control.last.body["tools"][0]["functionDeclarations"]
    assert declarations[0]["name"] == "get_weather"
    async with oai.chat.completions.stream(model=GEMINI, messages=messages, tools=[WEATHER_TOOL]) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    # the result goes back as a functionResponse naming the function
    await oai.chat.completions.create(
        model=GEMINI,
        messages=[
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER_TOOL],
    )
    turns = gemini.control.last.body["contents"]
    assert [t["role"] for t in turns] == ["user", "model", "user"]
    assert turns[2]["parts"][0]["functionResponse"] == {"name": "get_weather", "response": {"temp": 21}}


async def test_anthropic_sdk_to_gemini(ant, gemini: Gemini) -> None:
    message = await ant.messages.create(model=GEMINI, max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from Gemini!"
    assert message.usage.output_tokens == 5
    async with ant.messages.stream(model=GEMINI, max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as s:
        final = await s.get_final_message()
    assert final.content[0].text == "Hello from Gemini!" and final.stop_reason == "end_turn"


async def test_gemini_errors_reach_clients_in_their_shape(oai, ant, gemini: Gemini) -> None:
    gemini.control.mode = "status"
    gemini.control.status = 429
    gemini.control.error_body = (
        b'{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}'
    )
    with pytest.raises(openai.RateLimitError) as err:
        await oai.chat.completions.create(model=GEMINI, messages=[{"role": "user", "content": "hi"}])
    assert "Resource has been exhausted" in err.value.body["message"]
    with pytest.raises(anthropic.RateLimitError) as aerr:
        await ant.messages.create(model=GEMINI, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert "Resource has been exhausted" in aerr.value.body["error"]["message"]


# ---------------------------------------------------------------------------------------------------------
# the Responses API against any model


async def test_responses_to_openai_pass_through(oai, mock: Mock) -> None:
    response = await oai.responses.create(
        model=GPT, input="hi", instructions="Be brief.", extra_body={"meta": True, "usage": True}
    )
    assert response.output_text == "Hello from Responses!"
    assert response.usage.total_tokens == 16
    assert response.model_extra["meta"]["endpoint"] == "openai.responses"
    sent = mock.control.last
    assert sent.path == "/v1/responses"
    assert sent.json == {"model": "gpt-4o-mini", "input": "hi", "instructions": "Be brief."}


async def test_responses_stream_to_openai_pass_through_carries_meta(oai, mock: Mock) -> None:
    async with oai.responses.stream(model=GPT, input="hi", extra_body={"meta": True}) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert "Hi there" in final.output_text
    assert final.model_extra["meta"]["stream"] is True
    assert final.model_extra["cost_nanos"] > 0


async def test_responses_to_claude(oai, claude: Claude) -> None:
    response = await oai.responses.create(model=CLAUDE, input="hi", instructions="Be brief.", max_output_tokens=64)
    assert response.output_text == "Hello from Claude!"
    assert response.status == "completed"
    assert response.usage.input_tokens == 28 and response.usage.input_tokens_details.cached_tokens == 5
    sent = claude.control.last.json
    assert sent["system"] == [{"type": "text", "text": "Be brief."}] and sent["max_tokens"] == 64


async def test_responses_stream_and_tools_to_claude(oai, claude: Claude) -> None:
    claude.control.mode = "tool_call"
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}]
    async with oai.responses.stream(model=CLAUDE, input="Weather in Paris?", tools=tools) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert call.name == "get_weather" and orjson.loads(call.arguments) == {"city": "Paris"}
    assert final.output_text == "tok0 tok1 tok2 "
    # the call's result goes back as a tool_result
    await oai.responses.create(
        model=CLAUDE,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"},
        ],
        tools=tools,
    )
    turns = claude.control.last.json["messages"]
    assert turns[1]["content"][0]["type"] == "tool_use" and turns[2]["content"][0]["type"] == "tool_result"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_translated_response_echoes_what_was_asked(oai, claude: Claude, stream: bool) -> None:
    """As OpenAI's own Response object does: tools, tool_choice, reasoning, text, sampling, limits, instructions."""
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}]
    asked = {
        "instructions": "Be brief.",
        "max_output_tokens": 2000,
        "temperature": 0.5,
        "top_p": 0.9,
        "tools": tools,
        "tool_choice": "auto",
        "reasoning": {"effort": "low"},
        "text": {"format": {"type": "text"}},
        "metadata": {"run": "7"},
    }
    if stream:
        async with oai.responses.stream(model=CLAUDE, input="hi", **asked) as events:
            seen = [event async for event in events]
            final = await events.get_final_response()
        created = next(e.response for e in seen if e.type == "response.created")
        responses = [created, final]
    else:
        responses = [await oai.responses.create(model=CLAUDE, input="hi", **asked)]
    for response in responses:
        assert response.instructions == "Be brief." and response.max_output_tokens == 2000
        assert (response.temperature, response.top_p, response.tool_choice) == (0.5, 0.9, "auto")
        assert [tool.name for tool in response.tools] == ["get_weather"]
        assert response.reasoning is not None and response.reasoning.effort == "low"
        assert response.text is not None and response.text.format.type == "text"
        assert response.metadata == {"run": "7"}


async def test_responses_to_a_chat_only_provider_and_to_gemini(
    aiohttp_client, mock: Mock, gemini: Gemini, store_url: str, key: str
) -> None:
    env = env_for(mock, store_url, GROQ_BASE_URL=mock.url, GEMINI_BASE_URL=gemini.url, GEMINI_API_KEY="g")
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0, timeout=10)
    try:
        response = await sdk.responses.create(model="groq/llama-3.1-8b-instant", input="hi")
        assert response.output_text == "Hello there!"
        assert mock.control.last.path == "/v1/chat/completions"  # OpenAI-compatible: translated to chat
        async with sdk.responses.stream(model=GEMINI, input="hi") as stream:
            final = await stream.get_final_response()
        assert final.output_text == "Hello from Gemini!"
    finally:
        await sdk.close()


async def test_previous_response_id_is_a_clear_400_for_other_providers(oai) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await oai.responses.create(model=CLAUDE, input="and then?", previous_response_id="resp_1")
    assert err.value.body["param"] == "previous_response_id"


# ---------------------------------------------------------------------------------------------------------
# echo_upstream_request and debug


async def test_echo_upstream_request_shows_the_translation_with_credentials_redacted(
    gw: TestClient, key: str, claude: Claude
) -> None:
    resp = await gw.post(
        "/v1/chat/completions",
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "echo_upstream_request": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    text = await resp.text()
    assert resp.status == 200, text
    assert "sk-ant-secret" not in text
    echoed = orjson.loads(text)["upstream_request"]
    assert echoed["url"] == f"{claude.url}/v1/messages" and echoed["method"] == "POST"
    assert echoed["headers"]["x-api-key"] == "[redacted]"
    assert echoed["headers"]["anthropic-version"] == "2023-06-01"
    assert echoed["body"] == claude.control.last.json
    assert "upstream_response" not in orjson.loads(text)


async def test_debug_returns_what_the_provider_answered(gw: TestClient, key: str, claude: Claude) -> None:
    debug = {"return_upstream_request": True, "return_upstream_response": True}
    resp = await gw.post(
        "/v1/chat/completions",
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "debug": debug},
        headers={"Authorization": f"Bearer {key}"},
    )
    body = await resp.json()
    assert body["upstream_response"]["status"] == 200
    assert body["upstream_response"]["body"]["content"][0]["text"] == "Hello from Claude!"
    assert body["upstream_request"]["body"]["model"] == "claude-haiku-4-5"
    # streamed: the raw provider events ride in the final chunk
    resp = await gw.post(
        "/v1/chat/completions",
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "stream": True, "debug": debug},
        headers={"Authorization": f"Bearer {key}"},
    )
    events = [line[6:] for line in (await resp.text()).split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = orjson.loads(events[-2])
    assert "event: message_start" in final["upstream_response"]["events"]
    assert final["upstream_request"]["headers"]["x-api-key"] == "[redacted]"


async def test_debug_with_a_wrong_type_is_a_400(gw: TestClient, key: str) -> None:
    resp = await gw.post(
        "/v1/chat/completions",
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "debug": "yes"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "debug"
