"""A throwaway PostgreSQL cluster, for the tests and the bench: initdb into a temporary folder, on 127.0.0.1.

`PgServer.start()` finds `initdb`/`pg_ctl` (PATH, then `/usr/lib/postgresql/*/bin`), creates a cluster
with a random superuser password (TCP logins need it), starts it on a free port without durability
(`fsync=off`: nothing here must survive a crash) and waits for it; `create_database()` gives each test
its own database. `stop()` shuts the server down (`pg_ctl stop -m fast`: sessions are cut, the cluster is
kept) and `start()` brings it back on the same port; `restart()` is both. `destroy()` stops it at once and
removes the folder. Every command is bounded in time. Postgres refuses to run as root: as root, its
commands run as the `postgres` user (which Debian's `postgresql` package creates), which then owns the
folder.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

TIMEOUT_S = 60  # for any one command: initdb, a start or stop (pg_ctl waits up to its own -t), psql
USER = "postgres"  # the superuser the cluster is created with; as root, also the OS user running it


def find_bin_dir() -> Path | None:
    """The folder holding `initdb`, `pg_ctl` and `psql`: from PATH, else the newest Debian install."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(n) if n.isdigit() else 0 for n in Path(p).parent.parent.name.split(".")],
    )
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="stats-gateway-pg-"))  # not pytest's tmp: 0700 under root
        self.data = self.root / "data"
        self.as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", USER, "--", *command]
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def start(self) -> None:
        """Create the cluster (first call) and start the server; later calls start it again on its port."""
        if self.port == 0:
            self._init()
        attempts = 3 if self.port == 0 else 1  # a free port can be taken between our probe and the server's bind
        for attempt in range(attempts):
            port = self.port or free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            log = str(self.root / "server.log")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", "30", "-o", options, "start")
                self.port = port
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise RuntimeError(f"postgres did not start: {self.log_tail()}") from None

    def _init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_postgres:
            try:
                user = pwd.getpwnam(USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, and there is no {USER!r} user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)"
                ) from None
            if shutil.which("runuser") is None:
                raise RuntimeError(
                    "running as root, and `runuser` (util-linux) is missing to run PostgreSQL as postgres"
                )
            os.chown(self.root, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down, keeping the cluster: `fast` cuts every session (their open transactions roll
        back) and checkpoints; `immediate` is a crash (recovery on the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
        return "(no server log)"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"test_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def psql(self, sql: str) -> str:
        """Run `sql` as the superuser (over the cluster's Unix socket: no password)."""
        where = ("-h", str(self.root), "-p", str(self.port), "-U", USER, "-d", "postgres")
        return self._run("psql", *where, "-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql).stdout

    def destroy(self) -> None:
        """Stop the server at once (if it runs) and remove the cluster."""
        try:
            if (self.data / "postmaster.pid").exists():  # running (or left by a start that timed out)
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
