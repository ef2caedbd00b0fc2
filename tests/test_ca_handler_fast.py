"""The issuance handler answers from what it assembled (DER, serial, expiry) and from caches, instead of parsing
its own certificates back and re-encoding constant parts. These tests hold those shortcuts to what the slow way
gives: the PEM `cryptography` writes, the certificate's own serial and expiry, `datetime`'s spelling of times,
a key URI redacted as `redact_uri` does it, and correct answers from several threads at once."""

from __future__ import annotations

import base64
import gc
import json
import logging
import re
import ssl
import threading
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils

from keyseal._internal.audit.log import utc_now, utc_second
from keyseal._internal.backends.file import FileSigner
from keyseal._internal.ca.bundle import bundle_document
from keyseal._internal.ca.config import CA_KEY_TYPES, parse_config
from keyseal._internal.ca.custody.keys import MemoryCaKey, SignerCaKey
from keyseal._internal.ca.custody.keyset import Keyset, make_keyset
from keyseal._internal.ca.http.messages import Request
from keyseal._internal.ca.issuance import signing_audit
from keyseal._internal.ca.issuance.x509svid import (
    IssuedLeaf,
    LeafKey,
    LeafPublicKey,
    issue_x509_svid,
    parse_csr,
    parse_csr_key,
    sign_x509_svid,
)
from keyseal._internal.ca.server import CaServer
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.record import format_time
from keyseal._internal.spiffe.ids import parse_spiffe_id
from tests.harness.ca import (
    START,
    TOKENS,
    TRUST_DOMAIN,
    FakeClock,
    base_config,
    chain_of,
    make_csr,
    new_key,
    pkcs8_pem,
    verify_jwt_svid,
    verify_x509_svid,
)

SVID_ID = parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/ns/a/workload")
LEAF_KEYS: dict[str, Callable[[], LeafKey]] = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()).public_key(),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048).public_key(),
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
}
NOW = START + timedelta(hours=1, microseconds=654321)  # microseconds: the certificate keeps whole seconds


def _keyset(key_type: str, lifetime: timedelta = timedelta(days=1)) -> Keyset:
    kind = CA_KEY_TYPES[key_type]
    return make_keyset(TRUST_DOMAIN, 1, START, lifetime,
                       MemoryCaKey(generate_private_key(kind)), MemoryCaKey(generate_private_key(kind)))


@pytest.fixture(scope="module", params=["ec-p256", "rsa-2048"])
def keyset(request: pytest.FixtureRequest) -> Keyset:
    return _keyset(request.param)


def _post(server: CaServer, path: str, document: dict[str, Any], token: str = "admin") -> tuple[int, Any]:
    response = server.api.handle(Request("POST", path, {"authorization": f"Bearer {TOKENS[token]}"},
                                         json.dumps(document).encode(), "127.0.0.1:1"))
    assert response.body.endswith(b"\n")
    return response.status, json.loads(response.body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    """The API of a wrapped-custody server (local KEK, directory store), called in process on a fixed clock."""
    tmp = tmp_path_factory.mktemp("handler-fast")
    clock = FakeClock(NOW)
    ca = CaServer(parse_config(base_config(tmp)), clock=clock, rotation_thread=False)
    ca.manager.start()
    yield ca


@pytest.mark.slow
@pytest.mark.parametrize("leaf_kind", sorted(LEAF_KEYS))
def test_issued_leaf_is_the_certificate_it_reports(keyset: Keyset, leaf_kind: str) -> None:
    public_key = LEAF_KEYS[leaf_kind]()
    leaf = sign_x509_svid(keyset, SVID_ID, LeafPublicKey.of(public_key), NOW, timedelta(hours=1))
    certificate = x509.load_der_x509_certificate(leaf.der)
    assert leaf.pem() == certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    assert leaf.serial_number == certificate.serial_number
    assert leaf.not_after == certificate.not_valid_after_utc == (NOW + timedelta(hours=1)).replace(microsecond=0)
    assert leaf.not_after.tzinfo == UTC
    assert certificate.public_key() == public_key
    # the key's SubjectPublicKeyInfo travels with it: the same bytes the key encodes
    assert LeafPublicKey.of(public_key).spki == public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_expiry_is_capped_by_the_ca_as_the_certificate_says() -> None:
    short = _keyset("ec-p256", lifetime=timedelta(hours=1, minutes=30))
    leaf = sign_x509_svid(short, SVID_ID, LeafPublicKey.of(LEAF_KEYS["p256"]()), NOW, timedelta(hours=1))
    certificate = x509.load_der_x509_certificate(leaf.der)
    assert leaf.not_after == certificate.not_valid_after_utc == short.not_after


def test_issue_x509_svid_is_sign_x509_svid_parsed(keyset: Keyset) -> None:
    """Other callers (serving certificate, agents) keep getting a parsed certificate, DNS and IP names included."""
    public_key = new_key().public_key()
    certificate = issue_x509_svid(keyset, SVID_ID, public_key, NOW, timedelta(hours=1),
                                  dns_names=("ca.example",), ip_addresses=("127.0.0.1",))
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SVID_ID)]
    assert san.get_values_for_type(x509.DNSName) == ["ca.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # a plain SVID of the same ID and key has no DNS name: the SAN of the serving certificate was not cached
    plain = issue_x509_svid(keyset, SVID_ID, public_key, NOW, timedelta(hours=1))
    assert plain.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(str(SVID_ID))])


