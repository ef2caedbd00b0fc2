"""Tamper matrix for a wrapped key record (format v1), with the local KEK and with an AWS KMS KEK (the moto
emulator, over HTTP): every byte of the record file flipped in turn (three masks: the low bit, the high bit,
the whole byte) and opened through the directory store, as `keyseal sign` opens a key.

No variant opens. Which line of defence refuses it depends on where the byte is:

- JSON structure, field names, indentation, `format`, `cipher`: the parse (not ASCII JSON, an unknown or
  missing field, a bad value, not the canonical encoding);
- `name`: the parse, or the store (a record is bound to its name);
- `version`: the parse; the ledger (a version lower than one seen is a rollback); or the unwrap (the version is
  in the KEK context);
- `created`, `keyType`: the parse, or AES-GCM (both are in the associated data);
- `kekProvider`, `kekId`: the parse, or the KEK check (a record naming another KEK is refused before any
  unwrap, so no KMS Decrypt);
- `wrappedDek`: the parse (not canonical base64), or the unwrap (local: AES-GCM under the KEK; KMS: Decrypt
  refuses the blob);
- `nonce`, `ciphertext`: the parse, or AES-GCM.

With KMS, the emulator counts the Decrypt calls: exactly one per variant that reached the unwrap or AES-GCM,
none for the others. KMS answers a blob whose embedded key reference was damaged with AccessDeniedException;
AWS words it "The ciphertext refers to a customer master key that does not exist ...", and keyseal then
reports the record as tampered with, but the emulator (moto 5.2) drops the message, so there keyseal can only
report the denial. Such answers are counted separately and allowed only for bytes of the wrapped DEK.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest
from fuzz.tamper import Matrix

from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.awskms import AwsKmsKek
from keyseal._internal.wrapping.kek import KekProvider
from keyseal._internal.wrapping.keys import create_record, open_record
from keyseal._internal.wrapping.local import LocalKek
from keyseal.errors import AccessDeniedError, KekMismatchError, RecordRollbackError, WrappedRecordError
from tests.conftest import REGION
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

NAME = "release-key"
ALLOWED = {
    "syntax": {"parse"},
    "format": {"parse"},
    "cipher": {"parse"},
    "name": {"parse", "name"},
    "version": {"parse", "rollback", "unwrap"},
    "created": {"parse", "decrypt"},
    "keyType": {"parse", "decrypt"},
    "kekProvider": {"parse", "kek"},
    "kekId": {"parse", "kek"},
    "wrappedDek": {"parse", "unwrap", "unwrap (KMS AccessDenied)"},
    "nonce": {"parse", "decrypt"},
    "ciphertext": {"parse", "decrypt"},
}


def field_layout(record: bytes) -> list[str]:
    """The field whose value holds each byte of a canonical record file ("syntax" for everything else)."""
    layout = ["syntax"] * len(record)
    pos = 0
    for line in record.split(b"\n"):
        stripped = line.strip()
        if stripped.startswith(b'"') and b'": ' in stripped:
            key = stripped[1 : stripped.index(b'": ')].decode()
            start = pos + line.index(b'": ') + 3
            end = pos + len(line) - (1 if line.endswith(b",") else 0)
            layout[start:end] = [key] * (end - start)
        pos += len(line) + 1
    assert set(layout) == set(ALLOWED), set(layout)
    return layout


def stage(exc: Exception) -> str:
    """Which line of defence refused a record, from the error it raised."""
    message = str(exc)
    if isinstance(exc, RecordRollbackError):
        return "rollback"
    if isinstance(exc, KekMismatchError):
        return "kek"
    if isinstance(exc, AccessDeniedError):
        return "unwrap (KMS AccessDenied)"
    if "is not a valid keyseal wrapped key record" in message or "which this keyseal does not read" in message:
        return "parse"
    if "holds the record named" in message:
        return "name"
    if "does not decrypt" in message:
        return "decrypt"
    if "wrapped DEK" in message:
        return "unwrap"
    return f"other: {message}"


def run_matrix(tmp_path: Path, kek: KekProvider) -> tuple[Matrix, Counter[str]]:
    store = DirectoryStore(tmp_path / "records", ledger=VersionLedger())
    key = generate_private_key("ed25519")
    for _ in range(3):  # version 3: its low-bit flip, version 2, is then a rollback
        create_record(store, NAME, key, kek, force=True)
    path = store.path(NAME)
    original = path.read_bytes()
    assert open_record(store, NAME, kek).record.version == 3
    layout = field_layout(original)
    stages: Counter[str] = Counter()

    def classify(index: int, _mask: int) -> tuple[str, frozenset[str]]:
        return layout[index], frozenset(ALLOWED[layout[index]])

    def verdict(variant: bytes) -> str:
        path.write_bytes(variant)
        try:
            open_record(store, NAME, kek)
        except (WrappedRecordError, AccessDeniedError) as exc:
            outcome = stage(exc)
            stages[outcome] += 1
            return outcome
        return "OPENED"

    matrix = Matrix().run(original, classify, verdict)
    path.write_bytes(original)
    assert open_record(store, NAME, kek).record.version == 3  # the genuine record still opens
    assert not matrix.unexpected, "\n".join(matrix.unexpected[:20]) + "\n" + matrix.table()
    assert matrix.total("OPENED") == 0 and matrix.total() == 3 * len(original)
    # Each line of defence was reached by some flip: the matrix exercises all of them.
    assert {"parse", "name", "rollback", "kek", "unwrap", "decrypt"} <= set(stages), stages
    return matrix, stages


def test_local_kek_record_matrix(tmp_path: Path) -> None:
    matrix, stages = run_matrix(tmp_path, LocalKek(tmp_path / "kek"))
    assert sum(stages.values()) == matrix.total()


def admin(kms_emulator: KmsEmulator) -> Any:
    return boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                        aws_access_key_id="admin", aws_secret_access_key="admin")


def test_kms_kek_record_matrix(tmp_path: Path, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    meta = admin(kms_emulator).create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
    kek = AwsKmsKek(str(meta["Arn"]))
    kms_emulator.calls.clear()
    _, stages = run_matrix(tmp_path, kek)
    counts = kms_emulator.calls.counts()
    # Three writes (3 Encrypt) and two genuine opens (2 Decrypt); then one Decrypt per variant that got past
    # the parse, the name, the ledger and the KEK check, and none for the others.
    assert counts["Encrypt"] == 3
    reached = stages["unwrap"] + stages["unwrap (KMS AccessDenied)"] + stages["decrypt"]
    assert counts["Decrypt"] == 2 + reached, (counts, stages)
    assert stages["kek"] > 0 and stages["unwrap"] > 0
