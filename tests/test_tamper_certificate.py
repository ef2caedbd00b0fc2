"""Tamper matrices for a minted certificate and for a revocation signature: every byte flipped in turn (three
masks: the low bit, the high bit, the whole byte), each variant loaded by keyseal.

A certificate's verdict is what it lets `verify` accept: its fingerprint, its user IDs, its signing keys with
their validity windows (expiry, revocation), and which signatures verify with it.

How `load_certificates` treats each class of position of a minted certificate (public key, user ID, positive
certification):

- key packet (header, version, creation time, algorithm, key material): rejected, the fingerprint changes and
  the self-signature no longer verifies, or the packet no longer parses;
- user ID packet (header, text): rejected, its self-signature no longer verifies and no user ID is left (a
  flipped tag makes it a trust packet, which is skipped, or another packet);
- self-signature header, hashed part, left 16 bits, MPIs: rejected, a parse error or no valid self-signature;
- self-signature unhashed area length and subpacket length: rejected, the packet no longer parses;
- self-signature unhashed subpacket type and issuer key ID (9 bytes, 27 variants): accepted with the same
  verdict, the issuer being the hashed issuer fingerprint.

A revocation signature (placed after the primary key, as `keyseal keys revoke` writes it) is a signature like
any other, but one whose loss an attacker who can edit a certificate can always cause (by deleting it). Its
flips therefore have three allowed outcomes: the certificate is rejected (the packet no longer parses), the
revocation is ignored (it no longer verifies: the certificate looks unrevoked, exactly as if it had been
deleted), or the same revocation (unhashed bytes). Never a different one: a hard (compromised) revocation
cannot be turned into a soft one or moved in time, because reason and time are hashed. And a copy with the
revocation broken or stripped is merged with any genuine copy the verifier also holds (the WKD copy, a second
--cert), so the revocation still applies there.
"""

from __future__ import annotations

import pytest
from fuzz.corpus import CREATED, DATA, NOW, SIGNED, MemorySigner, fixed_keys
from fuzz.tamper import Matrix

from keyseal._internal.openpgp.cert import Certificate, load_certificates, merge_certificates, mint_certificate
from keyseal._internal.openpgp.packets import iter_packets
from keyseal._internal.openpgp.revoke import revoke
from keyseal._internal.openpgp.sign import identity_from_certificate, signature_packet
from keyseal._internal.openpgp.signature import HASH_IDS, new_hasher
from keyseal._internal.openpgp.verify import verify_bytes
from keyseal.errors import KeysealError, OpenPGPError, VerificationError
from keyseal.signer import HashName

REJECTED = frozenset({"rejected"})
SAME = frozenset({"accepted-same"})
UNHASHED_NEUTRAL = ("unhashed subpacket type", "unhashed issuer key ID")


def verdict_of(cert: Certificate) -> tuple[object, ...]:
    keys = tuple((k.key.fingerprint_hex, k.expires, k.revoked_at) for k in cert.signing_keys)
    return cert.fingerprint, tuple(cert.user_ids), keys, cert.revoked, cert.expires


RSA_SIGNER = MemorySigner(fixed_keys()["rsa2048"], "rsa2048")  # generated: made once per module


def signer_for(label: str) -> MemorySigner:
    return RSA_SIGNER if label == "rsa2048" else MemorySigner(fixed_keys()[label], label)


def signature_over_data(label: str, cert: Certificate, created: int = SIGNED) -> bytes:
    signer = signer_for(label)
    hash_name: HashName = "sha512" if label == "ed25519" else "sha384" if label == "p384" else "sha256"
    hasher = new_hasher(HASH_IDS[hash_name])
    hasher.update(DATA)
    return signature_packet(signer, identity_from_certificate(signer, [cert]), hasher, hash_name, created)


def signature_layout(packet: bytes, prefix: str = "") -> list[str]:
    """Classes of the bytes of one signature packet (new-format header) as keyseal writes it."""
    header = 2 if packet[1] < 192 else 3
    body = packet[header:]
    hashed_len = int.from_bytes(body[4:6], "big")
    unhashed_at = 6 + hashed_len
    assert body[unhashed_at : unhashed_at + 4] == b"\x00\x0a\x09\x10"
    classes = ["signature header"] * header + ["hashed part"] * (6 + hashed_len) + ["unhashed area length"] * 2
    classes += ["unhashed subpacket length", "unhashed subpacket type"] + ["unhashed issuer key ID"] * 8
    classes += ["left 16 bits"] * 2
    classes += ["signature MPIs"] * (len(packet) - len(classes))
    return [prefix + kind for kind in classes]


