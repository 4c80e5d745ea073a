"""Measure the gateway against peers, a bare proxy and the mock upstream itself, in one run.

`python -m bench [--duration S] [--rounds R] [--targets direct,bare,nginx,gateway,...] [--quick] [--install-peers]`

Starts the mock upstream, then each target (the gateway with a fresh key in a temporary store: SQLite, or
for `gateway-pg` and `gateway-pg-x3` a throwaway PostgreSQL cluster) on free ports of 127.0.0.1, then
measures every load against every target, round-robin within each load step and repeated for R rounds, and
prints and saves the table and a latency-vs-load plot (bench/results/). A peer (or a target needing PostgreSQL
or nginx) that cannot run here is skipped, with why. Every child process is stopped at the end, also on Ctrl-C
or a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import uvloop

from bench import peers, report
from bench.loads import (
    BenchError,
    Result,
    Target,
    closed_loop,
    open_loop,
    preflight,
    ramp_load,
    stream_load,
    wrk_load,
)
from bench.pg_server import PgServer, find_bin_dir
from bench.procs import Processes, cpu_seconds, free_port, healthy, rss_bytes, tcp_open, wait_ready

REPO = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"
GATEWAY_CONFIG = "config/gateway.yaml"
TARGETS = (
    "direct",
    "bare",
    "nginx",
    "gateway",
    "gateway-percore",
    "gateway-noacct",
    "gateway-thread",
    "gateway-cache-hit",
    "gateway-otel",
    "gateway-messages",
    "gateway-pg",
    "gateway-pg-x3",
    "litellm",
    "portkey",
)
# Measured only when named: the gateway's upstream client behind aiohttp's server, or behind a bare protocol,
# doing nothing else (bench/floor_proxy.py): what is left of a request when the gateway does no work.
FLOORS = ("floor-aiohttp", "floor-lean")
WARMUP_CONNECTIONS = 8
UPSTREAM_KEY = "sk-bench"


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    connections: int  # concurrent connections or streams; for `open`, requests per second
    kind: str  # closed (plain requests), stream, open (fixed rate), ramp (streams held open)


def _chat_url(port: int) -> str:
    return f"http://127.0.0.1:{port}{CHAT_PATH}"


class Postgres:
    """A throwaway PostgreSQL cluster (bench/pg_server.py), started for the first target that needs one and
    removed at the end; `peers.Skipped` saying why when it cannot run here."""

    def __init__(self) -> None:
        self.server: PgServer | None = None
        self.why_not = ""

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.destroy()

    def database(self) -> str:
        """The URL of a new, empty database."""
        if self.why_not:
            raise peers.Skipped(self.why_not)
        if self.server is None:
            bin_dir = find_bin_dir()
            if bin_dir is None:
                self.why_not = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
                raise peers.Skipped(self.why_not)
            server = PgServer(bin_dir)
            try:
                server.start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                server.destroy()
                self.why_not = f"PostgreSQL did not start: {str(e).strip().splitlines()[0]}"
                raise peers.Skipped(self.why_not) from e
            self.server = server
        return self.server.create_database()


class Launcher:
    """Starts the mock upstream once, then whichever targets are asked for in front of it."""

    def __init__(self, procs: Processes, workdir: Path, args: argparse.Namespace, postgres: Postgres):
        self.procs = procs
        self.workdir = workdir
        self.args = args
        self.postgres = postgres
        self.members: dict[str, list[int]] = {}  # a target of several processes: every one (memory and CPU)
        self.mock_port = free_port()
        self._serve(
            "mock", self.mock_port, "bench.mock_upstream", "--events", str(args.events), "--gap-ms", str(args.gap_ms)
        )

    def _serve(self, name: str, port: int, module: str, *extra: str) -> int:
        child = self.procs.start(name, [sys.executable, "-m", module, "--port", str(port), *extra])
        wait_ready(name, child, lambda: tcp_open(port), self.procs.log(name))
        return child.pid

    def target(self, name: str) -> Target:
        """The target, started; `peers.Skipped` when it cannot run here."""
        if name in peers.PEERS:
            return peers.PEERS[name](self.procs, self.workdir, self.mock_port)
        if name == "gateway-pg":
            store = self.postgres.database()
            return self.gateway(name, accounting=True, workers=self.args.gateway_workers, store=store)
        if name == "gateway-pg-x3":
            return self.gateway_instances(name, 3)
        if name.startswith("gateway"):
            workers = (os.cpu_count() or 1) if name == "gateway-percore" else self.args.gateway_workers
            return self.gateway(name, accounting=name != "gateway-noacct", workers=workers)
        if name in FLOORS:
            return self.floor(name)
        return {"direct": self.direct, "bare": self.bare}[name]()

    def direct(self) -> Target:
        return Target("direct", _chat_url(self.mock_port), UPSTREAM_KEY, "gpt-4o-mini")

    def bare(self) -> Target:
        port = free_port()
        pid = self._serve("bare", port, "bench.bare_proxy", "--upstream", f"http://127.0.0.1:{self.mock_port}")
        return Target("bare", _chat_url(port), UPSTREAM_KEY, "gpt-4o-mini", pid=pid)

    def floor(self, name: str) -> Target:
        port = free_port()
        server = name.removeprefix("floor-")
        upstream = f"http://127.0.0.1:{self.mock_port}"
        pid = self._serve(name, port, "bench.floor_proxy", "--upstream", upstream, "--server", server)
        return Target(name, _chat_url(port), UPSTREAM_KEY, "gpt-4o-mini", pid=pid)

    def _gateway_env(self, name: str, store: str, accounting: bool = True) -> dict[str, str]:
        writer = "thread" if name == "gateway-thread" else "process"
        return {
            **os.environ,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.mock_port}/v1",
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "GATEWAY_STORE": store,
            "GATEWAY_ACCOUNTING": "true" if accounting else "false",
            "GATEWAY_ACCOUNTING_WRITER": writer,
            "GATEWAY_PID_FILE": str(self.workdir / (name + ".pid")),
            # gateway-otel: every request traced (sample ratio 1), its spans sent to the mock's OTLP endpoint
            "GATEWAY_TRACES": "true" if name == "gateway-otel" else "false",
            "GATEWAY_TRACES_ENDPOINT": f"http://127.0.0.1:{self.mock_port}/v1/traces",
        }

    def _start_gateway(self, name: str, env: dict[str, str], port: int, workers: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "proxy", "serve", "--config", GATEWAY_CONFIG, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", str(workers)]
        child = self.procs.start(name, argv, env)
        wait_ready(name, child, lambda: healthy(port), self.procs.log(name))
        return child

    def gateway(self, name: str, accounting: bool, workers: int, store: str = "") -> Target:
        """The gateway; `gateway-noacct` is the same with accounting (records and debits) switched off;
        `gateway-thread` writes its records to the store from a thread of the worker instead of a child process;
        `gateway-messages` is the gateway measured on `/v1/messages`, every answer translated; `gateway-cache-hit`
        has the response cache on for its key, so that every request but the first is a hit; `gateway-otel`
        traces every request (OpenTelemetry, to the mock's OTLP endpoint); `store` (default:
        a new SQLite file) is `gateway-pg`'s PostgreSQL database."""
        env = self._gateway_env(name, store or f"sqlite:///{self.workdir / (name + '.db')}", accounting)
        key = create_key(env, ["--cache", "on"] if name == "gateway-cache-hit" else [])
        port = free_port()
        child = self._start_gateway(name, env, port, workers)
        if name == "gateway-messages":  # the Anthropic Messages surface, translated to the mock's Chat API
            url = f"http://127.0.0.1:{port}/v1/messages"
            return Target(name, url, key, "openai/gpt-4o-mini", "messages", pid=child.pid)
        return Target(name, _chat_url(port), key, "openai/gpt-4o-mini", pid=child.pid)

    def gateway_instances(self, name: str, count: int) -> Target:
        """`count` gateways (one worker each) on one PostgreSQL database, behind nginx running the deployment's
        systemd/nginx-gateway-instances.conf with these ports; measured together (nginx included)."""
        nginx = peers.find_nginx()
        store = self.postgres.database()
        key = create_key(self._gateway_env(name, store))
        ports = [free_port() for _ in range(count)]
        pids = []
        for i, port in enumerate(ports, start=1):
            member = f"{name}-{i}"
            pids.append(self._start_gateway(member, self._gateway_env(member, store), port, 1).pid)
        port = free_port()
        conf = peers.nginx_conf(self.workdir, f"{name}-nginx", peers.instances_http(port, ports))
        child = self.procs.start(f"{name}-nginx", [nginx, "-c", str(conf), "-p", str(self.workdir)])
        wait_ready(f"{name}-nginx", child, lambda: tcp_open(port), self.procs.log(f"{name}-nginx"))
        self.members[name] = [*pids, child.pid]
        return Target(name, _chat_url(port), key, "openai/gpt-4o-mini", pid=pids[0])


