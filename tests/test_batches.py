"""Files and batches: batch files checked and rewritten line by line on their way to the provider, batches
owned by the team, billed once (at the batch discount) when their results arrive; the file list."""

from __future__ import annotations

import io

import openai
import orjson
import pytest

from proxy.app import build_app
from proxy.config import load_config
from proxy.gateway import GATEWAY
from tests.conftest import DEFAULT_CONFIG, Mock, auth, env_for
from tests.mock_batches import BatchControl, build_batch_mock
from tests.test_videos import generations

# gpt-4o-mini at half price: input $0.075/M, output $0.30/M → nanos per token
HALF_INPUT, HALF_OUTPUT = 75, 300


@pytest.fixture
async def upstream(aiohttp_server) -> tuple[Mock, BatchControl]:
    control = BatchControl()
    server = await aiohttp_server(build_batch_mock(control), host="127.0.0.1")
    return Mock(url=str(server.make_url("/v1")), control=None), control  # type: ignore[arg-type]


@pytest.fixture
async def gateway(aiohttp_client, upstream, store_url):
    mock, _ = upstream
    return await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))))


def line(custom_id: str, model: str = "openai/gpt-4o-mini", url: str = "/v1/chat/completions", **body) -> bytes:
    request = {"custom_id": custom_id, "method": "POST", "url": url,
               "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}}  # fmt: skip
    return orjson.dumps(request) + b"\n"


def sdk(gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=str(gateway.make_url("/v1")), max_retries=0)


async def batch_records(store_url: str, team: str) -> list[tuple]:
    """(model, cost, usage) of the team's batch records, oldest first."""
    return [(r[1], r[3], r[4]) for r in await generations(store_url, team) if r[0] == "openai.batches"]


async def upload(gateway, key: str, content: bytes, purpose: str = "batch", query: str = ""):
    form = {"purpose": purpose, "file": io.BytesIO(content)}
    return await gateway.post(f"/v1/files{query}", data=form, headers=auth(key))


async def test_a_batch_runs_and_is_billed_once_at_the_batch_discount(gateway, key, upstream, store_url):
    _, control = upstream
    client = sdk(gateway, key)
    content = line("a") + line("b", temperature=0.5) + line("c")
    file = await client.files.create(file=("in.jsonl", content), purpose="batch")
    assert file.id.startswith("file_") and file.purpose == "batch"
    sent = [orjson.loads(x) for x in control.uploads[-1]["file"].splitlines()]
    assert [(x["custom_id"], x["body"]["model"]) for x in sent] == [("a", "gpt-4o-mini"), ("b", "gpt-4o-mini"),
                                                                    ("c", "gpt-4o-mini")]  # fmt: skip
    assert sent[1]["body"]["temperature"] == 0.5  # the rest of each body as sent
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id.startswith("batch_") and batch.input_file_id == file.id
    assert batch.model_extra["billing"]["state"] == "pending"
    control.finish("batch_up1")
    for _ in range(3):  # polled again and again: billed once
        done = await client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.id == batch.id
        assert done.model_extra["billing"] == {"state": "settled", "cost_nanos": 30 * HALF_INPUT + 15 * HALF_OUTPUT,
                                               "currency": "USD"}  # fmt: skip
        assert [p["meter"] for p in done.model_extra["pricing_lines"]] == ["input_tokens", "output_tokens"]
    assert done.output_file_id and done.output_file_id.startswith("file_")
    results = (await client.files.content(done.output_file_id)).content.splitlines()
    assert [orjson.loads(r)["custom_id"] for r in results] == ["a", "b", "c"]
    await gateway.server.app[GATEWAY].accountant.flush()
    rows = await batch_records(store_url, "acme")
    assert [(model, cost) for model, cost, _ in rows] == [("openai/gpt-4o-mini", 0), ("openai/gpt-4o-mini", 6750)]
    assert orjson.loads(rows[1][2])["prompt_tokens"] == 30  # the create (free), then the results
    listed = await client.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    exposition = await (await gateway.get("/metrics")).text()
    assert (
        'gateway_requests_total{model="openai/gpt-4o-mini",provider="openai",status="200",surface="openai.files"} 1.0'
        in exposition
    )
    spent = 'gateway_spend_usd_total{model="openai/gpt-4o-mini",provider="openai",surface="openai.batches"} 6.75e-06'
    assert spent in exposition


async def test_a_cancelled_batch_bills_what_it_finished_and_a_failed_one_nothing(gateway, key, upstream, store_url):
    _, control = upstream
    client = sdk(gateway, key)
    file = await client.files.create(file=("in.jsonl", line("a") + line("b") + line("c")), purpose="batch")
    first = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = await client.batches.cancel(first.id)
    assert cancelling.status == "cancelling" and cancelling.model_extra["billing"]["state"] == "pending"
    control.finish("batch_up1", status="cancelled", done=1)
    cancelled = await client.batches.retrieve(first.id)
    assert cancelled.model_extra["billing"]["cost_nanos"] == 10 * HALF_INPUT + 5 * HALF_OUTPUT
    second = await client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    control.finish("batch_up2", status="failed", done=0)
    failed = await client.batches.retrieve(second.id)
    assert failed.model_extra["billing"] == {"state": "void", "cost_nanos": 0, "currency": "USD"}
    await gateway.server.app[GATEWAY].accountant.flush()
    costs = sorted(cost for _, cost, _ in await batch_records(store_url, "acme"))
    assert costs == [0, 0, 0, 2250]  # two creates, the void batch, what the cancelled one finished


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (line("a") + line("b", model="openai/nope"), "Line 2 of the batch file"),
        (line("a") + line("b", model="openai/gpt-4o"), "a batch runs one model"),
        (line("a") + b"{not json\n", "Line 2 of the batch file is not a batch request"),
        (line("a", url="/v1/images/generations"), "a batch may call /v1/chat/completions"),
        (line("a", model="openai/text-embedding-3-small"), "does not serve chat.completions"),
        (b"\n\n", "The batch file has no requests"),
        (line("a", model="anthropic/claude-haiku-4.5"), "no provider with OpenAI's Batch API"),
    ],
)
async def test_a_bad_batch_file_is_refused_before_anything_is_sent(gateway, key, upstream, content, message):
    _, control = upstream
    r = await upload(gateway, key, content)
    body = await r.json()
    assert r.status == 400 and message in body["error"]["message"], body
    assert control.uploads == []


