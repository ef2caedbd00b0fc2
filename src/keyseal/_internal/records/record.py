"""The wrapped key record, formats v1 and v2: what is stored, what is bound, and its one canonical encoding.

v2 adds `scope`: where the record belongs (the trust domain, and the Kubernetes namespace of a Kubernetes store),
bound by the AES-GCM associated data and the KEK context, so a record copied to another namespace or trust domain
does not open there. Records of a store with a scope (the server's) are written as v2; records of a store without
one (`keyseal keys`, the agent's saved state) stay v1, which older keyseal versions read. Both are read.

A record is JSON. Its bytes on disk must be exactly the canonical encoding of what they parse to, so that no
byte can change without the record being refused: a change either breaks the parse, breaks canonical form, or
changes a field that the AES-GCM associated data, the KEK context, or the configured KEK binds. See
docs/record-format.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from keyseal.errors import WrappedRecordError

__all__ = [
    "CIPHER",
    "DEK_SIZE",
    "FORMAT",
    "FORMATS",
    "FORMAT_PREFIX",
    "FORMAT_V1",
    "FORMAT_V2",
    "MAX_VERSION",
    "NONCE_SIZE",
    "PROVIDERS",
    "SEEN_VERSIONS_TYPE",
    "TAG_SIZE",
    "WrappedRecord",
    "check_record_name",
    "check_scope",
    "format_time",
    "kek_context",
    "looks_like_record",
]

FORMAT_V1 = "keyseal.wrapped-key.v1"
FORMAT_V2 = "keyseal.wrapped-key.v2"
FORMAT = FORMAT_V1  # what a record without a scope is written as
FORMATS = (FORMAT_V1, FORMAT_V2)
FORMAT_PREFIX = "keyseal.wrapped-key."
CIPHER = "AES-256-GCM"
DEK_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
PROVIDERS = ("local", "awskms", "vault")
MAX_VERSION = 2**53 - 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_KEY_TYPE_RE = re.compile(r"rsa[0-9]{4,5}|p256|p384|p521|ed25519")
SEEN_VERSIONS_TYPE = "seen-versions"  # the keyType of a store's rollback high-water mark (v2 only; not a key)
_SCOPE_RE = re.compile(r"[A-Za-z0-9=;:/._-]{1,512}")
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_FIELDS = frozenset(
    {"format", "name", "version", "created", "keyType", "cipher", "kekProvider", "kekId",
     "wrappedDek", "nonce", "ciphertext"}
)
_FIELDS_V2 = _FIELDS | {"scope"}


def check_scope(scope: str) -> str:
    """A store scope: empty (none), or letters, digits and = ; : / . _ - (e.g. trust-domain=example.org)."""
    if scope and not _SCOPE_RE.fullmatch(scope):
        raise WrappedRecordError(f"invalid record scope {scope[:80]!r}")
    return scope


def check_record_name(name: str) -> str:
    """Refuse a record name that could escape a directory or confuse a store (letters, digits, . _ -)."""
    if not _NAME_RE.fullmatch(name) or name.endswith(".tmp"):
        raise WrappedRecordError(
            f"invalid record name {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit and not ending in .tmp"
        )
    return name


def format_time(moment: datetime) -> str:
    """UTC, whole seconds, `Z`: the one spelling a record uses."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


