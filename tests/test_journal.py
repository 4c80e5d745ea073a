"""The accounting journal: records on disk before the answer, replayed once each after a crash.

Unit tests of `proxy.journal` (segments, locks, torn lines, rotation) and of its replay by the accountant,
then the issue's test: a real gateway `kill -9`ed under load, on SQLite and on PostgreSQL, keeps a record
of every request it answered, each debited once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy import accounting
from proxy.accounting import Accountant
from proxy.credit import KeyBudgets, WalletCache
from proxy.journal import Journal, encode_row, folder_for, parse
from proxy.meta import RequestMeta, Usage, new_request_id
from proxy.store import Store, open_store
from proxy.store.base import StoreError
from tests.conftest import ROOT, auth, env_for
from tests.test_cli import _start, _wait_ready
from tests.test_multi_instance import CREDIT_NANOS, _team_key, _terminate
from tests.test_store import funded_team, generation

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(f"sqlite:///{tmp_path}/gateway.db")
    try:
        yield store
    finally:
        await store.close()


def accountant(store: Store, folder: Path, fsync_s: float = 0.0) -> Accountant:
    return Accountant(store, WalletCache(store, 5.0, 0), KeyBudgets(store, 5.0), Journal(folder), fsync_s=fsync_s)


def meta(team_id: str, cost: int = 1_000) -> RequestMeta:
    """A finished, priced request of `team_id`."""
    m = RequestMeta(new_request_id(), "chat.completions", time.perf_counter())
    m.team_id, m.key_id, m.model, m.provider, m.status = team_id, "k1", "openai/gpt-4o-mini", "openai", 200
    m.usage, m.cost_nanos, m.t_end = Usage(input_tokens=11, output_tokens=5, total_tokens=16), cost, time.perf_counter()
    return m


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jnl"))


async def stored(store: Store, team_id: str) -> dict[str, int]:
    """{request id: cost} of the team's records."""
    async with store.db.execute(  # type: ignore[attr-defined]
        "SELECT request_id, cost_nanos FROM generations WHERE team_id = ?", (team_id,)
    ) as cur:
        return {r[0]: r[1] for r in await cur.fetchall()}


# --- the journal ----------------------------------------------------------------------------------------


def test_folder_is_per_store_and_ignores_the_password(tmp_path: Path):
    pg = folder_for("j", "postgresql://gw:secret@db:5432/gateway")
    assert pg == folder_for("j", "postgres://gw:rotated@db:5432/gateway")  # same database, new password
    assert pg != folder_for("j", "postgresql://gw:secret@db:5432/other")
    assert pg.parent == Path("j") and pg.name.startswith("postgres-") and "secret" not in str(pg)
    here = folder_for("j", f"sqlite:///{os.path.relpath(tmp_path / 'g.db')}")
    assert here == folder_for("j", f"sqlite:///{tmp_path}/g.db") != folder_for("j", f"sqlite:///{tmp_path}/h.db")
    assert folder_for("j", "sqlite:///:memory:") != folder_for("j", "sqlite:///:memory:")  # never adopted


def test_lines_round_trip_and_a_dead_writers_segment_is_adopted(tmp_path: Path):
    rows = [generation(f"r{i}", "team_1", cost=i) for i in range(3)]
    writer = Journal(tmp_path)
    writer.open()
    for row in rows:
        writer.append(encode_row(row))
    (path,) = segments(tmp_path)
    assert path.read_bytes() == b"".join(encode_row(row) for row in rows)
    assert writer.adopt() == []  # its own: never
    writer.close(applied=False)  # as a crash leaves it: the file stays, the lock is gone
    (found,) = Journal(tmp_path).adopt()
    assert found.path == path and found.lines == [encode_row(row).rstrip(b"\n") for row in rows] and not found.skipped
    found.done()
    assert segments(tmp_path) == []


def test_a_torn_last_line_is_skipped_and_counted():
    whole = [encode_row(generation(f"r{i}", "team_1")) for i in range(2)]
    torn = encode_row(generation("r2", "team_1"))[:-40]
    assert parse(b"".join(whole) + torn) == ([line.rstrip(b"\n") for line in whole], 1)
    # a write that failed part-way, then the newline the journal puts before the next line
    assert parse(whole[0] + torn + b"\n" + whole[1]) == ([whole[0].rstrip(b"\n"), whole[1].rstrip(b"\n")], 1)
    assert parse(b"") == ([], 0)
    assert parse(b'["not", "a row"]\n') == ([], 1)


