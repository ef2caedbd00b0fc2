"""OpenPGP certificates: minting one around a Signer's public key, and reading one back with its self-signatures
checked (user IDs, expiry, revocation, signing subkeys)."""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from keyseal._internal.frozen import Record
from keyseal._internal.openpgp.armor import KIND_PUBLIC_KEY, armor, dearmor_or_binary
from keyseal._internal.openpgp.keys import (
    ALGO_NAMES,
    KeyPacket,
    encode_public_key_body,
    fingerprint_of,
    parse_key_packet,
)
from keyseal._internal.openpgp.packets import (
    TAG_MARKER,
    TAG_PUBLIC_KEY,
    TAG_PUBLIC_SUBKEY,
    TAG_SECRET_KEY,
    TAG_SECRET_SUBKEY,
    TAG_SIGNATURE,
    TAG_TRUST,
    TAG_USER_ATTRIBUTE,
    TAG_USER_ID,
    Packet,
    encode_packet,
    encode_subpacket,
    iter_packets,
)
from keyseal._internal.openpgp.signature import (
    HASH_IDS,
    KEY_FLAG_CERTIFY,
    KEY_FLAG_SIGN,
    SIG_CERTIFICATIONS,
    SIG_DIRECT_KEY,
    SIG_KEY_REVOCATION,
    SIG_POSITIVE_CERTIFICATION,
    SIG_PRIMARY_KEY_BINDING,
    SIG_SUBKEY_BINDING,
    SIG_SUBKEY_REVOCATION,
    SUB_FEATURES,
    SUB_KEY_EXPIRATION,
    SUB_KEY_FLAGS,
    SUB_PREFERRED_HASH,
    SignaturePacket,
    check_hash_fits_key,
    check_signature_math,
    creation_subpackets,
    make_signature,
    new_hasher,
    new_message_hasher,
    parse_signature,
)
from keyseal.errors import OpenPGPError, UsageError

if TYPE_CHECKING:
    from keyseal.signer import HashName, PublicKey, Signer

__all__ = [
    "Certificate",
    "SigningKey",
    "armor_certificate",
    "creation_time",
    "key_prefix",
    "load_certificates",
    "merge_certificates",
    "mint_certificate",
    "user_id_for",
]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_EMAIL = rf"^[^\s@<>()\[\],;:\"]+@{_LABEL}(?:\.{_LABEL})+$"  # compiled on first use (re's cache), not at import
# Revocation reasons after which signatures made before the revocation stay valid (superseded, retired).
_SOFT_REVOCATION_REASONS = frozenset({1, 3})


def user_id_for(name: str, email: str) -> str:
    """`Name <email>`, refusing values that would make an ambiguous or multi-line user ID."""
    if not re.match(_EMAIL, email):
        raise UsageError(f"invalid email address {email!r}")
    if not name.strip() or any(ch in name for ch in "<>\r\n\0"):
        raise UsageError("invalid name: it must be non-empty and contain no '<', '>' or line breaks")
    return f"{name.strip()} <{email}>"


def key_prefix(body: bytes) -> bytes:
    """How a key packet enters a signature hash."""
    return b"\x99" + struct.pack(">H", len(body)) + body


def creation_time(signer: Signer, given: int | None) -> int:
    """A new certificate's creation time: `given`, else when the custody made the key (KMS DescribeKey, a
    wrapped record's time). A custody that cannot tell (PKCS#11, a role without kms:DescribeKey) is a UsageError
    asking for --created, never a guess: the time is part of the fingerprint."""
    if given is not None:
        return given
    moment = signer.created_at()
    if moment is None:
        raise UsageError(f"cannot tell when {signer.uri} was created: pass --created RFC3339")
    return int(moment.timestamp())


