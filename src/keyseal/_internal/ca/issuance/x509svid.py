"""X.509-SVID issuance from a PKCS#10 CSR, as the SPIFFE X509-SVID standard describes a leaf.

The leaf has exactly one URI SAN (the SPIFFE ID), followed by the entry's DNS names if it has any (the
X509-SVID standard allows other SAN types beside the one URI), CA=false, digitalSignature (plus keyEncipherment
for RSA and keyAgreement for EC keys), never keyCertSign or cRLSign, serverAuth + clientAuth, SKI of the
requester's key and AKI of the CA's, and never outlives the CA certificate. Only the CSR's public key is used (after its
self-signature proves the requester holds the private key): its names and extensions are ignored, the
SPIFFE ID comes from the authorized request. The requester's key is checked (type, size, curve, and an RSA
public exponent of 65537) before its signature, so a key that would be refused costs no signature check.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from keyseal._internal.ca.custody.keyset import ORGANIZATION, Keyset
from keyseal._internal.ca.issuance import der
from keyseal._internal.ca.issuance.signing_audit import record_signature
from keyseal._internal.spiffe.ids import SpiffeId
from keyseal.errors import UsageError

__all__ = [
    "BACKDATE", "MAX_CSR_BYTES", "CsrError", "IssuedLeaf", "LeafPublicKey", "issue_x509_svid", "parse_csr",
    "parse_csr_key", "sign_x509_svid",
]

MAX_CSR_BYTES = 16 * 1024
BACKDATE = timedelta(seconds=10)  # tolerate a little clock skew between the CA and its relying parties
_EC_CURVES = {"secp256r1", "secp384r1", "secp521r1"}
# 65537 only: every current key generator uses it; a large exponent makes each signature check cost like a
# private-key operation, and small ones (3) invite old padding mistakes.
RSA_PUBLIC_EXPONENT = 65537
_PEM_CSR_RE = re.compile(r"-----BEGIN ((?:NEW )?CERTIFICATE REQUEST)-----([A-Za-z0-9+/=\s]*)-----END \1-----")
LeafKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class CsrError(UsageError):
    """The certificate signing request cannot be used (malformed, bad signature, weak key)."""


@dataclass(frozen=True)
class LeafPublicKey:
    """A leaf's public key with its DER SubjectPublicKeyInfo, the form the leaf embeds: kept together so a
    renewal with a remembered CSR does not encode the key again."""

    key: LeafKey
    spki: bytes

    @classmethod
    def of(cls, key: LeafKey) -> LeafPublicKey:
        return cls(key, key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclass(frozen=True)
class IssuedLeaf:
    """A signed leaf as the issuer assembled it, with the values an answer reports: nothing needs to parse the
    certificate back to learn its serial, its expiry or its PEM text."""

    der: bytes
    serial_number: int
    not_after: datetime  # UTC, whole seconds: what the certificate says

    def pem(self) -> str:
        """The PEM text, as `cryptography` writes it: base64 of the DER in lines of 64 characters."""
        text = base64.b64encode(self.der).decode("ascii")
        lines = "\n".join([text[i:i + 64] for i in range(0, len(text), 64)])
        return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def parse_csr(text: str) -> LeafKey:
    """A CSR as PEM or as base64 DER; returns its public key once its self-signature verifies."""
    return parse_csr_key(text).key


def parse_csr_key(text: str) -> LeafPublicKey:
    """`parse_csr`, with the key's SubjectPublicKeyInfo.

    A client that renews with the same CSR sends the same bytes: the last CSR_CACHE_SIZE verified CSRs are
    remembered by their DER, so their signature (the same proof of possession, byte for byte) is not checked
    again, whether it comes as PEM (with any line breaks) or as base64 DER. Refused CSRs are never cached.
    """
    if not isinstance(text, str) or not text.strip():
        raise CsrError("csr is missing: send a PKCS#10 certificate signing request, PEM or base64 DER")
    if len(text) > MAX_CSR_BYTES:
        raise CsrError(f"csr is larger than {MAX_CSR_BYTES} bytes")
    return _verified_csr_key(_csr_der(text))


CSR_CACHE_SIZE = 1024


def _csr_der(text: str) -> bytes:
    """The DER of a CSR sent as PEM (the first CERTIFICATE REQUEST block) or as base64 DER."""
    if "-----BEGIN" in text:
        match = _PEM_CSR_RE.search(text)
        body = "".join(match.group(2).split()) if match else ""
    else:
        body = text.strip()
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:  # binascii.Error, or characters that are not ASCII
        der = b""
    if not der:
        raise CsrError("csr is not a PKCS#10 certificate signing request (PEM, or base64 of DER)")
    return der


@functools.lru_cache(maxsize=CSR_CACHE_SIZE)
def _verified_csr_key(der: bytes) -> LeafPublicKey:
    return LeafPublicKey.of(_verify_csr(der))


def _verify_csr(der: bytes) -> LeafKey:
    """The CSR's public key once the key is one the CA accepts and the CSR's self-signature verifies."""
    try:
        csr = x509.load_der_x509_csr(der)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CsrError("csr is not a PKCS#10 certificate signing request (PEM, or base64 of DER)") from exc
    try:
        key = _accepted_key(csr.public_key())
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # e.g. an EC key whose parameters are not a curve
        raise CsrError("csr uses a key or signature algorithm the CA does not accept") from exc
    if not valid:
        raise CsrError("csr signature does not verify: sign the request with the key it carries")
    return key


def _accepted_key(key: object) -> LeafKey:
    """The key if the CA issues for keys like it: checked before the signature, which costs far more."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrError(f"csr key is RSA-{key.key_size}: use RSA of at least 2048 bits or ECDSA P-256")
        if key.public_numbers().e != RSA_PUBLIC_EXPONENT:
            raise CsrError(f"csr key has RSA public exponent {str(key.public_numbers().e)[:20]}: only "
                           f"{RSA_PUBLIC_EXPONENT} is accepted")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise CsrError(f"csr key uses curve {key.curve.name}: use P-256, P-384 or P-521")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CsrError("csr key type is not accepted: use ECDSA (P-256/P-384/P-521), RSA (>= 2048) or Ed25519")


