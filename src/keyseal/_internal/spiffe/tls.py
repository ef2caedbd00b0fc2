"""TLS helpers both the server and the agent use for their SVID-based contexts."""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["load_chain"]


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
