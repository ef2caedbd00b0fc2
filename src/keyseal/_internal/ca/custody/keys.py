"""CA keys as the issuers see them, whatever holds them: a key opened from a wrapped record (in memory), or a
KMS key behind keyseal's `Signer` contract (every signature one `kms:Sign`).

`cryptography`'s certificate builder signs with any object of its private-key types and only calls its
`sign` and `public_key` methods, so a KMS key is handed to the builder as a proxy whose `sign` hashes the
to-be-signed bytes locally and sends only the digest to KMS. No CA private key is ever in memory then.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, NoReturn

from cryptography import utils as cutils
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from keyseal._internal.backends.file import sign_digest_with
from keyseal.errors import UnsupportedKeyError
from keyseal.signer import HashName, PrivateKey, PublicKey, Signer, default_hash, hash_algorithm

__all__ = ["CaKey", "MemoryCaKey", "SignerCaKey", "jws_algorithm", "jws_signature"]

BuilderKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_PKCS1v15 = padding.PKCS1v15


class CaKey(abc.ABC):
    """One CA signing key (the X.509 CA key or the JWT key of a keyset)."""

    custody: str  # "wrapped" or "kms", for logs and metrics

    @abc.abstractmethod
    def public_key(self) -> PublicKey:
        """The public half (cached by every implementation)."""

    @abc.abstractmethod
    def builder_key(self) -> BuilderKey:
        """What `CertificateBuilder.sign` is given."""

    @abc.abstractmethod
    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        """An RSA PKCS#1 v1.5 or DER ECDSA signature over a digest."""

    @functools.cached_property
    def hash_name(self) -> HashName:
        """The key's own hash: SHA-384 for P-384, SHA-256 otherwise (KMS ties EC keys to it)."""
        return default_hash(self.public_key())

    @functools.cached_property
    def fingerprint(self) -> str:
        """`sha256:<hex>` of the public key, as audit records name keys (worked out once per key)."""
        from keyseal._internal.audit.record import key_fingerprint

        return key_fingerprint(self.public_key())

    @property
    def deterministic(self) -> bool:
        """Whether signing the same bytes twice gives the same signature (RFC 6979 ECDSA, or RSA v1.5)."""
        return isinstance(self.public_key(), rsa.RSAPublicKey)


class MemoryCaKey(CaKey):
    """A key opened from a wrapped record: signing costs no remote call. ECDSA is deterministic (RFC 6979), so
    the CA certificate rebuilt after a restart is the same certificate, byte for byte."""

    custody = "wrapped"

    def __init__(self, key: PrivateKey) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise UnsupportedKeyError("a CA key must be an ECDSA (P-256, P-384) or RSA key")
        self._key = key
        self._public = key.public_key()
        self._ecdsa = key if isinstance(key, ec.EllipticCurvePrivateKey) else None  # checked once, not per SVID

    def public_key(self) -> PublicKey:
        return self._public

    def builder_key(self) -> BuilderKey:
        return self._key

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        if self._ecdsa is not None:
            return self._ecdsa.sign(digest, _deterministic_ecdsa(hash_name))
        return sign_digest_with(self._key, digest, hash_name)

    @property
    def deterministic(self) -> bool:
        return True


@functools.lru_cache(maxsize=4)
def _deterministic_ecdsa(hash_name: HashName) -> ec.ECDSA:
    """The signature algorithm for a digest made with `hash_name`, built once per hash (it holds no state):
    building it checks with the OpenSSL binding that RFC 6979 is supported, a measurable cost per SVID."""
    return ec.ECDSA(utils.Prehashed(hash_algorithm(hash_name)), deterministic_signing=True)


