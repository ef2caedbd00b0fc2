"""RFC 7512 PKCS#11 URIs: `pkcs11:token=LABEL;object=LABEL?module-path=/lib/x.so&pin-source=file:/run/pin`.

Pure parsing, no PKCS#11 library needed, so a syntax error is reported before any module is loaded. Values are
percent-decoded; `id` stays bytes (it is a binary CKA_ID), every other value is UTF-8 text. A URI that holds a
`pin-value` is shown everywhere through `redacted()`, so the PIN never reaches a log line or an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keyseal.errors import KeyURIError

__all__ = [
    "OBJECT_TYPES",
    "PATH_ATTRIBUTES",
    "QUERY_ATTRIBUTES",
    "SCHEME",
    "Pkcs11URI",
    "parse",
    "redact",
    "without_pin_value",
]

SCHEME = "pkcs11:"

# RFC 7512 section 2.3: the path attributes, and the query attributes keyseal understands.
PATH_ATTRIBUTES: tuple[str, ...] = (
    "token", "manufacturer", "serial", "model",
    "library-manufacturer", "library-description", "library-version",
    "object", "type", "id",
    "slot-description", "slot-manufacturer", "slot-id",
)
QUERY_ATTRIBUTES: tuple[str, ...] = ("module-path", "module-name", "pin-source", "pin-value")
OBJECT_TYPES: tuple[str, ...] = ("private", "public", "cert", "secret-key", "data")

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_PATH_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=")
_QUERY_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=/?|")
_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
_REDACTED = "REDACTED"


@dataclass(frozen=True)
class Pkcs11URI:
    """A parsed PKCS#11 URI. `path` holds text values (and `id` as bytes); `query` holds text values."""

    path: dict[str, str | bytes] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    def text(self, name: str) -> str | None:
        """A text path attribute (`token`, `object`, ...), or None when absent."""
        value = self.path.get(name)
        return value if isinstance(value, str) else None

    @property
    def token(self) -> str | None:
        return self.text("token")

    @property
    def object(self) -> str | None:
        return self.text("object")

    @property
    def id(self) -> bytes | None:
        value = self.path.get("id")
        return value if isinstance(value, bytes) else None

    def redacted(self) -> str:
        """The URI as given, with any pin-value replaced: safe to log and to print."""
        return redact(self.raw)

    def describe_key(self) -> str:
        """A short name for messages: `object=LABEL` and/or `id=HEX`."""
        parts = []
        if self.object is not None:
            parts.append(f"object={self.object!r}")
        if self.id is not None:
            parts.append(f"id={self.id.hex()}")
        return " ".join(parts) or "(no object or id)"


def redact(uri: str) -> str:
    """Replace the value of every `pin-value=` attribute (query or, mistakenly, path), without parsing."""
    base, sep, query = uri.partition("?")
    base = ";".join(_redact_item(item) for item in base.split(";"))
    if not sep:
        return base
    return f"{base}?{'&'.join(_redact_item(item) for item in query.split('&'))}"


def without_pin_value(uri: str) -> str:
    """The URI with any `pin-value=` query attribute dropped: what to print for a user to reuse."""
    base, sep, query = uri.partition("?")
    kept = [item for item in query.split("&") if item and _redact_item(item) == item] if sep else []
    return f"{base}?{'&'.join(kept)}" if kept else base


def _redact_item(item: str) -> str:
    """`pin-value=...` (or a malformed `pin-value...` with no `=`) becomes `pin-value=REDACTED`."""
    at = item.partition("=")[0].lower().find("pin-value")
    return item if at < 0 else f"{item[:at]}pin-value={_REDACTED}"


