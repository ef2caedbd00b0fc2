"""The audit log file: one JSON line per signature, each chained to the one before by SHA-256.

A line is appended with one write() on an O_APPEND descriptor under an exclusive flock, after reading the last
line under that same lock: concurrent processes and threads interleave whole lines and never fork the chain. A
process-wide lock is taken too, since where flock is emulated with fcntl record locks (some network file
systems) a lock does not exclude the threads of its own process. The write is
fsynced before the signature is handed back; a write that fails is cut off again, so the file never ends in
half a line that keyseal wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from keyseal.atomic import fsync_directory
from keyseal.errors import AuditError

ENV = "KEYSEAL_AUDIT_LOG"
OFF = "off"
FILE_NAME = "audit.log"
FORMAT_VERSION = 1
GENESIS = "0" * 64  # the `prev` of a log's first line
MAX_LINE = 1 << 20  # a longer last line is not one keyseal wrote

_THREADS = threading.Lock()


def configured_log() -> AuditLog | None:
    """`$KEYSEAL_AUDIT_LOG`, else `$KEYSEAL_HOME/audit.log`; None when KEYSEAL_AUDIT_LOG=off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() == OFF:
        return None
    if value:
        return AuditLog(Path(value).expanduser())
    from keyseal.home import keyseal_home

    return AuditLog(keyseal_home() / FILE_NAME)


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of a line's bytes without its line end: the next line's `prev`."""
    return hashlib.sha256(line).hexdigest()


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-23T21:12:08.341681Z (the clock `datetime.now` reads)."""
    micros = time.time_ns() // 1000
    return f"{utc_second(micros // 1_000_000)}.{micros % 1_000_000:06d}Z"


@functools.lru_cache(maxsize=256)
def utc_second(epoch_seconds: int) -> str:
    """One whole second as RFC 3339 UTC without the zone, e.g. 2026-11-23T21:12:08. Remembered because every
    signature (its audit time) and every SVID (its expiry) made within one second spells the same one."""
    return datetime.fromtimestamp(epoch_seconds, UTC).replace(tzinfo=None).isoformat()


class AuditLog:
    """An append-only, hash-chained JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def check_writable(self) -> None:
        """Open the log for appending (creating it, mode 0600), so that a log keyseal cannot write stops the
        first signature before it is made rather than after."""
        with self._open():
            pass

    def append(self, entry: Mapping[str, object]) -> dict[str, object]:
        """Append `entry` as the next line; returns the record as written (with v, seq, time and prev)."""
        with _THREADS, self._open() as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            seq, prev = self._next(fd, size)
            record: dict[str, object] = {"v": FORMAT_VERSION, "seq": seq, "time": utc_now(), **entry, "prev": prev}
            data = json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # still under the lock: no one else appended since
                raise AuditError(f"cannot append to the audit log {self.path}: {exc.strerror}") from None
            return record

    @contextlib.contextmanager
    def _open(self) -> Iterator[int]:
        created = not self.path.exists()
        try:
            if created:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            reason = os.strerror(errno.ENOTDIR) if isinstance(exc, FileExistsError) else exc.strerror  # from mkdir
            raise AuditError(
                f"cannot write the audit log {self.path}: {reason}: make it writable, set "
                f"KEYSEAL_AUDIT_LOG to a writable file, or KEYSEAL_AUDIT_LOG=off to sign without one"
            ) from None
        try:
            if created:
                with contextlib.suppress(OSError):
                    fsync_directory(self.path.parent)
            yield fd
        finally:
            os.close(fd)

    def _next(self, fd: int, size: int) -> tuple[int, str]:
        """(seq, prev) for the line after the current last one."""
        last = _last_line(fd, size, self.path)
        if last is None:
            return 1, GENESIS
        try:
            seq = json.loads(last)["seq"]
        except (ValueError, TypeError, KeyError):
            seq = None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise AuditError(f"the last line of the audit log {self.path} is not an audit record: check it with "
                             f"keyseal audit verify --log {self.path}, then move it aside to start a new log")
        return seq + 1, line_hash(last)


def _last_line(fd: int, size: int, path: Path) -> bytes | None:
    """The file's last line without its line end, read backwards from the end; None for an empty file."""
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise AuditError(f"the audit log {path} ends in an incomplete line (an interrupted write): check it with "
                         f"keyseal audit verify --log {path}, then move it aside to start a new log")
    end = size - 1
    tail = b""
    start = end
    while start > 0:
        step = min(8192, start)
        start -= step
        tail = os.pread(fd, step, start) + tail
        newline = tail.rfind(b"\n")
        if newline >= 0:
            return tail[newline + 1:]
        if len(tail) > MAX_LINE:
            raise AuditError(f"the last line of the audit log {path} is longer than any audit record: move the "
                             f"log aside to start a new one")
    return tail