def mint_certificate(
    signer: Signer,
    *,
    name: str,
    email: str,
    created: int,
    expires_seconds: int | None = None,
    hash_name: HashName | None = None,
) -> bytes:
    """A binary v4 certificate for the signer's key: public key, user ID and a positive certification that the
    signer computes (one signature call). The self-signature is dated at the key's creation time, so pinned
    inputs give the same certificate again (byte for byte with deterministic RSA and Ed25519 signatures)."""
    public_key = signer.public_key()
    hash_name = hash_name or _default_hash(signer, public_key)
    check_hash_fits_key(public_key, hash_name)
    if not 0 < created < 2**32:
        raise UsageError(f"the creation time {created} is outside the range OpenPGP can record (1970 to 2106)")
    if expires_seconds is not None and not 0 < expires_seconds < 2**32:
        raise UsageError("the expiry must be a positive duration")
    uid = user_id_for(name, email).encode("utf-8")
    body = encode_public_key_body(public_key, created)
    fingerprint = fingerprint_of(body)
    hashed = creation_subpackets(created, fingerprint)
    hashed += encode_subpacket(SUB_KEY_FLAGS, bytes([KEY_FLAG_CERTIFY | KEY_FLAG_SIGN]))
    if expires_seconds is not None:
        hashed += encode_subpacket(SUB_KEY_EXPIRATION, struct.pack(">I", expires_seconds))
    hashed += encode_subpacket(SUB_PREFERRED_HASH, bytes([HASH_IDS["sha512"], HASH_IDS["sha384"], HASH_IDS["sha256"]]))
    hashed += encode_subpacket(SUB_FEATURES, b"\x01")
    hasher = new_hasher(HASH_IDS[hash_name])
    hasher.update(key_prefix(body) + b"\xb4" + struct.pack(">I", len(uid)) + uid)
    from keyseal._internal import audit  # only signing needs it: verification stays light to start

    with audit.subject(uid.decode("utf-8")):  # the audit log names a self-signature by its user ID
        sig = make_signature(signer, public_key, SIG_POSITIVE_CERTIFICATION, hash_name, hasher, hashed, fingerprint)
    return encode_packet(TAG_PUBLIC_KEY, body) + encode_packet(TAG_USER_ID, uid) + encode_packet(TAG_SIGNATURE, sig)


def _default_hash(signer: Signer, public_key: PublicKey) -> HashName:
    from keyseal.signer import default_hash

    preferred = default_hash(public_key)
    supported = signer.supported_hashes()
    return preferred if preferred in supported else supported[0]


def armor_certificate(binary: bytes) -> bytes:
    return armor(binary, KIND_PUBLIC_KEY)


class SigningKey(Record):
    """A key of a certificate that may make data signatures, with the window in which it may."""

    __slots__ = ("expires", "key", "revoked_at")

    def __init__(self, key: KeyPacket, expires: int | None, revoked_at: int | None = None) -> None:
        self.key = key
        self.expires = expires  # absolute Unix time, None for never
        self.revoked_at = revoked_at  # signatures at or after this time are invalid; 0 = all (hard revocation)


class Certificate(Record):
    """A transferable public key whose self-signatures keyseal has checked."""

    __slots__ = (
        "binary",
        "expires",
        "hash_preferences",
        "primary",
        "revoked",
        "signing_keys",
        "subkeys",
        "user_ids",
    )

    def __init__(self, primary: KeyPacket, user_ids: list[str], signing_keys: list[SigningKey], binary: bytes,
                 revoked: bool = False, expires: int | None = None, subkeys: list[KeyPacket] | None = None,
                 hash_preferences: tuple[int, ...] = ()) -> None:
        self.primary = primary
        self.user_ids = user_ids
        self.signing_keys = signing_keys
        self.binary = binary
        self.revoked = revoked
        self.expires = expires
        self.subkeys: list[KeyPacket] = [] if subkeys is None else subkeys
        self.hash_preferences = hash_preferences  # OpenPGP hash IDs from the latest self-signature, most wanted first

    @property
    def fingerprint(self) -> str:
        return self.primary.fingerprint_hex


def load_certificates(data: bytes, source: str = "certificate") -> list[Certificate]:
    """Every certificate in an armored or binary file (a keyring may hold several)."""
    try:
        binary = dearmor_or_binary(data)
        packets = list(iter_packets(binary))
    except OpenPGPError as exc:
        raise OpenPGPError(f"{source} is not an OpenPGP certificate ({exc.message}): give the .asc file keyseal "
                           f"keys mint (or gpg --export) wrote") from exc
    if not packets:
        raise OpenPGPError(f"{source} holds no OpenPGP data")
    groups: list[list[Packet]] = []
    for packet in packets:
        if packet.tag in (TAG_SECRET_KEY, TAG_SECRET_SUBKEY):
            raise OpenPGPError(f"{source} holds a secret key: give the public certificate instead")
        if packet.tag == TAG_PUBLIC_KEY:
            groups.append([packet])
        elif packet.tag in (TAG_TRUST, TAG_MARKER):
            continue
        elif not groups:
            raise OpenPGPError(f"{source} is not an OpenPGP certificate (it starts with packet type {packet.tag})")
        else:
            groups[-1].append(packet)
    if not groups:
        raise OpenPGPError(f"{source} holds no OpenPGP certificate")
    return [_build_certificate(group, source) for group in groups]


