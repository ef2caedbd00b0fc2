"""The audit trail end to end: every signature the CLI makes (file, KMS and PKCS#11 keys) appends one chained line
whose digest is the one the published signature is over; failures are recorded; nothing secret is written; the log
can be turned off, and a log that cannot be written stops the signature."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from keyseal._internal.audit import GENESIS, line_hash, verify_log
from keyseal._internal.openpgp.armor import dearmor_or_binary
from keyseal._internal.openpgp.packets import TAG_SIGNATURE, iter_packets
from keyseal._internal.openpgp.signature import SignaturePacket, hash_name_of, parse_signature
from keyseal._internal.openpgp.verify import parse_detached
from keyseal.signer import PublicKey
from tests.conftest import assert_one_line_error, run_keyseal
from tests.formats_peers import pkcs11_key
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.softhsm import USER_PIN, SoftHsm

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

UID = ("--name", "Release Signing", "--email", "release@example.org")
CREATED = "2025-01-01T00:00:00Z"
FIELDS = ["v", "seq", "time", "key_uri", "key_fingerprint", "openpgp_fingerprint", "hash", "signed", "digest",
          "subject", "purpose", "outcome", "prev"]
_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


@pytest.fixture
def audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh audit log for this test; children started by run_keyseal inherit the variable."""
    path = tmp_path / "audit" / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(path))
    return path


