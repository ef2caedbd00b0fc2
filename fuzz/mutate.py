"""Structure-aware mutation of valid inputs, driven by a byte string.

Random bytes rarely get past an OpenPGP length check or a JSON parse, so most of the parser is never reached.
These mutators start from valid inputs (made by keyseal and by gpg) and change them at the level the format
has: packets re-framed with correct lengths, subpackets re-counted, armor re-checksummed, records re-encoded
canonically. Every decision is read from a `Choices` byte string, so one input always gives one mutation: a
hypothesis draw shrinks it, atheris evolves it, and a failing case replays exactly.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

from keyseal._internal.openpgp.armor import armor, crc24

# 0xB2: '²' in Latin-1, a digit to str.isdigit() and not to int() (a Content-Length the server once choked on)
INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F, 0x80, 0x81, 0xB2, 0xBF, 0xC0, 0xDF, 0xE0, 0xFE, 0xFF)
INTERESTING_U16 = (0, 1, 0x7F, 0x80, 0xBF, 0xC0, 0xFF, 0x100, 0x1FFF, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
INTERESTING_U32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1_700_000_000, 4_102_444_800)
SUBPACKET_TYPES = (2, 3, 4, 5, 7, 9, 11, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34,
                   35, 37, 39, 100, 110, 127)
PACKET_TAGS = (1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14, 17, 18, 20, 21, 60, 63)
MAX_SIZE = 1 << 16  # mutations never grow an input past this (keeps every run bounded)


class Choices:
    """Decisions read from a byte string; past its end every decision is 0 (the smallest choice)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk.ljust(count, b"\x00")

    def below(self, limit: int) -> int:
        """A number in [0, limit)."""
        if limit <= 1:
            return 0
        width = ((limit - 1).bit_length() + 7) // 8
        return int.from_bytes(self.take(width), "big") % limit

    def chance(self, one_in: int) -> bool:
        return self.below(one_in) == 0

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.below(len(options))]

    def blob(self, max_len: int) -> bytes:
        return self.take(self.below(max_len + 1))


# -- bytes ---------------------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, c: Choices, pool: Sequence[bytes] = ()) -> bytes:
    """One generic byte-level change: flip, set, insert, delete, duplicate, truncate, splice, overwrite."""
    buf = bytearray(data)
    op = c.below(10)
    at = c.below(len(buf) + 1)
    if op == 0 and buf:  # flip one bit
        at = min(at, len(buf) - 1)
        buf[at] ^= 1 << c.below(8)
    elif op == 1 and buf:  # an interesting value
        buf[min(at, len(buf) - 1)] = c.pick(INTERESTING_BYTES)
    elif op == 2:  # insert random bytes
        buf[at:at] = c.blob(16)
    elif op == 3:  # delete a range
        del buf[at : at + 1 + c.below(16)]
    elif op == 4:  # duplicate a range
        buf[at:at] = buf[at : at + 1 + c.below(64)]
    elif op == 5:  # truncate
        del buf[at:]
    elif op == 6 and pool:  # splice a piece of another input
        other = c.pick(pool)
        start = c.below(len(other) + 1)
        buf[at:at] = other[start : start + 1 + c.below(256)]
    elif op == 7 and len(buf) >= 2:  # a 16-bit field
        at = min(at, len(buf) - 2)
        buf[at : at + 2] = struct.pack(">H", c.pick(INTERESTING_U16))
    elif op == 8 and len(buf) >= 4:  # a 32-bit field
        at = min(at, len(buf) - 4)
        buf[at : at + 4] = struct.pack(">I", c.pick(INTERESTING_U32))
    elif buf:  # overwrite a few bytes with random ones
        piece = c.blob(8)
        buf[at : at + len(piece)] = piece
    return bytes(buf[:MAX_SIZE])


# -- OpenPGP packets -----------------------------------------------------------------------------------------


def _frame_lenient(data: bytes) -> list[tuple[int, bytes]] | None:
    """(tag, body) pairs of a well-framed packet sequence, None if it does not frame."""
    from keyseal._internal.openpgp.packets import iter_packets
    from keyseal.errors import OpenPGPError

    try:
        return [(p.tag, p.body) for p in iter_packets(data)]
    except OpenPGPError:
        return None