def create_key(env: dict[str, str], options: list[str] | None = None) -> str:
    argv = [sys.executable, "-m", "proxy", "keys", "create", "--config", GATEWAY_CONFIG]
    argv += ["--team", "bench", "--credit", "1000", *(options or [])]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"creating a gateway key failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    return lines[-1].strip()


class Measurer:
    """Runs one load against one target with the configured tools."""

    def __init__(
        self,
        runner: asyncio.Runner,
        workdir: Path,
        wrk: str | None,
        duration_s: int,
        members: dict[str, list[int]] | None = None,
    ):
        self.runner = runner
        self.workdir = workdir
        self.wrk = wrk
        self.duration_s = duration_s
        self.members = members if members is not None else {}  # target name → its processes, when several

    def pids(self, target: Target) -> list[int]:
        """The processes whose memory and CPU are the target's (each with its children)."""
        return self.members.get(target.name) or ([target.pid] if target.pid else [])

    def __call__(self, load: Load, target: Target) -> Result:
        pids = self.pids(target)
        if load.kind == "ramp":  # samples memory itself, once every stream is open
            return self.runner.run(ramp_load(target, load.connections, lambda: sum(map(rss_bytes, pids))))
        cpu_before = sum(map(cpu_seconds, pids)) if pids else None
        with PeakMemory(pids) as memory:
            result = self._measure(load, target)
        cpu_us = None
        served = result.requests_per_s * self.duration_s
        if cpu_before is not None and served > 0:
            cpu_us = (sum(map(cpu_seconds, pids)) - cpu_before) / served * 1e6
        return replace(result, rss_mb=memory.peak_mb, cpu_us=cpu_us)

    def _measure(self, load: Load, target: Target) -> Result:
        if load.kind == "stream":
            return self.runner.run(stream_load(target, load.connections, self.duration_s))
        if load.kind == "open":
            return self.runner.run(open_loop(target, load.connections, self.duration_s))
        if self.wrk is not None:
            return wrk_load(self.wrk, target, load.connections, self.duration_s, self.workdir)
        return self.runner.run(closed_loop(target, load.connections, self.duration_s))

    def warm_up(self, target: Target) -> None:
        self.runner.run(preflight(target))
        self.runner.run(closed_loop(target, WARMUP_CONNECTIONS, min(1.0, self.duration_s / 2)))


