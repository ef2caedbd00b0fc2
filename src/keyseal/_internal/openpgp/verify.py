"""keyseal's own verifier for detached signatures: no gpg needed, and a stricter policy than most.

Policy: only SHA-2 hashes (MD5, SHA-1 and RIPEMD-160 are rejected), RSA keys of 2048 bits or more, no signature
made before its key existed, after its key expired or was revoked, or after the signature itself expired; unknown
critical subpackets and malformed or truncated packets are rejected.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from keyseal._internal.frozen import Frozen
from keyseal._internal.openpgp import hashids
from keyseal._internal.openpgp.armor import dearmor_or_binary
from keyseal._internal.openpgp.cert import Certificate, SigningKey, merge_certificates
from keyseal._internal.openpgp.keys import RSA_ALGORITHMS
from keyseal._internal.openpgp.packets import TAG_MARKER, TAG_PUBLIC_KEY, TAG_SECRET_KEY, TAG_SIGNATURE, iter_packets
from keyseal._internal.openpgp.signature import (
    SIG_BINARY,
    SIG_TEXT,
    SignaturePacket,
    accepted_hash,
    check_signature_math,
    new_message_hasher,
    parse_signature,
)
from keyseal.errors import OpenPGPError, VerificationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric import rsa

    from keyseal._internal.openpgp.cleartext import CleartextMessage
    from keyseal._internal.openpgp.prefetch import PrefetchedHashes
    from keyseal._internal.openpgp.signature import Hasher

__all__ = [
    "MIN_RSA_BITS",
    "VerifiedSignature",
    "issuer_keys",
    "key_problem",
    "parse_detached",
    "revocation_problem",
    "verify_bytes",
    "verify_cleartext",
    "verify_file",
    "verify_prefetched",
    "verify_threshold_bytes",
    "verify_threshold_prefetched",
]

MIN_RSA_BITS = 2048


class VerifiedSignature(Frozen):
    """A good signature: which certificate, which of its keys, when."""

    __slots__ = ("certificate", "created", "hash_name", "key_fingerprint")

    def __init__(self, certificate: Certificate, key_fingerprint: str, created: int, hash_name: str) -> None:
        self.certificate = certificate
        self.key_fingerprint = key_fingerprint
        self.created = created
        self.hash_name = hash_name

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
        if packet.tag in (TAG_PUBLIC_KEY, TAG_SECRET_KEY):
            raise OpenPGPError("the signature given is an OpenPGP key or certificate, not a signature: give the "
                               "FILE.asc or FILE.sig that keyseal sign wrote (the certificate goes to --cert)")
        if packet.tag != TAG_SIGNATURE:
            raise OpenPGPError(f"the signature given is not a detached OpenPGP signature (it holds an OpenPGP "
                               f"packet of type {packet.tag}): give the FILE.asc or FILE.sig that keyseal sign wrote")
        signatures.append(parse_signature(packet.body))
    if not signatures:
        raise OpenPGPError("not a detached signature: no signature packet found")
    return signatures


def verify_file(certificates: list[Certificate], path: Path, signature_data: bytes,
                now: int | None = None) -> VerifiedSignature:
    """Verify a detached signature over a file; raise VerificationError with the most telling reason."""
    from keyseal._internal.openpgp.stream import hash_file

    return _verify(certificates, lambda ids: hash_file(path, ids), signature_data, now, 1)[0]


def verify_prefetched(certificates: list[Certificate], hashes: PrefetchedHashes, signature_data: bytes,
                      now: int | None = None) -> VerifiedSignature:
    """`verify_file` with the data's hashing already under way (see `keyseal._internal.openpgp.prefetch`)."""
    return _verify(certificates, hashes.get, signature_data, now, 1)[0]


def verify_bytes(certificates: list[Certificate], data: bytes, signature_data: bytes,
                 now: int | None = None, text_mode: bool = False) -> VerifiedSignature:
    """Verify a detached signature over data held in memory (a checksum manifest, say). With `text_mode`, the
    signature must be a text-mode (0x01) one, over the data with its line endings made CR LF."""
    if text_mode:
        from keyseal._internal.openpgp.cleartext import text_mode_canonical

        canonical = text_mode_canonical(data)
        return _verify(certificates, lambda ids: _hash_bytes(canonical, ids), signature_data, now, 1, SIG_TEXT)[0]
    return _verify(certificates, lambda ids: _hash_bytes(data, ids), signature_data, now, 1)[0]


