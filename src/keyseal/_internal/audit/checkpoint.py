"""Signed checkpoints: the custody's own key signs the chain's head, so a rewritten log shows.

The chain alone is unkeyed: whoever can write the file can edit a line and recompute every `prev` after it.
A checkpoint line carries a signature, by the key whose signatures the log records, over (line count, head,
time, interval); nobody without that key can make one for a rewritten chain. Checkpoints are lines of the
chain (sequence numbers that are multiples of the interval, and more often in long-running processes), and
each is also emitted on the `keyseal.audit` logger, so the head leaves the host with the log pipeline: a copy
there shows lines cut from the end, or a log replaced whole, which no check of the file alone can.

A checkpoint line: `{"v":1,"seq":N,"time":T,"kind":"checkpoint","lines":N-1,"every":K,"key_uri",
"key_fingerprint","hash","signature":base64,"prev":H}`; `prev` (the head it signs) is the hash of line N-1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from keyseal.errors import InputError
from keyseal.signer import HashName, PublicKey, default_hash, hash_algorithm

__all__ = [
    "CONTINUED",
    "DEFAULT_LINES",
    "DEFAULT_SECONDS",
    "KIND",
    "LINES_ENV",
    "SECONDS_ENV",
    "CheckpointKey",
    "hash_for",
    "interval_lines",
    "interval_seconds",
    "load_keys",
    "make",
    "problem",
    "signed_bytes",
]

KIND = "checkpoint"
CONTINUED = "continued"  # the first line of a file that goes on from a rotated one
LINES_ENV = "KEYSEAL_AUDIT_CHECKPOINT_LINES"
SECONDS_ENV = "KEYSEAL_AUDIT_CHECKPOINT_SECONDS"
DEFAULT_LINES = 1000
DEFAULT_SECONDS = 300.0
_CONTEXT = b"keyseal audit checkpoint v1\n"
_HASHES: tuple[HashName, ...] = ("sha256", "sha384", "sha512")


class CheckpointKey(Protocol):
    """What signs a checkpoint: a backend Signer or a CA key (both sign digests)."""

    def public_key(self) -> PublicKey: ...

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes: ...


def interval_lines() -> int:
    """`$KEYSEAL_AUDIT_CHECKPOINT_LINES` (default 1000; 0 turns checkpoints off)."""
    return int(_env_number(LINES_ENV, DEFAULT_LINES))


def interval_seconds() -> float:
    """`$KEYSEAL_AUDIT_CHECKPOINT_SECONDS` (default 300): a long-running process also makes a checkpoint at its
    first line after this long without one."""
    return _env_number(SECONDS_ENV, DEFAULT_SECONDS)


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError as exc:
        raise InputError(f"{name}={value[:40]!r} is not a number") from exc
    if number < 0:
        raise InputError(f"{name} must not be negative")
    return number


def signed_bytes(lines: int, head: str, time: str, every: int, fingerprint: str) -> bytes:
    """What a checkpoint's signature covers (a fixed text, so no JSON canonicalisation is needed)."""
    return _CONTEXT + f"lines={lines}\nhead={head}\ntime={time}\nevery={every}\nkey={fingerprint}\n".encode()


def hash_for(key: CheckpointKey, public_key: PublicKey) -> HashName:
    """The key's own hash where it can use it (KMS ties EC keys to one), else the first it supports."""
    wanted = default_hash(public_key)
    supported = getattr(key, "supported_hashes", None)
    if supported is None:
        return wanted
    offered: tuple[HashName, ...] = supported()
    return wanted if wanted in offered or not offered else offered[0]


def make(key: CheckpointKey, fingerprint: str, key_uri: str, *, seq: int, time: str, prev: str,
         every: int) -> dict[str, object]:
    """The checkpoint line at `seq` (signs the head `prev` of the seq-1 lines before it). Raises what the
    custody raises when it cannot sign."""
    public_key = key.public_key()
    hash_name = hash_for(key, public_key)
    digest = hashlib.new(hash_name, signed_bytes(seq - 1, prev, time, every, fingerprint)).digest()
    signature = key.sign_digest(digest, hash_name)
    return {"v": 1, "seq": seq, "time": time, "kind": KIND, "lines": seq - 1, "every": every, "key_uri": key_uri,
            "key_fingerprint": fingerprint, "hash": hash_name,
            "signature": base64.b64encode(signature).decode("ascii"), "prev": prev}


def problem(record: Mapping[str, object], keys: Mapping[str, PublicKey]) -> str | None:
    """Why a checkpoint record does not hold against `keys` (by fingerprint), or None if it does."""
    seq, lines, every, prev = record.get("seq"), record.get("lines"), record.get("every"), record.get("prev")
    time, fingerprint, hash_name = record.get("time"), record.get("key_fingerprint"), record.get("hash")
    if not (isinstance(seq, int) and isinstance(lines, int) and isinstance(every, int) and isinstance(prev, str)
            and isinstance(time, str) and isinstance(fingerprint, str) and hash_name in _HASHES):
        return "a malformed checkpoint"
    if lines != seq - 1:
        return f"a checkpoint at sequence {seq} that counts {lines} lines"
    public_key = keys.get(fingerprint)
    if public_key is None:
        return (f"a checkpoint signed by {fingerprint}, not by a key given with --key (give that key's "
                f"certificate or public key too)")
    try:
        signature = base64.b64decode(str(record.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        return "a checkpoint whose signature is not base64"
    name: HashName = hash_name
    digest = hashlib.new(name, signed_bytes(lines, prev, time, every, fingerprint)).digest()
    if not _valid(public_key, signature, digest, name):
        return ("a checkpoint whose signature does not match the head it names: the lines before it were "
                "rewritten, or the checkpoint was forged")
    return None


def _valid(public_key: PublicKey, signature: bytes, digest: bytes, hash_name: HashName) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, digest)  # keyseal's Ed25519 signs the digest as the message
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(Prehashed(hash_algorithm(hash_name))))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hash_algorithm(hash_name)))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def load_keys(paths: Sequence[Path]) -> dict[str, PublicKey]:
    """The public keys of `--key` files (PEM public keys, PEM or DER X.509 certificates), by fingerprint."""
    from keyseal._internal.audit.keyid import key_fingerprint
    from keyseal._internal.inputfile import read_input

    keys: dict[str, PublicKey] = {}
    for path in paths:
        public_key = _public_key(read_input(path, "checkpoint key"), path)
        keys[key_fingerprint(public_key)] = public_key
    return keys


def _public_key(data: bytes, path: Path) -> PublicKey:
    loaders: tuple[Callable[[bytes], object], ...] = (
        serialization.load_pem_public_key,
        lambda raw: x509.load_pem_x509_certificate(raw).public_key(),
        serialization.load_der_public_key,
        lambda raw: x509.load_der_x509_certificate(raw).public_key(),
    )
    for load in loaders:
        try:
            key = load(data)
        except ValueError:
            continue
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            return key
        raise InputError(f"{path}: not an RSA, ECDSA or Ed25519 key")
    raise InputError(f"{path}: not a PEM or DER public key or X.509 certificate")
