"""The accounting journal: each finished request's record, appended to a file of this worker before the
request's last byte is written to its client, so that a crash (`kill -9` included) loses no record the
OS accepted.

Layout: `<accounting.journal_dir>/<backend>-<hash>/<segment>.jnl`, where the hash is of the store URL
without its password: gateways on different stores never replay each other's records. Each worker process
appends to a segment of its own, opened `O_APPEND` and held under `flock(LOCK_EX)` for as long as it
writes there. The kernel drops the lock when the process dies, however it dies, so a segment whose lock
can be taken was left by a dead worker: it is adopted (its lines applied to the store, then deleted).

A line is one record (`proxy.records.line`: a JSON array), ending in a newline, written with one `os.write`
and no fsync (`sync`, every `accounting.journal_fsync_s`, runs in a
thread). A torn last line (the process died in the write) lacks its newline and is skipped.

Rotation: once the active segment holds ROTATE_BYTES, appends go to a new one. The old one is deleted when
every line in it is in the store: the writer applies lines in the order they were appended, so that is
when the count of lines applied reaches the count appended before the rotation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import final

import msgspec
import orjson

from proxy.records import check
from proxy.store.base import redact_url
from proxy.store.sqlite_usage import sqlite_path

log = logging.getLogger("proxy.accounting")

ROTATE_BYTES = 4 << 20
SUFFIX = ".jnl"  # a segment; one being created is named `.new` until it is locked


class JournalError(Exception):
    """The journal's folder or a segment cannot be created (a configuration problem: found at start)."""


def encode_row(values: tuple) -> bytes:
    """A generation row, in `GENERATION_COLUMNS` order, as one journal line (a JSON array and a newline): a
    line `Store.record` takes as it is."""
    return orjson.dumps(values, option=orjson.OPT_APPEND_NEWLINE)


def folder_for(root: str, store_url: str) -> Path:
    """The journal folder of the gateways on `store_url`: `root/<backend>-<12 hex digits>`. The hash is of the
    URL without its password (a SQLite path made absolute), so two gateways on different stores never share
    one, and a changed password does not orphan a journal."""
    if store_url.startswith("sqlite://"):
        path = sqlite_path(store_url)
        # A memory store dies with its process: nothing of it is worth replaying anywhere else.
        ident = f"sqlite:{os.path.realpath(path)}" if path != ":memory:" else f"sqlite:{secrets.token_hex(8)}"
        backend = "sqlite"
    else:  # postgres:// and postgresql:// name the same database
        ident = "postgresql://" + redact_url(store_url).partition("://")[2]
        backend = "postgres"
    return Path(root) / f"{backend}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def parse(data: bytes) -> tuple[list[bytes], int]:
    """A segment's well-formed lines, and how many were skipped: a torn last line (no newline: the writer
    died in the write) and any line that is not a record (the rest of an earlier torn write)."""
    lines = data.split(b"\n")
    skipped = 1 if lines.pop() else 0  # after the last newline: empty unless the last write was torn
    good = []
    for line in lines:
        if not line:
            continue  # the newline that ends a torn write
        try:
            check(line)
        except msgspec.DecodeError:
            skipped += 1
            continue
        good.append(line)
    return good, skipped


@final
class _Segment:
    __slots__ = ("dirty", "end", "fd", "path")

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path
        self.end = 0  # retired: the count of lines appended (to any segment) when it stopped taking them
        self.dirty = False  # written since its last fdatasync