def _self_signed(sig: SignaturePacket, signer: KeyPacket, prefix: bytes) -> bool:
    """Check a self-signature: issuer (if named) is `signer`, hash acceptable, math valid."""
    ids = sig.issuer_key_ids
    if ids and signer.key_id not in ids:
        return False
    if sig.issuer_fingerprint is not None and sig.issuer_fingerprint != signer.fingerprint:
        return False
    if sig.created is None or sig.created < signer.created or sig.unknown_critical():
        return False
    try:
        hasher = new_message_hasher(sig.hash_id)
    except OpenPGPError:
        return False
    hasher.update(prefix + sig.trailer())
    return check_signature_math(sig, signer.public_key, signer.algorithm, hasher.digest())


def _build_certificate(group: list[Packet], source: str) -> Certificate:
    primary = parse_key_packet(group[0].body)
    primary_prefix = key_prefix(primary.body)
    user_ids: list[str] = []
    self_sigs: list[SignaturePacket] = []
    revocations: list[SignaturePacket] = []
    subkeys: list[tuple[KeyPacket, list[SignaturePacket]]] = []
    current_uid: bytes | None = None
    current_kind = "primary"
    for packet in group[1:]:
        if packet.tag == TAG_USER_ID:
            current_uid, current_kind = packet.body, "uid"
        elif packet.tag == TAG_USER_ATTRIBUTE:
            current_uid, current_kind = None, "attribute"
        elif packet.tag == TAG_PUBLIC_SUBKEY:
            if _foreign_algorithm(packet.body):  # e.g. gpg's cv25519 encryption subkey: it cannot sign, skip it
                current_kind = "foreign subkey"
            else:
                subkeys.append((parse_key_packet(packet.body), []))
                current_kind = "subkey"
        elif packet.tag == TAG_SIGNATURE:
            sig = parse_signature(packet.body)
            if current_kind == "primary":
                if sig.sig_type == SIG_DIRECT_KEY and _self_signed(sig, primary, primary_prefix):
                    self_sigs.append(sig)
                elif sig.sig_type == SIG_KEY_REVOCATION and _self_signed(sig, primary, primary_prefix):
                    revocations.append(sig)
            elif current_kind == "uid" and current_uid is not None and sig.sig_type in SIG_CERTIFICATIONS:
                uid_prefix = primary_prefix + b"\xb4" + struct.pack(">I", len(current_uid)) + current_uid
                if _self_signed(sig, primary, uid_prefix):
                    self_sigs.append(sig)
                    text = current_uid.decode("utf-8", errors="replace")
                    if text not in user_ids:
                        user_ids.append(text)
            elif current_kind == "subkey":
                subkeys[-1][1].append(sig)
        else:
            raise OpenPGPError(f"{source}: unexpected packet type {packet.tag} in a certificate")
    if not self_sigs:
        raise OpenPGPError(
            f"{source}: certificate {primary.fingerprint_hex} has no valid self-signature (or only SHA-1 ones)"
        )
    latest = max(self_sigs, key=lambda s: s.created or 0)
    expires = _expiry(primary, latest)
    revoked_at = _revocation_time(revocations)
    signing: list[SigningKey] = []
    flags = latest.key_flags
    if flags is None or flags & KEY_FLAG_SIGN:
        signing.append(SigningKey(primary, expires, revoked_at))
    for subkey, sigs in subkeys:
        entry = _signing_subkey(primary, subkey, sigs, expires, revoked_at)
        if entry is not None:
            signing.append(entry)
    return Certificate(
        primary=primary,
        user_ids=user_ids,
        signing_keys=signing,
        binary=b"".join(_reencode(p) for p in group),
        revoked=revoked_at is not None,
        expires=expires,
        subkeys=[sub for sub, _ in subkeys],
        hash_preferences=tuple(_hash_preferences(latest)),
    )


def _hash_preferences(sig: SignaturePacket) -> bytes:
    for sub in sig.hashed:
        if sub.type == SUB_PREFERRED_HASH:
            return sub.body
    return b""


