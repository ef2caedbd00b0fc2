"""Agent -> server authentication by mutual TLS with the agent's own X.509-SVID, over real TLS connections
(python ssl + http.client) to the server the harness starts: what is accepted, and every way it is refused."""

from __future__ import annotations

import http.client
import os
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import WorkloadApiClient

from keyseal._internal.ca.issuance.x509svid import issue_x509_svid
from keyseal._internal.ca.registry.stores import join_tokens_for
from keyseal._internal.ca.server import CaServer
from keyseal._internal.spiffe.ids import SpiffeId
from tests.harness.agent import AGENT_ID, agent_call, post, start_agent, start_server, tls_context
from tests.harness.ca import TOKENS, TRUST_DOMAIN, Client, FakeClock, make_csr, new_key, pkcs8_pem

AGENT_PATHS = ("/v1/agent/sync", "/v1/agent/renew", "/v1/agent/x509-svid", "/v1/agent/jwt-svid")
TLS_REFUSED = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)


class ShiftedClock:
    """The server's injected clock: real time plus an offset the test sets (OpenSSL keeps real time)."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


class ForeignCa:
    """A CA that is not the trust domain's: it can sign a certificate with any SPIFFE ID."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.key = new_key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        self.path = tmp / f"{name}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, uri: str, *, server_ip: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = new_key()
        now = datetime.now(UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        if server_ip:
            import ipaddress

            names.append(x509.IPAddress(ipaddress.ip_address(server_ip)))
        certificate = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        return key, certificate


def _ca_pem(server: CaServer) -> str:
    return "".join(k.ca_pem for k, _ in server.manager.live())


def _join(server: CaServer, name: str = "node-1", trust: str = "") -> tuple[ec.EllipticCurvePrivateKey,
                                                                            x509.Certificate]:
    token, _ = join_tokens_for(server.config).issue(name, timedelta(minutes=5))
    key = new_key()
    status, answer = agent_call(server, None, "/v1/agent/join", {"token": token, "csr": make_csr(key)},
                                trust=trust)
    assert status == 200, answer
    return key, x509.load_pem_x509_certificate(answer["certChain"][0].encode())


def _refused(server: CaServer, identity: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], path: str,
             trust: str = "") -> str:
    """'handshake' or '401'; anything else fails the test."""
    try:
        status, answer = agent_call(server, identity, path, trust=trust)
    except TLS_REFUSED:
        return "handshake"
    assert status == 401, (status, answer)
    assert answer["error"] == "unauthenticated"
    return "401"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ForeignCa]:
    tmp = tmp_path_factory.mktemp("foreign-pki")
    return {"listed": ForeignCa(tmp, "listed-client-ca"), "unknown": ForeignCa(tmp, "unknown-ca")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, ForeignCa]) -> Iterator[CaServer]:
    """The server trusts, for client certificates, its own CAs and (server.tls.clientCAFile) the 'listed' CA."""
    tmp = tmp_path_factory.mktemp("agent-mtls")
    server = start_server(tmp, server={"listen": "127.0.0.1:0", "tls": {"clientCAFile": str(pki["listed"].path)}})
    yield server
    server.shutdown()


def test_agent_svid_on_the_connection_is_the_agent(server: CaServer) -> None:
    identity = _join(server)
    status, answer = agent_call(server, identity, "/v1/agent/sync")
    assert status == 200 and answer["agentID"] == AGENT_ID
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=tls_context(server, identity),
                                             timeout=10)
    try:
        key = new_key()  # renewal over mTLS with the current SVID
        status, renewed = post(connection, "/v1/agent/renew", {"csr": make_csr(key)})
        assert status == 200 and renewed["spiffeID"] == AGENT_ID
    finally:
        connection.close()
    new_identity = (key, x509.load_pem_x509_certificate(renewed["certChain"][0].encode()))
    assert agent_call(server, new_identity, "/v1/agent/sync")[0] == 200


def test_no_client_certificate_is_401_and_token_clients_still_work(server: CaServer) -> None:
    for path in AGENT_PATHS:
        status, answer = agent_call(server, None, path)
        assert status == 401 and "client certificate" in answer["message"], (path, answer)
    client = Client(server.port, _ca_pem(server), token=TOKENS["ns-a"])  # CERT_OPTIONAL: no certificate needed
    try:
        assert client.x509_svid(f"spiffe://{TRUST_DOMAIN}/ns/a/web")[0] == 200
        assert client.bundle()["keys"]
    finally:
        client.close()


