"""Group commit: threads that sign at once share an fsync, and a signature is still handed out only once its
line is durable, even when the process is killed (SIGKILL) at any moment. The line goes in before the custody is
asked (its fsync runs while the custody signs), so a kill can also fall between a durable line and its signature:
the chain still verifies and the next process goes on from it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyseal._internal import audit
from keyseal._internal.audit import verify_log
from keyseal._internal.audit.checkpoint import load_keys
from keyseal._internal.backends import open_signer
from keyseal.errors import AuditError

THREADS = 4


def file_key(tmp_path: Path, slow: bool = False) -> tuple[str, Path]:
    """A P-256 key file, or (slow) an RSA-4096 one: its signatures take milliseconds, so a kill often falls
    while the custody signs, after the line was written."""
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 4096) if slow else ec.generate_private_key(ec.SECP256R1()))
    pem = tmp_path / "k.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = tmp_path / "k.pub.pem"
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"file:{pem}", public


def child_status(pid: int, seconds: float, late: str) -> int:
    """The forked child's exit status; killed, and the test failed with `late`, if it runs longer than that."""
    for _ in range(int(seconds / 0.05)):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        threading.Event().wait(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"{late} within {seconds:g} s")


def left_asleep(signer: Any, caller: threading.Thread, seconds: float) -> bool:
    """Whether `caller` still waits for its line after `seconds`. Then one more line (it starts or wakes the
    writer) frees a caller left asleep, and the signer is closed."""
    caller.join(timeout=seconds)
    stuck = caller.is_alive()
    signer.sign_digest(bytes(32), "sha256")
    caller.join(timeout=10)
    signer.close()
    return stuck


def refuse_writer_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """No writer thread can be started, as in an interpreter shutting down (which refuses new threads)."""
    real_start = threading.Thread.start

    def refuse_writer(thread: threading.Thread) -> None:
        if thread.name == "keyseal-audit-writer":
            raise RuntimeError("can't create new thread at interpreter shutdown")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_writer)


def hold_next_sync(monkeypatch: pytest.MonkeyPatch,
                   *calls: str) -> tuple[threading.Event, threading.Event, threading.Event]:
    """(hold, syncing, gate): once `hold` is set, the next of the `calls` (os.fdatasync unless others are named)
    sets `syncing` and waits for `gate`."""
    hold, syncing, gate = threading.Event(), threading.Event(), threading.Event()

    def held(sync: Any) -> Any:
        def held_sync(fd: int) -> None:
            if hold.is_set():
                hold.clear()
                syncing.set()
                gate.wait(10)
            sync(fd)
        return held_sync

    for name in calls or ("fdatasync",):
        monkeypatch.setattr(os, name, held(getattr(os, name)))
    return hold, syncing, gate


@pytest.mark.slow
@contextlib.contextmanager
def writer_held() -> Iterator[threading.Event]:
    """The log's writer thread, started by the first line queued in the block (by this thread or one it starts
    there), held before it takes any batch until the yielded event is set; the block ends once it is held."""
    started, resume = threading.Event(), threading.Event()

    def trace_writer(frame: Any, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code.co_name == "_write_batches" and not started.is_set():
            started.set()
            resume.wait(10)
        return None

    before = threading.gettrace()
    threading.settrace(trace_writer)
    try:
        yield resume
        assert started.wait(10), "the writer thread did not start"
    finally:
        threading.settrace(before)  # type: ignore[arg-type]


class SecondCaller:
    """A caller in another thread: queues its line ("other") at once, waits for it only once the main thread took
    the queue (this line in it) to write it, and keeps what it heard in `outcome`."""

    def __init__(self, log: audit.AuditLog) -> None:
        self.log, self.queued, self.taken = log, threading.Event(), threading.Event()
        self.outcome: list[BaseException | None] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pending = self.log.submit({"outcome": "ok", "subject": "other"})
        self.queued.set()
        self.taken.wait(10)
        try:
            self.log.settle(pending)
            self.outcome.append(None)
        except BaseException as exc:  # what the caller hears is the point
            self.outcome.append(exc)

    def asleep_in(self, batch: list[Any]) -> None:
        """Called by the main thread holding `batch`: let this caller wait for its line, and return once it
        sleeps on it."""
        line = next(item for item in batch if item.entry and item.entry.get("subject") == "other")
        self.taken.set()
        for _ in range(1000):
            if line.waiting:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.05)  # on its signal by then


