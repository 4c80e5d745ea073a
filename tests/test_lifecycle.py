"""A real `python -m proxy serve` process: SIGTERM drains open streams and flushes their records; SIGHUP
(and `stats-gateway reload`) applies a new config without dropping open streams, and keeps the running
one when the new file is invalid; the access log; slow uploads and header floods."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DEFAULT_CONFIG, auth, env_for
from tests.test_cli import _start, _wait_for_line, _wait_ready, cli

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def env(mock, store_url) -> dict[str, str]:
    return env_for(mock, store_url, GATEWAY_ACCESS_LOG="true")


def _records(store_url: str) -> list[tuple[str, int]]:
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT request_id, status_code FROM generations").fetchall()


async def _wait_for_count(log: Path, text: str, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while log.read_text().count(text) < count:
        assert asyncio.get_running_loop().time() < deadline, f"never logged {text!r} {count} times:\n{log.read_text()}"
        await asyncio.sleep(0.02)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sigterm_finishes_every_open_stream_and_flushes_records(env, tmp_path: Path, mock, store_url):
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    proc, url, log = await _start(env, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
            mock.control.gate_after = 1
            streams = [
                await session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
                for _ in range(3)
            ]
            for r in streams:
                await asyncio.wait_for(r.content.readuntil(b"tok0"), 10)
            proc.send_signal(signal.SIGTERM)
            await _wait_for_line(log, "draining in-flight requests")
            mock.control.gate.set()
            for r in streams:
                assert (await asyncio.wait_for(r.read(), 10)).endswith(b"data: [DONE]\n\n")
                r.release()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await _stop(proc)
    records = _records(store_url)
    assert len(records) == 3 and {status for _, status in records} == {200}
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    streamed = [entry for entry in lines if entry.get("endpoint") == "openai.chat"]
    assert len(streamed) == 3 and all(e["status"] == 200 and e["stream"] and e["output_tokens"] for e in streamed)
    assert {e["request_id"] for e in streamed} == {request_id for request_id, _ in records}
    assert key.split("_", 4)[4] not in log.read_text()  # the key's secret is never logged


async def test_sighup_reload_keeps_open_streams_and_rejects_a_bad_file(env, tmp_path: Path, mock):
    config = tmp_path / "gateway.yaml"
    shutil.copy(DEFAULT_CONFIG, config)
    shutil.copy(DEFAULT_CONFIG.parent / "pricing.yaml", tmp_path / "pricing.yaml")
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    proc, url, log = await _start(env, tmp_path, "--config", str(config))
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
            alias = {**CHAT, "model": "house-model"}
            async with session.post(url + "/v1/chat/completions", json=alias, headers=auth(key)) as r:
                assert r.status == 404
            mock.control.gate_after = 1
            stream = await session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
            await asyncio.wait_for(stream.content.readuntil(b"tok0"), 10)

            text = config.read_text()
            marker = "  openai/gpt-4o-mini:\n"
            assert marker in text
            config.write_text(text.replace(marker, marker + "    aliases: [house-model]\n", 1))
            proc.send_signal(signal.SIGHUP)
            await _wait_for_line(log, "reload: config")
            async with session.post(url + "/v1/chat/completions", json=alias, headers=auth(key)) as r:
                assert r.status == 200  # the new config serves new requests

            config.write_text(text + "\nnot_a_section: {}\n")
            result = cli(env, "reload", "--config", str(config), check=False)
            assert result.returncode == 2 and "not_a_section" in result.stderr  # the CLI checks before signalling
            proc.send_signal(signal.SIGHUP)
            await _wait_for_line(log, "keeping the running config")
            async with session.post(url + "/v1/chat/completions", json=alias, headers=auth(key)) as r:
                assert r.status == 200  # still the last good config

            config.write_text(text)
            assert "asked gateway process" in cli(env, "reload", "--config", str(config)).stdout
            await _wait_for_count(log, "reload: config", 2)
            mock.control.gate.set()
            assert (await asyncio.wait_for(stream.read(), 10)).endswith(b"data: [DONE]\n\n")
            stream.release()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await _stop(proc)
    assert log.read_text().count("reload: config") == 2
    assert not Path(env["GATEWAY_PID_FILE"]).exists()  # removed at exit


async def test_slow_upload_gets_408_and_header_flood_431(env, tmp_path: Path):
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    config = tmp_path / "gateway.yaml"
    shutil.copy(DEFAULT_CONFIG.parent / "pricing.yaml", tmp_path / "pricing.yaml")
    config.write_text(DEFAULT_CONFIG.read_text().replace("body_timeout_s: 30 ", "body_timeout_s: 0.5 ", 1))
    proc, url, _ = await _start(env, tmp_path, "--config", str(config))
    host, port = url.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model": '
        )
        await writer.drain()
        started = asyncio.get_running_loop().time()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert asyncio.get_running_loop().time() - started < 1.5
        writer.close()

        async with aiohttp.ClientSession() as session:
            flood = {f"x-h{i}": "v" for i in range(200)}
            async with session.get(url + "/healthz", headers=flood) as r:
                assert r.status in (400, 431)
            async with session.get(url + "/healthz", headers={"x-big": "v" * 20_000}) as r:
                assert r.status in (400, 431)
            async with session.get(url + "/healthz") as r:
                assert r.status == 200  # still serving
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        await _stop(proc)


async def test_sighup_reloads_every_worker(env, tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    shutil.copy(DEFAULT_CONFIG.parent / "pricing.yaml", tmp_path / "pricing.yaml")
    text = DEFAULT_CONFIG.read_text()
    config.write_text(text)
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    proc, url, log = await _start(env, tmp_path, "--config", str(config), "--workers", "2")
    alias = {**CHAT, "model": "house-model"}

    async def statuses() -> list[int]:
        async def one() -> int:
            # a new connection each time, so the kernel spreads them over both workers
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.post(url + "/v1/chat/completions", json=alias, headers=auth(key)) as r,
            ):
                await r.read()
                return r.status

        return await asyncio.gather(*(one() for _ in range(20)))

    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
        assert set(await statuses()) == {404}
        marker = "  openai/gpt-4o-mini:\n"
        config.write_text(text.replace(marker, marker + "    aliases: [house-model]\n", 1))
        assert "asked gateway process" in cli(env, "reload", "--config", str(config)).stdout
        await _wait_for_count(log, "reload: config", 2)  # one line per worker
        assert set(await statuses()) == {200}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await _stop(proc)