async def test_nobody_sees_another_teams_files_or_batches(gateway, key, make_key, upstream):
    _, control = upstream
    file = await (await upload(gateway, key, line("a"))).json()
    r = await gateway.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"}, headers=auth(key))  # fmt: skip
    batch = await r.json()
    rival = await make_key(team="rival")
    for method, path in (
        ("GET", f"/v1/files/{file['id']}"),
        ("GET", f"/v1/files/{file['id']}/content"),
        ("DELETE", f"/v1/files/{file['id']}"),
        ("GET", f"/v1/batches/{batch['id']}"),
        ("POST", f"/v1/batches/{batch['id']}/cancel"),
    ):
        r = await gateway.request(method, path, headers=auth(rival))
        assert r.status == 404, (method, path, await r.text())
    r = await gateway.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"}, headers=auth(rival))  # fmt: skip
    assert r.status == 404
    assert (await (await gateway.get("/v1/files", headers=auth(rival))).json())["data"] == []
    mine = await (await gateway.get("/v1/files", headers=auth(key))).json()
    assert [f["id"] for f in mine["data"]] == [file["id"]]
    assert len(control.batches) == 1


async def test_the_provider_list_needs_the_teams_own_account(aiohttp_client, upstream, store_url, make_key, tmp_path):
    mock, control = upstream
    key = await make_key()
    gateway = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))))
    r = await gateway.get("/v1/files?provider=openai", headers=auth(key))
    body = await r.json()
    assert r.status == 400 and body["reason"] == "file_list_not_supported_with_shared_gateway_key"
    assert body["error"] == "not_supported" and control.listed == 0
    control.add_file("assistants", "made-elsewhere.pdf", b"%PDF")
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    config.providers["openai"].team = "acme"  # its key is acme's own account
    own = await aiohttp_client(build_app(config))
    listed = await (await own.get("/v1/files?provider=openai", headers=auth(key))).json()
    [shown] = listed["data"]
    assert shown["filename"] == "made-elsewhere.pdf" and shown["id"].startswith("file_")
    got = await own.get(f"/v1/files/{shown['id']}", headers=auth(key))  # listed: now the team's
    assert got.status == 200 and (await got.json())["id"] == shown["id"]
    rival = await make_key(team="rival")
    r = await own.get("/v1/files?provider=openai", headers=auth(rival))
    assert r.status == 400
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    r = await own.post("/v1/chat/completions", json=chat, headers=auth(rival))  # acme's account: not for rival
    assert r.status == 403 and "another team's own provider account" in (await r.json())["error"]["message"]


async def test_other_files_stream_to_the_files_provider_and_are_deleted(gateway, key, upstream):
    _, control = upstream
    r = await upload(gateway, key, b"any bytes \x00\xff", purpose="user_data")
    file = await r.json()
    assert r.status == 200 and control.uploads[-1]["file"] == b"any bytes \x00\xff"
    r = await gateway.get(f"/v1/files/{file['id']}/content", headers=auth(key))
    assert await r.read() == b"any bytes \x00\xff"
    r = await gateway.delete(f"/v1/files/{file['id']}", headers=auth(key))
    assert (await r.json()) == {"id": file["id"], "object": "file", "deleted": True}
    assert control.deleted == ["file-up1"]
    assert (await gateway.get(f"/v1/files/{file['id']}", headers=auth(key))).status == 404
    r = await upload(gateway, key, b"x", purpose="user_data", query="?provider=nowhere")
    assert r.status == 400 and (await r.json())["error"]["param"] == "provider"


async def test_batch_requests_need_credit_a_batch_file_and_a_key(gateway, key, make_key, upstream):
    file = await (await upload(gateway, key, line("a"))).json()
    other = await (await upload(gateway, key, b"notes", purpose="user_data")).json()
    create = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
    r = await gateway.post("/v1/batches", json={**create, "input_file_id": other["id"]}, headers=auth(key))
    assert r.status == 400 and "purpose `batch`" in (await r.json())["error"]["message"]
    r = await gateway.post("/v1/batches", json=create, headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "input_file_id"
    broke = await make_key(team="broke", credit_usd=0)
    broke_file = await (await upload(gateway, broke, line("a"))).json()
    r = await gateway.post("/v1/batches", json={**create, "input_file_id": broke_file["id"]}, headers=auth(broke))
    assert r.status == 402
    assert (await gateway.post("/v1/batches", json={**create, "input_file_id": file["id"]})).status == 401
    r = await gateway.post("/v1/files", data={"file": io.BytesIO(b"x")}, headers=auth(key))
    assert r.status == 400 and (await r.json())["error"]["param"] == "purpose"
    r = await gateway.post("/v1/files", data={"file": io.BytesIO(line("a")), "purpose": "batch"}, headers=auth(key))
    assert r.status == 400 and "after `purpose`" in (await r.json())["error"]["message"]
