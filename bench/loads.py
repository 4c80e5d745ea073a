"""Load generators, each measuring one target for a fixed time.

- `wrk_load`: plain chat requests with wrk (`-t1 --latency`, a generated Lua script for method, headers
  and body), parsed from wrk's report.
- `closed_loop`: the same with aiohttp, for machines without wrk: C workers, each sending its next
  request when the previous one is answered.
- `stream_load`: K workers, each opening one stream after the other, timing the first event from the
  moment the request is sent and every content event's delay (arrival minus the send time the mock
  stamps at the end of its text, `@t=<ns>`: it survives translation into another surface's events).
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
_STAMP = re.compile(rb"@t=(\d+)")
_STREAM_ENDS = (b"[DONE]", b'{"type":"message_stop"}')  # Chat Completions, Anthropic Messages
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
RAMP_STEP_TIMEOUT_S = 20.0  # a batch of streams not open by then: the target holds no more
WRK_SCRIPT = """wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
"""
_MS_PER_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class BenchError(Exception):
    """A benchmark could not run or measure; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go, with the key and model name that target expects."""

    name: str
    url: str
    api_key: str
    model: str
    surface: str = "chat"  # or "messages": the Anthropic Messages API
    extra_headers: tuple[tuple[str, str], ...] = ()  # what a peer needs besides the key (e.g. its routing)
    pid: int = 0  # the serving process (its children included) whose memory is sampled; 0: not sampled

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.api_key}",
            **dict(self.extra_headers),
        }

    def chat_body(self, *, stream: bool, **mock: Any) -> bytes:
        """A chat request; `mock` members (`x_mock_events`, `x_mock_gap_ms`) steer the mock upstream."""
        body: dict[str, Any] = {"model": self.model, "messages": PROMPT, "max_tokens": 256, **mock}
        if stream:
            body["stream"] = True
            if self.surface == "chat":
                body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class Result:
    """One measurement. For streams, requests are whole streams and latency is a stream's duration."""

    tool: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    ttft_ms: float | None = None
    event_delay_ms: float | None = None
    rss_mb: float | None = None  # the target's peak resident memory during the load (its workers included)
    per_stream_kb: float | None = None  # ramp: memory each open stream adds
    cpu_us: float | None = None  # the target's CPU time per request (per stream for stream loads)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def wrk_load(wrk: str, target: Target, connections: int, duration_s: int, workdir: Path) -> Result:
    script = workdir / f"{target.name}.lua"
    headers = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in target.headers.items())
    script.write_text(WRK_SCRIPT.format(body=target.chat_body(stream=False).decode(), headers=headers))
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s", "--latency"]
    argv += ["-s", str(script), target.url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    if proc.returncode != 0:
        raise BenchError(f"wrk against {target.name} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout)


def parse_wrk(report: str) -> Result:
    """Requests/s, p50, p99 and errors (non-2xx/3xx answers and socket errors) from `wrk --latency`."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", report, re.M)
    if rate is None or float(rate.group(1)) == 0:
        raise BenchError(f"wrk completed no requests:\n{report}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return Result(
        tool="wrk",
        requests_per_s=float(rate.group(1)),
        p50_ms=_wrk_percentile_ms(report, 50),
        p99_ms=_wrk_percentile_ms(report, 99),
        errors=errors,
    )


def _wrk_percentile_ms(report: str, pct: int) -> float:
    match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", report, re.M)
    if match is None:
        raise BenchError(f"no {pct}% latency in wrk's report:\n{report}")
    return float(match.group(1)) * _MS_PER_UNIT[match.group(2)]


async def _run_workers(
    workers: int, duration_s: float, one: Callable[[aiohttp.ClientSession], Awaitable[None]]
) -> float:
    """Run `workers` loops of `one(session)` until `duration_s` has passed; the elapsed seconds."""
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        async def loop() -> None:
            while time.perf_counter() < deadline:
                await one(session)

        await asyncio.gather(*(loop() for _ in range(workers)))
        return time.perf_counter() - start


def _require(samples: Sequence[float], target: Target, errors: int) -> None:
    if not samples:
        raise BenchError(f"no successful request to {target.name} ({errors} failed)")


class _Plain:
    """Plain chat requests to one target: each one's latency (from a given start) or its failure."""

    def __init__(self, target: Target):
        self.target = target
        self.body = target.chat_body(stream=False)
        self.latencies: list[float] = []
        self.errors = 0

    async def send(self, session: aiohttp.ClientSession, since: float) -> None:
        try:
            async with session.post(self.target.url, data=self.body, headers=self.target.headers) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            self.errors += 1
            return
        if resp.status != 200:
            self.errors += 1
            return
        self.latencies.append(time.perf_counter() - since)

    def result(self, tool: str, elapsed: float) -> Result:
        _require(self.latencies, self.target, self.errors)
        return Result(
            tool=tool,
            requests_per_s=len(self.latencies) / elapsed,
            p50_ms=percentile(self.latencies, 50) * 1e3,
            p99_ms=percentile(self.latencies, 99) * 1e3,
            errors=self.errors,
        )


async def closed_loop(target: Target, connections: int, duration_s: float) -> Result:
    """C workers, each sending its next request when the previous one is answered."""
    plain = _Plain(target)

    async def one(session: aiohttp.ClientSession) -> None:
        await plain.send(session, time.perf_counter())

    return plain.result("aiohttp", await _run_workers(connections, duration_s, one))


@dataclass(slots=True)
class _StreamStats:
    durations: list[float]
    ttfts: list[float]
    delays_ns: list[int]
    errors: int = 0


async def _read_stream(resp: aiohttp.ClientResponse, start: float, stats: _StreamStats) -> bool:
    """Time every event of one stream; whether it ended with `data: [DONE]`."""
    first: float | None = None
    done = False
    async for line in resp.content:
        received_ns = time.time_ns()
        if not line.startswith(b"data:"):
            continue
        if first is None:
            first = time.perf_counter() - start
        payload = line[5:].strip()
        if payload in _STREAM_ENDS:
            done = True
            continue
        stamp = _STAMP.search(payload)
        if stamp is not None:
            stats.delays_ns.append(received_ns - int(stamp.group(1)))
    if done and first is not None:
        stats.ttfts.append(first)
    return done


async def stream_load(target: Target, streams: int, duration_s: float) -> Result:
    body = target.chat_body(stream=True)
    stats = _StreamStats(durations=[], ttfts=[], delays_ns=[])

    async def one(session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        try:
            async with session.post(target.url, data=body, headers=target.headers) as resp:
                done = resp.status == 200 and await _read_stream(resp, start, stats)
        except (aiohttp.ClientError, TimeoutError):
            done = False
        if done:
            stats.durations.append(time.perf_counter() - start)
        else:
            stats.errors += 1

    elapsed = await _run_workers(streams, duration_s, one)
    _require(stats.durations, target, stats.errors)
    return Result(
        tool="aiohttp",
        requests_per_s=len(stats.durations) / elapsed,
        p50_ms=percentile(stats.durations, 50) * 1e3,
        p99_ms=percentile(stats.durations, 99) * 1e3,
        errors=stats.errors,
        ttft_ms=statistics.median(stats.ttfts) * 1e3,
        event_delay_ms=statistics.fmean(stats.delays_ns) / 1e6 if stats.delays_ns else None,
    )


async def open_loop(target: Target, rate: float, duration_s: float) -> Result:
    """Requests sent at a fixed rate whatever the answers do (open loop), latency counted from each one's
    scheduled send time: a slow answer cannot hold back the next request, so a stall shows in the p99
    instead of hiding (no coordinated omission)."""
    plain = _Plain(target)
    connector = aiohttp.TCPConnector(limit=0)  # as many connections as the rate needs
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * duration_s)):
            scheduled = start + i / rate
            wait = scheduled - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(plain.send(session, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return plain.result("aiohttp open loop", elapsed)


async def ramp_load(target: Target, streams: int, rss: Callable[[], int], step: int = 50) -> Result:
    """Open `streams` concurrent streams, `step` at a time, each held open (the mock sends an event a second);
    once all are open, the target's memory. Requests/s is how fast they opened; p50/p99 the time each took
    to its first event; `per_stream_kb` the memory each added over the idle target."""
    body = target.chat_body(stream=True, x_mock_events=3600, x_mock_gap_ms=1000)
    idle = rss()
    firsts: list[float] = []
    errors = 0
    held: list[aiohttp.ClientResponse] = []

    async def open_one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        start = time.perf_counter()
        try:
            resp = await session.post(target.url, data=body, headers=target.headers)
            if resp.status != 200:
                resp.release()
                errors += 1
                return
            held.append(resp)
            await resp.content.readuntil(b"\n\n")  # the first event
        except (aiohttp.ClientError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            errors += 1
            return
        firsts.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = time.perf_counter()
        try:
            for opened in range(0, streams, step):
                batch = asyncio.gather(*(open_one(session) for _ in range(min(step, streams - opened))))
                try:
                    await asyncio.wait_for(batch, RAMP_STEP_TIMEOUT_S)
                except TimeoutError:  # the target stopped taking streams: measure what it holds
                    break
            elapsed = time.perf_counter() - start
            peak = max(rss() for _ in range(3))
        finally:
            for resp in held:
                resp.close()
    _require(firsts, target, errors)
    return Result(
        tool="aiohttp ramp",
        requests_per_s=len(firsts) / elapsed,
        p50_ms=percentile(firsts, 50) * 1e3,
        p99_ms=percentile(firsts, 99) * 1e3,
        errors=streams - len(firsts),
        rss_mb=peak / 1e6 if peak else None,
        per_stream_kb=(peak - idle) / len(firsts) / 1024 if peak and idle else None,
    )


async def preflight(target: Target) -> None:
    """One plain and one streaming request, so a misconfigured target fails before any load."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        for stream in (False, True):
            async with session.post(target.url, data=target.chat_body(stream=stream), headers=target.headers) as r:
                text = await r.text()
            kind = "streaming" if stream else "plain"
            if r.status != 200:
                raise BenchError(f"{target.name}: a {kind} chat request was answered {r.status}: {text[:500]}")
            if stream and not any(end.decode() in text for end in _STREAM_ENDS):
                raise BenchError(f"{target.name}: the stream did not end (no [DONE] or message_stop): {text[-500:]}")
