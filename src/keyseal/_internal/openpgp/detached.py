"""Detached signature files that several signers build together: each custody signs the same artifact in its own
job, and the signatures are merged into one file that `keyseal verify --threshold K` (or `sqv --signatures K`)
checks. A merged file must not carry a signature over some other data (a stale file from another build would
otherwise ride along in a file that verifies), nor two signatures by one key (a threshold counts keys)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from keyseal._internal.openpgp.cert import Certificate, merge_certificates
from keyseal._internal.openpgp.packets import TAG_SIGNATURE, encode_packet
from keyseal._internal.openpgp.signature import SignaturePacket, check_signature_math
from keyseal._internal.openpgp.stream import hash_file
from keyseal._internal.openpgp.verify import issuer_keys, parse_detached, revocation_problem
from keyseal.errors import OpenPGPError, UsageError

if TYPE_CHECKING:
    from keyseal._internal.openpgp.signature import Hasher

__all__ = ["KnownCertificates", "check_signatures_over", "encode_signatures", "merge_signatures", "revoked_signer"]


class KnownCertificates:
    """The certificates that can tell whether a signature already in a file counts: the ones given, merged with
    the keyseal keyring's (read once, when first needed), so a revocation in any copy is seen."""

    def __init__(self, given: list[Certificate]) -> None:
        self._given = given
        self._merged: list[Certificate] | None = None
        self._lock = threading.Lock()

    def all(self) -> list[Certificate]:
        with self._lock:
            if self._merged is None:
                from keyseal._internal.openpgp.keyring import keyring_certificates

                self._merged = merge_certificates([*self._given, *keyring_certificates()])
            return self._merged


def revoked_signer(sig: SignaturePacket, digest: bytes, certificates: list[Certificate]) -> tuple[str, str] | None:
    """(fingerprint, why) when a known key provably made `sig` (its maths verifies, not just the issuer it names)
    and the key's revocation means the signature no longer counts, by the verifier's own rule: all of a
    compromised key's signatures, a superseded or retired key's from its revocation on."""
    for _, entry in issuer_keys(sig, certificates):
        if not check_signature_math(sig, entry.key.public_key, entry.key.algorithm, digest):
            continue
        problem = revocation_problem(entry, sig.created or 0)
        return None if problem is None else (entry.key.fingerprint_hex, problem)
    return None


def check_signatures_over(path: Path, signatures: list[SignaturePacket], what: str,
                          extra_hash_ids: tuple[int, ...] = ()) -> tuple[dict[int, Hasher], list[bytes]]:
    """Refuse signatures that are not over `path` (the 16-bit digest prefix each signature carries: cheap, and
    enough to tell another file from this one; verification still checks the signature itself). Returns the
    file's hashers for `extra_hash_ids` and the signatures' hashes, so a caller that signs too reads it once,
    and each signature's digest, in order."""
    hashers = hash_file(path, [*extra_hash_ids, *(sig.hash_id for sig in signatures)])
    digests: list[bytes] = []
    for sig in signatures:
        check = hashers[sig.hash_id].copy()
        check.update(sig.trailer())
        digest = check.digest()
        if digest[:2] != sig.left16:
            raise UsageError(f"{what} holds a signature that is not over {path} (a stale signature file?)")
        digests.append(digest)
    return hashers, digests


def _signer_of(sig: SignaturePacket) -> str:
    """The signing key's ID (a v4 fingerprint's last 8 bytes), so a signature naming its issuer by fingerprint and
    one naming it by key ID are seen as the same key's."""
    fingerprint = sig.issuer_fingerprint
    if fingerprint is not None:
        return fingerprint[-8:].hex().upper()
    ids = sorted(i.hex().upper() for i in sig.issuer_key_ids)
    if len(ids) != 1:
        raise OpenPGPError("a signature does not name exactly one issuer: cannot tell which key made it")
    return ids[0]


def merge_signatures(data: Path, files: list[tuple[str, bytes]], known: KnownCertificates,
                     keep_revoked: Callable[[str, str], bool] | None = None) -> list[SignaturePacket]:
    """The signatures of every (name, content) detached signature file, in order, each over `data`: an exact
    copy of a signature already taken is dropped; two different signatures by one key are refused; so is a
    signature that no longer counts because `known` says its key is revoked (beside good ones it would still
    count for every verifier that has not seen the revocation), unless `keep_revoked(name, fingerprint)` says
    to keep it."""
    taken: dict[str, SignaturePacket] = {}
    merged: list[SignaturePacket] = []
    for name, content in files:
        try:
            signatures = parse_detached(content)
        except OpenPGPError as exc:
            raise OpenPGPError(f"{name}: {exc.message}") from exc
        _, digests = check_signatures_over(data, signatures, name)
        for sig, digest in zip(signatures, digests, strict=True):
            revoked = revoked_signer(sig, digest, known.all())
            if revoked is not None and not (keep_revoked is not None and keep_revoked(name, revoked[0])):
                raise UsageError(f"{name} holds a signature that no longer counts ({revoked[1]}): refusing to "
                                 f"merge it; leave that file out, or pass --keep-revoked-signatures")
        for sig in signatures:
            signer = _signer_of(sig)
            earlier = taken.get(signer)
            if earlier is not None:
                if earlier.body == sig.body:
                    continue
                raise UsageError(f"{name} holds a second signature by {signer}: a threshold counts keys, so "
                                 f"keep one signature per key")
            taken[signer] = sig
            merged.append(sig)
    return merged


def encode_signatures(signatures: list[SignaturePacket]) -> bytes:
    """The binary packets of a detached signature file."""
    return b"".join(encode_packet(TAG_SIGNATURE, sig.body) for sig in signatures)
