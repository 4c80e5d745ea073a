"""The accounting writer process (`proxy.recorder` in the worker, `proxy.usage_writer` in the child)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.journal import encode_row
from proxy.recorder import Recorder
from proxy.store import Store, open_store
from proxy.store.base import StoreError
from tests.test_store import funded_team, generation


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited


async def _gone(pid: int, within_s: float = 10.0) -> bool:
    async with asyncio.timeout(within_s):
        while _alive(pid):
            await asyncio.sleep(0.02)
    return True


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/gateway.db"
    store = await open_store(url)  # created and migrated, as a worker does before it starts its writer
    await store.close()
    return url


@pytest.fixture
async def writer(sqlite_url: str) -> AsyncIterator[tuple[Store, Recorder, str]]:
    """The store, a recorder on it (not started) and a funded team's id; both closed at the end."""
    store = await open_store(sqlite_url)
    recorder = Recorder(sqlite_url)
    try:
        yield store, recorder, (await funded_team(store)).id
    finally:
        await recorder.close()
        await store.close()


async def test_lines_with_and_without_their_newline_are_each_one_record(writer: tuple[Store, Recorder, str]):
    store, recorder, team_id = writer
    live = [encode_row(generation(f"live{i}", team_id, cost=10)) for i in range(3)]  # as the accountant sends
    replayed = [encode_row(generation(f"old{i}", team_id, cost=1)).rstrip(b"\n") for i in range(2)]  # as parsed
    assert await recorder.record(live + replayed) == 5
    assert await recorder.record(live) == 0  # already stored: skipped, not charged again
    assert await store.get_balance(team_id) == 1_000_000 - 32
    await recorder.sync()


async def test_a_writer_that_died_is_replaced(writer: tuple[Store, Recorder, str]):
    _, recorder, team_id = writer
    await recorder.start()
    first = recorder._proc
    assert first is not None
    first.kill()
    await first.wait()  # known dead before the next call: a new one takes it, the caller sees nothing
    assert await recorder.record([encode_row(generation("r1", team_id))]) == 1
    second = recorder._proc
    assert second is not None and second.pid != first.pid

    os.kill(second.pid, signal.SIGKILL)  # dies during the call: the call fails, the accountant retries
    line = encode_row(generation("r2", team_id))
    with pytest.raises(StoreError, match="accounting writer process failed"):
        await recorder.record([line])
    assert await recorder.record([line]) == 1
    assert recorder._proc is not None and recorder._proc.pid not in (first.pid, second.pid)


async def test_a_call_cancelled_mid_exchange_leaves_no_answer_behind(writer: tuple[Store, Recorder, str]):
    """The accountant's writer task cancelled while the child works: that child's late answer must not be read
    as the next call's, so it is killed and the next call gets a new one."""
    _, recorder, team_id = writer
    await recorder.start()
    stuck = recorder._proc
    assert stuck is not None
    os.kill(stuck.pid, signal.SIGSTOP)  # it cannot answer
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(recorder.record([encode_row(generation("r1", team_id))]), 0.5)
    assert await _gone(stuck.pid)
    assert await recorder.record([encode_row(generation("r2", team_id))]) == 1


async def test_a_batch_the_writer_cannot_take_is_refused_and_the_writer_goes_on(writer: tuple[Store, Recorder, str]):
    _, recorder, team_id = writer
    await recorder.start()
    assert recorder._proc is not None
    pid = recorder._proc.pid
    with pytest.raises(StoreError, match="cannot record usage"):
        await recorder.record([b'[1,"not a whole record"]'])  # the accountant keeps it and retries
    assert await recorder.record([encode_row(generation("r1", team_id))]) == 1
    assert recorder._proc.pid == pid  # the same child: a refused batch is not a crash


async def test_close_stops_the_writer(sqlite_url: str):
    recorder = Recorder(sqlite_url)
    await recorder.start()
    assert recorder._proc is not None
    pid = recorder._proc.pid
    await recorder.close()
    assert not _alive(pid)
    await recorder.close()  # twice: nothing to do


async def test_a_store_the_writer_cannot_open_fails_the_start(tmp_path: Path):
    recorder = Recorder(f"sqlite:///{tmp_path}/no/such/folder/gateway.db")
    with pytest.raises(StoreError, match="cannot open the store"):
        await recorder.start()
    assert recorder._proc is None


async def test_the_writer_exits_when_its_worker_is_killed(sqlite_url: str, tmp_path: Path):
    """A worker killed with SIGKILL leaves no writer behind: its input closes and it exits."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from proxy.recorder import Recorder\n"
        "async def main():\n"
        f"    recorder = Recorder({sqlite_url!r})\n"
        "    await recorder.start()\n"
        "    print(recorder._proc.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert worker.stdout is not None
        child = int(await asyncio.wait_for(worker.stdout.readline(), 20))
        assert _alive(child)
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        assert await _gone(child)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
