"""How the audit trail names a key: the same name whatever holds it (file, KMS, HSM, Vault)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization

from keyseal.signer import PublicKey

__all__ = ["key_fingerprint"]


def key_fingerprint(public_key: PublicKey) -> str:
    """`sha256:<hex>` over the DER SubjectPublicKeyInfo: the same for a key whatever holds it
    (`openssl pkey -pubin -outform DER | sha256sum`)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()