def encode_header(tag: int, length: int, style: int, c: Choices) -> bytes:
    """A packet header for `length` in a style: 0 new format (minimal), 1 old format, 2 old format with a
    four-octet length, 3 new format with a five-octet length, 4 a partial length (refused outside data)."""
    if style == 1 and tag < 16:  # old format, smallest length type that fits
        if length < 256:
            return bytes([0x80 | (tag << 2)]) + bytes([length])
        if length < 65536:
            return bytes([0x81 | (tag << 2)]) + struct.pack(">H", length)
        return bytes([0x82 | (tag << 2)]) + struct.pack(">I", length)
    if style == 2 and tag < 16:  # old format, four-octet length
        return bytes([0x82 | (tag << 2)]) + struct.pack(">I", length)
    if style == 3:  # new format, five-octet length (non-minimal but valid)
        return bytes([0xC0 | tag, 0xFF]) + struct.pack(">I", length)
    if style == 4:  # a partial body length (refused outside data packets)
        return bytes([0xC0 | tag, 0xE0 | c.below(31)])
    from keyseal._internal.openpgp.packets import encode_length

    return bytes([0xC0 | (tag & 0x3F)]) + encode_length(length)


def mutate_packets(data: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    """Change a packet sequence at packet level and frame it again with correct lengths."""
    packets = _frame_lenient(data)
    if not packets:
        return mutate_bytes(data, c, pool)
    op = c.below(9)
    index = c.below(len(packets))
    if op == 0 and len(packets) > 1:
        del packets[index]
    elif op == 1:
        packets.insert(index, packets[c.below(len(packets))])
    elif op == 2:
        other = c.below(len(packets))
        packets[index], packets[other] = packets[other], packets[index]
    elif op == 3:
        packets[index] = (c.pick(PACKET_TAGS), packets[index][1])
    elif op == 4 and pool:  # a packet from another input (a gpg subkey into a keyseal certificate, ...)
        donor = _frame_lenient(c.pick(pool))
        if donor:
            packets.insert(index, donor[c.below(len(donor))])
    else:
        tag, body = packets[index]
        packets[index] = (tag, mutate_body(tag, body, c, pool))
    style = c.pick((0, 0, 0, 0, 1, 2, 3))  # one header style for the whole sequence, as real writers do
    out = b"".join(encode_header(tag, len(body), 4 if c.chance(32) else style, c) + body for tag, body in packets)
    return out[:MAX_SIZE]


def mutate_body(tag: int, body: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    if tag == 2 and not c.chance(4):
        return mutate_signature_body(body, c, pool)
    if tag in (5, 6, 7, 14) and not c.chance(4):
        return mutate_key_body(body, c)
    if tag == 13 and c.chance(2):
        return _mutate_text(body, c)
    return mutate_bytes(body, c, pool)


def _split_signature(body: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(head, hashed area, unhashed area, tail) of a v4 signature body, None if it does not split."""
    if len(body) < 6:
        return None
    hashed_len = int.from_bytes(body[4:6], "big")
    mid = 6 + hashed_len
    if len(body) < mid + 2:
        return None
    unhashed_len = int.from_bytes(body[mid : mid + 2], "big")
    end = mid + 2 + unhashed_len
    if len(body) < end:
        return None
    return body[:4], body[6:mid], body[mid + 2 : end], body[end:]


def mutate_signature_body(body: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    """Change one field of a v4 signature and re-count the subpacket areas."""
    parts = _split_signature(body)
    if parts is None:
        return mutate_bytes(body, c, pool)
    head, hashed, unhashed, tail = parts
    op = c.below(6)
    if op == 0:
        head_buf = bytearray(head)
        head_buf[c.below(4)] = c.pick((*INTERESTING_BYTES, 8, 9, 10, 11, 12, 14, 19, 22, 27, 0x13, 0x18, 0x19,
                                        0x1F, 0x20, 0x28, 0x30))
        head = bytes(head_buf)
    elif op in (1, 2):
        hashed = mutate_subpackets(hashed, c, pool)
    elif op == 3:
        unhashed = mutate_subpackets(unhashed, c, pool)
    elif op == 4:
        tail = mutate_mpis(tail, 2, c)
    else:
        tail = mutate_bytes(tail, c, pool)
    hashed, unhashed = hashed[:0xFFFF], unhashed[:0xFFFF]
    return head + struct.pack(">H", len(hashed)) + hashed + struct.pack(">H", len(unhashed)) + unhashed + tail


def _subpacket_list(area: bytes) -> list[tuple[int, bytes]] | None:
    from keyseal._internal.openpgp.packets import parse_subpackets
    from keyseal.errors import OpenPGPError

    try:
        return [(s.type | (0x80 if s.critical else 0), s.body) for s in parse_subpackets(area, "fuzz")]
    except OpenPGPError:
        return None


def _encode_subpacket_length(length: int, c: Choices) -> bytes:
    from keyseal._internal.openpgp.packets import encode_length

    if c.chance(6):
        return b"\xff" + struct.pack(">I", length)  # five-octet form even when shorter would do
    return encode_length(length)


def mutate_subpackets(area: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    """Add, drop, duplicate or change one subpacket; lengths stay right unless the byte-level path is taken."""
    subs = _subpacket_list(area)
    if subs is None or c.chance(8):
        return mutate_bytes(area, c, pool)
    op = c.below(6)
    index = c.below(len(subs) + 1)
    if op == 0 and subs:
        del subs[min(index, len(subs) - 1)]
    elif op == 1 and subs:
        subs.insert(index, subs[c.below(len(subs))])
    elif op == 2:  # a new subpacket of a known or unknown type, maybe critical
        subtype = c.pick(SUBPACKET_TYPES) | (0x80 if c.chance(3) else 0)
        if subtype & 0x7F == 32 and pool:  # an embedded signature taken from another input
            donor = _frame_lenient(c.pick(pool)) or []
            sigs = [b for t, b in donor if t == 2]
            payload = c.pick(sigs) if sigs else c.blob(32)
        else:
            payload = c.take(c.pick((0, 1, 4, 8, 20, 21, 32)))
        subs.insert(index, (subtype, payload))
    elif op == 3 and subs:
        at = min(index, len(subs) - 1)
        subs[at] = (subs[at][0] ^ 0x80, subs[at][1])  # toggle critical
    elif subs:
        at = min(index, len(subs) - 1)
        subtype, payload = subs[at]
        if subtype & 0x7F == 32 and c.chance(2):
            payload = mutate_signature_body(payload, c, pool)
        else:
            payload = mutate_bytes(payload, c, pool)
        subs[at] = (subtype, payload)
    return b"".join(_encode_subpacket_length(len(body) + 1, c) + bytes([t & 0xFF]) + body for t, body in subs)


def mutate_mpis(data: bytes, count: int, c: Choices) -> bytes:
    """Change an MPI among the first `count` of `data`: its bit count, its value, or its length."""
    mpis: list[tuple[int, bytes]] = []
    pos = 0
    for _ in range(count):
        if pos + 2 > len(data):
            break
        bits = int.from_bytes(data[pos : pos + 2], "big")
        size = (bits + 7) // 8
        mpis.append((bits, data[pos + 2 : pos + 2 + size]))
        pos += 2 + size
    rest = data[pos:]
    if not mpis:
        return mutate_bytes(data, c)
    index = c.below(len(mpis))
    bits, raw = mpis[index]
    op = c.below(5)
    if op == 0:
        bits = c.pick(INTERESTING_U16)
    elif op == 1:
        bits += c.pick((-9, -8, -1, 1, 8, 9))
        bits = max(0, min(bits, 0xFFFF))
    elif op == 2:
        raw = b"\x00" + raw  # a leading zero octet (non-canonical)
        bits = len(raw) * 8
    elif op == 3:
        raw = mutate_bytes(raw, c)
        bits = int.from_bytes(raw, "big").bit_length()  # consistent bit count, different value
    else:
        raw = c.pick((b"", b"\x01", b"\xff" * 32, b"\x40" + b"\x00" * 32, b"\x04" + b"\x11" * 64))
        bits = int.from_bytes(raw, "big").bit_length()
    mpis[index] = (bits, raw)
    return b"".join(struct.pack(">H", b) + r for b, r in mpis) + rest


def mutate_key_body(body: bytes, c: Choices) -> bytes:
    """Change the version, creation time, algorithm, curve OID or key material of a key packet body."""
    if len(body) < 6:
        return mutate_bytes(body, c)
    head, material = bytearray(body[:6]), body[6:]
    op = c.below(5)
    if op == 0:
        head[0] = c.pick((3, 4, 5, 6, 0, 0xFF))
    elif op == 1:
        head[1:5] = struct.pack(">I", c.pick(INTERESTING_U32))
    elif op == 2:
        head[5] = c.pick((1, 2, 3, 16, 17, 18, 19, 22, 25, 27, 28, 0, 0xFF))
    elif op == 3 and material and head[5] in (18, 19, 22):  # OID length-prefixed
        oid_len = material[0]
        oid = material[1 : 1 + oid_len]
        oids = (bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2b81040022"), bytes.fromhex("2b81040023"),
                bytes.fromhex("2b06010401da470f01"), bytes.fromhex("2b060104019755010501"), b"", b"\x2b")
        new_oid = c.pick(oids) if c.chance(2) else mutate_bytes(oid, c)
        material = bytes([len(new_oid) & 0xFF]) + new_oid + material[1 + oid_len :]
    else:
        skip = 1 + material[0] if head[5] in (18, 19, 22) and material else 0
        material = material[:skip] + mutate_mpis(material[skip:], 2, c)
    return bytes(head) + material


def _mutate_text(body: bytes, c: Choices) -> bytes:
    inserts = (b"<", b">", b"@", b"\x00", b"\n", b"\r", b"\xff", "\u202e".encode(), b" <a@b.example>", b"\xc3")
    buf = bytearray(body)
    at = c.below(len(buf) + 1)
    if c.chance(2):
        buf[at:at] = c.pick(inserts)
    else:
        del buf[at : at + 1 + c.below(8)]
    return bytes(buf)


# -- armor ---------------------------------------------------------------------------------------------------


def _dearmor_lenient(data: bytes) -> tuple[str, bytes] | None:
    from keyseal._internal.openpgp.armor import dearmor_all
    from keyseal.errors import OpenPGPError

    try:
        blocks = dearmor_all(data)
    except OpenPGPError:
        return None
    return blocks[0]


def mutate_armor(data: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    """Either mutate the binary inside and armor it again (a valid checksum, so the packet parser is reached),
    or change the armor text itself (lines, headers, checksum, line ends)."""
    decoded = _dearmor_lenient(data)
    if decoded is not None and c.chance(2):
        kind, binary = decoded
        return armor(mutate_packets(binary, c, pool), kind)[:MAX_SIZE]
    lines = data.split(b"\n")
    op = c.below(11)
    index = c.below(len(lines))
    if op == 0:
        del lines[index]
    elif op == 1:
        lines.insert(index, lines[c.below(len(lines))])
    elif op == 2:
        lines.insert(index, c.pick((b"Comment: fuzz", b"Version: x", b"Hash: SHA256", b"Comment:", b": x",
                                    b"", b"=", b"====", b"=AAAA", b"-----", b"-----END PGP SIGNATURE-----",
                                    b"-----BEGIN PGP SIGNATURE-----", b"\r", b"\t ")))
    elif op == 3:  # a checksum line with another (maybe valid-looking) value
        fake = base64.b64encode(struct.pack(">I", crc24(c.blob(8)))[1:])
        lines = [b"=" + fake if ln.startswith(b"=") and len(ln.strip()) == 5 else ln for ln in lines]
    elif op == 4:
        lines = [ln for ln in lines if not (ln.startswith(b"=") and len(ln.strip()) == 5)]
    elif op == 5:
        return b"\r\n".join(lines)[:MAX_SIZE]
    elif op == 6:  # another BEGIN / END kind
        kind = c.pick((b"MESSAGE", b"PUBLIC KEY BLOCK", b"SIGNATURE", b"PRIVATE KEY BLOCK", b"SIGNED MESSAGE",
                       b"ARMORED FILE", b"X"))
        lines = [ln.replace(b"SIGNATURE", kind).replace(b"PUBLIC KEY BLOCK", kind) if ln.startswith(b"-----")
                 and c.chance(2) else ln for ln in lines]
    elif op == 7:  # join or split base64 lines
        if index + 1 < len(lines):
            lines[index : index + 2] = [lines[index] + lines[index + 1]]
    elif op == 8:  # two blocks, or text around the block
        extra: bytes = c.pick(pool) if pool else data
        before: bytes = c.pick((b"", b"junk\n", b"\xff\xfe\n"))
        after: bytes = c.pick((b"", b"\n", b"trailing"))
        return (before + data + after + (extra if c.chance(2) else b""))[:MAX_SIZE]
    elif op == 9:
        lines[index] = lines[index] + c.pick((b" ", b"\t", b"\r", b"=", b"==", b"\x00", b"\x0b"))
    else:
        lines[index] = mutate_bytes(lines[index], c, pool)
    return b"\n".join(lines)[:MAX_SIZE]


# -- wrapped key records (JSON) ------------------------------------------------------------------------------

_B64_FIELDS = ("wrappedDek", "nonce", "ciphertext")


def _odd_value(c: Choices) -> Any:
    return c.pick((None, True, False, 0, -1, 1, 2**53, 2**53 - 1, 2**64, 1.0, 1e308, "", "x", "1", [], {},
                   [1], {"a": 1}, "\u0000", "\udfff", "é", "A" * 300, "keyseal.wrapped-key.v2",
                   "2024-02-30T00:00:00Z", "9999-12-31T23:59:59Z", "AAAA", "AAA=", "AA==", "A==="))


def mutate_record(data: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    """Change one field of a record and encode it again (canonically, mostly, so field checks are reached)."""
    if c.chance(24):  # deep nesting: a parser's recursion limit
        depth: int = c.pick((10, 999, 1001, 5000, 100_000))
        pair: tuple[bytes, bytes] = c.pick(((b"[", b"]"), (b'{"a":', b"}"), (b'{"format":[', b"]}")))
        return pair[0] * depth + b"0" + pair[1] * depth
    try:
        fields = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        fields = None
    if not isinstance(fields, dict):
        return mutate_bytes(data, c, pool)
    keys = sorted(fields) or ["format"]
    key = c.pick(keys)
    op = c.below(8)
    if op == 0:
        fields.pop(key, None)
    elif op == 1:
        fields[c.pick(("extra", "Format", "version ", "__proto__", "name"))] = _odd_value(c)
    elif op == 2:
        fields[key] = _odd_value(c)
    elif op == 3 and key in _B64_FIELDS and isinstance(fields.get(key), str):
        try:
            raw = base64.b64decode(fields[key])
        except (binascii.Error, ValueError):
            raw = b""
        fields[key] = base64.b64encode(mutate_bytes(raw, c)).decode()
    elif op in (4, 6, 7) and isinstance(fields.get(key), str):
        fields[key] = _mutate_text(fields[key].encode("utf-8", "surrogatepass"), c).decode("utf-8", "replace")
    elif op == 5 and isinstance(fields.get(key), int) and not isinstance(fields.get(key), bool):
        fields[key] = fields[key] + c.pick((-1, 1, 2**53, -(2**53)))
    style = c.below(16)
    try:
        if style == 0:
            return json.dumps(fields, separators=(",", ":")).encode()
        if style == 1:
            return json.dumps(fields, indent=2, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
        return (json.dumps(fields, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()
    except (TypeError, ValueError):
        return data


# -- checksum manifests ----------------------------------------------------------------------------------------


def mutate_manifest(data: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    lines = data.split(b"\n")
    op = c.below(7)
    index = c.below(len(lines))
    if op == 0:
        lines.insert(index, lines[c.below(len(lines))])  # a name listed twice
    elif op == 1:
        del lines[index]
    elif op == 2:
        lines[index] = lines[index].replace(b"  ", c.pick((b" *", b" ", b"\t", b"   ", b"  \\", b" ?")), 1)
    elif op == 3:
        lines[index] = lines[index] + c.pick((b"\r", b"\\", b" ", b"\x00", b"\xff", "é".encode()))
    elif op == 4:
        hexdigits = b"0123456789abcdefABCDEFg"
        line = bytearray(lines[index])
        if line:
            line[c.below(len(line))] = c.pick(hexdigits)
        lines[index] = bytes(line)
    elif op == 5:
        return b"\r\n".join(lines)
    else:
        lines[index] = mutate_bytes(lines[index], c, pool)
    return b"\n".join(lines)[:MAX_SIZE]


# -- base64 text formats (SSH signatures and keys, minisign) -------------------------------------------------

_B64_RUN = re.compile(rb"[A-Za-z0-9+/=\r\n]{16,}")
SSH_NAMES = (b"ssh-ed25519", b"ssh-rsa", b"rsa-sha2-256", b"rsa-sha2-512", b"ecdsa-sha2-nistp256",
             b"ecdsa-sha2-nistp384", b"ecdsa-sha2-nistp521", b"nistp256", b"sha512", b"sha256", b"sha1", b"file",
             b"git", b"", b"\x00" * 8)


def _ssh_strings(blob: bytes) -> tuple[bytes, list[bytes]] | None:
    """(prefix, strings) of an SSH wire blob: an optional SSHSIG magic and version, then length-prefixed
    strings to the end; None if it does not split that way."""
    head = blob[:10] if blob.startswith(b"SSHSIG") else b""
    pos, strings = len(head), []
    while pos < len(blob):
        if pos + 4 > len(blob):
            return None
        size = int.from_bytes(blob[pos : pos + 4], "big")
        if pos + 4 + size > len(blob):
            return None
        strings.append(blob[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return head, strings


def mutate_ssh_blob(blob: bytes, c: Choices, pool: Sequence[bytes] = (), depth: int = 0) -> bytes:
    """Change one string of an SSH wire blob (or a string inside it) and re-count the lengths."""
    split = _ssh_strings(blob)
    if split is None or not split[1] or c.chance(6):
        return mutate_bytes(blob, c, pool)
    head, strings = split
    index = c.below(len(strings))
    op = c.below(6)
    if op == 0:
        strings[index] = c.pick(SSH_NAMES)
    elif op == 1 and len(strings) > 1:
        del strings[index]
    elif op == 2:
        strings.insert(index, strings[c.below(len(strings))])
    elif op == 3 and depth < 2:
        strings[index] = mutate_ssh_blob(strings[index], c, pool, depth + 1)
    elif op == 4 and head:
        head = head[:6] + struct.pack(">I", c.pick(INTERESTING_U32))
    else:
        strings[index] = mutate_bytes(strings[index], c, pool)
    return head + b"".join(struct.pack(">I", len(x)) + x for x in strings)


def mutate_b64_text(data: bytes, c: Choices, pool: Sequence[bytes]) -> bytes:
    """Decode a base64 run of a text format, change the binary (SSH-string-aware), and encode it again in the
    same line layout; sometimes change the text itself."""
    runs = list(_B64_RUN.finditer(data))
    if not runs or c.chance(5):
        return mutate_bytes(data, c, pool)
    run = runs[c.below(len(runs))]
    text = run.group(0)
    try:
        blob = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return mutate_bytes(data, c, pool)
    blob = mutate_ssh_blob(blob, c, pool) if c.chance(2) else mutate_bytes(blob, c, pool)
    encoded = base64.b64encode(blob)
    if b"\n" in text.strip():
        encoded = b"\n".join(encoded[i : i + 70] for i in range(0, len(encoded), 70))
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    return (data[: run.start()] + lead + encoded + trail + data[run.end() :])[:MAX_SIZE]


# -- dispatch ------------------------------------------------------------------------------------------------


def sniff(data: bytes) -> Callable[[bytes, Choices, Sequence[bytes]], bytes]:
    """The mutator for what `data` looks like."""
    head = data.lstrip()[:16]
    if head.startswith(b"-----BEGIN PGP"):
        return mutate_armor
    if head.startswith(b"{"):
        return mutate_record
    if len(data) > 64 and all(ch in b"0123456789abcdef" for ch in data[:64]):
        return mutate_manifest
    return mutate_packets


MUTATORS: dict[str, Callable[[bytes, Choices, Sequence[bytes]], bytes]] = {
    "bytes": mutate_bytes,
    "packets": mutate_packets,
    "armor": mutate_armor,
    "signature": mutate_signature_body,
    "key": lambda data, c, _pool: mutate_key_body(data, c),
    "subpackets": mutate_subpackets,
    "record": mutate_record,
    "manifest": mutate_manifest,
    "b64text": mutate_b64_text,
}


def mutate(seed: bytes, c: Choices, pool: Sequence[bytes] = (), kind: str | None = None) -> bytes:
    """One to four changes to `seed` (one, half the time): structure-aware for its `kind` (guessed from the
    content when not given), sometimes plain byte-level."""
    data = seed
    rounds = 1 if c.chance(2) else 2 + c.below(3)
    for _ in range(rounds):
        mutator = mutate_bytes if c.chance(8) else MUTATORS[kind] if kind else sniff(data)
        data = mutator(data, c, pool)
    return data
