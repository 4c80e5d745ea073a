"""Usage accounting: each request's generation record and wallet debit, written exactly once, off the hot path.

A finished request hands its `RequestMeta` to `Accountant.submit` (a deque append). Its cost comes off the
team's cached balance at once, so concurrent requests see it. One writer task turns waiting metas into
records and gives them to the store in batches. The store writes a batch's records and debits in one
transaction, and a record already written is never charged again. A failed write is retried, never
dropped. On shutdown `close` flushes what is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import final

import orjson

from proxy.credit import KeyBudgets, WalletCache
from proxy.meta import MEDIA_UNITS, RequestMeta, Usage
from proxy.store.base import ROW_COST, ROW_KEY, ROW_TEAM, Generation, Store, StoreError

log = logging.getLogger("proxy.accounting")

MAX_BATCH = 500
LINGER_S = 0.05  # how long a record may wait for others to share its transaction


def estimate(meta: RequestMeta) -> None:
    """Usage for a request the upstream billed but never reported (a stream cut short): about one token
    per streamed event after the first, and one input token per four bytes of request body."""
    if meta.usage is not None or meta.streamed_events <= 0:
        return
    output = max(meta.streamed_events - 1, 0)
    prompt = meta.request_bytes // 4
    meta.usage = Usage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output)
    meta.usage_source = "estimated"


def row(meta: RequestMeta, created_ms: int) -> tuple:
    """The generation record of a finished request, as a row in the store's column order."""
    usage = meta.usage
    usage_json = (
        {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
        }
        if usage
        else {}
    )
    if usage and usage.units():  # media units, each only when metered: token-only records stay as they were
        for name in MEDIA_UNITS:
            if value := getattr(usage, name):
                usage_json[name] = value
    return (
        meta.request_id,
        created_ms,
        meta.team_id,
        meta.key_id,
        meta.surface,
        meta.model,
        meta.provider,
        meta.upstream_model,
        meta.native_id,
        meta.stream,
        meta.status,
        200 <= meta.status < 300 and not meta.error_code,
        meta.error_code,
        meta.error_message,
        orjson.dumps(usage_json).decode(),
        meta.usage_source if usage else "none",
        meta.cost_nanos or 0,
        meta.currency,
        orjson.dumps(meta.pricing_lines).decode(),
        orjson.dumps(meta.timings(meta.t_end)).decode(),
    )


@final
class Accountant:
    __slots__ = (
        "_idle",
        "_queue",
        "_task",
        "_wake",
        "_writing",
        "budgets",
        "max_queue",
        "store",
        "unwritten",
        "wallets",
    )

    def __init__(self, store: Store, wallets: WalletCache, budgets: KeyBudgets, max_queue: int = 100_000):
        self.store = store
        self.wallets = wallets
        self.budgets = budgets
        self.max_queue = max_queue
        self.unwritten: dict[str, tuple | RequestMeta] = {}  # request id → waiting meta, then its row
        self._queue: deque[tuple[RequestMeta, int]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def backlogged(self) -> bool:
        """Too many records wait for the store: new requests are refused until it catches up."""
        return len(self._queue) >= self.max_queue

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, meta: RequestMeta) -> None:
        """Account a finished request: debit its cost in memory now, record it soon. Never blocks."""
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
        self.unwritten[meta.request_id] = meta
        self._queue.append((meta, int(time.time() * 1000)))
        self._idle.clear()
        self._wake.set()

    def lookup(self, team_id: str, request_id: str) -> Generation | None:
        """A record not yet in the store (by request id), built on demand."""
        waiting = self.unwritten.get(request_id)
        if waiting is None:
            return None
        values = waiting if isinstance(waiting, tuple) else row(waiting, int(time.time() * 1000))
        return Generation.from_row(values) if values[ROW_TEAM] == team_id else None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if len(self._queue) < MAX_BATCH:
                await asyncio.sleep(LINGER_S)  # let a batch gather: one transaction for many requests
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            rows = [row(meta, created) for meta, created in batch]
            for values in rows:
                self.unwritten[values[0]] = values
            self._writing = True
            try:
                await self._write(rows)
            finally:
                self._writing = False

    async def _write(self, rows: list[tuple]) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.record(rows)
                break
            except StoreError as e:  # keep the batch: nothing is dropped, it is tried again
                log.error("writing %d usage records failed (%s); retrying in %.1f s", len(rows), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for values in rows:
            self.unwritten.pop(values[0], None)
            cost = values[ROW_COST]
            if not cost:
                continue
            self.wallets.written(values[ROW_TEAM], cost)
            if values[ROW_KEY] in self.budgets.pending:  # counted for a limited key
                self.budgets.written(values[ROW_KEY], cost)

    async def flush(self) -> None:
        """Wait until every submitted record is in the store."""
        while self._queue or self._writing:
            await self._idle.wait()

    async def close(self, timeout: float) -> None:
        """Flush (for at most `timeout` seconds), then stop the writer."""
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except TimeoutError:
            log.error("%d usage records were not written before shutdown", len(self._queue) + len(self.unwritten))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