def merge_certificates(certificates: list[Certificate]) -> list[Certificate]:
    """One certificate per primary key. Copies of one key (an embedded copy and the one a WKD serves with a
    revocation added, or two files given to `verify`) are merged packet by packet, so a revocation or a newer
    self-signature in any copy counts: otherwise the copy without the revocation would still verify."""
    groups: dict[str, list[Certificate]] = {}
    for cert in certificates:
        groups.setdefault(cert.fingerprint, []).append(cert)
    return [group[0] if len(group) == 1 else _merge_group(group) for group in groups.values()]


def _merge_group(group: list[Certificate]) -> Certificate:
    primary: Packet | None = None
    direct: list[Packet] = []  # signatures on the primary key itself (direct-key, revocations)
    components: dict[Packet, list[Packet]] = {}  # user ID / attribute / subkey -> its signatures
    seen: set[tuple[Packet | None, Packet]] = set()  # (component, signature): linear, not quadratic, dedup
    for cert in group:
        packets = list(iter_packets(cert.binary))
        primary = primary or packets[0]
        current: list[Packet] = direct
        component: Packet | None = None
        for packet in packets[1:]:
            if packet.tag in (TAG_USER_ID, TAG_USER_ATTRIBUTE, TAG_PUBLIC_SUBKEY):
                component = packet
                current = components.setdefault(packet, [])
            elif (component, packet) not in seen:
                seen.add((component, packet))
                current.append(packet)
    assert primary is not None
    merged = [primary, *direct]
    # User IDs before subkeys, as a transferable public key orders them.
    for component, sigs in sorted(components.items(), key=lambda item: item[0].tag == TAG_PUBLIC_SUBKEY):
        merged += [component, *sigs]
    return _build_certificate(merged, f"certificate {group[0].fingerprint}")


def _foreign_algorithm(body: bytes) -> bool:
    """A well-formed v4 subkey of an algorithm keyseal does not read (encryption-only, DSA ...): not an error
    in a certificate, since such a subkey can never have made a signature keyseal accepts."""
    return len(body) >= 6 and body[0] == 4 and body[5] not in ALGO_NAMES


def _reencode(packet: Packet) -> bytes:
    return encode_packet(packet.tag, packet.body)


def _expiry(key: KeyPacket, sig: SignaturePacket) -> int | None:
    seconds = sig.key_expiration_seconds
    return key.created + seconds if seconds else None


def _revocation_time(revocations: list[SignaturePacket]) -> int | None:
    """0 for a hard revocation (no signature is valid), the revocation time for a soft one, None if not revoked."""
    result: int | None = None
    for sig in revocations:
        reason = next((sub.body[0] for sub in sig.hashed if sub.type == 29 and sub.body), 0)
        when = 0 if reason not in _SOFT_REVOCATION_REASONS else (sig.created or 0)
        result = when if result is None else min(result, when)
    return result


def _signing_subkey(
    primary: KeyPacket, subkey: KeyPacket, sigs: list[SignaturePacket], primary_expires: int | None,
    primary_revoked: int | None,
) -> SigningKey | None:
    """A subkey may sign data only with a valid binding that grants signing and an embedded back-signature."""
    prefix = key_prefix(primary.body) + key_prefix(subkey.body)
    bindings = [s for s in sigs if s.sig_type == SIG_SUBKEY_BINDING and _self_signed(s, primary, prefix)]
    revoked = [s for s in sigs if s.sig_type == SIG_SUBKEY_REVOCATION and _self_signed(s, primary, prefix)]
    if not bindings:
        return None
    binding = max(bindings, key=lambda s: s.created or 0)
    if not (binding.key_flags or 0) & KEY_FLAG_SIGN:
        return None
    if not any(_valid_back_signature(raw, subkey, prefix) for raw in binding.embedded_signatures):
        return None
    expires = _expiry(subkey, binding)
    if primary_expires is not None:
        expires = primary_expires if expires is None else min(expires, primary_expires)
    revoked_at = _revocation_time(revoked)
    if primary_revoked is not None:
        revoked_at = primary_revoked if revoked_at is None else min(revoked_at, primary_revoked)
    return SigningKey(subkey, expires, revoked_at)


def _valid_back_signature(raw: bytes, subkey: KeyPacket, prefix: bytes) -> bool:
    try:
        sig = parse_signature(raw)
    except OpenPGPError:
        return False
    return sig.sig_type == SIG_PRIMARY_KEY_BINDING and _self_signed(sig, subkey, prefix)
