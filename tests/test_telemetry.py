"""OpenTelemetry traces against a real OTLP/HTTP receiver (an aiohttp server on 127.0.0.1 decoding the protobuf
with `opentelemetry-proto`): a plain, a streamed, a translated and a retried-then-fallen-back request; the
incoming traceparent as parent and the upstream's traceparent; a collector that is down."""

from __future__ import annotations

import asyncio
import base64
import functools

import msgspec
import orjson
import pytest
from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.app import build_app
from proxy.auth import split_key
from proxy.config import GatewayConfig, ProviderConfig, Target, TelemetryConfig, TracesConfig, load_config
from proxy.gateway import GATEWAY
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for
from tests.mock_upstream import MockControl, build_mock
from tests.test_guardrails import config_from

MINI = "openai/gpt-4o-mini"
CHAT = {"model": MINI, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "temperature": 0.2}


class Receiver:
    """An OTLP/HTTP traces endpoint that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, Span]] = []  # (resource attributes, span)
        self.content_types: list[str] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.content_types.append(request.content_type)
        message = ExportTraceServiceRequest()
        if request.content_type == "application/json":  # OTLP/JSON: ids in hex, the rest proto3's JSON mapping
            data = orjson.loads(body)
            for resource_spans in data["resourceSpans"]:
                for scope_spans in resource_spans["scopeSpans"]:
                    for span in scope_spans["spans"]:
                        for name in ("traceId", "spanId", "parentSpanId"):
                            if name in span:
                                span[name] = base64.b64encode(bytes.fromhex(span[name])).decode()
            json_format.ParseDict(data, message)
        else:
            message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(resource, span) for span in scope_spans.spans]
        self.arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def trace(self, trace_id: str, count: int) -> list[Span]:
        """The spans of one trace, once `count` have arrived (bounded wait)."""
        async with asyncio.timeout(10):
            while True:
                found = [s for _, s in self.spans if s.trace_id.hex() == trace_id]
                if len(found) >= count:
                    return found
                self.arrived.clear()
                await self.arrived.wait()


def _attributes(pairs) -> dict:
    out = {}
    for kv in pairs:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = (
            list(v.string_value for v in value.array_value.values) if kind == "array_value" else getattr(value, kind)
        )
    return out


@pytest.fixture
async def receiver(aiohttp_server):
    collector = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    collector.url = str(server.make_url("/v1/traces"))  # type: ignore[attr-defined]
    return collector


def _traced(config: GatewayConfig, endpoint: str, **traces) -> GatewayConfig:
    telemetry = TelemetryConfig(traces=TracesConfig(enabled=True, endpoint=endpoint, **traces))
    return msgspec.structs.replace(config, telemetry=telemetry)


async def _gateway(aiohttp_client, config: GatewayConfig):
    client = await aiohttp_client(build_app(config))
    return client


def _by_kind(spans: list[Span]) -> tuple[Span, list[Span]]:
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert len(servers) == 1, spans
    clients = sorted((s for s in spans if s.kind == Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
    return servers[0], clients


@pytest.mark.parametrize("protocol", ["http/json", "http/protobuf"])
async def test_a_plain_request_is_one_server_and_one_client_span(
    aiohttp_client, mock, store_url, key, receiver, protocol
):
    config = _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url, protocol=protocol)
    gw = await _gateway(aiohttp_client, config)
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {**auth(key), "traceparent": f"00-{parent_trace}-{parent_span}-01", "tracestate": "vendor=x"}
    r = await gw.post("/v1/chat/completions", json={**CHAT, "meta": True}, headers=headers)
    assert r.status == 200
    assert (await r.json())["meta"]["trace_id"] == parent_trace
    upstream = mock.control.last.headers
    assert upstream["traceparent"].startswith(f"00-{parent_trace}-") and upstream["tracestate"] == "vendor=x"
    server, clients = _by_kind(await receiver.trace(parent_trace, 2))
    assert server.name == f"chat {MINI}" and server.parent_span_id.hex() == parent_span
    attributes = _attributes(server.attributes)
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == MINI and attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.request.max_tokens"] == 50 and attributes["gen_ai.request.temperature"] == 0.2
    assert attributes["gen_ai.usage.input_tokens"] == 11 and attributes["gen_ai.usage.output_tokens"] == 5
    assert attributes["http.response.status_code"] == 200 and attributes["gateway.attempts"] == 1
    kid, secret = split_key(key)  # type: ignore[misc]
    assert attributes["gateway.cost_nanos"] > 0 and attributes["gateway.key_id"] == kid
    assert all(secret not in str(value) for value in attributes.values())  # never the secret
    assert "error.type" not in attributes
    (client,) = clients
    assert client.parent_span_id == server.span_id
    assert upstream["traceparent"] == f"00-{parent_trace}-{client.span_id.hex()}-01"  # the attempt's own span
    assert _attributes(client.attributes)["server.address"] == "127.0.0.1"
    assert server.start_time_unix_nano <= client.start_time_unix_nano <= client.end_time_unix_nano
    assert client.end_time_unix_nano <= server.end_time_unix_nano
    resource = next(res for res, s in receiver.spans if s.span_id == server.span_id)
    assert resource["service.name"] == "stats-gateway"
    expected = "application/json" if protocol == "http/json" else "application/x-protobuf"
    assert set(receiver.content_types) == {expected}
    # http/json is sent by the worker itself; protobuf is made and sent by the exporter process
    assert (gw.server.app[GATEWAY].tracer._proc is None) == (protocol == "http/json")


async def test_a_stream_has_its_first_token_event(aiohttp_client, mock, store_url, key, receiver):
    gw = await _gateway(
        aiohttp_client, _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url)
    )
    r = await gw.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    await r.read()
    trace_id = mock.control.last.headers["traceparent"].split("-")[1]
    server, _ = _by_kind(await receiver.trace(trace_id, 2))
    (event,) = [e for e in server.events if e.name == "gen_ai.first_token"]
    assert server.start_time_unix_nano < event.time_unix_nano < server.end_time_unix_nano


async def test_a_translated_request(aiohttp_client, gw_config_with_claude, claude, key, receiver):
    gw = await _gateway(aiohttp_client, _traced(gw_config_with_claude, receiver.url))
    body = {"model": "anthropic/claude-sonnet-4.6", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    r = await gw.post("/v1/chat/completions", json=body, headers=auth(key))
    assert r.status == 200
    trace_id = claude.control.last.headers["traceparent"].split("-")[1]
    server, (client,) = _by_kind(await receiver.trace(trace_id, 2))
    assert _attributes(server.attributes)["gen_ai.provider.name"] == "anthropic"
    assert _attributes(client.attributes)["gen_ai.provider.name"] == "anthropic"


@pytest.fixture
def gw_config_with_claude(mock, claude, store_url) -> GatewayConfig:
    env = env_for(mock, store_url, ANTHROPIC_BASE_URL=claude.url, ANTHROPIC_API_KEY="sk-ant-x")
    return load_config(DEFAULT_CONFIG, env=env)


@pytest.fixture
async def backup(aiohttp_server) -> Mock:
    control = MockControl()
    server = await aiohttp_server(build_mock(control), host="127.0.0.1")
    return Mock(url=str(server.make_url("/v1")), control=control)


async def test_retries_and_a_fallback_are_each_a_client_span(aiohttp_client, mock, backup, store_url, key, receiver):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.providers["backup"] = ProviderConfig(kind="openai-compatible", base_url=backup.url, api_key="sk-b")
    config.models[MINI].targets.append(Target(provider="backup", model="backup-mini"))
    config.models[MINI].backoff_s = 0.01
    gw = await _gateway(aiohttp_client, _traced(config, receiver.url))
    mock.control.mode, mock.control.status = "status", 503
    r = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 200
    trace_id = backup.control.last.headers["traceparent"].split("-")[1]
    server, clients = _by_kind(await receiver.trace(trace_id, 4))
    assert [_attributes(c.attributes)["http.response.status_code"] for c in clients] == [503, 503, 200]
    assert [_attributes(c.attributes)["gen_ai.provider.name"] for c in clients] == ["openai", "openai", "backup"]
    assert [c.status.code for c in clients][:2] == [2, 2]  # STATUS_CODE_ERROR
    assert {c.parent_span_id for c in clients} == {server.span_id}
    assert len({c.span_id for c in clients}) == 3
    assert _attributes(server.attributes)["gateway.attempts"] == 3
    sent = [m.headers["traceparent"].split("-")[2] for m in mock.control.received[-2:]]
    assert sent == [c.span_id.hex() for c in clients[:2]]  # each try carried its own span


async def test_an_unsampled_parent_is_not_traced_and_sampling(aiohttp_client, mock, store_url, key, receiver):
    config = _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url, sample_ratio=0.0)
    gw = await _gateway(aiohttp_client, config)
    unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    r = await gw.post(
        "/v1/chat/completions", json={**CHAT, "meta": True}, headers={**auth(key), "traceparent": unsampled}
    )
    assert "trace_id" not in (await r.json())["meta"] and "traceparent" not in mock.control.last.headers
    r = await gw.post("/v1/chat/completions", json={**CHAT, "meta": True}, headers=auth(key))  # ratio 0
    assert "trace_id" not in (await r.json())["meta"]
    sampled = unsampled[:-2] + "01"
    r = await gw.post(
        "/v1/chat/completions", json={**CHAT, "meta": True}, headers={**auth(key), "traceparent": sampled}
    )
    assert (await r.json())["meta"]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"  # the caller decided


async def test_a_collector_that_is_down_costs_no_request(aiohttp_client, mock, store_url, key):
    config = _traced(
        load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), "http://127.0.0.1:9/v1/traces", timeout_s=0.5
    )
    gw = await _gateway(aiohttp_client, config)
    answers = [await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key)) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    tracer = gw.server.app[GATEWAY].tracer
    await tracer.close(10)  # the exporter process gives up on the collector, and says what it lost
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_trace_spans_dropped_total{reason="export_failed"}' in metrics


def test_on_without_the_extra_names_the_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name.startswith("opentelemetry"):
            raise ImportError(name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    from proxy.telemetry import Tracer

    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[otel\]'"):
        Tracer(TracesConfig(enabled=True))


async def test_finish_reasons_whole_and_streamed(aiohttp_client, gw_config_with_claude, claude, key, receiver):
    gw = await _gateway(aiohttp_client, _traced(gw_config_with_claude, receiver.url))
    await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await (await gw.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))).read()
    body = {"model": "anthropic/claude-sonnet-4.6", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    await gw.post("/v1/messages", json=body, headers=auth(key))
    found = {}
    async with asyncio.timeout(10):
        while len(found) < 3:
            for _, span in receiver.spans:
                attributes = _attributes(span.attributes)
                if span.kind == Span.SPAN_KIND_SERVER and "gen_ai.response.finish_reasons" in attributes:
                    stream = attributes["gen_ai.response.id"].startswith("chatcmpl") and len(span.events) > 0
                    found[(attributes["gen_ai.request.model"], stream)] = attributes["gen_ai.response.finish_reasons"]
            receiver.arrived.clear()
            if len(found) < 3:
                await receiver.arrived.wait()
    assert found == {
        (MINI, False): ["stop"],
        (MINI, True): ["stop"],
        ("anthropic/claude-sonnet-4.6", False): ["end_turn"],  # the Messages API's own words
    }


CONTENT_POLICY = """
guardrails:
  policies:
    pii: {check: pii, action: redact}
  default: [pii]