@dataclass(frozen=True, eq=False)  # compared by identity: one per keyset and kind of leaf key, a cache key below
class _LeafTemplate:
    """The DER of everything in a leaf that depends only on the keyset and the kind of leaf key, encoded once
    per keyset: `cryptography`'s certificate builder re-encodes all of it for every leaf, which costs three
    times the signature itself. The leaf is then the template plus serial, validity, key, SAN and SKI."""

    head: bytes  # version [0], then nothing: the serial follows
    signature_algorithm: bytes
    names: bytes  # issuer Name; validity goes between issuer and subject, so the subject is kept apart
    subject: bytes
    extensions: bytes  # basicConstraints, keyUsage, extendedKeyUsage, authorityKeyIdentifier


_VERSION_3 = der.tlv(0xA0, der.integer(2))
_HASH_CONSTRUCTORS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
_SIGNATURE_ALGORITHMS = {
    ("ec", "sha256"): der.sequence(der.oid(SignatureAlgorithmOID.ECDSA_WITH_SHA256)),
    ("ec", "sha384"): der.sequence(der.oid(SignatureAlgorithmOID.ECDSA_WITH_SHA384)),
    ("ec", "sha512"): der.sequence(der.oid(SignatureAlgorithmOID.ECDSA_WITH_SHA512)),
    ("rsa", "sha256"): der.sequence(der.oid(SignatureAlgorithmOID.RSA_WITH_SHA256), b"\x05\x00"),
    ("rsa", "sha384"): der.sequence(der.oid(SignatureAlgorithmOID.RSA_WITH_SHA384), b"\x05\x00"),
    ("rsa", "sha512"): der.sequence(der.oid(SignatureAlgorithmOID.RSA_WITH_SHA512), b"\x05\x00"),
}


def _template(keyset: Keyset, public_key: LeafKey) -> _LeafTemplate:
    kind = type(public_key).__name__
    template = keyset.leaf_templates.get(kind)
    if template is None:
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        is_ec = isinstance(public_key, ec.EllipticCurvePublicKey)
        ca_key = keyset.x509_key
        family = "rsa" if isinstance(ca_key.public_key(), rsa.RSAPublicKey) else "ec"
        template = _LeafTemplate(
            head=_VERSION_3,
            signature_algorithm=_SIGNATURE_ALGORITHMS[(family, ca_key.hash_name)],
            names=keyset.ca_certificate.subject.public_bytes(),
            subject=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]).public_bytes(),
            extensions=b"".join((
                der.extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
                der.extension(
                    x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                                  data_encipherment=False, key_agreement=is_ec, key_cert_sign=False, crl_sign=False,
                                  encipher_only=False, decipher_only=False),
                    critical=True,
                ),
                der.extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False),
                der.extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(keyset.subject_key_identifier),
                    critical=False,
                ),
            )),
        )
        keyset.leaf_templates[kind] = template
    return template


