"""Public-key packets (v4): encoding a `cryptography` key, parsing one back, fingerprints and key IDs.

Each algorithm's `cryptography` module is imported when a key of that algorithm is met (an Ed25519 verification
loads neither the EC nor the RSA module): `keyseal-gpg --verify` runs once per commit, its start-up is its cost.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from keyseal._internal.frozen import Frozen
from keyseal._internal.openpgp import digests
from keyseal._internal.openpgp.packets import Reader, encode_mpi
from keyseal.errors import OpenPGPError, UnsupportedKeyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from keyseal.signer import PublicKey

__all__ = [
    "ALGO_ECDSA",
    "ALGO_ED25519",
    "ALGO_EDDSA_LEGACY",
    "ALGO_NAMES",
    "ALGO_RSA",
    "ALGO_RSA_SIGN",
    "ED25519_LEGACY_OID",
    "RSA_ALGORITHMS",
    "KeyPacket",
    "algorithm_of",
    "encode_public_key_body",
    "fingerprint_of",
    "parse_key_packet",
    "same_public_key",
]

ALGO_RSA = 1
ALGO_RSA_SIGN = 3
ALGO_ECDSA = 19
ALGO_EDDSA_LEGACY = 22
ALGO_ED25519 = 27

ALGO_NAMES = {ALGO_RSA: "RSA", ALGO_RSA_SIGN: "RSA", ALGO_ECDSA: "ECDSA", ALGO_EDDSA_LEGACY: "EdDSA",
              ALGO_ED25519: "Ed25519"}
RSA_ALGORITHMS = (ALGO_RSA, ALGO_RSA_SIGN)

_CURVE_OIDS: dict[str, bytes] = {
    "secp256r1": bytes.fromhex("2a8648ce3d030107"),
    "secp384r1": bytes.fromhex("2b81040022"),
    "secp521r1": bytes.fromhex("2b81040023"),
}
# OID -> the name of the curve's class in cryptography's `ec` module (imported only for an ECDSA key).
_OID_CURVES: dict[bytes, str] = {
    _CURVE_OIDS["secp256r1"]: "SECP256R1",
    _CURVE_OIDS["secp384r1"]: "SECP384R1",
    _CURVE_OIDS["secp521r1"]: "SECP521R1",
}
ED25519_LEGACY_OID = bytes.fromhex("2b06010401da470f01")


def algorithm_of(public_key: PublicKey) -> int:
    """The v4 public-key algorithm keyseal writes for a key (legacy EdDSA for Ed25519, which gpg 2.2 reads)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        return ALGO_RSA
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ALGO_ECDSA
    return ALGO_EDDSA_LEGACY


def encode_public_key_body(public_key: PublicKey, created: int) -> bytes:
    """The body of a v4 public-key packet for `public_key`, created at `created` (Unix seconds)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    head = struct.pack(">BIB", 4, created, algorithm_of(public_key))
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return head + encode_mpi(numbers.n) + encode_mpi(numbers.e)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        oid = _CURVE_OIDS.get(public_key.curve.name)
        if oid is None:
            raise UnsupportedKeyError(f"curve {public_key.curve.name} is not supported in OpenPGP by keyseal")
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        point = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return head + bytes([len(oid)]) + oid + encode_mpi(int.from_bytes(point, "big"))
    raw = _ed25519_raw(public_key)
    oid = ED25519_LEGACY_OID
    return head + bytes([len(oid)]) + oid + encode_mpi(int.from_bytes(b"\x40" + raw, "big"))


def _ed25519_raw(public_key: ed25519.Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint_of(body: bytes) -> bytes:
    """The v4 fingerprint: SHA-1 over 0x99, a two-octet length and the key packet body."""
    return digests.sha1(b"\x99" + struct.pack(">H", len(body)) + body)


class KeyPacket(Frozen):
    """A parsed v4 public key or subkey packet."""

    __slots__ = ("algorithm", "body", "created", "fingerprint", "public_key")

    def __init__(self, body: bytes, created: int, algorithm: int, public_key: PublicKey, fingerprint: bytes) -> None:
        self.body = body
        self.created = created
        self.algorithm = algorithm
        self.public_key = public_key
        self.fingerprint = fingerprint

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex().upper()

    def describe(self) -> str:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        if isinstance(self.public_key, rsa.RSAPublicKey):
            return f"RSA-{self.public_key.key_size}"
        if isinstance(self.public_key, ec.EllipticCurvePublicKey):
            return f"ECDSA-{self.public_key.curve.name}"
        return "Ed25519"


def parse_key_packet(body: bytes) -> KeyPacket:
    """Parse a v4 public key (or the public part that starts a secret-key packet)."""
    reader = Reader(body, "public key packet")
    version = reader.u8()
    if version != 4:
        raise OpenPGPError(f"unsupported OpenPGP key version {version}: keyseal reads v4 keys")
    created = reader.u32()
    algorithm = reader.u8()
    public_key = _parse_material(reader, algorithm)
    reader.expect_end()
    return KeyPacket(body, created, algorithm, public_key, fingerprint_of(body))


def _parse_material(reader: Reader, algorithm: int) -> PublicKey:
    try:
        if algorithm in RSA_ALGORITHMS:
            from cryptography.hazmat.primitives.asymmetric import rsa

            n = reader.mpi()
            e = reader.mpi()
            return rsa.RSAPublicNumbers(e, n).public_key()
        if algorithm == ALGO_ECDSA:
            oid = reader.take(reader.u8())
            curve_name = _OID_CURVES.get(oid)
            if curve_name is None:
                raise OpenPGPError("unsupported ECDSA curve in OpenPGP key")
            from cryptography.hazmat.primitives.asymmetric import ec

            point = reader.mpi()
            size = (point.bit_length() + 7) // 8
            curve: ec.EllipticCurve = getattr(ec, curve_name)()
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, point.to_bytes(size, "big"))
        if algorithm == ALGO_EDDSA_LEGACY:
            oid = reader.take(reader.u8())
            if oid != ED25519_LEGACY_OID:
                raise OpenPGPError("unsupported EdDSA curve in OpenPGP key")
            prefixed = reader.mpi().to_bytes(33, "big")
            if prefixed[0] != 0x40:
                raise OpenPGPError("malformed Ed25519 public key in OpenPGP key")
            return _ed25519_key(prefixed[1:])
        if algorithm == ALGO_ED25519:
            return _ed25519_key(reader.take(32))
    except (ValueError, OverflowError) as exc:
        raise OpenPGPError("malformed public key material in OpenPGP key") from exc
    raise OpenPGPError(f"unsupported OpenPGP public-key algorithm {algorithm}")


def _ed25519_key(raw: bytes) -> ed25519.Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def same_public_key(left: PublicKey, right: PublicKey) -> bool:
    """True when two public keys are the same key (compared by their SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bool(
        left.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        == right.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