class InterruptedAfterRelease:
    """A caller's signal whose release (by whoever writes the caller's batch) is followed at once by SIGINT: an
    interrupt between two of the batch's callers being told."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def release(self) -> None:
        self.lock.release()
        signal.raise_signal(signal.SIGINT)

    def acquire(self) -> bool:
        return self.lock.acquire()


def test_concurrent_signers_share_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    real_sync, calls = os.fdatasync, []

    def counting_sync(fd: int) -> None:
        calls.append(fd)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_sync)
    per_thread = 100
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")  # opened and checked before the threads start
        calls.clear()
        barrier = threading.Barrier(THREADS)

        def work(number: int) -> None:
            barrier.wait()
            for index in range(per_thread):
                with audit.subject(f"{number}-{index}"):
                    signer.sign_digest(hashlib.sha256(f"{number}-{index}".encode()).digest(), "sha256")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    signatures = THREADS * per_thread
    assert verify_log(log).lines == signatures + 1
    assert len(calls) < signatures * 0.9, f"{len(calls)} fsyncs for {signatures} signatures"


def test_one_signer_pays_one_fsync_per_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = file_key(tmp_path)
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(tmp_path / "audit.log"))
    real_sync, calls = os.fdatasync, []
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real_sync(fd))[1])
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")
        calls.clear()
        for index in range(20):
            signer.sign_digest(hashlib.sha256(str(index).encode()).digest(), "sha256")
    assert len(calls) == 20


_SIGNER = """
import hashlib, os, sys, threading
from pathlib import Path
from keyseal._internal import audit
from keyseal._internal.backends import open_signer

out, uri, run = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
signer = open_signer(uri)
signer.sign_digest(bytes(32), "sha256")
print("ready", flush=True)

def work(number):
    index = 0
    while True:
        name = f"{run}-{number}-{index}"
        with audit.subject(name):
            signature = signer.sign_digest(hashlib.sha256(name.encode()).digest(), "sha256")
        temporary = out / (name + ".tmp")
        temporary.write_bytes(signature)
        os.rename(temporary, out / (name + ".sig"))
        index += 1
        if len(sys.argv) > 4 and index == int(sys.argv[4]):
            return

threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def kill_signers(tmp_path: Path, uri: str, public: Path) -> tuple[set[str], set[str]]:
    """Start a process that signs from 4 threads, writing each signature to a file once sign_digest returns,
    and SIGKILL it at a random moment, five times; then one run that ends by itself (the next writer after the
    kills). Returns the subjects of the ok lines and the names of the signature files; the chain and its
    checkpoints must verify."""
    log = tmp_path / "audit.log"
    out = tmp_path / "signatures"
    out.mkdir()
    env = dict(os.environ, KEYSEAL_AUDIT_LOG=str(log), KEYSEAL_AUDIT_CHECKPOINT_LINES="50")
    rng = random.Random()
    for run in range(6):
        last = run == 5
        proc = subprocess.Popen([sys.executable, "-c", _SIGNER, str(out), uri, f"r{run}", *(["5"] if last else [])],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else b""
            if not last:
                threading.Event().wait(rng.uniform(0.05, 0.5))
                proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == (-signal.SIGKILL if not last else 0), stderr.decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = [json.loads(line) for line in log.read_bytes().splitlines()]
    report = verify_log(log, keys=load_keys([public]))
    assert report.checkpoints >= 1
    assert all("corrects" not in r for r in records)  # no signature failed: no line corrects another
    return {r["subject"] for r in records if r.get("outcome") == "ok" and r["subject"] is not None}, \
        {p.name.removesuffix(".sig") for p in out.glob("*.sig")}


@pytest.mark.slow
def test_sigkill_never_leaves_a_signature_without_its_line(tmp_path: Path) -> None:
    uri, public = file_key(tmp_path)
    logged, signed = kill_signers(tmp_path, uri, public)
    assert len(signed) > 20
    assert signed - logged == set()  # every signature handed out has its line


@pytest.mark.slow
def test_sigkill_while_the_custody_signs_leaves_a_verifiable_chain(tmp_path: Path) -> None:
    """Slow signatures: most kills fall after a line was written and before its signature came back. Those
    lines stay (a line without a signature is allowed; a signature without its line never), the chain verifies,
    and the next process appends after them."""
    uri, public = file_key(tmp_path, slow=True)
    logged, signed = kill_signers(tmp_path, uri, public)
    assert len(signed) > 4
    assert signed - logged == set()
    killed = {name for name in logged - signed if not name.startswith("r5-")}
    assert killed, "no kill fell between a line and its signature"


def test_a_forked_child_writes_its_own_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked after the parent wrote (its writer thread running, the log kept open) starts afresh: its
    own descriptor and lock, no writer thread it would wait for in vain; both chains of lines interleave whole."""
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")
        pid = os.fork()
        if pid == 0:  # the child: sign, and report by the exit status only
            code = 1
            try:
                for index in range(200):
                    signer.sign_digest(hashlib.sha256(f"child-{index}".encode()).digest(), "sha256")
                code = 0
            finally:
                os._exit(code)
        for index in range(200):  # at the same time as the child: the two must exclude each other
            signer.sign_digest(hashlib.sha256(f"parent-{index}".encode()).digest(), "sha256")
        assert child_status(pid, 30, "the forked child did not finish signing") == 0
        signer.sign_digest(bytes(32), "sha256")
    assert verify_log(log).lines == 402


def test_many_logs_keep_few_files_open(tmp_path: Path) -> None:
    """One process writing to many logs keeps at most MAX_OPEN_FILES of them open between batches; a log
    closed and opened again goes on from its last line."""
    from keyseal._internal.audit.log import MAX_OPEN_FILES

    paths = [tmp_path / f"{number}.log" for number in range(12)]
    for _ in range(3):
        for path in paths:
            audit.AuditLog(path).append({"outcome": "ok", "subject": path.name})
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert 0 < len([name for name in held if name.startswith(str(tmp_path))]) <= MAX_OPEN_FILES < len(paths)
    for path in paths:
        assert verify_log(path).lines == 3


def test_rotations_and_checkpoints_while_threads_sign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rotate` and `checkpoint` take the file from the writer thread between its batches while 4 threads sign:
    neither waits for ever behind the writer, no line is lost or written twice, and the files chain."""
    uri, public = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    stop = threading.Event()
    subjects: list[str] = []

    def work(number: int) -> None:
        with open_signer(uri) as signer:
            index = 0
            while not stop.is_set():
                name = f"{number}-{index}"
                with audit.subject(name):
                    signer.sign_digest(hashlib.sha256(name.encode()).digest(), "sha256")
                subjects.append(name)
                index += 1

    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")
    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    archives = []
    try:
        for number in range(5):
            threading.Event().wait(0.05)
            assert audit.AuditLog(log).checkpoint(force=True) is not None
            archives.append(audit.AuditLog(log).rotate(tmp_path / f"audit.log.{number}"))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    files = [*archives, log]
    report = verify_log(files, keys=load_keys([public]))
    records = [json.loads(line) for path in files for line in path.read_bytes().splitlines()]
    assert report.lines == len(records) and report.checkpoints >= 5
    signed = [r["subject"] for r in records if r.get("outcome") == "ok" and r["subject"] is not None]
    assert sorted(signed) == sorted(subjects) and len(subjects) > 20


def test_the_writer_thread_ends_when_idle_and_another_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that signed once keeps no thread for ever: the writer ends after WRITER_IDLE_SECONDS, and the
    next line starts another."""
    from keyseal._internal.audit import log as audit_log

    monkeypatch.setattr(audit_log, "WRITER_IDLE_SECONDS", 0.2)
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))

    others = {t for t in threading.enumerate() if t.name == "keyseal-audit-writer"}  # earlier tests' logs

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "keyseal-audit-writer" and t not in others]

    with open_signer(uri) as signer:
        for round_ in range(2):
            before = writers()
            for index in range(3):
                signer.sign_digest(hashlib.sha256(f"{round_}-{index}".encode()).digest(), "sha256")
            assert writers(), "no writer thread wrote the lines"
            for _ in range(100):
                if not writers():
                    break
                threading.Event().wait(0.05)
            assert not writers(), "the writer thread outlived WRITER_IDLE_SECONDS"
            assert all(not t.is_alive() for t in before)
    assert verify_log(log).lines == 6


def test_without_a_writer_thread_each_caller_writes_its_line(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no thread can be started (an interpreter shutting down refuses new threads), callers write the
    queued lines themselves: every signature still has its durable line, one chain."""
    refuse_writer_threads(monkeypatch)
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    with open_signer(uri) as signer:

        def work(number: int) -> None:
            for index in range(25):
                signer.sign_digest(hashlib.sha256(f"{number}-{index}".encode()).digest(), "sha256")

        # Daemon threads, joined with a timeout: a caller left waiting fails the test rather than hanging it.
        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)
    assert verify_log(log).lines == THREADS * 25


