"""The HTTPS API end to end: one server (wrapped custody, AWS KMS KEK on the emulator, directory store) on
127.0.0.1 for the module, real TLS clients, and independent verifiers of everything it issues."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.server import CaServer
from tests.conftest import REGION
from tests.harness.ca import (
    TOKENS,
    TRUST_DOMAIN,
    Client,
    base_config,
    chain_of,
    make_csr,
    new_key,
    openssl_verify,
    pkcs8_pem,
    verify_jwt_svid,
    verify_x509_svid,
)
from tests.harness.kms_emulator import KmsEmulator

A = f"spiffe://{TRUST_DOMAIN}/ns/a/workload"
B = f"spiffe://{TRUST_DOMAIN}/ns/b/workload"


def _client_pki(tmp: Path) -> dict[str, Any]:
    """A CA for TLS client certificates and two clients: one known by fingerprint, one by URI SAN."""
    now = datetime.now(UTC)
    ca_key = new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (tmp / "client-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    result: dict[str, Any] = {"ca": tmp / "client-ca.pem"}
    for name, uri in (("by-hash", None), ("by-uri", "spiffe://clients.example/agent"), ("stranger", None)):
        key = new_key()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1)))
        if uri:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                                            critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{name}.key").write_bytes(pkcs8_pem(key))
        result[name] = (tmp / f"{name}.pem", tmp / f"{name}.key",
                        hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())
    return result


@pytest.fixture(scope="module")
def server(kms_emulator: KmsEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    tmp = tmp_path_factory.mktemp("server-api")
    env = {"AWS_ACCESS_KEY_ID": "server-api", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": REGION,
           "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp / "absent"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "absent")}
    admin = boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    arn = admin.create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"]
    pki = _client_pki(tmp)
    data = base_config(tmp, keyWrapping={"provider": "awskms"},
                       aws={"kmsKeyARN": arn, "endpoints": {"kms": kms_emulator.endpoint}})
    data["server"]["tls"] = {"clientCAFile": str(pki["ca"])}
    data["clients"] += [
        {"name": "agent-by-hash", "certSHA256": pki["by-hash"][2], "allowedPathPrefixes": ["/ns/a"]},
        {"name": "agent-by-uri", "certURI": "spiffe://clients.example/agent", "allowedPathPrefixes": ["/ns/b"]},
    ]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        kms_emulator.calls.clear()
        instance = CaServer(parse_config(data))
        instance.start()
        instance.startup_kms = kms_emulator.calls.counts()  # type: ignore[attr-defined]
        instance.start_background()
        instance.pki = pki  # type: ignore[attr-defined]
        instance.tmp = tmp  # type: ignore[attr-defined]
        yield instance
        instance.shutdown()


@pytest.fixture
def client(server: CaServer) -> Iterator[Client]:
    connection = Client(server.port, server.manager.active().ca_pem, token=TOKENS["ns-a"])
    yield connection
    connection.close()


@pytest.mark.slow
def test_bundle_is_public_and_well_formed(server: CaServer) -> None:
    anonymous = Client(server.port, server.manager.active().ca_pem)
    bundle = anonymous.bundle()
    anonymous.close()
    assert [k["use"] for k in bundle["keys"]] == ["x509-svid", "jwt-svid"]
    assert bundle["spiffe_sequence"] == 2
    assert bundle["spiffe_refresh_hint"] == 300


def test_x509_svid(server: CaServer, client: Client, tmp_path: Path) -> None:
    key = new_key()
    status, body = client.x509_svid(A, key)
    assert status == 200, body
    assert body["spiffeID"] == A and body["keyset"] == 1
    bundle = client.bundle()
    now = datetime.now(UTC)
    verify_x509_svid(body, key, bundle, now)
    result = openssl_verify(tmp_path, body["certChain"][0], bundle)
    assert result.returncode == 0, result.stdout + result.stderr
    leaf = chain_of(body)[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=1, seconds=10)
    assert body["expiresAt"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_shorter_ttl_on_request(client: Client) -> None:
    status, body, _ = client.request("POST", "/v1/x509-svid", {"spiffeID": A, "csr": make_csr(), "ttlSeconds": 60})
    assert status == 200, body
    leaf = chain_of(body)[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(seconds=70)
    status, body, _ = client.request("POST", "/v1/jwt-svid", {"spiffeID": A, "audience": "x", "ttlSeconds": 86400})
    assert status == 200  # a longer TTL than configured is capped, not refused
    assert datetime.strptime(body["expiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) <= \
        datetime.now(UTC) + timedelta(minutes=5, seconds=2)


def test_jwt_svid(client: Client) -> None:
    status, body = client.jwt_svid(A, ["https://db.example.org", "audit"])
    assert status == 200, body
    svid = verify_jwt_svid(body["token"], client.bundle(), {"https://db.example.org"})
    assert str(svid.spiffe_id) == A
    assert set(svid.audience) == {"https://db.example.org", "audit"}


def test_no_token_is_401_and_logged(server: CaServer, caplog: pytest.LogCaptureFixture) -> None:
    anonymous = Client(server.port, server.manager.active().ca_pem)
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.http.api"):
        status, body, headers = anonymous.request("POST", "/v1/x509-svid", {"spiffeID": A, "csr": make_csr()})
        status_jwt, _, _ = anonymous.request("POST", "/v1/jwt-svid", {"spiffeID": A, "audience": "x"})
    anonymous.close()
    assert (status, status_jwt) == (401, 401)
    assert body["error"] == "unauthenticated"
    assert headers["www-authenticate"].startswith("Bearer")
    assert any("not authenticated (no credentials)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("authorization", ["Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer", "token-for-a"])
def test_bad_credentials_are_401(client: Client, authorization: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.http.api"):
        status, body, _ = client.request("POST", "/v1/x509-svid", {"spiffeID": A, "csr": make_csr()}, token="",
                                         headers={"Authorization": authorization})
    assert status == 401, body
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "not authenticated" in messages and "wrong-token" not in messages


def test_token_for_ns_a_asking_for_ns_b_is_403_and_logged(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.http.api"):
        status, body = client.x509_svid(B)
        status_jwt, _ = client.jwt_svid(B, "x")
        status_sibling, _ = client.x509_svid(f"spiffe://{TRUST_DOMAIN}/ns/ab")  # not below /ns/a
    assert (status, status_jwt, status_sibling) == (403, 403, 403)
    assert body == {"error": "forbidden", "message": f"client ns-a may not obtain an SVID for {B}"}
    assert any("client ns-a asked for " + B in r.getMessage() for r in caplog.records)
    assert client.x509_svid(B, token=TOKENS["admin"])[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"spiffeID": A, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----"},
         "not a PKCS#10"),
        ({"spiffeID": A, "csr": "not base64 !"}, "not a PKCS#10"),
        ({"spiffeID": A}, "csr is missing"),
        ({"spiffeID": "spiffe://other.org/ns/a/w", "csr": "x"}, "not in trust domain example.org"),
        ({"spiffeID": "spiffe://example.org/ns/a/../b", "csr": "x"}, "'.' and '..'"),
        ({"spiffeID": "https://example.org/ns/a", "csr": "x"}, "must start with spiffe://"),
        ({"spiffeID": "spiffe://example.org", "csr": "x"}, "needs a path"),
        ({"csr": "x"}, "missing SPIFFE ID"),
        ({"spiffeID": A, "csr": "x", "spiffe_id": A}, "unknown field 'spiffe_id'"),
        ({"spiffeID": A, "csr": "x", "ttlSeconds": -1}, "ttlSeconds must be a positive"),
        (b"{not json", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 20_000 + b"]" * 20_000, "not a JSON object"),  # nesting deeper than the parser's recursion
    ],
)
def test_bad_requests_are_400(client: Client, body: Any, needle: str) -> None:
    status, answer, _ = client.request("POST", "/v1/x509-svid", body)
    assert status == 400, answer
    assert answer["error"] == "bad_request"
    assert needle in answer["message"]


def test_bad_jwt_requests_are_400(client: Client) -> None:
    for body in ({"spiffeID": A}, {"spiffeID": A, "audience": []}, {"spiffeID": A, "audience": ["a", "a"]}):
        status, answer, _ = client.request("POST", "/v1/jwt-svid", body)
        assert status == 400, answer


def test_unknown_route_and_method(client: Client) -> None:
    assert client.request("GET", "/v2/bundle")[0] == 404
    status, _, headers = client.request("GET", "/v1/x509-svid")
    assert status == 405 and headers["allow"] == "POST"
    assert client.request("POST", "/v1/bundle", {})[0] == 405


def test_body_too_large_is_413(server: CaServer) -> None:
    connection = Client(server.port, server.manager.active().ca_pem, token=TOKENS["ns-a"])
    status, _, _ = connection.request("POST", "/v1/x509-svid", b"{" + b" " * (70 * 1024) + b"}")
    connection.close()
    assert status == 413


def test_health_ready_metrics(server: CaServer, client: Client) -> None:
    assert client.request("GET", "/healthz")[:2] == (200, {"status": "ok"})
    assert client.request("GET", "/readyz")[:2] == (200, {"status": "ready"})
    client.x509_svid(A)
    client.jwt_svid(A, "x")
    client.x509_svid(B)  # 403
    status, text, headers = client.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("keyseal_svids_issued_total", (("type", "x509"),))] >= 1
    assert samples[("keyseal_svids_issued_total", (("type", "jwt"),))] >= 1
    assert samples[("keyseal_errors_total", (("reason", "forbidden"),))] >= 1
    assert samples[("keyseal_keyset_state", (("keyset", "1"), ("state", "active")))] == 1
    assert samples[("keyseal_bundle_sequence", ())] == 2
    assert samples[("keyseal_kms_calls_total", (("operation", "Decrypt"),))] >= 1  # the startup canary


def test_mtls_clients(server: CaServer) -> None:
    pki = server.pki  # type: ignore[attr-defined]
    ca_pem = server.manager.active().ca_pem
    by_hash = Client(server.port, ca_pem, client_cert=pki["by-hash"][:2])
    assert by_hash.x509_svid(A)[0] == 200
    assert by_hash.x509_svid(B)[0] == 403
    by_hash.close()
    by_uri = Client(server.port, ca_pem, client_cert=pki["by-uri"][:2])
    assert by_uri.x509_svid(B)[0] == 200
    assert by_uri.jwt_svid(A, "x")[0] == 403
    by_uri.close()
    stranger = Client(server.port, ca_pem, client_cert=pki["stranger"][:2])
    assert stranger.x509_svid(A)[0] == 401
    stranger.close()


def test_serving_certificate_is_an_svid_of_the_server(server: CaServer) -> None:
    import socket
    import ssl

    context = ssl.create_default_context(cadata=server.manager.active().ca_pem)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}/keyseal/server"]


@pytest.mark.slow
def test_thousand_svids_make_no_kms_call(server: CaServer, client: Client, kms_emulator: KmsEmulator) -> None:
    startup = server.startup_kms  # type: ignore[attr-defined]
    assert startup["Encrypt"] >= 1 and startup["Decrypt"] >= 1  # the emulator does see this server's calls
    key = new_key()
    csr = make_csr(key)
    kms_emulator.calls.clear()
    started = time.monotonic()
    for index in range(1000):
        status, body, _ = client.request("POST", "/v1/x509-svid", {"spiffeID": f"{A}/{index}", "csr": csr})
        assert status == 200, body
    for _ in range(20):
        assert client.jwt_svid(A, "x")[0] == 200
    elapsed = time.monotonic() - started
    assert kms_emulator.calls.counts() == {}, kms_emulator.calls.counts()  # counted by the KMS server itself
    verify_x509_svid(body, key, client.bundle(), datetime.now(UTC))
    assert elapsed < 120


def raw_exchange(server: CaServer, request: bytes) -> bytes:
    """Send bytes as they are over TLS and read the answer until the server closes or 2 s pass."""
    import socket
    import ssl

    context = ssl.create_default_context(cadata=server.manager.active().ca_pem)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(request)
        tls.settimeout(2)
        answer = b""
        for _ in range(100):
            try:
                chunk = tls.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            answer += chunk
    return answer


def test_http_edge_cases(server: CaServer) -> None:
    token = TOKENS["ns-a"]
    body = b'{"spiffeID": "%s", "audience": "x"}' % A.encode()
    twice = (b"POST /v1/jwt-svid HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() +
             b"\r\nAuthorization: Bearer other\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert raw_exchange(server, twice).startswith(b"HTTP/1.1 400")
    chunked = b"POST /v1/jwt-svid HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert raw_exchange(server, chunked).startswith(b"HTTP/1.1 411")
    assert raw_exchange(server, b"GET /healthz\r\n\r\n").startswith(b"HTTP/1.1 400")
    continued = (b"POST /v1/jwt-svid HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    answer = raw_exchange(server, continued)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"), answer[:80]
    started = time.monotonic()
    assert raw_exchange(server, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < 1.5  # HTTP/1.0 without keep-alive: the server closed the connection


def test_issued_svids_are_audited(server: CaServer, client: Client, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each SVID signature is one audit record naming the SPIFFE ID and the digest of what the CA key signed."""
    from keyseal._internal import audit
    from keyseal._internal.ca.issuance import signing_audit

    log_path = tmp_path / "server-audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log_path))
    signing_audit.configure_from_environment()
    try:
        status, body = client.x509_svid(A, new_key())
        assert status == 200, body
        status_jwt, jwt_body = client.jwt_svid(A, ["https://db.example.org"])
        assert status_jwt == 200, jwt_body
    finally:
        monkeypatch.setenv("KEYSEAL_AUDIT_LOG", "off")
        signing_audit.configure_from_environment()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["purpose"] for line in lines] == ["x509-svid", "jwt-svid"]
    assert {line["subject"] for line in lines} == {A}
    assert all(line["outcome"] == "ok" for line in lines)
    leaf = chain_of(body)[0]
    assert lines[0]["digest"] == hashlib.new(lines[0]["hash"], leaf.tbs_certificate_bytes).hexdigest()
    signing_input = jwt_body["token"].rsplit(".", 1)[0].encode()
    assert lines[1]["digest"] == hashlib.new(lines[1]["hash"], signing_input).hexdigest()
    assert audit.verify_log(log_path).lines == 2


def test_server_audit_file_carries_checkpoints_signed_by_the_ca_key(server: CaServer, client: Client,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA key that signs SVIDs signs the audit file's checkpoints: they verify against the CA certificate."""
    from cryptography.hazmat.primitives import serialization

    from keyseal._internal import audit
    from keyseal._internal.audit.checkpoint import load_keys
    from keyseal._internal.ca.issuance import signing_audit

    log_path = tmp_path / "server-audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log_path))
    monkeypatch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "3")
    signing_audit.configure_from_environment()
    try:
        for _ in range(5):
            status, body = client.x509_svid(A, new_key())
            assert status == 200, body
    finally:
        monkeypatch.setenv("KEYSEAL_AUDIT_LOG", "off")
        signing_audit.configure_from_environment()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line.get("kind") for line in lines] == [None, None, "checkpoint", None, None, "checkpoint", None]
    ca = tmp_path / "ca.pem"
    active = server.manager.active_keyset()
    assert active is not None
    ca.write_bytes(active.ca_certificate.public_bytes(serialization.Encoding.PEM))
    report = audit.verify_log(log_path, keys=load_keys([ca]))
    assert (report.checkpoints, report.after_last_checkpoint) == (2, 1)
