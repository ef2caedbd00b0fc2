"""The audit log file: one JSON line per signature, each chained to the one before by SHA-256.

Lines are appended with one write() on an O_APPEND descriptor under an exclusive flock, after reading the last
line under that same lock: concurrent processes and threads interleave whole lines and never fork the chain. A
process-wide lock is taken too, since where flock is emulated with fcntl record locks (some network file
systems) a lock does not exclude the threads of its own process.

Group commit: each line is fsynced (fdatasync: the data and the file size) before the signature it records is
handed back, but lines queued at the same time share one write and one fsync. A caller `submit`s its line (an
AuditingSigner does so before it asks the custody to sign, with `submit_body`: the fields' JSON it spelt itself;
the line's time is taken then) and later `wait`s for it (`settle`: the same without building the record, which is
made only for a caller that asks). The log's writer thread (started at the first line, gone after a minute with
nothing to write) writes the queued lines, a batch at a time, while their callers sign; each caller sleeps on a
lock of its own until its line is durable. When recent batches held several lines, the writer gathers briefly (at
most GATHER_SECONDS) for as many before it writes, so that 4 signing threads share fsyncs rather than take turns
in pairs; a gather that runs out lowers that expectation to what came, so a lone signer never waits. The
log stays open between batches (at most MAX_OPEN_FILES logs per process): one stat of the path shows that it is
still this descriptor's file of the size this process left it, and a read of its last line that it still ends in
the line this process wrote; only when another process wrote since are the next line's seq and prev read back. A
single signer that signs one thing after another still pays one fsync per signature, overlapped with the signing:
the price of never handing out a signature the log does not hold (`KEYSEAL_AUDIT_LOG=off` leaves durability to
the log pipeline instead). A write that fails is cut off again, so the file never ends in half a line that keyseal
wrote, and every caller of that batch gets the error. A forked child starts with no writer, queue or open log of
its own: it opens and locks the file itself.

Checkpoints (keyseal._internal.audit.checkpoint) are written with a batch, signed by the key of a line in it;
`rotate()` moves the file aside and starts the next one from its head.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from keyseal._internal.atomic import fsync_directory
from keyseal._internal.audit import checkpoint
from keyseal.errors import AuditError, KeysealError, one_line

__all__ = [
    "ENV",
    "FILE_NAME",
    "FORMAT_VERSION",
    "GATHER_SECONDS",
    "GENESIS",
    "MAX_GATHER",
    "MAX_LINE",
    "MAX_OPEN_FILES",
    "OFF",
    "WRITER_IDLE_SECONDS",
    "AuditLog",
    "Custody",
    "Pending",
    "configured_log",
    "line_hash",
    "utc_now",
    "utc_second",
]

ENV = "KEYSEAL_AUDIT_LOG"
OFF = "off"
FILE_NAME = "audit.log"
FORMAT_VERSION = 1
GENESIS = "0" * 64  # the `prev` of a log's first line
MAX_LINE = 1 << 20  # a longer last line is not one keyseal wrote
GATHER_SECONDS = 0.001  # the longest the writer waits for the lines of the callers its last batch woke
MAX_GATHER = 64  # lines a gather waits for, at most
WRITER_IDLE_SECONDS = 60.0  # a writer thread with nothing to write this long ends (the next line starts one)

_THREADS = threading.Lock()
_RESERVED = frozenset(("v", "seq", "time", "prev"))  # fields the log sets itself
_COMMITTERS_LOCK = threading.Lock()
_LINE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_START = f'{{"v":{FORMAT_VERSION},"seq":'  # how every line starts, as _LINE spells it
logger = logging.getLogger("keyseal.audit")


def configured_log() -> AuditLog | None:
    """`$KEYSEAL_AUDIT_LOG`, else `$KEYSEAL_HOME/audit.log`; None when KEYSEAL_AUDIT_LOG=off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() == OFF:
        return None
    if value:
        return AuditLog(Path(value).expanduser())
    from keyseal._internal.home import keyseal_home

    return AuditLog(keyseal_home() / FILE_NAME)


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of a line's bytes without its line end: the next line's `prev`."""
    return hashlib.sha256(line).hexdigest()


_this_second: tuple[int, str] = (-1, "")  # the last second spelt, read and replaced whole (no lock needed)


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-23T21:12:08.341681Z (the clock `datetime.now` reads)."""
    global _this_second  # noqa: PLW0603 - a one-entry cache: every audit line made within a second shares it
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _this_second
    if cached[0] != second:
        cached = _this_second = (second, utc_second(second))
    return f"{cached[1]}.{micros:06d}Z"