def test_a_relative_log_path_stays_the_file_it_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KEYSEAL_AUDIT_LOG relative to the directory the signer was opened in: a later chdir does not start a
    second log (with a chain of its own) somewhere else."""
    uri, _ = file_key(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", "audit.log")
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")
        monkeypatch.chdir(second)
        signer.sign_digest(hashlib.sha256(b"after chdir").digest(), "sha256")
    assert verify_log(first / "audit.log").lines == 2
    assert not (second / "audit.log").exists()
def test_a_line_queued_as_the_idle_writer_ends_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread decides to end (idle) and lets go of the queue's lock before it is gone: a line queued
    in that moment, while a checkpoint holds the file, is still written once the checkpoint is done (by a writer
    started for it), and its caller does not sleep for ever. The writer is held at that moment by a trace
    function, the checkpoint inside its fdatasync."""
    from keyseal._internal.audit import log as audit_log

    monkeypatch.setattr(audit_log, "WRITER_IDLE_SECONDS", 0.05)
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    ending, resume = threading.Event(), threading.Event()

    def trace_writer(frame: Any, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code.co_name == "_write_batches" and not ending.is_set():
            return trace_return
        return None

    def trace_return(frame: Any, event: str, arg: object) -> Any:
        if event == "return":  # the idle writer's end: the lock is let go, the thread not yet gone
            ending.set()
            resume.wait(10)
        return trace_return

    hold, syncing, gate = hold_next_sync(monkeypatch)
    before = threading.gettrace()
    threading.settrace(trace_writer)
    try:
        with open_signer(uri) as signer:
            signer.sign_digest(bytes(32), "sha256")  # starts the writer thread, which then runs idle
        assert ending.wait(10), "the writer thread did not end"
    finally:
        threading.settrace(before)  # type: ignore[arg-type]
    hold.set()
    checkpointer = threading.Thread(target=lambda: audit.AuditLog(log).checkpoint(force=True), daemon=True)
    checkpointer.start()
    assert syncing.wait(10)
    signer = open_signer(uri)
    late = threading.Thread(target=signer.sign_digest, args=(hashlib.sha256(b"late").digest(), "sha256"),
                            daemon=True)
    late.start()
    threading.Event().wait(0.2)  # queued, and asleep until its line is durable
    resume.set()
    gate.set()
    checkpointer.join(timeout=10)
    assert not left_asleep(signer, late, 10), \
        "a line queued as the idle writer ended was not written until the next line came"
    assert verify_log(log).lines == 4


def test_an_interrupt_while_a_caller_writes_others_lines_stays_its_own(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller done signing before the writer thread runs writes the queued lines itself, other callers' with
    its own. A KeyboardInterrupt there (Ctrl-C in a main thread that signs) is raised in that caller alone: the
    other callers of the batch get an AuditError (their signatures are discarded), never an interrupt they did
    not have, and the log goes on. The writer thread is held before its first batch by a trace function, the
    batch inside its fdatasync when SIGINT comes."""
    log = audit.AuditLog(tmp_path / "audit.log")
    real_sync, syncing = os.fdatasync, threading.Event()

    def interrupted_sync(fd: int) -> None:
        if not syncing.is_set():
            syncing.set()
            threading.Event().wait(10)  # until SIGINT
        real_sync(fd)

    outcome: list[BaseException | None] = []
    ready, go = threading.Event(), threading.Event()

    def other() -> None:
        pending = log.submit({"outcome": "ok", "subject": "other"})
        ready.set()
        go.wait(10)
        try:
            log.settle(pending)
            outcome.append(None)
        except BaseException as exc:  # what the caller hears is the point
            outcome.append(exc)

    with writer_held() as resume:  # its line starts the writer thread, held before it takes any
        caller = threading.Thread(target=other, daemon=True)
        caller.start()
    assert ready.wait(10)
    monkeypatch.setattr(os, "fdatasync", interrupted_sync)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    assert threading.current_thread() is threading.main_thread()  # where Python raises KeyboardInterrupt
    main = threading.get_ident()

    def interrupt() -> None:
        syncing.wait(10)
        threading.Event().wait(0.1)  # asleep by then: a signal just before the sleep would not end it
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            log.append({"outcome": "ok", "subject": "main"})  # writes both lines: the writer has not run
    finally:
        signal.signal(signal.SIGINT, handler)
        resume.set()
        go.set()
        interrupter.join(timeout=10)
        caller.join(timeout=10)
    monkeypatch.setattr(os, "fdatasync", real_sync)
    assert len(outcome) == 1 and isinstance(outcome[0], AuditError), repr(outcome)
    log.append({"outcome": "ok", "subject": "after"})
    verify_log(log.path)
    # Nothing of the interrupted batch stays (its callers all heard an error), as after a failed write.
    assert [json.loads(raw)["subject"] for raw in log.path.read_bytes().splitlines()] == ["after"]


def test_an_interrupt_as_a_caller_starts_writing_others_lines_wakes_them(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that took the queue to write it itself, another caller's line in it (that caller asleep, waiting
    for it), and is interrupted as it starts writing (a KeyboardInterrupt that arrives as the call begins, before
    anything could be written) wakes the other with an AuditError rather than leave it asleep for ever; nothing
    of the batch is in the file, and the log goes on. The writer thread is held before its first batch."""
    from keyseal._internal.audit import log as audit_log

    log = audit.AuditLog(tmp_path / "audit.log")
    other = SecondCaller(log)
    real_commit_batch = audit_log.AuditLog._commit_batch

    def interrupted_as_it_starts(self: audit_log.AuditLog, batch: list[audit_log.Pending]) -> int:
        if threading.current_thread() is not threading.main_thread():
            return real_commit_batch(self, batch)
        other.asleep_in(batch)
        raise KeyboardInterrupt

    with writer_held() as resume:  # its line starts the writer thread, held before it takes any
        other.thread.start()
    assert other.queued.wait(10)
    monkeypatch.setattr(audit_log.AuditLog, "_commit_batch", interrupted_as_it_starts)
    try:
        with pytest.raises(KeyboardInterrupt):
            log.append({"outcome": "ok", "subject": "main"})  # takes both lines: the writer has not run
        other.thread.join(timeout=10)
    finally:
        resume.set()
    monkeypatch.setattr(audit_log.AuditLog, "_commit_batch", real_commit_batch)
    outcome = other.outcome
    assert not other.thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], AuditError), repr(outcome)
    log.append({"outcome": "ok", "subject": "after"})
    verify_log(log.path)
    assert [json.loads(raw)["subject"] for raw in log.path.read_bytes().splitlines()] == ["after"]


