"""The command line, run as users run it: keys, credits, check-config, and `serve` (one worker or several)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.store import open_store
from tests.conftest import DEFAULT_CONFIG, ROOT, auth, env_for

KEY_RE = re.compile(r"^aistats_v1_sk_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}$")
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def env(mock, store_url) -> dict[str, str]:
    return env_for(mock, store_url)


def test_keys_create_list_revoke_and_credits(env, tmp_path: Path):
    out = cli(env, "keys", "create", "--config", str(DEFAULT_CONFIG), "--team", "acme", "--credit", "12.5")
    key = out.stdout.strip().splitlines()[-1]
    assert KEY_RE.match(key), out.stdout
    assert "$12.50" in out.stdout
    kid = key.split("_")[3]

    listing = cli(env, "keys", "list", "--team", "acme").stdout
    assert kid in listing and "active" in listing and key.split("_", 4)[4] not in listing

    mgmt = cli(env, "keys", "create", "--team", "acme", "--management").stdout.strip().splitlines()[-1]
    assert KEY_RE.match(mgmt)
    assert "management" in cli(env, "keys", "list").stdout

    assert "$15.00" in cli(env, "credits", "add", "--team", "acme", "--usd", "2.50").stdout
    assert "$15.00" in cli(env, "credits", "show", "--team", "acme").stdout

    assert "revoked" in cli(env, "keys", "revoke", kid).stdout
    assert "revoked" in cli(env, "keys", "list").stdout
    again = cli(env, "keys", "revoke", kid, check=False)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_bad_credit_amount_is_a_usage_error(env):
    result = cli(env, "keys", "create", "--team", "x", "--credit", "lots", check=False)
    assert result.returncode == 2 and "expected an amount in USD" in result.stderr


async def test_keys_create_with_rate_limits(env, store_url):
    key = cli(env, "keys", "create", "--team", "acme", "--rpm", "30", "--concurrency", "0").stdout.splitlines()[-1]
    store = await open_store(store_url)
    try:
        record = await store.get_key(key.split("_")[3])
    finally:
        await store.close()
    assert record is not None and (record.rpm_limit, record.tpm_limit, record.concurrency_limit) == (30, None, 0)
    refused = cli(env, "keys", "create", "--team", "acme", "--tpm", "-3", check=False)
    assert refused.returncode == 2 and "expected 0 (no limit) or more" in refused.stderr


def test_check_config_summary_and_errors(env, tmp_path: Path):
    out = cli(env, "check-config", "--config", str(DEFAULT_CONFIG)).stdout
    assert "OK" in out and "openai/gpt-4o-mini" in out and "/v1/chat/completions" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  openai: {kind: openai, base_url: 'http://127.0.0.1:1/v1'}\n"
        "models:\n  a/b:\n    targets:\n      - {provider: nowhere, model: b}\n"
    )
    result = cli(env, "check-config", "--config", str(bad), check=False)
    assert result.returncode == 2
    assert f"{bad}:6: $.models['a/b'].targets[0].provider: unknown provider 'nowhere'" in result.stderr


async def _start(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[asyncio.subprocess.Process, str, Path]:
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--port", "0", *args, cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    deadline = asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        match = re.search(r"listening on (http://\S+)", log.read_text())
        if match:
            return proc, match.group(1), log
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the gateway did not start:\n{log.read_text()}")


async def _wait_for_line(log: Path, text: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while text not in log.read_text():
        assert asyncio.get_running_loop().time() < deadline, f"never logged {text!r}:\n{log.read_text()}"
        await asyncio.sleep(0.02)


async def _wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        try:
            async with session.get(url + "/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never became ready")


async def test_serve_answers_then_drains_on_sigterm(env, tmp_path: Path, mock):
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    proc, url, log = await _start(env, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
            async with session.post(url + "/v1/chat/completions", json=CHAT, headers=auth(key)) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "Hello there!"
            # A stream in flight when SIGTERM arrives is finished, not cut.
            mock.control.gate_after = 1
            async with session.post(
                url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key)
            ) as r:
                await asyncio.wait_for(r.content.readuntil(b"tok0"), 10)
                proc.send_signal(signal.SIGTERM)
                await _wait_for_line(log, "draining in-flight requests")
                assert proc.returncode is None
                mock.control.gate.set()
                rest = await asyncio.wait_for(r.read(), 10)
            assert rest.endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert log.read_text().count("listening on") == 1


async def test_workers_share_the_port_and_aggregate_metrics(env, tmp_path: Path):
    key = cli(env, "keys", "create", "--team", "acme", "--credit", "5").stdout.strip().splitlines()[-1]
    proc, url, log = await _start(env, tmp_path, "--workers", "2")
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)

            async def one() -> int:
                # a new connection each time, so the kernel spreads them over both workers
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.post(url + "/v1/chat/completions", json=CHAT, headers=auth(key)) as r,
                ):
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(40)))
            assert statuses == [200] * 40
            async with session.get(url + "/metrics") as r:
                text = await r.text()
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_requests_total{") and 'status="200"' in line
        )
        assert total == 40, text[:2000]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    children = [line for line in log.read_text().splitlines() if "Traceback" in line]
    assert not children, log.read_text()


def test_console_script_is_the_same_cli(env):
    script = Path(sys.executable).parent / "stats-gateway"
    if not script.exists():
        pytest.skip("the package is not installed with its console script (pip install -e .)")
    result = subprocess.run(
        [str(script), "check-config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "OK" in result.stdout


def test_serve_refuses_a_port_in_use(env):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(env, "serve", "--port", str(port), check=False)
    assert result.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--log-level", "DEBUG"],
        ["--log-level", "DEBUG", "serve"],
        ["--log-level", "DEBUG"],  # `serve` is the default command, its options may come first
    ],
    ids=["after", "before", "default-command"],
)
async def test_the_log_level_option_works_before_and_after_the_command(env, tmp_path: Path, argv: list[str]):
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *argv, "--port", "0", cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    try:
        await _wait_for_line(log, "listening on")
        assert " DEBUG proxy: config " in log.read_text()
    finally:
        proc.terminate()
        await proc.wait()


def test_an_unknown_log_level_is_refused_with_the_choices(env):
    result = cli({**env, "GATEWAY_LOG_LEVEL": "chatty"}, "check-config", "--config", str(DEFAULT_CONFIG), check=False)
    assert result.returncode == 2 and "unknown log level 'chatty'" in result.stderr and "WARNING" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli(env, "check-config", "--log-level", "loud", "--config", str(DEFAULT_CONFIG), check=False)
    assert result.returncode == 2 and "unknown log level 'loud'" in result.stderr
