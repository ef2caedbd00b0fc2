"""X.509-SVIDs, JWT-SVIDs and the bundle as the issuers make them, checked by independent verifiers: the PyPI
`spiffe` package (leaf rules, JWT-SVID validation), `cryptography.x509.verification` and `openssl verify`."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe.svid.errors import InvalidTokenError

from keyseal._internal.ca.bundle import bundle_document
from keyseal._internal.ca.config import CA_KEY_TYPES
from keyseal._internal.ca.custody.keys import MemoryCaKey
from keyseal._internal.ca.custody.keyset import Keyset, make_keyset
from keyseal._internal.ca.issuance.jwtsvid import check_audience, issue_jwt_svid
from keyseal._internal.ca.issuance.x509svid import CsrError, issue_x509_svid, parse_csr
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.spiffe.ids import parse_spiffe_id
from keyseal.errors import UsageError
from tests.harness.ca import (
    START,
    TRUST_DOMAIN,
    bundle_authorities,
    make_csr,
    new_key,
    openssl_verify,
    verify_jwt_svid,
    verify_x509_svid,
)

SVID_ID = parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/ns/a/workload")


def keyset(key_type: str = "ec-p256", number: int = 1, start: object = START,
           lifetime: timedelta = timedelta(days=1)) -> Keyset:
    kind = CA_KEY_TYPES[key_type]
    return make_keyset(TRUST_DOMAIN, number, start, lifetime,  # type: ignore[arg-type]
                       MemoryCaKey(generate_private_key(kind)), MemoryCaKey(generate_private_key(kind)))


@pytest.fixture(scope="module")
def ks() -> Keyset:
    return keyset()


def as_body(certificate: x509.Certificate) -> dict[str, object]:
    return {"spiffeID": str(SVID_ID), "certChain": [certificate.public_bytes(serialization.Encoding.PEM).decode()]}


def test_leaf_follows_the_x509_svid_standard(ks: Keyset, tmp_path: Path) -> None:
    key = new_key()
    now = START + timedelta(minutes=10)
    leaf = issue_x509_svid(ks, SVID_ID, parse_csr(make_csr(key)), now, timedelta(hours=1))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(str(SVID_ID))]  # exactly one URI SAN, nothing else
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ks.subject_key_identifier.digest
    assert leaf.not_valid_after_utc == now + timedelta(hours=1)
    assert leaf.not_valid_before_utc <= now
    assert leaf.issuer == ks.ca_certificate.subject
    bundle = bundle_document([ks], timedelta(minutes=5))
    verify_x509_svid(as_body(leaf), key, bundle, now)
    result = openssl_verify(tmp_path, leaf.public_bytes(serialization.Encoding.PEM).decode(), bundle, now)
    assert result.returncode == 0, result.stderr + result.stdout


def test_leaf_never_outlives_its_ca(ks: Keyset, tmp_path: Path) -> None:
    now = ks.not_after - timedelta(minutes=20)
    leaf = issue_x509_svid(ks, SVID_ID, new_key().public_key(), now, timedelta(hours=1))
    assert leaf.not_valid_after_utc == ks.not_after
    with pytest.raises(UsageError, match="expires now"):
        issue_x509_svid(ks, SVID_ID, new_key().public_key(), ks.not_after, timedelta(hours=1))


def test_ca_certificate(ks: Keyset) -> None:
    ca = ks.ca_certificate
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    sans = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}"]
    ca.verify_directly_issued_by(ca)
    assert (ca.not_valid_before_utc, ca.not_valid_after_utc) == (ks.not_before, ks.not_after)


def test_ca_certificate_is_rebuilt_identically(ks: Keyset) -> None:
    """Deterministic signing: a restart or another replica rebuilds the same certificate from the same key."""
    again = make_keyset(TRUST_DOMAIN, ks.number, ks.not_before, ks.not_after - ks.not_before, ks.x509_key,
                        ks.jwt_key)
    assert again.ca_der == ks.ca_der
    other = make_keyset(TRUST_DOMAIN, 2, ks.not_before, ks.not_after - ks.not_before, ks.x509_key, ks.jwt_key)
    assert other.ca_certificate.serial_number != ks.ca_certificate.serial_number


@pytest.mark.slow
@pytest.mark.parametrize(("key_type", "alg"), [("ec-p384", "ES384"), ("rsa-2048", "RS256")])
def test_other_ca_key_types(key_type: str, alg: str, tmp_path: Path) -> None:
    other = keyset(key_type)
    key = new_key()
    leaf = issue_x509_svid(other, SVID_ID, parse_csr(make_csr(key)), START, timedelta(hours=1))
    bundle = bundle_document([other], timedelta(minutes=5))
    verify_x509_svid(as_body(leaf), key, bundle, START + timedelta(seconds=1))
    assert openssl_verify(tmp_path, leaf.public_bytes(serialization.Encoding.PEM).decode(), bundle,
                          START + timedelta(seconds=1)).returncode == 0
    token, _ = issue_jwt_svid(other, SVID_ID, ["aud"], START, timedelta(minutes=5))
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == alg


def test_jwt_svid(ks: Keyset) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC).replace(microsecond=0)  # the spiffe package checks exp against the real clock
    live = keyset(start=now - timedelta(hours=1))
    token, expires = issue_jwt_svid(live, SVID_ID, ["https://api.example.org", "other"], now, timedelta(minutes=5))
    assert expires == now + timedelta(minutes=5)
    header, claims = (json.loads(base64.urlsafe_b64decode(p + "==")) for p in token.split(".")[:2])
    assert header == {"alg": "ES256", "kid": live.jwt_kid, "typ": "JWT"}
    assert claims == {"sub": str(SVID_ID), "aud": ["https://api.example.org", "other"],
                      "exp": int(expires.timestamp()), "iat": int(now.timestamp())}
    bundle = bundle_document([live], timedelta(minutes=5))
    svid = verify_jwt_svid(token, bundle, {"https://api.example.org"})
    assert str(svid.spiffe_id) == str(SVID_ID)
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidTokenError, match=r"[Ss]ignature"):
        verify_jwt_svid(tampered, bundle, {"https://api.example.org"})
    with pytest.raises(InvalidTokenError, match=r"[Aa]udience"):
        verify_jwt_svid(token, bundle, {"someone-else"})


def test_jwt_svid_never_outlives_its_key(ks: Keyset) -> None:
    _, expires = issue_jwt_svid(ks, SVID_ID, ["a"], ks.not_after - timedelta(minutes=1), timedelta(minutes=5))
    assert expires == ks.not_after


@pytest.mark.parametrize("audience", [[], "", [""], ["a", "a"], [1], ["x"] * 17, {"a": 1}, None])
def test_bad_audiences(audience: object) -> None:
    with pytest.raises(UsageError):
        check_audience(audience)


def test_bundle_format(ks: Keyset) -> None:
    second = keyset(number=2)
    document = bundle_document([second, ks], timedelta(minutes=5))
    assert document["spiffe_sequence"] == 3
    assert document["spiffe_refresh_hint"] == 300
    uses = [k["use"] for k in document["keys"]]
    assert uses == ["x509-svid", "jwt-svid", "x509-svid", "jwt-svid"]
    x509_entry, jwt_entry = document["keys"][0], document["keys"][1]
    assert x509_entry["kty"] == "EC" and x509_entry["crv"] == "P-256" and "kid" not in x509_entry
    assert bundle_authorities(document)[0] == ks.ca_certificate
    assert jwt_entry["kid"] == ks.jwt_kid
    public = ks.jwt_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    x = int.from_bytes(base64.urlsafe_b64decode(jwt_entry["x"] + "=="), "big")
    assert x == public.public_numbers().x


def test_csr_checks() -> None:
    key = new_key()
    assert parse_csr(make_csr(key)).public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    der = x509.load_pem_x509_csr(make_csr(key).encode()).public_bytes(serialization.Encoding.DER)
    assert isinstance(parse_csr(base64.b64encode(der).decode()), ec.EllipticCurvePublicKey)
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(ed, None)
    assert isinstance(parse_csr(ed_csr.public_bytes(serialization.Encoding.PEM).decode()), ed25519.Ed25519PublicKey)
    with pytest.raises(CsrError, match="not a PKCS#10"):
        parse_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CsrError, match="missing"):
        parse_csr("")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(weak, hashes.SHA256())
    with pytest.raises(CsrError, match="RSA-1024"):
        parse_csr(weak_csr.public_bytes(serialization.Encoding.PEM).decode())
    # A CSR whose signature does not match its key: the requester does not hold the key it asks for.
    good = bytearray(x509.load_pem_x509_csr(make_csr(key).encode()).public_bytes(serialization.Encoding.DER))
    good[-5] ^= 0x01
    with pytest.raises(CsrError):
        parse_csr(base64.b64encode(bytes(good)).decode())


def rsa_key_with_exponent(exponent: int) -> rsa.RSAPrivateKey:
    """An RSA-2048 key whose public exponent is `exponent` (or the next odd number coprime to phi):
    `generate_private_key` makes only 3 and 65537."""
    import math

    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    p, q = numbers.p, numbers.q
    phi = (p - 1) * (q - 1)
    while math.gcd(exponent, phi) != 1:
        exponent += 2
    d = pow(exponent, -1, phi)
    return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                 rsa.RSAPublicNumbers(exponent, p * q)).private_key()


@pytest.mark.slow
@pytest.mark.parametrize("exponent", [3, 17, 2**32 + 15, 2**1000 + 1], ids=["3", "17", "2^32+15", "2^1000+1"])
def test_csr_rsa_exponent_must_be_65537(exponent: int) -> None:
    """A huge public exponent makes the CSR's signature check cost like a private-key operation (2^1000: about a
    hundred times an ordinary one) for every request; small ones invite old mistakes. 65537 only, checked before
    the signature, in every CSR (the issuance API and the agent endpoints share parse_csr)."""
    key = rsa_key_with_exponent(exponent)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    with pytest.raises(CsrError, match="public exponent"):
        parse_csr(csr.public_bytes(serialization.Encoding.PEM).decode())
    broken = bytearray(csr.public_bytes(serialization.Encoding.DER))
    broken[-5] ^= 0x01  # a bad signature too: the exponent is refused before the signature is checked
    with pytest.raises(CsrError, match="public exponent"):
        parse_csr(base64.b64encode(bytes(broken)).decode())
    ordinary = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert isinstance(parse_csr(make_csr(ordinary)), rsa.RSAPublicKey)


def test_csr_cache_is_keyed_by_the_der() -> None:
    """The same CSR as PEM, PEM with other line breaks, and base64 DER is verified once: the cache of verified
    CSRs is keyed by the request's DER, not by the text it came in."""
    from keyseal._internal.ca.issuance.x509svid import _verified_csr_key

    pem = make_csr()
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    body = base64.b64encode(der).decode()
    forms = [pem, pem.replace("\n", "\r\n"), "\n" + pem + "\n\n",
             "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(body[i:i + 40] for i in range(0, len(body), 40))
             + "\n-----END CERTIFICATE REQUEST-----\n", body, f"  {body}\n"]
    before = _verified_csr_key.cache_info()
    keys = {parse_csr(text).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            for text in forms}
    after = _verified_csr_key.cache_info()
    assert len(keys) == 1
    assert after.misses - before.misses == 1 and after.hits - before.hits == len(forms) - 1
    for text in ("-----BEGIN CERTIFICATE REQUEST-----\n" + body + "\n-----END CERTIFICATE-----\n",  # labels differ
                 "-----BEGIN CERTIFICATE REQUEST-----\n" + body + "!\n-----END CERTIFICATE REQUEST-----\n",
                 "-----BEGIN CERTIFICATE-----\n" + body + "\n-----END CERTIFICATE-----\n",
                 body + "\n" + body):
        with pytest.raises(CsrError, match="not a PKCS#10"):
            parse_csr(text)
