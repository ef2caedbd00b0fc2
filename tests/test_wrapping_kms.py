"""Key wrapping with an AWS KMS KEK, against the moto KMS server over HTTP (calls counted server-side)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import serialization

from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.awskms import AwsKmsKek
from keyseal._internal.wrapping.kek import parse_kek
from keyseal._internal.wrapping.keys import (
    check_kek,
    create_record,
    create_wrapped_key_file,
    open_record,
    rewrap_record,
)
from keyseal._internal.wrapping.local import LocalKek
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KekMismatchError,
    KeysealError,
    UnsupportedKeyError,
    UsageError,
    WrappedRecordError,
)
from tests.conftest import REGION
from tests.harness.kms_emulator import KmsEmulator


def admin(kms_emulator: KmsEmulator) -> Any:
    """Test setup with its own credentials (never a denied test identity)."""
    return boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                        aws_access_key_id="admin", aws_secret_access_key="admin")


def new_kek(kms_emulator: KmsEmulator) -> str:
    """A symmetric key. KeyUsage is explicit because moto (5.2) omits it from DescribeKey when it was not
    given at creation; AWS always reports ENCRYPT_DECRYPT for such a key."""
    meta = admin(kms_emulator).create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
    return str(meta["Arn"])


@pytest.fixture
def kek_arn(kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> str:
    """A fresh SYMMETRIC_DEFAULT key per test (so its first-use log line shows each time)."""
    arn = new_kek(kms_emulator)
    kms_emulator.calls.clear()
    return arn


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "records", ledger=VersionLedger())


def one_line(exc: pytest.ExceptionInfo[Any]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def der(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@pytest.mark.slow
def test_round_trip_calls_and_log_line(store: DirectoryStore, kek_arn: str, kms_emulator: KmsEmulator,
                                       caplog: pytest.LogCaptureFixture) -> None:
    key = generate_private_key("p256")
    with caplog.at_level(logging.INFO, logger="keyseal._internal.wrapping.awskms"):
        record = create_record(store, "ca", key, AwsKmsKek(kek_arn))
        opened = open_record(store, "ca", AwsKmsKek(kek_arn))
    assert der(opened.private_key) == der(key)
    assert record.kek_provider == "awskms" and record.kek_id == kek_arn
    counts = kms_emulator.calls.counts()
    assert counts["DescribeKey"] == 1 and counts["Encrypt"] == 1 and counts["Decrypt"] == 1
    announced = [r for r in caplog.records if r.getMessage() == f"Key wrapping via KMS keyARN={kek_arn}"]
    assert len(announced) == 1 and announced[0].levelno == logging.INFO
    # The EncryptionContext names purpose, record, version and format: nothing secret.
    assert record.kek_context() == {"keyseal:purpose": "wrapped-key", "keyseal:format": "keyseal.wrapped-key.v1",
                                    "keyseal:record": "ca", "keyseal:version": "1"}


@pytest.mark.slow
def test_record_naming_another_kms_key_is_refused_without_decrypt(
    store: DirectoryStore, kek_arn: str, kms_emulator: KmsEmulator
) -> None:
    other_arn = new_kek(kms_emulator)
    # Someone who can write the store wraps a key they know under a KMS key they control.
    create_record(store, "ca", generate_private_key("ed25519"), AwsKmsKek(other_arn))
    kms_emulator.calls.clear()
    with pytest.raises(KekMismatchError) as exc:
        open_record(store, "ca", AwsKmsKek(kek_arn))
    assert other_arn in one_line(exc) and kek_arn in one_line(exc)
    # ... and the same with only the KeyId edited in a genuine record.
    create_record(store, "edited", generate_private_key("ed25519"), AwsKmsKek(kek_arn))
    fields = json.loads(store.path("edited").read_bytes())
    fields["kekId"] = other_arn
    store.path("edited").write_bytes(WrappedRecord.from_dict(fields, "edited").to_bytes())
    kms_emulator.calls.clear()
    with pytest.raises(KekMismatchError):
        open_record(store, "edited", AwsKmsKek(kek_arn))
    assert kms_emulator.calls.counts()["Decrypt"] == 0
    assert sum(kms_emulator.calls.counts().values()) == 0


@pytest.mark.slow
def test_every_flipped_byte_is_refused(store: DirectoryStore, kek_arn: str, kms_emulator: KmsEmulator) -> None:
    key = generate_private_key("ed25519")
    create_record(store, "flip", key, AwsKmsKek(kek_arn))
    path = store.path("flip")
    original = path.read_bytes()
    kek = AwsKmsKek(kek_arn)
    # KMS answers some damaged ciphertext blobs (one whose embedded key reference no longer names a key the
    # caller may use) with AccessDenied rather than InvalidCiphertext; that too is a refusal, and only there.
    blob = json.loads(original)["wrappedDek"].encode()
    blob_start = original.index(blob)
    refused = 0
    for index in range(len(original)):
        tampered = bytearray(original)
        tampered[index] ^= 0x01
        path.write_bytes(bytes(tampered))
        try:
            open_record(store, "flip", kek)
        except WrappedRecordError:
            refused += 1
        except AccessDeniedError:
            assert blob_start <= index < blob_start + len(blob), index
            refused += 1
    assert refused == len(original)
    path.write_bytes(original)
    assert der(open_record(store, "flip", kek).private_key) == der(key)


@pytest.mark.slow
def test_swapped_wrapped_deks_are_refused(store: DirectoryStore, kek_arn: str) -> None:
    kek = AwsKmsKek(kek_arn)
    create_record(store, "a", generate_private_key("ed25519"), kek)
    create_record(store, "b", generate_private_key("ed25519"), kek)
    a, b = (json.loads(store.path(n).read_bytes()) for n in ("a", "b"))
    a["wrappedDek"], b["wrappedDek"] = b["wrappedDek"], a["wrappedDek"]
    for name, fields in (("a", a), ("b", b)):
        store.path(name).write_bytes(WrappedRecord.from_dict(fields, name).to_bytes())
        with pytest.raises(WrappedRecordError, match="InvalidCiphertextException"):
            open_record(store, name, kek)


def test_replayed_older_version_is_refused(store: DirectoryStore, kek_arn: str) -> None:
    kek = AwsKmsKek(kek_arn)
    create_record(store, "ca", generate_private_key("p256"), kek)
    old = store.path("ca").read_bytes()
    rewrap_record(store, "ca", kek, kek)
    store.path("ca").write_bytes(old)
    with pytest.raises(KeysealError, match="replayed older record"):
        open_record(store, "ca", kek)


def test_provider_switch_is_refused_both_ways(store: DirectoryStore, kek_arn: str, tmp_path: Path) -> None:
    local = LocalKek(tmp_path / "kek")
    kms = AwsKmsKek(kek_arn)
    create_record(store, "kms", generate_private_key("ed25519"), kms)
    create_record(store, "local", generate_private_key("ed25519"), local)
    before = {n: store.path(n).read_bytes() for n in ("kms", "local")}
    for name, wrong in (("kms", local), ("local", kms)):
        with pytest.raises(KekMismatchError) as exc:
            open_record(store, name, wrong)
        assert "switching KEK providers on existing records is not supported" in one_line(exc)
        with pytest.raises(KekMismatchError, match="not supported; nothing was changed"):
            rewrap_record(store, name, wrong, wrong)
        with pytest.raises(KekMismatchError, match="not supported"):
            create_record(store, name, generate_private_key("ed25519"), wrong, force=True)
    assert {n: store.path(n).read_bytes() for n in ("kms", "local")} == before


@pytest.mark.slow
def test_rewrap_under_a_new_kms_key(store: DirectoryStore, kek_arn: str, kms_emulator: KmsEmulator) -> None:
    new_arn = new_kek(kms_emulator)
    key = generate_private_key("rsa2048")
    create_record(store, "ca", key, AwsKmsKek(kek_arn))
    rewrapped = rewrap_record(store, "ca", AwsKmsKek(new_arn), AwsKmsKek(kek_arn))
    assert rewrapped.kek_id == new_arn and rewrapped.version == 2
    with pytest.raises(KekMismatchError):
        open_record(store, "ca", AwsKmsKek(kek_arn))
    assert der(open_record(store, "ca", AwsKmsKek(new_arn)).private_key) == der(key)


@pytest.mark.parametrize("spec", [{"KeyUsage": "SIGN_VERIFY", "KeySpec": "ECC_NIST_P256"},
                                  {"KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "RSA_2048"}])
def test_only_symmetric_encrypt_decrypt_keys(spec: dict[str, str], store: DirectoryStore,
                                             kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    arn = admin(kms_emulator).create_key(**spec)["KeyMetadata"]["Arn"]
    with pytest.raises(UnsupportedKeyError) as exc:
        create_record(store, "x", generate_private_key("ed25519"), AwsKmsKek(arn))
    assert "SYMMETRIC_DEFAULT" in one_line(exc) and arn in one_line(exc)
    assert not store.path("x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["Encrypt", "Decrypt"])
def test_canary_names_the_missing_permission_and_key(operation: str, kek_arn: str, kms_emulator: KmsEmulator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"AKIANO{operation.upper()}")
    kms_emulator.deny(f"AKIANO{operation.upper()}", operation)
    with pytest.raises(AccessDeniedError) as exc:
        check_kek(AwsKmsKek(kek_arn))
    message = one_line(exc)
    assert message.startswith("key wrapping startup check failed")
    assert f"kms:{operation}" in message and kek_arn in message


def test_decrypt_denied_when_opening(store: DirectoryStore, kek_arn: str, kms_emulator: KmsEmulator,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    create_record(store, "ca", generate_private_key("ed25519"), AwsKmsKek(kek_arn))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRITERONLY")
    kms_emulator.deny("AKIAWRITERONLY", "Decrypt")
    with pytest.raises(AccessDeniedError) as exc:
        open_record(store, "ca", AwsKmsKek(kek_arn))
    assert "kms:Decrypt" in one_line(exc) and kek_arn in one_line(exc)


def test_describe_key_denied_degrades(store: DirectoryStore, kek_arn: str, kms_emulator: KmsEmulator,
                                      monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANODESCRIBE")
    kms_emulator.deny("AKIANODESCRIBE", "DescribeKey")
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.wrapping.awskms"):
        create_record(store, "ca", generate_private_key("ed25519"), AwsKmsKek(kek_arn))
    assert any("kms:DescribeKey denied" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_kms_unreachable(kek_arn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("KEYSEAL_KMS_CONNECT_TIMEOUT", "1")
    with pytest.raises(BackendUnavailableError) as exc:
        check_kek(AwsKmsKek(kek_arn, endpoint=dead))
    message = one_line(exc)
    assert "cannot reach AWS KMS" in message and dead in message and kek_arn in message


def test_kek_specs() -> None:
    with pytest.raises(UsageError, match="full ARN"):
        parse_kek("awskms:alias/release")
    with pytest.raises(UsageError, match="use local, local:PATH or awskms"):
        parse_kek("gcpkms:x")  # vault:KEY is a provider now (tests/test_vault_wrapping.py)
    arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    kek = parse_kek(f"awskms:{arn}")
    assert isinstance(kek, AwsKmsKek) and kek.region == "eu-west-1" and kek.kek_id == arn


def test_create_file_runs_the_canary_before_writing(tmp_path: Path, kek_arn: str, kms_emulator: KmsEmulator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENCRYPTONLY")
    kms_emulator.deny("AKIAENCRYPTONLY", "Decrypt")
    out = tmp_path / "k"
    with pytest.raises(AccessDeniedError, match="kms:Decrypt"):
        create_wrapped_key_file(out, "ed25519", f"awskms:{kek_arn}")
    assert not out.exists()  # a role that could not open the record never gets to write one
