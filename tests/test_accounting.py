"""Accounting: every request recorded and debited exactly once, off the request path, nothing lost."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import aiohttp
import pytest

from proxy.app import build_app
from proxy.config import NANOS_PER_USD, load_config
from proxy.gateway import GATEWAY
from proxy.journal import encode_row
from proxy.recorder import Recorder
from proxy.store import open_store
from proxy.store.base import StoreError
from tests.conftest import DEFAULT_CONFIG, ROOT, auth, env_for

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
COST = 11 * 150 + 5 * 600  # the mock's usage at gpt-4o-mini's prices, in nanos


async def balance(store_url: str, team: str) -> int:
    store = await open_store(store_url)
    try:
        return (await store.get_team(team)).balance_nanos  # type: ignore[union-attr]
    finally:
        await store.close()


async def count_generations(store_url: str) -> int:
    store = await open_store(store_url)
    try:
        async with store.db.execute("SELECT COUNT(*) FROM generations") as cur:  # type: ignore[attr-defined]
            return (await cur.fetchone())[0]
    finally:
        await store.close()


async def _team_id(store_url: str) -> str:
    store = await open_store(store_url)
    try:
        return (await store.get_team("acme")).id  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_concurrent_requests_debit_exactly_their_costs(gateway, key, mock, store_url):
    before = await balance(store_url, "acme")
    statuses = await asyncio.gather(
        *(gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key)) for _ in range(100))
    )
    assert [r.status for r in statuses] == [200] * 100
    gw = gateway.server.app[GATEWAY]
    # the cached balance the credit gate reads is debited at once, before anything is written
    assert await gw.wallets.balance(await _team_id(store_url)) == before - 100 * COST
    await gw.accountant.flush()
    assert await balance(store_url, "acme") == before - 100 * COST
    assert await count_generations(store_url) == 100
    assert gw.wallets.pending == {}


async def test_generation_record_and_team_isolation(gateway, key, make_key, mock):
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    request_id = r.headers["x-request-id"]
    # readable at once (from the writer's queue) and after the write (from the store)
    for flush in (False, True):
        if flush:
            await gateway.server.app[GATEWAY].accountant.flush()
        found = await gateway.get("/v1/generations", params={"id": request_id}, headers=auth(key))
        assert found.status == 200
        record = (await found.json())["data"]
        assert record["request_id"] == request_id and record["model_id"] == "openai/gpt-4o-mini"
        assert record["provider"] == "openai" and record["status_code"] == 200 and record["success"] is True
        assert record["cost_nanos"] == COST and record["currency"] == "USD" and len(record["pricing_lines"]) == 2
        assert record["usage"]["prompt_tokens"] == 11 and record["usage_source"] == "reported"
        assert record["latency_ms"] > 0 and record["native_response_id"] == "chatcmpl-mock"
    other = await make_key(team="rival")
    refused = await gateway.get("/v1/generations", params={"id": request_id}, headers=auth(other))
    assert refused.status == 404 and (await refused.json())["ok"] is False
    missing = await gateway.get("/v1/generations", headers=auth(key))
    assert missing.status == 400 and (await missing.json())["error"] == "invalid_request"


async def test_failed_requests_are_recorded_unbilled(gateway, key, mock):
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth(key))
    assert r.status == 404
    record = (
        await (await gateway.get("/v1/generations", params={"id": r.headers["x-request-id"]}, headers=auth(key))).json()
    )["data"]
    assert record["success"] is False and record["error_code"] == "model_not_found" and record["cost_nanos"] == 0


async def test_client_disconnect_mid_stream_is_billed_from_an_estimate(gateway, key, mock, store_url):
    mock.control.gate_after = 3
    before = await balance(store_url, "acme")
    r = await gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    request_id = r.headers["x-request-id"]
    await asyncio.wait_for(r.content.readuntil(b"tok2"), 5)
    r.close()
    await asyncio.wait_for(mock.control.disconnected.wait(), 5)
    gw = gateway.server.app[GATEWAY]
    # the handler's cancellation lands on the next loop turns; wait for the record to be submitted
    for _ in range(200):
        if request_id in gw.accountant.unwritten or await gw.store.get_generation(
            await _team_id(store_url), request_id
        ):
            break
        await asyncio.sleep(0.01)
    await gw.accountant.flush()
    record = await gw.store.get_generation(await _team_id(store_url), request_id)
    assert record is not None and record.status_code == 499 and record.usage_source == "estimated"
    assert record.cost_nanos > 0
    assert await balance(store_url, "acme") == before - record.cost_nanos


async def test_a_replayed_batch_is_charged_once(gateway, key, mock, store_url):
    await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    gw = gateway.server.app[GATEWAY]
    await gw.accountant.flush()
    team_id = await _team_id(store_url)
    before = await balance(store_url, "acme")
    async with gw.store.db.execute("SELECT request_id FROM generations") as cur:
        (request_id,) = await cur.fetchone()
    record = await gw.store.get_generation(team_id, request_id)
    line = encode_row(record.row())
    assert await gw.store.record([line, line]) == 0  # a retry after a lost acknowledgement, twice over
    assert await balance(store_url, "acme") == before
    assert await count_generations(store_url) == 1


class Hooked:
    """The accountant's writes (the store, or the writer process), with `record` through `hook(real, lines)`."""

    def __init__(self, real, hook):
        self.real, self.hook = real, hook

    async def record(self, lines):
        return await self.hook(self.real, lines)

    async def sync(self):
        await self.real.sync()