class PeakMemory:
    """The highest resident memory of process trees together while the block runs (sampled by a thread)."""

    def __init__(self, pids: list[int], interval_s: float = 0.1):
        self.pids = pids
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pids:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, sum(map(rss_bytes, self.pids)))
            if self._stop.wait(self.interval_s):
                return

    @property
    def peak_mb(self) -> float | None:
        return self.peak / 1e6 if self.peak else None


LOADS = ("c32", "c1", "stream", "open", "ramp")


def loads(args: argparse.Namespace) -> list[Load]:
    streams = f"stream {args.streams}x{args.events} ev, {args.gap_ms:g} ms gap"
    chosen = set(args.loads)
    steps = [Load("chat c=32", 32, "closed")] if "c32" in chosen else []
    steps += [Load("chat c=1", 1, "closed")] if "c1" in chosen else []
    steps += [Load(streams, args.streams, "stream")] if "stream" in chosen else []
    steps += [Load(f"open {rate}/s", rate, "open") for rate in args.rates] if "open" in chosen else []
    if args.ramp and "ramp" in chosen:
        steps.append(Load(f"ramp {args.ramp} streams", args.ramp, "ramp"))
    return steps


def measure_all(measure: Measurer, targets: list[Target], rounds: int, steps: list[Load]) -> list[report.Sample]:
    """Every load against every target, targets interleaved and their order rotated each round."""
    samples = []
    for round_no in range(rounds):
        order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
        for load in steps:
            for target in order:
                if load.kind == "ramp" and target.surface != "chat":
                    continue  # the mock is held open by Chat Completions members another surface would refuse
                if load.kind == "ramp" and target.name == "gateway-cache-hit":
                    continue  # identical streams held open: all but the first wait for its answer (single-flight)
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
        postgres = stack.enter_context(Postgres())  # removed after the gateways using it have stopped
        procs = stack.enter_context(Processes(workdir))
        runner = stack.enter_context(asyncio.Runner(loop_factory=uvloop.new_event_loop))
        launcher = Launcher(procs, workdir, args, postgres)
        measure = Measurer(runner, workdir, wrk, args.duration, launcher.members)
        targets, skipped = [], {}
        for name in args.targets:
            try:
                target = launcher.target(name)
                measure.warm_up(target)
            except (peers.Skipped, BenchError) as e:
                if name not in peers.PEERS and not isinstance(e, peers.Skipped):
                    raise
                skipped[name] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"  skipped {name}: {skipped[name]}", flush=True)
                continue
            targets.append(target)
        samples = measure_all(measure, targets, args.rounds, loads(args))
    measured = [t.name for t in targets]
    rows = report.aggregate(samples, measured)
    info = report.machine_info(wrk)
    info.update({name: peers.installed_version(name) for name in peers.INSTALLABLE if name in measured})
    settings = {
        "rounds": args.rounds,
        "duration_s": args.duration,
        "targets": ",".join(measured),
        "gateway_workers": args.gateway_workers,
        "plain tool": "wrk" if wrk else "aiohttp",
    }
    ratios = report.cpu_ratios(samples, args.baseline) if args.baseline in measured else []
    if args.baseline:
        settings["baseline"] = args.baseline
    title = f"Gateway benchmark, {started:%Y-%m-%d %H:%M} UTC"
    markdown = report.markdown_report(
        rows, info, settings, title, skipped, report.markdown_ratios(ratios, args.baseline)
    )
    payload = {
        "started": started.isoformat(),
        "machine": info,
        "settings": settings,
        "skipped": skipped,
        "rows": rows,
        "samples": samples,
        "cpu_ratios": ratios,
    }
    stamp = f"{started:%Y%m%dT%H%M%SZ}"
    path = report.save(stamp, markdown, payload)
    plot = report.plot(rows, path.with_suffix(".png"))
    saved = f"Saved {path.relative_to(REPO)} (+ .json{', .png' if plot else ''}) and bench/results/latest.md"
    return f"{markdown}\n{saved}"