def ok(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    result = run_keyseal(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text("ascii").splitlines()]


def spki_fingerprint(public_key: PublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def cert_public_key(cert: Path) -> PublicKey:
    from keyseal._internal.openpgp.cert import load_certificates

    return load_certificates(cert.read_bytes())[0].primary.public_key


def cert_signatures(data: bytes) -> list[SignaturePacket]:
    return [parse_signature(p.body) for p in iter_packets(dearmor_or_binary(data)) if p.tag == TAG_SIGNATURE]


def assert_signature_over(public_key: PublicKey, sig: SignaturePacket, digest_hex: object) -> None:
    """The signature in the published packet verifies over the recorded digest (checked with `cryptography` alone):
    so the digest recorded is the one the custody signed."""
    assert isinstance(digest_hex, str)
    digest = bytes.fromhex(digest_hex)
    assert digest[:2] == sig.left16
    algorithm = Prehashed(_HASHES[hash_name_of(sig.hash_id)]())
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(encode_dss_signature(*sig.values), digest, ec.ECDSA(algorithm))
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        size = (public_key.key_size + 7) // 8
        public_key.verify(sig.values[0].to_bytes(size, "big"), digest, padding.PKCS1v15(), algorithm)


def assert_detached(record: dict[str, object], data: Path, public_key: PublicKey) -> None:
    """The record's digest is SHA-x(file || trailer) of the signature written beside the file, and it verifies."""
    sig = parse_detached(data.with_name(data.name + ".asc").read_bytes())[-1]
    hasher = hashlib.new(hash_name_of(sig.hash_id))
    hasher.update(data.read_bytes())
    hasher.update(sig.trailer())
    assert record["digest"] == hasher.hexdigest()
    assert record["hash"] == hash_name_of(sig.hash_id)
    assert_signature_over(public_key, sig, record["digest"])


def assert_chain(path: Path, count: int) -> None:
    lines = path.read_bytes().splitlines()
    assert len(lines) == count
    prev = GENESIS
    for seq, line in enumerate(lines, 1):
        record = json.loads(line)
        assert list(record) == (FIELDS if "corrects" not in record else [*FIELDS[:-1], "corrects", "prev"])
        assert record["v"] == 1 and record["seq"] == seq and record["prev"] == prev
        assert isinstance(record["time"], str) and record["time"].endswith("Z")
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
        prev = line_hash(line)
    assert verify_log(path).lines == count
    checked = run_keyseal("audit", "verify", "--log", path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{count} lines, chain intact, head {prev}")


def test_file_key_mint_sign_revoke(audit_log: Path, tmp_path: Path) -> None:
    key = tmp_path / "release.key"
    uri = f"file:{key}"
    ok("keys", "create", "--out", key, "--type", "p256")
    assert not audit_log.exists()  # making a key signs nothing
    cert = tmp_path / "release.asc"
    fingerprint = ok("keys", "mint", "--key", uri, *UID, "--created", CREATED, "-o", cert).strip()
    files = []
    for index in range(3):
        data = tmp_path / f"tool-{index}.tar.gz"
        data.write_bytes(f"payload {index}\n".encode() * 1000)
        files.append(data)
    ok("sign", "--key", uri, "--cert", cert, "--jobs", "3", *files)
    revoked = tmp_path / "revoked.asc"
    ok("keys", "revoke", "--key", uri, "--cert", cert, "--reason", "superseded", "-o", revoked)

    assert_chain(audit_log, 5)
    log = records(audit_log)
    public_key = cert_public_key(cert)
    for record in log:
        assert record["key_uri"] == uri and record["outcome"] == "ok" and record["signed"] == "digest"
        assert record["key_fingerprint"] == spki_fingerprint(public_key)
        assert record["openpgp_fingerprint"] == fingerprint
    mint, *signed, revocation = log
    assert mint["purpose"] == "openpgp-certification" and mint["subject"] == "Release Signing <release@example.org>"
    assert_signature_over(public_key, cert_signatures(cert.read_bytes())[-1], mint["digest"])
    assert {r["purpose"] for r in signed} == {"openpgp-detached"}
    by_subject = {r["subject"]: r for r in signed}
    assert set(by_subject) == {str(f) for f in files}
    for data in files:
        assert_detached(by_subject[str(data)], data, public_key)
    assert revocation["purpose"] == "openpgp-revocation" and revocation["subject"] == f"{fingerprint} (superseded)"
    assert_signature_over(public_key, cert_signatures(revoked.read_bytes())[0], revocation["digest"])
    assert cert_signatures(revoked.read_bytes())[0].sig_type == 0x20


def test_kms_key_records_each_file(audit_log: Path, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                   kms_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    created = ok("keys", "create", "--kms", "--alias", "alias/audit/p384", "--type", "p384").split()
    arn, uri = created[0], created[1]
    cert = tmp_path / "kms.asc"
    fingerprint = ok("keys", "mint", "--key", uri, *UID, "-o", cert).strip()
    files = [tmp_path / f"f{index}" for index in range(4)]
    for index, data in enumerate(files):
        data.write_bytes(os.urandom(5000 + index))
    kms_emulator.calls.clear()
    ok("sign", "--key", uri, "--cert", cert, *files)
    assert kms_emulator.calls.counts()["Sign"] == len(files)

    assert_chain(audit_log, 1 + len(files))
    public_key = serialization.load_der_public_key(kms_client.get_public_key(KeyId=arn)["PublicKey"])
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    signed = records(audit_log)[1:]
    for data, record in zip(files, sorted(signed, key=lambda r: str(r["subject"])), strict=True):
        assert record["subject"] == str(data) and record["key_uri"] == uri and record["hash"] == "sha384"
        assert record["key_fingerprint"] == spki_fingerprint(public_key)
        assert record["openpgp_fingerprint"] == fingerprint and record["outcome"] == "ok"
        assert_detached(record, data, public_key)


def test_failed_signatures_are_recorded(audit_log: Path, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                        tmp_path: Path) -> None:
    uri = ok("keys", "create", "--kms", "--alias", "alias/audit/denied", "--type", "p256").split()[1]
    cert = tmp_path / "c.asc"
    ok("keys", "mint", "--key", uri, *UID, "-o", cert)
    data = tmp_path / "f"
    data.write_bytes(b"release")

    kms_emulator.deny(aws_env["AWS_ACCESS_KEY_ID"], "Sign")
    denied = run_keyseal("sign", "--key", uri, "--cert", cert, data)
    assert_one_line_error(denied)
    kms_emulator.allow_all()
    kms_emulator.fail("Sign", 1, "KMSInternalException", 500)
    failed = run_keyseal("sign", "--key", uri, "--cert", cert, data, env={"KEYSEAL_KMS_MAX_ATTEMPTS": "1"})
    assert_one_line_error(failed)
    assert not data.with_name("f.asc").exists()

    assert_chain(audit_log, 5)
    _, deny_asked, deny_record, fail_asked, fail_record = records(audit_log)
    # Each line goes in before the custody is asked; a failure adds a line naming the one it corrects.
    assert (deny_record["corrects"], fail_record["corrects"]) == (deny_asked["seq"], fail_asked["seq"]) == (2, 4)
    for asked, record in ((deny_asked, deny_record), (fail_asked, fail_record)):
        assert {k: v for k, v in asked.items() if k not in ("seq", "time", "prev", "outcome")} == \
            {k: v for k, v in record.items() if k not in ("seq", "time", "prev", "outcome", "corrects")}
    for record, result in ((deny_record, denied), (fail_record, failed)):
        outcome = record["outcome"]
        assert isinstance(outcome, str) and outcome.startswith("error: ")
        assert outcome[len("error: "):] in result.stderr  # the message the user saw, on one line
        assert record["subject"] == str(data) and record["purpose"] == "openpgp-detached"
        assert record["key_uri"] == uri and str(record["key_fingerprint"]).startswith("sha256:")
    assert "kms:Sign" in str(deny_record["outcome"]) or "AccessDenied" in str(deny_record["outcome"])


def test_no_key_material_or_pin_in_the_log(audit_log: Path, tmp_path: Path, softhsm: SoftHsm) -> None:
    clear = tmp_path / "clear.pem"
    ok("keys", "create", "--out", clear, "--type", "p256", "--unencrypted")
    cert = tmp_path / "clear.asc"
    ok("keys", "mint", "--key", f"file:{clear}", *UID, "--created", CREATED, "-o", cert)
    data = tmp_path / "f"
    data.write_bytes(b"x" * 100)
    ok("sign", "--key", f"file:{clear}", "--cert", cert, data)

    custody = pkcs11_key(softhsm, "p256")
    env = {name: value for name, value in custody.env.items() if name != "KEYSEAL_PKCS11_PIN"}
    with_pin = f"{custody.uri}?pin-value={USER_PIN}"
    hsm_cert = tmp_path / "hsm.asc"
    ok("keys", "mint", "--key", with_pin, *UID, "--created", CREATED, "-o", hsm_cert, env=env)
    (tmp_path / "f.asc").unlink()
    ok("sign", "--key", with_pin, "--cert", hsm_cert, data, env=env)

    assert_chain(audit_log, 4)
    text = audit_log.read_text("ascii")
    assert USER_PIN not in text
    assert [r["key_uri"] for r in records(audit_log)[2:]] == [f"{custody.uri}?pin-value=REDACTED"] * 2
    key = serialization.load_pem_private_key(clear.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    pem_body = "".join(clear.read_text().splitlines()[1:-1])
    for secret in (der.hex(), base64.b64encode(der).decode(), scalar.hex(), scalar.hex().upper(),
                   base64.b64encode(scalar).decode(), pem_body[:40], pem_body[-40:]):
        assert secret not in text
    for secret in (der, scalar):
        assert secret not in audit_log.read_bytes()


_APPENDER = """
import os, sys, time
from pathlib import Path
from keyseal._internal import audit
go, name = Path(sys.argv[1]), sys.argv[2]
while not go.exists():
    time.sleep(0.001)
log = audit.configured_log()
for index in range(150):
    audit.record(log_file=log, key_uri="file:k", public_key=None, hash_name="sha256", digest=bytes(32),
                 outcome="ok", subject=f"{name}-{index}")
"""


def test_concurrent_processes_keep_the_chain(audit_log: Path, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    ok("keys", "create", "--out", key, "--type", "p256", "--unencrypted")
    cert = tmp_path / "k.asc"
    ok("keys", "mint", "--key", f"file:{key}", *UID, "--created", CREATED, "-o", cert)
    go = tmp_path / "go"
    procs, all_files = [], []
    for worker in range(3):  # signing processes, each with several threads
        files = []
        for index in range(8):
            data = tmp_path / f"w{worker}-{index}"
            data.write_bytes(f"{worker}/{index}".encode())
            files.append(str(data))
        all_files += files
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "keyseal", "sign", "--key", f"file:{key}", "--cert", str(cert), "--jobs", "4",
             *files], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for worker in range(3):  # processes that append as fast as they can, all released at once
        procs.append(subprocess.Popen([sys.executable, "-c", _APPENDER, str(go), f"p{worker}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
    assert_chain(audit_log, 1 + len(all_files) + 3 * 150)
    subjects = [str(r["subject"]) for r in records(audit_log)]
    assert sorted(s for s in subjects if s.startswith(str(tmp_path))) == sorted(all_files)


def test_off_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = tmp_path / "k.pem"
    env = {"KEYSEAL_HOME": str(home), "KEYSEAL_AUDIT_LOG": "off"}
    ok("keys", "create", "--out", key, "--type", "p256", "--unencrypted", env=env)
    cert = tmp_path / "k.asc"
    ok("keys", "mint", "--key", f"file:{key}", *UID, "--created", CREATED, "-o", cert, env=env)
    data = tmp_path / "f"
    data.write_bytes(b"data")
    ok("sign", "--key", f"file:{key}", "--cert", cert, data, env=env)
    assert not home.exists() or not any(home.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "f.asc", "k.asc", "k.pem"]
    # ... and without "off", the same signature lands in $KEYSEAL_HOME/audit.log.
    ok("sign", "--key", f"file:{key}", "--cert", cert, "--force", data, env={"KEYSEAL_HOME": str(home),
                                                                              "KEYSEAL_AUDIT_LOG": ""})
    assert_chain(home / "audit.log", 1)


def test_unwritable_log_stops_the_signature(tmp_path: Path, aws_env: dict[str, str],
                                            kms_emulator: KmsEmulator) -> None:
    uri = ok("keys", "create", "--kms", "--alias", "alias/audit/unwritable", "--type", "p256").split()[1]
    cert = tmp_path / "c.asc"
    ok("keys", "mint", "--key", uri, *UID, "-o", cert, env={"KEYSEAL_AUDIT_LOG": "off"})
    data = tmp_path / "f"
    data.write_bytes(b"release")
    not_a_file = tmp_path / "log-dir"
    not_a_file.mkdir()
    under_a_file = data / "audit.log"
    for log in (not_a_file, under_a_file):
        kms_emulator.calls.clear()
        result = run_keyseal("sign", "--key", uri, "--cert", cert, data, env={"KEYSEAL_AUDIT_LOG": str(log)})
        assert_one_line_error(result)
        assert f"cannot write the audit log {log}" in result.stderr
        assert kms_emulator.calls.counts()["Sign"] == 0  # refused before the custody was asked
        minted = run_keyseal("keys", "mint", "--key", uri, *UID, "-o", tmp_path / "again.asc",
                             env={"KEYSEAL_AUDIT_LOG": str(log)})
        assert_one_line_error(minted)
    # A log that opens but cannot take the line (a full disk): the signature made is discarded, not written.
    full = run_keyseal("sign", "--key", uri, "--cert", cert, data, env={"KEYSEAL_AUDIT_LOG": "/dev/full"})
    assert_one_line_error(full)
    assert "the signature was discarded" in full.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.asc", "f", "log-dir"]


def test_ssh_and_minisign_signatures_are_recorded(audit_log: Path, tmp_path: Path) -> None:
    ed_key, p256_key = tmp_path / "ed.pem", tmp_path / "p256.pem"
    ok("keys", "create", "--out", ed_key, "--type", "ed25519", "--unencrypted")
    ok("keys", "create", "--out", p256_key, "--type", "p256", "--unencrypted")
    data = tmp_path / "f"
    data.write_bytes(b"release")
    ok("sign", "--key", f"file:{p256_key}", "--format", "ssh", data)
    ok("sign", "--key", f"file:{ed_key}", "--format", "minisign", data)
    assert_chain(audit_log, 3)  # ssh: one signature; minisign: the signature and the global signature
    ssh, *minisign = records(audit_log)
    assert ssh["purpose"] == "ssh" and ssh["signed"] == "digest" and ssh["subject"] == str(data)
    assert [(r["purpose"], r["signed"], r["hash"], r["subject"]) for r in minisign] == \
        [("minisign", "message", "sha256", str(data))] * 2
