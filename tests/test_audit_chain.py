"""The audit log's hash chain: `keyseal audit verify` names the line where a log was cut, edited, extended or
shuffled; appends from many threads keep one chain; records carry context, redact URIs and reach the logger."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keyseal._internal import audit
from keyseal._internal.audit import GENESIS, AuditLog, key_fingerprint, line_hash, verify_log
from keyseal._internal.backends import open_signer
from keyseal.errors import AuditChainError, AuditError
from tests.conftest import assert_one_line_error, run_keyseal

LINES = 8
Tamper = Callable[[list[bytes]], list[bytes]]


def write_log(path: Path, count: int = LINES) -> list[bytes]:
    log = AuditLog(path)
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    for index in range(count):
        audit.record(log_file=log, key_uri="awskms:alias/release", public_key=public_key, hash_name="sha256",
                     digest=hashlib.sha256(str(index).encode()).digest(), outcome="ok",
                     subject=f"dist/tool-{index}.tar.gz", purpose="openpgp-detached")
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def log_lines(tmp_path: Path) -> list[bytes]:
    return write_log(tmp_path / "pristine.log")


def forged_after(lines: list[bytes], index: int) -> bytes:
    """A well-formed line that claims to follow lines[index]: right seq, right prev, made-up content."""
    record = json.loads(lines[index])
    record.update(seq=record["seq"] + 1, subject="evil.tar.gz", prev=line_hash(lines[index].rstrip(b"\n")))
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def edit(index: int, old: bytes, new: bytes) -> Tamper:
    def apply(lines: list[bytes]) -> list[bytes]:
        assert old in lines[index]
        return [*lines[:index], lines[index].replace(old, new), *lines[index + 1:]]
    return apply


def move(source: int, target: int) -> Tamper:
    def apply(lines: list[bytes]) -> list[bytes]:
        moved = list(lines)
        moved.insert(target, moved.pop(source))
        return moved
    return apply


TAMPERS: dict[str, tuple[Tamper, str]] = {
    "delete line 4": (lambda ls: ls[:3] + ls[4:], "line 4: 1 line deleted before it"),
    "delete lines 2-3": (lambda ls: ls[:1] + ls[3:], "line 2: 2 lines deleted before it"),
    "delete line 1": (lambda ls: ls[1:], "line 1: 1 line deleted before it"),
    "edit line 3 digest": (edit(2, b'"digest":"', b'"digest":"00'), "line 3: edited"),
    "edit line 5 subject": (edit(4, b"tool-4", b"tool-X"), "line 5: edited"),
    "edit line 1 outcome": (edit(0, b'"outcome":"ok"', b'"outcome":"OK"'), "line 1: edited"),
    "edit line 6 seq": (edit(5, b'"seq":6', b'"seq":60'), "line 6: edited"),
    "edit line 2 into junk": (lambda ls: [ls[0], b"not json\n", *ls[2:]], "line 2: not an audit record"),
    "insert forged line 4": (lambda ls: [*ls[:3], forged_after(ls, 2), *ls[3:]], "line 4: inserted"),
    "insert copy of line 7 at 3": (lambda ls: [*ls[:2], ls[6], *ls[2:]], "line 3: inserted"),
    "insert junk at 5": (lambda ls: [*ls[:4], b"{}\n", *ls[4:]], "line 5: not an audit record"),
    "swap lines 3 and 4": (move(3, 2), "line 3: out of order"),
    "move line 2 to the end": (move(1, 7), "line 2: out of order"),
    "move line 7 to 2": (move(6, 1), "line 2: out of order"),
    "cut the last line in half": (lambda ls: [*ls[:-1], ls[-1][:40]], "line 8: incomplete"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_verify_names_the_broken_line(name: str, log_lines: list[bytes], tmp_path: Path) -> None:
    tamper, expected = TAMPERS[name]
    path = tmp_path / "tampered.log"
    path.write_bytes(b"".join(tamper(list(log_lines))))
    result = run_keyseal("audit", "verify", "--log", path)
    assert_one_line_error(result)
    assert result.returncode == 1
    assert result.stderr.startswith(f"keyseal: error: {expected}"), result.stderr
    with pytest.raises(AuditChainError, match=f"^{expected}"):
        verify_log(path)


@pytest.mark.slow
def test_intact_log_and_its_head(log_lines: list[bytes], tmp_path: Path) -> None:
    path = tmp_path / "pristine.log"
    head = line_hash(log_lines[-1].rstrip(b"\n"))
    result = run_keyseal("audit", "verify", "--log", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{LINES} lines, chain intact, head {head}"
    assert verify_log(path, head=f"sha256:{head.upper()}").lines == LINES
    # Cutting lines from the end leaves a valid chain: only the recorded head shows it.
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"".join(log_lines[:-2]))
    assert verify_log(cut).lines == LINES - 2
    result = run_keyseal("audit", "verify", "--log", cut, "--head", head)
    assert_one_line_error(result)
    assert result.returncode == 1 and f"no line of the audit log has the head {head}" in result.stderr
    # So does a log rewritten whole (every line re-chained): the old head is gone.
    rewritten = tmp_path / "rewritten.log"
    write_log(rewritten, LINES)
    assert verify_log(rewritten).lines == LINES
    with pytest.raises(AuditChainError, match="no line of the audit log has the head"):
        verify_log(rewritten, head=head)
    # A head in the middle of the log is fine: the log grew since it was recorded.
    assert verify_log(path, head=line_hash(log_lines[3].rstrip(b"\n"))).lines == LINES


@pytest.mark.slow
def test_verify_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert verify_log(empty).lines == 0 and verify_log(empty).head == GENESIS
    missing = run_keyseal("audit", "verify", "--log", tmp_path / "absent.log")
    assert_one_line_error(missing)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_head = run_keyseal("audit", "verify", "--log", empty, "--head", "xyz")
    assert_one_line_error(bad_head)
    off = run_keyseal("audit", "verify", env={"KEYSEAL_AUDIT_LOG": "off"})
    assert_one_line_error(off)
    assert "--log" in off.stderr


@pytest.mark.slow
def test_show_filters_by_key(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(2)]
    for index in range(4):
        audit.record(log_file=log, key_uri=f"file:k{index % 2}", public_key=keys[index % 2], hash_name="sha256",
                     digest=bytes(32), outcome="ok", subject=f"f{index}\tx", openpgp_fingerprint=f"AB{index % 2}")
    fingerprint = audit.key_fingerprint(keys[1])
    for selector in ("file:k1", fingerprint, fingerprint.removeprefix("sha256:"), "ab1"):
        shown = run_keyseal("audit", "show", "--log", path, "--key", selector)
        assert shown.returncode == 0, shown.stderr
        rows = [line.split("\t") for line in shown.stdout.splitlines()]
        assert [(row[0], row[4]) for row in rows] == [("2", "f1\\tx"), ("4", "f3\\tx")], selector
    as_json = run_keyseal("audit", "show", "--log", path, "--json")
    assert as_json.stdout.encode() == path.read_bytes()


def test_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "threads.log"
    log = AuditLog(path)
    start = threading.Barrier(8)

    def worker(number: int) -> None:
        start.wait()
        for index in range(25):
            audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256",
                         digest=bytes(32), outcome="ok", subject=f"{number}-{index}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert verify_log(path).lines == 200
    subjects = [json.loads(line)["subject"] for line in path.read_bytes().splitlines()]
    assert sorted(subjects) == sorted(f"{n}-{i}" for n in range(8) for i in range(25))


def test_append_refuses_a_damaged_end(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    write_log(path, 2)
    before = path.read_bytes()
    path.write_bytes(before + b"garbage")  # not the start of a line keyseal writes
    with pytest.raises(AuditError, match="ends in an incomplete line"):
        write_log(path, 1)
    path.write_bytes(before + before.splitlines(keepends=True)[-1][:40])  # a write cut short by SIGKILL
    write_log(path, 1)  # cut off again (no signature was handed out for it), then the next line
    assert verify_log(path).lines == 3
    path.write_bytes(before + b"garbage\n")
    with pytest.raises(AuditError, match=r"last line .* is not an audit record"):
        write_log(path, 1)
    assert path.read_bytes() == before + b"garbage\n"  # nothing appended to a log it cannot chain to


def test_a_log_replaced_by_a_copy_gets_the_next_line(tmp_path: Path) -> None:
    """The log stays open between batches: a file put in its place, even a copy of the same size, is noticed, and
    the next line goes to the file at the path, not to the one moved aside."""
    path = tmp_path / "a.log"
    log = AuditLog(path)
    for index in range(2):
        audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                     outcome="ok", subject=f"before-{index}")
    moved = tmp_path / "a.log.moved"
    os.rename(path, moved)
    shutil.copyfile(moved, path)  # same bytes and size, another file
    before = moved.read_bytes()
    audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                 outcome="ok", subject="after")
    assert moved.read_bytes() == before
    assert verify_log(path).lines == 3
    assert json.loads(path.read_bytes().splitlines()[-1])["subject"] == "after"


def test_a_log_emptied_and_regrown_to_the_same_size_is_read_back(tmp_path: Path) -> None:
    """Another process may leave the file at the size this one left it with other lines in it (emptied, then
    as many lines of the same length written again): the next line goes on from the line now last, not from the
    one this process remembers writing."""
    path = tmp_path / "a.log"
    log = AuditLog(path)
    audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                 outcome="ok", subject="first")
    left = path.stat()
    os.truncate(path, 0)
    script = ("import sys; from pathlib import Path; from keyseal._internal import audit; "
              "from keyseal._internal.audit import AuditLog; audit.record(log_file=AuditLog(Path(sys.argv[1])), "
              "key_uri='file:k', public_key=None, hash_name='sha256', digest=bytes(32), outcome='ok', "
              "subject='other')")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    now = path.stat()
    assert (now.st_ino, now.st_size) == (left.st_ino, left.st_size)  # the same file, of the same size
    audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                 outcome="ok", subject="after")
    assert verify_log(path).lines == 2
    assert [json.loads(line)["subject"] for line in path.read_bytes().splitlines()] == ["other", "after"]


def test_a_log_only_this_process_wrote_is_not_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the check above: while the file still ends in this process's last line (the first line
    of the file, then a later one), the next batch goes on from memory, without reading the last line back."""
    from keyseal._internal.audit import log as audit_log

    path = tmp_path / "a.log"
    log = AuditLog(path)
    audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                 outcome="ok", subject="first")

    def read_back(*_args: object) -> None:
        raise AssertionError("the last line was read back although only this process wrote")

    monkeypatch.setattr(audit_log, "_last_line", read_back)
    for subject in ("second", "third"):
        audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                     outcome="ok", subject=subject)
    assert verify_log(path).lines == 3


