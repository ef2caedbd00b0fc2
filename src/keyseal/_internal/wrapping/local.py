"""`local` KEK provider: a 256-bit KEK in a file (mode 0600), created on first use.

In Kubernetes the same KEK file comes from a Secret mounted read-only (defaultMode 0400 or 0600). The KEK
wraps each DEK with AES-256-GCM under a fresh nonce; the associated data is the record's KEK context, so a
wrapped DEK moved to another record does not unwrap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyseal._internal.atomic import write_atomic
from keyseal._internal.home import keyseal_home
from keyseal._internal.records.record import DEK_SIZE, NONCE_SIZE
from keyseal._internal.wrapping.provider import KekOptions, KekProvider, invalid_kek, new_dek, zero
from keyseal.errors import InputError, InvalidKeyFileError, OutputExistsError, WrappedRecordError

__all__ = ["LocalKek", "default_local_kek_path", "open"]

_MAGIC = "keyseal-local-kek-v1:"
_ID_DOMAIN = b"keyseal local KEK id\x00"


def default_local_kek_path() -> Path:
    return keyseal_home() / "kek"


def open(spec: str, rest: str, options: KekOptions) -> LocalKek:
    """Registry entry point: `local` (the KEK file `$KEYSEAL_HOME/kek`) or `local:PATH`."""
    if spec == "local":
        return LocalKek(default_local_kek_path())
    if not rest:
        raise invalid_kek(spec)
    return LocalKek(Path(rest).expanduser())


class LocalKek(KekProvider):
    """A KEK file. Its id (stored in records) is a truncated SHA-256 of the KEK under a domain prefix."""

    provider: ClassVar[str] = "local"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._kek: bytearray | None = None
        self._id: str | None = None

    @property
    def kek_id(self) -> str:
        self._load(create=False)
        assert self._id is not None
        return self._id

    def describe(self) -> str:
        return f"local KEK file {self.path}"

    def prepare_write(self) -> None:
        self._load(create=True)

    def wrap(self, dek: bytearray, context: Mapping[str, str]) -> bytes:
        kek = self._load(create=True)
        nonce = os.urandom(NONCE_SIZE)
        return nonce + AESGCM(kek).encrypt(nonce, bytes(dek), _context_aad(context))

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], where: str) -> bytearray:
        kek = self._load(create=False)
        try:
            dek = bytearray(
                AESGCM(kek).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _context_aad(context))
            )
        except (InvalidTag, ValueError) as exc:
            raise WrappedRecordError(
                f"{where}: its wrapped DEK does not unwrap under {self.describe()} for this record (the "
                f"record was tampered with, or its DEK belongs to another record): restore it from a backup"
            ) from exc
        if len(dek) != DEK_SIZE:
            zero(dek)
            raise WrappedRecordError(f"{where}: its wrapped DEK is not a {DEK_SIZE * 8}-bit key")
        return dek

    def close(self) -> None:
        if self._kek is not None:
            zero(self._kek)
            self._kek = None

    def _load(self, *, create: bool) -> bytearray:
        if self._kek is not None:
            return self._kek
        try:
            kek = self._read()
        except FileNotFoundError as exc:
            if not create:
                raise InputError(
                    f"{self.describe()} does not exist: records wrapped with a local KEK need the KEK file "
                    f"they were written with (--kek local:PATH, or $KEYSEAL_HOME/kek)"
                ) from exc
            kek = self._create()
        self._kek = kek
        self._id = hashlib.sha256(_ID_DOMAIN + bytes(kek)).hexdigest()[:32]
        return kek

    def _read(self) -> bytearray:
        try:
            fd = os.open(self.path, os.O_RDONLY)  # a symlink is fine: Kubernetes mounts Secrets that way
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise InputError(f"cannot read {self.describe()}: {exc.strerror}") from exc
        try:
            mode = os.fstat(fd).st_mode
            if mode & (stat.S_IRWXO | stat.S_IWGRP) or not stat.S_ISREG(mode):
                raise InvalidKeyFileError(
                    f"{self.describe()} is accessible to other users (mode {stat.S_IMODE(mode):04o}): "
                    f"chmod 600 {self.path}"
                )
            raw = bytearray(256)
            size = os.readv(fd, [raw])
        except OSError as exc:
            raise InputError(f"cannot read {self.describe()}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            text = raw[:size].decode("ascii").strip()
            if not text.startswith(_MAGIC):
                raise ValueError
            kek = bytearray(base64.b64decode(text[len(_MAGIC):], validate=True))
        except (UnicodeDecodeError, ValueError, binascii.Error) as exc:
            raise InvalidKeyFileError(
                f"{self.describe()} is not a keyseal local KEK file: restore it, or point --kek elsewhere"
            ) from exc
        finally:
            zero(raw)
        if len(kek) != DEK_SIZE:
            zero(kek)
            raise InvalidKeyFileError(f"{self.describe()} does not hold a 256-bit KEK")
        return kek

    def _create(self) -> bytearray:
        kek = new_dek()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        content = bytearray(_MAGIC.encode() + base64.b64encode(bytes(kek)) + b"\n")
        try:
            write_atomic(self.path, bytes(content), mode=0o600, force=False)
        except OutputExistsError:
            zero(kek)  # another process created it first: use theirs
            return self._read()
        finally:
            zero(content)
        return kek


def _context_aad(context: Mapping[str, str]) -> bytes:
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
