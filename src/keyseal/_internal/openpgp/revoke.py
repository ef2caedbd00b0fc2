"""Key revocation signatures (type 0x20), computed by the key's custody like every other signature.

The result is the whole certificate with the revocation added after the primary key: it can replace the
published copy (WKD, the file users pass to `keyseal verify`), and `gpg --import` merges it into a keyring.

Reasons and what they mean to keyseal's verifier: `compromised` invalidates every signature the key ever made;
`superseded` and `retired` only those made at or after the revocation, so releases signed before stay valid.
"""

from __future__ import annotations

import time

from keyseal._internal.openpgp.cert import Certificate, key_prefix, load_certificates
from keyseal._internal.openpgp.keys import same_public_key
from keyseal._internal.openpgp.packets import TAG_SIGNATURE, encode_packet, encode_subpacket, iter_packets
from keyseal._internal.openpgp.signature import (
    HASH_IDS,
    SIG_KEY_REVOCATION,
    check_hash_fits_key,
    creation_subpackets,
    make_signature,
    new_hasher,
)
from keyseal.errors import KeyMismatchError, OpenPGPError, UsageError
from keyseal.signer import HashName, Signer

SUB_REVOCATION_REASON = 29
REASONS: dict[str, int] = {"superseded": 1, "compromised": 2, "retired": 3}


def revocation_signature(
    signer: Signer,
    certificate: Certificate,
    reason: str,
    *,
    description: str = "",
    created: int | None = None,
    hash_name: HashName | None = None,
) -> bytes:
    """A key revocation signature packet over the certificate's primary key, made by `signer` (its key)."""
    code = REASONS.get(reason)
    if code is None:
        raise UsageError(f"unknown revocation reason {reason!r}: use {', '.join(REASONS)}")
    if any(ch in description for ch in "\r\n\0"):
        raise UsageError("the revocation description must be one line")
    primary = certificate.primary
    public_key = signer.public_key()
    if not same_public_key(public_key, primary.public_key):
        raise KeyMismatchError(
            f"the key {signer.uri} is not the primary key of certificate {certificate.fingerprint}: only the "
            f"primary key can revoke it"
        )
    from keyseal._internal.openpgp.sign import choose_hash

    hash_name = choose_hash(signer, public_key, hash_name)
    check_hash_fits_key(public_key, hash_name)
    when = int(time.time()) if created is None else created
    if when < primary.created:
        raise UsageError("a revocation cannot be dated before the key was created")
    hashed = creation_subpackets(when, primary.fingerprint)
    hashed += encode_subpacket(SUB_REVOCATION_REASON, bytes([code]) + description.encode("utf-8"))
    hasher = new_hasher(HASH_IDS[hash_name])
    hasher.update(key_prefix(primary.body))
    from keyseal._internal import audit  # only signing needs it: verification stays light to start

    with audit.subject(f"{certificate.fingerprint} ({reason})"):  # the audit log names the key revoked
        body = make_signature(signer, public_key, SIG_KEY_REVOCATION, hash_name, hasher, hashed, primary.fingerprint)
    return encode_packet(TAG_SIGNATURE, body)


def revoked_certificate(certificate: Certificate, revocation: bytes) -> bytes:
    """The binary certificate with `revocation` placed right after the primary key packet."""
    packets = list(iter_packets(certificate.binary))
    head = encode_packet(packets[0].tag, packets[0].body)
    rest = b"".join(encode_packet(p.tag, p.body) for p in packets[1:])
    binary = head + revocation + rest
    if not load_certificates(binary, "revoked certificate")[0].revoked:
        raise OpenPGPError("the revocation signature did not verify against the certificate; nothing was written")
    return binary


def revoke(signer: Signer, certificate: Certificate, reason: str, *, description: str = "",
           created: int | None = None) -> bytes:
    """The certificate, revoked for `reason` by its own key."""
    packet = revocation_signature(signer, certificate, reason, description=description, created=created)
    return revoked_certificate(certificate, packet)


__all__ = ["REASONS", "revocation_signature", "revoke", "revoked_certificate"]
