"""The requests page's live mode: new requests pushed to the browser as server-sent events as they are recorded.

One `Channel` per team being watched in this worker polls the store every `dashboard.live_interval_s` for the
team's latest records (one indexed read of at most BATCH rows, however many people watch) and hands those it has not
seen to every watcher; each watcher's stream filters them (model, key, outcome) and sends them as table rows. What
is read is what every instance recorded, so a watcher sees the requests of every worker and instance.

Records are keyed by when their request started, and written when it ended: a poll reads the last LOOKBACK of
them, so a long stream shows up when it ends. A team answering more than BATCH requests an interval shows the
newest BATCH of them. A watcher too slow to take its rows (its queue full) gets the table afresh instead.

Events: `rows` ({"html": rows, "reset": true when they replace the table}), `end` ({"reason"}: signed out, the
gateway stopping) after which the browser stops; a comment every TICK_S keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import orjson
from aiohttp import web

from proxy.dashboard import requests, views
from proxy.dashboard.keys import team_of, team_query
from proxy.errors import Code, GatewayError
from proxy.gateway import Gateway
from proxy.store.base import Generation, Store, StoreError

log = logging.getLogger("proxy.dashboard")

BATCH: Final = 200  # records read a poll
LOOKBACK_MS: Final = 15 * 60_000  # how far back a poll reads: a request that lasted longer is not shown
TICK_S: Final = 10.0  # a quiet stream sends a comment this often (proxies close idle ones), and checks its session
QUEUE: Final = 32  # polls' rows waiting for a slow watcher before it gets the table afresh
ROWS: Final = 200  # the most rows a live table keeps (the browser drops older ones)


class Watcher:
    __slots__ = ("missed", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[Generation] | None] = asyncio.Queue(QUEUE)
        self.missed = False  # rows were dropped: send the table afresh

    def give(self, rows: list[Generation] | None) -> None:
        try:
            self.queue.put_nowait(rows)
        except asyncio.QueueFull:
            self.missed = True
            if rows is None:  # the end must get through
                self.queue.get_nowait()
                self.queue.put_nowait(None)


class Channel:
    """One team's records as they are written, polled while anyone in this worker watches."""

    def __init__(self, team_id: str) -> None:
        self.team_id = team_id
        self.watchers: set[Watcher] = set()
        self.seen: dict[str, int] = {}  # request id → created_at, of the records already handed out
        self.task: asyncio.Task[None] | None = None

    async def poll(self, store: Store, interval_s: float) -> None:
        failing = False
        while self.watchers:
            now_ms = int(time.time() * 1000)
            try:
                records = await store.recent_generations(self.team_id, limit=BATCH, since_ms=now_ms - LOOKBACK_MS)
            except StoreError as e:
                if not failing:
                    log.warning("dashboard live mode: cannot read the latest requests: %s", e)
                failing = True
            except Exception:  # a fault of ours: logged once, and the watchers keep their stream
                if not failing:
                    log.exception("dashboard live mode: reading the latest requests failed")
                failing = True
            else:
                failing = False
                fresh = [r for r in reversed(records) if r.request_id not in self.seen]  # oldest first
                self.seen.update((r.request_id, r.created_at) for r in fresh)
                # The records a later poll can still return: within the look-back, and no older than the oldest
                # of a full read (newer ones only push it up).
                floor = max(now_ms - LOOKBACK_MS, records[-1].created_at if len(records) == BATCH else 0)
                if len(self.seen) > BATCH:
                    self.seen = {k: v for k, v in self.seen.items() if v >= floor}
                if fresh:  # the first poll's too: each watcher keeps what its own first read did not show
                    for watcher in tuple(self.watchers):
                        watcher.give(fresh)
            await asyncio.sleep(interval_s)


