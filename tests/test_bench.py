"""The benchmark runs end to end (a 1-second smoke run): every target answers, nothing errors."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_quick_run_measures_all_targets():
    before = set((ROOT / "bench" / "results").glob("*.json"))
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--streams", "8", "--events", "5", "--gap-ms", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    new = set((ROOT / "bench" / "results").glob("*.json")) - before
    assert len(new) == 1
    rows = json.loads(next(iter(new)).read_text())["rows"]
    measured = {(row["target"], row["load"].split(" ")[0]) for row in rows if row["requests_per_s"] > 0}
    for target in ("direct", "bare", "gateway", "gateway-messages"):
        assert {(target, "chat"), (target, "stream")} <= measured, rows
    assert all(row["errors"] == 0 for row in rows), rows
    gateway_stream = next(r for r in rows if r["target"] == "gateway" and r["load"].startswith("stream"))
    assert gateway_stream["ttft_ms"] > 0 and gateway_stream["event_delay_ms"] is not None
    translated = next(r for r in rows if r["target"] == "gateway-messages" and r["load"].startswith("stream"))
    assert translated["event_delay_ms"] is not None  # the send-time stamp survived the translation