@pytest.mark.slow
def test_signer_records_context_and_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "signer.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(path))
    key = tmp_path / "k.pem"
    assert run_keyseal("keys", "create", "--out", key, "--type", "p256", "--unencrypted").returncode == 0
    caplog.set_level(logging.INFO, logger="keyseal.audit")
    digest = hashlib.sha256(b"data").digest()
    with open_signer(f"file:{key}") as signer:
        assert not path.exists()  # opening a key writes nothing
        with audit.subject("outer", purpose="p1"), audit.subject(purpose="p2", openpgp_fingerprint="F" * 40):
            signer.sign_digest(digest, "sha256")
        with audit.subject("in pool"), ThreadPoolExecutor(1) as pool:
            pool.submit(signer.sign_digest, digest, "sha256").result()  # workers do not inherit the context
        with pytest.raises(Exception):  # noqa: B017 - whatever the backend raises for a bad digest
            signer.sign_digest(b"short", "sha256")
    first, pooled, asked, failed = (json.loads(line) for line in path.read_bytes().splitlines())
    assert (first["subject"], first["purpose"], first["openpgp_fingerprint"]) == ("outer", "p2", "F" * 40)
    assert first["digest"] == digest.hex() and first["outcome"] == "ok"
    assert pooled["subject"] is None and pooled["purpose"] is None
    # The line goes in before the custody is asked; the failure follows it and names the line it corrects.
    assert asked["digest"] == b"short".hex() and "corrects" not in asked
    assert failed["outcome"].startswith("error: ") and failed["digest"] == b"short".hex()
    assert failed["corrects"] == asked["seq"] == 3
    emitted = [r for r in caplog.records if r.name == "keyseal.audit"]
    assert [getattr(r, "audit")["seq"] for r in emitted] == [1, 2, 4]  # noqa: B009 - one per signature, as it ended
    assert emitted[0].getMessage() == "audit " + path.read_bytes().splitlines()[0].decode()