def test_a_failed_append_is_logged_once_and_the_next_line_reads_whole(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="proxy.accounting")
    journal = Journal(tmp_path)
    journal.open()
    first, second, third = (encode_row(generation(f"r{i}", "team_1")) for i in range(3))
    journal.append(first)
    segment = journal._active
    assert segment is not None
    good, segment.fd = segment.fd, os.open(segment.path, os.O_RDONLY)  # every write now fails (EBADF)
    journal.append(second)
    journal.append(second)
    os.close(segment.fd)
    segment.fd = good
    os.write(good, third[:25])  # and a write that stopped part-way, as on a full disk
    journal.append(third)
    assert caplog.text.count("cannot append to the accounting journal") == 1
    assert "takes records again" in caplog.text
    assert parse(segment.path.read_bytes()) == ([first.rstrip(b"\n"), third.rstrip(b"\n")], 1)
    assert journal.appended == 4  # the failed ones count: the writer's count of applied lines stays right
    journal.close(applied=True)


def test_a_clean_close_deletes_the_segments_and_the_empty_folder(tmp_path: Path):
    folder = tmp_path / "sqlite-0123456789ab"
    journal = Journal(folder)
    journal.open()
    journal.append(encode_row(generation("r1", "team_1")))
    journal.close(applied=True)
    assert not folder.exists()
    journal.append(encode_row(generation("r2", "team_1")))  # after close: not written anywhere
    assert not folder.exists()


