"""The keyring's certificates, parsed once and kept on disk by the content of the keyring's files.

`keyseal-gpg --verify` runs once per commit under `git log --show-signature`, and each run would otherwise parse
every keyring certificate and check its self-signatures again, though the keyring changes rarely. The cache holds
the result (keys, user IDs, validity, revocations) under a key that is the SHA-256 of every keyring file's name
and content, keyseal's version and this format's: a changed, added or removed file, and so a revocation added to
the keyring, misses the cache and is parsed at once. A cache file that cannot be read or does not parse is
ignored and rebuilt.

The cache sits in `$KEYSEAL_HOME/cache/` beside the keyring, written with the same rights: whoever can write it
can write the keyring itself, so it trusts nothing the keyring does not. Nothing secret is in either.
"""

from __future__ import annotations

import binascii
import json
import os
from typing import Any

from keyseal import __version__
from keyseal.errors import KeysealError
from keyseal.openpgp import digests
from keyseal.openpgp.cert import Certificate, SigningKey
from keyseal.openpgp.keys import KeyPacket, parse_key_packet

__all__ = ["cache_key", "load", "store"]

FORMAT = 2  # bump whenever Certificate gains a field (tests compare cached and parsed certificates whole)


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
            document = json.loads(handle.read())
        if not isinstance(document, dict) or document.get("key") != key:
            return None
        return [_certificate(item) for item in document["certificates"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, KeysealError):
        return None


def store(path: str | os.PathLike[str], key: str, certificates: list[Certificate]) -> None:
    """Write the cache atomically; a cache that cannot be written is only a missed saving."""
    from pathlib import Path

    from keyseal.atomic import write_atomic

    document = {"key": key, "certificates": [_encode(cert) for cert in certificates]}
    target = Path(path)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(target, json.dumps(document, separators=(",", ":")).encode(), mode=0o600)
    except (OSError, KeysealError):
        pass


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _encode(cert: Certificate) -> dict[str, Any]:
    return {
        "primary": _b64(cert.primary.body),
        "user_ids": cert.user_ids,
        "signing_keys": [{"key": _b64(entry.key.body), "expires": entry.expires, "revoked_at": entry.revoked_at}
                         for entry in cert.signing_keys],
        "binary": _b64(cert.binary),
        "revoked": cert.revoked,
        "expires": cert.expires,
        "subkeys": [_b64(key.body) for key in cert.subkeys],
        "hash_preferences": list(cert.hash_preferences),
    }


def _certificate(item: dict[str, Any]) -> Certificate:
    parsed: dict[str, KeyPacket] = {}

    def key(text: str) -> KeyPacket:
        if text not in parsed:
            parsed[text] = parse_key_packet(_b64decode(text))
        return parsed[text]

    user_ids = item["user_ids"]
    if not isinstance(user_ids, list) or not all(isinstance(uid, str) for uid in user_ids):
        raise TypeError("user_ids")
    return Certificate(
        primary=key(item["primary"]),
        user_ids=user_ids,
        signing_keys=[SigningKey(key(entry["key"]), _time(entry["expires"]), _time(entry["revoked_at"]))
                      for entry in item["signing_keys"]],
        binary=_b64decode(item["binary"]),
        revoked=bool(item["revoked"]),
        expires=_time(item["expires"]),
        subkeys=[key(text) for text in item["subkeys"]],
        hash_preferences=tuple(_hash_id(value) for value in item["hash_preferences"]),
    )


def _b64decode(text: str) -> bytes:
    """base64.b64decode(text, validate=True), without importing base64."""
    if not isinstance(text, str):
        raise TypeError("base64 text")
    return binascii.a2b_base64(text, strict_mode=True)


def _hash_id(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
        raise TypeError("hash preference")
    return value


def _time(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("time")
    return value