@final
class Adopted:
    """A dead worker's segment, locked by this process until it is `done` (deleted) or `released`."""

    __slots__ = ("fd", "lines", "path", "skipped")

    def __init__(self, fd: int, path: Path, lines: list[bytes], skipped: int):
        self.fd, self.path, self.lines, self.skipped = fd, path, lines, skipped

    def done(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before the lock goes: nobody adopts it again in between
        os.close(self.fd)

    def release(self) -> None:
        os.close(self.fd)


@final
class Journal:
    """This worker's segments: the active one, and retired ones whose lines are not all in the store yet."""

    __slots__ = (
        "_active",
        "_dir_dirty",
        "_retired",
        "_syncing",
        "_torn",
        "appended",
        "directory",
        "size",
    )

    def __init__(self, directory: Path):
        self.directory = directory
        self.appended = 0  # lines handed to `append` since `open`, failed ones included
        self.size = 0  # bytes in the active segment
        self._active: _Segment | None = None
        self._retired: list[_Segment] = []
        self._torn = False  # the last write failed (maybe part-way): the next one starts on a new line
        self._dir_dirty = False
        self._syncing = threading.Lock()  # `close` waits for a sync still running in its thread

    def open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._active = self._segment()
        except OSError as e:
            raise JournalError(f"cannot open the accounting journal in {self.directory}: {e}") from e

    def _segment(self) -> _Segment:
        """A new segment, locked before it gets its name: a scan never sees it unlocked."""
        name = f"{time.time_ns():016x}-{os.getpid()}-{secrets.token_hex(4)}"
        temp = self.directory / (name + ".new")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600)
        except FileNotFoundError:  # a sibling removed the (empty) folder as it exited
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
            path = self.directory / (name + SUFFIX)
            os.rename(temp, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        self._dir_dirty = True
        return _Segment(fd, path)

    def append(self, line: bytes) -> None:
        """Write one line (ending in a newline) to the active segment: one `os.write`, no fsync. A failure
        (a full disk) is logged, never raised: the record is still written to the store from memory, only
        a crash before then would lose it."""
        self.appended += 1
        segment = self._active
        if segment is None:
            return  # closed
        if self._torn:  # the last write failed, maybe part-way: end that piece, so that this line reads whole
            line = b"\n" + line
        try:
            written = os.write(segment.fd, line)
        except OSError as e:
            written, error = 0, str(e)
        else:
            error = "" if written == len(line) else f"wrote {written} of {len(line)} bytes"
        self.size += written
        segment.dirty = True
        if not error:
            if self._torn:
                self._torn = False
                log.info("the accounting journal %s takes records again", segment.path)
        elif not self._torn:
            self._torn = True
            log.error(
                "cannot append to the accounting journal %s (%s): records wait in memory only", segment.path, error
            )

    def rotate(self) -> None:
        """Appends go to a new segment from now on; the active one is retired."""
        try:
            fresh = self._segment()
        except OSError as e:
            log.error(
                "cannot start a new accounting journal segment in %s (%s): appending to the old one", self.directory, e
            )
            return
        old, self._active = self._active, fresh
        if old is not None:
            old.end = self.appended
            self._retired.append(old)
        self.size = 0

    def applied(self, count: int) -> list[_Segment]:
        """The retired segments whose every line is among the first `count` appended (so in the store)."""
        return [s for s in self._retired if s.end <= count]

    def drop(self, segments: list[_Segment]) -> None:
        """Delete retired segments (their lines are in the store)."""
        for segment in segments:
            self._retired.remove(segment)
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            os.close(segment.fd)

    @property
    def dirty(self) -> bool:
        return self._dir_dirty or any(s.dirty for s in (self._active, *self._retired) if s is not None)

    def sync(self) -> None:
        """fdatasync each segment written since its last sync, and the folder when it gained a segment.
        Blocks on the disk: run it in a thread. Failures are logged."""
        with self._syncing:
            self._sync()

    def _sync(self) -> None:
        for segment in (*self._retired, self._active):
            if segment is not None and segment.dirty:
                segment.dirty = False  # first: a line appended during the sync marks it again
                try:
                    os.fdatasync(segment.fd)
                except OSError as e:
                    log.error("cannot fsync the accounting journal %s: %s", segment.path, e)
        if self._dir_dirty:
            self._dir_dirty = False
            try:
                fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                log.error("cannot fsync the accounting journal's folder %s: %s", self.directory, e)

    def close(self, applied: bool) -> None:
        """Stop appending. `applied`: every line is in the store, so the segments are deleted (and the folder,
        if no other worker uses it) and a restart replays nothing. Otherwise they stay, for the next start."""
        with self._syncing:  # a writer cancelled in `sync` left it running: its descriptors must stay open
            segments = [s for s in (*self._retired, self._active) if s is not None]
            self._active, self._retired = None, []
        for segment in segments:
            if applied:
                with contextlib.suppress(FileNotFoundError):
                    segment.path.unlink()
            os.close(segment.fd)
        if applied:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only when empty: a sibling's segments keep it

    def adopt(self) -> list[Adopted]:
        """Lock and read the segments of dead workers (those whose lock can be taken). Blocking file I/O:
        run it in a thread. Each is the caller's to apply, then `done` or `release`."""
        mine = {s.path.name for s in (*self._retired, self._active) if s is not None}
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIX) and n not in mine)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = self.directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # deleted since the listing (applied by its writer, or adopted by a sibling)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with open(fd, "rb", closefd=False) as f:
                    data = f.read()
            except BlockingIOError:  # its writer is alive
                os.close(fd)
                continue
            except OSError as e:
                os.close(fd)
                log.error("cannot read the accounting journal segment %s: %s", path, e)
                continue
            if os.fstat(fd).st_nlink == 0:  # deleted while we waited for it: its writer applied it all
                os.close(fd)
                continue
            lines, skipped = parse(data)
            found.append(Adopted(fd, path, lines, skipped))
        return found
