"""keyseal's own verifier for detached signatures: no gpg needed, and a stricter policy than most.

Policy: only SHA-2 hashes (MD5, SHA-1 and RIPEMD-160 are rejected), RSA keys of 2048 bits or more, no signature
made before its key existed, after its key expired or was revoked, or after the signature itself expired; unknown
critical subpackets and malformed or truncated packets are rejected.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from keyseal.errors import OpenPGPError, VerificationError
from keyseal.openpgp import hashids
from keyseal.openpgp.armor import dearmor_or_binary
from keyseal.openpgp.cert import Certificate, SigningKey, merge_certificates
from keyseal.openpgp.cleartext import CleartextMessage, parse_cleartext, text_mode_canonical
from keyseal.openpgp.packets import TAG_MARKER, TAG_SIGNATURE, iter_packets
from keyseal.openpgp.prefetch import PrefetchedHashes
from keyseal.openpgp.signature import (
    SIG_BINARY,
    SIG_TEXT,
    Hasher,
    SignaturePacket,
    check_signature_math,
    new_hasher,
    parse_signature,
)
from keyseal.openpgp.stream import hash_file, hash_stream

MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class VerifiedSignature:
    """A good signature: which certificate, which of its keys, when."""

    certificate: Certificate
    key_fingerprint: str
    created: int
    hash_name: str

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint


def parse_detached(data: bytes) -> list[SignaturePacket]:
    """The signature packets of a detached signature file (armored or binary)."""
    binary = dearmor_or_binary(data)
    signatures: list[SignaturePacket] = []
    for packet in iter_packets(binary):
        if packet.tag == TAG_MARKER:
            continue
        if packet.tag != TAG_SIGNATURE:
            raise OpenPGPError(f"not a detached signature: it contains a packet of type {packet.tag}")
        signatures.append(parse_signature(packet.body))
    if not signatures:
        raise OpenPGPError("not a detached signature: no signature packet found")
    return signatures


def verify_file(certificates: list[Certificate], path: Path, signature_data: bytes,
                now: int | None = None) -> VerifiedSignature:
    """Verify a detached signature over a file; raise VerificationError with the most telling reason."""
    return _verify(certificates, lambda ids: hash_file(path, ids), signature_data, now)


def verify_prefetched(certificates: list[Certificate], hashes: PrefetchedHashes, signature_data: bytes,
                      now: int | None = None) -> VerifiedSignature:
    """`verify_file` with the data's hashing already under way (see `keyseal.openpgp.prefetch`)."""
    return _verify(certificates, hashes.get, signature_data, now)


def verify_bytes(certificates: list[Certificate], data: bytes, signature_data: bytes,
                 now: int | None = None, text_mode: bool = False) -> VerifiedSignature:
    """Verify a detached signature over data held in memory (a checksum manifest, say). With `text_mode`, the
    signature must be a text-mode (0x01) one, over the data with its line endings made CR LF."""
    if text_mode:
        canonical = text_mode_canonical(data)
        return _verify(certificates, lambda ids: hash_stream(io.BytesIO(canonical), ids), signature_data, now,
                       SIG_TEXT)
    return _verify(certificates, lambda ids: hash_stream(io.BytesIO(data), ids), signature_data, now)


def verify_cleartext(certificates: list[Certificate], document: bytes,
                     now: int | None = None) -> tuple[VerifiedSignature, CleartextMessage]:
    """Verify a cleartext signed message (RFC 9580 section 7): a text-mode signature over its canonical text,
    made with a hash its Hash header names."""
    message = parse_cleartext(document)
    if message.header_hashes is not None:
        for sig in parse_detached(message.signature_armor):
            name = hashids.ACCEPTED.get(sig.hash_id)
            if name is not None and name not in message.header_hashes:
                raise VerificationError(f"the cleartext message's Hash header does not name {name.upper()}, the "
                                        f"hash its signature uses")
    canonical = message.hash_input
    result = _verify(certificates, lambda ids: hash_stream(io.BytesIO(canonical), ids), message.signature_armor,
                     now, SIG_TEXT)
    return result, message


