"""Helpers for the trust-domain server tests: an injectable clock, CSRs, an HTTPS client with keep-alive, and
independent verifiers of what the server issues (the PyPI `spiffe` package, `cryptography.x509.verification`,
and `openssl verify`)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Svid

TRUST_DOMAIN = "example.org"
TOKENS = {"ns-a": "token-for-namespace-a-0123456789", "admin": "token-for-everything-9876543210"}
START = datetime(2030, 1, 1, tzinfo=UTC)


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


class FakeClock:
    """The server's injected clock: time moves only when a test says so."""

    def __init__(self, start: datetime = START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now

    def set(self, moment: datetime) -> None:
        with self._lock:
            self._now = moment


def base_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A wrapped-custody config on a directory store with a local KEK, listening on 127.0.0.1 (any port)."""
    config: dict[str, Any] = {
        "trustDomain": TRUST_DOMAIN,
        "keyWrapping": {"provider": "local", "local": {"kekFile": str(tmp / "kek")}},
        "store": {"type": "directory", "directory": {"path": str(tmp / "store"),
                                                      "ledgerFile": str(tmp / "seen-versions.json")}},
        "server": {"listen": "127.0.0.1:0"},
        "clients": [
            {"name": "ns-a", "tokenSHA256": sha256_hex(TOKENS["ns-a"]), "allowedPathPrefixes": ["/ns/a"]},
            {"name": "admin", "tokenSHA256": sha256_hex(TOKENS["admin"]), "allowedPathPrefixes": ["/"]},
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: Any = None) -> str:
    key = key or new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def pkcs8_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


class Client:
    """One keep-alive HTTPS connection to the server, verifying it against `ca_pem` (or not at all)."""

    def __init__(self, port: int, ca_pem: str | None, token: str | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        if ca_pem is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cadata=ca_pem)
        if client_cert is not None:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        self.token = token

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        sent = dict(headers or {})
        bearer = token if token is not None else self.token
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent["Content-Type"] = "application/json"
        self.connection.request(method, path, body=data, headers=sent)
        response = self.connection.getresponse()
        raw = response.read()
        kind = response.getheader("Content-Type", "")
        parsed = json.loads(raw) if kind.startswith("application/json") else raw.decode()
        return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}

    def x509_svid(self, spiffe_id: str, key: Any = None, token: str | None = None) -> tuple[int, Any]:
        status, body, _ = self.request("POST", "/v1/x509-svid", {"spiffeID": spiffe_id, "csr": make_csr(key)},
                                       token=token)
        return status, body

    def jwt_svid(self, spiffe_id: str, audience: Any, token: str | None = None) -> tuple[int, Any]:
        status, body, _ = self.request("POST", "/v1/jwt-svid", {"spiffeID": spiffe_id, "audience": audience},
                                       token=token)
        return status, body

    def bundle(self) -> dict[str, Any]:
        status, body, _ = self.request("GET", "/v1/bundle")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    def close(self) -> None:
        self.connection.close()


# -- reading and verifying what the server issues -------------------------------------------------------------


def bundle_authorities(bundle: dict[str, Any]) -> list[x509.Certificate]:
    """The X.509 authorities of a SPIFFE bundle (the x5c of every x509-svid key)."""
    certs = []
    for key in bundle["keys"]:
        if key["use"] == "x509-svid":
            assert len(key["x5c"]) == 1
            certs.append(x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0])))
    return certs


def bundle_pem(bundle: dict[str, Any]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle_authorities(bundle))


def jwt_bundle(bundle: dict[str, Any]) -> JwtBundle:
    """The spiffe package's JwtBundle from the jwt-svid keys of our bundle."""
    keys = [{k: v for k, v in key.items() if k != "use"} for key in bundle["keys"] if key["use"] == "jwt-svid"]
    return JwtBundle.parse(TrustDomain(TRUST_DOMAIN), json.dumps({"keys": keys}).encode())


def chain_of(body: dict[str, Any]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(pem.encode()) for pem in body["certChain"]]


def verify_x509_svid(body: dict[str, Any], key: Any, bundle: dict[str, Any], at: datetime) -> X509Svid:
    """The spiffe package parses the SVID with its key (SPIFFE leaf rules); cryptography's verifier builds the
    chain to the bundle's authorities at time `at` and checks the SPIFFE ID."""
    chain_pem = "".join(body["certChain"]).encode()
    svid = X509Svid.parse(chain_pem, pkcs8_pem(key))
    assert str(svid.spiffe_id) == body["spiffeID"]
    chain = chain_of(body)
    verifier = (PolicyBuilder().store(Store(bundle_authorities(bundle))).time(at)
                .build_client_verifier())
    verified = verifier.verify(chain[0], chain[1:])
    uris = [san for san in verified.subjects if isinstance(san, x509.UniformResourceIdentifier)]
    assert [u.value for u in uris] == [body["spiffeID"]]
    return svid


def verify_jwt_svid(token: str, bundle: dict[str, Any], audience: set[str]) -> JwtSvid:
    return JwtSvid.parse_and_validate(token, jwt_bundle(bundle), audience)


def openssl_verify(tmp: Path, leaf_pem: str, bundle: dict[str, Any], at: datetime | None = None
                   ) -> subprocess.CompletedProcess[str]:
    """`openssl verify` of the leaf against the bundle's authorities (at a given time if asked)."""
    ca_file, leaf_file = tmp / "bundle.pem", tmp / "leaf.pem"
    ca_file.write_bytes(bundle_pem(bundle))
    leaf_file.write_text(leaf_pem)
    args = ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(ca_file)]
    if at is not None:
        args += ["-attime", str(int(at.timestamp()))]
    return subprocess.run([*args, str(leaf_file)], capture_output=True, text=True, timeout=60, check=False)


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def later(moment: datetime, **delta: float) -> datetime:
    return moment + timedelta(**delta)
