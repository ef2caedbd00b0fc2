"""Seal and open one record: a fresh AES-256-GCM DEK and a fresh 96-bit nonce per write, the DEK wrapped by a
KEK provider. The DEK lives in a bytearray that is zeroed as soon as it has been used, and is never logged."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyseal._internal.records.record import NONCE_SIZE, WrappedRecord, check_record_name, check_scope, kek_context
from keyseal._internal.wrapping.provider import KekProvider, new_dek, zero
from keyseal.errors import WrappedRecordError

__all__ = ["seal", "unseal"]


def seal(
    plaintext: bytes, *, name: str, version: int, created: datetime, key_type: str, kek: KekProvider,
    scope: str = "",
) -> WrappedRecord:
    """Encrypt `plaintext` (a PKCS#8 DER key) into a new record under `kek`; with a `scope` (the store's), a v2
    record bound to it."""
    check_record_name(name)
    check_scope(scope)
    kek.prepare_write()
    created = created.astimezone(UTC).replace(microsecond=0)  # what the record can spell
    header = WrappedRecord(name, version, created, key_type, kek.provider, kek.kek_id, b"", b"", b"", scope)
    dek = new_dek()
    try:
        wrapped = kek.wrap(dek, kek_context(name, version, scope))
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, header.aad())
    finally:
        zero(dek)
    return header.with_blobs(wrapped, nonce, ciphertext)


def unseal(record: WrappedRecord, kek: KekProvider, where: str) -> bytes:
    """Decrypt a record's payload; any tampering, a swapped DEK or a wrong KEK is refused."""
    kek.check_record(record, where)  # before any unwrap: no Decrypt on a key the record chose
    dek = kek.unwrap(record.wrapped_dek, record.kek_context(), where)
    try:
        return AESGCM(dek).decrypt(record.nonce, record.ciphertext, record.aad())
    except InvalidTag as exc:
        raise WrappedRecordError(
            f"{where} does not decrypt: its content or header was tampered with, or its wrapped DEK belongs "
            f"to another record; restore it from the store's backup"
        ) from exc
    finally:
        zero(dek)
