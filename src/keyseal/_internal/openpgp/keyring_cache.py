"""The keyring's certificates, parsed once and kept on disk by the content of the keyring's files.

`keyseal-gpg --verify` runs once per commit under `git log --show-signature`, and each run would otherwise parse
every keyring certificate and check its self-signatures again, though the keyring changes rarely. The cache holds
the result (keys, user IDs, validity, revocations) under a key that is the SHA-256 of every keyring file's name
and content, keyseal's version and this format's: a changed, added or removed file, and so a revocation added to
the keyring, misses the cache and is parsed at once. A cache file that cannot be read or does not parse is
ignored and rebuilt. Key packets are parsed again from the cache, never taken on trust.

The cache sits in `$KEYSEAL_HOME/cache/` beside the keyring, written with the same rights: whoever can write it
can write the keyring itself, so it trusts nothing the keyring does not. Nothing secret is in either.

The file is binary, not JSON: importing `json` (its regular expressions, its C accelerator) was about 2 ms of each
`keyseal-gpg --verify`. Layout: MAGIC, the 64 hex digits of the key and a newline, then a count and the
certificates, each field in order: a byte string is a 4-octet big-endian length and its octets; a list a 4-octet
count and its items; an optional time a 0 or 1 octet, then for 1 its 8-octet value; a flag one octet, 0 or 1.
A certificate is: primary key packet, user IDs (UTF-8, surrogates passed through, as any str round-trips), signing
keys (key packet, expiry, revocation time), the certificate's binary, revoked flag, expiry, subkey packets, hash
preferences (one octet each). Nothing may follow the last certificate.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from keyseal._internal.openpgp import digests
from keyseal._internal.openpgp.cert import Certificate, SigningKey
from keyseal._internal.openpgp.keys import KeyPacket, parse_key_packet
from keyseal._internal.openpgp.packets import Reader
from keyseal._version import __version__
from keyseal.errors import KeysealError, OpenPGPError

if TYPE_CHECKING:
    from collections.abc import Sized

__all__ = ["MAGIC", "cache_key", "load", "store"]

FORMAT = 3  # bump whenever Certificate gains a field (tests compare cached and parsed certificates whole)
MAGIC = b"keyseal keyring cache\n"


def cache_key(files: list[tuple[str, bytes]]) -> str:
    """SHA-256 over the format, keyseal's version and every (name, content) in order."""
    digest = digests.new("sha256", f"keyseal-keyring-cache/{FORMAT}/{__version__}\n".encode())
    for name, content in files:
        digest.update(digests.sha256(name.encode("utf-8", "surrogateescape")))
        digest.update(digests.sha256(content))
    return digest.hexdigest()


def load(path: str | os.PathLike[str], key: str) -> list[Certificate] | None:
    """The cached certificates for `key`, or None (absent, stale, unreadable or malformed)."""
    try:
        with open(path, "rb") as handle:
            document = handle.read()
        head = MAGIC + key.encode("ascii") + b"\n"
        if not document.startswith(head):
            return None
        reader = Reader(document[len(head):], "keyring cache")
        certificates = [_certificate(reader) for _ in range(reader.u32())]
        reader.expect_end()
        return certificates
    except (OSError, ValueError, KeysealError):
        return None


def store(path: str | os.PathLike[str], key: str, certificates: list[Certificate]) -> None:
    """Write the cache atomically; a cache that cannot be written is only a missed saving."""
    from pathlib import Path

    from keyseal._internal.atomic import write_atomic

    parts = [MAGIC, key.encode("ascii"), b"\n", _count(certificates)]
    for cert in certificates:
        parts += _encode(cert)
    target = Path(path)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(target, b"".join(parts), mode=0o600)
    except (OSError, KeysealError):
        pass


def _count(items: Sized) -> bytes:
    return len(items).to_bytes(4, "big")


def _bytes(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _time(value: int | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + value.to_bytes(8, "big")


def _encode(cert: Certificate) -> list[bytes]:
    parts = [_bytes(cert.primary.body), _count(cert.user_ids)]
    parts += [_bytes(uid.encode("utf-8", "surrogatepass")) for uid in cert.user_ids]
    parts.append(_count(cert.signing_keys))
    for entry in cert.signing_keys:
        parts += [_bytes(entry.key.body), _time(entry.expires), _time(entry.revoked_at)]
    parts += [_bytes(cert.binary), b"\x01" if cert.revoked else b"\x00", _time(cert.expires), _count(cert.subkeys)]
    parts += [_bytes(key.body) for key in cert.subkeys]
    parts.append(_bytes(bytes(cert.hash_preferences)))
    return parts


def _certificate(reader: Reader) -> Certificate:
    parsed: dict[bytes, KeyPacket] = {}

    def key() -> KeyPacket:
        body = _read_bytes(reader)
        if body not in parsed:
            parsed[body] = parse_key_packet(body)
        return parsed[body]

    primary = key()
    user_ids = [_read_bytes(reader).decode("utf-8", "surrogatepass") for _ in range(reader.u32())]
    signing_keys = [SigningKey(key(), _read_time(reader), _read_time(reader)) for _ in range(reader.u32())]
    binary = _read_bytes(reader)
    revoked = _read_flag(reader)
    expires = _read_time(reader)
    subkeys = [key() for _ in range(reader.u32())]
    hash_preferences = tuple(_read_bytes(reader))
    return Certificate(primary=primary, user_ids=user_ids, signing_keys=signing_keys, binary=binary, revoked=revoked,
                       expires=expires, subkeys=subkeys, hash_preferences=hash_preferences)


def _read_bytes(reader: Reader) -> bytes:
    return reader.take(reader.u32())


def _read_flag(reader: Reader) -> bool:
    flag = reader.u8()
    if flag > 1:
        raise OpenPGPError("malformed keyring cache: a flag is neither 0 nor 1")
    return flag == 1


def _read_time(reader: Reader) -> int | None:
    return int.from_bytes(reader.take(8), "big") if _read_flag(reader) else None
