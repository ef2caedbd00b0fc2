"""Cleartext signatures (RFC 9580 section 7) and the canonical text that text-mode (0x01) signatures hash.

A cleartext signed message is the text, readable, between two armor lines:

    -----BEGIN PGP SIGNED MESSAGE-----
    Hash: SHA256

    the text, with every line that starts with "-" written as "- -..." (dash-escaping)
    -----BEGIN PGP SIGNATURE-----
    ...

What the signature covers is the text with its lines ended by CR LF, each line's trailing spaces and tabs
removed, and without the line ending before the signature armor (so "a\\n" and "a" sign alike). gpg applies
exactly these rules (it also trims a trailing CR), so its cleartext verifies here and ours verifies there.

Kept free of heavy imports: `keyseal-gpg` and `keyseal verify` load it before any backend.
"""

from __future__ import annotations

from keyseal._internal.frozen import Frozen
from keyseal._internal.openpgp.armor import BEGIN_MESSAGE, is_cleartext
from keyseal.errors import OpenPGPError

BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
HASH_HEADER_NAMES = {"sha224": "SHA224", "sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}
_HEADER_HASHES = {value: key for key, value in HASH_HEADER_NAMES.items()}
_TRAILING = b" \t\r"


def _lines(text: bytes) -> list[bytes]:
    """The text's lines without their LF; a final LF ends the last line rather than starting an empty one."""
    if not text:
        return []
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def cleartext_hash_input(lines: list[bytes]) -> bytes:
    """What a cleartext signature hashes: lines without trailing whitespace, joined by CR LF, no final one."""
    return b"\r\n".join(line.rstrip(_TRAILING) for line in lines)


def text_mode_canonical(data: bytes) -> bytes:
    """What a text-mode (0x01) signature over a document hashes (RFC 9580 5.2.1.2): line endings made CR LF,
    nothing else changed."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def signed_text(text: bytes) -> bytes:
    """The bytes a cleartext signature over `text` covers."""
    return cleartext_hash_input(_lines(text))


def dash_escape(line: bytes) -> bytes:
    return b"- " + line if line.startswith(b"-") else line


def render_cleartext(text: bytes, hash_name: str, signature_armor: bytes) -> bytes:
    """The cleartext signed document: header, dash-escaped text (as given, trailing whitespace kept), armored
    signature. A text without a final newline gets one before the signature armor, as gpg writes it."""
    body = b"".join(dash_escape(line) + b"\n" for line in _lines(text))
    header = BEGIN_MESSAGE + b"\nHash: " + HASH_HEADER_NAMES[hash_name].encode("ascii") + b"\n\n"
    return header + body + signature_armor


class CleartextMessage(Frozen):
    """A parsed cleartext signed message: the signed lines (dash-escaping undone), the hashes the header
    names, and the armored signature block."""

    __slots__ = ("header_hashes", "lines", "signature_armor")

    def __init__(self, lines: list[bytes], header_hashes: frozenset[str] | None, signature_armor: bytes) -> None:
        self.lines = lines
        self.header_hashes = header_hashes  # hashlib names; None when the message has no Hash header
        self.signature_armor = signature_armor

    @property
    def hash_input(self) -> bytes:
        return cleartext_hash_input(self.lines)

    @property
    def text(self) -> bytes:
        """The text the signature covers, each line ended by LF (what `--output` writes): trailing whitespace is
        not covered by the signature, so it is not written either."""
        return b"".join(line.rstrip(_TRAILING) + b"\n" for line in self.lines)


def parse_cleartext(data: bytes) -> CleartextMessage:
    """Parse a cleartext signed message strictly: it starts with the BEGIN line, has only Hash headers, every
    text line starting with "-" is dash-escaped, one signature block ends it, and nothing but blank lines
    follows the block. Anything else is an OpenPGPError."""
    lines = data.split(b"\n")
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index >= len(lines) or lines[index].rstrip(_TRAILING) != BEGIN_MESSAGE:
        raise OpenPGPError("not a cleartext signed message: it does not start with " + BEGIN_MESSAGE.decode())
    index += 1
    hashes: set[str] | None = None
    while True:
        if index >= len(lines):
            raise OpenPGPError("truncated cleartext signed message: no text")
        line = lines[index].rstrip(_TRAILING)
        index += 1
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon or name != b"Hash":
            raise OpenPGPError("malformed cleartext signed message: only Hash headers may precede the text")
        hashes = set() if hashes is None else hashes
        for item in value.split(b","):
            label = item.strip().decode("ascii", errors="replace").upper()
            if label not in _HEADER_HASHES:
                raise OpenPGPError(f"cleartext signed message names unsupported hash {label[:20]!r}")
            hashes.add(_HEADER_HASHES[label])
    text: list[bytes] = []
    while True:
        if index >= len(lines):
            raise OpenPGPError("truncated cleartext signed message: no signature block")
        line = lines[index]
        index += 1
        if line.rstrip(_TRAILING) == BEGIN_SIGNATURE:
            break
        if line.startswith(b"- "):
            text.append(line[2:])
        elif line.startswith(b"-"):
            raise OpenPGPError("malformed cleartext signed message: a text line starting with '-' is not "
                               "dash-escaped")
        else:
            text.append(line)
    block = [BEGIN_SIGNATURE]
    end = b"-----END PGP SIGNATURE-----"
    while index < len(lines):
        line = lines[index].rstrip(_TRAILING)
        index += 1
        block.append(line)
        if line == end:
            break
    else:
        raise OpenPGPError("truncated cleartext signed message: no END line for its signature")
    if any(line.strip() for line in lines[index:]):
        raise OpenPGPError("cleartext signed message has data after its signature block")
    return CleartextMessage(text, frozenset(hashes) if hashes is not None else None, b"\n".join(block) + b"\n")


__all__ = [
    "CleartextMessage",
    "cleartext_hash_input",
    "dash_escape",
    "is_cleartext",
    "parse_cleartext",
    "render_cleartext",
    "signed_text",
    "text_mode_canonical",
]