@functools.lru_cache(maxsize=CSR_CACHE_SIZE)
def _leaf_key_parts(spki: bytes) -> bytes:
    """The subjectKeyIdentifier extension of a leaf key, by its SubjectPublicKeyInfo (renewals reuse keys)."""
    public_key = serialization.load_der_public_key(spki)
    return der.extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=CSR_CACHE_SIZE)
def _uri_san(spiffe_id: str) -> bytes:
    return der.extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)


def _subject_to_end(template: _LeafTemplate, spki: bytes, san: bytes) -> bytes:
    """What follows the validity in a TBSCertificate: subject, key, extensions."""
    return b"".join((template.subject, spki,
                     der.tlv(0xA3, der.sequence(template.extensions, san, _leaf_key_parts(spki)))))


@functools.lru_cache(maxsize=CSR_CACHE_SIZE)
def _svid_subject_to_end(template: _LeafTemplate, spki: bytes, spiffe_id: str) -> bytes:
    """`_subject_to_end` of an SVID (one URI SAN), remembered: a client renewing with the same CSR for the
    same ID gets the same bytes, so they are encoded once."""
    return _subject_to_end(template, spki, _uri_san(spiffe_id))


@functools.lru_cache(maxsize=64)
def _validity(not_before: datetime, not_after: datetime) -> bytes:
    """The Validity of leaves issued within one second with one TTL (UTC, whole seconds): they share it."""
    return der.sequence(der.time(not_before), der.time(not_after))


def issue_x509_svid(keyset: Keyset, spiffe_id: SpiffeId, public_key: LeafKey, now: datetime, ttl: timedelta,
                    *, dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = ()) -> x509.Certificate:
    """Sign the leaf with the keyset's X.509 CA key (one signature: in KMS custody, one kms:Sign).

    `dns_names`: DNS SANs after the one URI SAN (an entry's, checked by ca.registry.entries.check_dns_name, or
    the server's own serving certificate's); `ip_addresses` for the serving certificate only.
    The TBSCertificate is the same, byte for byte, as `cryptography`'s builder makes for these values.
    """
    leaf = sign_x509_svid(keyset, spiffe_id, LeafPublicKey.of(public_key), now, ttl, dns_names=dns_names,
                          ip_addresses=ip_addresses)
    return x509.load_der_x509_certificate(leaf.der)


def sign_x509_svid(keyset: Keyset, spiffe_id: SpiffeId, leaf_key: LeafPublicKey, now: datetime, ttl: timedelta,
                   *, dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = ()) -> IssuedLeaf:
    """`issue_x509_svid` without parsing the result back: the API answers from the DER it assembled."""
    not_before = max(now - BACKDATE, keyset.not_before)
    not_after = min(now + ttl, keyset.not_after)
    if not_after <= now:
        raise UsageError("the active CA expires now: no SVID can be issued until the next keyset is active")
    public_key, spki = leaf_key.key, leaf_key.spki
    template = _template(keyset, public_key)
    subject_id = spiffe_id.uri
    not_after_utc = not_after.astimezone(UTC).replace(microsecond=0)
    serial = x509.random_serial_number()
    if dns_names or ip_addresses:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(subject_id)]
        names += [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        tail = _subject_to_end(template, spki, der.extension(x509.SubjectAlternativeName(names), critical=False))
    else:
        tail = _svid_subject_to_end(template, spki, subject_id)
    tbs = der.sequence(
        template.head,
        der.integer(serial),
        template.signature_algorithm,
        template.names,
        _validity(not_before.astimezone(UTC).replace(microsecond=0), not_after_utc),
        tail,
    )
    key = keyset.x509_key
    try:
        digest = _HASH_CONSTRUCTORS[key.hash_name](tbs).digest()
        signature = key.sign_digest(digest, key.hash_name)
    except Exception as exc:
        record_signature(key, purpose="x509-svid", subject=subject_id, hash_name=key.hash_name,
                         signed_bytes=None, error=exc)
        raise
    record_signature(key, purpose="x509-svid", subject=subject_id, hash_name=key.hash_name, digest=digest)
    return IssuedLeaf(der.sequence(tbs, template.signature_algorithm, der.bit_string(signature)), serial,
                      not_after_utc)
