"""The official `openai` SDK pointed at the gateway (base_url = the gateway), as users will run it."""

from __future__ import annotations

import openai
import pytest

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(gateway, key):
    sdk = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0, timeout=10)
    yield sdk
    await sdk.close()


async def test_sdk_chat(client, mock):
    completion = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there!"
    assert completion.usage is not None and completion.usage.total_tokens == 16
    assert mock.control.last.json["model"] == "gpt-4o-mini"


async def test_sdk_chat_with_meta_via_extra_body(client):
    completion = await client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, extra_body={"meta": True}
    )
    meta = completion.model_extra["meta"]
    assert meta["provider"] == "openai" and meta["latency_ms"] > 0


async def test_sdk_stream(client):
    stream = await client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"meta": True},
    )
    text, usage, meta = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
        meta = (chunk.model_extra or {}).get("meta", meta)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert usage is not None and usage.completion_tokens == 5
    assert meta is not None and meta["stream"] is True and meta["ttft_ms"] is not None


async def test_sdk_stream_helper_accumulates(client):
    async with client.chat.completions.stream(model="openai/gpt-4o-mini", messages=MESSAGES) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "


async def test_sdk_embeddings(client):
    result = await client.embeddings.create(model="openai/text-embedding-3-small", input="hello")
    assert result.data[0].embedding == [0.1, 0.2, 0.3]


async def test_sdk_raises_its_usual_errors(gateway, client):
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="nope/nothing", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    bad = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    await bad.close()


async def test_sdk_raises_on_a_stream_that_breaks(client, mock):
    mock.control.mode = "truncate"
    stream = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="closed the stream before it finished"):
        async for _ in stream:
            pass
