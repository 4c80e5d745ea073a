"""Measure the gateway against a bare proxy and the mock upstream itself, in one run.

`python -m bench [--duration S] [--rounds R] [--targets direct,bare,gateway,gateway-noacct,gateway-messages] [--quick]`

Starts the mock upstream, the bare proxy and the gateway (with a fresh key in a temporary store) on
free ports of 127.0.0.1, then measures every load against every target, round-robin within each load
step and repeated for R rounds, and prints and saves the table (bench/results/). Every child process is
stopped at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import uvloop

from bench import report
from bench.loads import BenchError, Result, Target, closed_loop, preflight, stream_load, wrk_load

REPO = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"
GATEWAY_CONFIG = "config/gateway.yaml"
TARGETS = ("direct", "bare", "gateway", "gateway-noacct", "gateway-messages")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
WARMUP_CONNECTIONS = 8
UPSTREAM_KEY = "sk-bench"
# Never send benchmark traffic through a proxy from the environment: everything stays on 127.0.0.1.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    connections: int
    stream: bool


class Processes:
    """Child processes, each in its own process group (so a Ctrl-C reaches only us), all stopped on exit."""

    def __init__(self, logdir: Path):
        self._logdir = logdir
        self._children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with self.log(name).open("wb") as log:
            child = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children.append(child)
        return child

    def log(self, name: str) -> Path:
        return self._logdir / f"{name}.log"

    def stop_all(self) -> None:
        for child in self._children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self._children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait(timeout=STOP_TIMEOUT_S)
            # Workers the child forked may outlive it: end the rest of its group too.
            _signal_group(child, signal.SIGKILL)


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def healthy(port: int) -> bool:
    try:
        with _LOCAL.open(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_ready(name: str, child: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise BenchError(f"{name} exited with status {child.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{name} was not ready after {READY_TIMEOUT_S:g} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _chat_url(port: int) -> str:
    return f"http://127.0.0.1:{port}{CHAT_PATH}"


class Launcher:
    """Starts the mock upstream once, then whichever targets are asked for in front of it."""

    def __init__(self, procs: Processes, workdir: Path, args: argparse.Namespace):
        self.procs = procs
        self.workdir = workdir
        self.args = args
        self.mock_port = free_port()
        self._serve(
            "mock", self.mock_port, "bench.mock_upstream", "--events", str(args.events), "--gap-ms", str(args.gap_ms)
        )

    def _serve(self, name: str, port: int, module: str, *extra: str) -> None:
        child = self.procs.start(name, [sys.executable, "-m", module, "--port", str(port), *extra])
        wait_ready(name, child, lambda: tcp_open(port), self.procs.log(name))

    def target(self, name: str) -> Target:
        if name.startswith("gateway"):
            return self.gateway(name, accounting=name != "gateway-noacct")
        return {"direct": self.direct, "bare": self.bare}[name]()

    def direct(self) -> Target:
        return Target("direct", _chat_url(self.mock_port), UPSTREAM_KEY, "gpt-4o-mini")

    def bare(self) -> Target:
        port = free_port()
        self._serve("bare", port, "bench.bare_proxy", "--upstream", f"http://127.0.0.1:{self.mock_port}")
        return Target("bare", _chat_url(port), UPSTREAM_KEY, "gpt-4o-mini")

    def gateway(self, name: str, accounting: bool) -> Target:
        """The gateway; `gateway-noacct` is the same with accounting (records and debits) switched off;
        `gateway-messages` is the gateway measured on `/v1/messages`, every answer translated."""
        env = {
            **os.environ,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.mock_port}/v1",
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "GATEWAY_STORE": f"sqlite:///{self.workdir / (name + '.db')}",
            "GATEWAY_ACCOUNTING": "true" if accounting else "false",
        }
        key = create_key(env)
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--config", GATEWAY_CONFIG, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", str(self.args.gateway_workers)]
        child = self.procs.start(name, argv, env)
        wait_ready(name, child, lambda: healthy(port), self.procs.log(name))
        if name == "gateway-messages":  # the Anthropic Messages surface, translated to the mock's Chat API
            return Target(name, f"http://127.0.0.1:{port}/v1/messages", key, "openai/gpt-4o-mini", "messages")
        return Target(name, _chat_url(port), key, "openai/gpt-4o-mini")


def create_key(env: dict[str, str]) -> str:
    argv = [sys.executable, "-m", "proxy", "keys", "create", "--config", GATEWAY_CONFIG]
    argv += ["--team", "bench", "--credit", "1000"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"creating a gateway key failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    return lines[-1].strip()


class Measurer:
    """Runs one load against one target with the configured tools."""

    def __init__(self, runner: asyncio.Runner, workdir: Path, wrk: str | None, duration_s: int):
        self.runner = runner
        self.workdir = workdir
        self.wrk = wrk
        self.duration_s = duration_s

    def __call__(self, load: Load, target: Target) -> Result:
        if load.stream:
            return self.runner.run(stream_load(target, load.connections, self.duration_s))
        if self.wrk is not None:
            return wrk_load(self.wrk, target, load.connections, self.duration_s, self.workdir)
        return self.runner.run(closed_loop(target, load.connections, self.duration_s))

    def warm_up(self, target: Target) -> None:
        self.runner.run(preflight(target))
        self.runner.run(closed_loop(target, WARMUP_CONNECTIONS, min(1.0, self.duration_s / 2)))


def loads(args: argparse.Namespace) -> list[Load]:
    streams = f"stream {args.streams}x{args.events} ev, {args.gap_ms:g} ms gap"
    return [Load("chat c=32", 32, False), Load("chat c=1", 1, False), Load(streams, args.streams, True)]


def measure_all(measure: Measurer, targets: list[Target], rounds: int, steps: list[Load]) -> list[report.Sample]:
    """Every load against every target, targets interleaved and their order rotated each round."""
    samples = []
    for round_no in range(rounds):
        order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
        for load in steps:
            for target in order:
                result = measure(load, target)
                samples.append(report.Sample(round_no + 1, target.name, load.name, result))
                print(
                    f"  round {round_no + 1}/{rounds} · {load.name:<28} · {target.name:<14} "
                    f"{result.requests_per_s:>9,.0f}/s  p50 {result.p50_ms:8.2f} ms  "
                    f"errors {result.errors}",
                    flush=True,
                )
    return samples


def choose_wrk(tool: str) -> str | None:
    if tool == "aiohttp":
        return None
    wrk = shutil.which("wrk")
    if wrk is None and tool == "wrk":
        raise BenchError("--tool wrk: wrk is not installed")
    return wrk


def run(args: argparse.Namespace) -> str:
    """The whole benchmark; the Markdown report."""
    wrk = choose_wrk(args.tool)
    started = datetime.now(UTC)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        procs = stack.enter_context(Processes(workdir))
        runner = stack.enter_context(asyncio.Runner(loop_factory=uvloop.new_event_loop))
        launcher = Launcher(procs, workdir, args)
        targets = [launcher.target(name) for name in args.targets]
        measure = Measurer(runner, workdir, wrk, args.duration)
        for target in targets:
            measure.warm_up(target)
        samples = measure_all(measure, targets, args.rounds, loads(args))
    rows = report.aggregate(samples, args.targets)
    info = report.machine_info(wrk)
    settings = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "targets": ",".join(args.targets),
        "gateway_workers": args.gateway_workers,
        "plain tool": "wrk" if wrk else "aiohttp",
    }
    title = f"Gateway benchmark, {started:%Y-%m-%d %H:%M} UTC"
    markdown = report.markdown_report(rows, info, settings, title)
    payload = {"started": started.isoformat(), "machine": info, "settings": settings, "rows": rows, "samples": samples}
    path = report.save(f"{started:%Y%m%dT%H%M%SZ}", markdown, payload)
    return f"{markdown}\nSaved {path.relative_to(REPO)} (+ .json) and bench/results/latest.md"


def _target_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(TARGETS)} (got {value!r})")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all loads and targets (default 2)")
    parser.add_argument("--targets", type=_target_list, default=list(TARGETS), help="default " + ",".join(TARGETS))
    parser.add_argument("--quick", action="store_true", help="1 s per measurement, 1 round (a smoke test)")
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams (default 32)")
    parser.add_argument("--events", type=int, default=20, help="content events per stream (default 20)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between events (default 5)")
    parser.add_argument(
        "--tool",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator for plain requests: wrk when installed (auto), or aiohttp",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 1, 1
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        print(run(args))
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; child processes stopped")
