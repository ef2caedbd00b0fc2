"""A node's first trust bundle without a copy from the server's host: fetch `/v1/bundle` and keep it only if a CA
in it has the SHA-256 fingerprint the server printed at start-up (trust on first use, with a pin, as kubeadm's
`--discovery-token-ca-cert-hash`).

The pin is the SHA-256 of the CA certificate's DER (what `openssl x509 -noout -fingerprint -sha256` prints), so
anyone can check it independently. The first fetch cannot verify TLS (there is no trust yet); a second fetch
trusts only the pinned CA, which proves the server holds a serving certificate from it: only then is the whole
served bundle (the next and the previous CA too) kept. A server with a serving certificate from files (not from
its CA) cannot prove that, and only the pinned CA is kept.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyseal._internal.spiffe.tls import not_the_server
from keyseal.errors import BackendUnavailableError, InputError, UsageError, VerificationError

__all__ = ["FetchedBundle", "ca_fingerprint", "fetch_bundle", "parse_fingerprint"]

TIMEOUT = 10.0
_MAX_BUNDLE = 1 << 20
_HEX = re.compile(r"[0-9a-f]{64}")


def ca_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def parse_fingerprint(text: str) -> str:
    """`sha256:AB:CD...`, `AB:CD...` or plain hex, as 64 lower-case hex digits."""
    value = text.strip().lower().removeprefix("sha256:").removeprefix("sha256=").replace(":", "")
    if not _HEX.fullmatch(value):
        raise UsageError(f"--sha256 {text[:80]!r} is not a SHA-256 fingerprint: give the 64 hex digits the server "
                         f"printed at start-up (\"trust bundle CA sha256 ...\")")
    return value


@dataclass(frozen=True)
class FetchedBundle:
    certificates: tuple[x509.Certificate, ...]
    pinned: x509.Certificate
    whole_bundle: bool  # False: only the pinned CA was kept (the server's TLS certificate is not from its CA)

    def pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.certificates)


def _split(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"--server {url[:80]!r} must be https://HOST:PORT (the trust-domain server)")
    try:
        return parts.hostname, parts.port or 443
    except ValueError as exc:
        raise UsageError(f"--server {url[:80]!r} has an invalid port") from exc


def _get(host: str, port: int, context: ssl.SSLContext, *, server_only: bool = False) -> bytes:
    """GET /v1/bundle. `server_only`: the peer must be the keyseal server itself (`not_the_server`), not any
    holder of an SVID of the trust domain that names the same host (ssl.CertificateError otherwise)."""
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=TIMEOUT)
    try:
        connection.connect()
        if server_only:
            assert connection.sock is not None
            peer = connection.sock.getpeercert(binary_form=True)
            reason = not_the_server(peer) if peer else "it presented no certificate"
            if reason is not None:
                raise ssl.CertificateError(f"{host}:{port} is not the keyseal server: {reason}")
        connection.request("GET", "/v1/bundle")
        response = connection.getresponse()
        body = response.read(_MAX_BUNDLE + 1)
    finally:
        connection.close()
    if response.status != 200:
        raise BackendUnavailableError(f"the server at {host}:{port} answered {response.status} for /v1/bundle")
    if len(body) > _MAX_BUNDLE:
        raise InputError(f"the bundle served by {host}:{port} is larger than {_MAX_BUNDLE} bytes")
    return body


def _certificates(body: bytes, where: str) -> list[x509.Certificate]:
    try:
        document = json.loads(body)
        return [x509.load_der_x509_certificate(base64.b64decode(c, validate=True))
                for key in document["keys"] if key.get("use") == "x509-svid" for c in key["x5c"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{where} did not serve a SPIFFE bundle (JSON with x509-svid keys) at /v1/bundle") from exc


def fetch_bundle(url: str, fingerprint: str) -> FetchedBundle:
    """The server's CA certificates, if one of them has `fingerprint` (else VerificationError)."""
    host, port = _split(url)
    pin = parse_fingerprint(fingerprint)
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    try:
        served = _certificates(_get(host, port, unverified), url)
    except (OSError, http.client.HTTPException) as exc:
        raise BackendUnavailableError(f"cannot fetch the trust bundle from {url}: {exc}") from exc
    pinned = next((c for c in served if ca_fingerprint(c) == pin), None)
    if pinned is None:
        seen = ", ".join(ca_fingerprint(c) for c in served) or "none"
        raise VerificationError(f"no CA served by {url} has SHA-256 {pin} (it served {seen}): nothing written; "
                                f"check the fingerprint the server printed at start-up, and that {url} is that "
                                f"server")
    pinned_pem = pinned.public_bytes(serialization.Encoding.PEM).decode("ascii")
    try:
        verified = _certificates(_get(host, port, ssl.create_default_context(cadata=pinned_pem), server_only=True),
                                 url)
    except (ssl.SSLError, ssl.CertificateError):
        return FetchedBundle((pinned,), pinned, whole_bundle=False)
    except (OSError, http.client.HTTPException) as exc:
        raise BackendUnavailableError(f"cannot fetch the trust bundle from {url}: {exc}") from exc
    if not any(ca_fingerprint(c) == pin for c in verified):
        raise VerificationError(f"the bundle served by {url} changed between two fetches and lost CA {pin}: retry")
    return FetchedBundle(tuple(verified), pinned, whole_bundle=True)
