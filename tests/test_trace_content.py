"""What a traced request's spans say of its content: finish reasons read from the answer's bytes, and the
conventions' message attributes (`proxy.trace_content`)."""

from __future__ import annotations

import orjson

from proxy.trace_content import finish_reasons, messages


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_finish_reasons_of_each_surface():
    chat = orjson.dumps({"choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1, "finish_reason": "length"}]})
    assert finish_reasons("openai.chat", chat, False) == ("stop", "length")  # one per choice
    stream = b'data: {"choices":[{"delta":{},"finish_reason":null}]}\n\n'
    stream += b'data: {"choices":[{"delta":{},"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n'
    assert finish_reasons("openai.chat", stream, True) == ("tool_calls",)
    message = b'{"type":"message","stop_reason":"max_tokens"}'
    assert finish_reasons("anthropic.messages", message, False) == ("max_tokens",)
    whole = b'{"id":"resp_1","status":"completed","output":[{"type":"message","status":"completed"}]}'
    assert finish_reasons("openai.responses", whole, False) == ("completed",)
    cut = b'{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}'
    assert finish_reasons("openai.responses", cut, False) == ("max_output_tokens",)
    events = b'event: response.created\ndata: {"type":"response.created","response":{"status":"in_progress"}}\n\n'
    events += b'event: response.failed\ndata: {"type":"response.failed","response":{"status":"failed"}}\n\n'
    assert finish_reasons("openai.responses", events, True) == ("failed",)
    assert finish_reasons("openai.embeddings", b'{"data":[]}', False) == ()


def test_a_reason_quoted_in_a_text_is_not_read():
    body = orjson.dumps({"choices": [{"message": {"content": '"finish_reason":"evil"'}, "finish_reason": "stop"}]})
    assert finish_reasons("openai.chat", body, False) == ("stop",)


def test_tool_calls_and_their_results_in_the_conventions_shape():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    sent = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "weather?"}, image]},
                {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "weather", '{"city":"Oslo"}')]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
            ],
        }
    )
    answer = orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Take an umbrella."},
                    "finish_reason": "tool_calls",
                }
            ],
        }
    )
    found = dict(messages("openai.chat", sent, answer, False, 1000))
    call = {"type": "tool_call", "id": "call_1", "name": "weather", "arguments": {"city": "Oslo"}}
    assert orjson.loads(found["gen_ai.input.messages"]) == [
        {
            "role": "user",
            "parts": [
                {"type": "text", "content": "weather?"},
                {"type": "blob", "modality": "image", "mime_type": "image/png"},  # never the bytes
            ],
        },
        {"role": "assistant", "parts": [call]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rain"}]},
    ]
    assert orjson.loads(found["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Take an umbrella."}], "finish_reason": "tool_call"}
    ]
    assert "gen_ai.system_instructions" not in found


def test_texts_and_arguments_are_cut_to_the_limit():
    arguments = '{"long":"' + "x" * 50 + '"}'
    sent = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "abcdefghij"},
                {"role": "assistant", "tool_calls": [_call("c", "f", arguments)]},
            ],
        }
    )
    found = dict(messages("openai.chat", sent, b"not json", False, 20))
    first, second = orjson.loads(found["gen_ai.input.messages"])
    assert first["parts"][0]["content"] == "abcdefghij"
    assert second["parts"][0]["arguments"] == '{"long":"x…[truncated]'  # 10 characters left: cut as its text
    assert "gen_ai.output.messages" not in found  # an answer that cannot be read: none


def test_surfaces_without_messages_record_none():
    assert messages("openai.embeddings", b'{"input":"x"}', b'{"data":[]}', False, 100) == []
