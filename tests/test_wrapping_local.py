"""Key wrapping with the local KEK and the directory store: format, tampering, swaps, rollback, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.ledger import FileLedger, VersionLedger
from keyseal._internal.records.record import FORMAT, WrappedRecord
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.kek import parse_kek
from keyseal._internal.wrapping.keys import create_record, open_record, rewrap_record
from keyseal._internal.wrapping.local import LocalKek
from keyseal.errors import (
    InvalidKeyFileError,
    KekMismatchError,
    OutputExistsError,
    RecordRollbackError,
    StoreConflictError,
    WrappedRecordError,
)


def der(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def kek(tmp_path: Path) -> LocalKek:
    return LocalKek(tmp_path / "kek-home" / "kek")


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "records", ledger=VersionLedger())


def test_round_trip_and_fresh_dek_and_nonce_per_write(store: DirectoryStore, kek: LocalKek) -> None:
    key = generate_private_key("ed25519")
    first = create_record(store, "signing", key, kek)
    assert first.version == 1 and first.kek_provider == "local" and first.kek_id == kek.kek_id
    path = store.path("signing")
    assert path.stat().st_mode & 0o777 == 0o600
    assert kek.path.stat().st_mode & 0o777 == 0o600  # created on first use, private
    opened = open_record(store, "signing", kek)
    assert der(opened.private_key) == der(key)
    assert opened.record == first

    second = rewrap_record(store, "signing", kek, kek)
    assert second.version == 2 and second.created == first.created
    assert second.nonce != first.nonce
    assert second.wrapped_dek != first.wrapped_dek
    assert second.ciphertext != first.ciphertext
    assert der(open_record(store, "signing", kek).private_key) == der(key)
    assert json.loads(path.read_bytes())["format"] == FORMAT


@pytest.mark.slow
def test_every_flipped_byte_is_refused(store: DirectoryStore, kek: LocalKek) -> None:
    key = generate_private_key("p256")
    create_record(store, "flip", key, kek)
    path = store.path("flip")
    original = path.read_bytes()
    for mask in (0x01, 0xFF):
        refused = 0
        for index in range(len(original)):
            tampered = bytearray(original)
            tampered[index] ^= mask
            path.write_bytes(bytes(tampered))
            try:
                open_record(store, "flip", kek)
            except WrappedRecordError:
                refused += 1
        assert refused == len(original), f"mask {mask:#x}: {len(original) - refused} flips were accepted"
    path.write_bytes(original)
    assert der(open_record(store, "flip", kek).private_key) == der(key)


def test_swapped_wrapped_deks_are_refused(store: DirectoryStore, kek: LocalKek, tmp_path: Path) -> None:
    create_record(store, "a", generate_private_key("ed25519"), kek)
    create_record(store, "b", generate_private_key("ed25519"), kek)
    a, b = (json.loads(store.path(n).read_bytes()) for n in ("a", "b"))
    a["wrappedDek"], b["wrappedDek"] = b["wrappedDek"], a["wrappedDek"]
    for name, fields in (("a", a), ("b", b)):
        store.path(name).write_bytes(WrappedRecord.from_dict(fields, name).to_bytes())
        with pytest.raises(WrappedRecordError, match="tampered"):
            open_record(store, name, kek)

    # Same name and version in two stores: the DEK unwraps (same context), but it is not this payload's DEK.
    x = DirectoryStore(tmp_path / "x", ledger=VersionLedger())
    y = DirectoryStore(tmp_path / "y", ledger=VersionLedger())
    create_record(x, "same", generate_private_key("ed25519"), kek)
    create_record(y, "same", generate_private_key("ed25519"), kek)
    fields = json.loads(x.path("same").read_bytes())
    fields["wrappedDek"] = json.loads(y.path("same").read_bytes())["wrappedDek"]
    x.path("same").write_bytes(WrappedRecord.from_dict(fields, "same").to_bytes())
    with pytest.raises(WrappedRecordError, match="does not decrypt"):
        open_record(x, "same", kek)


def test_replayed_older_version_is_refused(tmp_path: Path, kek: LocalKek) -> None:
    ledger = FileLedger(tmp_path / "home" / "seen-versions.json")
    store = DirectoryStore(tmp_path / "records", ledger=ledger)
    create_record(store, "ca", generate_private_key("p256"), kek)
    old = store.path("ca").read_bytes()
    rewrap_record(store, "ca", kek, kek)
    store.path("ca").write_bytes(old)
    with pytest.raises(RecordRollbackError, match="version 1, but version 2"):
        open_record(store, "ca", kek)
    # The memory is on disk, apart from the records: a new process (a new store object) refuses it too.
    fresh = DirectoryStore(tmp_path / "records", ledger=FileLedger(ledger.path))
    with pytest.raises(RecordRollbackError):
        open_record(fresh, "ca", kek)
    assert ledger.path.stat().st_mode & 0o777 == 0o600


def test_forged_high_version_does_not_poison_the_ledger(store: DirectoryStore, kek: LocalKek) -> None:
    create_record(store, "k", generate_private_key("ed25519"), kek)
    genuine = store.path("k").read_bytes()
    fields = json.loads(genuine)
    fields["version"] = 99
    store.path("k").write_bytes(WrappedRecord.from_dict(fields, "k").to_bytes())
    with pytest.raises(WrappedRecordError):
        open_record(store, "k", kek)
    store.path("k").write_bytes(genuine)
    assert open_record(store, "k", kek).record.version == 1


def test_other_local_kek_and_other_name_are_refused(store: DirectoryStore, kek: LocalKek, tmp_path: Path) -> None:
    create_record(store, "a", generate_private_key("ed25519"), kek)
    other = LocalKek(tmp_path / "other-kek")
    other.prepare_write()
    with pytest.raises(KekMismatchError, match="not by the configured local KEK file"):
        open_record(store, "a", other)
    store.path("b").write_bytes(store.path("a").read_bytes())
    with pytest.raises(WrappedRecordError, match="holds the record named 'a'"):
        open_record(store, "b", kek)


def test_newer_format_asks_for_an_upgrade(store: DirectoryStore, kek: LocalKek) -> None:
    create_record(store, "a", generate_private_key("ed25519"), kek)
    fields = json.loads(store.path("a").read_bytes())
    fields["format"] = "keyseal.wrapped-key.v3"
    store.path("a").write_text(json.dumps(fields, sort_keys=True, indent=2) + "\n")
    with pytest.raises(WrappedRecordError, match="upgrade keyseal"):
        open_record(store, "a", kek)


def test_create_never_overwrites_without_force(store: DirectoryStore, kek: LocalKek) -> None:
    create_record(store, "a", generate_private_key("ed25519"), kek)
    before = store.path("a").read_bytes()
    with pytest.raises(OutputExistsError):
        create_record(store, "a", generate_private_key("ed25519"), kek)
    assert store.path("a").read_bytes() == before
    replaced = create_record(store, "a", generate_private_key("ed25519"), kek, force=True)
    assert replaced.version == 2  # the counter goes on, so the old record stays a rollback


def test_local_kek_readable_by_others_is_refused(tmp_path: Path) -> None:
    kek = LocalKek(tmp_path / "kek")
    kek.prepare_write()
    os.chmod(kek.path, 0o644)
    with pytest.raises(InvalidKeyFileError, match="chmod 600"):
        LocalKek(kek.path).kek_id  # noqa: B018
    assert parse_kek(f"local:{kek.path}").describe() == f"local KEK file {kek.path}"


def test_dek_is_zeroed_after_use(store: DirectoryStore, tmp_path: Path) -> None:
    seen: list[bytearray] = []

    class Recording(LocalKek):
        def wrap(self, dek: bytearray, context: object) -> bytes:  # type: ignore[override]
            seen.append(dek)
            return super().wrap(dek, context)  # type: ignore[arg-type]

        def unwrap(self, wrapped: bytes, context: object, where: str) -> bytearray:  # type: ignore[override]
            dek = super().unwrap(wrapped, context, where)  # type: ignore[arg-type]
            seen.append(dek)
            return dek

    kek = Recording(tmp_path / "kek")
    create_record(store, "z", generate_private_key("ed25519"), kek)
    open_record(store, "z", kek)
    assert len(seen) == 2
    assert all(len(dek) == 32 and not any(dek) for dek in seen)


def test_conditional_write_refuses_a_stale_revision(store: DirectoryStore, kek: LocalKek) -> None:
    create_record(store, "c", generate_private_key("ed25519"), kek)
    stale = store.get("c")
    assert stale is not None
    rewrap_record(store, "c", kek, kek)
    with pytest.raises(StoreConflictError):
        store.put("c", stale.record, stale.revision)
    assert store.get("c").record.version == 2  # type: ignore[union-attr]


CRASH_CHILD = """
import os, signal, sys
from pathlib import Path
import keyseal._internal.atomic
from keyseal._internal.wrapping.keys import rewrap_files

def die(tmp):
    Path(sys.argv[2]).write_text(str(tmp))
    os.kill(os.getpid(), signal.SIGKILL)

keyseal._internal.atomic.before_rename = die
rewrap_files([Path(sys.argv[1])], "local")
"""


def test_crash_between_temp_file_and_rename_keeps_the_old_record(tmp_path: Path, keyseal_home: Path) -> None:
    from keyseal._internal.wrapping.keys import create_wrapped_key_file, load_wrapped_key_file

    path = tmp_path / "release.key"
    create_wrapped_key_file(path, "ed25519")
    before = path.read_bytes()
    marker = tmp_path / "temp-name"
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(path), str(marker)],
                           capture_output=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    temp = Path(marker.read_text())
    assert temp.exists() and temp.parent == path.parent  # killed after writing the new record, before rename
    assert temp.read_bytes() != before
    assert path.read_bytes() == before
    opened = load_wrapped_key_file(path)
    assert isinstance(opened.private_key, ed25519.Ed25519PrivateKey)
    assert opened.record.version == 1