def certificate_layout(binary: bytes) -> list[str]:
    """Classes of the bytes of a minted certificate: key packet, user ID packet, self-signature."""
    layout: list[str] = []
    pos = 0
    for packet in iter_packets(binary):
        header = 2 if len(packet.body) < 192 else 3
        raw = binary[pos : pos + header + len(packet.body)]
        pos += len(raw)
        if packet.tag == 6:
            layout += ["key packet"] * len(raw)
        elif packet.tag == 13:
            layout += ["user ID packet"] * len(raw)
        else:
            layout += signature_layout(raw)
    assert pos == len(binary)
    return layout


@pytest.mark.slow
@pytest.mark.parametrize("label", ["ed25519", "p256", "rsa2048"])
def test_certificate_matrix(label: str) -> None:
    signer = signer_for(label)
    binary = mint_certificate(signer, name="Release Key", email="release@example.org", created=CREATED,
                              expires_seconds=5 * 365 * 86400)
    (genuine,) = load_certificates(binary)
    expected = verdict_of(genuine)
    good = signature_over_data(label, genuine)
    stranger = load_certificates(mint_certificate(MemorySigner(fixed_keys()["p384"], "x"), name="Stranger",
                                                  email="stranger@example.org", created=CREATED))[0]
    stranger_sig = signature_over_data("p384", stranger)
    layout = certificate_layout(binary)

    def classify(index: int, _mask: int) -> tuple[str, frozenset[str]]:
        kind = layout[index]
        return kind, SAME if kind in UNHASHED_NEUTRAL else REJECTED

    def verdict(variant: bytes) -> str:
        try:
            certs = load_certificates(variant, "tampered certificate")
        except OpenPGPError:
            return "rejected"
        if [verdict_of(c) for c in certs] != [expected]:
            return "accepted-DIFFERENT"
        if verify_bytes(certs, DATA, good, NOW).fingerprint != genuine.fingerprint:
            return "accepted-DIFFERENT-SIGNER"
        try:
            verify_bytes(certs, DATA, stranger_sig, NOW)
        except VerificationError:
            return "accepted-same"
        return "accepted-VERIFIES-STRANGER"

    matrix = Matrix().run(binary, classify, verdict)
    assert not matrix.unexpected, "\n".join(matrix.unexpected[:20]) + "\n" + matrix.table()
    assert matrix.total() == 3 * len(binary)
    assert matrix.total("accepted-same") == 27, matrix.table()
    assert matrix.total("rejected") == 3 * len(binary) - 27
    for kind in ("key packet", "user ID packet", "hashed part", "signature MPIs"):
        assert matrix.counts[kind, "rejected"] == 3 * layout.count(kind), (kind, matrix.table())


