"""A soak: the gateway under a steady mixed load for a while, watched for leaks and lost records.

`python -m bench --soak SECONDS [--soak-rate R]` starts the mock upstream and one gateway (one worker, SQLite,
accounting on), then sends R requests a second (default 100), open loop, of four kinds in a fixed rotation:
chat answered whole (5 of 10), streams of 20 events (2 of 10), streams the client drops after the first event
(1 of 10) and requests the provider fails (`x_mock_status: 500`: the gateway retries, then passes the 500 on;
2 of 10). Halfway through, the gateway reloads its config (SIGHUP). Every SAMPLE_S it samples the gateway's
resident memory and open descriptors, the in-flight gauge of its /metrics, and the record backlog: answers the
clients have read so far minus records in the store (briefly negative: a record is journaled before the last
byte of its answer is sent). At the end the load stops, the backlog must drain, and every
request id a client saw must be in the store exactly once.

It prints and saves the samples, the start (after WARMUP_S) and end figures, and a plot:
bench/results/soak-<time>.md, .json and .png.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bench.procs import rss_bytes

SAMPLE_S = 5.0
WARMUP_S = 60.0  # figures "at the start" are taken after this (caches, pools and allocator arenas filled)
DRAIN_S = 60.0  # the longest the backlog may take to drain after the load stops
KINDS = ("chat", "chat", "stream", "chat", "error", "chat", "stream", "abort", "chat", "error")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    in_flight: float
    answered: int
    recorded: int

    @property
    def backlog(self) -> int:
        return self.answered - self.recorded


class Soak:
    """The load, the sampling and the final checks against one running gateway."""

    def __init__(self, url: str, key: str, pid: int, store: Path, rate: int):
        self.url, self.key, self.pid, self.store, self.rate = url.rstrip("/"), key, pid, store, rate
        self.seen: list[str] = []  # request ids the clients got, one per answer
        self.outcomes: Counter[str] = Counter()
        self.samples: list[Sample] = []
        self.reloaded_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, seconds: float) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self.session = session
            started = time.monotonic()
            sampler = asyncio.create_task(self._sample_every(started))
            interval, sent = 1.0 / self.rate, 0
            while (elapsed := time.monotonic() - started) < seconds:
                if not self.reloaded_at and elapsed >= seconds / 2:
                    os.kill(self.pid, signal.SIGHUP)
                    self.reloaded_at = elapsed
                kind = KINDS[sent % len(KINDS)]
                task = asyncio.create_task(self._one(kind))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                sent += 1
                await asyncio.sleep(max(started + sent * interval - time.monotonic(), 0))  # the schedule's pace
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=60)
            deadline = time.monotonic() + DRAIN_S
            while True:
                await self._take(started)
                last = self.samples[-1]
                if (last.backlog <= 0 and last.in_flight == 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            sampler.cancel()

    async def _one(self, kind: str) -> None:
        body: dict[str, object] = {
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        }
        if kind in ("stream", "abort"):
            body.update(stream=True, x_mock_events=20, x_mock_gap_ms=5)
        if kind == "error":
            body["x_mock_status"] = 500
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            async with self.session.post(self.url + "/v1/chat/completions", json=body, headers=headers) as resp:
                request_id = resp.headers.get("x-request-id", "")
                if kind == "abort":
                    await resp.content.readuntil(b"\n\n")  # the first event, then the client goes away
                    resp.close()
                else:
                    await resp.read()
                if request_id:
                    self.seen.append(request_id)
                self.outcomes[f"{kind} {resp.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as e:
            self.outcomes[f"{kind} failed: {type(e).__name__}"] += 1

    async def _sample_every(self, started: float) -> None:
        while True:
            await self._take(started)
            await asyncio.sleep(SAMPLE_S)

    async def _take(self, started: float) -> None:
        in_flight = 0.0
        try:
            async with self.session.get(self.url + "/metrics") as resp:
                text = await resp.text()
            in_flight = sum(float(v) for v in re.findall(r"^gateway_in_flight_requests\{[^}]*\} (\S+)$", text, re.M))
        except aiohttp.ClientError:
            in_flight = float("nan")
        self.samples.append(
            Sample(
                t_s=round(time.monotonic() - started, 1),
                rss_mb=round(rss_bytes(self.pid) / 2**20, 1),
                fds=len(os.listdir(f"/proc/{self.pid}/fd")),
                in_flight=in_flight,
                answered=len(self.seen),
                recorded=await asyncio.to_thread(self._recorded),
            )
        )

    def _recorded(self) -> int:
        with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=10) as db:
            return db.execute("SELECT count(*) FROM generations").fetchone()[0]

    def check(self) -> dict[str, object]:
        """Every id a client saw is in the store once (the primary key makes twice impossible: counted too)."""
        with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True) as db:
            stored = Counter(r[0] for r in db.execute("SELECT request_id FROM generations"))
            # Answers none of the four kinds should get (the provider's 500s and dropped streams' 499 are asked
            # for): what they were, from their records.
            odd = db.execute(
                "SELECT status_code, error_code, substr(error_message, 1, 160), count(*) FROM generations "
                "WHERE status_code NOT IN (200, 499, 500) GROUP BY 1, 2, 3 ORDER BY 4 DESC"
            ).fetchall()
        seen = set(self.seen)
        return {
            "answers": len(self.seen),
            "distinct ids seen": len(seen),
            "records": sum(stored.values()),
            "seen but not recorded": len(seen - set(stored)),
            "recorded twice": sum(1 for n in stored.values() if n > 1),
            "unexpected": [f"{n} x {status} {code}: {message}" for status, code, message, n in odd],
        }


def summary(soak: Soak, seconds: float, checks: dict[str, object]) -> tuple[str, dict[str, object]]:
    """The Markdown report and its figures: start (first sample after WARMUP_S) against the end of the load."""
    under_load = [s for s in soak.samples if s.t_s <= seconds]
    warm = next((s for s in under_load if s.t_s >= WARMUP_S), under_load[0])
    end, last = under_load[-1], soak.samples[-1]
    peak_rss = max(s.rss_mb for s in under_load)
    lines = [
        f"# Soak, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{seconds:g} s at {soak.rate} requests/s (open loop): chat, streams, streams dropped by the client after "
        f"the first event, provider errors; config reloaded at {soak.reloaded_at:.0f} s. One gateway worker, SQLite.",
        "",
        "| figure | at warm-up end | at load end | after the drain |",
        "|---|---|---|---|",
        f"| time (s) | {warm.t_s:g} | {end.t_s:g} | {last.t_s:g} |",
        f"| RSS (MB) | {warm.rss_mb:g} | {end.rss_mb:g} (peak {peak_rss:g}) | {last.rss_mb:g} |",
        f"| open descriptors | {warm.fds} | {end.fds} | {last.fds} |",
        f"| in flight | {warm.in_flight:g} | {end.in_flight:g} | {last.in_flight:g} |",
        f"| record backlog | {warm.backlog} | {end.backlog} | {last.backlog} |",
        "",
        "Outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(soak.outcomes.items())),
        "",
        "Records: " + ", ".join(f"{k}: {v}" for k, v in checks.items() if k != "unexpected"),
        "",
        "Unexpected answers: " + ("; ".join(checks["unexpected"]) or "none"),  # type: ignore[arg-type]
    ]
    figures = {
        "warm": asdict(warm) | {"backlog": warm.backlog},
        "end": asdict(end) | {"backlog": end.backlog},
        "drained": asdict(last) | {"backlog": last.backlog},
        "peak_rss_mb": peak_rss,
        "outcomes": dict(soak.outcomes),
        "checks": checks,
    }
    return "\n".join(lines) + "\n", figures


def plot(soak: Soak, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = [s.t_s for s in soak.samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 8), dpi=110, sharex=True)
    series = [
        ("RSS (MB)", [s.rss_mb for s in soak.samples]),
        ("open descriptors", [s.fds for s in soak.samples]),
        ("in flight", [s.in_flight for s in soak.samples]),
        ("record backlog", [s.backlog for s in soak.samples]),
    ]
    for ax, (label, values) in zip(axes, series, strict=True):
        ax.plot(t, values, marker=".", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.axvline(soak.reloaded_at, color="grey", linestyle=":", linewidth=1)
        if t[-1] > WARMUP_S:
            ax.axvline(WARMUP_S, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[-1].set_xlabel("seconds (dotted: config reload; dashed: end of warm-up)")
    fig.suptitle(f"Soak: {soak.rate} requests/s, mixed (chat, streams, dropped streams, provider errors)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save(soak: Soak, seconds: float) -> str:
    checks = soak.check()
    markdown, figures = summary(soak, seconds, checks)
    stamp = f"soak-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}.md").write_text(markdown)
    payload = {"figures": figures, "samples": [asdict(s) for s in soak.samples], "reloaded_at": soak.reloaded_at}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(payload, indent=1))
    drawn = plot(soak, RESULTS / f"{stamp}.png")
    return f"{markdown}\nSaved bench/results/{stamp}.md (+ .json{', .png' if drawn else ''})"
