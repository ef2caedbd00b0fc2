"""The few DER encodings an X.509 leaf needs, so a leaf can be assembled from parts encoded once per keyset.

Only what `ca.issuance.x509svid` writes: definite lengths, positive INTEGERs, OBJECT IDENTIFIERs, the RFC 5280
choice of UTCTime (1950-2049) or GeneralizedTime, and extensions. Every structure is checked against
`cryptography`'s own encoder byte for byte in the tests.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

__all__ = ["bit_string", "extension", "integer", "oid", "sequence", "time", "tlv"]

SEQUENCE = 0x30
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
BOOLEAN_TRUE = b"\x01\x01\xff"
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18


def tlv(tag: int, content: bytes) -> bytes:
    """Tag, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def integer(value: int) -> bytes:
    """A non-negative INTEGER in its shortest form (a leading zero byte only where the top bit is set)."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(identifier: x509.ObjectIdentifier) -> bytes:
    arcs = [int(arc) for arc in identifier.dotted_string.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return tlv(OID, bytes(body))


def time(moment: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, always UTC."""
    clock = f"{moment.month:02d}{moment.day:02d}{moment.hour:02d}{moment.minute:02d}{moment.second:02d}Z"
    if 1950 <= moment.year < 2050:
        return tlv(UTC_TIME, f"{moment.year % 100:02d}{clock}".encode("ascii"))
    return tlv(GENERALIZED_TIME, f"{moment.year:04d}{clock}".encode("ascii"))


def bit_string(data: bytes) -> bytes:
    """A BIT STRING of whole bytes (no unused bits)."""
    return tlv(BIT_STRING, b"\x00" + data)


def extension(value: x509.ExtensionType, *, critical: bool) -> bytes:
    """One Extension: its OID, the critical flag only when true (DER omits a DEFAULT FALSE), the value."""
    flag = BOOLEAN_TRUE if critical else b""
    return sequence(oid(value.oid), flag, tlv(OCTET_STRING, value.public_bytes()))