def verify_threshold_prefetched(certificates: list[Certificate], hashes: PrefetchedHashes, signature_data: bytes,
                                threshold: int, now: int | None = None) -> list[VerifiedSignature]:
    """k of n: the good signatures of at least `threshold` distinct certificates, one per certificate, each
    checked by the same rules as `verify_file`."""
    return _verify(certificates, hashes.get, signature_data, now, threshold)


def verify_threshold_bytes(certificates: list[Certificate], data: bytes, signature_data: bytes, threshold: int,
                           now: int | None = None, text_mode: bool = False) -> list[VerifiedSignature]:
    """`verify_threshold_prefetched` over data held in memory; `text_mode` as for `verify_bytes`."""
    if text_mode:
        from keyseal._internal.openpgp.cleartext import text_mode_canonical

        canonical = text_mode_canonical(data)
        return _verify(certificates, lambda ids: _hash_bytes(canonical, ids), signature_data, now, threshold,
                       SIG_TEXT)
    return _verify(certificates, lambda ids: _hash_bytes(data, ids), signature_data, now, threshold)


def _hash_bytes(data: bytes, ids: list[int]) -> dict[int, Hasher]:
    hashers = {hash_id: new_message_hasher(hash_id) for hash_id in set(ids)}
    for hasher in hashers.values():
        hasher.update(data)
    return hashers


def verify_cleartext(certificates: list[Certificate], document: bytes,
                     now: int | None = None) -> tuple[VerifiedSignature, CleartextMessage]:
    """Verify a cleartext signed message (RFC 9580 section 7): a text-mode signature over its canonical text,
    made with a hash its Hash header names."""
    from keyseal._internal.openpgp.cleartext import parse_cleartext  # not at import: most verifications are detached

    message = parse_cleartext(document)
    if message.header_hashes is not None:
        for sig in parse_detached(message.signature_armor):
            name = hashids.ACCEPTED.get(sig.hash_id)
            if name is not None and name not in message.header_hashes:
                raise VerificationError(f"the cleartext message's Hash header does not name {name.upper()}, the "
                                        f"hash its signature uses")
    canonical = message.hash_input
    result = _verify(certificates, lambda ids: _hash_bytes(canonical, ids), message.signature_armor, now, 1,
                     SIG_TEXT)[0]
    return result, message


def _verify(certificates: list[Certificate], hash_data: Callable[[list[int]], dict[int, Hasher]],
            signature_data: bytes, now: int | None, threshold: int,
            sig_type: int = SIG_BINARY) -> list[VerifiedSignature]:
    """Every signature is checked by the same rules; the good ones are counted by certificate (primary key), so
    two signatures by one key, or by two subkeys of one certificate, count once (as `sqv --signatures`)."""
    if threshold < 1:
        raise VerificationError(f"a threshold of {threshold} signatures means nothing: give 1 or more")
    signatures = parse_detached(signature_data)
    # Several copies of one certificate count as one: a revocation in any copy applies.
    certificates = merge_certificates(certificates)
    if threshold > 1 and threshold > len(certificates):
        raise VerificationError(f"{threshold} signatures by distinct keys are required but only "
                                f"{len(certificates)} certificate(s) are trusted")
    usable: list[SignaturePacket] = []
    reasons: list[str] = []
    for sig in signatures:
        try:
            accepted_hash(sig.hash_id)
        except OpenPGPError as exc:
            reasons.append(exc.message)
            continue
        usable.append(sig)
    data_hashers = hash_data([sig.hash_id for sig in usable]) if usable else {}
    moment = int(time.time()) if now is None else now
    good: dict[str, VerifiedSignature] = {}
    for sig in usable:
        hasher = data_hashers[sig.hash_id].copy()
        hasher.update(sig.trailer())
        digest = hasher.digest()
        result = _check_against(certificates, sig, digest, moment, reasons, sig_type)
        if result is not None:
            good.setdefault(result.fingerprint, result)
            if threshold == 1:
                break
    if len(good) >= threshold:
        return list(good.values())
    if not good:
        raise VerificationError(_summarise(reasons))
    found = f"{threshold} signatures by distinct keys are required, found {len(good)} ({', '.join(good)})"
    raise VerificationError(f"{found}; besides: {_summarise(reasons)}" if reasons else found)