@pytest.mark.parametrize("size", [1, 2, 3, 47, 48, 49, 95, 96, 97, 300, 481, 1000])
def test_pem_lines_are_64_characters(size: int) -> None:
    der = (bytes(range(256)) * 4)[:size]
    pem = IssuedLeaf(der, 1, START).pem()
    assert pem == ssl.DER_cert_to_PEM_cert(der)
    lines = pem.splitlines()
    assert all(len(line) == 64 for line in lines[1:-2]) and 0 < len(lines[-2]) <= 64


def test_csr_key_comes_with_its_spki() -> None:
    key = new_key()
    csr = make_csr(key)
    parsed = parse_csr_key(csr)
    assert parsed is parse_csr_key(csr)  # remembered
    assert parse_csr(csr) is parsed.key
    assert parsed.spki == key.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.slow
def test_x509_answer_is_the_certificate(server: CaServer) -> None:
    key = new_key()
    for document in ({"spiffeID": str(SVID_ID), "csr": make_csr(key)},
                     {"spiffeID": str(SVID_ID), "csr": make_csr(key), "ttlSeconds": 61}):
        status, body = _post(server, "/v1/x509-svid", document)
        assert status == 200, body
        assert list(body) == ["spiffeID", "certChain", "expiresAt", "serialNumber", "keyset"]
        certificate = chain_of(body)[0]
        assert body["certChain"] == [certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")]
        assert body["expiresAt"] == format_time(certificate.not_valid_after_utc)
        ttl = timedelta(seconds=document.get("ttlSeconds", 3600))  # type: ignore[arg-type]
        assert body["expiresAt"] == format_time(NOW + ttl)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["expiresAt"])
        assert body["serialNumber"] == format(certificate.serial_number, "x")
        bundle = bundle_document([k for k, _ in server.manager.live()], server.config.refresh_hint)
        verify_x509_svid(body, key, bundle, NOW)


def test_jwt_answer_is_the_token(server: CaServer) -> None:
    status, body = _post(server, "/v1/jwt-svid", {"spiffeID": str(SVID_ID), "audience": ["a", "b"],
                                                  "ttlSeconds": 30})
    assert status == 200, body
    assert list(body) == ["spiffeID", "token", "expiresAt", "keyset"]
    header, claims, _ = body["token"].split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "alg": "ES256", "kid": server.manager.active().jwt_kid, "typ": "JWT"}
    assert base64.urlsafe_b64decode(header + "==") == (
        b'{"alg":"ES256","kid":"' + server.manager.active().jwt_kid.encode() + b'","typ":"JWT"}')
    payload = json.loads(base64.urlsafe_b64decode(claims + "=="))
    assert payload == {"sub": str(SVID_ID), "aud": ["a", "b"], "exp": int(NOW.timestamp()) + 30,
                       "iat": int(NOW.timestamp())}
    assert body["expiresAt"] == format_time(datetime.fromtimestamp(payload["exp"], UTC))
    bundle = bundle_document([k for k, _ in server.manager.live()], server.config.refresh_hint)
    verify_jwt_svid(body["token"], bundle, {"a"})


