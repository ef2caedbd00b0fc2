"""keyseal assembles X.509-SVID leaves from DER parts encoded once per keyset (ca.issuance.der). These tests hold
that assembly to `cryptography`'s certificate builder: for the same serial, validity, key and names, the
TBSCertificate must be the same bytes, for every CA key type and leaf key kind; and the signature must verify
under the CA key with the algorithm the certificate names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from keyseal._internal.ca.config import CA_KEY_TYPES
from keyseal._internal.ca.custody.keys import MemoryCaKey
from keyseal._internal.ca.custody.keyset import Keyset, make_keyset
from keyseal._internal.ca.issuance import der
from keyseal._internal.ca.issuance.x509svid import issue_x509_svid
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.spiffe.ids import parse_spiffe_id
from tests.harness.ca import START, TRUST_DOMAIN

SVID_ID = parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/ns/a/workload")
LEAF_KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()).public_key(),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048).public_key(),
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
}


@pytest.fixture(scope="module", params=["ec-p256", "ec-p384", "rsa-2048"])
def ca(request: pytest.FixtureRequest) -> tuple[Keyset, object]:
    kind = CA_KEY_TYPES[request.param]
    private = generate_private_key(kind)
    keyset = make_keyset(TRUST_DOMAIN, 1, START, timedelta(days=30),  # type: ignore[arg-type]
                         MemoryCaKey(private), MemoryCaKey(generate_private_key(kind)))
    return keyset, private


def rebuilt_by_cryptography(leaf: x509.Certificate, keyset: Keyset, private: object) -> x509.Certificate:
    """The same leaf made by `cryptography`'s builder: every field and extension copied, in order."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())  # type: ignore[arg-type]
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for extension in leaf.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(private, leaf.signature_hash_algorithm)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("leaf_kind", sorted(LEAF_KEYS))
def test_leaf_tbs_is_what_cryptography_builds(ca: tuple[Keyset, object], leaf_kind: str) -> None:
    keyset, private = ca
    public_key = LEAF_KEYS[leaf_kind]()
    leaf = issue_x509_svid(keyset, SVID_ID, public_key, START + timedelta(hours=1), timedelta(hours=1))  # type: ignore[arg-type]
    reference = rebuilt_by_cryptography(leaf, keyset, private)
    assert leaf.tbs_certificate_bytes == reference.tbs_certificate_bytes
    # The rebuild copies the leaf's own fields, so it checks the encoding; the values are checked here.
    extensions = leaf.extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(str(SVID_ID))]
    assert extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
        keyset.subject_key_identifier.key_identifier
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
    assert leaf.issuer == keyset.ca_certificate.subject and leaf.public_key() == public_key
    assert leaf.not_valid_after_utc <= keyset.ca_certificate.not_valid_after_utc
    assert leaf.not_valid_after_utc == START + timedelta(hours=2)
    assert 0 < leaf.serial_number < 2**159
    assert leaf.signature_algorithm_oid == keyset.ca_certificate.signature_algorithm_oid
    assert [e.oid for e in leaf.extensions] == [e.oid for e in reference.extensions]
    ca_public = keyset.ca_certificate.public_key()
    if isinstance(ca_public, rsa.RSAPublicKey):
        ca_public.verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(),
                         leaf.signature_hash_algorithm)  # type: ignore[arg-type]
    else:
        assert isinstance(ca_public, ec.EllipticCurvePublicKey)
        ca_public.verify(leaf.signature, leaf.tbs_certificate_bytes,
                         ec.ECDSA(leaf.signature_hash_algorithm))  # type: ignore[arg-type]


def test_serving_certificate_names_match_cryptography(ca: tuple[Keyset, object]) -> None:
    keyset, private = ca
    leaf = issue_x509_svid(keyset, SVID_ID, LEAF_KEYS["p256"](), START + timedelta(hours=1), timedelta(hours=1),
                           dns_names=("localhost", "keyseal.example.org"), ip_addresses=("127.0.0.1", "::1"))
    assert leaf.tbs_certificate_bytes == rebuilt_by_cryptography(leaf, keyset, private).tbs_certificate_bytes
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SVID_ID)]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "keyseal.example.org"]


@pytest.mark.parametrize("value", [0, 1, 0x7F, 0x80, 0xFF, 0x100, 2**159 - 1, 2**159, 2**1000 + 12345])
def test_integer_encoding(value: int) -> None:
    encoded = der.integer(value)
    content = encoded[2:] if encoded[1] < 0x80 else encoded[2 + (encoded[1] & 0x7F):]
    assert encoded[0] == 0x02
    assert int.from_bytes(content, "big", signed=True) == value  # two's complement, so never negative
    assert len(content) == 1 or not (content[0] == 0 and content[1] < 0x80)  # shortest form


def test_negative_integer_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        der.integer(-1)


@pytest.mark.parametrize("when", [datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
                                  datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
                                  datetime(2050, 1, 1, 0, 0, 0, tzinfo=UTC),
                                  datetime(2126, 6, 1, 12, 0, 0, tzinfo=UTC)])
def test_time_encoding_matches_cryptography(when: datetime) -> None:
    """UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280), as `cryptography` writes validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(when).not_valid_after(when)
                   .sign(key, hashes.SHA256()))
    assert der.sequence(der.time(when), der.time(when)) in certificate.tbs_certificate_bytes


def test_long_lengths_use_the_long_form() -> None:
    assert der.tlv(0x04, b"x" * 0x7F)[:2] == b"\x04\x7f"
    assert der.tlv(0x04, b"x" * 0x80)[:3] == b"\x04\x81\x80"
    assert der.tlv(0x04, b"x" * 0x1234)[:4] == b"\x04\x82\x12\x34"