"""


def _with_policies(store_url: str, env: dict[str, str], receiver_url: str, **traces) -> GatewayConfig:
    return _traced(config_from(DEFAULT_CONFIG.read_text() + CONTENT_POLICY, store_url, env), receiver_url, **traces)


@pytest.mark.parametrize("stream", [False, True])
async def test_captured_content_is_redacted_cut_and_in_the_conventions_shape(
    aiohttp_client, mock, claude, store_url, key, receiver, stream
):
    env = env_for(mock, store_url, ANTHROPIC_BASE_URL=claude.url, ANTHROPIC_API_KEY="sk-ant-x")
    config = _with_policies(store_url, env, receiver.url, capture_content=True, max_content_chars=60)
    gw = await _gateway(aiohttp_client, config)
    long = "word " * 40
    body = {
        "model": MINI,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Mail jane.doe@example.com please"},
            {"role": "user", "content": long},
        ],
    }
    r = await gw.post("/v1/chat/completions", json=body, headers=auth(key))
    await r.read()
    trace_id = mock.control.last.headers["traceparent"].split("-")[1]
    server, _ = _by_kind(await receiver.trace(trace_id, 2))
    attributes = _attributes(server.attributes)
    inputs = orjson.loads(attributes["gen_ai.input.messages"])
    assert inputs[0] == {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]}  # chat keeps it
    assert inputs[1]["parts"][0]["content"] == "Mail [EMAIL] please"  # as the provider got it: redacted
    cut = inputs[2]["parts"][0]["content"]
    assert cut.endswith("…[truncated]") and len(cut) == 60 - len("Be brief.Mail [EMAIL] please") + len("…[truncated]")
    outputs = orjson.loads(attributes["gen_ai.output.messages"])
    assert outputs[0]["role"] == "assistant" and outputs[0]["finish_reason"] == "stop"
    text = outputs[0]["parts"][0]["content"]
    assert text == ("tok0 tok1 tok2 tok3 tok4 " if stream else "Hello there!")


async def test_the_messages_api_system_is_the_system_instructions(
    aiohttp_client, gw_config_with_claude, claude, key, receiver
):
    gw = await _gateway(aiohttp_client, _traced(gw_config_with_claude, receiver.url, capture_content=True))
    body = {
        "model": "anthropic/claude-sonnet-4.6",
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
    }
    assert (await gw.post("/v1/messages", json=body, headers=auth(key))).status == 200
    trace_id = claude.control.last.headers["traceparent"].split("-")[1]
    server, _ = _by_kind(await receiver.trace(trace_id, 2))
    attributes = _attributes(server.attributes)
    assert orjson.loads(attributes["gen_ai.system_instructions"]) == [{"type": "text", "content": "You are terse."}]
    assert orjson.loads(attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "hi"}]}
    ]
    (output,) = orjson.loads(attributes["gen_ai.output.messages"])
    assert output["finish_reason"] == "stop" and output["parts"][0]["type"] == "text"  # the conventions' words


async def test_content_is_not_captured_by_default(aiohttp_client, mock, store_url, key, receiver):
    gw = await _gateway(
        aiohttp_client, _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url)
    )
    await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    trace_id = mock.control.last.headers["traceparent"].split("-")[1]
    server, _ = _by_kind(await receiver.trace(trace_id, 2))
    assert not any(a.key.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.system")) for a in server.attributes)


async def test_a_job_creation_has_its_operation_name(
    aiohttp_client, aiohttp_server, store_url, key, receiver, tmp_path
):
    from tests.mock_videos import VideoControl, build_video_mock
    from tests.test_videos import video_config

    control = VideoControl()
    server = await aiohttp_server(build_video_mock(control), host="127.0.0.1")
    env = env_for(Mock(url=str(server.make_url("/v1")), control=None), store_url)  # type: ignore[arg-type]
    gw = await _gateway(aiohttp_client, _traced(load_config(video_config(tmp_path), env=env), receiver.url))
    body = {"model": "openai/sora-2", "prompt": "a cat on a skateboard", "seconds": "8"}
    r = await gw.post("/v1/videos", json=body, headers=auth(key))
    assert r.status == 200, await r.text()
    async with asyncio.timeout(10):
        while not any(s.kind == Span.SPAN_KIND_CLIENT for _, s in receiver.spans):
            receiver.arrived.clear()
            await receiver.arrived.wait()
    spans = [s for _, s in receiver.spans]
    created, client = _by_kind(spans)
    assert created.name == "generate_content openai/sora-2"
    assert _attributes(created.attributes)["http.response.status_code"] == 200
    assert client[0].parent_span_id == created.span_id
    assert _attributes(client[0].attributes)["gen_ai.provider.name"] == "openai"
    # the provider was told the attempt's span, as on the inference path
    assert control.traceparents == [f"00-{created.trace_id.hex()}-{client[0].span_id.hex()}-01"]
    assert _attributes(client[0].attributes)["server.address"] == "127.0.0.1"


async def test_a_media_request_has_its_operation_name(aiohttp_client, mock, store_url, key, receiver):
    gw = await _gateway(
        aiohttp_client, _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url)
    )
    r = await gw.post("/v1/images/generations", json={"model": "gpt-image-1", "prompt": "fox"}, headers=auth(key))
    assert r.status == 200
    trace_id = mock.control.last.headers["traceparent"].split("-")[1]
    server, (client,) = _by_kind(await receiver.trace(trace_id, 2))
    assert server.name == "generate_content openai/gpt-image-1" and client.parent_span_id == server.span_id
    attributes = _attributes(server.attributes)
    assert attributes["gen_ai.usage.input_tokens"] == 50 and attributes["gen_ai.usage.output_tokens"] == 1056


async def test_a_dead_exporter_process_is_replaced(aiohttp_client, mock, store_url, key, receiver):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    gw = await _gateway(aiohttp_client, _traced(config, receiver.url, protocol="http/protobuf"))
    tracer = gw.server.app[GATEWAY].tracer
    first = tracer._proc
    first.kill()
    await first.wait()
    await gw.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    trace_id = mock.control.last.headers["traceparent"].split("-")[1]
    assert len(await receiver.trace(trace_id, 2)) == 2  # exported by the next process
    assert tracer._proc is not first and tracer._proc.returncode is None


def test_requests_beyond_the_queue_are_dropped_and_counted():
    from prometheus_client import CollectorRegistry, Counter

    from proxy.meta import RequestMeta
    from proxy.telemetry import Tracer

    dropped = Counter("dropped", "", ["reason"], registry=CollectorRegistry())
    tracer = Tracer(TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", max_queue=2), dropped)
    for _ in range(3):
        meta = RequestMeta("req", "openai.chat", 0.0)
        meta.trace = tracer.start(None, None)
        meta.trace.upstream("127.0.0.1")  # type: ignore[union-attr]
        tracer.end(meta, 1.0)
    assert tracer._requests == 2
    assert dropped.labels("queue_full")._value.get() == 2  # the third request's server and client spans


async def test_a_long_streams_finish_reason_is_read_from_its_end(aiohttp_client, mock, store_url, key, receiver):
    gw = await _gateway(
        aiohttp_client, _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url)
    )
    mock.control.pad_bytes = 20_000  # 5 events of ~20 KB: over the 64 KB a traced stream keeps
    body = await (await gw.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))).read()
    assert len(body) > 64 << 10
    trace_id = mock.control.last.headers["traceparent"].split("-")[1]
    server, _ = _by_kind(await receiver.trace(trace_id, 2))
    assert _attributes(server.attributes)["gen_ai.response.finish_reasons"] == ["stop"]


class Collector:
    def __init__(self, ok: bool = True):
        self.sent: list[bytes] = []
        self.ok = ok

    def send(self, body: bytes) -> bool:
        self.sent.append(bytes(body))
        return self.ok


def _finished(tracer, native_id="chatcmpl-1", status=200, attempts=((200, 1.25, 1.75),)):
    """A request as the handler leaves it, ended in `tracer`."""
    from proxy.meta import RequestMeta, Usage

    meta = RequestMeta("req", "openai.chat", 1.0)
    meta.team_id, meta.key_id, meta.native_id, meta.status = "team_1", "k1", native_id, status
    meta.model, meta.provider, meta.upstream_model = "openai/gpt-4o-mini", "openai", "gpt-4o-mini"
    meta.usage, meta.cost_nanos = Usage(input_tokens=3, output_tokens=4, total_tokens=7), 5
    meta.trace = tracer.start(None, None)
    for code, start, end in attempts:
        meta.trace.upstream_lines("api.openai.com")  # type: ignore[union-attr]
        meta.attempts.append(("openai", code, start, end))
    meta.trace.answer = b'{"choices":[{"finish_reason":"stop"}]}'  # type: ignore[union-attr]
    tracer.end(meta, 2.0)
    return meta


def _payloads(frames):
    """The payloads of a hand-over's frames (each given as its head, with the count, then the spans)."""
    from proxy.frames import HEAD

    return [frames[i][HEAD.size :] + frames[i + 1] for i in range(0, len(frames), 2)]