@functools.lru_cache(maxsize=256)
def utc_second(epoch_seconds: int) -> str:
    """One whole second as RFC 3339 UTC without the zone, e.g. 2026-11-23T21:12:08. Remembered because every
    signature (its audit time) and every SVID (its expiry) made within one second spells the same one."""
    return datetime.fromtimestamp(epoch_seconds, UTC).replace(tzinfo=None).isoformat()


@dataclass(frozen=True)
class Custody:
    """The key that signs checkpoints for a line: the key whose signature the line records."""

    key: checkpoint.CheckpointKey
    fingerprint: str
    key_uri: str  # redacted


class Pending:
    """A line `submit`ted to the log: `AuditLog.wait` returns its record once it is durable.

    A plain class with slots, made once per signature: no dataclass machinery, and the record dict is built only
    when someone asks for it (`written`)."""

    __slots__ = ("body", "custody", "done", "entry", "error", "line", "prev", "seq", "signal", "time", "waiting")

    def __init__(self, entry: Mapping[str, object] | None, custody: Custody | None, body: str | None = None) -> None:
        self.entry = entry  # None: the line was given as `body` alone
        self.custody = custody
        self.time = utc_now()  # when it was queued: before the custody was asked
        # Held from the start; released once, by the writer, when the line is done: the cheapest wake-up there is
        # for the one thread that waits for it.
        self.signal = threading.Lock()
        self.signal.acquire()
        self.done = False
        self.waiting = False  # its caller sleeps on `signal` (it was done signing before the line was)
        self.error: BaseException | None = None
        self.seq = 0
        self.prev = ""
        self.line = b""  # as written, without its line end
        if body is None and entry and not _RESERVED & entry.keys():
            body = _LINE.encode(entry)[1:-1]
        self.body = body  # the entry's fields as JSON, spelt by the caller rather than the writer

    def written(self) -> dict[str, object]:
        """The record as written (with v, seq, time and prev), once the line is done."""
        if self.entry is None:
            record: dict[str, object] = json.loads(self.line)
            return record
        return {"v": FORMAT_VERSION, "seq": self.seq, "time": self.time, **self.entry, "prev": self.prev}


class _Tail(NamedTuple):
    """Where this process left the file: a file of this identity and size that still ends in the line it wrote
    last (`last`, read back and compared) needs no reading back for the next line's seq and prev."""

    dev: int
    ino: int
    size: int
    seq: int  # the next line's
    prev: str
    after_checkpoint: bool
    last: bytes  # the last line, without its line end


