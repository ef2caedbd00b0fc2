"""Hashes of data held in memory (a commit, a certificate, a small file), through `cryptography`'s OpenSSL.

Every verification loads `cryptography` for the signature itself; `hashlib` would load a second copy of OpenSSL
(`_hashlib` and the system libcrypto, about 2 ms). `keyseal-gpg --verify` runs once per commit under
`git log --show-signature`, so the verification paths hash through `cryptography` instead. Large files keep
`hashlib` (openpgp.prefetch, openpgp.stream): there the hashing runs in a thread beside the
verifier's start-up, and those 2 ms are nothing beside the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes

__all__ = ["Digest", "new", "sha1", "sha256"]

_CLASS_NAMES = {"sha1": "SHA1", "sha224": "SHA224", "sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}


class Digest:
    """A running hash with hashlib's methods (`update`, `digest`, `hexdigest`, `copy`)."""

    __slots__ = ("_context",)

    def __init__(self, context: hashes.Hash) -> None:
        self._context = context

    def update(self, data: bytes, /) -> None:
        self._context.update(data)

    def digest(self) -> bytes:
        return self._context.copy().finalize()  # hashlib's digest() leaves the hash open for more data

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> Digest:
        return Digest(self._context.copy())


def new(name: str, data: bytes = b"") -> Digest:
    """A hash by hashlib's name (sha1, sha224, sha256, sha384, sha512); ValueError for any other."""
    from cryptography.hazmat.primitives import hashes

    class_name = _CLASS_NAMES.get(name)
    if class_name is None:
        raise ValueError(f"unsupported hash type {name}")
    algorithm: hashes.HashAlgorithm = getattr(hashes, class_name)()
    digest = Digest(hashes.Hash(algorithm))
    if data:
        digest.update(data)
    return digest


def sha1(data: bytes) -> bytes:
    """SHA-1, for OpenPGP v4 fingerprints only (not a security decision: the format defines them so)."""
    return new("sha1", data).digest()


def sha256(data: bytes) -> bytes:
    return new("sha256", data).digest()