def _spans(collector):
    bodies = [orjson.loads(body) for body in collector.sent]
    return [span for body in bodies for span in body["resourceSpans"][0]["scopeSpans"][0]["spans"]]


def test_the_exporter_wraps_and_sends_the_batches_the_worker_hands_over():
    """The worker writes a request's spans where it ends; a hand-over is a frame a batch (its span count, then
    the spans); the exporter wraps each with the resource and sends it, or counts its spans lost."""
    from proxy import trace_export
    from proxy.frames import COUNT
    from proxy.telemetry import Tracer

    tracer = Tracer(TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", protocol="http/protobuf"))
    plain = _finished(tracer)
    retried = _finished(tracer, native_id="", status=502, attempts=((503, 1.1, 1.2), (0, 1.3, 1.4)))
    frames = tracer.handover()
    assert tracer.handover() == []  # nothing kept after it
    [batch] = _payloads(frames)  # one batch
    assert COUNT.unpack_from(batch)[0] == 5  # 1 + 1 spans, then 1 + 2
    resource = trace_export.attributes({"service.name": "test"}.items())
    collector = Collector()
    assert trace_export.export(resource, collector, batch) == 0
    body = orjson.loads(collector.sent[0])
    assert body["resourceSpans"][0]["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "test"}}
    ]
    spans = _spans(collector)
    server, client = "chat openai/gpt-4o-mini", "chat gpt-4o-mini"
    assert [s["name"] for s in spans] == [server, client, server, client, client]
    assert [s["kind"] for s in spans] == [2, 3, 2, 3, 3]
    assert spans[0]["traceId"] == plain.trace.id and spans[2]["traceId"] == retried.trace.id
    assert spans[1]["parentSpanId"] == spans[0]["spanId"] == plain.trace.span_id.decode()
    assert spans[1]["spanId"] == plain.trace.attempt_ids[0][0].decode()
    start, end = int(spans[0]["startTimeUnixNano"]), int(spans[0]["endTimeUnixNano"])
    assert end - start == 10**9 and int(spans[1]["endTimeUnixNano"]) - int(spans[1]["startTimeUnixNano"]) == 5 * 10**8
    attributes = {a["key"]: a["value"] for a in spans[0]["attributes"]}
    assert attributes["gen_ai.response.id"] == {"stringValue": "chatcmpl-1"}
    assert attributes["gen_ai.response.finish_reasons"] == {"arrayValue": {"values": [{"stringValue": "stop"}]}}
    assert attributes["gen_ai.usage.input_tokens"] == {"intValue": "3"}
    assert attributes["gateway.team"] == {"stringValue": "team_1"}
    assert attributes["gateway.key_id"] == {"stringValue": "k1"}
    assert "gateway.cache" not in attributes and "gateway.guardrails" not in attributes and "status" not in spans[0]
    failed = {a["key"]: a["value"] for a in spans[2]["attributes"]}
    assert failed["error.type"] == {"stringValue": "502"} and spans[2]["status"] == {"code": 2}
    assert "gen_ai.response.id" not in failed
    unreachable = {a["key"]: a["value"] for a in spans[4]["attributes"]}
    assert unreachable["error.type"] == {"stringValue": "unreachable"} and spans[4]["status"] == {"code": 2}
    assert trace_export.export(resource, Collector(ok=False), batch) == 5  # refused: its spans counted lost


def test_a_hand_over_holds_512_requests_a_batch():
    """A frame to the exporter process holds 512 requests at most (http/protobuf; likewise with content)."""
    from proxy.frames import COUNT
    from proxy.telemetry import Tracer

    tracer = Tracer(TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", protocol="http/protobuf"))
    for _ in range(513):
        _finished(tracer)
    batches = _payloads(tracer.handover())
    assert [COUNT.unpack_from(batch)[0] for batch in batches] == [1024, 2]
    assert [len(orjson.loads(b"[%b]" % batch[COUNT.size :])) for batch in batches] == [1024, 2]


async def test_the_worker_sends_a_full_batch_at_once(aiohttp_server, monkeypatch):
    """When it sends its exports itself, the worker sends a batch of 128 requests as soon as it is full (unless
    an export is on its way), not at the next 250 ms hand-over; what is left goes at the hand-over."""
    from proxy.telemetry import Tracer

    _without_proxies(monkeypatch)
    exports: list[int] = []  # spans an export held
    arrived = asyncio.Event()

    async def collect(request: web.Request) -> web.Response:
        exports.append(len(orjson.loads(await request.read())["resourceSpans"][0]["scopeSpans"][0]["spans"]))
        arrived.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    server = await aiohttp_server(app, host="127.0.0.1")
    tracer = Tracer(TracesConfig(enabled=True, endpoint=str(server.make_url("/v1/traces"))))
    await tracer.open()
    tracer._flusher.cancel()  # no hand-over on the clock: only a full batch is sent, until the close
    for _ in range(130):
        _finished(tracer)
    async with asyncio.timeout(5):
        await arrived.wait()
    assert exports == [256] and tracer._requests == 2  # the first 128 requests' spans, sent before any hand-over
    await tracer.close()
    assert exports == [256, 4]


def test_a_request_whose_text_is_not_unicode_is_not_exported_and_counted():
    """A lone surrogate in a request's figures: its spans are dropped (counted: one, and one per attempt), never
    an error for the request; the others go on."""
    from prometheus_client import CollectorRegistry, Counter

    from proxy.frames import COUNT
    from proxy.telemetry import Tracer

    dropped = Counter("dropped", "", ["reason"], registry=CollectorRegistry())
    config = TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", protocol="http/protobuf")
    tracer = Tracer(config, dropped)
    for native_id in ("chatcmpl-1", "chatcmpl-\ud800"):
        _finished(tracer, native_id)
    assert dropped.labels("export_failed")._value.get() == 2
    [batch] = _payloads(tracer.handover())
    assert COUNT.unpack_from(batch)[0] == 2
    [server, _] = orjson.loads(b"[%b]" % batch[COUNT.size :])
    assert {"key": "gen_ai.response.id", "value": {"stringValue": "chatcmpl-1"}} in server["attributes"]


def test_a_tracestate_is_passed_on_only_as_w3c_allows():
    from proxy.telemetry import Tracer

    tracer = Tracer(TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"))
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace = tracer.start(parent, "vendor=x,other=y")
    assert trace is not None
    lines = trace.upstream_lines("api.openai.com").decode()
    [(span_id, address)] = trace.attempt_ids
    assert lines == (
        f"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-{span_id.decode()}-01\r\ntracestate: vendor=x,other=y\r\n"
    )
    assert address == "api.openai.com"
    for bad in ("vendor=\x7f", "vendor=\u00e9", "vendor=" + "x" * 600):  # a control, not ASCII, too long
        trace = tracer.start(parent, bad)
        assert trace is not None and trace.state == "" and "tracestate" not in trace.upstream_lines("h").decode()


def test_finish_reasons_are_read_from_the_answers_members_only():
    from proxy.trace_content import finish_reasons

    answer = (
        b'{"choices":[{"message":{"content":"say \\"finish_reason\\": \\"bogus\\""},"finish_reason": "length"},'
        b'{"finish_reason":"stop"}]}'
    )
    assert finish_reasons("openai.chat", answer, False) == ("length", "stop")
    assert finish_reasons("openai.chat", b'{"choices":[{"finish_reason":null}]}', True) == ()
    assert finish_reasons("anthropic.messages", b'{"stop_reason":"tool_use","usage":{}}', False) == ("tool_use",)
    assert finish_reasons("openai.embeddings", b'{"finish_reason":"stop"}', False) == ()


def test_a_chat_answers_finish_reasons_are_read_with_its_usage():
    """A traced Chat Completions answer has its finish reasons read in the pass that reads its usage; an answer
    whose choices are not as the API says gives none there (the span's are then read from the answer's bytes),
    and is read as well as an untraced one."""
    from proxy.translators.openai import response_view, traced_response_view

    usage = b'"usage":{"prompt_tokens":3,"completion_tokens":4}'
    answer = b'{"id":"c1","choices":[{"finish_reason":"stop"},{"finish_reason":"length"},{}],%b}' % usage
    got, native, reasons = traced_response_view(answer)
    assert (got, native) == response_view(answer) and got is not None and got.output_tokens == 4
    assert native == "c1" and reasons == ("stop", "length")
    assert traced_response_view(b'{"id":"c2","choices":[{"finish_reason":null}]}')[2] == ()
    for odd in (b'{"id":"c3","choices":[{"finish_reason":5}]}', b'{"id":"c3","choices":"none"}'):
        assert traced_response_view(odd) == (None, "c3", None)


def test_ids_are_random_hex_and_never_zero(monkeypatch):
    """Trace and span ids are cut from blocks of random bytes, in lowercase hex; an all-zero id (no id, for W3C
    and OTLP) is never given."""
    import os

    from proxy import trace_spans

    traces = [trace_spans.new_trace_id() for _ in range(1000)]  # more than one block of each
    spans = [trace_spans.new_span_id() for _ in range(1000)]
    assert len(set(traces)) == 1000 and len(set(spans)) == 1000
    assert all(len(t) == 32 and int(t, 16) and t == t.lower() for t in traces)
    assert all(len(s) == 16 and int(s, 16) and s == s.lower() for s in spans)
    drawn = iter([bytes(8) + b"\x01" * 8 + bytes(4080), bytes(4096)])  # zeros, one id, zeros; then a fresh block
    monkeypatch.setattr(os, "urandom", lambda n: next(drawn, b"\x02" * n))
    new_span_id = trace_spans._ids(8)
    assert [new_span_id() for _ in range(2)] == [b"01" * 8, b"02" * 8]


async def test_a_cache_hit_is_one_server_span_with_its_finish_reasons(aiohttp_client, mock, store_url, key, receiver):
    config = _traced(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url)), receiver.url)
    config = msgspec.structs.replace(config, cache=msgspec.structs.replace(config.cache, enabled=True))
    gw = await _gateway(aiohttp_client, config)
    traces = [f"{i:032x}" for i in (0xA1, 0xA2, 0xA3)]
    for trace, stream in zip(traces, (False, False, True), strict=True):
        headers = {**auth(key), "traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
        r = await gw.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=headers)
        assert r.status == 200 and r.headers["x-cache"] == ("MISS" if trace == traces[0] else "HIT")
        await r.read()
    server, clients = _by_kind(await receiver.trace(traces[0], 2))
    assert _attributes(server.attributes)["gateway.cache"] == "miss" and len(clients) == 1
    for trace in traces[1:]:  # a hit: no call to a provider, the answer's own finish reasons
        server, clients = _by_kind(await receiver.trace(trace, 1))
        attributes = _attributes(server.attributes)
        assert attributes["gateway.cache"] == "hit" and attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert not clients and attributes["gateway.attempts"] == 0


def _without_proxies(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def test_the_exporter_keeps_one_connection_and_opens_another_when_the_collector_closed_it(
    aiohttp_server, monkeypatch
):
    from proxy.trace_export import Sender

    _without_proxies(monkeypatch)

    peers: list[tuple] = []
    status = 200

    async def collect(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        await request.read()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    server = await aiohttp_server(app)
    sender = Sender(f"http://127.0.0.1:{server.port}/v1/traces", {"x-api-key": "k"}, 5.0, False)
    send = functools.partial(asyncio.get_running_loop().run_in_executor, None, sender.send)
    for _ in range(3):
        assert await send(b"{}")
    assert len(peers) == 3 and len(set(peers)) == 1  # one connection for every export
    await server.runner.server.shutdown(1.0)  # the collector closes its idle connections
    assert await send(b"{}")  # the closed one is found out, and the export goes on a new one
    assert len(peers) == 4 and peers[3] != peers[0]
    status = 503
    assert not await send(b"{}")  # refused: lost (and counted by the caller)
    status = 200
    assert await send(b"{}") and len(set(peers)) == 2  # the refusal kept the connection
    sender.close()
    await server.close()
    assert not await send(b"{}")  # the collector is gone


def test_the_exporter_goes_through_the_proxy_the_environment_names(monkeypatch):
    from proxy.trace_export import Sender

    _without_proxies(monkeypatch)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "collector.internal")
    assert Sender("http://otel.example:4318/v1/traces", {}, 1.0, False)._direct is None  # urllib, through the proxy
    bypassed = Sender("http://collector.internal:4318/v1/traces?x=1", {}, 1.0, False)
    assert bypassed._direct == ("http", "collector.internal", 4318) and bypassed.target == "/v1/traces?x=1"
    assert Sender("https://otel.example/v1/traces", {}, 1.0, False)._direct == ("https", "otel.example", None)
    monkeypatch.delenv("http_proxy")
    for bad in ("http://127.0.0.1:99999/v1/traces", "http:///v1/traces", "ftp://127.0.0.1:9/"):
        sender = Sender(bad, {}, 1.0, False)
        assert sender._direct is None and not sender.send(b"{}")  # refused by urllib: lost, never fatal


async def test_the_worker_sends_json_exports_itself_on_one_connection(aiohttp_server, monkeypatch):
    """http/json without content capture: the worker posts its batches to the collector itself (no exporter
    process), with the configured headers, over one keep-alive connection opened again when the collector closed
    it; an export the collector refuses is counted lost; closing sends what is left."""
    from prometheus_client import CollectorRegistry, Counter

    from proxy.telemetry import Tracer

    _without_proxies(monkeypatch)
    exports: list[tuple[tuple, dict, list]] = []  # (peer, headers, spans)
    status = 200

    async def collect(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        spans = body["resourceSpans"][0]["scopeSpans"][0]["spans"]
        exports.append((request.transport.get_extra_info("peername"), dict(request.headers), spans))  # type: ignore[union-attr]
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    server = await aiohttp_server(app, host="127.0.0.1")
    dropped = Counter("dropped", "", ["reason"], registry=CollectorRegistry())
    config = TracesConfig(enabled=True, endpoint=str(server.make_url("/v1/traces")), headers={"x-api-key": "k1"})
    tracer = Tracer(config, dropped)
    await tracer.open()
    assert tracer._proc is None

    async def export(requests: int) -> None:
        for _ in range(requests):
            _finished(tracer)
        await tracer._flush()
        await tracer._sending

    await export(2)
    await export(1)
    assert [len(spans) for _, _, spans in exports] == [4, 2]  # a server and a client span a request
    assert len({peer for peer, _, _ in exports}) == 1
    headers = exports[0][1]
    assert headers["x-api-key"] == "k1" and headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("stats-gateway/")
    await server.runner.server.shutdown(1.0)  # the collector closes its idle connections
    await export(1)
    assert len(exports) == 3 and exports[2][0] != exports[0][0]  # sent again, on a new connection
    status = 503
    await export(3)
    assert dropped.labels("export_failed")._value.get() == 6  # refused: 3 requests' spans, counted
    status = 200
    _finished(tracer)
    await tracer.close()
    assert len(exports[-1][2]) == 2 and dropped.labels("export_failed")._value.get() == 6
    await server.close()


async def test_an_export_that_fails_on_a_fault_of_ours_is_lost_not_raised(caplog, monkeypatch):
    """A fault of the sender itself (not the collector's) loses that export, counted and logged with the
    collector's origin only; the worker's send task goes on."""
    from prometheus_client import CollectorRegistry, Counter

    from proxy.telemetry import Tracer

    dropped = Counter("dropped", "", ["reason"], registry=CollectorRegistry())
    endpoint = "http://127.0.0.1:9/v1/traces?key=secret"
    tracer = Tracer(TracesConfig(enabled=True, endpoint=endpoint), dropped)
    await tracer.open()

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    from proxy.client import Pool

    monkeypatch.setattr(Pool, "request", broken)
    _finished(tracer)
    await tracer.close()
    assert dropped.labels("export_failed")._value.get() == 2
    logged = [r for r in caplog.records if "an export to" in r.getMessage()]
    assert logged and "http://127.0.0.1:9" in logged[0].getMessage() and "secret" not in caplog.text


async def test_the_worker_sends_through_the_proxy_the_environment_names(monkeypatch):
    """An HTTP_PROXY the environment names carries the worker's exports (absolute-form requests); NO_PROXY and
    an endpoint that is not an http(s) URL with a host are told at start."""
    from proxy.telemetry import Tracer

    lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
        await reader.readexactly(length)
        lines.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _without_proxies(monkeypatch)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    tracer = Tracer(TracesConfig(enabled=True, endpoint="http://collector.example:4318/v1/traces?x=1"))
    await tracer.open()
    _finished(tracer)
    await tracer.close()
    assert lines == [b"POST http://collector.example:4318/v1/traces?x=1 HTTP/1.1"]
    server.close()
    for bad in ("http://127.0.0.1:99999/v1/traces", "http:///v1/traces", "ftp://127.0.0.1:9/", "localhost:4318"):
        with pytest.raises(RuntimeError, match="not an http\\(s\\) URL with a host"):
            Tracer(TracesConfig(enabled=True, endpoint=bad))


def test_captured_content_is_rendered_by_the_exporter_where_the_worker_marked_it():
    """With `capture_content`, the worker hands its spans over unrendered (`P` frames): the exporter decodes the
    request and the answer and puts their messages where the server span's marker is; a batch it cannot read is
    counted lost."""
    from proxy import trace_export
    from proxy.frames import COUNT, HEAD
    from proxy.telemetry import Tracer

    config = TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces", capture_content=True)
    tracer = Tracer(config)
    meta = _finished(tracer)  # not kept: the request had no body as sent (none is rendered)
    meta.trace.sent = b'{"model":"m","messages":[{"role":"user","content":"Say hi"}]}'  # type: ignore[union-attr]
    meta.trace.answer = (  # type: ignore[union-attr]
        b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}]}'
    )
    tracer.end(meta, 2.0)
    frames = tracer.handover()
    assert [frame[: HEAD.size][:1] for frame in frames[::2]] == [b"P"]
    [batch] = _payloads(frames)
    rendered = trace_export._rendered(batch, 100)
    assert rendered is not None and COUNT.unpack_from(rendered)[0] == 4
    [plain, _, captured, _] = orjson.loads(b"[%b]" % rendered[COUNT.size :])
    keys = {a["key"]: a["value"] for a in captured["attributes"]}
    assert "Say hi" in keys["gen_ai.input.messages"]["stringValue"]
    assert "Hi!" in keys["gen_ai.output.messages"]["stringValue"]
    assert not any(a["key"].startswith("gen_ai.input") for a in plain["attributes"])
    assert trace_export._rendered(batch[: COUNT.size] + b"[not json", 100) is None


def test_the_common_requests_template_writes_what_the_general_path_writes():
    """The common request (one attempt, answered, usage, cost, response id) has its spans from one template; the
    attribute-by-attribute path must write the same spans for it (a parent and a first token included)."""
    from proxy import trace_spans
    from proxy.telemetry import Tracer

    tracer = Tracer(TracesConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"))
    meta = _finished(tracer)
    meta.trace.parent_id, meta.t_first_token = b"%016x" % 42, 1.5  # type: ignore[union-attr]
    encoder, reasons, wall = trace_spans.Encoder(0), ("stop",), 10**18
    fast = encoder.request(meta, meta.trace, reasons, 2.0, wall)
    fixed = next(iter(encoder._kinds))
    kind, finish = encoder._kinds[fixed], encoder._reasons[reasons]
    parent = b'"parentSpanId":"%016x",' % 42  # as the trace's parent_id above
    first = trace_spans._FIRST_TOKEN % (wall + int(1.5e9))
    general = encoder._spans(meta, meta.trace, 2.0, wall, fixed, kind, finish, parent, first)
    assert orjson.loads(b"[%b]" % fast) == orjson.loads(b"[%b]" % general)
    assert len(orjson.loads(b"[%b]" % fast)) == 2
