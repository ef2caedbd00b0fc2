"""Data signatures made through a Signer, one signature call per file: detached binary-document (0x00) and
text (0x01) signatures, cleartext signed messages and one-pass signed messages (what `gpg --sign` writes)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ed25519

from keyseal._internal.openpgp.armor import KIND_SIGNATURE, armor
from keyseal._internal.openpgp.cert import Certificate
from keyseal._internal.openpgp.cleartext import render_cleartext, signed_text, text_mode_canonical
from keyseal._internal.openpgp.keys import algorithm_of, encode_public_key_body, fingerprint_of, same_public_key
from keyseal._internal.openpgp.packets import TAG_SIGNATURE, encode_packet
from keyseal._internal.openpgp.signature import (
    HASH_IDS,
    SIG_BINARY,
    SIG_TEXT,
    check_hash_fits_key,
    creation_subpackets,
    make_signature,
    new_hasher,
)
from keyseal.errors import KeyMismatchError, UnsupportedKeyError, UsageError
from keyseal.signer import HashName, PublicKey, Signer, default_hash

if TYPE_CHECKING:
    from keyseal._internal.openpgp.signature import Hasher

TAG_ONE_PASS_SIGNATURE = 4
TAG_LITERAL_DATA = 11
KIND_MESSAGE = "MESSAGE"


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
    from keyseal._internal.openpgp.cert import merge_certificates
    from keyseal._internal.openpgp.verify import key_problem

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


def natural_hash(public_key: PublicKey) -> HashName:
    """The hash matching a key's strength for data signatures: SHA-256 for Ed25519 and P-256 (the curves' level,
    and about twice as fast as SHA-512 on CPUs with SHA extensions), SHA-384 for P-384, SHA-512 for P-521."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "sha256"
    return default_hash(public_key)


def choose_hash(signer: Signer, public_key: PublicKey, requested: HashName | None,
                preferences: tuple[int, ...] = ()) -> HashName:
    """The requested hash; else the key's natural one when the certificate's hash preferences (OpenPGP IDs, most
    wanted first) allow it, else the first preferred hash the custody can sign and the key fits. A hash the
    custody cannot sign or that is too short for the key is refused."""
    supported = signer.supported_hashes()
    if requested is None:
        requested = _preferred_hash(public_key, supported, preferences)
    elif requested not in supported:
        raise UnsupportedKeyError(
            f"{signer.uri} cannot sign {requested} digests; it offers {', '.join(supported)}"
        )
    check_hash_fits_key(public_key, requested)
    return requested


def _preferred_hash(public_key: PublicKey, supported: tuple[HashName, ...],
                    preferences: tuple[int, ...]) -> HashName:
    natural = natural_hash(public_key)
    names = {hash_id: name for name, hash_id in HASH_IDS.items()}
    wanted = [names[hash_id] for hash_id in preferences if hash_id in names]
    if natural in supported and (not wanted or natural in wanted):
        return natural
    for name in wanted:
        if name in supported and hash_fits_key(public_key, name):
            return name
    return natural if natural in supported else supported[0]


def hash_fits_key(public_key: PublicKey, hash_name: HashName) -> bool:
    try:
        check_hash_fits_key(public_key, hash_name)
    except UnsupportedKeyError:
        return False
    return True


def signature_packet(
    signer: Signer,
    identity: SigningIdentity,
    data_hasher: Hasher,
    hash_name: HashName,
    created: int | None = None,
    sig_type: int = SIG_BINARY,
) -> bytes:
    """A signature packet (binary-document unless `sig_type` says otherwise) over data already fed to
    `data_hasher` (for a text signature: the canonical text)."""
    when = int(time.time()) if created is None else created
    body = make_signature(
        signer,
        identity.public_key,
        sig_type,
        hash_name,
        data_hasher,
        creation_subpackets(when, identity.fingerprint),
        identity.fingerprint,
    )
    return encode_packet(TAG_SIGNATURE, body)


def render(packet: bytes, armored: bool) -> bytes:
    return armor(packet, KIND_SIGNATURE) if armored else packet


def text_signature_packet(signer: Signer, identity: SigningIdentity, hash_name: HashName, canonical: bytes,
                          created: int | None = None) -> bytes:
    """A text (0x01) signature over text already in its canonical, signed form."""
    hasher = new_hasher(HASH_IDS[hash_name])
    hasher.update(canonical)
    return signature_packet(signer, identity, hasher, hash_name, created, SIG_TEXT)


def cleartext_document(signer: Signer, identity: SigningIdentity, hash_name: HashName, text: bytes,
                       created: int | None = None) -> bytes:
    """A cleartext signed message (RFC 9580 section 7) over `text`: one signature call."""
    packet = text_signature_packet(signer, identity, hash_name, signed_text(text), created)
    return render_cleartext(text, hash_name, armor(packet, KIND_SIGNATURE))


def signed_message(signer: Signer, identity: SigningIdentity, hash_name: HashName, data: bytes, text: bool,
                   filename: str = "", created: int | None = None) -> bytes:
    """A one-pass signed message, as `gpg --sign` writes it (uncompressed): one-pass signature packet, literal
    data packet, signature packet. A text signature covers the data with CR LF line endings."""
    when = int(time.time()) if created is None else created
    sig_type = SIG_TEXT if text else SIG_BINARY
    hasher = new_hasher(HASH_IDS[hash_name])
    hasher.update(text_mode_canonical(data) if text else data)
    signature = signature_packet(signer, identity, hasher, hash_name, when, sig_type)
    one_pass = struct.pack(">BBBB", 3, sig_type, HASH_IDS[hash_name], algorithm_of(identity.public_key))
    one_pass += identity.fingerprint[-8:] + b"\x01"
    name = filename.encode("utf-8")[:255]
    literal = (b"t" if text else b"b") + bytes([len(name)]) + name + struct.pack(">I", when) + data
    return (encode_packet(TAG_ONE_PASS_SIGNATURE, one_pass) + encode_packet(TAG_LITERAL_DATA, literal)
            + signature)


__all__ = [
    "HASH_IDS",
    "SigningIdentity",
    "choose_hash",
    "cleartext_document",
    "hash_fits_key",
    "identity_from_certificate",
    "identity_from_signer",
    "natural_hash",
    "render",
    "signature_packet",
    "signed_message",
    "text_signature_packet",
]