class SignerCaKey(CaKey):
    """A key held by a key manager (AWS KMS): every signature is one call to it."""

    custody = "kms"

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        public = signer.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise UnsupportedKeyError(f"{signer.uri}: a CA key must be an ECDSA or RSA key")
        self._public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = public

    def public_key(self) -> PublicKey:
        return self._public

    def builder_key(self) -> BuilderKey:
        if isinstance(self._public, ec.EllipticCurvePublicKey):
            return _EcProxy(self.signer, self._public)
        return _RsaProxy(self.signer, self._public)

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        return self.signer.sign_digest(digest, hash_name)


def _hash_name(algorithm: hashes.HashAlgorithm | utils.Prehashed) -> HashName:
    name = algorithm.name if isinstance(algorithm, hashes.HashAlgorithm) else algorithm._algorithm.name
    if name not in ("sha256", "sha384", "sha512"):
        raise UnsupportedKeyError(f"the CA cannot sign with {name}")
    return name  # type: ignore[return-value]


def _digest(data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed) -> bytes:
    if isinstance(algorithm, utils.Prehashed):
        return data
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize()


def _refuse(*_: Any) -> NoReturn:
    raise UnsupportedKeyError("a key held by a key manager cannot be exported or used for decryption")


class _EcProxy(ec.EllipticCurvePrivateKey):
    """An ECDSA 'private key' whose sign() asks the key manager. Only sign() and public_key() are used."""

    def __init__(self, signer: Signer, public: ec.EllipticCurvePublicKey) -> None:
        self._signer = signer
        self._public = public

    def sign(self, data: cutils.Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        assert isinstance(signature_algorithm, ec.ECDSA)
        algorithm = signature_algorithm.algorithm
        return self._signer.sign_digest(_digest(bytes(data), algorithm), _hash_name(algorithm))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _refuse()

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse()

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        _refuse()

    def __copy__(self) -> _EcProxy:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _EcProxy:
        return self


class _RsaProxy(rsa.RSAPrivateKey):
    """An RSA 'private key' whose sign() asks the key manager (PKCS#1 v1.5 only, as keyseal's KMS signer)."""

    def __init__(self, signer: Signer, public: rsa.RSAPublicKey) -> None:
        self._signer = signer
        self._public = public

    def sign(self, data: bytes, padding: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo) -> bytes:
        if not isinstance(padding, _PKCS1v15) or isinstance(algorithm, utils.NoDigestInfo):
            raise UnsupportedKeyError("a KMS-held RSA CA key signs with PKCS#1 v1.5 over a digest only")
        return self._signer.sign_digest(_digest(bytes(data), algorithm), _hash_name(algorithm))

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        _refuse()

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _refuse()

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        _refuse()

    def __copy__(self) -> _RsaProxy:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _RsaProxy:
        return self


_JWS_EC = {"secp256r1": "ES256", "secp384r1": "ES384"}


def jws_algorithm(public_key: PublicKey) -> str:
    """ES256 (P-256), ES384 (P-384) or RS256 (RSA): the JWT-SVID `alg` for a JWT key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in _JWS_EC:
        return _JWS_EC[public_key.curve.name]
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RS256"
    raise UnsupportedKeyError("a JWT key must be ECDSA P-256, P-384 or RSA")


def jws_hash_name(public_key: PublicKey) -> HashName:
    """The hash a JWS algorithm signs with: SHA-384 for ES384, SHA-256 for ES256 and RS256."""
    return "sha384" if jws_algorithm(public_key) == "ES384" else "sha256"


def jws_signature(key: CaKey, signing_input: bytes) -> bytes:
    """The JWS signature over `header.payload`: ECDSA as fixed-length r || s (RFC 7518 3.4), RSA as is."""
    public = key.public_key()
    hash_name = jws_hash_name(public)
    digest = hashes.Hash(hash_algorithm(hash_name))
    digest.update(signing_input)
    signature = key.sign_digest(digest.finalize(), hash_name)
    if isinstance(public, ec.EllipticCurvePublicKey):
        r, s = utils.decode_dss_signature(signature)
        size = (public.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return signature