@dataclass(eq=False)
class _Committer:
    """The group-commit queue of one log file in this process, and the thread that writes it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)  # the lead was given up (checkpoint and rotate wait on it)
    work: threading.Condition = field(init=False)  # the writer waits on it for lines to write
    queue: list[Pending] = field(default_factory=list)
    leading: bool = False  # a batch, a checkpoint or a rotation is being written
    writer: threading.Thread | None = None
    waiting_for: int = 0  # the writer sleeps until this many lines are queued (0: it does not sleep on `work`)
    sole_waiting: int = 0  # checkpoints and rotations waiting for the lead (on cond)
    last_checkpoint: float = field(default_factory=time.monotonic)  # when this process last wrote one
    retry_checkpoint: bool = False  # the last one due could not be signed: try again at the next line
    custody: Custody | None = None  # the last key seen, for checkpoints made when no line names one
    fd: int = -1  # the log kept open between batches (one of _OPEN_FILES), and where it ends
    tail: _Tail | None = None
    durable: list[Pending] | None = None  # the batch whose lines were last made durable (set as its fsync returns)
    unwritten: dict[str, object] | None = None  # the last checkpoint signed whose batch was not written (yet)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)
        self.work = threading.Condition(self.lock)


_COMMITTERS: dict[str, _Committer] = {}
_OPEN_FILES: list[_Committer] = []  # committers holding a descriptor, the most recently used last
MAX_OPEN_FILES = 8


def _committer(path: Path) -> _Committer:
    key = os.path.abspath(path)
    with _COMMITTERS_LOCK:
        found = _COMMITTERS.get(key)
        if found is None:
            found = _COMMITTERS[key] = _Committer()
        return found


def _after_fork_in_child() -> None:
    """A child starts with no writer thread and locks that no thread of its own holds: start afresh. Its copies
    of the descriptors are closed, never unlocked (a flock belongs to the descriptor the parent shares)."""
    global _THREADS, _COMMITTERS_LOCK  # the parent's locks may be held by threads the child has not
    _THREADS, _COMMITTERS_LOCK = threading.Lock(), threading.Lock()
    for committer in _COMMITTERS.values():
        if committer.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(committer.fd)
        committer.__init__()  # type: ignore[misc]  # the same object: AuditLogs hold it
    _OPEN_FILES.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AuditLog:
    """An append-only, hash-chained JSON-lines file."""

    def __init__(self, path: Path) -> None:
        # Absolute from the start: a process that changes directory later still writes the file it named.
        self.path = Path(os.path.abspath(path))
        self._fspath = os.fspath(self.path)
        self._committer = _committer(self.path)

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def check_writable(self) -> None:
        """Open the log for appending (creating it, mode 0600), so that a log keyseal cannot write stops the
        first signature before it is made rather than after."""
        with self._open():
            pass

    def submit(self, entry: Mapping[str, object], custody: Custody | None = None) -> Pending:
        """Queue `entry` as a line and return at once: the caller does its own work (asks the custody for the
        signature the line records) while the line is written, then `wait`s for it. `custody` signs a
        checkpoint when one falls due at this line."""
        return self._enqueue(Pending(entry, custody))

    def submit_body(self, body: str, custody: Custody | None = None) -> Pending:
        """`submit` for a caller that spells the entry's fields itself: `body` is their JSON without the braces
        (as `json.dumps(entry, separators=(",", ":"))[1:-1]` spells them, none of v, seq, time or prev). An
        AuditingSigner does, from a prefix it made once, so no dict is built or encoded per signature."""
        return self._enqueue(Pending(None, custody, body))

    def _enqueue(self, item: Pending) -> Pending:
        committer = self._committer
        with committer.lock:
            committer.queue.append(item)
            if committer.writer is None:
                writer = threading.Thread(target=self._write_queued, name="keyseal-audit-writer", daemon=True)
                try:
                    writer.start()
                except RuntimeError:  # no new thread now (the interpreter is shutting down): `settle` writes it
                    pass
                else:
                    committer.writer = writer
            elif committer.waiting_for and len(committer.queue) >= committer.waiting_for:
                committer.waiting_for = 0
                committer.work.notify()
        return item

    def wait(self, item: Pending) -> dict[str, object]:
        """Block until the `submit`ted line is written and fsynced; returns the record as written (with v, seq,
        time and prev). Raises AuditError when the line could not be made durable."""
        self.settle(item)
        return item.written()

    def settle(self, item: Pending) -> None:
        """`wait` without building the record: block until the line is durable, or raise AuditError."""
        committer = self._committer
        if item.done:
            pass
        elif committer.writer is None:  # none could be started: write the queued lines here, in turn
            with self._sole_writer():
                if not item.done:
                    batch: list[Pending] = []
                    try:
                        batch = self._take_queue()
                        self._commit_batch(batch)
                    except BaseException:  # interrupted: the others of the batch hear whether their line is in
                        self._wake_unwritten(batch)
                        raise
        else:
            own, batch = False, []
            try:
                with committer.lock:
                    # Not taken by the writer yet, which is not gathering more either (it was woken for it but
                    # has not run yet): write the queued lines here rather than wait for the writer. A thread
                    # hand-off costs about as much as a fast signature, and this caller is done signing.
                    own = bool(not item.done and committer.queue and not committer.leading and
                               not committer.sole_waiting and committer.waiting_for < 2)
                    if own:
                        committer.leading = True
                        batch, committer.queue = committer.queue, []
                    else:
                        item.waiting = True
                if own:
                    self._commit_batch(batch)
            except BaseException:  # interrupted (KeyboardInterrupt) with others' lines taken: they must hear it
                self._wake_unwritten(batch)
                raise
            finally:
                if own:
                    self._give_up_lead()
            if not own and not item.done:
                item.signal.acquire()  # released by the writer once the line is done
        if isinstance(item.error, AuditError):  # one error for the whole batch: each caller raises its own
            raise AuditError(item.error.message) from None
        if item.error is not None:
            raise item.error
        if not item.done:  # its batch was taken by a caller stopped before writing it: no line, so no signature
            raise AuditError(f"the line for this signature was not written to the audit log {self.path}")

    def append(self, entry: Mapping[str, object], custody: Custody | None = None) -> dict[str, object]:
        """Append `entry` as a line, durably (`submit` and `wait`); returns the record as written."""
        return self.wait(self.submit(entry, custody))

    def checkpoint(self, custody: Custody | None = None, *, force: bool = False) -> dict[str, object] | None:
        """Write a checkpoint now if one is due by time (or `force`) and lines were added since the last one;
        the key is `custody` or the last one this process saw. For long-running processes (a periodic call) and
        `keyseal audit checkpoint`. Returns the checkpoint written, if any."""
        committer = self._committer
        custody = custody or committer.custody
        if custody is None:
            return None
        if not force and time.monotonic() - committer.last_checkpoint < checkpoint.interval_seconds():
            return None
        with self._sole_writer(), _THREADS, self._held() as (fd, _):
            size = _complete_size(fd, self.path)
            last = _last_line(fd, size, self.path)
            if last is None or _is_checkpoint(last):
                return None
            seq, prev = self._next_after(last)
            record = self._make_checkpoint(custody, seq, prev, checkpoint.interval_lines())
            if record is None:
                committer.retry_checkpoint = True
                raise AuditError(f"cannot sign a checkpoint of the audit log {self.path}")
            data = _LINE.encode(record).encode("ascii") + b"\n"
            self._write(fd, size, data)
            committer.last_checkpoint, committer.retry_checkpoint, committer.unwritten = time.monotonic(), False, None
        _emit(record)
        return record

    @contextlib.contextmanager
    def _sole_writer(self) -> Iterator[None]:
        """Take the lead from the group commit (waiting for a leader writing a batch), and hand it back."""
        committer = self._committer
        with committer.cond:
            committer.sole_waiting += 1
            try:
                while committer.leading:
                    committer.cond.wait()
            except BaseException:  # interrupted (KeyboardInterrupt), perhaps as the lead was let go for it
                committer.sole_waiting -= 1
                self._lead_next()
                raise
            committer.sole_waiting -= 1
            committer.leading = True
        try:
            yield
        finally:
            self._give_up_lead()

    def rotate(self, archive: Path | None = None) -> Path:
        """Move the log aside (to `archive`, default `<log>.<UTC time>`) and start a new file whose first line
        (kind "continued") goes on from the old file's head and sequence. Writers in other processes that wait
        for the old file's lock notice it was replaced and write to the new one."""
        with self._sole_writer(), _THREADS, self._held() as (fd, _):
            size = _complete_size(fd, self.path)
            last = _last_line(fd, size, self.path)
            if last is None:
                raise AuditError(f"the audit log {self.path} is empty: nothing to rotate")
            seq, prev = self._next_after(last)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            archive = archive or self.path.with_name(f"{self.path.name}.{stamp}")
            first = {"v": FORMAT_VERSION, "seq": seq, "time": utc_now(), "kind": checkpoint.CONTINUED,
                     "from": archive.name, "prev": prev}
            data = _LINE.encode(first).encode("ascii") + b"\n"
            temporary = self.path.with_name(f".{self.path.name}.{stamp}.new")
            try:
                new = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.write(new, data)
                    os.fsync(new)
                finally:
                    os.close(new)
                os.link(self.path, archive)  # the old file stays under both names until the swap
                os.rename(temporary, self.path)
                fsync_directory(self.path.parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise AuditError(f"cannot rotate the audit log {self.path}: {exc.strerror}") from exc
        return archive

    def _give_up_lead(self) -> None:
        """Let a waiting checkpoint or rotation have the file next, else the writer. An interrupt while this
        waits for the lock (KeyboardInterrupt in a caller that wrote the lines itself) is raised once it is done:
        a lead never given up would leave every caller waiting for ever."""
        committer = self._committer
        given_up = False
        try:
            with committer.lock:
                committer.leading, given_up = False, True
                self._lead_next()
        except BaseException:
            with committer.lock:
                if not given_up:
                    committer.leading = False
                self._lead_next()  # (nothing if another took the lead meanwhile)
            raise

    def _lead_next(self) -> None:
        """Under the lock, unless someone leads: wake a waiting checkpoint or rotation, else the writer."""
        committer = self._committer
        if committer.leading:
            return
        if committer.sole_waiting:
            committer.cond.notify_all()
        elif committer.queue and committer.waiting_for:
            committer.waiting_for = 0
            committer.work.notify()

    def _wake_unwritten(self, batch: list[Pending]) -> None:
        """After an interrupt in a caller that took `batch` to write it, before it told all of the batch's callers
        (as the write began, or between two of them once it was durable): each caller not told yet, perhaps
        asleep waiting for its line, hears whether its line is in the file rather than wait for ever. (Callers
        already told were woken too: `_commit_batch` marks and wakes each in turn.)"""
        error = None if self._committer.durable is batch else AuditError(
            f"writing the audit log {self.path} was interrupted")
        for item in batch:
            if not item.done:
                item.error, item.done = error, True
                item.signal.release()

    def _take_queue(self) -> list[Pending]:
        committer = self._committer
        with committer.lock:
            batch, committer.queue = committer.queue, []
        return batch

    def _write_queued(self) -> None:
        """The writer thread: write the queued lines, a batch at a time, so that a line's fsync runs while its
        caller is still waiting for the custody's signature. After a batch, wait a little (GATHER_SECONDS) for as
        many lines as were queued meanwhile plus one for each caller the batch woke that was already waiting
        (done signing): callers that sign in a loop come straight back, and without the wait they fall into two
        groups that take turns, each batch half as large as it could be. A lone signer's line is written as soon
        as it comes; callers still signing when their line was done (a custody slower than the disk) are not
        waited for. Ends after WRITER_IDLE_SECONDS with nothing to write."""
        committer = self._committer
        try:
            self._write_batches()
        finally:  # an error that cannot happen: the next line starts another writer
            with committer.lock:
                if committer.writer is threading.current_thread():
                    committer.writer, committer.waiting_for = None, 0

    def _write_batches(self) -> None:
        committer = self._committer
        aim = 1  # lines to wait for before writing
        while True:
            with committer.lock:
                deadline = time.monotonic() + GATHER_SECONDS if aim > 1 else 0.0
                while committer.leading or committer.sole_waiting or len(committer.queue) < aim:
                    timeout = WRITER_IDLE_SECONDS
                    if deadline:
                        timeout = deadline - time.monotonic()
                        if timeout <= 0:  # they did not come: write what there is, else wait for a line
                            aim, deadline = 1, 0.0
                            continue
                    committer.waiting_for = aim
                    if not committer.work.wait(timeout) and not deadline and not committer.queue and \
                            not committer.leading and not committer.sole_waiting:
                        # Gone under the same lock: a line queued from now on starts another writer.
                        committer.writer, committer.waiting_for = None, 0
                        return
                committer.waiting_for = 0
                batch, committer.queue = committer.queue, []
                committer.leading = True
            woken = 0
            try:
                woken = self._commit_batch(batch)
            finally:
                with committer.lock:
                    aim = max(1, min(len(committer.queue) + woken, MAX_GATHER))
                self._give_up_lead()

    def _commit_batch(self, batch: list[Pending]) -> int:
        """Write one batch; every caller in it learns the outcome (an error: nothing of the batch was kept).
        Returns how many of its callers were asleep waiting for their line. An interrupt (KeyboardInterrupt in
        a caller writing the batch itself) is raised here, once the others have their error: an AuditError,
        not an interrupt their threads never had."""
        committer = self._committer
        interrupted: BaseException | None = None
        try:
            self._commit(batch)
        except Exception as exc:
            failed: Exception = exc
            if isinstance(exc, OSError):  # before the write (a lookup, a lock, a read): as a failed write says it
                failed = AuditError(f"cannot append to the audit log {self.path}: {exc.strerror or exc}")
            if committer.durable is not batch:
                for item in batch:
                    item.error = failed
            else:  # raised after the lines were durable (emitting a checkpoint's record): they stand
                reason = exc.message if isinstance(exc, KeysealError) else f"{type(exc).__name__}: {exc}"
                logger.warning("audit log %s: the lines were written, then: %s", self.path, one_line(reason))
        except BaseException as exc:
            interrupted = exc
            if committer.durable is not batch:
                error = AuditError(f"writing the audit log {self.path} was interrupted")
                for item in batch:
                    item.error = error
        woken = 0
        for item in batch:
            item.done = True
            woken += item.waiting
            item.signal.release()
        committer.durable = None
        if interrupted is not None:
            raise interrupted
        return woken

    def _commit(self, batch: list[Pending]) -> None:
        committer = self._committer
        every = checkpoint.interval_lines()
        by_time = checkpoint.interval_seconds()
        if not batch:
            return
        checkpoints: list[dict[str, object]] = []
        with _THREADS, self._held() as (fd, held):
            tail = committer.tail
            if tail is not None and tail[:3] == (held.st_dev, held.st_ino, held.st_size) and \
                    _ends_in(fd, tail.size, tail.last):
                size, seq, prev, after_checkpoint = tail.size, tail.seq, tail.prev, tail.after_checkpoint
            else:  # another process wrote since (or emptied it and wrote as much), or this one never did
                committer.tail = None
                size = _complete_size(fd, self.path)
                last = _last_line(fd, size, self.path)
                seq, prev = (1, GENESIS) if last is None else self._next_after(last)
                after_checkpoint = last is not None and _is_checkpoint(last)  # no second one in a row
            now = time.monotonic() if every > 0 and by_time > 0 else 0.0  # once per batch: µs apart
            # What the checkpoints of this batch change, kept until it is written: a checkpoint in a batch that
            # fails was not written, so it is still due (by time, or as a retry) at the next line.
            last_checkpoint, retry = committer.last_checkpoint, committer.retry_checkpoint
            chunks: list[bytes] = []
            for item in batch:
                if item.custody is not None:
                    committer.custody = item.custody
                if every > 0 and seq > 1 and not after_checkpoint and (
                        seq % every == 0 or retry or (by_time > 0 and now - last_checkpoint >= by_time)):
                    custody = item.custody or committer.custody
                    made = None
                    if custody is not None:
                        made = self._make_checkpoint(custody, seq, prev, every, keep=not chunks)
                        retry = made is None
                    if made is not None:
                        last_checkpoint = now or time.monotonic()
                        line = _LINE.encode(made).encode("ascii")
                        chunks.append(line + b"\n")
                        checkpoints.append(made)
                        seq, prev = seq + 1, line_hash(line)
                item.seq, item.prev = seq, prev
                if item.body is not None:  # the same bytes as encoding the record whole, fields spelt at submit
                    line = f'{_START}{seq},"time":"{item.time}",{item.body},"prev":"{prev}"}}'.encode("ascii")
                else:
                    line = _LINE.encode(item.written()).encode("ascii")
                item.line = line
                chunks.append(line + b"\n")
                seq, prev, after_checkpoint = seq + 1, line_hash(line), False
            data = b"".join(chunks)
            committer.tail = None
            self._write(fd, size, data, batch)
            committer.last_checkpoint, committer.retry_checkpoint = last_checkpoint, retry
            if checkpoints:
                committer.unwritten = None
            committer.tail = _Tail(held.st_dev, held.st_ino, size + len(data), seq, prev, after_checkpoint,
                                   line)
        for made in checkpoints:
            _emit(made)

    def _make_checkpoint(self, custody: Custody, seq: int, prev: str, every: int,
                         keep: bool = True) -> dict[str, object] | None:
        """A signed checkpoint at `seq`, or None (logged) when the custody cannot sign one now. The caller notes
        it as made (or to retry) once its line is written; until then the same checkpoint is offered again for
        the same place, so a disk that keeps failing does not cost the custody a signature for every batch.
        Only a checkpoint that follows a line already in the file (`keep`: the first in its batch) can have its
        place again: one after a line of a batch that failed cannot."""
        committer = self._committer
        kept = committer.unwritten
        if kept is not None and (kept["seq"], kept["prev"], kept["every"], kept["key_fingerprint"]) == (
                seq, prev, every, custody.fingerprint):
            return kept
        try:
            made = checkpoint.make(custody.key, custody.fingerprint, custody.key_uri, seq=seq, time=utc_now(),
                                   prev=prev, every=every)
        except Exception as exc:  # the custody is down: the lines still go in, the checkpoint comes later
            reason = exc.message if isinstance(exc, KeysealError) else type(exc).__name__
            logger.warning("audit log %s: cannot sign a checkpoint at sequence %d: %s", self.path, seq,
                           one_line(reason))
            return None
        if keep:
            committer.unwritten = made
        return made

    def _write(self, fd: int, size: int, data: bytes, batch: list[Pending] | None = None) -> None:
        """Append `data` (the file was `size` bytes long) and make it durable, else cut it off again. The `batch`
        it holds is marked durable in the same `try`: an interrupt before the mark cuts the lines off, so a batch
        marked durable is in the file."""
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            # fdatasync: the data and the size needed to read it back, without the modification time.
            os.fdatasync(fd)
            if batch is not None:
                self._committer.durable = batch
        except BaseException as exc:  # failed, or interrupted (KeyboardInterrupt): every caller hears an error
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # still under the lock: no one else appended since
            if isinstance(exc, OSError):
                raise AuditError(f"cannot append to the audit log {self.path}: {exc.strerror}") from exc
            raise

    def _hold(self) -> tuple[int, os.stat_result]:
        """The log exclusively locked (called under _THREADS), on a descriptor kept open between batches, with
        its status; if it was rotated while this waited for the lock, the new file. The caller unlocks it
        (`flock(fd, LOCK_UN)`, if `committer.fd` is still `fd`). At most MAX_OPEN_FILES logs stay open; the one
        least recently written is closed."""
        committer = self._committer
        for _ in range(100):
            if committer.fd < 0:
                committer.fd = self._open_fd()
                if len(_OPEN_FILES) >= MAX_OPEN_FILES:
                    _close_held(_OPEN_FILES[0])
                _OPEN_FILES.append(committer)
            elif _OPEN_FILES[-1] is not committer:
                _OPEN_FILES.remove(committer)
                _OPEN_FILES.append(committer)
            fd = committer.fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                try:
                    current = os.stat(self._fspath)
                except FileNotFoundError:
                    current = None
                tail = committer.tail
                if current is not None and tail is not None and \
                        (current.st_dev, current.st_ino, current.st_size) == tail[:3]:
                    # The file at the path is the one this descriptor holds (the tail is forgotten whenever the
                    # descriptor is closed), and as long as this process left it: no fstat needed.
                    return fd, current
                held = os.fstat(fd)
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise
            if current is not None and held.st_ino == current.st_ino and held.st_dev == current.st_dev:
                return fd, held
            fcntl.flock(fd, fcntl.LOCK_UN)
            _close_held(committer)  # moved aside by rotate() or removed: the lines belong in the file at the path
        raise AuditError(f"the audit log {self.path} keeps being replaced while keyseal writes to it")

    @contextlib.contextmanager
    def _held(self) -> Iterator[tuple[int, os.stat_result]]:
        """`_hold` for a batch, a checkpoint or a rotation (under _THREADS), unlocked after: the log is locked
        through the descriptor kept open, whose copy a forked child closes, so that no child keeps the lock for
        ever."""
        fd, status = self._hold()
        try:
            yield fd, status
        finally:
            if self._committer.fd == fd:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _open(self) -> Iterator[int]:
        fd = self._open_fd()
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_fd(self) -> int:
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
            ) from exc
        if created:
            with contextlib.suppress(OSError):
                fsync_directory(self.path.parent)
        return fd

    def _next_after(self, last: bytes) -> tuple[int, str]:
        """(seq, prev) for the line after `last`."""
        try:
            seq = json.loads(last)["seq"]
        except (ValueError, TypeError, KeyError):
            seq = None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise AuditError(f"the last line of the audit log {self.path} is not an audit record: check it with "
                             f"keyseal audit verify --log {self.path}, then move it aside to start a new log")
        return seq + 1, line_hash(last)


