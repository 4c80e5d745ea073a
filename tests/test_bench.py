"""The benchmark runs end to end (a 1-second smoke run): every target answers (those on PostgreSQL or behind
nginx where they are installed), nothing errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.pg_server import find_bin_dir
from tests.conftest import ROOT

BASELINE = ("--baseline", "gateway")  # each target's CPU per request over the gateway's, reported too


def test_bench_quick_run_measures_all_targets(tmp_path):
    before = set((ROOT / "bench" / "results").glob("*.json"))
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--streams", "8", "--events", "5", "--gap-ms", "2", *BASELINE],
        cwd=ROOT,
        # LiteLLM and Portkey, even when installed on this machine, are skipped: the smoke test stays quick
        # and checks the skip path (tests/test_bench_peers.py checks how they are set up).
        env={**os.environ, "BENCH_PEERS_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    new = set((ROOT / "bench" / "results").glob("*.json")) - before
    assert len(new) == 1
    rows = json.loads(next(iter(new)).read_text())["rows"]
    payload = json.loads(next(iter(new)).read_text())
    measured = {(row["target"], row["load"].split(" ")[0]) for row in rows if row["requests_per_s"] > 0}
    expected = ["direct", "bare", "gateway", "gateway-percore", "gateway-messages", "gateway-cache-hit", "gateway-otel"]
    nginx = shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")
    if nginx:
        expected.append("nginx")
    else:
        assert "nginx" in payload["skipped"]
    if find_bin_dir() is not None:  # one gateway on PostgreSQL, and three behind nginx
        expected += ["gateway-pg", "gateway-pg-x3"] if nginx else ["gateway-pg"]
    else:
        assert "PostgreSQL is not installed" in payload["skipped"]["gateway-pg"]
    if find_bin_dir() is None or not nginx:
        assert "gateway-pg-x3" in payload["skipped"]
    for target in expected:
        assert {(target, "chat"), (target, "stream"), (target, "open")} <= measured, rows
        assert (target, "ramp") in measured or target in ("gateway-messages", "gateway-cache-hit"), rows
    for peer in ("litellm", "portkey"):
        assert "not installed: python -m bench --install-peers" in payload["skipped"][peer]
    gateway_ramp = next(r for r in rows if r["target"] == "gateway" and r["load"].startswith("ramp"))
    assert 10 < gateway_ramp["rss_mb"] < 500
    assert all(row["errors"] == 0 for row in rows), rows
    gateway_stream = next(r for r in rows if r["target"] == "gateway" and r["load"].startswith("stream"))
    assert gateway_stream["ttft_ms"] > 0 and gateway_stream["event_delay_ms"] is not None
    translated = next(r for r in rows if r["target"] == "gateway-messages" and r["load"].startswith("stream"))
    assert translated["event_delay_ms"] is not None  # the send-time stamp survived the translation
    otel = next(r for r in payload["cpu_ratios"] if r["target"] == "gateway-otel" and r["load"].startswith("chat"))
    assert len(otel["rounds"]) == 1 and otel["median"] == otel["rounds"][0] > 0
    assert not any(r["target"] in ("gateway", "direct") for r in payload["cpu_ratios"])  # direct: no CPU figure


def test_cpu_ratios_are_the_median_of_each_rounds_ratio_to_the_baseline():
    from bench.loads import Result
    from bench.report import Sample, cpu_ratios, markdown_ratios
    from bench.run import parse_args

    def sample(round_no, target, cpu):
        return Sample(round_no, target, "chat c=32", Result("wrk", 1000.0, 1.0, 2.0, 0, cpu_us=cpu))

    samples = [sample(1, "gateway", 100.0), sample(1, "traced", 110.0), sample(2, "traced", 150.0)]
    samples += [sample(2, "gateway", 150.0), sample(3, "gateway", 200.0), sample(3, "traced", 260.0)]
    samples += [sample(4, "traced", 90.0), sample(5, "gateway", 100.0), sample(5, "traced", None)]
    [ratio] = cpu_ratios(samples, "gateway")  # round 4 has no baseline, round 5 no figure: left out
    assert (ratio.target, ratio.rounds, ratio.median) == ("traced", [1.1, 1.0, 1.3], 1.1)
    assert "traced, chat c=32: **1.100x** (1.100, 1.000, 1.300)" in markdown_ratios([ratio], "gateway")
    with pytest.raises(SystemExit):
        parse_args(["--targets", "bare,gateway", "--baseline", "nginx"])


def test_a_short_soak_loses_no_record_and_ends_with_nothing_in_flight():
    before = set((ROOT / "bench" / "results").glob("soak-*.json"))
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--soak", "6", "--soak-rate", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (new,) = set((ROOT / "bench" / "results").glob("soak-*.json")) - before
    payload = json.loads(new.read_text())
    figures, samples = payload["figures"], payload["samples"]
    checks = figures["checks"]
    assert checks["answers"] >= 200 and checks["answers"] == checks["distinct ids seen"], checks
    assert checks["seen but not recorded"] == 0 and checks["recorded twice"] == 0, checks
    assert figures["drained"]["in_flight"] == 0 and figures["drained"]["backlog"] <= 0, figures
    outcomes = figures["outcomes"]
    assert {"chat 200", "stream 200", "abort 200", "error 500"} <= set(outcomes), outcomes
    assert not [k for k in outcomes if "failed" in k], outcomes
    assert 0 < payload["reloaded_at"] < 6 and len(samples) >= 2 and all(s["rss_mb"] > 10 for s in samples)


def test_the_server_floors_pass_chat_and_streams_through():
    """`floor-aiohttp` and `floor-lean` (bench/floor_proxy.py, named only on request): the gateway's upstream
    client behind aiohttp's server and behind a bare protocol answer every chat request and relay every stream
    whole (`data: [DONE]` included), with CPU measured."""
    options = ["--quick", "--targets", "floor-aiohttp,floor-lean", "--loads", "c32,c1,stream", "--streams", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "bench", *options, "--events", "5", "--gap-ms", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for target in ("floor-aiohttp", "floor-lean"):
        rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {target} |")]
        assert len(rows) == 3, result.stdout[-3000:]
        for row in rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert float(cells[3].replace(",", "")) > 0 and cells[-1] == "0", row  # requests/s, errors
            assert cells[10] not in ("", "—"), row  # CPU µs per request