def _verify(certificates: list[Certificate], hash_data: Callable[[list[int]], dict[int, Hasher]],
            signature_data: bytes, now: int | None, sig_type: int = SIG_BINARY) -> VerifiedSignature:
    signatures = parse_detached(signature_data)
    # Several copies of one certificate count as one: a revocation in any copy applies.
    certificates = merge_certificates(certificates)
    usable: list[SignaturePacket] = []
    reasons: list[str] = []
    for sig in signatures:
        try:
            new_hasher(sig.hash_id)
        except OpenPGPError as exc:
            reasons.append(exc.message)
            continue
        usable.append(sig)
    data_hashers = hash_data([sig.hash_id for sig in usable]) if usable else {}
    moment = int(time.time()) if now is None else now
    for sig in usable:
        hasher = data_hashers[sig.hash_id].copy()
        hasher.update(sig.trailer())
        digest = hasher.digest()
        result = _check_against(certificates, sig, digest, moment, reasons, sig_type)
        if result is not None:
            return result
    raise VerificationError(_summarise(reasons))


def _check_against(certificates: list[Certificate], sig: SignaturePacket, digest: bytes, now: int,
                   reasons: list[str], sig_type: int) -> VerifiedSignature | None:
    issuers = sig.issuer_key_ids
    matched = False
    for cert in certificates:
        for entry in cert.signing_keys:
            if issuers and entry.key.key_id not in issuers:
                continue
            if sig.issuer_fingerprint is not None and sig.issuer_fingerprint != entry.key.fingerprint:
                continue
            matched = True
            problem = _policy_problem(sig, entry, now, sig_type)
            if problem is not None:
                reasons.append(problem)
                continue
            if check_signature_math(sig, entry.key.public_key, entry.key.algorithm, digest):
                return VerifiedSignature(cert, entry.key.fingerprint_hex, sig.created or 0, _hash_label(sig))
            reasons.append(f"BAD signature from {cert.fingerprint}: the data or the signature was altered")
    if not matched:
        named = ", ".join(sorted(i.hex().upper() for i in issuers)) or "an unnamed key"
        reasons.append(f"no given certificate has the signing key {named}")
    return None


def _hash_label(sig: SignaturePacket) -> str:
    from keyseal.openpgp.signature import hash_name_of

    return hash_name_of(sig.hash_id)


def _policy_problem(sig: SignaturePacket, entry: SigningKey, now: int, sig_type: int) -> str | None:
    key = entry.key
    if sig.sig_type != sig_type:
        if sig_type == SIG_TEXT:
            return f"signature type 0x{sig.sig_type:02x} where a text signature (0x01) belongs"
        if sig.sig_type == SIG_TEXT:
            return "a text-mode signature (0x01) over a file: keyseal verifies binary-document signatures there"
        return f"unsupported signature type 0x{sig.sig_type:02x}: keyseal verifies binary-document signatures"
    if isinstance(key.public_key, rsa.RSAPublicKey) and key.public_key.key_size < MIN_RSA_BITS:
        return f"key {key.fingerprint_hex} is RSA-{key.public_key.key_size}: keyseal requires at least 2048 bits"
    if sig.unknown_critical():
        return "signature has an unknown critical subpacket"
    created = sig.created
    if created is None:
        return "signature has no creation time"
    if created < key.created:
        return f"signature is dated before its key {key.fingerprint_hex} was created"
    if entry.expires is not None and created >= entry.expires:
        return f"signature was made after key {key.fingerprint_hex} expired"
    if entry.revoked_at is not None and created >= entry.revoked_at:
        if entry.revoked_at == 0:
            return (f"key {key.fingerprint_hex} is revoked (compromised, or no reason given): none of its "
                    f"signatures count")
        return (f"key {key.fingerprint_hex} is revoked (superseded or retired) since {_utc(entry.revoked_at)}: "
                f"this signature was made after that")
    lifetime = sig.expiration_seconds
    if lifetime and created + lifetime <= now:
        return "signature has expired"
    return None


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _summarise(reasons: list[str]) -> str:
    if not reasons:
        return "no valid signature"
    bad = [r for r in reasons if r.startswith("BAD")]
    chosen = bad[0] if bad else reasons[0]
    return chosen