def _rates(value: str) -> list[int]:
    try:
        rates = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates such as 200,400 (got {value!r})") from None
    if any(rate < 0 for rate in rates):
        raise argparse.ArgumentTypeError("rates must be >= 0")
    return [rate for rate in rates if rate]


def _load_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(LOADS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(LOADS)} (got {value!r})")
    return names


def _target_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(TARGETS) - set(FLOORS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(TARGETS + FLOORS)} (got {value!r})")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all loads and targets (default 2)")
    parser.add_argument(
        "--baseline",
        default="",
        metavar="TARGET",
        help="also report each target's CPU per request over TARGET's: the median of the per-round ratios",
    )
    parser.add_argument(
        "--targets",
        type=_target_list,
        default=list(TARGETS),
        help="default " + ",".join(TARGETS) + "; also " + ",".join(FLOORS),
    )
    parser.add_argument(
        "--loads",
        type=_load_list,
        default=list(LOADS),
        help="which loads: chat at 32 and 1 connections, streams, open loop, ramp (default " + ",".join(LOADS) + ")",
    )
    parser.add_argument("--quick", action="store_true", help="1 s per measurement, 1 round (a smoke test)")
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams (default 32)")
    parser.add_argument("--events", type=int, default=20, help="content events per stream (default 20)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between events (default 5)")
    parser.add_argument(
        "--rates",
        type=_rates,
        default=[200, 400, 800],
        help="open-loop request rates per second, comma-separated (default 200,400,800; 0 for none)",
    )
    parser.add_argument("--ramp", type=int, default=1000, help="streams held open at once for memory (default 1000)")
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="install LiteLLM's proxy (PyPI) and Portkey's gateway (npm) into a cache outside the repository, and exit",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="SECONDS",
        help="instead of the comparison: a mixed load on the gateway for this long, watched for leaks and lost "
        "records (bench/soak.py)",
    )
    parser.add_argument("--soak-rate", type=int, default=100, help="requests per second during --soak (default 100)")
    parser.add_argument(
        "--tool",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator for plain requests: wrk when installed (auto), or aiohttp",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 1, 1
        args.rates, args.ramp = args.rates[:1], min(args.ramp, 50)
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    if args.soak < 0 or args.soak_rate < 1:
        parser.error("--soak must be >= 0 seconds and --soak-rate at least 1")
    if args.baseline and args.baseline not in args.targets:
        parser.error(f"--baseline {args.baseline} is not one of --targets ({','.join(args.targets)})")
    return args


def run_soak(args: argparse.Namespace) -> str:
    """`--soak`: the mock and one gateway (SQLite, accounting on), a mixed load, samples and checks."""
    from bench import soak

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        postgres = stack.enter_context(Postgres())  # not started: the soak's store is SQLite
        procs = stack.enter_context(Processes(workdir))
        runner = stack.enter_context(asyncio.Runner(loop_factory=uvloop.new_event_loop))
        launcher = Launcher(procs, workdir, args, postgres)
        target = launcher.gateway("gateway", accounting=True, workers=1)
        base = target.url.removesuffix(CHAT_PATH)
        run = soak.Soak(base, target.api_key, target.pid, workdir / "gateway.db", args.soak_rate)
        print(f"soak: {args.soak} s at {args.soak_rate} requests/s against {base}", flush=True)
        runner.run(run.run(args.soak))
        return soak.save(run, args.soak)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.install_peers:
            for name in peers.INSTALLABLE:
                peers.install(name)
            return
        print(run_soak(args) if args.soak else run(args))
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; child processes stopped")
