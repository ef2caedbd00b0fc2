"""TLS helpers both the server and the agent use for their SVID-based contexts."""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["SERVER_PATH", "load_chain", "not_the_server"]

SERVER_PATH = "/keyseal/server"  # the path of the server's own X.509-SVID (ca.http.tls issues it)


def load_chain(context: ssl.SSLContext, chain: bytes, key: ec.EllipticCurvePrivateKey) -> None:
    """Load a certificate chain (PEM) and an in-memory key into `context`, the key encrypted on disk under a
    one-time password for the moment ssl reads it."""
    password = secrets.token_bytes(32)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(password))
    with tempfile.TemporaryDirectory(prefix="keyseal-tls-") as directory:
        cert_path, key_path = Path(directory) / "chain.pem", Path(directory) / "key.pem"
        for path, data in ((cert_path, chain), (key_path, encrypted)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        context.load_cert_chain(str(cert_path), str(key_path), password=password)


def not_the_server(der: bytes) -> str | None:
    """Why a TLS peer that passed the host name check is not the keyseal server, or None if it may be. A
    workload's X.509-SVID can carry DNS names (its registration entry's), so it can pass the host name check
    against the trust domain's CA like the server's own SVID; an X.509-SVID is the server's only if its SPIFFE
    ID is spiffe://<td>/keyseal/server (a path no workload entry may have). A certificate without a SPIFFE ID
    (one from the operator's PKI, server.tls.certFile) is left to the host name check."""
    certificate = x509.load_der_x509_certificate(der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [u for u in names.get_values_for_type(x509.UniformResourceIdentifier) if u.lower().startswith("spiffe:")]
    for spiffe_id in ids:
        path = spiffe_id[len("spiffe://"):].partition("/")[2]
        if "/" + path != SERVER_PATH:
            return f"it presented the X.509-SVID of {spiffe_id[:120]}, not the keyseal server's"
    return None
