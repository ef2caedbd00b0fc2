"""Detached binary-document signatures (type 0x00) made through a Signer: one signature call per file."""

from __future__ import annotations

import time
from dataclasses import dataclass

from keyseal.errors import KeyMismatchError, UnsupportedKeyError, UsageError
from keyseal.openpgp.armor import KIND_SIGNATURE, armor
from keyseal.openpgp.cert import Certificate
from keyseal.openpgp.keys import encode_public_key_body, fingerprint_of, same_public_key
from keyseal.openpgp.packets import TAG_SIGNATURE, encode_packet
from keyseal.openpgp.signature import (
    HASH_IDS,
    SIG_BINARY,
    Hasher,
    check_hash_fits_key,
    creation_subpackets,
    make_signature,
)
from keyseal.signer import HashName, PublicKey, Signer, default_hash


@dataclass(frozen=True)
class SigningIdentity:
    """The OpenPGP identity of a signer's key: which fingerprint its signatures name as issuer."""

    public_key: PublicKey
    fingerprint: bytes

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex().upper()


def identity_from_certificate(signer: Signer, certificates: list[Certificate],
                              when: int | None = None) -> SigningIdentity:
    """The key in the given certificates that is the signer's key; refuse if none is, or if keyseal's verifier
    would refuse a signature it makes at `when` (default: now) as it stands in them (expired, revoked, not yet
    valid): a signature nobody can verify is refused before it is made, not after it is published."""
    from keyseal.openpgp.cert import merge_certificates
    from keyseal.openpgp.verify import key_problem

    public_key = signer.public_key()
    moment = int(time.time()) if when is None else when
    problems: list[str] = []
    for cert in merge_certificates(certificates):  # a revocation in any copy of a certificate counts
        for entry in cert.signing_keys:
            if same_public_key(entry.key.public_key, public_key):
                problem = key_problem(entry, moment)
                if problem is None:
                    return SigningIdentity(public_key, entry.key.fingerprint)
                problems.append(problem)
    if problems:
        raise UsageError(f"refusing to sign with {signer.uri}: {problems[0]}")
    names = ", ".join(cert.fingerprint for cert in certificates)
    raise KeyMismatchError(f"the key {signer.uri} is not a signing key of the certificate {names}")


def identity_from_signer(signer: Signer) -> SigningIdentity:
    """Rebuild the fingerprint from the key's creation time as its custody reports it (as `keys mint` does)."""
    created = signer.created_at()
    if created is None:
        raise UsageError(f"cannot tell when {signer.uri} was created: pass --cert with its certificate")
    public_key = signer.public_key()
    body = encode_public_key_body(public_key, int(created.timestamp()))
    return SigningIdentity(public_key, fingerprint_of(body))


def choose_hash(signer: Signer, public_key: PublicKey, requested: HashName | None) -> HashName:
    """The requested hash, or the key's natural one; refuse a hash the custody cannot sign or that is too short."""
    supported = signer.supported_hashes()
    if requested is None:
        preferred = default_hash(public_key)
        requested = preferred if preferred in supported else supported[0]
    elif requested not in supported:
        raise UnsupportedKeyError(
            f"{signer.uri} cannot sign {requested} digests; it offers {', '.join(supported)}"
        )
    check_hash_fits_key(public_key, requested)
    return requested


def signature_packet(
    signer: Signer,
    identity: SigningIdentity,
    data_hasher: Hasher,
    hash_name: HashName,
    created: int | None = None,
) -> bytes:
    """A binary signature packet over data already fed to `data_hasher`."""
    when = int(time.time()) if created is None else created
    body = make_signature(
        signer,
        identity.public_key,
        SIG_BINARY,
        hash_name,
        data_hasher,
        creation_subpackets(when, identity.fingerprint),
        identity.fingerprint,
    )
    return encode_packet(TAG_SIGNATURE, body)


def render(packet: bytes, armored: bool) -> bytes:
    return armor(packet, KIND_SIGNATURE) if armored else packet


__all__ = [
    "HASH_IDS",
    "SigningIdentity",
    "choose_hash",
    "identity_from_certificate",
    "identity_from_signer",
    "render",
    "signature_packet",
]