def test_an_interrupted_checkpoint_lets_the_writer_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint waiting for the file while a line is queued: the writer thread lets it go first. If the
    checkpoint is interrupted (KeyboardInterrupt) just as the file is let go for it, the writer writes the line
    then, rather than when more lines come or after WRITER_IDLE_SECONDS. Another checkpoint holds the file
    (inside its fdatasync) while the line is queued and the interrupted one waits; it sends SIGINT as it ends."""
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    signer = open_signer(uri)
    signer.sign_digest(bytes(32), "sha256")  # the writer thread is running; the key signs checkpoints
    hold, syncing, gate = hold_next_sync(monkeypatch)
    assert threading.current_thread() is threading.main_thread()  # where Python raises KeyboardInterrupt
    main = threading.get_ident()

    def first_checkpoint() -> None:
        audit.AuditLog(log).checkpoint(force=True)
        signal.pthread_kill(main, signal.SIGINT)  # at once: the main thread has not run since it was let go

    hold.set()
    first = threading.Thread(target=first_checkpoint, daemon=True)
    first.start()
    assert syncing.wait(10)
    line = threading.Thread(target=signer.sign_digest, args=(hashlib.sha256(b"queued").digest(), "sha256"),
                            daemon=True)
    line.start()
    opener = threading.Timer(0.3, gate.set)  # once the line is queued and the checkpoint below waits
    opener.daemon = True
    opener.start()
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            audit.AuditLog(log).checkpoint(force=True)
            threading.Event().wait(10)  # (had it been written before the interrupt came)
    finally:
        signal.signal(signal.SIGINT, handler)
        gate.set()
        first.join(timeout=10)
    assert not left_asleep(signer, line, 5), \
        "the queued line waited for the writer's idle timeout after the checkpoint was interrupted"
    records = [json.loads(raw) for raw in log.read_bytes().splitlines()]
    assert [r.get("kind", "signature") for r in records] == ["signature", "checkpoint", "signature", "signature"]


@pytest.mark.parametrize("operation", ["checkpoint", "rotate"])
def test_a_child_forked_during_a_checkpoint_or_rotation_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               operation: str) -> None:
    """A child forked while another thread checkpoints or rotates the log (the file locked, inside its
    fdatasync) has no copy of the lock: it writes its lines once the parent's thread is done, and so does the
    parent while the child lives."""
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    hold, syncing, gate = hold_next_sync(monkeypatch, "fdatasync", "fsync")  # a checkpoint's line, a rotation's file
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")  # the key signs checkpoints
        hold.set()
        busy = threading.Thread(target=getattr(audit.AuditLog(log), operation), daemon=True,
                                kwargs={"force": True} if operation == "checkpoint" else {})
        busy.start()
        assert syncing.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: sign, and report by the exit status only
            code = 1
            try:
                signer.sign_digest(hashlib.sha256(b"child").digest(), "sha256")
                code = 0
            finally:
                os._exit(code)
        threading.Event().wait(0.3)  # the child waits for the lock by then (before a rotation moves the file)
        gate.set()
        busy.join(timeout=10)
        assert child_status(pid, 10, "the child forked during the checkpoint or rotation did not write its line") == 0
        signer.sign_digest(hashlib.sha256(b"parent").digest(), "sha256")
    kinds = [json.loads(raw).get("kind", "signature") for raw in log.read_bytes().splitlines()]
    assert kinds == (["signature", "checkpoint"] if operation == "checkpoint" else ["continued"]) + \
        ["signature", "signature"]


def test_a_log_that_cannot_be_looked_up_fails_the_batch_with_an_audit_error(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fails before its write (here the log's directory was replaced by a file: the path cannot
    be looked up) gives each of its callers an AuditError, as a failed write or fsync does, not the system
    call's own error; once the directory is back, signing goes on."""
    uri, _ = file_key(tmp_path)
    directory = tmp_path / "logs"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(directory / "audit.log"))
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")
        directory.rename(tmp_path / "moved")
        directory.write_bytes(b"")
        errors: list[BaseException] = []

        def sign(number: int) -> None:
            try:
                signer.sign_digest(hashlib.sha256(str(number).encode()).digest(), "sha256")
            except BaseException as exc:  # what each caller hears is the point
                errors.append(exc)

        threads = [threading.Thread(target=sign, args=(n,), daemon=True) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(errors) == THREADS and all(isinstance(exc, AuditError) for exc in errors), errors
        assert "Not a directory" in str(errors[0])
        directory.unlink()
        (tmp_path / "moved").rename(directory)
        signer.sign_digest(bytes(32), "sha256")
    assert verify_log(directory / "audit.log").lines == 2


def test_an_interrupt_as_a_caller_gives_up_the_file_still_gives_it_up(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that wrote the queued lines itself gives the file up again under the queue's lock. A
    KeyboardInterrupt while it waits for that lock is raised there once the file is given up: the line queued
    meanwhile is written, its caller does not sleep for ever. The writer thread holds the lock meanwhile (held
    by a trace function as it is about to wait on it), the caller's batch inside its fdatasync until then."""
    log = audit.AuditLog(tmp_path / "audit.log")
    started, resume, armed, holding, let_go = (threading.Event() for _ in range(5))

    def trace_writer(frame: Any, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code.co_name == "_write_batches" and not started.is_set():
            started.set()  # before its first batch
            resume.wait(10)
        elif event == "call" and frame.f_code.co_name == "wait" and frame.f_globals["__name__"] == "threading" and \
                armed.is_set() and not holding.is_set():
            holding.set()  # woken by the queued line, about to wait again: the queue's lock is held
            let_go.wait(10)
        return None

    real_sync, syncing, gate = os.fdatasync, threading.Event(), threading.Event()

    def held_sync(fd: int) -> None:
        if not syncing.is_set():
            syncing.set()
            gate.wait(10)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", held_sync)
    outcome: list[BaseException | None] = []

    def queued() -> None:
        pending = log.submit({"outcome": "ok", "subject": "queued"})
        try:
            log.settle(pending)
            outcome.append(None)
        except BaseException as exc:  # what the caller hears is the point
            outcome.append(exc)

    assert threading.current_thread() is threading.main_thread()  # where Python raises KeyboardInterrupt
    main = threading.get_ident()
    line = threading.Thread(target=queued, daemon=True)

    def orchestrate() -> None:
        syncing.wait(10)  # the main thread writes its batch
        resume.set()
        threading.Event().wait(0.2)  # the writer waits for the file
        armed.set()
        line.start()  # wakes the writer, which then holds the lock
        holding.wait(10)
        gate.set()
        threading.Event().wait(0.2)  # the main thread waits for the lock to give the file up
        signal.pthread_kill(main, signal.SIGINT)
        threading.Event().wait(0.1)
        let_go.set()

    before = threading.gettrace()
    threading.settrace(trace_writer)
    try:
        log.submit({"outcome": "ok", "subject": "first"})  # starts the writer thread, held before it writes
        assert started.wait(10)
    finally:
        threading.settrace(before)  # type: ignore[arg-type]
    orchestrator = threading.Thread(target=orchestrate, daemon=True)
    orchestrator.start()
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            log.append({"outcome": "ok", "subject": "main"})  # writes the first line with its own
    finally:
        signal.signal(signal.SIGINT, handler)
        resume.set()
        gate.set()
        let_go.set()
        orchestrator.join(timeout=10)
        line.join(timeout=5)
    stuck = line.is_alive()
    monkeypatch.setattr(os, "fdatasync", real_sync)
    assert not stuck, "the file was never given up: the queued line's caller sleeps for ever"
    assert outcome == [None]
    subjects = [json.loads(raw)["subject"] for raw in log.path.read_bytes().splitlines()]
    assert subjects == ["first", "main", "queued"]


def test_a_line_lost_with_an_interrupted_batch_refuses_its_signature(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With no writer thread, a caller that takes the queue (another caller's line in it) and is stopped before
    it writes loses that line; the other caller must then get an AuditError, never its signature without a line."""
    from keyseal._internal.audit import log as audit_log
    from keyseal._internal.audit.signer import unwrap

    refuse_writer_threads(monkeypatch)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first_uri, _ = file_key(tmp_path / "first")
    second_uri, _ = file_key(tmp_path / "second")
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(tmp_path / "audit.log"))
    real_take = audit_log.AuditLog._take_queue
    stopped = threading.Event()

    def take_then_stop(self: audit_log.AuditLog) -> list[audit_log.Pending]:
        batch = real_take(self)
        if len(batch) > 1 and not stopped.is_set():  # the other caller's line is in it: stopped, as by an interrupt
            stopped.set()
            raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(audit_log.AuditLog, "_take_queue", take_then_stop)
    outcome: dict[str, BaseException | bytes] = {}
    with open_signer(first_uri) as first, open_signer(second_uri) as second:
        first.sign_digest(bytes(32), "sha256")
        second.sign_digest(bytes(32), "sha256")
        # The second custody signs only once the first caller was stopped: its line is queued meanwhile.
        custody = unwrap(second)
        real_sign = custody.sign_digest
        monkeypatch.setattr(custody, "sign_digest", lambda digest, hash_name: (stopped.wait(30),
                                                                               real_sign(digest, hash_name))[1])

        def sign(name: str, signer: Any) -> None:
            try:
                outcome[name] = signer.sign_digest(hashlib.sha256(name.encode()).digest(), "sha256")
            except BaseException as exc:  # what each caller hears is the point
                outcome[name] = exc

        queued = threading.Thread(target=sign, args=("second", second), daemon=True)
        queued.start()
        for _ in range(600):  # its line is queued before its custody is asked
            if audit_log._committer(tmp_path / "audit.log").queue:
                break
            threading.Event().wait(0.01)
        taker = threading.Thread(target=sign, args=("first", first), daemon=True)
        taker.start()  # queues its line, signs, takes both lines and is stopped
        for thread in (taker, queued):
            thread.join(timeout=30)
    assert stopped.is_set()
    assert isinstance(outcome["first"], KeyboardInterrupt)
    assert isinstance(outcome["second"], audit.AuditError), outcome["second"]
    assert "was not written" in str(outcome["second"])


def test_an_interrupt_after_a_callers_batch_is_written_tells_no_caller_its_durable_line_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller writing the queued lines itself (its own first, another caller's after it, that caller asleep) is
    interrupted (SIGINT, Ctrl-C in a main thread that signs) just after the batch is in the file and its own line
    was marked done, before the next one was: the other caller's line is durable in the file, so it must not be
    told that its line failed (its signature discarded) while the log holds an `ok` line for it."""
    from keyseal._internal.audit import log as audit_log

    log = audit.AuditLog(tmp_path / "audit.log")
    with writer_held() as resume:
        mine = log.submit({"outcome": "ok", "subject": "main"})  # starts the writer, held before it takes any

    mine.signal = InterruptedAfterRelease(mine.signal)  # type: ignore[assignment]
    other = SecondCaller(log)
    other.thread.start()
    assert other.queued.wait(10)
    real_commit = audit_log.AuditLog._commit

    def commit_once_the_other_sleeps(self: audit_log.AuditLog, batch: list[audit_log.Pending]) -> None:
        if threading.current_thread() is threading.main_thread():
            other.asleep_in(batch)
        real_commit(self, batch)

    monkeypatch.setattr(audit_log.AuditLog, "_commit", commit_once_the_other_sleeps)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    assert threading.current_thread() is threading.main_thread()
    try:
        with pytest.raises(KeyboardInterrupt):
            log.settle(mine)  # takes both lines (the writer has not run) and writes them: main's, then other's
        other.thread.join(timeout=10)
    finally:
        signal.signal(signal.SIGINT, handler)
        resume.set()
    monkeypatch.setattr(audit_log.AuditLog, "_commit", real_commit)
    assert not other.thread.is_alive()
    subjects = [json.loads(raw)["subject"] for raw in log.path.read_bytes().splitlines()]
    assert subjects == ["main", "other"]  # the batch is durable: both lines are in the file
    assert other.outcome == [None], f"told {other.outcome!r} though its line is in the file"
    log.append({"outcome": "ok", "subject": "after"})
    verify_log(log.path)


def test_without_a_writer_an_interrupt_after_the_batch_is_written_tells_no_caller_its_durable_line_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no writer thread (an interpreter shutting down), a caller writes the queued lines itself, another
    caller's among them, and is interrupted (SIGINT) once the batch is durable and its own line was marked done:
    the other line is in the file, so its caller must hear so, as when a writer thread runs, not that its line
    was not written (its signature discarded while the log holds an `ok` line for it)."""
    refuse_writer_threads(monkeypatch)
    log = audit.AuditLog(tmp_path / "audit.log")
    mine = log.submit({"outcome": "ok", "subject": "main"})
    other = log.submit({"outcome": "ok", "subject": "other"})

    mine.signal = InterruptedAfterRelease(mine.signal)  # type: ignore[assignment]
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    assert threading.current_thread() is threading.main_thread()
    try:
        with pytest.raises(KeyboardInterrupt):
            log.settle(mine)  # takes both lines (no writer) and writes them: main's, then other's
    finally:
        signal.signal(signal.SIGINT, handler)
    subjects = [json.loads(raw)["subject"] for raw in log.path.read_bytes().splitlines()]
    assert subjects == ["main", "other"]  # the batch is durable: both lines are in the file
    outcome: BaseException | None = None
    try:
        log.settle(other)
    except AuditError as exc:  # what the other caller hears is the point
        outcome = exc
    assert outcome is None, f"told {outcome!r} though its line is in the file"
    log.append({"outcome": "ok", "subject": "after"})
    verify_log(log.path)