def test_certificate_from_another_ca_is_refused(server: CaServer, pki: dict[str, ForeignCa]) -> None:
    other_domain = pki["unknown"].issue("spiffe://other.example/keyseal/agent/node-1")
    assert _refused(server, other_domain, "/v1/agent/sync") == "handshake"  # a CA the server does not know
    spoofed = pki["unknown"].issue(AGENT_ID)
    assert _refused(server, spoofed, "/v1/agent/sync") == "handshake"
    # A CA the handshake trusts (server.tls.clientCAFile, for API clients) cannot make agents: the agent
    # endpoints verify the certificate again against the trust domain's live keysets.
    listed = pki["listed"].issue(AGENT_ID)
    for path in AGENT_PATHS:
        assert _refused(server, listed, path) == "401"


def test_workload_svid_of_the_trust_domain_is_not_an_agent(server: CaServer) -> None:
    key = new_key()
    client = Client(server.port, _ca_pem(server), token=TOKENS["admin"])
    try:
        status, answer = client.x509_svid(f"spiffe://{TRUST_DOMAIN}/ns/a/web", key)
        assert status == 200
        for reserved in ("/keyseal/agent/node-1", "/keyseal/agent/node-1/extra", "/keyseal/server", "/keyseal"):
            status, refused = client.x509_svid(f"spiffe://{TRUST_DOMAIN}{reserved}", key)  # even for a client
            assert status == 403, refused  # allowed every path: these IDs are the server's and its agents'
            assert "reserved" in refused["message"]
    finally:
        client.close()
    keyset = server.manager.active()  # a certificate the token API would not issue, made here to test the check
    nested = issue_x509_svid(keyset, SpiffeId(TRUST_DOMAIN, "/keyseal/agent/node-1/extra"), key.public_key(),
                             server.manager.clock(), timedelta(minutes=5))
    workload = (key, x509.load_pem_x509_certificate(answer["certChain"][0].encode()))
    for identity in (workload, (key, nested)):
        assert _refused(server, identity, "/v1/agent/sync") == "401"


def test_expired_agent_svid_is_refused(tmp_path: Path) -> None:
    """Expired on the server's clock (OpenSSL, on real time, still accepts it): 401, also on a connection opened
    while it was valid. Expired in real time: the handshake fails."""
    clock = ShiftedClock(-timedelta(hours=2))
    server = start_server(tmp_path, clock=clock, x509SVID={"ttl": "3h"})
    try:
        identity = _join(server)  # valid from 2 h ago (server clock) to 1 h from now
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=tls_context(server, identity),
                                                 timeout=10)
        try:
            assert post(connection, "/v1/agent/sync", {})[0] == 200
            clock.offset = identity[1].not_valid_after_utc - datetime.now(UTC) + timedelta(seconds=1)
            status, answer = post(connection, "/v1/agent/sync", {})  # the same, kept-alive connection
            assert status == 401 and answer["error"] == "unauthenticated"
        finally:
            connection.close()
        assert _refused(server, identity, "/v1/agent/renew") == "401"
        clock.offset = -timedelta(hours=2)
        keyset = server.manager.active()
        key = new_key()
        old = issue_x509_svid(keyset, SpiffeId(TRUST_DOMAIN, "/keyseal/agent/node-1"), key.public_key(),
                              keyset.not_before + timedelta(minutes=1), timedelta(minutes=1))
        assert old.not_valid_after_utc < datetime.now(UTC)
        assert _refused(server, (key, old), "/v1/agent/sync") == "handshake"
    finally:
        server.shutdown()