def test_utc_now_is_what_datetime_says() -> None:
    for _ in range(2000):
        before = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        now = utc_now()
        after = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        assert before <= now <= after
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", now)


@pytest.mark.parametrize("moment", [datetime(1970, 1, 1, tzinfo=UTC), datetime(2000, 2, 29, 23, 59, 59, tzinfo=UTC),
                                    datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
                                    datetime(2050, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)])
def test_utc_second_spells_like_format_time(moment: datetime) -> None:
    assert utc_second(int(moment.timestamp())) + "Z" == format_time(moment)


def test_audit_names_a_key_by_its_redacted_uri_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A key URI may carry a PIN: the record, and the per-key memory of the redacted URI, never hold it."""
    path = tmp_path / "ca.pem"
    path.write_bytes(pkcs8_pem(new_key()))
    key = SignerCaKey(FileSigner(f"file:{path}?pin-value=2468", path))
    with caplog.at_level(logging.INFO, logger="keyseal.audit"):
        for _ in range(2):
            signing_audit.record_signature(key, purpose="x509-svid", subject=str(SVID_ID), hash_name="sha256",
                                           digest=b"\x01" * 32)
    records = [r for r in caplog.records if r.name == "keyseal.audit"]
    assert len(records) == 2
    for record in records:
        assert record.audit["key_uri"] == f"file:{path}?pin-value=REDACTED"  # type: ignore[attr-defined]
        assert "2468" not in record.getMessage()
    assert all("2468" not in uri for uri in signing_audit._redacted_uris.values())
    assert signing_audit._redacted_uris[key] == f"file:{path}?pin-value=REDACTED"
    dropped = weakref.ref(key)
    del key
    gc.collect()
    assert dropped() is None  # the memory of its URI does not keep a retired key alive
    assert f"file:{path}?pin-value=REDACTED" not in signing_audit._redacted_uris.values()


@pytest.mark.parametrize("kind", ["p256", "p384"])
def test_memory_key_signs_deterministically_with_either_hash(kind: str) -> None:
    private = generate_private_key(kind)
    key = MemoryCaKey(private)
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for hash_name, algorithm in (("sha256", hashes.SHA256()), ("sha384", hashes.SHA384())):
        digest = hashes.Hash(algorithm)
        digest.update(b"keyseal")
        value = digest.finalize()
        signature = key.sign_digest(value, hash_name)  # type: ignore[arg-type]
        assert key.sign_digest(value, hash_name) == signature  # type: ignore[arg-type]
        public.verify(signature, value, ec.ECDSA(utils.Prehashed(algorithm)))


def test_concurrent_requests_each_get_their_own_answer(server: CaServer, caplog: pytest.LogCaptureFixture) -> None:
    keys = [new_key() for _ in range(4)]
    csrs = [make_csr(key) for key in keys]
    answers: list[tuple[int, int, Any]] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        for i in range(15):
            path, document = (("/v1/x509-svid", {"spiffeID": f"{SVID_ID}/{worker}", "csr": csrs[worker]})
                              if i % 3 else ("/v1/jwt-svid", {"spiffeID": f"{SVID_ID}/{worker}", "audience": "x"}))
            status, body = _post(server, path, document)
            with lock:
                answers.append((worker, status, body))

    with caplog.at_level(logging.INFO, logger="keyseal.audit"):
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(answers) == 60 and all(status == 200 for _, status, _ in answers)
    serials = set()
    ca_key = server.manager.active().x509_key.public_key()
    for worker, _, body in answers:
        assert body["spiffeID"] == f"{SVID_ID}/{worker}"
        if "certChain" in body:
            certificate = chain_of(body)[0]
            assert certificate.public_key() == keys[worker].public_key()
            assert certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(body["spiffeID"])])
            assert isinstance(ca_key, ec.EllipticCurvePublicKey)
            ca_key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
            serials.add(certificate.serial_number)
    assert len(serials) == 40
    audited = [r.audit for r in caplog.records if r.name == "keyseal.audit"]  # type: ignore[attr-defined]
    assert sorted(a["purpose"] for a in audited) == ["jwt-svid"] * 20 + ["x509-svid"] * 40
    assert {a["subject"] for a in audited} == {f"{SVID_ID}/{n}" for n in range(4)}
