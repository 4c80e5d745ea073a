"""The results table: samples averaged over rounds, compared with `direct`, written as Markdown and JSON."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.loads import Result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DIRECT = "direct"
COLUMNS = (
    "target",
    "load",
    "tool",
    "requests/s",
    "p50 ms",
    "p99 ms",
    "added p50 vs direct",
    "TTFT ms",
    "per-event delay ms",
    "added per-event delay vs direct",
    "CPU µs per request",
    "RSS MB",
    "KB per stream",
    "errors",
)
NOTES = """\
Means over {rounds} round(s) of {duration} s per measurement; targets interleaved within each round.
For stream loads, requests/s counts whole streams and p50/p99 are stream durations.
TTFT: median time from sending a streaming request to its first event.
Per-event delay: mean over content events of (arrival time - the send time the mock stamps in their text); direct
includes the client's own cost, so the added columns (this row minus direct, same load) are the overhead.
Open loop: requests sent at a fixed rate whatever the answers do; latency from each one's scheduled send time.
Ramp: streams opened 50 at a time and held open; p50/p99 are times to the first event, KB per stream is the
memory each open stream added over the idle target. CPU µs per request: the target's CPU time (user + system,
all its processes and threads) over the measurement divided by the requests (streams) it answered; unlike
requests/s it barely moves when other processes compete for the cores (not sampled for direct).
RSS: the target's peak resident memory during the load, its worker processes included (not sampled for direct).
Errors: non-200 answers, failed connections and streams without `data: [DONE]` (or `message_stop`)."""


@dataclass(frozen=True, slots=True)
class Sample:
    round: int
    target: str
    load: str
    result: Result


@dataclass(frozen=True, slots=True)
class Row:
    target: str
    load: str
    tool: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    ttft_ms: float | None
    event_delay_ms: float | None
    rss_mb: float | None = None
    per_stream_kb: float | None = None
    cpu_us: float | None = None
    added_p50_ms: float | None = None
    added_event_delay_ms: float | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _difference(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or baseline is None else value - baseline


def _row(target: str, load: str, results: Sequence[Result]) -> Row:
    return Row(
        target=target,
        load=load,
        tool=results[0].tool,
        requests_per_s=statistics.fmean(r.requests_per_s for r in results),
        p50_ms=statistics.fmean(r.p50_ms for r in results),
        p99_ms=statistics.fmean(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
        ttft_ms=_mean([r.ttft_ms for r in results]),
        event_delay_ms=_mean([r.event_delay_ms for r in results]),
        rss_mb=max((r.rss_mb for r in results if r.rss_mb is not None), default=None),
        per_stream_kb=_mean([r.per_stream_kb for r in results]),
        cpu_us=_mean([r.cpu_us for r in results]),
    )


def aggregate(samples: Sequence[Sample], targets: Sequence[str]) -> list[Row]:
    """One row per (load, target): loads in the order measured, targets in the order given, with the
    differences to `direct`."""
    loads = list(dict.fromkeys(sample.load for sample in samples))
    groups: dict[tuple[str, str], list[Result]] = {}
    for sample in sorted(samples, key=lambda s: (loads.index(s.load), targets.index(s.target))):
        groups.setdefault((sample.load, sample.target), []).append(sample.result)
    rows = {key: _row(key[1], key[0], results) for key, results in groups.items()}
    compared = []
    for (load, target), row in rows.items():
        direct = rows.get((load, DIRECT))
        if direct is not None and target != DIRECT:
            row = replace(
                row,
                added_p50_ms=row.p50_ms - direct.p50_ms,
                added_event_delay_ms=_difference(row.event_delay_ms, direct.event_delay_ms),
            )
        compared.append(row)
    return compared


@dataclass(frozen=True, slots=True)
class Ratio:
    """A target's CPU per request over the baseline's, round by round (same load), and their median."""

    target: str
    load: str
    median: float
    rounds: list[float]


def cpu_ratios(samples: Sequence[Sample], baseline: str) -> list[Ratio]:
    """Each target's CPU per request divided by `baseline`'s in the same round and load; rounds where either
    has no CPU figure are left out. The median of those ratios moves far less than a ratio of means when the
    machine's speed drifts between rounds (both were measured minutes apart at most, in turn)."""
    cpu = {(s.round, s.load, s.target): s.result.cpu_us for s in samples}
    found: dict[tuple[str, str], list[float]] = {}
    for s in samples:
        base = cpu.get((s.round, s.load, baseline))
        if s.target == baseline or not base or s.result.cpu_us is None:
            continue
        found.setdefault((s.target, s.load), []).append(s.result.cpu_us / base)
    return [Ratio(t, load, statistics.median(rs), rs) for (t, load), rs in found.items()]


