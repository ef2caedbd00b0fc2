"""Use cases over records: create a wrapped key, rewrap it under a new KEK, open it for signing.

These are what the CLI (`keyseal keys create`, `keyseal keys rewrap`) and the `file:` backend call. A private
key exists in clear only in this process's memory: it is serialized to PKCS#8 DER and sealed before anything
is written, and a rewrap decrypts and re-seals in memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.store import RecordStore, StoredRecord
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.envelope import seal, unseal
from keyseal._internal.wrapping.kek import KekProvider, configured_kek_spec, parse_kek
from keyseal.errors import (
    InputError,
    KekMismatchError,
    OutputExistsError,
    UnsupportedKeyError,
    WrappedRecordError,
)
from keyseal.signer import PrivateKey

__all__ = [
    "OpenedKey",
    "check_kek",
    "create_record",
    "create_wrapped_key_file",
    "key_type_of",
    "load_wrapped_key_file",
    "open_record",
    "rewrap_files",
    "rewrap_record",
    "wrap_key_file",
]


@dataclass(frozen=True)
class OpenedKey:
    """A record opened in memory: the private key and the (authenticated) record it came from."""

    private_key: PrivateKey
    record: WrappedRecord


def key_type_of(key: PrivateKey) -> str:
    """The record's keyType for a key: rsa<bits>, p256, p384, p521 or ed25519."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    curves = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in curves:
        return curves[key.curve.name]
    raise UnsupportedKeyError("only RSA, NIST P-256/P-384/P-521 and Ed25519 keys can be wrapped")


def check_kek(kek: KekProvider) -> None:
    """The startup canary: a throwaway wrap/unwrap round trip that names a missing permission and key."""
    kek.canary()


def open_record(store: RecordStore, name: str, kek: KekProvider) -> OpenedKey:
    """Read, authenticate and decrypt a record; the store's ledger then remembers its version."""
    stored = store.get(name)
    where = store.location(name)
    if stored is None:
        raise InputError(f"{where} does not exist")
    key = _open_stored(stored, kek, where)
    key_id = public_key_id(key)
    store.check_opened(stored.record, key_id, where)
    store.remember(stored.record, key_id)
    return OpenedKey(key, stored.record)


def public_key_id(key: PrivateKey) -> str:
    """The SHA-256 of the key's public half (SubjectPublicKeyInfo DER): what a key file is known by in the
    ledger, whatever its name or path."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def create_record(
    store: RecordStore,
    name: str,
    key: PrivateKey,
    kek: KekProvider,
    *,
    force: bool = False,
    created: datetime | None = None,
) -> WrappedRecord:
    """Seal `key` as a new record. With force, a newer version replaces an existing record of the same
    provider (its version counter goes on, so older copies stay refused); switching providers is refused."""
    where = store.location(name)
    if not force and store.current_revision(name) is not None:
        raise OutputExistsError(f"{where} exists: refusing to overwrite it (use --force)")
    der = _pkcs8(key)
    when = created or datetime.now(UTC)

    def produce(current: StoredRecord | None) -> WrappedRecord:
        if current is not None:
            if not force:
                raise OutputExistsError(f"{where} exists: refusing to overwrite it (use --force)")
            _refuse_provider_switch(current.record, kek, where)
        version = max(store.highest_seen(name), current.record.version if current else 0) + 1
        return seal(der, name=name, version=version, created=when, key_type=key_type_of(key), kek=kek,
                    scope=store.scope)

    record = store.update(name, produce, replace_invalid=force)
    store.remember(record, public_key_id(key))
    return record


def rewrap_record(store: RecordStore, name: str, new_kek: KekProvider, old_kek: KekProvider) -> WrappedRecord:
    """Re-encrypt a record under `new_kek` (same provider): fresh DEK and nonce, version + 1, same key and
    creation time. The key is decrypted and re-sealed in memory only."""
    where = store.location(name)

    def produce(current: StoredRecord | None) -> WrappedRecord:
        if current is None:
            raise InputError(f"{where} does not exist")
        record = current.record
        _refuse_provider_switch(record, new_kek, where)
        source = new_kek if record.kek_id == new_kek.kek_id else old_kek
        key = _open_stored(current, source, where)
        key_ids.append(public_key_id(key))
        return seal(_pkcs8(key), name=name, version=record.version + 1, created=record.created,
                    key_type=record.key_type, kek=new_kek, scope=store.scope)

    key_ids: list[str] = []
    written = store.update(name, produce)
    store.remember(written, key_ids[-1])
    return written


def create_wrapped_key_file(
    path: Path,
    key_type: str,
    kek: str = "local",
    *,
    force: bool = False,
    kms_endpoint: str | None = None,
    region: str | None = None,
) -> WrappedRecord:
    """`keyseal keys create`: a fresh key of `key_type`, written only as a wrapped record at `path`.

    `kek` is `local` (default: `$KEYSEAL_HOME/kek`, created on first use), `local:PATH` or `awskms:<key ARN>`.
    The record is named after the file; the canary runs first so nothing is written with a broken KEK.
    """
    store, name, provider = _prepare_file(path, kek, force, kms_endpoint, region)
    return create_record(store, name, generate_private_key(key_type), provider, force=force)


def wrap_key_file(
    path: Path,
    key: PrivateKey,
    kek: str | None = None,
    *,
    force: bool = False,
    kms_endpoint: str | None = None,
    region: str | None = None,
) -> WrappedRecord:
    """Seal an existing private key as a wrapped record at `path` (an import: the key is never written in the
    clear). The KEK is `kek`, else `$KEYSEAL_KEK`, else the default local KEK; the canary runs first."""
    key_type_of(key)  # an unsupported key is refused before the KEK is touched
    store, name, provider = _prepare_file(path, configured_kek_spec(kek), force, kms_endpoint, region)
    return create_record(store, name, key, provider, force=force)


def _prepare_file(path: Path, kek: str, force: bool, kms_endpoint: str | None,
                  region: str | None) -> tuple[DirectoryStore, str, KekProvider]:
    """The record file's store and name and a KEK that passed its canary; an existing file is refused first."""
    provider = parse_kek(kek, kms_endpoint=kms_endpoint, region=region)
    store, name = _file_store(path)
    if not force and store.current_revision(name) is not None:
        raise OutputExistsError(f"{path} exists: refusing to overwrite it (use --force)")
    check_kek(provider)
    return store, name, provider


