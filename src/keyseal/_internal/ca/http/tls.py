"""The server's TLS: certificate files (e.g. from cert-manager), or a serving certificate the CA issues to
itself from its active keyset (an X.509-SVID for spiffe://<trust domain>/keyseal/server that also names the
configured DNS names and IP addresses), renewed at half its lifetime and whenever the active keyset changes.

A client certificate is asked for but optional (token clients and the bundle endpoint need none). It must chain
to one of the trust domain's live CA certificates (node agents present their own X.509-SVID) or to
server.tls.clientCAFile; the context is rebuilt whenever the live CA certificates change (rotation), so a new CA
is trusted as soon as it is published and an expired one is dropped.

Python's ssl module loads a key only from a file, so a key generated in memory goes through a temporary file
encrypted under a random one-time password (the key is never on disk in the clear), removed once loaded.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.ca.config import Config
from keyseal._internal.ca.custody.keyset import Keyset
from keyseal._internal.ca.issuance.x509svid import issue_x509_svid
from keyseal._internal.spiffe.ids import SpiffeId
from keyseal._internal.spiffe.tls import load_chain
from keyseal.errors import InputError

__all__ = ["SERVER_PATH", "TlsContexts", "load_chain"]

log = logging.getLogger(__name__)

SERVER_PATH = "/keyseal/server"
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1",)


def _pem(authorities: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in authorities)


def _base_context(config: Config, authorities_pem: str) -> ssl.SSLContext:
    """TLS 1.2+, asking for an optional client certificate that chains to a trust-domain CA or clientCAFile."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    # No renegotiation: the client certificate the listener reads after the handshake stays the connection's.
    # A client that closes without close_notify has still sent its requests: answer them (it is the client's
    # own stream that ends short, and an incomplete request is never answered).
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_IGNORE_UNEXPECTED_EOF
    if authorities_pem:
        context.load_verify_locations(cadata=authorities_pem)
    if config.tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.tls.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"cannot load server.tls.clientCAFile {config.tls.client_ca_file}: {exc}") from exc
    return context


class TlsContexts:
    """The current SSL context; `renew()` replaces it when a self-issued certificate is due or the trust
    domain's live CA certificates changed."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._renew_at: datetime | None = None
        self._keyset: int | None = None
        self._authorities = ""
        if not config.tls.self_issued:
            self._context = self._from_files("")

    def _from_files(self, authorities_pem: str) -> ssl.SSLContext:
        context = _base_context(self.config, authorities_pem)
        try:
            context.load_cert_chain(str(self.config.tls.cert_file), str(self.config.tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(
                f"cannot load the TLS certificate {self.config.tls.cert_file} / key {self.config.tls.key_file}: "
                f"{exc}"
            ) from exc
        return context

    def current(self) -> ssl.SSLContext:
        context = self._context
        assert context is not None, "TlsContexts.renew() must run before the server accepts connections"
        return context

    def renew(self, keyset: Keyset, now: datetime, authorities: Sequence[x509.Certificate]) -> bool:
        """Rebuild the context if the trusted CA certificates (`authorities`: the live keysets') changed, or
        issue a new serving certificate if self-issued and due. True if the context changed."""
        authorities_pem = _pem(authorities)
        with self._lock:
            trust_changed = authorities_pem != self._authorities
            if not self.config.tls.self_issued:
                if not trust_changed:
                    return False
                try:  # the files are read again: a renewed certificate (cert-manager) is picked up too
                    self._context = self._from_files(authorities_pem)
                except InputError as exc:
                    log.error("cannot rebuild the TLS context for the new CA certificates: %s", exc.message)
                    return False
                self._authorities = authorities_pem
                return True
            if (not trust_changed and self._context is not None and self._keyset == keyset.number
                    and self._renew_at and now < self._renew_at):
                return False
            key = ec.generate_private_key(ec.SECP256R1())
            spiffe_id = SpiffeId(self.config.trust_domain, SERVER_PATH)
            dns = self.config.tls.self_issued_dns or DEFAULT_DNS_NAMES
            ips = self.config.tls.self_issued_ips or (() if self.config.tls.self_issued_dns else DEFAULT_IP_ADDRESSES)
            certificate = issue_x509_svid(keyset, spiffe_id, key.public_key(), now, self.config.x509_ttl,
                                          dns_names=dns, ip_addresses=ips)
            context = _base_context(self.config, authorities_pem)
            chain = certificate.public_bytes(serialization.Encoding.PEM) + keyset.ca_pem.encode("ascii")
            load_chain(context, chain, key)
            lifetime = certificate.not_valid_after_utc - now
            self._context, self._keyset, self._renew_at = context, keyset.number, now + lifetime / 2
            self._authorities = authorities_pem
            return True
