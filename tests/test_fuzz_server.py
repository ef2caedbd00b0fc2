"""Fuzz properties for what the trust-domain server reads from clients: the CSR parser, the JSON bodies of the
issuance API (through `Api.handle`), and the raw HTTP/1.1 requests its listener parses. Whatever the input, the
server answers with a client error or a success, never an internal error, an exception or a hang."""

from __future__ import annotations

import json

import pytest
from fuzz.properties import fuzz_settings
from fuzz.server import ServerCrash, shared_server_targets
from fuzz.targets import run_one
from hypothesis import given
from hypothesis import strategies as st

FUZZ = fuzz_settings(5)
NAMES = ("csr", "x509_request", "jwt_request", "http_request")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(name: str, data: bytes) -> None:
    run_one(shared_server_targets()[name], data)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(program=st.binary(min_size=1, max_size=96))
def test_mutated_valid_requests_are_refused_cleanly(name: str, program: bytes) -> None:
    target = shared_server_targets()[name]
    run_one(target, target.mutant(program))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)


@pytest.mark.slow
@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["spiffeID", "csr", "audience", "ttlSeconds", "x"]), _JSON))
def test_any_json_object_gets_a_client_answer(fields: dict[str, object]) -> None:
    for name in ("x509_request", "jwt_request"):
        run_one(shared_server_targets()[name], json.dumps(fields).encode())


def test_seeds_are_accepted_and_the_checks_can_fail() -> None:
    targets = shared_server_targets()
    for name in NAMES:
        assert [run_one(targets[name], seed) for seed in targets[name].seeds] == ["accepted"] * len(
            targets[name].seeds), name
    assert run_one(targets["x509_request"], b'{"spiffeID": "spiffe://example.org/other/x"}') == "rejected"
    assert run_one(targets["http_request"], b"BREW /pot HTCPCP/1.0\r\n\r\n") == "rejected"
    with pytest.raises(ServerCrash, match="not HTTP"):
        from fuzz.server import _statuses

        _statuses(b"Traceback (most recent call last):\r\n\r\n")


def test_regression_csr_with_an_unknown_key_algorithm() -> None:
    """A CSR whose key names an algorithm cryptography does not know (id-ecPublicKey with its first arc changed)
    made the signature check raise UnsupportedAlgorithm: the API answered 500. Now a 400 like any bad CSR."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from keyseal._internal.ca.issuance.x509svid import CsrError, parse_csr

    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    der = request.public_bytes(serialization.Encoding.DER)
    id_ec_public_key = bytes.fromhex("2a8648ce3d0201")
    assert der.count(id_ec_public_key) == 1
    damaged = der.replace(id_ec_public_key, bytes.fromhex("2b8648ce3d0201"))
    text = base64.b64encode(damaged).decode()
    with pytest.raises(CsrError, match="does not accept"):
        parse_csr(text)
    body = json.dumps({"spiffeID": "spiffe://example.org/ns/a/web", "csr": text}).encode()
    assert run_one(shared_server_targets()["x509_request"], body) == "rejected"


@pytest.mark.parametrize("name", ["x509_request", "jwt_request"])
def test_regression_a_huge_ttl_is_the_limit(name: str) -> None:
    """`ttlSeconds` beyond what a timedelta holds raised OverflowError: a 500. A TTL only ever shortens the
    server's limit, so any value above it is the limit."""
    target = shared_server_targets()[name]
    fields = json.loads(target.seeds[0])
    for ttl in (10**30, 2**63, 86_400 * 10**6):
        assert run_one(target, json.dumps({**fields, "ttlSeconds": ttl}).encode()) == "accepted"


def test_entry_ttls_are_bounded(tmp_path: object) -> None:
    from pathlib import Path

    from keyseal._internal.ca.config import parse_config
    from keyseal._internal.ca.registry.entries import MAX_ENTRY_TTL
    from keyseal._internal.ca.registry.stores import entry_store_for
    from keyseal.errors import UsageError

    work = Path(str(tmp_path))
    config = parse_config({"trustDomain": "example.org", "keyWrapping": {"provider": "local", "local": {
        "kekFile": str(work / "kek")}}, "store": {"type": "directory", "directory": {"path": str(work / "store")}}})
    store = entry_store_for(config)
    parent = "spiffe://example.org/keyseal/agent/node-1"
    with pytest.raises(UsageError, match="at most"):
        store.create("spiffe://example.org/ns/a/web", parent, ("unix:uid:1000",), x509_ttl=10**30)
    store.create("spiffe://example.org/ns/a/web", parent, ("unix:uid:1000",), x509_ttl=MAX_ENTRY_TTL)


def test_regression_csr_version_and_lone_surrogates() -> None:
    """Two more 500s the long fuzz run found: a CSR whose version is not 0 (cryptography's InvalidVersion is not
    a ValueError), and a JSON string holding a lone surrogate (`\\udfff`), which str.encode refused."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from keyseal._internal.ca.issuance.x509svid import CsrError, parse_csr

    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    der = request.public_bytes(serialization.Encoding.DER)
    version_0 = der.index(b"\x02\x01\x00")  # the first INTEGER: CertificationRequestInfo.version
    damaged = der[:version_0] + b"\x02\x01\x02" + der[version_0 + 3:]
    with pytest.raises(CsrError, match="not a PKCS#10"):
        parse_csr(base64.b64encode(damaged).decode())
    for name, extra in (("jwt_request", '"audience": "db"'), ("x509_request", '"csr": "x"')):
        body = ('{"spiffeID": "spiffe://example.org/ns/\\udfff", ' + extra + "}").encode()
        assert run_one(shared_server_targets()[name], body) == "rejected"


@pytest.mark.parametrize("length", [b"\xb2", b"\xb9\xb2", b"+5", b"1_0", b"", b"0x10"])
def test_regression_a_content_length_of_other_than_ascii_digits_is_400(length: bytes) -> None:
    """`Content-Length: ²` (Latin-1 0xB2): str.isdigit() took it and int() did not, so the reader raised ValueError
    (the listener logged a traceback and closed the connection without an answer). Now a 400, as is anything
    int() would read that is not plain ASCII digits."""
    from keyseal.errors import KeysealError

    request = b"POST /v1/jwt-svid HTTP/1.1\r\nHost: keyseal\r\nContent-Length: " + length + b"\r\n\r\n{}"
    with pytest.raises(KeysealError, match=r"refused \(\[400\]\)"):
        shared_server_targets()["http_request"].run(request)
    assert run_one(shared_server_targets()["http_request"], request) == "rejected"
