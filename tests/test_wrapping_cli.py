"""Wrapped keys through the CLI: create (wrapped by default), mint, sign, rewrap; gpg verifies; nothing in the
clear on disk or in the logs; every bad input is one line on stderr."""

from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keyseal._internal.wrapping.keys import load_wrapped_key_file
from tests.conftest import REGION, Gpg, Result, assert_one_line_error, run_keyseal
from tests.harness.kms_emulator import KmsEmulator
from tests.openpgp_checks import gpg_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def kms_kek(kms_emulator: KmsEmulator) -> str:
    client = boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                          aws_access_key_id="admin", aws_secret_access_key="admin")
    # KeyUsage explicit: moto omits it from DescribeKey otherwise (AWS does not).
    return str(client.create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"])


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.stderr
    return result


def mint(key: Path, cert: Path, env: dict[str, str] | None = None) -> Result:
    return run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "Release Signing",
                       "--email", "release@example.org", "-o", cert, env=env)


def test_create_writes_a_wrapped_record_that_signs_for_gpg(tmp_path: Path, keyseal_home: Path, gpg: Gpg) -> None:
    key, cert, data = tmp_path / "release.key", tmp_path / "release.asc", tmp_path / "release.tar.gz"
    assert ok(run_keyseal("keys", "create", "--out", key, "--type", "ed25519")).stdout.strip() == f"file:{key}"
    record = json.loads(key.read_bytes())
    assert record["format"] == "keyseal.wrapped-key.v1" and record["kekProvider"] == "local"
    assert b"PRIVATE KEY" not in key.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    assert (keyseal_home / "kek").stat().st_mode & 0o777 == 0o600
    ok(mint(key, cert))
    data.write_bytes(b"release\n" * 100)
    ok(run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data))
    assert gpg_accepts(gpg, cert, data, tmp_path / "release.tar.gz.asc")
    # The certificate's creation time is the record's, not the file's modification time.
    os.utime(key, (0, 1_000_000_000))
    again = tmp_path / "again.asc"
    ok(mint(key, again))
    assert again.read_bytes() == cert.read_bytes()


def test_unencrypted_is_explicit(tmp_path: Path) -> None:
    key = tmp_path / "clear.pem"
    ok(run_keyseal("keys", "create", "--out", key, "--type", "p256", "--unencrypted"))
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    ok(mint(key, tmp_path / "clear.asc"))


def test_kms_wrapped_key_one_decrypt_per_process(tmp_path: Path, aws_env: dict[str, str], gpg: Gpg,
                                                 kms_emulator: KmsEmulator) -> None:
    arn = kms_kek(kms_emulator)
    key, cert = tmp_path / "ca.key", tmp_path / "ca.asc"
    kms_emulator.calls.clear()
    created = ok(run_keyseal("-v", "keys", "create", "--out", key, "--type", "p256", "--kek", f"awskms:{arn}"))
    assert f"keyseal: INFO: Key wrapping via KMS keyARN={arn}" in created.stderr.splitlines()
    assert json.loads(key.read_bytes())["kekId"] == arn
    env = {"KEYSEAL_KEK": f"awskms:{arn}"}
    kms_emulator.calls.clear()
    ok(mint(key, cert, env))
    assert kms_emulator.calls.counts() == {"Decrypt": 1}
    files = []
    for index in range(3):
        files.append(tmp_path / f"f{index}")
        files[-1].write_bytes(b"x" * index)
    kms_emulator.calls.clear()
    ok(run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, *files, env=env))
    assert kms_emulator.calls.counts() == {"Decrypt": 1}  # one per process, then in memory
    for path in files:
        assert gpg_accepts(gpg, cert, path, Path(f"{path}.asc"))