def test_agent_with_a_serving_certificate_from_files(tmp_path: Path, pki: dict[str, ForeignCa]) -> None:
    """server.tls.certFile/keyFile (e.g. cert-manager): the agent verifies the server with its bootstrap bundle
    (that CA) also after the trust domain's bundle arrives, and the server still takes the agent's SVID."""
    key, certificate = pki["listed"].issue("spiffe://example.org/keyseal/server", server_ip="127.0.0.1")
    (tmp_path / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = start_server(tmp_path, server={"listen": "127.0.0.1:0", "tls": {
        "certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")}})
    node = start_agent(server, tmp_path, bundle_pem=pki["listed"].path.read_text())
    try:
        node.entry("/ns/a/files", f"unix:uid:{os.getuid()}")
        node.agent.cache.sync()
        node.agent.cache.sync(renew_agent=True)
        node.agent.cache.sync()
        assert node.agent.cache.server_reachable and node.agent.cache.sync_failures == 0
        with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/a/files"
    finally:
        node.stop()
        server.shutdown()


def _authority_change_applies(server: CaServer, ca: ForeignCa, trust: str = "") -> None:
    """A CA added to the authorities the server gets from its keysets is trusted at the handshake at once (the
    agent endpoints then refuse it: it is no live keyset's), and no longer once it is gone again."""
    identity = ca.issue(AGENT_ID)
    live = [k.ca_certificate for k, _ in server.manager.live()]
    active = server.manager.active()
    assert _refused(server, identity, "/v1/agent/sync", trust) == "handshake"
    try:
        assert server.tls.renew(active, server.clock(), [*live, ca.certificate])
        assert _refused(server, identity, "/v1/agent/sync", trust) == "401"
        assert agent_call(server, _join(server, "node-ctx", trust), "/v1/agent/sync", trust=trust)[0] == 200
    finally:
        assert server.tls.renew(active, server.clock(), live)
    assert _refused(server, identity, "/v1/agent/sync", trust) == "handshake"
    assert not server.tls.renew(active, server.clock(), live)  # nothing changed, nothing rebuilt


@pytest.mark.slow
def test_tls_context_follows_the_live_authorities(tmp_path: Path) -> None:
    """Both with a self-issued serving certificate and with certificate files."""
    rotated_in = ForeignCa(tmp_path, "rotated-in")
    server = start_server(tmp_path / "self-issued")
    try:
        _authority_change_applies(server, rotated_in)
    finally:
        server.shutdown()
    serving = ForeignCa(tmp_path, "serving-ca")
    key, certificate = serving.issue("spiffe://example.org/keyseal/server", server_ip="127.0.0.1")
    (tmp_path / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    files = start_server(tmp_path / "files", server={"listen": "127.0.0.1:0", "tls": {
        "certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")}})
    try:
        _authority_change_applies(files, rotated_in, serving.path.read_text())
    finally:
        files.shutdown()


def test_an_api_client_certificate_is_checked_on_every_request(tmp_path: Path, pki: dict[str, ForeignCa]) -> None:
    """An API client known by its TLS certificate (not an agent): OpenSSL checked it once, at the handshake, on
    real time; a kept-alive connection went on getting SVIDs after the certificate expired. Now its validity is
    checked per request, on the server's clock."""
    uri = "spiffe://clients.example/ci"
    key, certificate = pki["listed"].issue(uri)
    (tmp_path / "ci.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ci.key").write_bytes(pkcs8_pem(key))
    clock = FakeClock(datetime.now(UTC))
    server = start_server(tmp_path, clock=clock,
                          server={"listen": "127.0.0.1:0", "tls": {"clientCAFile": str(pki["listed"].path)}},
                          clients=[{"name": "ci", "certURI": uri, "allowedPathPrefixes": ["/ns/ci"]}])
    client = Client(server.port, _ca_pem(server), client_cert=(tmp_path / "ci.pem", tmp_path / "ci.key"))
    workload = f"spiffe://{TRUST_DOMAIN}/ns/ci/job"
    try:
        assert client.x509_svid(workload)[0] == 200
        socket_before = client.connection.sock
        clock.set(certificate.not_valid_after_utc + timedelta(seconds=1))
        status, answer = client.x509_svid(workload)  # the same, kept-alive connection
        assert client.connection.sock is socket_before
        assert status == 401 and "not valid" in answer["message"], answer
        clock.set(certificate.not_valid_before_utc - timedelta(seconds=1))
        assert client.x509_svid(workload)[0] == 401
        clock.set(certificate.not_valid_after_utc - timedelta(minutes=1))
        assert client.x509_svid(workload)[0] == 200
    finally:
        client.close()
        server.shutdown()
