"""Several real `python -m proxy serve` processes on one PostgreSQL: concurrent requests from one team spread
over three gateways debit the shared wallet exactly once each; a gateway with warm caches keeps answering
while Postgres is down, and every answered request is recorded once when it is back.

Needs the PostgreSQL server binaries (skipped without them, except in CI, like tests/test_store.py).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import aiohttp
import asyncpg

from bench.pg_server import PgServer
from proxy.auth import generate_key, hash_secret, split_key
from proxy.store import open_store
from proxy.store.base import SCOPE_INFERENCE
from tests.conftest import DEFAULT_CONFIG, auth, env_for
from tests.test_cli import _start, _wait_ready

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# The mock answers every chat request with 11 prompt and 5 completion tokens; gpt-4o-mini costs $0.15 and
# $0.60 per million (config/pricing.yaml): 11 x 150 + 5 x 600 nano-dollars.
COST_NANOS = 11 * 150 + 5 * 600
CREDIT_NANOS = 10_000_000_000  # $10
STOP_TIMEOUT_S = 20


async def _team_key(url: str) -> tuple[str, str]:
    """(team id, key) of a new team holding CREDIT_NANOS."""
    store = await open_store(url)  # migrates the fresh database
    try:
        team = await store.ensure_team("acme")
        await store.add_credit(team.id, CREDIT_NANOS)
        kid, key = generate_key()
        secret = split_key(key)[1]  # type: ignore[index]
        scopes = (SCOPE_INFERENCE,)
        await store.create_key(team_id=team.id, kid=kid, secret_hash=hash_secret(secret), name="", scopes=scopes)
        return team.id, key
    finally:
        await store.close()


async def _records(url: str, team_id: str) -> tuple[dict[str, int], int]:
    """({request id: rows with it}, the wallet's balance), read straight from the database."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT request_id, COUNT(*) AS n FROM generations WHERE team_id = $1 GROUP BY request_id", team_id
        )
        balance = await conn.fetchval("SELECT balance_nanos FROM wallets WHERE team_id = $1", team_id)
    finally:
        await conn.close()
    return {r["request_id"]: r["n"] for r in rows}, balance


async def _chat(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, str, int]:
    """(status, x-request-id, cost_nanos) of one chat request."""
    async with session.post(url + "/v1/chat/completions", json=CHAT, headers=auth(key)) as r:
        body = await r.json()
        return r.status, r.headers["x-request-id"], body.get("cost_nanos", 0) if r.status == 200 else 0