@dataclass(frozen=True)
class WrappedRecord:
    """One version of one wrapped private key. `ciphertext` is the PKCS#8 DER key under the DEK."""

    name: str
    version: int
    created: datetime
    key_type: str
    kek_provider: str
    kek_id: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes
    scope: str = ""  # v2: where the record belongs; empty: a v1 record

    @property
    def format(self) -> str:
        return FORMAT_V2 if self.scope else FORMAT_V1

    def header(self) -> dict[str, Any]:
        """Every field except the three opaque blobs: all of it is bound by the AES-GCM associated data."""
        fields: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created": format_time(self.created),
            "keyType": self.key_type,
            "cipher": CIPHER,
            "kekProvider": self.kek_provider,
            "kekId": self.kek_id,
        }
        if self.scope:
            fields["scope"] = self.scope
        return fields

    def aad(self) -> bytes:
        """AES-GCM associated data: the canonical encoding of the header."""
        return self.format.encode() + b"\x00" + json.dumps(
            self.header(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()

    def kek_context(self) -> dict[str, str]:
        """The KEK context (the KMS EncryptionContext). It holds no secrets: CloudTrail logs it."""
        return kek_context(self.name, self.version, self.scope)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready fields (also the `spec` of the Kubernetes custom resource)."""
        fields = self.header()
        fields["wrappedDek"] = _b64(self.wrapped_dek)
        fields["nonce"] = _b64(self.nonce)
        fields["ciphertext"] = _b64(self.ciphertext)
        return fields

    def to_bytes(self) -> bytes:
        """The canonical file encoding: sorted keys, two-space indent, ASCII, one trailing newline."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()

    def with_blobs(self, wrapped_dek: bytes, nonce: bytes, ciphertext: bytes) -> WrappedRecord:
        return replace(self, wrapped_dek=wrapped_dek, nonce=nonce, ciphertext=ciphertext)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], where: str) -> WrappedRecord:
        """Validate every field strictly; the message names the place, never a blob."""
        if not isinstance(fields, Mapping):
            raise _bad(where, "it is not a JSON object")
        fmt, scope = _format_and_scope(fields, where)
        name = _str(fields, "name", where)
        try:
            check_record_name(name)
        except WrappedRecordError as exc:
            raise _bad(where, "its name is not a valid record name") from exc
        version = fields["version"]
        if type(version) is not int or not 1 <= version <= MAX_VERSION:
            raise _bad(where, "its version is not a positive whole number")
        created_text = _str(fields, "created", where)
        if not _TIME_RE.fullmatch(created_text):
            raise _bad(where, "its creation time is not YYYY-MM-DDTHH:MM:SSZ")
        try:
            created = datetime.strptime(created_text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError as exc:
            raise _bad(where, "its creation time is not a valid date") from exc
        key_type = _str(fields, "keyType", where)
        if not _KEY_TYPE_RE.fullmatch(key_type) and not (fmt == FORMAT_V2 and key_type == SEEN_VERSIONS_TYPE):
            raise _bad(where, f"its key type {key_type[:20]!r} is unknown")
        if fields["cipher"] != CIPHER:
            raise _bad(where, f"its cipher is not {CIPHER}")
        provider = _str(fields, "kekProvider", where)
        if provider not in PROVIDERS:
            raise _bad(where, f"its KEK provider is not one of {', '.join(PROVIDERS)}")
        kek_id = _str(fields, "kekId", where)
        if not kek_id or len(kek_id) > 2048 or not kek_id.isascii() or not kek_id.isprintable():
            raise _bad(where, "its KEK id is empty or not printable ASCII")
        wrapped_dek = _unb64(fields, "wrappedDek", where)
        nonce = _unb64(fields, "nonce", where)
        ciphertext = _unb64(fields, "ciphertext", where)
        if not 1 <= len(wrapped_dek) <= 8192:
            raise _bad(where, "its wrapped DEK has an impossible length")
        if len(nonce) != NONCE_SIZE:
            raise _bad(where, f"its nonce is not {NONCE_SIZE} bytes")
        if len(ciphertext) <= TAG_SIZE:
            raise _bad(where, "its ciphertext is too short")
        return cls(name, version, created, key_type, provider, kek_id, wrapped_dek, nonce, ciphertext, scope)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> WrappedRecord:
        """Parse the file encoding, refusing anything that is not exactly canonical."""
        try:
            fields = json.loads(data.decode("ascii"), object_pairs_hook=_no_duplicates,
                                parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: arrays nested 1000 deep
            raise _bad(where, "it is not valid ASCII JSON") from exc
        record = cls.from_dict(fields, where)
        if record.to_bytes() != data:
            raise _bad(where, "it is not in canonical form (was it edited?)")
        return record


def _format_and_scope(fields: Mapping[str, Any], where: str) -> tuple[str, str]:
    """The record's format (a newer one asks for an upgrade) and its scope ("" for v1); the field set must be
    exactly that format's."""
    fmt = fields.get("format")
    if isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX) and fmt not in FORMATS:
        raise WrappedRecordError(
            f"{where} is a wrapped key record of format {fmt!r}, which this keyseal does not read "
            f"(it reads {' and '.join(FORMATS)}): upgrade keyseal"
        )
    if fmt not in FORMATS:
        raise _bad(where, "its format field is missing or unknown")
    keys, expected = set(fields), _FIELDS_V2 if fmt == FORMAT_V2 else _FIELDS
    if keys != expected:
        extra = ", ".join(sorted(keys - expected)) or "none"
        missing = ", ".join(sorted(expected - keys)) or "none"
        raise _bad(where, f"unexpected fields: {extra}; missing fields: {missing}")
    if fmt != FORMAT_V2:
        return fmt, ""
    scope = _str(fields, "scope", where)
    if not _SCOPE_RE.fullmatch(scope):
        raise _bad(where, "its scope is empty or not a valid scope")
    return fmt, scope


def kek_context(name: str, version: int, scope: str = "") -> dict[str, str]:
    """The KEK context: purpose, record name, record version and format, and (v2) the record's scope (its trust
    domain and namespace: not secret, CloudTrail shows it)."""
    context = {
        "keyseal:purpose": "wrapped-key",
        "keyseal:format": FORMAT_V2 if scope else FORMAT_V1,
        "keyseal:record": name,
        "keyseal:version": str(version),
    }
    if scope:
        context["keyseal:scope"] = scope
    return context


def looks_like_record(data: bytes) -> bool:
    """True when a file holds a record (JSON object) rather than a PEM key; decided by content, not name."""
    return data.lstrip()[:1] == b"{"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(fields: Mapping[str, Any], key: str, where: str) -> bytes:
    text = _str(fields, key, where)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(where, f"its {key} is not base64") from exc
    if _b64(data) != text:  # unused low bits set, or other non-canonical spelling
        raise _bad(where, f"its {key} is not canonical base64")
    return data


def _str(fields: Mapping[str, Any], key: str, where: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        raise _bad(where, f"its {key} is not a string")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _bad(where: str, why: str) -> WrappedRecordError:
    return WrappedRecordError(
        f"{where} is not a valid keyseal wrapped key record ({why}): restore it from the store or a backup"
    )