@pytest.mark.slow
@pytest.mark.parametrize(("reason", "revoked_at"), [("compromised", 0), ("superseded", SIGNED + 60)])
def test_revocation_matrix(reason: str, revoked_at: int) -> None:
    signer = signer_for("ed25519")
    (plain,) = load_certificates(mint_certificate(signer, name="Release Key", email="release@example.org",
                                                  created=CREATED))
    revoked_binary = revoke(signer, plain, reason, created=SIGNED + 60, description="rotated")
    (genuine,) = load_certificates(revoked_binary)
    assert genuine.revoked and genuine.signing_keys[0].revoked_at == revoked_at
    expected, unrevoked = verdict_of(genuine), verdict_of(plain)
    before = signature_over_data("ed25519", plain, created=SIGNED)  # made before the revocation
    after = signature_over_data("ed25519", plain, created=SIGNED + 120)  # made after it
    packets = list(iter_packets(revoked_binary))
    key_len = 2 + len(packets[0].body)
    rev_len = (2 if len(packets[1].body) < 192 else 3) + len(packets[1].body)
    layout = ["outside the revocation"] * key_len + signature_layout(
        revoked_binary[key_len : key_len + rev_len], "revocation ")
    layout += ["outside the revocation"] * (len(revoked_binary) - len(layout))

    def classify(index: int, _mask: int) -> tuple[str, frozenset[str]]:
        kind = layout[index]
        if kind.removeprefix("revocation ") in UNHASHED_NEUTRAL:
            return kind, SAME
        if kind == "revocation signature header":
            return kind, REJECTED
        return kind, frozenset({"rejected", "revocation-ignored"})

    def verdict(variant: bytes) -> str:
        try:
            certs = load_certificates(variant, "tampered revocation")
        except OpenPGPError:
            return "rejected"
        (cert,) = certs
        # With a genuine copy also at hand, a broken revocation cannot undo the real one.
        (merged,) = merge_certificates([cert, genuine])
        assert verdict_of(merged) == expected
        with pytest.raises(VerificationError):
            verify_bytes([cert, genuine], DATA, after, NOW)
        if verdict_of(cert) == expected:
            with pytest.raises(VerificationError):
                verify_bytes([cert], DATA, after, NOW)
            return "accepted-same"
        if verdict_of(cert) == unrevoked:
            return "revocation-ignored"
        return "accepted-DIFFERENT"

    window = range(key_len, key_len + rev_len)
    matrix = Matrix()
    for mask in (0x01, 0x80, 0xFF):
        for index in window:
            kind, allowed = classify(index, mask)
            variant = bytearray(revoked_binary)
            variant[index] ^= mask
            outcome = verdict(bytes(variant))
            matrix.counts[kind, outcome] += 1
            if outcome not in allowed:
                matrix.unexpected.append(f"byte {index} ^ {mask:#04x} ({kind}): {outcome}")
    assert not matrix.unexpected, "\n".join(matrix.unexpected[:20]) + "\n" + matrix.table()
    assert matrix.total() == 3 * rev_len
    assert matrix.total("accepted-same") == 27, matrix.table()
    assert matrix.total("revocation-ignored") > 3 * 32, matrix.table()  # the hashed part and MPIs, mostly
    assert matrix.total("rejected") + matrix.total("revocation-ignored") == 3 * rev_len - 27
    # What the genuine revocation does, for reference: the hard one refuses even the earlier signature.
    if reason == "compromised":
        with pytest.raises(VerificationError):
            verify_bytes([genuine], DATA, before, NOW)
    else:
        assert verify_bytes([genuine], DATA, before, NOW).fingerprint == genuine.fingerprint


def test_certificate_bytes_outside_the_revocation_behave_as_in_an_unrevoked_certificate() -> None:
    """The rest of a revoked certificate (key, user ID, self-signature) under the same flips: rejected, or the
    same revoked certificate (the self-signature's unhashed bytes)."""
    signer = signer_for("ed25519")
    (plain,) = load_certificates(mint_certificate(signer, name="Release Key", email="release@example.org",
                                                  created=CREATED))
    revoked_binary = revoke(signer, plain, "compromised", created=SIGNED + 60)
    (genuine,) = load_certificates(revoked_binary)
    packets = list(iter_packets(revoked_binary))
    rev_start = 2 + len(packets[0].body)
    rev_end = rev_start + 2 + len(packets[1].body)
    outside = revoked_binary[:rev_start] + revoked_binary[rev_end:]
    layout = certificate_layout(outside)

    def check(variant: bytes) -> str:
        full = variant[:rev_start] + revoked_binary[rev_start:rev_end] + variant[rev_start:]
        try:
            (cert,) = load_certificates(full)
        except KeysealError:
            return "rejected"
        return "accepted-same" if verdict_of(cert) == verdict_of(genuine) else "accepted-DIFFERENT"

    def classify(index: int, _mask: int) -> tuple[str, frozenset[str]]:
        return layout[index], SAME if layout[index] in UNHASHED_NEUTRAL else REJECTED

    matrix = Matrix().run(outside, classify, check)
    assert not matrix.unexpected, "\n".join(matrix.unexpected[:20]) + "\n" + matrix.table()
    assert matrix.total("accepted-same") == 27 and matrix.total() == 3 * len(outside)
