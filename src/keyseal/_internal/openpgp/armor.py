"""ASCII armor (RFC 9580 section 6) with the CRC-24 that older verifiers still expect."""

from __future__ import annotations

import binascii

from keyseal.errors import OpenPGPError

__all__ = [
    "BEGIN_MESSAGE",
    "KIND_PUBLIC_KEY",
    "KIND_SIGNATURE",
    "armor",
    "crc24",
    "dearmor_all",
    "dearmor_or_binary",
    "is_armored",
    "is_cleartext",
]

KIND_SIGNATURE = "SIGNATURE"
KIND_PUBLIC_KEY = "PUBLIC KEY BLOCK"
BEGIN_MESSAGE = b"-----BEGIN PGP SIGNED MESSAGE-----"  # a cleartext signed message (openpgp.cleartext)

_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB
_BEGIN = b"-----BEGIN PGP "
_KIND_OCTETS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ ,/0123456789")
# base64 through binascii (what the base64 module calls), and no regular expression: the armor of every signature
# and certificate is read on the verification paths, whose start-up is their cost.


def crc24(data: bytes) -> int:
    crc = _CRC24_INIT
    for octet in data:
        crc ^= octet << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
    return crc & 0xFFFFFF


def armor(data: bytes, kind: str) -> bytes:
    """Armor binary OpenPGP data as `-----BEGIN PGP <kind>-----` with 64-column lines and a checksum."""
    encoded = _b64encode(data)
    lines = [f"-----BEGIN PGP {kind}-----", ""]
    lines += [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    lines.append("=" + _b64encode(crc24(data).to_bytes(3, "big")))
    lines.append(f"-----END PGP {kind}-----")
    return ("\n".join(lines) + "\n").encode("ascii")


def is_cleartext(data: bytes) -> bool:
    """Whether `data` starts as a cleartext signed message does. Here rather than in keyseal._internal.openpgp.cleartext
    (which uses it) so that telling a detached signature from a cleartext message, as `keyseal-gpg --verify` does
    once per commit, loads nothing more."""
    return data.lstrip(b"\r\n\t ")[: len(BEGIN_MESSAGE)] == BEGIN_MESSAGE


def is_armored(data: bytes) -> bool:
    return data.lstrip()[:15] == b"-----BEGIN PGP "


def dearmor_all(data: bytes) -> list[tuple[str, bytes]]:
    """Every armored block in `data`, as (kind, binary). Checksum mismatches and malformed blocks are errors."""
    lines = data.splitlines()
    blocks: list[tuple[str, bytes]] = []
    index = 0
    while index < len(lines):
        kind = _begin_kind(lines[index].rstrip(b"\r"))
        index += 1
        if kind is None:
            continue
        index = _skip_headers(lines, index)
        body: list[bytes] = []
        checksum: bytes | None = None
        while True:
            if index >= len(lines):
                raise OpenPGPError(f"truncated armor: no END line for PGP {kind}")
            line = lines[index].strip()
            index += 1
            if line == f"-----END PGP {kind}-----".encode():
                break
            if line.startswith(b"-----"):
                raise OpenPGPError("malformed armor: unexpected armor line")
            if line.startswith(b"=") and len(line) == 5:
                checksum = line[1:]
            elif line:
                body.append(line)
        blocks.append((kind, _decode(b"".join(body), checksum)))
    if not blocks:
        raise OpenPGPError("no OpenPGP armor found")
    return blocks


def _begin_kind(line: bytes) -> str | None:
    """The KIND of a `-----BEGIN PGP KIND-----` line (KIND of capitals, digits, spaces, commas and slashes;
    spaces or tabs may trail the line), else None."""
    if not line.startswith(_BEGIN):
        return None
    rest = line[len(_BEGIN):].rstrip(b" \t")
    kind = rest[:-5]
    if not rest.endswith(b"-----") or not kind or not _KIND_OCTETS.issuperset(kind):
        return None
    return kind.decode("ascii")


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _skip_headers(lines: list[bytes], index: int) -> int:
    """Skip armor headers up to the blank separator line (tolerating its absence, as gpg does)."""
    start = index
    while index < len(lines):
        line = lines[index].strip()
        if not line:
            return index + 1
        if b": " not in line:
            return start
        index += 1
    return start


def _decode(body: bytes, checksum: bytes | None) -> bytes:
    try:
        data = binascii.a2b_base64(body, strict_mode=True)  # base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise OpenPGPError("malformed armor: invalid base64") from exc
    if checksum is not None:
        try:
            expected = int.from_bytes(binascii.a2b_base64(checksum, strict_mode=True), "big")
        except (binascii.Error, ValueError) as exc:
            raise OpenPGPError("malformed armor: invalid checksum line") from exc
        if crc24(data) != expected:
            raise OpenPGPError("armor checksum mismatch: the data was altered or truncated")
    return data


def dearmor_or_binary(data: bytes) -> bytes:
    """Binary OpenPGP data from a file that may be armored (all armored blocks concatenated) or binary."""
    if is_armored(data):
        return b"".join(block for _, block in dearmor_all(data))
    return data
