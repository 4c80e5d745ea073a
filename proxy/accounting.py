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

import msgspec
import orjson

from proxy.credit import WalletCache
from proxy.meta import RequestMeta, Usage
from proxy.store.base import Generation, Store, StoreError

log = logging.getLogger("proxy.accounting")

MAX_BATCH = 500
_TIMINGS = (
    "latency_ms",
    "provider_latency_ms",
    "ttft_ms",
    "generation_ms",
    "tpot_ms",
    "throughput_tps",
    "output_speed_tps",
    "gateway_overhead_ms",
    "attempts",
)


def estimate(meta: RequestMeta) -> None:
    """Usage for a request the upstream billed but never reported (a stream cut short): about one token
    per streamed event after the first, and one input token per four bytes of request body."""
    if meta.usage is not None or meta.streamed_events <= 0:
        return
    output = max(meta.streamed_events - 1, 0)
    prompt = meta.request_bytes // 4
    meta.usage = Usage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output)
    meta.usage_source = "estimated"


def generation(meta: RequestMeta, created_ms: int) -> Generation:
    timings = meta.as_dict(meta.t_end)
    usage = meta.usage
    return Generation(
        request_id=meta.request_id,
        created_at=created_ms,
        team_id=meta.team_id,
        key_id=meta.key_id,
        endpoint=meta.surface,
        model_id=meta.model,
        provider=meta.provider,
        upstream_model=meta.upstream_model,
        native_response_id=meta.native_id,
        stream=meta.stream,
        status_code=meta.status,
        success=200 <= meta.status < 300 and not meta.error_code,
        error_code=meta.error_code,
        error_message=meta.error_message,
        usage=msgspec.Raw(
            orjson.dumps(
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
        ),
        usage_source=meta.usage_source if usage else "none",
        cost_nanos=meta.cost_nanos or 0,
        currency=meta.currency,
        pricing_lines=msgspec.Raw(orjson.dumps(meta.pricing_lines)),
        timings=msgspec.Raw(orjson.dumps({k: timings[k] for k in _TIMINGS})),
    )


@final
class Accountant:
    __slots__ = (
        "_idle",
        "_queue",
        "_task",
        "_wake",
        "_writing",
        "max_queue",
        "pending",
        "store",
        "unwritten",
        "wallets",
    )

    def __init__(self, store: Store, wallets: WalletCache, max_queue: int = 100_000):
        self.store = store
        self.wallets = wallets
        self.max_queue = max_queue
        self.pending = wallets.pending  # team → debits submitted but not yet committed
        self.unwritten: dict[str, Generation | RequestMeta] = {}  # request id → waiting record
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
            meta.price(meta.tariff)
        cost = meta.cost_nanos or 0
        if cost:
            self.wallets.adjust(meta.team_id, -cost)
            self.pending[meta.team_id] = self.pending.get(meta.team_id, 0) + cost
        self.unwritten[meta.request_id] = meta
        self._queue.append((meta, int(time.time() * 1000)))
        self._idle.clear()
        self._wake.set()

    def lookup(self, team_id: str, request_id: str) -> Generation | None:
        """A record not yet in the store (by request id), built on demand."""
        waiting = self.unwritten.get(request_id)
        if waiting is None or waiting.team_id != team_id:
            return None
        if isinstance(waiting, Generation):
            return waiting
        return generation(waiting, int(time.time() * 1000))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            records = [generation(meta, created) for meta, created in batch]
            for record in records:
                self.unwritten[record.request_id] = record
            self._writing = True
            try:
                await self._write(records)
            finally:
                self._writing = False

    async def _write(self, records: list[Generation]) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.record(records)
                break
            except StoreError as e:  # keep the batch: nothing is dropped, it is tried again
                log.error("writing %d usage records failed (%s); retrying in %.1f s", len(records), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for record in records:
            self.unwritten.pop(record.request_id, None)
            if record.cost_nanos:
                left = self.pending.get(record.team_id, 0) - record.cost_nanos
                if left:
                    self.pending[record.team_id] = left
                else:
                    self.pending.pop(record.team_id, None)

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
