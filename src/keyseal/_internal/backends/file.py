"""`file:<path>`: a private key on disk, used in process memory.

The file is a wrapped key record (the default `keyseal keys create` writes) or, when created with
`--unencrypted`, a clear PKCS#8 PEM; which one is decided by the content. A record is opened with the
configured KEK (`BackendOptions.kek`, else `$KEYSEAL_KEK`, else the local KEK file `$KEYSEAL_HOME/kek`): one
unwrap (one KMS Decrypt for an `awskms` KEK) per process, then the key stays in memory.

Permissions needed: read access to the file; for an `awskms` KEK, `kms:Decrypt` on the key.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyseal._internal.inputfile import read_input
from keyseal._internal.records.record import looks_like_record
from keyseal.errors import InvalidKeyFileError, UnsupportedKeyError, UsageError
from keyseal.signer import HASH_NAMES, HashName, PrivateKey, PublicKey, Signer, hash_algorithm

__all__ = ["FileSigner", "load_private_key_file", "open", "private_key_from_pem", "sign_digest_with"]


def open(uri: str, rest: str, options: object) -> FileSigner:
    """Registry entry point: `file:/path/to/key` or `file:relative/path`."""
    path = Path(rest[2:] if rest.startswith("//") else rest)
    return FileSigner(uri, path, options)


def load_private_key_file(path: Path) -> PrivateKey:
    """Read a PKCS#8 (or traditional) unencrypted PEM private key of a type keyseal signs with."""
    return private_key_from_pem(read_input(path, "key file"), str(path))


def private_key_from_pem(data: bytes, where: str) -> PrivateKey:
    """Parse an unencrypted PEM private key; the error never echoes the file's content."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if data.lstrip().startswith(b"-----BEGIN PGP") or data[:1] in (b"\x98", b"\x99", b"\xc6"):
            raise InvalidKeyFileError(f"{where} is an OpenPGP certificate, not a key: --key takes the key file "
                                      f"keyseal keys create wrote (file:PATH), the certificate goes to --cert"
                                      ) from exc
        raise InvalidKeyFileError(
            f"{where} is not a key keyseal can read: give the key file keyseal keys create wrote, or a PKCS#8 "
            f"PEM private key"
        ) from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise UnsupportedKeyError(f"{where}: only RSA, ECDSA and Ed25519 keys can sign")
    return key


def sign_digest_with(key: PrivateKey, digest: bytes, hash_name: HashName) -> bytes:
    """Sign a digest with an in-memory key, in the encodings the Signer contract names."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    prehashed = utils.Prehashed(hash_algorithm(hash_name))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), prehashed)
    return key.sign(digest, ec.ECDSA(prehashed))


class FileSigner(Signer):
    """A key read from a file into memory once, then used for every signature."""

    def __init__(self, uri: str, path: Path, options: object = None) -> None:
        self.uri = uri
        self.path = path
        self.options = options
        self._key: PrivateKey | None = None
        self._created: datetime | None = None
        self._lock = threading.Lock()  # signing threads share one load (one KMS Decrypt)

    def _private_key(self) -> PrivateKey:
        with self._lock:
            return self._load()

    def _load(self) -> PrivateKey:
        if self._key is None:
            data = read_input(self.path, "key file")
            if looks_like_record(data):
                from keyseal._internal.wrapping.keys import load_wrapped_key_file

                opened = load_wrapped_key_file(
                    self.path,
                    getattr(self.options, "kek", None),
                    kms_endpoint=getattr(self.options, "kms_endpoint", None),
                    region=getattr(self.options, "region", None),
                )
                self._key, self._created = opened.private_key, opened.record.created
            else:
                self._key = private_key_from_pem(data, str(self.path))
        return self._key

    def public_key(self) -> PublicKey:
        return self._private_key().public_key()

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        """Refuses an unknown hash or a digest of another length, as the remote backends do: an Ed25519 key
        would otherwise sign any bytes, and `cryptography` would raise untyped errors for RSA and ECDSA."""
        if hash_name not in HASH_NAMES:
            raise UsageError(f"unsupported digest {hash_name}: use one of {', '.join(HASH_NAMES)}")
        expected = hash_algorithm(hash_name).digest_size
        if len(digest) != expected:
            raise UsageError(f"a {hash_name} digest is {expected} bytes, got {len(digest)}")
        return sign_digest_with(self._private_key(), digest, hash_name)

    def sign_message(self, message: bytes) -> bytes:
        """Pure Ed25519 over the message itself, of any length (SSH signatures, minisign)."""
        key = self._private_key()
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise UnsupportedKeyError(f"{self.uri} is not an Ed25519 key: only Ed25519 signs messages")
        return key.sign(message)

    def created_at(self) -> datetime | None:
        """A wrapped record's creation time; for a clear PEM, the file's modification time."""
        self._private_key()
        if self._created is not None:
            return self._created
        try:
            return datetime.fromtimestamp(int(os.stat(self.path).st_mtime), tz=UTC)
        except OSError:
            return None
