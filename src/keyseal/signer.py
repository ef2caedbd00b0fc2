"""The Signer contract every custody backend implements, and the key and hash types formats share with them.

A backend signs a digest, never a whole message: OpenPGP (and every other format keyseal writes) hashes the
data and its trailer itself, so a 1 GiB release costs one remote call. Backends know nothing of OpenPGP, and
the formats know no backend: they meet here, so verifying imports no backend package.
"""

from __future__ import annotations

import abc
from datetime import datetime
from typing import Literal, TypeAlias

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyseal.errors import UnsupportedKeyError

__all__ = ["HASH_NAMES", "HashName", "PrivateKey", "PublicKey", "Signer", "default_hash", "hash_algorithm"]

HashName: TypeAlias = Literal["sha256", "sha384", "sha512"]
HASH_NAMES: tuple[HashName, ...] = ("sha256", "sha384", "sha512")

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hash_algorithm(name: HashName) -> hashes.HashAlgorithm:
    """The `cryptography` hash object for a hash name."""
    return _HASHES[name]()


def default_hash(public_key: PublicKey) -> HashName:
    """The hash that matches a key's strength: SHA-384 for P-384, SHA-512 for P-521, SHA-256 otherwise.

    KMS ties each ECDSA key to one hash (ECDSA_SHA_384 for P-384 ...), so this is also the only hash such a key
    can use there.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp384r1": "sha384", "secp521r1": "sha512"}.get(public_key.curve.name, "sha256")  # type: ignore[return-value]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "sha512"
    return "sha256"


class Signer(abc.ABC):
    """A key whose private half the caller never holds: it can only be asked for signatures.

    `sign_digest` returns the algorithm's natural encoding: RSA PKCS#1 v1.5 signature bytes, ECDSA as DER
    (RFC 3279 Ecdsa-Sig-Value), Ed25519 as the 64 raw bytes (over the digest as the message, as OpenPGP v4
    EdDSA does). `sign_message` is pure Ed25519 over a message of any length, for formats that sign short
    messages rather than digests (SSH signatures, minisign).
    """

    uri: str

    @abc.abstractmethod
    def public_key(self) -> PublicKey:
        """The public key, fetched once and cached."""

    @abc.abstractmethod
    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        """Sign a precomputed digest made with `hash_name`."""

    def sign_message(self, message: bytes) -> bytes:
        """Pure Ed25519 over `message` itself (Ed25519 keys only). The default hands it to `sign_digest`, which an
        in-memory Ed25519 key signs as the message; backends that check a digest's length override this."""
        if not isinstance(self.public_key(), ed25519.Ed25519PublicKey):
            raise UnsupportedKeyError(f"{self.uri} is not an Ed25519 key: only Ed25519 signs messages")
        return self.sign_digest(message, "sha512")

    def supported_hashes(self) -> tuple[HashName, ...]:
        """Hashes this key can sign with. KMS ECDSA keys allow only the curve's own hash."""
        return HASH_NAMES

    def created_at(self) -> datetime | None:
        """When the key was made, if the custody knows: the default creation time of an OpenPGP certificate."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release sessions or connections. Safe to call twice."""

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