def test_record_without_a_file_still_emits(caplog: pytest.LogCaptureFixture) -> None:
    """The server's path: `audit.record(log_file=None, ...)` when the file log is off, structured logs only."""
    caplog.set_level(logging.INFO, logger="keyseal.audit")
    fields = audit.record(log_file=None, key_uri="awskms:alias/ca", public_key=None, hash_name="sha384",
                          digest=bytes(48), outcome="ok", subject="spiffe://example.org/web", purpose="x509-svid")
    assert "seq" not in fields and "prev" not in fields and str(fields["time"]).endswith("Z")
    assert fields["subject"] == "spiffe://example.org/web" and fields["purpose"] == "x509-svid"
    (emitted,) = [r for r in caplog.records if r.name == "keyseal.audit"]
    assert getattr(emitted, "audit") == fields  # noqa: B009


@pytest.mark.parametrize(("uri", "shown"), [
    ("pkcs11:token=release;object=k?pin-value=1234", "pkcs11:token=release;object=k?pin-value=REDACTED"),
    ("pkcs11:token=release;object=k?module-path=/m.so&pin-value=1234",
     "pkcs11:token=release;object=k?module-path=/m.so&pin-value=REDACTED"),
    ("hashivault://transit/k?version=2&token=s.abc", "hashivault://transit/k?version=2&token=REDACTED"),
    ("hashivault://user:hunter2@transit/k", "hashivault://user:REDACTED@transit/k"),
    ("awskms:arn:aws:kms:eu-west-1:111122223333:key/abc", "awskms:arn:aws:kms:eu-west-1:111122223333:key/abc"),
    ("file:/keys/release.key", "file:/keys/release.key"),
])
def test_redact_uri(uri: str, shown: str) -> None:
    assert audit.redact_uri(uri) == shown