def _close_held(committer: _Committer) -> None:
    """Close a log kept open between batches (under _THREADS)."""
    if committer.fd >= 0:
        _OPEN_FILES.remove(committer)
        with contextlib.suppress(OSError):
            os.close(committer.fd)
    committer.fd, committer.tail = -1, None


def _ends_in(fd: int, size: int, last: bytes) -> bool:
    """Whether the file of `size` bytes still ends in `last`, the line this process wrote last (compared byte for
    byte with its line ends, one small read of a page in memory): a file emptied by another process and written
    again up to the same size does not."""
    start = size - len(last) - 1  # where that line begins
    if start < 0:
        return False
    if start == 0:
        return os.pread(fd, len(last) + 1, 0) == last + b"\n"
    return os.pread(fd, len(last) + 2, start - 1) == b"\n" + last + b"\n"


def _is_checkpoint(line: bytes) -> bool:
    return b'"kind":"checkpoint"' in line


def _emit(record: Mapping[str, object]) -> None:
    """A checkpoint on the `keyseal.audit` logger, as audit records are: the head leaves the host with the logs."""
    if logger.isEnabledFor(logging.INFO):
        logger.info("audit %s", _LINE.encode(record), extra={"audit": dict(record)})


def _complete_size(fd: int, path: Path) -> int:
    """The file's size once an incomplete last line is cut off (called under the lock).

    A writer killed inside write() can leave the start of a line: the kernel stops a write to a regular file
    between pages when the process gets SIGKILL. No signature was handed out for that line (a signature is
    returned only after its whole line is written and fsynced), so the next writer cuts it off and says so. An
    ending that does not look like the start of a keyseal line is left alone, and refused by `_last_line`."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    start = max(0, size - MAX_LINE)
    tail = os.pread(fd, size - start, start)
    newline = tail.rfind(b"\n")
    if newline < 0 and start > 0:
        return size
    fragment = tail[newline + 1:]
    if not fragment.startswith(b'{"v":'):
        return size
    keep = start + newline + 1
    try:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    except OSError as exc:
        raise AuditError(f"cannot cut the incomplete last line off the audit log {path}: {exc.strerror}") from exc
    logger.warning("audit log %s ended in an incomplete line (%d bytes, a write interrupted by a crash; no "
                   "signature was handed out for it): cut it off", path, size - keep)
    return keep


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
