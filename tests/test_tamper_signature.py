"""Tamper matrix for keyseal's detached signatures: every byte flipped in turn (three masks: the low bit, the
high bit, the whole byte), each variant verified by keyseal's verifier with two certificates on offer (the
signer's and another key's).

How the verifier treats each class of position in the binary signature packet (RFC 9580 v4 layout):

- packet header (tag, length): rejected, not a signature packet or the framing breaks;
- hashed part (version, type, algorithms, hashed length, creation time, issuer fingerprint): rejected, by a
  parse error, a refused hash, or a digest that no longer matches;
- unhashed area length (2 bytes) and unhashed subpacket length (1): rejected, the packet no longer parses;
- unhashed subpacket type (1): accepted, same signer, same data: the issuer key ID becomes an unknown, ignored
  subpacket, and the issuer is the hashed fingerprint;
- unhashed issuer key ID (8): accepted, same signer, same data: a key ID is only a hint, the hashed issuer
  fingerprint decides which key is checked (a key ID naming another offered key changes nothing);
- left 16 bits of the digest (2): rejected by the quick check;
- signature MPIs: rejected, a non-canonical MPI or failing math.

So 9 positions x 3 masks = 27 variants are accepted, all naming the same signer, the same creation time, and
verifying only over the original data. For an armored signature the CRC-24 covers every binary byte, so
those 27 are rejected there too; the armor accepts only changes that decode to the identical packet: the blank
line after the BEGIN line or the final newline turned into another whitespace byte (0x0b), and a flip of the
unused low bits of the last base64 character (non-canonical base64, as RFC 4648 decoders accept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from fuzz.corpus import CREATED, DATA, NOW, SIGNED, MemorySigner, fixed_keys
from fuzz.tamper import Matrix

from keyseal._internal.openpgp.armor import dearmor_or_binary
from keyseal._internal.openpgp.cert import Certificate, load_certificates, mint_certificate
from keyseal._internal.openpgp.sign import identity_from_certificate, render, signature_packet
from keyseal._internal.openpgp.signature import HASH_IDS, new_hasher
from keyseal._internal.openpgp.verify import verify_bytes
from keyseal.errors import KeysealError, VerificationError
from keyseal.signer import HashName

OTHER_DATA = DATA + b"!"
REJECTED = frozenset({"rejected"})
SAME = frozenset({"accepted-same"})
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class Signed:
    label: str
    certificates: list[Certificate]  # the signer's first, then another key's
    packet: bytes  # binary signature packet over DATA


@pytest.fixture(scope="module")
def signed() -> dict[str, Signed]:
    keys = fixed_keys()
    other_signer = MemorySigner(keys["p384"], "other")
    other = load_certificates(mint_certificate(other_signer, name="Other", email="other@example.org",
                                               created=CREATED))[0]
    made: dict[str, Signed] = {}
    cases: tuple[tuple[str, HashName], ...] = (("ed25519", "sha512"), ("p256", "sha256"), ("rsa2048", "sha256"))
    for label, hash_name in cases:
        signer = MemorySigner(keys[label], label)
        cert = load_certificates(mint_certificate(signer, name="Release", email="release@example.org",
                                                  created=CREATED))[0]
        hasher = new_hasher(HASH_IDS[hash_name])
        hasher.update(DATA)
        packet = signature_packet(signer, identity_from_certificate(signer, [cert]), hasher, hash_name, SIGNED)
        made[label] = Signed(label, [cert, other], packet)
    return made


def verdict_for(case: Signed) -> Callable[[bytes], str]:
    expected = verify_bytes(case.certificates, DATA, case.packet, NOW)
    assert expected.fingerprint == case.certificates[0].fingerprint

    def verdict(variant: bytes) -> str:
        try:
            result = verify_bytes(case.certificates, DATA, variant, NOW)
        except KeysealError:
            return "rejected"
        if (result.fingerprint, result.key_fingerprint, result.created, result.hash_name) != (
                expected.fingerprint, expected.key_fingerprint, expected.created, expected.hash_name):
            return "accepted-DIFFERENT-SIGNER"
        try:
            verify_bytes(case.certificates, OTHER_DATA, variant, NOW)
        except VerificationError:
            return "accepted-same"
        return "accepted-DIFFERENT-DATA"

    return verdict


def binary_layout(packet: bytes) -> list[str]:
    """The class of every byte of a keyseal signature packet (new-format header)."""
    assert packet[0] == 0xC2 and packet[1] < 224
    header = 2 if packet[1] < 192 else 3
    body = packet[header:]
    assert len(body) == (packet[1] if header == 2 else ((packet[1] - 192) << 8) + packet[2] + 192)
    hashed_len = int.from_bytes(body[4:6], "big")
    unhashed_at = 6 + hashed_len
    unhashed_len = int.from_bytes(body[unhashed_at : unhashed_at + 2], "big")
    area = body[unhashed_at + 2 : unhashed_at + 2 + unhashed_len]
    assert area[:2] == b"\x09\x10" and unhashed_len == 10, "keyseal writes one unhashed subpacket: the key ID"
    classes = ["packet header"] * header + ["hashed part"] * (6 + hashed_len) + ["unhashed area length"] * 2
    classes += ["unhashed subpacket length", "unhashed subpacket type"] + ["unhashed issuer key ID"] * 8
    classes += ["left 16 bits"] * 2
    classes += ["signature MPIs"] * (len(packet) - len(classes))
    return classes


@pytest.mark.slow
@pytest.mark.parametrize("label", ["ed25519", "p256", "rsa2048"])
def test_binary_signature_matrix(label: str, signed: dict[str, Signed]) -> None:
    case = signed[label]
    layout = binary_layout(case.packet)

    def classify(index: int, _mask: int) -> tuple[str, frozenset[str]]:
        kind = layout[index]
        return kind, SAME if kind in ("unhashed subpacket type", "unhashed issuer key ID") else REJECTED

    matrix = Matrix().run(case.packet, classify, verdict_for(case))
    assert not matrix.unexpected, "\n".join(matrix.unexpected[:20]) + "\n" + matrix.table()
    variants = len(case.packet) * 3
    assert matrix.total() == variants
    assert matrix.total("accepted-same") == 27, matrix.table()
    assert matrix.total("rejected") == variants - 27, matrix.table()
    assert matrix.counts["hashed part", "rejected"] == 3 * layout.count("hashed part")
    assert matrix.counts["signature MPIs", "rejected"] >= 3 * 64


def armor_layout(armored: bytes) -> tuple[int, int, int, int]:
    """(position of the blank separator line's newline, of the final newline, of the last base64 data
    character, how many unused low bits that character has)."""
    lines = armored.split(b"\n")
    assert lines[1] == b"" and armored.endswith(b"\n")
    blank_newline = len(lines[0]) + 1
    checksum_line = next(i for i, line in enumerate(lines) if line.startswith(b"=") and len(line) == 5)
    last_body = lines[checksum_line - 1]
    padding = len(last_body) - len(last_body.rstrip(b"="))
    last_char = sum(len(line) + 1 for line in lines[: checksum_line - 1]) + len(last_body) - padding - 1
    return blank_newline, len(armored) - 1, last_char, {0: 0, 1: 2, 2: 4}[padding]


def test_armored_signature_matrix(signed: dict[str, Signed]) -> None:
    case = signed["ed25519"]
    armored = render(case.packet, armored=True)
    blank_newline, final_newline, last_char, unused_bits = armor_layout(armored)
    original = armored[last_char]

    def classify(index: int, mask: int) -> tuple[str, frozenset[str]]:
        if index in (blank_newline, final_newline):
            return "armor whitespace", SAME if mask == 0x01 else REJECTED  # 0x0a ^ 0x01 = 0x0b, whitespace
        if index == last_char:
            flipped = original ^ mask
            neutral = flipped in _B64 and _B64.index(flipped) >> unused_bits == _B64.index(original) >> unused_bits
            return "last base64 character", SAME if neutral else REJECTED
        return "armor text", REJECTED

    verdict = verdict_for(case)

    def armored_verdict(variant: bytes) -> str:
        outcome = verdict(variant)
        if outcome == "accepted-same":
            assert dearmor_or_binary(variant) == case.packet  # the armor carried the identical packet
        return outcome

    matrix = Matrix().run(armored, classify, armored_verdict)
    assert not matrix.unexpected, "\n".join(matrix.unexpected[:20]) + "\n" + matrix.table()
    neutral_flips = sum(
        1 for mask in (0x01, 0x80, 0xFF) if original ^ mask in _B64
        and _B64.index(original ^ mask) >> unused_bits == _B64.index(original) >> unused_bits
    )
    assert matrix.total() == 3 * len(armored)
    assert matrix.total("accepted-same") == 2 + neutral_flips, matrix.table()
    # Every binary byte is covered by the checksum: the 27 unhashed-area flips of the binary matrix fail here.
    assert matrix.counts["armor text", "rejected"] == 3 * (len(armored) - 3)
    assert matrix.total("rejected") == 3 * len(armored) - (2 + neutral_flips)


def test_a_substituted_signer_is_rejected(signed: dict[str, Signed]) -> None:
    """The unhashed key ID rewritten to name the other certificate's key: still verified as the real signer
    (hashed issuer fingerprint), never as the named one."""
    case = signed["ed25519"]
    other_key_id = case.certificates[1].primary.key_id
    layout = binary_layout(case.packet)
    start = layout.index("unhashed issuer key ID")
    forged = case.packet[:start] + other_key_id + case.packet[start + 8 :]
    result = verify_bytes(case.certificates, DATA, forged, NOW)
    assert result.fingerprint == case.certificates[0].fingerprint
    with pytest.raises(VerificationError):
        verify_bytes(case.certificates[1:], DATA, forged, NOW)
