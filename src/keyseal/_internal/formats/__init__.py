"""Signature formats beside OpenPGP: SSH signatures (sshsig) and minisign. Each signs through a Signer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyseal._internal.filehash import feed_file
from keyseal.errors import UnsupportedKeyError
from keyseal.signer import PublicKey, Signer


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


def hash_path(path: Path, factory: Callable[[], _Hash]) -> bytes:
    """Hash a file as a stream (a release of any size costs a fixed buffer); unreadable files are one clear error."""
    hasher = factory()
    feed_file(path, [hasher])
    return hasher.digest()


def sign_ed25519_message(signer: Signer, message: bytes) -> bytes:
    """Pure Ed25519 over `message` (short: an SSH signed-data blob, a minisign hash and comment), checked
    before use. Every Ed25519 custody signs it (a key file, a PKCS#11 token's CKM_EDDSA, Transit)."""
    public_key = signer.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise UnsupportedKeyError(f"{signer.uri} is not an Ed25519 key")
    signature = signer.sign_message(message)
    try:
        public_key.verify(signature, message)
    except InvalidSignature as exc:
        raise UnsupportedKeyError(
            f"the signature returned by {signer.uri} does not verify with its public key; nothing was written"
        ) from exc
    return signature


def describe_key(public_key: PublicKey) -> str:
    """`Ed25519`, `ECDSA P-256`, `RSA-2048`: for messages."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(
            public_key.curve.name, f"ECDSA {public_key.curve.name}")
    return "Ed25519"