def markdown_ratios(ratios: Sequence[Ratio], baseline: str) -> str:
    if not ratios:
        return ""
    lines = [f"CPU per request over {baseline}'s, median of the per-round ratios (same load, same round):", ""]
    for r in ratios:
        each = ", ".join(f"{x:.3f}" for x in r.rounds)
        lines.append(f"- {r.target}, {r.load}: **{r.median:.3f}x** ({each})")
    return "\n".join(lines) + "\n"


def _ms(value: float | None, sign: str = "") -> str:
    return "—" if value is None else f"{value:{sign}.2f}"


def _cells(row: Row) -> list[str]:
    return [
        row.target,
        row.load,
        row.tool,
        f"{row.requests_per_s:,.0f}",
        _ms(row.p50_ms),
        _ms(row.p99_ms),
        _ms(row.added_p50_ms, "+"),
        _ms(row.ttft_ms),
        _ms(row.event_delay_ms),
        _ms(row.added_event_delay_ms, "+"),
        "—" if row.cpu_us is None else f"{row.cpu_us:,.0f}",
        "—" if row.rss_mb is None else f"{row.rss_mb:,.0f}",
        "—" if row.per_stream_kb is None else f"{row.per_stream_kb:,.0f}",
        str(row.errors),
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def machine_info(wrk: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "platform": platform.platform(),
    }
    if wrk is not None:
        banner = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
        info["wrk"] = " ".join(banner.split()[:2])
    return info


def _line(values: dict[str, Any]) -> str:
    return " · ".join(f"{key}: {value}" for key, value in values.items())


def markdown_report(
    rows: Sequence[Row],
    info: dict[str, Any],
    settings: dict[str, Any],
    title: str,
    skipped: dict[str, str] | None = None,
    ratios: str = "",
) -> str:
    notes = NOTES.format(rounds=settings["rounds"], duration=settings["duration_s"])
    skips = "".join(f"- skipped {name}: {why}\n" for name, why in (skipped or {}).items())
    skips = f"\n{skips}" if skips else ""
    ratios = f"\n{ratios}" if ratios else ""
    table = markdown_table(rows)
    return f"# {title}\n\n{_line(info)}\n\n{_line(settings)}\n\n{table}\n{skips}{ratios}\n{notes}\n"


def plot(rows: Sequence[Row], path: Path) -> Path | None:
    """Latency against offered load, one line per target (p50 solid, p99 dashed), from the open-loop rows;
    a PNG at `path`. None when matplotlib is not installed or there are fewer than two rates."""
    points: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        if row.load.startswith("open ") and row.load.endswith("/s"):
            rate = float(row.load.removeprefix("open ").removesuffix("/s"))
            points.setdefault(row.target, []).append((rate, row.p50_ms, row.p99_ms))
    if not points or max(len(p) for p in points.values()) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    for target, series in points.items():
        series.sort()
        rates = [p[0] for p in series]
        (line,) = ax.plot(rates, [p[1] for p in series], marker="o", label=f"{target} p50")
        ax.plot(rates, [p[2] for p in series], linestyle="--", color=line.get_color(), label=f"{target} p99")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency vs load, non-streaming chat")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save(stamp: str, report: str, payload: dict[str, Any]) -> Path:
    """Write `<stamp>.json`, `<stamp>.md` and `latest.md` under bench/results; the Markdown path.

    `payload` may hold the `Row` and `Sample` dataclasses: orjson serializes them."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{stamp}.json").write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    path = RESULTS_DIR / f"{stamp}.md"
    path.write_text(report)
    (RESULTS_DIR / "latest.md").write_text(report)
    return path
