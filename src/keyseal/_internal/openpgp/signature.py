"""v4 signature packets: building one through a Signer, parsing one strictly, checking its math."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from keyseal._internal.frozen import Frozen
from keyseal._internal.openpgp import digests, hashids
from keyseal._internal.openpgp.keys import (
    ALGO_ECDSA,
    ALGO_ED25519,
    ALGO_EDDSA_LEGACY,
    ALGO_RSA,
    ALGO_RSA_SIGN,
    RSA_ALGORITHMS,
    algorithm_of,
)
from keyseal._internal.openpgp.packets import Reader, Subpacket, encode_mpi, encode_subpacket, parse_subpackets
from keyseal.errors import OpenPGPError, UnsupportedKeyError

if TYPE_CHECKING:
    from typing import Protocol

    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from keyseal.signer import HashName, PublicKey, Signer

__all__ = [
    "HASH_IDS",
    "KEY_FLAG_CERTIFY",
    "KEY_FLAG_SIGN",
    "SIG_BINARY",
    "SIG_CERTIFICATIONS",
    "SIG_CERTIFICATION_REVOCATION",
    "SIG_DIRECT_KEY",
    "SIG_KEY_REVOCATION",
    "SIG_POSITIVE_CERTIFICATION",
    "SIG_PRIMARY_KEY_BINDING",
    "SIG_SUBKEY_BINDING",
    "SIG_SUBKEY_REVOCATION",
    "SIG_TEXT",
    "SUB_CREATION_TIME",
    "SUB_EMBEDDED_SIGNATURE",
    "SUB_FEATURES",
    "SUB_ISSUER_FINGERPRINT",
    "SUB_ISSUER_KEY_ID",
    "SUB_KEY_EXPIRATION",
    "SUB_KEY_FLAGS",
    "SUB_PREFERRED_COMPRESSION",
    "SUB_PREFERRED_HASH",
    "SUB_PREFERRED_SYMMETRIC",
    "SUB_PRIMARY_USER_ID",
    "SUB_SIG_EXPIRATION",
    "SignaturePacket",
    "accepted_hash",
    "check_hash_fits_key",
    "check_signature_math",
    "creation_subpackets",
    "encode_signature_values",
    "hash_name_of",
    "make_signature",
    "new_hasher",
    "new_message_hasher",
    "parse_signature",
]

SIG_BINARY = 0x00
SIG_TEXT = 0x01
SIG_CERTIFICATIONS = (0x10, 0x11, 0x12, 0x13)
SIG_POSITIVE_CERTIFICATION = 0x13
SIG_SUBKEY_BINDING = 0x18
SIG_PRIMARY_KEY_BINDING = 0x19
SIG_DIRECT_KEY = 0x1F
SIG_KEY_REVOCATION = 0x20
SIG_SUBKEY_REVOCATION = 0x28
SIG_CERTIFICATION_REVOCATION = 0x30

# The audit log's `purpose` of each signature type keyseal makes.
_PURPOSES = {
    SIG_BINARY: "openpgp-detached",
    SIG_TEXT: "openpgp-text",
    **dict.fromkeys(SIG_CERTIFICATIONS, "openpgp-certification"),
    SIG_SUBKEY_BINDING: "openpgp-subkey-binding",
    SIG_PRIMARY_KEY_BINDING: "openpgp-primary-key-binding",
    SIG_DIRECT_KEY: "openpgp-direct-key",
    SIG_KEY_REVOCATION: "openpgp-revocation",
    SIG_SUBKEY_REVOCATION: "openpgp-subkey-revocation",
    SIG_CERTIFICATION_REVOCATION: "openpgp-certification-revocation",
}

SUB_CREATION_TIME = 2
SUB_SIG_EXPIRATION = 3
SUB_KEY_EXPIRATION = 9
SUB_PREFERRED_SYMMETRIC = 11
SUB_ISSUER_KEY_ID = 16
SUB_PREFERRED_HASH = 21
SUB_PREFERRED_COMPRESSION = 22
SUB_PRIMARY_USER_ID = 25
SUB_KEY_FLAGS = 27
SUB_FEATURES = 30
SUB_EMBEDDED_SIGNATURE = 32
SUB_ISSUER_FINGERPRINT = 33

KEY_FLAG_CERTIFY = 0x01
KEY_FLAG_SIGN = 0x02

HASH_IDS: dict[HashName, int] = {"sha256": 8, "sha384": 9, "sha512": 10}
_ACCEPTED_HASHES = hashids.ACCEPTED  # OpenPGP hash ID -> hashlib name (and the name of `cryptography`'s class)
_REJECTED_HASHES = hashids.REJECTED

# Hashed subpackets a verifier must understand if they are marked critical.
_KNOWN_SUBPACKETS = frozenset(
    {SUB_CREATION_TIME, SUB_SIG_EXPIRATION, 4, 5, 7, SUB_KEY_EXPIRATION, SUB_PREFERRED_SYMMETRIC, 12,
     SUB_ISSUER_KEY_ID, 20, SUB_PREFERRED_HASH, SUB_PREFERRED_COMPRESSION, 23, 24, SUB_PRIMARY_USER_ID,
     SUB_KEY_FLAGS, 28, 29, SUB_FEATURES, 31, SUB_EMBEDDED_SIGNATURE, SUB_ISSUER_FINGERPRINT}
)


if TYPE_CHECKING:  # a type only: building a Protocol class costs start-up time on the verification paths
    class Hasher(Protocol):
        def update(self, data: bytes, /) -> None: ...
        def digest(self) -> bytes: ...
        def copy(self) -> Any: ...


def accepted_hash(hash_id: int) -> str:
    """The hashlib name of an accepted OpenPGP hash algorithm ID; weak or unknown IDs are refused."""
    if hash_id in _REJECTED_HASHES:
        raise OpenPGPError(f"signature uses {_REJECTED_HASHES[hash_id]}, which keyseal rejects as too weak")
    accepted = _ACCEPTED_HASHES.get(hash_id)
    if accepted is None:
        raise OpenPGPError(f"signature uses unsupported hash algorithm {hash_id}")
    return accepted


def new_hasher(hash_id: int) -> Hasher:
    """A hashlib object for an accepted OpenPGP hash algorithm ID (for a stream or a file of any size); weak or
    unknown IDs are refused."""
    import hashlib  # not at import: the verification paths hash through keyseal._internal.openpgp.digests

    return hashlib.new(accepted_hash(hash_id))


def new_message_hasher(hash_id: int) -> Hasher:
    """`new_hasher` for data held in memory (a certificate's packets, a commit, a small file), through the
    OpenSSL that `cryptography` already loaded (keyseal._internal.openpgp.digests)."""
    return digests.new(accepted_hash(hash_id))


def hash_name_of(hash_id: int) -> str:
    return _ACCEPTED_HASHES[hash_id]


def _prehashed(hash_id: int) -> Prehashed:
    """The digest's algorithm as RSA and ECDSA verification take it (imported only for those keys)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    algorithm: hashes.HashAlgorithm = getattr(hashes, _ACCEPTED_HASHES[hash_id].upper())()
    return Prehashed(algorithm)


class SignaturePacket(Frozen):
    """A parsed v4 signature, with the fields keyseal's policy reads."""

    __slots__ = (
        "algorithm",
        "body",
        "hash_id",
        "hashed",
        "hashed_part",
        "left16",
        "raw_value",
        "sig_type",
        "unhashed",
        "values",
    )

    def __init__(self, body: bytes, sig_type: int, algorithm: int, hash_id: int, hashed_part: bytes,
                 hashed: tuple[Subpacket, ...], unhashed: tuple[Subpacket, ...], left16: bytes,
                 values: tuple[int, ...] = (), raw_value: bytes = b"") -> None:
        self.body = body
        self.sig_type = sig_type
        self.algorithm = algorithm
        self.hash_id = hash_id
        self.hashed_part = hashed_part
        self.hashed = hashed
        self.unhashed = unhashed
        self.left16 = left16
        self.values = values
        self.raw_value = raw_value

    def _first(self, subtype: int, hashed_only: bool = True) -> bytes | None:
        areas = self.hashed if hashed_only else self.hashed + self.unhashed
        for sub in areas:
            if sub.type == subtype:
                return sub.body
        return None

    @property
    def created(self) -> int | None:
        value = self._first(SUB_CREATION_TIME)
        return int.from_bytes(value, "big") if value is not None and len(value) == 4 else None

    @property
    def expiration_seconds(self) -> int | None:
        value = self._first(SUB_SIG_EXPIRATION)
        return int.from_bytes(value, "big") if value is not None and len(value) == 4 else None

    @property
    def key_expiration_seconds(self) -> int | None:
        value = self._first(SUB_KEY_EXPIRATION)
        return int.from_bytes(value, "big") if value is not None and len(value) == 4 else None

    @property
    def key_flags(self) -> int | None:
        value = self._first(SUB_KEY_FLAGS)
        return value[0] if value else None

    @property
    def issuer_fingerprint(self) -> bytes | None:
        value = self._first(SUB_ISSUER_FINGERPRINT, hashed_only=False)
        if value is not None and len(value) == 21 and value[0] == 4:
            return value[1:]
        return None

    @property
    def issuer_key_ids(self) -> set[bytes]:
        ids = {sub.body for sub in self.hashed + self.unhashed if sub.type == SUB_ISSUER_KEY_ID and len(sub.body) == 8}
        fingerprint = self.issuer_fingerprint
        if fingerprint is not None:
            ids.add(fingerprint[-8:])
        return ids

    @property
    def embedded_signatures(self) -> list[bytes]:
        """Embedded signatures from both areas: a back-signature authenticates itself, so gpg leaves it unhashed."""
        return [sub.body for sub in self.hashed + self.unhashed if sub.type == SUB_EMBEDDED_SIGNATURE]

    def trailer(self) -> bytes:
        """What follows the signed data in the hash: the hashed part and the v4 final trailer."""
        return self.hashed_part + b"\x04\xff" + struct.pack(">I", len(self.hashed_part))

    def unknown_critical(self) -> list[int]:
        return [sub.type for sub in self.hashed if sub.critical and sub.type not in _KNOWN_SUBPACKETS]


def parse_signature(body: bytes) -> SignaturePacket:
    """Parse a signature packet body. Only v4 is accepted; anything malformed is an OpenPGPError."""
    reader = Reader(body, "signature packet")
    version = reader.u8()
    if version != 4:
        raise OpenPGPError(f"unsupported OpenPGP signature version {version}: keyseal reads v4 signatures")
    sig_type = reader.u8()
    algorithm = reader.u8()
    hash_id = reader.u8()
    hashed_area = reader.take(reader.u16())
    hashed_part = body[: reader.pos]
    unhashed_area = reader.take(reader.u16())
    left16 = reader.take(2)
    values: tuple[int, ...] = ()
    raw_value = b""
    if algorithm in (ALGO_RSA, ALGO_RSA_SIGN):
        values = (reader.mpi(),)
    elif algorithm in (ALGO_ECDSA, ALGO_EDDSA_LEGACY):
        values = (reader.mpi(), reader.mpi())
    elif algorithm == ALGO_ED25519:
        raw_value = reader.take(64)
    else:
        raise OpenPGPError(f"unsupported signature public-key algorithm {algorithm}")
    reader.expect_end()
    return SignaturePacket(
        body=body,
        sig_type=sig_type,
        algorithm=algorithm,
        hash_id=hash_id,
        hashed_part=hashed_part,
        hashed=tuple(parse_subpackets(hashed_area, "hashed subpackets")),
        unhashed=tuple(parse_subpackets(unhashed_area, "unhashed subpackets")),
        left16=left16,
        values=values,
        raw_value=raw_value,
    )


def check_signature_math(sig: SignaturePacket, public_key: PublicKey, key_algorithm: int, digest: bytes) -> bool:
    """True when `sig` is a valid signature by `public_key` over `digest` (the hash of data + trailer)."""
    if digest[:2] != sig.left16:
        return False
    if not _algorithm_matches(sig.algorithm, key_algorithm):
        return False
    from cryptography.exceptions import InvalidSignature

    # Each branch imports only its algorithm's module, and checks the key is of that algorithm.
    try:
        if key_algorithm in RSA_ALGORITHMS:
            from cryptography.hazmat.primitives.asymmetric import padding, rsa

            if not isinstance(public_key, rsa.RSAPublicKey):
                return False
            size = (public_key.key_size + 7) // 8
            if sig.values[0].bit_length() > public_key.key_size:
                return False
            public_key.verify(sig.values[0].to_bytes(size, "big"), digest, padding.PKCS1v15(),
                              _prehashed(sig.hash_id))
        elif key_algorithm == ALGO_ECDSA:
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                return False
            public_key.verify(encode_dss_signature(*sig.values), digest, ec.ECDSA(_prehashed(sig.hash_id)))
        else:
            from cryptography.hazmat.primitives.asymmetric import ed25519

            if not isinstance(public_key, ed25519.Ed25519PublicKey):
                return False
            raw = sig.raw_value or _eddsa_raw(sig.values)
            if raw is None:
                return False
            public_key.verify(raw, digest)
    except InvalidSignature:
        return False
    return True


def _algorithm_matches(sig_algorithm: int, key_algorithm: int) -> bool:
    rsa_family = (ALGO_RSA, ALGO_RSA_SIGN)
    if sig_algorithm in rsa_family:
        return key_algorithm in rsa_family
    return sig_algorithm == key_algorithm


def _eddsa_raw(values: tuple[int, ...]) -> bytes | None:
    r, s = values
    if r.bit_length() > 256 or s.bit_length() > 256:
        return None
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def encode_signature_values(public_key: PublicKey, raw_signature: bytes) -> bytes:
    """Turn a Signer's natural signature encoding into the v4 algorithm-specific MPIs."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    if isinstance(public_key, rsa.RSAPublicKey):
        return encode_mpi(int.from_bytes(raw_signature, "big"))
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        try:
            r, s = decode_dss_signature(raw_signature)
        except ValueError as exc:
            raise UnsupportedKeyError("the signer returned a malformed ECDSA signature") from exc
        return encode_mpi(r) + encode_mpi(s)
    if len(raw_signature) != 64:
        raise UnsupportedKeyError("the signer returned a malformed Ed25519 signature")
    return encode_mpi(int.from_bytes(raw_signature[:32], "big")) + encode_mpi(int.from_bytes(raw_signature[32:], "big"))


def creation_subpackets(created: int, fingerprint: bytes) -> bytes:
    """The hashed subpackets every keyseal signature carries: creation time and issuer fingerprint."""
    return encode_subpacket(SUB_CREATION_TIME, struct.pack(">I", created)) + encode_subpacket(
        SUB_ISSUER_FINGERPRINT, b"\x04" + fingerprint
    )


def make_signature(
    signer: Signer,
    public_key: PublicKey,
    sig_type: int,
    hash_name: HashName,
    hasher: Hasher,
    hashed_subpackets: bytes,
    fingerprint: bytes,
) -> bytes:
    """Finish `hasher` (already fed with the signed data) and return a signature packet body.

    The signature is checked against `public_key` before it is returned, so keyseal never writes a signature
    that does not verify (a wrong key, a misbehaving KMS or emulator shows here, not at the user's end).
    """
    algorithm = algorithm_of(public_key)
    if len(hashed_subpackets) > 0xFFFF:
        raise OpenPGPError("hashed subpacket area too large")
    hashed_part = struct.pack(">BBBBH", 4, sig_type, algorithm, HASH_IDS[hash_name], len(hashed_subpackets))
    hashed_part += hashed_subpackets
    hasher.update(hashed_part + b"\x04\xff" + struct.pack(">I", len(hashed_part)))
    digest = hasher.digest()
    from keyseal._internal import audit  # only signing needs it: verification stays light to start

    with audit.subject(purpose=_PURPOSES.get(sig_type, f"openpgp-0x{sig_type:02x}"),
                       openpgp_fingerprint=fingerprint.hex().upper()):
        raw = signer.sign_digest(digest, hash_name)
    unhashed = encode_subpacket(SUB_ISSUER_KEY_ID, fingerprint[-8:])
    body = hashed_part + struct.pack(">H", len(unhashed)) + unhashed + digest[:2]
    body += encode_signature_values(public_key, raw)
    if not check_signature_math(parse_signature(body), public_key, algorithm, digest):
        raise UnsupportedKeyError(
            f"the signature returned by {signer.uri} does not verify with its public key; nothing was written"
        )
    return body


def check_hash_fits_key(public_key: PublicKey, hash_name: HashName) -> None:
    """ECDSA needs a hash at least as long as the curve order (verifiers reject shorter ones)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        need = {"secp384r1": 384, "secp521r1": 512}.get(public_key.curve.name, 256)
        if int(hash_name[3:]) < need:
            raise UnsupportedKeyError(
                f"{hash_name} is too short for a {public_key.curve.name} key: use --digest sha{need}"
            )