def test_a_segment_locked_by_a_live_process_is_not_adopted(tmp_path: Path):
    holder = (
        "import sys; from pathlib import Path; from proxy.journal import Journal\n"
        "j = Journal(Path(sys.argv[1])); j.open(); j.append(b'[]\\n'); print('ready', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert len(segments(tmp_path)) == 1
        assert Journal(tmp_path).adopt() == []  # its writer is alive: not ours to replay
        child.kill()  # SIGKILL: no clean-up ran, the kernel released the lock
        child.wait(timeout=10)
        (found,) = Journal(tmp_path).adopt()
        assert found.lines == [] and found.skipped == 1  # `[]` is not a row
        found.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def test_rotation_deletes_a_segment_only_when_its_lines_are_applied(tmp_path: Path):
    journal = Journal(tmp_path)
    journal.open()
    for i in range(3):
        journal.append(encode_row(generation(f"r{i}", "team_1")))
    first = segments(tmp_path)
    journal.rotate()
    last = encode_row(generation("r3", "team_1"))  # made once: a row carries the millisecond it was made in
    journal.append(last)
    assert len(segments(tmp_path)) == 2 and journal.size > 0
    assert journal.applied(2) == []  # the first segment's third line is not in the store yet
    done = journal.applied(3)
    assert [s.path for s in done] == first
    journal.drop(done)
    (active,) = segments(tmp_path)
    assert active not in first and active.read_bytes() == last
    journal.close(applied=False)


# --- replay by the accountant ---------------------------------------------------------------------------


async def test_start_replays_a_dead_workers_journal_once(store: Store, tmp_path: Path, caplog):
    team = await funded_team(store)
    folder = tmp_path / "journal"
    rows = [generation(f"r{i}", team.id, cost=10 * i) for i in range(1, 5)]
    assert await store.record([encode_row(rows[0])]) == 1  # applied before the crash
    dead = Journal(folder)
    dead.open()
    for row in rows:
        dead.append(encode_row(row))
    dead.append(encode_row(generation("r9", team.id))[:-30])  # the write the crash cut
    dead.close(applied=False)
    second = Journal(folder)  # another dead worker that held some of the same records
    second.open()
    for row in rows[2:]:
        second.append(encode_row(row))
    second.close(applied=False)

    caplog.set_level(logging.INFO, logger="proxy.accounting")
    acct = accountant(store, folder)
    await acct.start()
    try:
        assert await stored(store, team.id) == {row[0]: row[16] for row in rows}  # r9 was torn: never answered
        assert await store.get_balance(team.id) == 1_000_000 - sum(10 * i for i in range(1, 5))  # each once
        assert len(segments(folder)) == 1  # only the new worker's own
        text = caplog.text
        assert "replayed 4 usage records (3 not yet in the store)" in text
        assert "replayed 2 usage records (0 not yet in the store)" in text
        assert "skipped 1 torn or unreadable lines" in text
    finally:
        await acct.close(5)
    assert not folder.exists()  # a clean stop leaves nothing to replay


async def test_submit_journals_before_it_returns_and_only_once(store: Store, tmp_path: Path):
    team = await funded_team(store)
    acct = accountant(store, tmp_path)
    await acct.start()
    try:
        m = meta(team.id)
        acct.submit(m)
        acct.submit(m)  # the handler's `finally` after an early submit: a no-op
        (path,) = segments(tmp_path)
        (line,) = path.read_bytes().splitlines()
        assert line.startswith(b'[1,"' + m.request_id.encode() + b'",')  # a snapshot of the request
        assert acct.lookup(team.id, m.request_id) is not None and len(acct._queue) == 1
        await acct.flush()
        assert await stored(store, team.id) == {m.request_id: 1_000}
        assert await store.get_balance(team.id) == 1_000_000 - 1_000
    finally:
        await acct.close(5)


async def test_a_record_with_text_that_is_not_unicode_is_stored_repaired(store: Store, tmp_path: Path):
    """A lone surrogate (from a provider's error text, say) cannot be JSON nor bound by SQLite: the journal and
    the store get the same repaired row, the one a replay would read."""
    team = await funded_team(store)
    acct = accountant(store, tmp_path)
    await acct.start()
    try:
        m = meta(team.id)
        m.status, m.error_code, m.error_message = 502, "upstream_error", "bad \udc80 text"
        acct.submit(m)
        (path,) = segments(tmp_path)
        assert orjson.loads(path.read_bytes())[13] == "bad ? text"
        await acct.flush()
        found = await store.get_generation(team.id, m.request_id)
        assert found is not None and found.error_message == "bad ? text"
    finally:
        await acct.close(5)


async def test_records_of_a_crash_during_an_outage_survive_rotation(store: Store, tmp_path: Path, monkeypatch):
    team = await funded_team(store)
    monkeypatch.setattr(accounting, "ROTATE_BYTES", 1)  # a new segment after every batch
    monkeypatch.setattr(accounting, "LINGER_S", 0.0)
    acct = accountant(store, tmp_path, fsync_s=0.5)
    await acct.start()
    applied = [meta(team.id) for _ in range(3)]
    for m in applied:
        acct.submit(m)
        await acct.flush()
    assert len(segments(tmp_path)) == 1  # each applied segment was deleted once the next began

    real = store.record
    outage = asyncio.Event()

    async def down(lines):
        outage.set()
        raise StoreError("connection refused")

    monkeypatch.setattr(store, "record", down)
    waiting = [meta(team.id, cost=7) for _ in range(4)]
    for m in waiting:
        acct.submit(m)
    await asyncio.wait_for(outage.wait(), 5)
    acct._task.cancel()  # type: ignore[union-attr]  # the worker dies: no flush, no clean-up
    with pytest.raises(asyncio.CancelledError):
        await acct._task  # type: ignore[misc]
    acct.journal.close(applied=False)
    monkeypatch.setattr(store, "record", real)

    after = accountant(store, tmp_path)
    await after.start()
    await after.close(5)
    assert await stored(store, team.id) == {m.request_id: m.cost_nanos for m in applied + waiting}
    assert await store.get_balance(team.id) == 1_000_000 - 3 * 1_000 - 4 * 7
    assert segments(tmp_path) == []


async def test_the_writer_adopts_a_sibling_that_died_while_serving(store: Store, tmp_path: Path, monkeypatch):
    team = await funded_team(store)
    monkeypatch.setattr(accounting, "ADOPT_EVERY_S", 0.05)
    acct = accountant(store, tmp_path)
    await acct.start()
    try:
        dead = Journal(tmp_path)
        dead.open()
        dead.append(encode_row(generation("sibling", team.id, cost=5)))
        dead.close(applied=False)
        async with asyncio.timeout(10):
            while "sibling" not in await stored(store, team.id):
                await asyncio.sleep(0.02)
        assert await store.get_balance(team.id) == 1_000_000 - 5
    finally:
        await acct.close(5)


# --- kill -9 under load ---------------------------------------------------------------------------------


async def _records(url: str, team_id: str) -> tuple[dict[str, int], int]:
    """({request id: cost} of the team's records, its balance), read from the store."""
    store = await open_store(url, pool_min=0, pool_max=1)
    try:
        sql = "SELECT request_id, cost_nanos FROM generations WHERE team_id = "
        if store.backend == "sqlite":
            async with store.db.execute(sql + "?", (team_id,)) as cur:  # type: ignore[attr-defined]
                rows = await cur.fetchall()
        else:
            rows = await store.pool.fetch(sql + "$1", team_id)  # type: ignore[attr-defined]
        return {r[0]: r[1] for r in rows}, await store.get_balance(team_id) or 0
    finally:
        await store.close()


def _children(pid: int) -> list[int]:
    """The processes `pid` started (a worker's store writer)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(child) for child in children.read().split()]
    return found


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_kill_9_under_load_loses_no_answered_record(backend: str, request, mock, tmp_path: Path):
    url = f"sqlite:///{tmp_path}/gateway.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    team_id, key = await _team_key(url)
    env = env_for(mock, url, GATEWAY_JOURNAL_DIR=str(tmp_path / "journal"))
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    # Like a real network, the upstream body ends a little after [DONE]: the gateway reads that end after the
    # client's stream is complete.
    mock.control.linger_after_done_s = 0.05
    proc, base, _ = await _start(env, tmp_path / "first")
    answered: dict[str, tuple[bool, int]] = {}  # request id → (streamed, cost shown to the client)
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, streamed: bool) -> None:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}} if streamed else CHAT
        while not stop.is_set():
            try:
                async with session.post(base + "/v1/chat/completions", json=body, headers=auth(key)) as r:
                    data = await r.read()
            except (aiohttp.ClientError, TimeoutError):
                return  # the gateway is gone
            assert r.status == 200, data[:500]
            if streamed:
                if data.endswith(b"data: [DONE]\n\n"):  # the whole stream arrived
                    answered[r.headers["x-request-id"]] = (True, 0)
            else:
                answered[r.headers["x-request-id"]] = (False, orjson.loads(data)["cost_nanos"])

    try:
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            await _wait_ready(session, base)
            clients = [asyncio.create_task(client(session, streamed=i % 2 == 1)) for i in range(32)]
            try:
                async with asyncio.timeout(60):
                    while len(answered) < 600 or sum(s for s, _ in answered.values()) < 100:
                        await asyncio.sleep(0.01)
                        assert not any(c.done() for c in clients), [c.exception() for c in clients if c.done()]
                    # The store writer is stopped, so that the records of what is answered from now on wait in
                    # the journal only (a writer that keeps up would leave the journal nothing to replay).
                    (writer,) = _children(proc.pid)
                    os.kill(writer, signal.SIGSTOP)
                    stopped_at = len(answered)
                    while len(answered) < stopped_at + 50:
                        await asyncio.sleep(0.01)
                # Requests in flight, records waiting for the writer: both die at once (a machine's crash).
                proc.send_signal(signal.SIGKILL)
                os.kill(writer, signal.SIGKILL)
                assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
            finally:
                stop.set()
                await asyncio.gather(*clients)
        before, _ = await _records(url, team_id)
        missing = [rid for rid in answered if rid not in before]

        proc, base, log = await _start(env, tmp_path / "second")  # replays the dead one's journal first
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, base)
        assert await _terminate([proc]) == [0]
    finally:
        await _terminate([proc])

    assert missing, "every answered request was stored at the kill: the journal was not put to the test"
    text = log.read_text()
    assert "replayed" in text and "left by a dead worker" in text, text[-3000:]
    records, balance = await _records(url, team_id)
    assert CREDIT_NANOS - balance == sum(records.values())  # each record debited once, no debit without one
    whole = {rid: cost for rid, (streamed, cost) in answered.items() if not streamed}
    assert len(whole) > 100 and {rid: records.get(rid) for rid in whole} == whole, text[-3000:]
    # A stream is accounted before its final event is written (proxy/surfaces/inference.py): a client that
    # saw [DONE] has a record too, billed from the usage the stream reported.
    streamed = [rid for rid, (s, _) in answered.items() if s]
    assert len(streamed) >= 100 and all(records.get(rid, 0) > 0 for rid in streamed), [
        rid for rid in streamed if rid not in records
    ]
