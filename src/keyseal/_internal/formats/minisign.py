"""minisign signatures and public keys (Ed25519 only).

keyseal writes the prehashed form (`ED`): the key signs BLAKE2b-512 of the file, so a release of any size is
hashed here as a stream and the custody signs 64 bytes. A global signature covers that signature and the trusted
comment, so the comment (timestamp, file name) cannot be changed either. Both are pure Ed25519 over short byte
strings: two signature calls per file. The 8-byte key ID, random in minisign's own keys, is derived here from the
public key (BLAKE2b-64), so exporting the same key twice gives the same public key file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyseal._internal.formats import describe_key, hash_path, sign_ed25519_message
from keyseal.errors import InvalidKeyFileError, UnsupportedKeyError, UsageError, VerificationError
from keyseal.signer import PublicKey, Signer

__all__ = [
    "LEGACY_ALG",
    "MAX_COMMENT",
    "PREHASHED_ALG",
    "PUBLIC_KEY_ALG",
    "TRUSTED_PREFIX",
    "UNTRUSTED_PREFIX",
    "PublicKeyFile",
    "VerifiedSignature",
    "default_trusted_comment",
    "key_id",
    "key_id_hex",
    "load_public_keys",
    "public_key_file",
    "require_ed25519",
    "sign_file",
    "verify_file",
]

PUBLIC_KEY_ALG = b"Ed"
PREHASHED_ALG = b"ED"
LEGACY_ALG = b"Ed"
UNTRUSTED_PREFIX = "untrusted comment: "
TRUSTED_PREFIX = "trusted comment: "
MAX_COMMENT = 1000


def _blake2b(path: Path) -> bytes:
    return hash_path(path, hashlib.blake2b)


def _raw(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def require_ed25519(public_key: PublicKey, uri: str) -> ed25519.Ed25519PublicKey:
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise UnsupportedKeyError(
            f"minisign signs with Ed25519 keys only and {uri} is {describe_key(public_key)}: use an Ed25519 key "
            f"in a file, a PKCS#11 token or Vault Transit (AWS KMS has no Ed25519 keys)"
        )
    return public_key


def key_id(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return hashlib.blake2b(_raw(public_key), digest_size=8).digest()


def key_id_hex(key_id_bytes: bytes) -> str:
    """The key ID as minisign prints it (a little-endian 64-bit number in hex)."""
    return key_id_bytes[::-1].hex().upper()


def public_key_file(public_key: PublicKey, uri: str = "key") -> bytes:
    """The two-line public key file that `minisign -V -p FILE` reads."""
    key = require_ed25519(public_key, uri)
    kid = key_id(key)
    encoded = base64.b64encode(PUBLIC_KEY_ALG + kid + _raw(key)).decode("ascii")
    return f"{UNTRUSTED_PREFIX}minisign public key {key_id_hex(kid)}\n{encoded}\n".encode("ascii")


def default_trusted_comment(path: Path, when: int | None = None) -> str:
    name = "".join(ch if ch.isprintable() and ch != "\t" else "_" for ch in path.name)
    return f"timestamp:{int(time.time()) if when is None else when}\tfile:{name}\thashed"


def _check_comment(comment: str, what: str) -> None:
    if any(ch in comment for ch in "\r\n\0") or len(comment.encode("utf-8")) > MAX_COMMENT:
        raise UsageError(f"invalid {what}: one line of at most {MAX_COMMENT} bytes")


def sign_file(signer: Signer, path: Path, trusted_comment: str | None = None) -> bytes:
    """The `.minisig` text for a file: two signature calls (the file's hash, then signature + trusted comment)."""
    key = require_ed25519(signer.public_key(), signer.uri)
    comment = default_trusted_comment(path) if trusted_comment is None else trusted_comment
    _check_comment(comment, "trusted comment")
    kid = key_id(key)
    signature = sign_ed25519_message(signer, _blake2b(path))
    global_signature = sign_ed25519_message(signer, signature + comment.encode("utf-8"))
    lines = [
        f"{UNTRUSTED_PREFIX}signature from keyseal key {key_id_hex(kid)}",
        base64.b64encode(PREHASHED_ALG + kid + signature).decode("ascii"),
        TRUSTED_PREFIX + comment,
        base64.b64encode(global_signature).decode("ascii"),
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


# -- verifying ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKeyFile:
    key: ed25519.Ed25519PublicKey
    key_id: bytes

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.key_id)


@dataclass(frozen=True)
class VerifiedSignature:
    key: PublicKeyFile
    trusted_comment: str

    @property
    def fingerprint(self) -> str:
        return self.key.key_id_hex


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise VerificationError(f"malformed {what}")
    return raw


def load_public_keys(data: bytes, source: str) -> list[PublicKeyFile]:
    """Keys from a minisign public key file (comment line + base64 line); several files may be concatenated."""
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise InvalidKeyFileError(f"{source} is not a minisign public key file") from exc
    keys: list[PublicKeyFile] = []
    for line in lines:
        if not line or line.startswith(UNTRUSTED_PREFIX.strip()):
            continue
        try:
            raw = _b64(line, 42, "key")
        except VerificationError as exc:
            raise InvalidKeyFileError(f"{source} is not a minisign public key file") from exc
        if raw[:2] != PUBLIC_KEY_ALG:
            raise InvalidKeyFileError(f"{source}: unsupported minisign key algorithm")
        keys.append(PublicKeyFile(ed25519.Ed25519PublicKey.from_public_bytes(raw[10:]), raw[2:10]))
    if not keys:
        raise InvalidKeyFileError(f"{source} holds no minisign public key")
    return keys


def verify_file(keys: list[PublicKeyFile], path: Path, signature_data: bytes) -> VerifiedSignature:
    """Check a `.minisig` over a file: the signature, then the global signature over it and the trusted comment."""
    try:
        lines = signature_data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise VerificationError("not a minisign signature: it is not text") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != 4 or not lines[0].startswith(UNTRUSTED_PREFIX) or not lines[2].startswith(TRUSTED_PREFIX):
        raise VerificationError("not a minisign signature: expected four lines (untrusted comment, signature, "
                                "trusted comment, global signature)")
    raw = _b64(lines[1], 74, "minisign signature")
    algorithm, kid, signature = raw[:2], raw[2:10], raw[10:]
    if algorithm == LEGACY_ALG:
        raise VerificationError("legacy minisign signature (Ed, not prehashed): keyseal verifies prehashed (ED) "
                                "signatures only")
    if algorithm != PREHASHED_ALG:
        raise VerificationError("unsupported minisign signature algorithm")
    key = next((k for k in keys if k.key_id == kid), None)
    if key is None:
        raise VerificationError(f"the signature was made by key {key_id_hex(kid)}, which is not among the trusted "
                                f"keys ({', '.join(k.key_id_hex for k in keys)})")
    comment = lines[2][len(TRUSTED_PREFIX):].rstrip("\r")
    global_signature = _b64(lines[3], 64, "minisign global signature")
    try:
        key.key.verify(signature, _blake2b(path))
    except InvalidSignature as exc:
        raise VerificationError(f"BAD signature from key {key.key_id_hex}: the data or the signature was "
                                f"altered") from exc
    try:
        key.key.verify(global_signature, signature + comment.encode("utf-8"))
    except InvalidSignature as exc:
        raise VerificationError(f"BAD global signature from key {key.key_id_hex}: the trusted comment was "
                                f"altered") from exc
    return VerifiedSignature(key, comment)
