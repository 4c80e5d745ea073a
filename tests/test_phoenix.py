"""End to end with a trace backend people pick: Arize Phoenix, from PyPI, in a virtual environment of its own
(`.ci/run` makes `.phoenix/`; `PHOENIX_BIN` may name another `phoenix`). The gateway sends its spans as
OTLP/HTTP protobuf (Phoenix refuses OTLP/JSON), and they are read back through Phoenix's REST API. Without
Phoenix the test is skipped, except in CI."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp
import pytest

from proxy.app import build_app
from proxy.config import load_config
from tests.conftest import DEFAULT_CONFIG, ROOT, auth, env_for
from tests.test_telemetry import CHAT, MINI, _traced

PHOENIX = os.environ.get("PHOENIX_BIN") or str(ROOT / ".phoenix" / "bin" / "phoenix")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def phoenix(tmp_path: Path):
    if not os.access(PHOENIX, os.X_OK):
        install = "python3 -m venv .phoenix && .phoenix/bin/pip install arize-phoenix"
        message = f"Arize Phoenix is not installed at {PHOENIX} ({install})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    env = {
        **os.environ,
        "PHOENIX_WORKING_DIR": str(tmp_path),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(_free_port()),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (tmp_path / "phoenix.log").open("wb")
    proc = await asyncio.create_subprocess_exec(PHOENIX, "serve", env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(120):  # it starts in ~10 s here
            while True:
                if proc.returncode is not None:
                    pytest.fail(f"Phoenix exited: {(tmp_path / 'phoenix.log').read_text()[-2000:]}")
                try:
                    async with session.get(f"{url}/v1/projects") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.5)  # polling a server that is starting: nothing to wait on instead
        yield url
    finally:
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()


async def _spans(url: str, trace_id: str, count: int) -> list[dict]:
    """The spans of one trace as Phoenix has them, once `count` have been ingested (bounded wait)."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            async with session.get(f"{url}/v1/projects/default/spans", params={"limit": "100"}) as r:
                found = [s for s in (await r.json())["data"] if s["context"]["trace_id"] == trace_id]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.25)  # Phoenix ingests in the background; its API has no way to wait


async def test_phoenix_shows_a_request_as_an_llm_trace(aiohttp_client, mock, store_url, key, phoenix):
    config = load_config(DEFAULT_CONFIG, env=env_for(mock, store_url))
    traced = _traced(config, f"{phoenix}/v1/traces", protocol="http/protobuf", capture_content=True)
    gw = await aiohttp_client(build_app(traced))
    r = await gw.post("/v1/chat/completions", json={**CHAT, "meta": True}, headers=auth(key))
    assert r.status == 200
    trace_id = (await r.json())["meta"]["trace_id"]
    spans = await _spans(phoenix, trace_id, 2)
    (server,) = [s for s in spans if s["parent_id"] is None]
    (client,) = [s for s in spans if s["parent_id"] == server["context"]["span_id"]]
    assert server["name"] == f"chat {MINI}" and client["name"] == "chat gpt-4o-mini"
    assert server["span_kind"] == "LLM"  # Phoenix read the GenAI conventions
    attributes = server["attributes"]
    assert attributes["gen_ai.usage.input_tokens"] == 11 and attributes["gen_ai.usage.output_tokens"] == 5
    assert attributes["llm.token_count.prompt"] == 11 and attributes["llm.token_count.completion"] == 5
    assert attributes["llm.finish_reason"] == "stop"
    assert '"content":"hi"' in attributes["gen_ai.input.messages"].replace(" ", "")