async def test_a_failing_store_loses_nothing(gateway, key, mock, store_url, monkeypatch):
    gw = gateway.server.app[GATEWAY]
    failures = []

    async def flaky(real, lines):
        if len(failures) < 2:  # an outage, then a fault of the gateway's own: the writer outlives both
            failures.append(len(lines))
            raise StoreError("disk on fire") if len(failures) == 1 else RuntimeError("a bug")
        return await real.record(lines)

    monkeypatch.setattr(gw.accountant, "store", Hooked(gw.accountant.store, flaky))
    before = await balance(store_url, "acme")
    for _ in range(5):
        assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    await asyncio.wait_for(gw.accountant.flush(), 10)
    assert len(failures) == 2 and await count_generations(store_url) == 5
    assert await balance(store_url, "acme") == before - 5 * COST


async def test_a_lagging_store_refuses_new_requests_and_the_refusals_do_not_queue(
    gateway, key, mock, store_url, monkeypatch
):
    gw = gateway.server.app[GATEWAY]
    store_back, writing = asyncio.Event(), asyncio.Event()

    async def stalled(real, lines):
        writing.set()
        await store_back.wait()
        return await real.record(lines)

    monkeypatch.setattr(gw.accountant, "store", Hooked(gw.accountant.store, stalled))
    monkeypatch.setattr(gw.accountant, "max_queue", 2)
    before = await balance(store_url, "acme")
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    await asyncio.wait_for(writing.wait(), 5)  # its record is with the (stalled) store
    for _ in range(2):  # these two fill the queue
        assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    for _ in range(5):
        refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        assert refused.status == 503
        assert "waiting for the store" in (await refused.json())["error"]["message"]
    assert len(gw.accountant._queue) == 2  # the refusals (nothing to bill) were not queued
    store_back.set()
    await asyncio.wait_for(gw.accountant.flush(), 10)
    assert await count_generations(store_url) == 3
    assert await balance(store_url, "acme") == before - 3 * COST
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_records_are_written_by_the_configured_writer(aiohttp_client, mock, store_url, make_key, writer):
    env = env_for(mock, store_url, GATEWAY_ACCOUNTING_WRITER=writer)
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))
    key = await make_key()
    before = await balance(store_url, "acme")
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    gw = client.server.app[GATEWAY]
    assert isinstance(gw.accountant.store, Recorder) == (writer == "process")
    assert (gw.accountant.store is gw.store) == (writer == "thread")
    await asyncio.wait_for(gw.accountant.flush(), 10)
    assert await count_generations(store_url) == 3
    assert await balance(store_url, "acme") == before - 3 * COST


async def test_accounting_can_be_switched_off(aiohttp_client, mock, store_url, make_key):
    env = env_for(mock, store_url, GATEWAY_ACCOUNTING="false")
    client = await aiohttp_client(build_app(load_config(DEFAULT_CONFIG, env=env)))
    key = await make_key()
    before = await balance(store_url, "acme")
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status == 200
    assert client.server.app[GATEWAY].accountant is None
    assert await balance(store_url, "acme") == before and await count_generations(store_url) == 0


@pytest.mark.timeout(90)
async def test_sigterm_during_open_streams_loses_no_record(mock, store_url, tmp_path):
    env = env_for(mock, store_url)
    keys = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "keys",
        "create",
        "--team",
        "acme",
        "--credit",
        "10",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    key = (await keys.communicate())[0].decode().strip().splitlines()[-1]
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--port", "0", cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    try:
        url = None
        for _ in range(400):
            match = re.search(r"listening on (http://\S+)", log.read_text())
            if match:
                url = match.group(1)
                break
            await asyncio.sleep(0.05)
        assert url, log.read_text()
        mock.control.gate_after = 1
        async with aiohttp.ClientSession() as session:
            streams = [
                await session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
                for _ in range(20)
            ]
            for r in streams:
                await asyncio.wait_for(r.content.readuntil(b"tok0"), 10)
            proc.send_signal(signal.SIGTERM)
            for _ in range(200):
                if "draining" in log.read_text():
                    break
                await asyncio.sleep(0.02)
            mock.control.gate.set()
            bodies = [await asyncio.wait_for(r.read(), 20) for r in streams]
        assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert await count_generations(store_url) == 20, log.read_text()
    assert await balance(store_url, "acme") == 10 * NANOS_PER_USD - 20 * COST


async def test_no_charge_when_no_provider_answered(aiohttp_client, mock, store_url, make_key, tmp_path):
    """Even a model with a per-request fee costs nothing when its provider could not be reached."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "gateway.yaml").write_text(DEFAULT_CONFIG.read_text())
    (tmp_path / "pricing.yaml").write_text(
        'effective: "2025-10-01"\nmodels:\n  openai/gpt-4o-mini: {input_per_mtok: 1, per_request: 0.01}\n'
    )
    env = env_for(mock, store_url)
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"  # nothing listens there
    client = await aiohttp_client(build_app(load_config(tmp_path / "gateway.yaml", env=env)))
    key = await make_key()
    before = await balance(store_url, "acme")
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 502
    await client.server.app[GATEWAY].accountant.flush()
    assert await count_generations(store_url) == 1
    assert await balance(store_url, "acme") == before
