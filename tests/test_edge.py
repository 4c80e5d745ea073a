"""The client side of connections, for real over TCP: heads that come too slowly or not at all, and the cap
on open connections (`proxy/edge.py`)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import DEFAULT_CONFIG, auth, env_for
from tests.test_cli import _start, _wait_ready, cli
from tests.test_lifecycle import _stop

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
HEAD_TIMEOUT_S = 0.6
MAX_CONNECTIONS = 12


@pytest.fixture
def env(mock, store_url) -> dict[str, str]:
    return env_for(mock, store_url)


@pytest.fixture
async def edge(env, tmp_path: Path):
    """A gateway (a real process) with a short head timeout and a small connection cap: (host, port, url)."""
    config = tmp_path / "gateway.yaml"
    shutil.copy(DEFAULT_CONFIG.parent / "pricing.yaml", tmp_path / "pricing.yaml")
    text = DEFAULT_CONFIG.read_text()
    text = text.replace("header_timeout_s: 60 ", f"header_timeout_s: {HEAD_TIMEOUT_S} ", 1)
    text = text.replace("max_connections: 10000 ", f"max_connections: {MAX_CONNECTIONS} ", 1)
    config.write_text(text)
    proc, url, _ = await _start(env, tmp_path, "--config", str(config))
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port), url
    finally:
        await _stop(proc)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the gateway sends until it closes the connection (which it must within `seconds`)."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_a_silent_connection_is_closed_after_the_head_timeout(edge):
    host, port, _ = edge
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    try:
        assert await _closed_within(reader, HEAD_TIMEOUT_S + 5) == b""  # closed, nothing said: no request was made
        assert time.monotonic() - started >= HEAD_TIMEOUT_S * 0.9
    finally:
        writer.close()


async def test_a_head_sent_too_slowly_gets_408_in_the_envelope_and_is_closed(edge):
    host, port, _ = edge
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = b""
    try:
        for i in range(len(head)):  # a byte every 50 ms: the head would need far longer than the timeout
            writer.write(head[i : i + 1])
            try:  # the pace, and listening: the gateway speaks only to refuse
                answer = await asyncio.wait_for(reader.read(1), 0.05)
            except TimeoutError:
                continue
            break
        answer += await _closed_within(reader, 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"Connection: close" in answer and b"\r\nx-request-id: req_" in answer
    error = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and "server.header_timeout_s" in error["message"]
    assert HEAD_TIMEOUT_S * 0.9 <= time.monotonic() - started < HEAD_TIMEOUT_S + 3


async def test_an_idle_keep_alive_connection_is_closed_and_a_prompt_one_is_served(edge, env):
    host, port, _ = edge
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    body = orjson.dumps(CHAT)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(3):  # requests that come in time are served on one connection, however many
            writer.write(request)
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            await asyncio.sleep(HEAD_TIMEOUT_S / 3)  # idle, but less than the timeout
        assert await _closed_within(reader, HEAD_TIMEOUT_S + 5) == b""  # then idle too long: closed, no 408
    finally:
        writer.close()


async def test_past_max_connections_new_ones_get_503_and_open_ones_are_served(edge, env):
    host, port, url = edge
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        # One keep-alive connection in use before the flood.
        async with session.post(url + "/v1/chat/completions", json=CHAT, headers=auth(key)) as r:
            assert r.status == 200
        held = [await asyncio.open_connection(host, port) for _ in range(MAX_CONNECTIONS - 1)]
        try:
            # The cap is reached: a new connection is answered at once, without sending anything.
            extra = [await asyncio.open_connection(host, port) for _ in range(5)]
            for reader, writer in extra:
                answer = await _closed_within(reader, 5)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert b"Retry-After: 1" in answer and b"Connection: close" in answer
                assert b"\r\nx-request-id: req_" in answer
                error = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]
                assert error["code"] == "unavailable" and "server.max_connections" in error["message"]
            # The connection already open is unharmed.
            async with session.post(url + "/v1/chat/completions", json=CHAT, headers=auth(key)) as r:
                assert r.status == 200
        finally:
            for _, writer in held:
                writer.close()
    # Once they are gone, there is room again (their closing is seen by the gateway shortly).
    deadline = time.monotonic() + 5
    while True:
        async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as r:
            if r.status == 200:
                break
        assert time.monotonic() < deadline, "the cap never freed up after the connections closed"
        await asyncio.sleep(0.05)