def parse(uri: str) -> Pkcs11URI:
    """Parse a `pkcs11:` URI, or raise KeyURIError naming what is wrong and how to write it."""
    shown = redact(uri)
    if uri[: len(SCHEME)].lower() != SCHEME:
        raise KeyURIError(f"invalid PKCS#11 URI {shown!r}: it must start with 'pkcs11:'")
    body = uri[len(SCHEME):]
    path_part, _, query_part = body.partition("?")
    path: dict[str, str | bytes] = {}
    query: dict[str, str] = {}
    for name, value in _attributes(path_part, ";", _PATH_CHARS, shown, "path"):
        if name not in PATH_ATTRIBUTES:
            raise KeyURIError(
                f"unknown attribute {name!r} in PKCS#11 URI {shown!r}: path attributes are "
                f"{', '.join(PATH_ATTRIBUTES)} (separated by ';')"
            )
        if name in path:
            raise KeyURIError(f"attribute {name!r} appears twice in PKCS#11 URI {shown!r}")
        path[name] = _decode(value, shown) if name == "id" else _decode_text(value, name, shown)
    for name, value in _attributes(query_part, "&", _QUERY_CHARS, shown, "query"):
        if name not in QUERY_ATTRIBUTES:
            raise KeyURIError(
                f"unknown query attribute {name!r} in PKCS#11 URI {shown!r}: query attributes are "
                f"{', '.join(QUERY_ATTRIBUTES)} (after '?', separated by '&')"
            )
        if name in query:
            raise KeyURIError(f"query attribute {name!r} appears twice in PKCS#11 URI {shown!r}")
        query[name] = _decode_text(value, name, shown)
    _check_values(path, query, shown)
    return Pkcs11URI(path=path, query=query, raw=uri)


def _attributes(part: str, separator: str, allowed: frozenset[str], shown: str,
                where: str) -> list[tuple[str, str]]:
    """Split `name=value` pairs; check the characters RFC 7512 allows unescaped."""
    if not part:
        return []
    pairs = []
    for item in part.split(separator):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise KeyURIError(
                f"invalid PKCS#11 URI {shown!r}: expected NAME=VALUE in the {where}, "
                f"got {_safe(item, name)!r} (path attributes are separated by ';', query attributes by '&')"
            )
        name = name.lower()
        if not _NAME.match(name):
            raise KeyURIError(f"invalid attribute name {name!r} in PKCS#11 URI {shown!r}")
        if name != "pin-value":
            for char in value:
                if char not in allowed and char != "%":
                    raise KeyURIError(
                        f"invalid PKCS#11 URI {shown!r}: character {char!r} in {name}= must be "
                        f"percent-encoded as %{ord(char):02X}" if ord(char) < 0x80 else
                        f"invalid PKCS#11 URI {shown!r}: non-ASCII character in {name}= must be "
                        f"percent-encoded (UTF-8 bytes as %XX)"
                    )
        pairs.append((name, value))
    return pairs


def _safe(item: str, name: str) -> str:
    """An offending item for a message, hidden if it might hold a PIN."""
    return "pin-value=..." if name.lower() == "pin-value" or "pin" in item.lower() else item


def _decode(value: str, shown: str) -> bytes:
    """Percent-decode to bytes; a stray or short `%` escape is an error, not a literal."""
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char == "%":
            pair = value[i + 1: i + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                raise KeyURIError(
                    f"invalid percent-encoding in PKCS#11 URI {shown!r}: "
                    "'%' must be followed by two hex digits (write a literal '%' as %25)"
                )
            out.append(int(pair, 16))
            i += 3
        else:
            out.extend(char.encode())
            i += 1
    return bytes(out)


def _decode_text(value: str, name: str, shown: str) -> str:
    try:
        return _decode(value, shown).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyURIError(
            f"attribute {name!r} in PKCS#11 URI {shown!r} is not UTF-8 after percent-decoding"
        ) from exc


def _check_values(path: dict[str, str | bytes], query: dict[str, str], shown: str) -> None:
    kind = path.get("type")
    if kind is not None and kind not in OBJECT_TYPES:
        raise KeyURIError(
            f"invalid type={kind!r} in PKCS#11 URI {shown!r}: use one of {', '.join(OBJECT_TYPES)}"
        )
    slot_id = path.get("slot-id")
    if isinstance(slot_id, str) and not (slot_id.isascii() and slot_id.isdigit()):  # isdigit() alone takes "²"
        raise KeyURIError(f"invalid slot-id={slot_id!r} in PKCS#11 URI {shown!r}: write a decimal number")
    version = path.get("library-version")
    if isinstance(version, str) and not re.fullmatch(r"\d+(\.\d+)?", version):
        raise KeyURIError(f"invalid library-version={version!r} in PKCS#11 URI {shown!r}: write M[.N]")
    if "pin-source" in query and "pin-value" in query:
        raise KeyURIError(f"PKCS#11 URI {shown!r} has both pin-source and pin-value: keep pin-source only")
    for name in ("module-path", "pin-source", "pin-value"):
        if name in query and not query[name]:
            raise KeyURIError(f"empty {name}= in PKCS#11 URI {shown!r}")
