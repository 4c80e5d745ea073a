"""Usage accounting: each request's generation record and wallet debit, written exactly once, off the hot path,
and kept through a crash.

A finished request hands its `RequestMeta` to `Accountant.submit`, once (a second call is a no-op). Its cost
comes off the team's cached balance at once, so concurrent requests see it; its record is built, appended to
this worker's journal (one `os.write`: see `proxy.journal`) and queued. One writer task gives queued records
to the store in batches. The store writes a batch's records and debits in one transaction, and a record
already written is never charged again, so replaying the journal after a crash is safe. A failed write is
retried, never dropped. On shutdown `close` flushes what is waiting; on start, and every ADOPT_EVERY_S,
the journals of dead workers are replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, final

from proxy.credit import KeyBudgets, WalletCache
from proxy.journal import ROTATE_BYTES, Journal
from proxy.meta import RequestMeta, Usage
from proxy.records import generation, line
from proxy.store.base import Generation, StoreError

log = logging.getLogger("proxy.accounting")

MAX_BATCH = 500
LINGER_S = 0.05  # how long a record may wait for others to share its transaction
ADOPT_EVERY_S = 30.0  # how often the writer looks for journals left by dead workers


class Writes(Protocol):
    """What the accountant needs of the store: `Store.record` and `Store.sync`. The store itself (its writes in a
    thread of this worker, or on its event loop) or a `proxy.recorder.Recorder` (in a child process)."""

    async def record(self, lines: Sequence[bytes]) -> int: ...
    async def sync(self) -> None: ...


_Entry = tuple[str, str, str, int, bytes]  # a submitted record: request id, team, key, cost, journal line


def estimate(meta: RequestMeta) -> None:
    """Usage for a request the upstream billed but never reported (a stream cut short): about one token
    per streamed event after the first, and one input token per four bytes of request body."""
    if meta.usage is not None or meta.streamed_events <= 0:
        return
    output = max(meta.streamed_events - 1, 0)
    prompt = meta.request_bytes // 4
    meta.usage = Usage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output)
    meta.usage_source = "estimated"


@final
class Accountant:
    __slots__ = (
        "_backlog",
        "_idle",
        "_queue",
        "_task",
        "_wake",
        "_writing",
        "budgets",
        "fsync_s",
        "journal",
        "max_queue",
        "store",
        "unwritten",
        "wallets",
    )

    def __init__(
        self,
        store: Writes,
        wallets: WalletCache,
        budgets: KeyBudgets,
        journal: Journal,
        max_queue: int = 100_000,
        fsync_s: float = 1.0,
        backlog: Any = None,
    ):
        self.store = store
        self.wallets = wallets
        self.budgets = budgets
        self.journal = journal
        self.max_queue = max_queue
        self.fsync_s = fsync_s  # 0: the journal is never fsynced
        self.unwritten: dict[str, _Entry] = {}  # request id → its record, until the store has it
        self._queue: deque[_Entry] = deque()  # in the journal's order
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writing = False
        self._task: asyncio.Task[None] | None = None
        self._backlog = backlog  # gateway_accounting_backlog, labelled by writer: set once a batch, never per request

    @property
    def backlogged(self) -> bool:
        """Too many records wait for the store: new requests are refused until it catches up."""
        return len(self._queue) >= self.max_queue

    async def start(self) -> None:
        """Open this worker's journal, replay those dead workers left (before serving), start the writer."""
        self.journal.open()
        await self.adopt()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, meta: RequestMeta) -> None:
        """Account a finished request: debit its cost in memory and journal its record now, store it soon.
        Never blocks (the journal append is one write to the page cache). Once per request: a second call
        is a no-op, so a handler may submit before its last write and again in its `finally`."""
        if meta.accounted:
            return
        meta.accounted = True
        if meta.cost_nanos is None and meta.tariff is not None:
            estimate(meta)
            if meta.usage is not None:  # a provider answered (or streamed): bill it; else nothing to bill
                meta.price(meta.tariff)
        cost = meta.cost_nanos or 0
        if not cost and meta.usage is None and self.backlogged:
            return  # nothing to bill (a refusal while the store lags): its record would only grow the queue
        if cost:
            self.wallets.debit(meta.team_id, cost)
            if meta.key_limited:
                self.budgets.add(meta.key_id, cost)
        data = line(meta, int(time.time() * 1000))
        self.journal.append(data)
        entry = (meta.request_id, meta.team_id, meta.key_id, cost, data)
        self.unwritten[meta.request_id] = entry
        self._queue.append(entry)
        self._idle.clear()
        self._wake.set()

    def lookup(self, team_id: str, request_id: str) -> Generation | None:
        """A record not yet in the store (by request id)."""
        entry = self.unwritten.get(request_id)
        return generation(entry[4]) if entry is not None and entry[1] == team_id else None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        adopt_at = loop.time() + ADOPT_EVERY_S
        sync_at = loop.time() + self.fsync_s
        while True:
            if not self._queue:
                if self._backlog is not None:
                    self._backlog.set(0)
                self._idle.set()
                self._wake.clear()
                due = min(adopt_at, sync_at) if self.fsync_s and self.journal.dirty else adopt_at
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(due - loop.time(), 0.0))
            now = loop.time()
            if self.fsync_s and now >= sync_at:
                sync_at = now + self.fsync_s
                if self.journal.dirty:
                    await asyncio.to_thread(self.journal.sync)  # off the event loop: it waits for the disk
            if now >= adopt_at:
                adopt_at = now + ADOPT_EVERY_S
                await self.adopt()
            if not self._queue:
                continue
            if len(self._queue) < MAX_BATCH:
                await asyncio.sleep(LINGER_S)  # let a batch gather: one transaction for many requests
            if self._backlog is not None:
                self._backlog.set(len(self._queue))
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            self._writing = True
            try:
                await self._write(batch)
            finally:
                self._writing = False
            await self._settle()

    async def _write(self, batch: list[_Entry]) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.record([entry[4] for entry in batch])
                break
            except StoreError as e:  # keep the batch: nothing is dropped, it is tried again
                log.error("writing %d usage records failed (%s); retrying in %.1f s", len(batch), e, delay)
            except Exception:  # a fault in the gateway: the writer must not die of it (`flush` would wait forever)
                log.exception("writing %d usage records failed; retrying in %.1f s", len(batch), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        for request_id, team_id, key_id, cost, _ in batch:
            self.unwritten.pop(request_id, None)
            if not cost:
                continue
            self.wallets.written(team_id, cost)
            if key_id in self.budgets.pending:  # counted for a limited key
                self.budgets.written(key_id, cost)

    async def _settle(self) -> None:
        """After a batch: start a new journal segment when the active one is big, and delete the retired
        ones whose every line is in the store (all but the queued lines, the newest, are)."""
        journal = self.journal
        if journal.size >= ROTATE_BYTES:
            journal.rotate()
        done = journal.applied(journal.appended - len(self._queue))
        if not done:
            return
        if self.fsync_s:  # a power loss must not take from the store what the journal no longer holds
            try:
                await self.store.sync()
            except StoreError as e:
                log.warning("keeping applied journal segments: %s", e)
                return
        journal.drop(done)

    async def adopt(self) -> None:
        """Replay the journal segments of dead workers into the store, then delete them. Idempotent: a
        record the store has already is neither written nor charged again. A segment the store cannot
        take now is left for the next try."""
        for segment in await asyncio.to_thread(self.journal.adopt):
            try:
                new = 0
                for start in range(0, len(segment.lines), MAX_BATCH):
                    new += await self.store.record(segment.lines[start : start + MAX_BATCH])
                if self.fsync_s:
                    await self.store.sync()
            except StoreError as e:
                segment.release()
                log.error("cannot replay the accounting journal %s yet (%s); trying again later", segment.path, e)
                continue
            except BaseException:
                segment.release()
                raise
            segment.done()
            if segment.skipped:
                log.warning("accounting journal %s: skipped %d torn or unreadable lines", segment.path, segment.skipped)
            log.info(
                "replayed %d usage records (%d not yet in the store) from %s, left by a dead worker",
                len(segment.lines),
                new,
                segment.path,
            )

    async def flush(self) -> None:
        """Wait until every submitted record is in the store."""
        while self._queue or self._writing:
            await self._idle.wait()

    async def close(self, timeout: float) -> None:
        """Flush (for at most `timeout` seconds), then stop the writer. When every record is in the store,
        the journal is deleted; otherwise it stays, and the next start replays it."""
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except TimeoutError:
            log.error(
                "%d usage records were not written before shutdown: they stay in the journal (%s) and are "
                "written at the next start",
                len(self.unwritten),
                self.journal.directory,
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        applied = not self._queue and not self._writing
        if applied and self.fsync_s:
            try:
                await self.store.sync()
            except StoreError:
                applied = False
        self.journal.close(applied)