def test_outcome_keeps_only_keyseal_messages() -> None:
    assert audit.outcome_of(None) == "ok"
    assert audit.outcome_of(AuditError("a\nb")) == "error: a b"
    assert audit.outcome_of(ValueError("secret 1234")) == "error: internal error (ValueError)"


def test_git_objects_are_named() -> None:
    from keyseal._internal.release.gitsign import _git_subject

    assert _git_subject(b"tree 4b825dc6\nauthor A <a@example.org> 1 +0000\n\nmessage\n") == "git commit"
    assert _git_subject(b"object 4b825dc6\ntype commit\ntag v1.0\ntagger A <a@example.org> 1 +0000\n\nv1.0\n") \
        == "git tag v1.0"
    assert _git_subject(b"anything else") == "git object"


def test_service_logs_keep_the_audit_trail_at_any_level(capsys: pytest.CaptureFixture[str]) -> None:
    """`keyseal server` with logLevel warning still writes every audit record (and checkpoint) to its log."""
    from keyseal._internal.cli.service import configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    audit_level = logging.getLogger("keyseal.audit").level
    handler = logging.StreamHandler()
    root.handlers = [handler]
    try:
        configure_logging("warning")
        audit.record(log_file=None, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                     outcome="ok", subject="at-warning")
        logging.getLogger("keyseal.other").info("not shown")
    finally:
        root.handlers, root.level = handlers, level
        logging.getLogger("keyseal.audit").setLevel(audit_level)
    err = capsys.readouterr().err
    assert "INFO audit {" in err and "at-warning" in err and "not shown" not in err


def test_signer_lines_are_the_encoders_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """An AuditingSigner spells each line from a prefix and suffix it keeps per context, hash and way of
    signing: the bytes must be those of encoding the record whole, whatever the subject holds, and the kept
    prefix must follow every change of context, hash or signing call."""
    path = tmp_path / "spelt.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(path))
    private = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "k.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    caplog.set_level(logging.INFO, logger="keyseal.audit")
    subjects = [None, 'a "quoted" \\ name', "tab\tnew\nline", "ünïcødé ✓ \U0001f511", "x" * 5000, None, "same", "same"]
    expected: list[tuple[str | None, str | None, str, str, str]] = []
    with open_signer(f"file:{pem}") as signer:
        for index, name in enumerate(subjects):
            digest = hashlib.sha512(str(index).encode()).digest()
            message = b"m%d" % index
            with audit.subject(name, purpose=f"p{index % 2}"):  # each call differs from the last in one thing
                signer.sign_message(message)
                expected.append((name, f"p{index % 2}", "sha256", "message", hashlib.sha256(message).hexdigest()))
                signer.sign_digest(digest[:32], "sha256")
                expected.append((name, f"p{index % 2}", "sha256", "digest", digest[:32].hex()))
                signer.sign_digest(digest, "sha512")
                expected.append((name, f"p{index % 2}", "sha512", "digest", digest.hex()))
            signer.sign_digest(digest, "sha512")  # outside the context: no subject, no purpose
            expected.append((None, None, "sha512", "digest", digest.hex()))
    encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(expected)
    for line, (name, purpose, hash_name, signed, digest_hex) in zip(lines, expected, strict=True):
        record = json.loads(line)
        assert line == encoder.encode(record).encode("ascii")  # the encoder's bytes, field order included
        assert list(record) == ["v", "seq", "time", "key_uri", "key_fingerprint", "openpgp_fingerprint", "hash",
                                "signed", "digest", "subject", "purpose", "outcome", "prev"]
        shown = name if name is None or len(name) <= 4096 else name[:4093] + "..."
        assert (record["subject"], record["purpose"], record["hash"], record["signed"], record["digest"]) == \
            (shown, purpose, hash_name, signed, digest_hex)
        assert record["outcome"] == "ok" and record["key_fingerprint"] == key_fingerprint(private.public_key())
    verify_log(path)
    emitted = [getattr(r, "audit") for r in caplog.records if r.name == "keyseal.audit"]  # noqa: B009
    assert emitted == [json.loads(line) for line in lines]  # the logger gets the records as written
