"""`file:<path>`: a private key on disk, used in process memory.

Permissions needed: read access to the file. The key is loaded once per process.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyseal.backends.base import HashName, PrivateKey, PublicKey, Signer, hash_algorithm
from keyseal.errors import InputError, InvalidKeyFileError, UnsupportedKeyError


def open(uri: str, rest: str, options: object) -> FileSigner:  # noqa: A001 - registry entry point
    """Registry entry point: `file:/path/to/key` or `file:relative/path`."""
    path = Path(rest[2:] if rest.startswith("//") else rest)
    return FileSigner(uri, path)


def load_private_key_file(path: Path) -> PrivateKey:
    """Read a PKCS#8 (or traditional) unencrypted PEM private key of a type keyseal signs with."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read key file {path}: {exc.strerror}") from None
    return private_key_from_pem(data, str(path))


def private_key_from_pem(data: bytes, where: str) -> PrivateKey:
    """Parse an unencrypted PEM private key; the error never echoes the file's content."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidKeyFileError(
            f"{where} is not an unencrypted PEM private key (PKCS#8) that keyseal can read"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise UnsupportedKeyError(f"{where}: only RSA, ECDSA and Ed25519 keys can sign")
    return key


def sign_digest_with(key: PrivateKey, digest: bytes, hash_name: HashName) -> bytes:
    """Sign a digest with an in-memory key, in the encodings the Signer contract names."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    prehashed = utils.Prehashed(hash_algorithm(hash_name))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), prehashed)
    return key.sign(digest, ec.ECDSA(prehashed))


class FileSigner(Signer):
    """A key read from a file into memory once, then used for every signature."""

    def __init__(self, uri: str, path: Path) -> None:
        self.uri = uri
        self.path = path
        self._key: PrivateKey | None = None

    def _private_key(self) -> PrivateKey:
        if self._key is None:
            self._key = load_private_key_file(self.path)
        return self._key

    def public_key(self) -> PublicKey:
        return self._private_key().public_key()

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        return sign_digest_with(self._private_key(), digest, hash_name)

    def created_at(self) -> datetime | None:
        try:
            return datetime.fromtimestamp(int(os.stat(self.path).st_mtime), tz=UTC)
        except OSError:
            return None