def key_secrets(key: Any) -> list[bytes]:
    """Every spelling of a private key that must never reach the disk or a log."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        raw = key.private_numbers().private_value.to_bytes(32, "big")
    body = b"".join(pem.splitlines()[1:-1])
    return [der, pem, raw, body, base64.b64encode(raw), raw.hex().encode(), body[:64]]


@pytest.mark.parametrize("provider", ["local", "awskms"])
def test_no_plaintext_key_anywhere_on_disk(provider: str, tmp_path: Path, keyseal_home: Path,
                                           aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    store, scratch, logs = tmp_path / "store", tmp_path / "tmp", tmp_path / "logs"
    for directory in (store, scratch, logs):
        directory.mkdir()
    if provider == "local":
        kek, new_kek = f"local:{tmp_path / 'kek-1'}", f"local:{tmp_path / 'kek-2'}"
    else:
        kek, new_kek = f"awskms:{kms_kek(kms_emulator)}", f"awskms:{kms_kek(kms_emulator)}"
    env = {"TMPDIR": str(scratch), "KEYSEAL_KEK": kek}
    key_path, cert = store / "signing.key", store / "signing.asc"
    data = store / "artifact.bin"
    data.write_bytes(b"artifact")
    steps = [
        ("-v", "keys", "create", "--out", key_path, "--type", "p256", "--kek", kek),
        ("-v", "keys", "mint", "--key", f"file:{key_path}", "--name", "A", "--email", "a@example.org", "-o", cert),
        ("-v", "sign", "--key", f"file:{key_path}", "--cert", cert, data),
        ("-v", "keys", "rewrap", "--kek", new_kek, key_path),
    ]
    for index, step in enumerate(steps):
        result = ok(run_keyseal(*step, env=env))
        (logs / f"{index}.out").write_text(result.stdout)
        (logs / f"{index}.err").write_text(result.stderr)
    secrets = key_secrets(load_wrapped_key_file(key_path, new_kek).private_key)
    scanned = 0
    for root in (tmp_path, keyseal_home):
        for path in root.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                scanned += 1
                assert b"PRIVATE KEY" not in content, path
                for secret in secrets:
                    assert secret not in content, path
    assert scanned >= 8
    assert json.loads(key_path.read_bytes())["version"] == 2


def test_local_rewrap_rotation_and_old_kek_refused(tmp_path: Path) -> None:
    key, cert = tmp_path / "k", tmp_path / "k.asc"
    ok(run_keyseal("keys", "create", "--out", key, "--type", "ed25519"))
    ok(mint(key, cert))
    rotated = ok(run_keyseal("keys", "rewrap", "--kek", f"local:{tmp_path / 'new-kek'}", key))
    assert rotated.stdout.strip() == f"file:{key} version 2"
    old_kek_refused = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, cert)
    assert_one_line_error(old_kek_refused)
    assert "not by the configured local KEK" in old_kek_refused.stderr
    data = tmp_path / "d"
    data.write_bytes(b"d")
    ok(run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data,
                   env={"KEYSEAL_KEK": f"local:{tmp_path / 'new-kek'}"}))


def test_replayed_record_is_refused_by_sign(tmp_path: Path) -> None:
    key, cert = tmp_path / "k", tmp_path / "k.asc"
    ok(run_keyseal("keys", "create", "--out", key, "--type", "ed25519"))
    ok(mint(key, cert))
    old = key.read_bytes()
    ok(run_keyseal("keys", "rewrap", "--kek", "local", key))
    key.write_bytes(old)
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, cert, "-o", tmp_path / "s.asc")
    assert_one_line_error(result)
    assert "version 1, but version 2" in result.stderr


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_bad_inputs_are_one_line(tmp_path: Path, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    arn = kms_kek(kms_emulator)
    local_key, kms_key = tmp_path / "local.key", tmp_path / "kms.key"
    ok(run_keyseal("keys", "create", "--out", local_key, "--type", "ed25519"))
    ok(run_keyseal("keys", "create", "--out", kms_key, "--type", "ed25519", "--kek", f"awskms:{arn}"))
    tampered = tmp_path / "tampered.key"
    fields = json.loads(local_key.read_bytes())
    fields["keyType"] = "p256"
    tampered.write_text(json.dumps(fields, sort_keys=True, indent=2) + "\n")
    renamed = tmp_path / "renamed.key"
    renamed.write_bytes(local_key.read_bytes())
    kms_kek_env = {"KEYSEAL_KEK": f"awskms:{arn}"}
    cases: list[tuple[tuple[Any, ...], dict[str, str] | None, str]] = [
        (("keys", "create", "--out", tmp_path / "a", "--kek", "bogus"), None, "invalid KEK 'bogus'"),
        (("keys", "create", "--out", tmp_path / "a", "--kek", "awskms:alias/x"), None, "full ARN"),
        (("keys", "create", "--out", tmp_path / "a", "--kek", "local", "--unencrypted"), None, "takes no --kek"),
        (("keys", "create", "--out", local_key), None, "exists: refusing to overwrite"),
        (("keys", "create", "--out", local_key, "--force", "--kek", f"awskms:{arn}"), None,
         "switching KEK providers on existing records is not supported"),
        (("keys", "rewrap", "--kek", "local", tmp_path / "missing"), None, "does not exist"),
        (("keys", "rewrap", "--kek", f"awskms:{arn}", local_key), None, "not supported"),
        (("keys", "rewrap", "--kek", "local", kms_key), None, "not supported"),
        (("keys", "mint", "--key", f"file:{kms_key}", "--name", "A", "--email", "a@b.c"), None,
         "switching KEK providers on existing records is not supported"),
        (("keys", "mint", "--key", f"file:{local_key}", "--name", "A", "--email", "a@b.c"), kms_kek_env,
         "switching KEK providers on existing records is not supported"),
        (("keys", "mint", "--key", f"file:{tampered}", "--name", "A", "--email", "a@b.c"), None, "tampered"),
        (("keys", "mint", "--key", f"file:{renamed}", "--name", "A", "--email", "a@b.c"), None,
         "holds the record named 'local.key'"),
        (("keys", "mint", "--key", f"file:{kms_key}", "--name", "A", "--email", "a@b.c"),
         {**kms_kek_env, "AWS_ACCESS_KEY_ID": "AKIACLINODECRYPT"}, "kms:Decrypt"),
        (("keys", "mint", "--key", f"file:{kms_key}", "--name", "A", "--email", "a@b.c"),
         {**kms_kek_env, "AWS_ENDPOINT_URL_KMS": closed_port_url(), "KEYSEAL_KMS_MAX_ATTEMPTS": "1"},
         "cannot reach AWS KMS"),
    ]
    kms_emulator.deny("AKIACLINODECRYPT", "Decrypt")
    before = {p: p.read_bytes() for p in (local_key, kms_key)}
    for args, env, expected in cases:
        result = run_keyseal(*args, env=env)
        assert_one_line_error(result)
        assert expected in result.stderr, (args, result.stderr)
        if expected == "kms:Decrypt":
            assert arn in result.stderr
    assert {p: p.read_bytes() for p in before} == before
