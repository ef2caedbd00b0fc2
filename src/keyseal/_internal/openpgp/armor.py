"""ASCII armor (RFC 9580 section 6) with the CRC-24 that older verifiers still expect."""

from __future__ import annotations

import base64
import binascii
import re

from keyseal.errors import OpenPGPError

KIND_SIGNATURE = "SIGNATURE"
KIND_PUBLIC_KEY = "PUBLIC KEY BLOCK"

_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB
_BEGIN = re.compile(rb"^-----BEGIN PGP ([A-Z ,/0-9]+)-----[ \t]*$")


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
    encoded = base64.b64encode(data).decode("ascii")
    lines = [f"-----BEGIN PGP {kind}-----", ""]
    lines += [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    lines.append("=" + base64.b64encode(crc24(data).to_bytes(3, "big")).decode("ascii"))
    lines.append(f"-----END PGP {kind}-----")
    return ("\n".join(lines) + "\n").encode("ascii")


def is_armored(data: bytes) -> bool:
    return data.lstrip()[:15] == b"-----BEGIN PGP "


def dearmor_all(data: bytes) -> list[tuple[str, bytes]]:
    """Every armored block in `data`, as (kind, binary). Checksum mismatches and malformed blocks are errors."""
    lines = data.splitlines()
    blocks: list[tuple[str, bytes]] = []
    index = 0
    while index < len(lines):
        match = _BEGIN.match(lines[index].rstrip(b"\r"))
        index += 1
        if not match:
            continue
        kind = match.group(1).decode("ascii")
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
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise OpenPGPError("malformed armor: invalid base64") from None
    if checksum is not None:
        try:
            expected = int.from_bytes(base64.b64decode(checksum, validate=True), "big")
        except (binascii.Error, ValueError):
            raise OpenPGPError("malformed armor: invalid checksum line") from None
        if crc24(data) != expected:
            raise OpenPGPError("armor checksum mismatch: the data was altered or truncated")
    return data


def dearmor_or_binary(data: bytes) -> bytes:
    """Binary OpenPGP data from a file that may be armored (all armored blocks concatenated) or binary."""
    if is_armored(data):
        return b"".join(block for _, block in dearmor_all(data))
    return data
