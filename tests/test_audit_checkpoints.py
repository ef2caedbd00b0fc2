"""Signed checkpoints: a log rewritten with its chain recomputed, stripped of checkpoints, cut at the end or
re-signed by another key fails `keyseal audit verify --key`; rotation links the files. The unkeyed chain alone
passes every one of these rewrites (checked here too, so the tests show what the checkpoints add)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal import audit
from keyseal._internal.audit import AuditLog, checkpoint, line_hash, verify_log
from keyseal._internal.audit.checkpoint import load_keys
from keyseal._internal.audit.log import GENESIS
from keyseal._internal.backends import open_signer
from keyseal.errors import AuditError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.test_audit_group_commit import refuse_writer_threads

EVERY = 5


@pytest.fixture
def key(tmp_path: Path) -> tuple[str, Path]:
    """A file key URI and its public key (PEM) for --key."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "signing.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem.chmod(0o600)
    public = tmp_path / "signing.pub.pem"
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"file:{pem}", public


@pytest.fixture
def log_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "audit" / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(path))
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", str(EVERY))
    return path


def sign(uri: str, count: int, start: int = 0) -> None:
    with open_signer(uri) as signer:
        for index in range(start, start + count):
            with audit.subject(f"file-{index}"):
                signer.sign_digest(hashlib.sha256(str(index).encode()).digest(), "sha256")


def checkpoint_signatures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The seq of every checkpoint the custody is asked to sign from now on."""
    real_make, signed = checkpoint.make, []
    monkeypatch.setattr(checkpoint, "make", lambda *args, **kwargs: (signed.append(kwargs["seq"]),
                                                                     real_make(*args, **kwargs))[1])
    return signed


def failing_fdatasync(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """The next `times` fdatasyncs fail (EIO), as a failing disk's would; returns the descriptors they were for."""
    real_sync, failed = os.fdatasync, []

    def failing(fd: int) -> None:
        if len(failed) < times:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    return failed


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def rechain(records: list[dict[str, object]], start_prev: str = GENESIS) -> bytes:
    """What a local writer without the key does after an edit: renumber, recompute every prev."""
    out, prev = [], start_prev
    first_seq = int(str(records[0]["seq"])) if records else 1
    for index, original in enumerate(records):
        record = {**original, "seq": first_seq + index, "prev": prev}
        line = json.dumps(record, separators=(",", ":")).encode()
        out.append(line + b"\n")
        prev = line_hash(line)
    return b"".join(out)


def verify_cli(*args: str | Path) -> tuple[int, str, str]:
    result = run_keyseal("audit", "verify", *args)
    return result.returncode, result.stdout, result.stderr


