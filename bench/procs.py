"""Child processes of a benchmark run: started in their own process groups, waited for, measured, stopped.

`Processes` starts and stops them; `wait_ready` polls a readiness check; `rss_bytes` is a process tree's
resident memory (from /proc: Linux only, 0 elsewhere).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from bench.loads import BenchError

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# Never send benchmark traffic through a proxy from the environment: everything stays on 127.0.0.1.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def wait_ready(
    name: str, child: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, timeout_s: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise BenchError(f"{name} exited with status {child.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{name} was not ready after {timeout_s:g} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    found = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found += [int(child) for child in f.read().split()]
    return found


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a supervisor and its workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.append(current)
            todo += _children(current)
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) used so far by `pid` and its descendants that still run."""
    total = 0
    for current in _tree(pid):
        with suppress(OSError, ValueError, IndexError), open(f"/proc/{current}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (a supervisor and its workers), in bytes."""
    total = 0
    for current in _tree(pid):
        with suppress(OSError, ValueError), open(f"/proc/{current}/statm", encoding="ascii") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total