async def _terminate(procs: list[asyncio.subprocess.Process]) -> list[int | None]:
    """SIGTERM each (they drain and flush their records); their exit statuses. Any still running is killed."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_TIMEOUT_S))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _config(tmp_path: Path, ttl_s: float) -> Path:
    """The default config with `auth.cache_ttl_s` set (the price sheet beside it)."""
    config = tmp_path / "gateway.yaml"
    shutil.copy(DEFAULT_CONFIG.parent / "pricing.yaml", tmp_path / "pricing.yaml")
    text = DEFAULT_CONFIG.read_text()
    marker = "  cache_ttl_s: 5 "
    assert marker in text
    config.write_text(text.replace(marker, f"  cache_ttl_s: {ttl_s:g} ", 1))
    return config


async def test_three_gateways_debit_one_wallet_exactly_once_per_request(mock, pg_url: str, tmp_path: Path):
    team_id, key = await _team_key(pg_url)
    env = env_for(mock, pg_url)
    dirs = [tmp_path / f"gw{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    started = await asyncio.gather(*(_start(env, d) for d in dirs), return_exceptions=True)
    procs = [s[0] for s in started if not isinstance(s, BaseException)]
    try:
        assert len(procs) == 3, [s for s in started if isinstance(s, BaseException)]
        urls = [url for _, url, _ in started]  # type: ignore[misc]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for url in urls:
                await _wait_ready(session, url)
            answers = await asyncio.gather(*(_chat(session, urls[i % 3], key) for i in range(300)))
        assert await _terminate(procs) == [0, 0, 0]
    finally:
        await _terminate(procs)

    assert [status for status, _, _ in answers] == [200] * 300
    costs = [cost for _, _, cost in answers]
    assert set(costs) == {COST_NANOS}
    rows, balance = await _records(pg_url, team_id)
    assert rows == {request_id: 1 for _, request_id, _ in answers}  # exactly the 300 answered, once each
    assert CREDIT_NANOS - balance == sum(costs) == 300 * COST_NANOS


async def test_postgres_down_mid_load_loses_and_doubles_nothing(mock, pg_server: PgServer, pg_url: str, tmp_path: Path):
    team_id, key = await _team_key(pg_url)
    env = env_for(mock, pg_url)
    ttl_s = 0.5  # the outage outlasts the TTL: requests are answered from stale entries, as in production
    proc, url, log = await _start(env, tmp_path, "--config", str(_config(tmp_path, ttl_s)))
    answers: list[tuple[int, str, int]] = []
    phase = {"name": "up"}
    by_phase: dict[str, list[int]] = {"up": [], "down": [], "back": []}
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            name = phase["name"]
            answer = await _chat(session, url, key)
            answers.append(answer)
            by_phase[name].append(answer[0])

    async def until(count: int, name: str) -> None:
        """Wait (bounded) until `count` requests were answered in phase `name`."""
        async with asyncio.timeout(15):
            while len(by_phase[name]) < count:
                await asyncio.sleep(0.01)

    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, url)
            answers.append(await _chat(session, url, key))  # warm: key and balance cached
            assert answers[0][0] == 200
            clients = [asyncio.create_task(client(session)) for _ in range(8)]
            try:
                await until(50, "up")
                await asyncio.to_thread(pg_server.stop)  # fast: sessions cut, in-flight writes fail
                phase["name"] = "down"
                await until(50, "down")
                await asyncio.sleep(ttl_s * 3)  # load goes on: every entry expires, and its refresh fails
                await until(len(by_phase["down"]) + 50, "down")
                await asyncio.to_thread(pg_server.start)
                phase["name"] = "back"
                await until(50, "back")
            finally:
                stop.set()
                await asyncio.gather(*clients)
        assert await _terminate([proc]) == [0]
    finally:
        await asyncio.to_thread(_ensure_running, pg_server)  # down if the test failed in between: other tests need it
        await _terminate([proc])

    text = log.read_text()
    assert set(by_phase["down"]) == {200}, f"requests failed while Postgres was down:\n{text[-3000:]}"
    assert set(by_phase["up"]) == set(by_phase["back"]) == {200}
    assert "serving the value read" in text  # the stale entries were logged, once each
    assert text.count("serving the value read") <= 3  # key, balance (no budget on this key): not per request
    rows, balance = await _records(pg_url, team_id)
    assert rows == {request_id: 1 for _, request_id, _ in answers}, "records lost or doubled"
    assert CREDIT_NANOS - balance == sum(cost for _, _, cost in answers) == len(answers) * COST_NANOS


def _ensure_running(server: PgServer) -> None:
    if not (server.data / "postmaster.pid").exists():
        server.start()


def _redis_config(tmp_path: Path, redis_url: str, limits: str) -> Path:
    """The default config (prices beside it) with `rate_limits` on `redis_url` plus `limits` (YAML lines)."""
    config = _config(tmp_path, 5)
    prefix = f"multi{tmp_path.name}:"
    config.write_text(config.read_text() + f"\nrate_limits:\n  url: {redis_url}\n  key_prefix: '{prefix}'\n" + limits)
    return config


async def _three(env: dict[str, str], tmp_path: Path, config: Path) -> tuple[list, list[str]]:
    dirs = [tmp_path / f"gw{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    started = await asyncio.gather(*(_start(env, d, "--config", str(config)) for d in dirs), return_exceptions=True)
    procs = [s[0] for s in started if not isinstance(s, BaseException)]
    assert len(procs) == 3, [s for s in started if isinstance(s, BaseException)]
    return procs, [url for _, url, _ in started]  # type: ignore[misc]


async def test_three_gateways_on_one_redis_hold_a_keys_rate_limit(mock, pg_url: str, redis_url: str, tmp_path: Path):
    _, key = await _team_key(pg_url)
    rpm = 100
    config = _redis_config(tmp_path, redis_url, f"  key: {{rpm: {rpm}}}\n")
    procs, urls = await _three(env_for(mock, pg_url), tmp_path, config)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for url in urls:
                await _wait_ready(session, url)
            started = asyncio.get_running_loop().time()
            answers = await asyncio.gather(*(_chat(session, urls[i % 3], key) for i in range(600)))
            elapsed = asyncio.get_running_loop().time() - started
        assert await _terminate(procs) == [0, 0, 0]
    finally:
        await _terminate(procs)
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429}
    # The burst (a minute's worth), plus what the minute refills while the 600 are served: GCRA's bound.
    tolerance = int(elapsed * rpm / 60) + 1
    assert rpm <= statuses.count(200) <= rpm + tolerance, (statuses.count(200), elapsed)


async def test_three_gateways_on_one_redis_hold_one_wallet(mock, pg_url: str, redis_url: str, tmp_path: Path):
    team_id, key = await _team_key(pg_url)
    store = await open_store(pg_url)
    try:  # $1.50 of credit: $0.50 above the default $1.00 minimum
        await store.add_credit(team_id, 1_500_000_000 - CREDIT_NANOS)
    finally:
        await store.close()
    procs, urls = await _three(env_for(mock, pg_url), tmp_path, _redis_config(tmp_path, redis_url, ""))
    # gpt-4o-mini's output costs $0.60 per million tokens: a max_tokens with a worst case of ~$0.10
    body = {**CHAT, "stream": True, "max_tokens": 167_000}
    mock.control.gate_after = 1  # the streams stay open after their first event until the gate opens
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for url in urls:
                await _wait_ready(session, url)

            heads: list[int] = []

            async def stream(url: str) -> tuple[int, bytes]:
                async with session.post(url + "/v1/chat/completions", json=body, headers=auth(key)) as r:
                    if r.status == 200:
                        await r.content.readline()  # admitted, and its stream open
                    heads.append(r.status)
                    if len(heads) == 50:  # every request admitted or refused: the streams may end
                        mock.control.gate.set()
                    return r.status, await r.read()

            async with asyncio.timeout(30):
                answers = await asyncio.gather(*(stream(urls[i % 3]) for i in range(50)))
        assert await _terminate(procs) == [0, 0, 0]
    finally:
        await _terminate(procs)
    statuses = sorted(status for status, _ in answers)
    admitted_at_most = 4  # ~$0.10 each (and the prompt) in $0.50: 4 fit, not 5
    assert statuses.count(200) == admitted_at_most and statuses.count(402) == 50 - admitted_at_most, statuses
    _, balance = await _records(pg_url, team_id)
    assert balance >= 1_000_000_000 - admitted_at_most * COST_NANOS  # the wallet did not go below the minimum