def _check_against(certificates: list[Certificate], sig: SignaturePacket, digest: bytes, now: int,
                   reasons: list[str], sig_type: int) -> VerifiedSignature | None:
    matched = False
    for cert, entry in issuer_keys(sig, certificates):
        matched = True
        problem = _policy_problem(sig, entry, now, sig_type)
        if problem is not None:
            reasons.append(problem)
            continue
        if check_signature_math(sig, entry.key.public_key, entry.key.algorithm, digest):
            return VerifiedSignature(cert, entry.key.fingerprint_hex, sig.created or 0, _hash_label(sig))
        reasons.append(f"BAD signature from {cert.fingerprint}: the data or the signature was altered")
    if not matched:
        named = ", ".join(sorted(i.hex().upper() for i in sig.issuer_key_ids)) or "an unnamed key"
        reasons.append(f"no given certificate has the signing key {named}")
    return None


def issuer_keys(sig: SignaturePacket, certificates: list[Certificate]) -> Iterator[tuple[Certificate, SigningKey]]:
    """The signing keys of `certificates` that may have made `sig`: those it names (by key ID and fingerprint),
    every one if it names none."""
    issuers = sig.issuer_key_ids
    for cert in certificates:
        for entry in cert.signing_keys:
            if issuers and entry.key.key_id not in issuers:
                continue
            if sig.issuer_fingerprint is not None and sig.issuer_fingerprint != entry.key.fingerprint:
                continue
            yield cert, entry


def _hash_label(sig: SignaturePacket) -> str:
    from keyseal._internal.openpgp.signature import hash_name_of

    return hash_name_of(sig.hash_id)


def _policy_problem(sig: SignaturePacket, entry: SigningKey, now: int, sig_type: int) -> str | None:
    if sig.sig_type != sig_type:
        if sig_type == SIG_TEXT:
            return f"signature type 0x{sig.sig_type:02x} where a text signature (0x01) belongs"
        if sig.sig_type == SIG_TEXT:
            return "a text-mode signature (0x01) over a file: keyseal verifies binary-document signatures there"
        return f"unsupported signature type 0x{sig.sig_type:02x}: keyseal verifies binary-document signatures"
    if sig.unknown_critical():
        return "signature has an unknown critical subpacket"
    created = sig.created
    if created is None:
        return "signature has no creation time"
    problem = key_problem(entry, created)
    if problem is not None:
        return problem
    lifetime = sig.expiration_seconds
    if lifetime and created + lifetime <= now:
        return "signature has expired"
    return None


def key_problem(entry: SigningKey, when: int) -> str | None:
    """Why keyseal's verifier refuses any signature `entry` makes at `when` (its key's size, validity window or
    revocation), or None. The one place these rules live: `keyseal sign` asks it too, before signing."""
    key = entry.key
    if key.algorithm in RSA_ALGORITHMS:
        rsa_key: rsa.RSAPublicKey = key.public_key  # type: ignore[assignment]  # an RSA algorithm's key is RSA
        if rsa_key.key_size < MIN_RSA_BITS:
            return f"key {key.fingerprint_hex} is RSA-{rsa_key.key_size}: keyseal requires at least 2048 bits"
    if when < key.created:
        return f"key {key.fingerprint_hex} is not valid at {_utc(when)}: it was created at {_utc(key.created)}"
    if entry.expires is not None and when >= entry.expires:
        return f"key {key.fingerprint_hex} is not valid at {_utc(when)}: it expired at {_utc(entry.expires)}"
    return revocation_problem(entry, when)


def revocation_problem(entry: SigningKey, when: int) -> str | None:
    """Why a signature `entry` makes at `when` does not count because the key is revoked, or None: a
    compromised key (or one revoked without a reason) invalidates all its signatures, a superseded or retired
    one only those made at or after the revocation (RFC 9580's hard and soft revocations)."""
    if entry.revoked_at is None or when < entry.revoked_at:
        return None
    fingerprint = entry.key.fingerprint_hex
    if entry.revoked_at == 0:
        return f"key {fingerprint} is revoked (compromised, or no reason given): none of its signatures count"
    return (f"key {fingerprint} is revoked (superseded or retired) since {_utc(entry.revoked_at)}: a signature "
            f"made at {_utc(when)} does not count")


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _summarise(reasons: list[str]) -> str:
    if not reasons:
        return "no valid signature"
    bad = [r for r in reasons if r.startswith("BAD")]
    chosen = bad[0] if bad else reasons[0]
    return chosen