class LiveFeed:
    """This worker's channels, by team."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}

    def watch(self, store: Store, team_id: str, interval_s: float) -> Watcher:
        channel = self.channels.get(team_id)
        if channel is None:
            channel = self.channels[team_id] = Channel(team_id)
        watcher = Watcher()
        channel.watchers.add(watcher)
        if channel.task is None or channel.task.done():
            channel.task = asyncio.get_running_loop().create_task(channel.poll(store, interval_s))
        return watcher

    def leave(self, team_id: str, watcher: Watcher) -> None:
        channel = self.channels.get(team_id)
        if channel is None:
            return
        channel.watchers.discard(watcher)
        if not channel.watchers:
            del self.channels[team_id]
            if channel.task is not None:
                channel.task.cancel()

    async def close(self, app: web.Application) -> None:
        """The gateway is stopping: every stream ends (so that none holds the drain up)."""
        for channel in self.channels.values():
            for watcher in channel.watchers:
                watcher.give(None)


NONE: Final = '<tr class="none"><td colspan="9" class="muted">No request yet.</td></tr>'
FEED: Final = web.AppKey("dashboard_live", LiveFeed)


def _event(name: str, data: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def stream(request: web.Request, gw: Gateway, signed: views.Signed) -> web.StreamResponse:
    """`GET /dashboard/requests/live`: the team's latest requests (filtered as the page is), then each new one."""
    team_id, team_name = await team_of(request, gw, signed)
    if not team_id:
        raise GatewayError(Code.not_found, "Choose a team to watch its requests.")
    store = gw.store
    assert store is not None
    chosen, failed = requests.filters(request)
    names = {k.kid: k.name or k.kid for k in await store.list_keys(team_id)}
    link = team_query(signed, team_name)

    def rows_html(records: list[Generation]) -> str:
        if not records:
            return NONE
        return "".join(
            views.fragment("_request_row.html", row=requests.row(r, names), team_query=link) for r in records
        )

    def wanted(record: Generation) -> bool:
        return (
            (not chosen["model"] or record.model_id == chosen["model"])
            and (not chosen["key"] or record.key_id == chosen["key"])
            and (failed is None or requests.ok(record) != failed)
        )

    async def snapshot() -> tuple[bytes, set[str], int]:
        """The table afresh, the requests in it, and the oldest time a new row may have (older ones belong to the
        pages of older requests)."""
        latest = await store.recent_generations(
            team_id, limit=requests.PAGE, model=chosen["model"], key_id=chosen["key"], failed=failed
        )
        oldest = latest[-1].created_at if len(latest) == requests.PAGE else 0
        return _event("rows", {"html": rows_html(latest), "reset": True}), {r.request_id for r in latest}, oldest

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    views.secure_headers(response)
    feed = request.app[FEED]
    watcher = feed.watch(store, team_id, gw.config.dashboard.live_interval_s)
    try:
        await response.prepare(request)
        await response.write(b"retry: 5000\n\n")
        first, shown, oldest = await snapshot()  # after joining the channel: nothing recorded since is missed
        await response.write(first)
        recheck = time.monotonic() + TICK_S
        while True:
            try:
                rows = await asyncio.wait_for(watcher.queue.get(), TICK_S)
            except TimeoutError:
                await response.write(b": ping\n\n")
            else:
                if rows is None:
                    await response.write(_event("end", {"reason": "The gateway is stopping: reload the page later."}))
                    break
                if watcher.missed:  # rows were dropped: the table afresh (what is queued is in it)
                    watcher.missed = False
                    ending = None in (watcher.queue.get_nowait() for _ in range(watcher.queue.qsize()))
                    if ending:
                        watcher.give(None)
                    first, shown, oldest = await snapshot()
                    await response.write(first)
                    continue
                new = [r for r in rows if r.created_at >= oldest and r.request_id not in shown and wanted(r)]
                if new:
                    await response.write(_event("rows", {"html": rows_html(new[::-1])}))  # newest first
            if time.monotonic() >= recheck:
                recheck = time.monotonic() + TICK_S
                if await views.signed_in(request, gw) is None:
                    await response.write(_event("end", {"reason": "Signed out: sign in again to watch."}))
                    break
    except ConnectionError:  # the browser went away
        pass
    except StoreError as e:
        with contextlib.suppress(ConnectionError):
            await response.write(_event("end", {"reason": f"The store is unavailable: {e}"}))
    except Exception:  # a fault of ours, once the stream has begun: logged, and the browser told
        log.exception("dashboard live stream failed")
        with contextlib.suppress(ConnectionError):
            await response.write(_event("end", {"reason": "The live view failed (the gateway's log says why)."}))
    finally:
        feed.leave(team_id, watcher)
    return response
