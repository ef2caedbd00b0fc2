"""Who may ask for SVIDs: clients named in the configuration, each with a bearer token (only its SHA-256 is
configured) or a TLS client certificate (its SHA-256 fingerprint, or its URI SAN), and the SPIFFE ID path
prefixes it may ask for. Tokens are never logged; a failed attempt is logged with the peer address only.

A client certificate's chain was verified by OpenSSL once, at the handshake, on the machine's time; its validity
period is checked again on every request, on the server's clock (`valid_at`), so a kept-alive connection does
not outlive the certificate. The chain itself is not verified again: the listener's connection age cap
(`keyseal._internal.ca.http.listener.MAX_CONNECTION_AGE`) bounds how long a handshake's verdict is used."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from keyseal._internal.ca.config import ClientConfig
from keyseal._internal.spiffe.ids import path_allowed

__all__ = ["Authenticator", "Principal", "valid_at"]

_BEARER_RE = re.compile(r"Bearer ([A-Za-z0-9\-._~+/]+=*)")
MAX_TOKEN_LENGTH = 4096


@dataclass(frozen=True)
class Principal:
    name: str
    prefixes: tuple[str, ...]
    method: str  # "token" or "mtls"

    def may_ask_for(self, path: str) -> bool:
        return path_allowed(path, self.prefixes)


class Authenticator:
    def __init__(self, clients: tuple[ClientConfig, ...]) -> None:
        # Principals are made once here, not per request: they are immutable, and every request needs one.
        self._by_token = {c.token_sha256: Principal(c.name, c.prefixes, "token") for c in clients if c.token_sha256}
        self._by_cert = {c.cert_sha256: Principal(c.name, c.prefixes, "mtls") for c in clients if c.cert_sha256}
        self._by_uri = {c.cert_uri: Principal(c.name, c.prefixes, "mtls") for c in clients if c.cert_uri}

    def authenticate(self, authorization: str | None, peer_certificate: bytes | None) -> Principal | None:
        """The client, or None. A request that sends an Authorization header is judged by it alone."""
        if authorization is not None:
            match = _BEARER_RE.fullmatch(authorization.strip()) if len(authorization) <= MAX_TOKEN_LENGTH else None
            if match is None:
                return None
            return self._by_token.get(hashlib.sha256(match.group(1).encode("ascii")).hexdigest())
        if peer_certificate is None:
            return None
        principal = self._by_cert.get(hashlib.sha256(peer_certificate).hexdigest())
        if principal is None and self._by_uri:
            principal = self._by_uri_san(peer_certificate)
        return principal

    def _by_uri_san(self, der: bytes) -> Principal | None:
        try:
            certificate = x509.load_der_x509_certificate(der)
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            return None
        return self._by_uri.get(uris[0])


def valid_at(der: bytes, now: datetime) -> bool:
    """Whether the certificate's validity period holds `now` (a certificate that cannot be read: False)."""
    period = _validity(der)
    return period is not None and period[0] <= now <= period[1]


@functools.lru_cache(maxsize=1024)
def _validity(der: bytes) -> tuple[datetime, datetime] | None:
    """Read once per certificate: a client sends the same one on every request of a connection."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return certificate.not_valid_before_utc, certificate.not_valid_after_utc
