"""Packet framing, MPIs and subpackets: the byte-level layer, strict on parse."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from keyseal._internal.frozen import Frozen
from keyseal.errors import OpenPGPError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "TAG_MARKER",
    "TAG_PUBLIC_KEY",
    "TAG_PUBLIC_SUBKEY",
    "TAG_SECRET_KEY",
    "TAG_SECRET_SUBKEY",
    "TAG_SIGNATURE",
    "TAG_TRUST",
    "TAG_USER_ATTRIBUTE",
    "TAG_USER_ID",
    "Packet",
    "Reader",
    "Subpacket",
    "encode_length",
    "encode_mpi",
    "encode_packet",
    "encode_subpacket",
    "iter_packets",
    "parse_subpackets",
]

TAG_SIGNATURE = 2
TAG_SECRET_KEY = 5
TAG_PUBLIC_KEY = 6
TAG_SECRET_SUBKEY = 7
TAG_MARKER = 10
TAG_TRUST = 12
TAG_USER_ID = 13
TAG_PUBLIC_SUBKEY = 14
TAG_USER_ATTRIBUTE = 17


class Packet(Frozen):
    __slots__ = ("body", "tag")

    def __init__(self, tag: int, body: bytes) -> None:
        self.tag = tag
        self.body = body


def encode_length(length: int) -> bytes:
    """New-format (and subpacket) length octets."""
    if length < 192:
        return bytes([length])
    if length < 8384:
        length -= 192
        return bytes([(length >> 8) + 192, length & 0xFF])
    return b"\xff" + struct.pack(">I", length)


def encode_packet(tag: int, body: bytes) -> bytes:
    """A packet with a new-format header and a definite length."""
    return bytes([0xC0 | tag]) + encode_length(len(body)) + body


def iter_packets(data: bytes) -> Iterator[Packet]:
    """Parse a packet sequence. Truncation, indeterminate or partial lengths (outside data packets) are errors."""
    pos = 0
    end = len(data)
    while pos < end:
        first = data[pos]
        pos += 1
        if not first & 0x80:
            raise OpenPGPError("malformed OpenPGP data: invalid packet header")
        if first & 0x40:
            tag = first & 0x3F
            length, pos = _new_length(data, pos, tag)
        else:
            tag = (first >> 2) & 0x0F
            length_type = first & 0x03
            if length_type == 3:
                raise OpenPGPError("malformed OpenPGP data: indeterminate packet length")
            size = 1 << length_type
            if pos + size > end:
                raise OpenPGPError("truncated OpenPGP data: packet header cut short")
            length = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        if pos + length > end:
            raise OpenPGPError("truncated OpenPGP data: packet body cut short")
        yield Packet(tag, data[pos : pos + length])
        pos += length


def _new_length(data: bytes, pos: int, tag: int) -> tuple[int, int]:
    if pos >= len(data):
        raise OpenPGPError("truncated OpenPGP data: packet length missing")
    octet = data[pos]
    if octet < 192:
        return octet, pos + 1
    if octet < 224:
        if pos + 2 > len(data):
            raise OpenPGPError("truncated OpenPGP data: packet length cut short")
        return ((octet - 192) << 8) + data[pos + 1] + 192, pos + 2
    if octet == 255:
        if pos + 5 > len(data):
            raise OpenPGPError("truncated OpenPGP data: packet length cut short")
        return int.from_bytes(data[pos + 1 : pos + 5], "big"), pos + 5
    raise OpenPGPError(f"malformed OpenPGP data: partial body length in a packet of type {tag}")


def encode_mpi(value: int) -> bytes:
    """A canonical MPI: bit count, then the value without leading zero octets."""
    if value < 0:
        raise ValueError("MPIs are non-negative")
    bits = value.bit_length()
    return struct.pack(">H", bits) + value.to_bytes((bits + 7) // 8, "big")


class Reader:
    """A cursor over a packet body; every read past the end is a truncation error."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise OpenPGPError(f"truncated {self.what}")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def mpi(self) -> int:
        """Read an MPI, refusing a bit count that does not match the value (non-canonical encodings)."""
        bits = self.u16()
        raw = self.take((bits + 7) // 8)
        value = int.from_bytes(raw, "big")
        if value.bit_length() != bits:
            raise OpenPGPError(f"malformed MPI in {self.what}")
        return value

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def expect_end(self) -> None:
        if not self.at_end():
            raise OpenPGPError(f"malformed {self.what}: trailing bytes")


class Subpacket(Frozen):
    __slots__ = ("body", "critical", "type")

    def __init__(self, type: int, critical: bool, body: bytes) -> None:
        self.type = type
        self.critical = critical
        self.body = body


def encode_subpacket(subtype: int, body: bytes, critical: bool = False) -> bytes:
    return encode_length(len(body) + 1) + bytes([subtype | (0x80 if critical else 0)]) + body


def parse_subpackets(area: bytes, what: str) -> list[Subpacket]:
    """Parse a subpacket area strictly."""
    reader = Reader(area, what)
    result: list[Subpacket] = []
    while not reader.at_end():
        octet = reader.u8()
        if octet < 192:
            length = octet
        elif octet < 255:
            length = ((octet - 192) << 8) + reader.u8() + 192
        else:
            length = reader.u32()
        if length == 0:
            raise OpenPGPError(f"malformed {what}: empty subpacket")
        body = reader.take(length)
        result.append(Subpacket(body[0] & 0x7F, bool(body[0] & 0x80), body[1:]))
    return result