def rewrap_files(
    paths: Iterable[Path],
    kek: str,
    from_kek: str | None = None,
    *,
    kms_endpoint: str | None = None,
    region: str | None = None,
) -> list[WrappedRecord]:
    """`keyseal keys rewrap`: re-encrypt record files under `kek` (same provider as the records).

    The current KEK is `from_kek`, else `$KEYSEAL_KEK`, else the default local KEK; a record already under
    `kek` is opened with it. keyseal never takes the KEK to trust from the record itself.
    """
    new_kek = parse_kek(kek, kms_endpoint=kms_endpoint, region=region)
    old_spec = configured_kek_spec(from_kek)
    old_kek = new_kek if old_spec == kek else parse_kek(old_spec, kms_endpoint=kms_endpoint, region=region)
    check_kek(new_kek)
    results = []
    for path in paths:
        store, name = _file_store(path)
        results.append(rewrap_record(store, name, new_kek, old_kek))
    return results


_opened: dict[tuple[str, str, str], OpenedKey] = {}
_opened_lock = threading.Lock()


def load_wrapped_key_file(
    path: Path,
    kek: str | None = None,
    *,
    kms_endpoint: str | None = None,
    region: str | None = None,
) -> OpenedKey:
    """Open a record file for signing: one unwrap (one KMS Decrypt) per process, then held in memory.

    The KEK is `kek`, else `$KEYSEAL_KEK`, else the default local KEK file.
    """
    store, name = _file_store(path)
    data = store.read_bytes(name)
    if data is None:
        raise InputError(f"key file {path} does not exist")
    provider = parse_kek(configured_kek_spec(kek), kms_endpoint=kms_endpoint, region=region)
    cache_key = (hashlib.sha256(data).hexdigest(), provider.provider, _cache_id(provider))
    with _opened_lock:
        cached = _opened.get(cache_key)
    if cached is not None:
        return cached
    opened = open_record(store, name, provider)
    with _opened_lock:
        _opened[cache_key] = opened
    return opened


def _cache_id(provider: KekProvider) -> str:
    # A local KEK's id needs its file; a missing file is reported by open_record with the record's context.
    try:
        return provider.kek_id
    except InputError:
        return ""


def _file_store(path: Path) -> tuple[DirectoryStore, str]:
    return DirectoryStore(path.parent if str(path.parent) else Path(".")), path.name


def _open_stored(stored: StoredRecord, kek: KekProvider, where: str) -> PrivateKey:
    der = unseal(stored.record, kek, where)
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise WrappedRecordError(f"{where} decrypts, but not to a private key keyseal can read") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise UnsupportedKeyError(f"{where}: only RSA, ECDSA and Ed25519 keys can sign")
    if key_type_of(key) != stored.record.key_type:
        raise WrappedRecordError(f"{where} holds a {key_type_of(key)} key, not the {stored.record.key_type} "
                                 f"its header names")
    return key


def _refuse_provider_switch(record: WrappedRecord, kek: KekProvider, where: str) -> None:
    if record.kek_provider != kek.provider:
        raise KekMismatchError(
            f"{where} is wrapped by the {record.kek_provider} KEK provider and the configured KEK is "
            f"{kek.describe()}: switching KEK providers on existing records is not supported; nothing was "
            f"changed (rewrap with another {record.kek_provider} KEK, or delete the record and create a new "
            f"key)"
        )


def _pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