def test_checkpoints_are_signed_lines_and_logged(key: tuple[str, Path], log_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    uri, public = key
    with caplog.at_level(logging.INFO, logger="keyseal.audit"):
        sign(uri, 23)
    records = lines_of(log_path)
    kinds = [r.get("kind") for r in records]
    assert len(records) == 28 and kinds.count("checkpoint") == 5
    assert [r["seq"] for r in records if r.get("kind") == "checkpoint"] == [5, 10, 15, 20, 25]
    for record in records:
        if record.get("kind") == "checkpoint":
            assert record["lines"] == int(str(record["seq"])) - 1 and record["every"] == EVERY
    logged = [r.getMessage() for r in caplog.records if '"kind":"checkpoint"' in r.getMessage()]
    assert len(logged) == 5  # each checkpoint also leaves on the logger, as written
    report = verify_log(log_path, keys=load_keys([public]))
    assert (report.lines, report.checkpoints, report.after_last_checkpoint) == (28, 5, 3)
    code, out, err = verify_cli("--log", log_path, "--key", public)
    assert code == 0, err
    assert "28 lines, chain intact" in out and "5 checkpoints, each signature valid; 3 lines after" in out


@pytest.mark.slow
def test_edit_and_rechain_is_caught_by_the_checkpoint_signature(key: tuple[str, Path], log_path: Path) -> None:
    uri, public = key
    sign(uri, 23)
    records = lines_of(log_path)
    records[1]["subject"] = "evil.tar.gz"
    log_path.write_bytes(rechain(records))
    assert verify_log(log_path).lines == 28  # the unkeyed chain cannot tell
    code, _, err = verify_cli("--log", log_path, "--key", public)
    assert code == 1
    assert "line 5: a checkpoint whose signature does not match the head it names" in err
    assert_one_line_error(run_keyseal("audit", "verify", "--log", log_path, "--key", public))


@pytest.mark.slow
def test_removed_checkpoints_are_caught(key: tuple[str, Path], log_path: Path) -> None:
    uri, public = key
    sign(uri, 23)
    stripped = [r for r in lines_of(log_path) if r.get("kind") != "checkpoint"]
    stripped[1]["subject"] = "evil.tar.gz"
    log_path.write_bytes(rechain(stripped))
    assert verify_log(log_path).lines == 23
    code, _, err = verify_cli("--log", log_path, "--key", public)
    assert code == 1 and "audit.log: 23 lines without a checkpoint, where one is made every 5 lines" in err
    # Checkpoints removed from the middle: the lines between the two kept ones are too many.
    sign(uri, 12, start=23)  # appends after the rewritten lines: checkpoints at 25, 30, 35
    records = lines_of(log_path)
    assert [r["seq"] for r in records if r.get("kind") == "checkpoint"] == [25, 30, 35]
    log_path.write_bytes(rechain([r for r in records if r["seq"] != 30]))
    code, _, err = verify_cli("--log", log_path, "--key", public, "--every", "0")
    assert code == 1 and "line 31: 6 lines without a checkpoint, where one is made every 5 lines" in err


@pytest.mark.slow
def test_checkpoints_by_another_key_are_refused(key: tuple[str, Path], log_path: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    uri, public = key
    sign(uri, 8)
    # Someone with their own key rewrites the log through keyseal: valid checkpoints, the wrong key.
    records = [r for r in lines_of(log_path) if r.get("kind") != "checkpoint"]
    records[0]["subject"] = "evil.tar.gz"
    forged = tmp_path / "forged.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(forged))
    other = ec.generate_private_key(ec.SECP256R1())
    other_pem = tmp_path / "other.pem"
    other_pem.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    sign(f"file:{other_pem}", 8)
    code, _, err = verify_cli("--log", forged, "--key", public)
    assert code == 1 and "line 5: a checkpoint signed by sha256:" in err and "not by a key given" in err


@pytest.mark.slow
def test_tail_cut_after_a_checkpoint_is_reported_against_its_copy(key: tuple[str, Path], log_path: Path,
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    uri, public = key
    with caplog.at_level(logging.INFO, logger="keyseal.audit"):
        sign(uri, 23)
    copies = tmp_path / "pod.log"  # what left the host: the logger's lines, as a log pipeline keeps them
    copies.write_text("".join(f"2026-12-06T06:00:00Z INFO {r.getMessage()}\n" for r in caplog.records))
    code, out, err = verify_cli("--log", log_path, "--key", public, "--checkpoints", copies)
    assert code == 0, err
    assert "5 of 5 checkpoint copies found in the log" in out
    whole = log_path.read_bytes().splitlines(keepends=True)
    log_path.write_bytes(b"".join(whole[:22]))  # cut the checkpoint at line 25 and what follows it... and more
    assert verify_log(log_path, keys=load_keys([public])).lines == 22  # the file alone looks whole
    code, _, err = verify_cli("--log", log_path, "--key", public, "--checkpoints", copies)
    assert code == 1
    assert "the log ends at sequence 22, but the checkpoint made" in err and "signed 24 lines" in err
    assert "lines were cut from its end" in err
    # A log replaced whole, re-chained from the start, no longer holds the heads the copies signed.
    records = [json.loads(line) for line in whole]
    records[0]["subject"] = "evil.tar.gz"
    log_path.write_bytes(rechain(records))
    code, _, err = verify_cli("--log", log_path, "--checkpoints", copies)
    assert code == 1 and "line 4 (sequence 4) is not the line the checkpoint made" in err
    assert "the log was rewritten" in err


@pytest.mark.slow
def test_rotation_links_the_files(key: tuple[str, Path], log_path: Path, tmp_path: Path) -> None:
    uri, public = key
    sign(uri, 7)
    head = verify_log(log_path).head
    old = tmp_path / "audit" / "audit.log.1"
    result = run_keyseal("audit", "rotate", "--log", log_path, "--to", old)
    assert result.returncode == 0, result.stderr
    sign(uri, 7, start=7)
    first = lines_of(log_path)[0]
    assert (first["kind"], first["seq"], first["prev"], first["from"]) == ("continued", 9, head, "audit.log.1")
    code, out, err = verify_cli("--log", old, "--log", log_path, "--key", public)
    assert code == 0, err
    assert "18 lines, chain intact" in out and "3 checkpoints" in out
    code, out, err = verify_cli("--log", log_path, "--key", public)
    assert code == 0 and f"goes on from a rotated file with head {head}" in out
    code, _, err = verify_cli("--log", log_path, "--log", old)
    assert code == 1 and "does not go on from the head of" in err
    # A file that starts from the head of another log is not this one's continuation.
    other = tmp_path / "other.log"
    AuditLog(other).append({"subject": "x"})
    code, _, err = verify_cli("--log", other, "--log", log_path)
    assert code == 1 and "does not go on from the head of" in err


def test_a_writer_waiting_during_rotation_appends_to_the_new_file(key: tuple[str, Path], log_path: Path,
                                                                  tmp_path: Path) -> None:
    """A writer that opened the old file and waits for its lock while another process rotates it must write
    to the new file, not to the one moved aside."""
    uri, _ = key
    sign(uri, 3)
    fd = os.open(log_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process, mid-rotation
    writer = threading.Thread(target=sign, args=(uri, 1, 3))
    writer.start()
    time.sleep(0.3)  # the writer has opened the old file and waits for its lock
    moved = tmp_path / "audit" / "audit.log.1"
    os.link(log_path, moved)
    head = verify_log(log_path).head
    first = {"v": 1, "seq": 4, "time": "2026-12-06T06:00:00.000000Z", "kind": "continued", "from": moved.name,
             "prev": head}
    new = tmp_path / "audit" / "new"
    new.write_bytes(json.dumps(first, separators=(",", ":")).encode() + b"\n")
    os.rename(new, log_path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    writer.join(timeout=30)
    assert [r["seq"] for r in lines_of(moved)] == [1, 2, 3]
    assert [r["seq"] for r in lines_of(log_path)] == [4, 5, 6]  # 5: a checkpoint, 6: the waiting writer's line
    assert verify_log([moved, log_path]).lines == 6


@pytest.mark.slow
def test_old_logs_still_verify(tmp_path: Path) -> None:
    """A log written before checkpoints (format v1 as it was) verifies; with --key, --every 0 accepts it."""
    path = tmp_path / "old.log"
    prev, lines = GENESIS, []
    for seq in range(1, 13):
        record = {"v": 1, "seq": seq, "time": "2026-11-23T21:12:08.341681Z", "key_uri": "file:k",
                  "key_fingerprint": None, "openpgp_fingerprint": None, "hash": "sha256", "signed": "digest",
                  "digest": "00" * 32, "subject": f"f{seq}", "purpose": None, "outcome": "ok", "prev": prev}
        line = json.dumps(record, separators=(",", ":")).encode()
        lines.append(line + b"\n")
        prev = line_hash(line)
    path.write_bytes(b"".join(lines))
    code, out, _ = verify_cli("--log", path)
    assert code == 0 and "12 lines, chain intact" in out
    public = tmp_path / "p.pem"
    public.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = verify_cli("--log", path, "--key", public, "--every", "5")
    assert code == 1 and "lines without a checkpoint" in err
    code, out, err = verify_cli("--log", path, "--key", public, "--every", "0")
    assert code == 0, err


@pytest.mark.slow
def test_checkpoint_command_signs_the_head_now(key: tuple[str, Path], log_path: Path) -> None:
    uri, public = key
    sign(uri, 2)
    result = run_keyseal("audit", "checkpoint", "--log", log_path, "--key", uri)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["kind"] == "checkpoint" and printed["lines"] == 2
    assert lines_of(log_path)[-1] == printed
    code, _, err = verify_cli("--log", log_path, "--key", public)
    assert code == 0, err


def test_the_interval_a_checkpoint_signs_is_the_one_verify_holds_to(key: tuple[str, Path], log_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Written every 8 lines, checked where the default is 5: the lines before the first checkpoint are held to
    the interval it signs, not to the verifier's default."""
    uri, public = key
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "8")
    sign(uri, 20)
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "5")
    report = verify_log(log_path, keys=load_keys([public]))
    assert (report.lines, report.checkpoints, report.after_last_checkpoint) == (22, 2, 6)


@pytest.mark.slow
def test_a_long_running_process_checkpoints_after_a_quiet_spell(key: tuple[str, Path], log_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Besides every N lines: after KEYSEAL_AUDIT_CHECKPOINT_SECONDS, at the next line or at a periodic call (the
    server's loop), signed by the last key this process saw; nothing when no line was added since."""
    uri, public = key
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "1000")
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_SECONDS", "0.3")
    log = AuditLog(log_path)
    sign(uri, 2)
    assert log.checkpoint() is None  # not due yet
    time.sleep(0.35)
    made = log.checkpoint()
    assert made is not None and made["lines"] == 2
    time.sleep(0.35)
    assert log.checkpoint() is None  # nothing new to cover
    sign(uri, 1, start=2)  # due by time at this line: the checkpoint goes first
    kinds = [r.get("kind") for r in lines_of(log_path)]
    assert kinds == [None, None, "checkpoint", None]
    time.sleep(0.35)
    sign(uri, 1, start=3)
    assert [r.get("kind") for r in lines_of(log_path)][-2:] == ["checkpoint", None]
    assert verify_log(log_path, keys=load_keys([public])).checkpoints == 2


def test_a_checkpoint_in_a_batch_that_failed_is_still_due(key: tuple[str, Path], log_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint due by time goes into the batch of the next line; when that batch cannot be made durable,
    nothing of it is in the file, so the checkpoint is still due at the line after (not a full interval later).
    While the disk keeps failing, the custody signs that checkpoint once, not once for every failed batch."""
    uri, public = key
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "1000")
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_SECONDS", "30")
    sign(uri, 2)
    log = AuditLog(log_path)
    monkeypatch.setattr(log._committer, "last_checkpoint", time.monotonic() - 31)  # due by time now
    signed = checkpoint_signatures(monkeypatch)
    failed = failing_fdatasync(monkeypatch, 3)
    for index in range(2, 5):
        with pytest.raises(AuditError, match="Input/output error"):
            sign(uri, 1, start=index)
    assert len(failed) == 3 and [r.get("kind") for r in lines_of(log_path)] == [None, None]
    sign(uri, 1, start=5)
    assert [r.get("kind") for r in lines_of(log_path)] == [None, None, "checkpoint", None]
    assert signed == [3]  # signed once, for its place after the two lines, and written there at last
    assert verify_log(log_path, keys=load_keys([public])).checkpoints == 1


def test_a_failed_batch_holding_two_checkpoints_leaves_the_first_signed_once(key: tuple[str, Path], log_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch can hold more than one checkpoint (lines that pass two multiples of the interval). When it cannot
    be made durable, only its first checkpoint's place (after the lines in the file) comes again; while the disk
    keeps failing, the custody signs the checkpoint for that place once, not once for every failed batch."""
    from keyseal._internal.audit import Custody, key_fingerprint, unwrap

    uri, public = key
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "2")
    sign(uri, 1)
    log = AuditLog(log_path)
    refuse_writer_threads(monkeypatch)  # callers write their lines, each batch whole
    signed = checkpoint_signatures(monkeypatch)
    failed = failing_fdatasync(monkeypatch, 3)  # the first three batches
    with open_signer(uri) as signer:
        inner = unwrap(signer)
        custody = Custody(inner, key_fingerprint(inner.public_key()), uri)
        for attempt in range(4):
            first = log.submit({"outcome": "ok", "subject": f"a{attempt}"}, custody)
            second = log.submit({"outcome": "ok", "subject": f"b{attempt}"}, custody)
            if attempt < 3:
                with pytest.raises(AuditError, match="Input/output error"):
                    log.settle(first)
            else:
                log.settle(first)
                log.settle(second)
    assert len(failed) == 3
    kinds = [r.get("kind") for r in lines_of(log_path)]
    assert kinds == [None, "checkpoint", None, "checkpoint", None]  # seq 2 and 4: one batch, two checkpoints
    assert signed.count(2) == 1, f"checkpoints signed at {signed}: the one at sequence 2 again for every batch"
    assert verify_log(log_path, keys=load_keys([public])).checkpoints == 2


def test_an_error_after_the_batch_is_durable_fails_no_signature(key: tuple[str, Path], log_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Something that fails once the batch's lines are durable (here: handing a checkpoint's record to the
    logger) does not discard the signatures those lines record: they are in the file. It is logged instead."""
    from keyseal._internal.audit import log as audit_log

    uri, public = key

    def failing_emit(record: object) -> None:
        raise RuntimeError("the log pipeline is down")

    monkeypatch.setattr(audit_log, "_emit", failing_emit)
    with caplog.at_level(logging.WARNING, logger="keyseal.audit"):
        sign(uri, EVERY)  # the batch of the EVERY-th line holds a checkpoint
    kinds = [r.get("kind") for r in lines_of(log_path)]
    assert kinds == [None] * (EVERY - 1) + ["checkpoint", None]
    assert "the lines were written, then: RuntimeError: the log pipeline is down" in caplog.text
    assert verify_log(log_path, keys=load_keys([public])).checkpoints == 1
