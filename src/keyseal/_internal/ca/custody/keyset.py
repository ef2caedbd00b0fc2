"""A keyset: the X.509 CA key and the JWT key that rotate together, and the self-signed CA certificate.

The CA certificate is a function of what the store holds (trust domain, keyset number, creation time, CA
lifetime, public key): serial, names, validity and extensions are derived, and a wrapped key signs it
deterministically. So every replica, and every restart, rebuilds the very same certificate: the store needs
no copy of it, and the bundle stays byte-for-byte stable.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keyseal._internal.ca.custody.alarms import alarm
from keyseal._internal.ca.custody.keys import CaKey, jws_algorithm
from keyseal.errors import CustodyIntegrityError, UnsupportedKeyError
from keyseal.signer import PublicKey, hash_algorithm

__all__ = ["Keyset", "build_ca_certificate", "jwk_of", "jwk_thumbprint", "make_keyset"]

ORGANIZATION = "keyseal"


@dataclass(frozen=True)
class Keyset:
    """Keyset `number` (1, 2, ...): valid from `not_before` to `not_after` (the CA certificate's validity)."""

    number: int
    not_before: datetime
    not_after: datetime
    x509_key: CaKey
    jwt_key: CaKey
    ca_certificate: x509.Certificate
    jwt_kid: str
    # The DER of everything in a leaf that does not change per SVID, by leaf key kind (x509svid).
    leaf_templates: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ca_der(self) -> bytes:
        return self.ca_certificate.public_bytes(serialization.Encoding.DER)

    @property
    def ca_pem(self) -> str:
        return self.ca_certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def subject_key_identifier(self) -> x509.SubjectKeyIdentifier:
        return self.ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def _serial(trust_domain: str, number: int, public_key: PublicKey) -> int:
    """A positive 159-bit serial derived from the trust domain, keyset number and key (stable, unique)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(b"keyseal ca serial\0" + trust_domain.encode() + b"\0" + str(number).encode()
                            + b"\0" + spki).digest()
    return (int.from_bytes(digest[:20], "big") >> 1) or 1


def build_ca_certificate(trust_domain: str, number: int, not_before: datetime, lifetime: timedelta,
                         key: CaKey) -> x509.Certificate:
    """The self-signed CA certificate of keyset `number`: CA=true (path length 0: it signs only leaves),
    keyCertSign + cRLSign, SKI, and the trust domain's SPIFFE ID as its one URI SAN."""
    public = key.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise UnsupportedKeyError("a CA key must be an ECDSA or RSA key")
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} CA {number}"[:64]),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(_serial(trust_domain, number, public))
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
    )
    algorithm = hash_algorithm(key.hash_name)
    if isinstance(public, ec.EllipticCurvePublicKey) and key.deterministic:
        return builder.sign(key.builder_key(), algorithm, ecdsa_deterministic=True)  # type: ignore[arg-type]
    return builder.sign(key.builder_key(), algorithm)  # type: ignore[arg-type]


def _b64url_uint(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def jwk_of(public_key: PublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 7517/7518): kty and the key's parameters only."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        return {"kty": "EC", "crv": _CURVES[public_key.curve.name],
                "x": _b64url_uint(numbers.x, size), "y": _b64url_uint(numbers.y, size)}
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(rsa_numbers.n), "e": _b64url_uint(rsa_numbers.e)}
    raise UnsupportedKeyError("only EC and RSA keys can appear in the bundle")


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the JWT key's `kid`, the same on every replica."""
    jwk = jwk_of(public_key)
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_keyset(trust_domain: str, number: int, not_before: datetime, lifetime: timedelta,
                x509_key: CaKey, jwt_key: CaKey) -> Keyset:
    """Assemble a keyset from its two keys (builds the CA certificate: one signature by the X.509 key)."""
    jws_algorithm(jwt_key.public_key())  # refuse an unusable JWT key now, not at the first JWT-SVID
    certificate = build_ca_certificate(trust_domain, number, not_before, lifetime, x509_key)
    try:  # a key manager whose private key is not its public key's would make every SVID unverifiable
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError) as exc:
        message = f"the CA certificate of keyset {number} does not verify with its own public key: the X.509 " \
                  f"CA key ({x509_key.custody} custody) signs with another private key than its public key's"
        alarm("signature-check", message)
        raise CustodyIntegrityError(message) from exc
    return Keyset(number, not_before, not_before + lifetime, x509_key, jwt_key, certificate,
                  jwk_thumbprint(jwt_key.public_key()))
