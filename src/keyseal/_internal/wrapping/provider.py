"""The KEK provider contract (KekProvider) and the DEK helpers every provider and the envelope share.

Kept apart from `kek` (which turns a `--kek` spec into a provider through the registry) so that the providers
(`local`, `awskms`, `vault`, and those of other packages) import this module and nothing imports them back.
"""

from __future__ import annotations

import abc
import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from keyseal._internal.records.record import DEK_SIZE, WrappedRecord
from keyseal._internal.registry import KEKS
from keyseal.errors import KekMismatchError, KeysealError, UsageError, WrappedRecordError

__all__ = ["KEK_ENV", "KekOptions", "KekProvider", "invalid_kek", "new_dek", "zero"]

KEK_ENV = "KEYSEAL_KEK"


@dataclass(frozen=True)
class KekOptions:
    """What a KEK may need beyond its spec; unset values fall back to each SDK's own environment."""

    kms_endpoint: str | None = None
    region: str | None = None


def invalid_kek(spec: str) -> UsageError:
    """The one line for a KEK spec no provider takes: the built-in forms, and any other package's schemes."""
    others = [name for name in KEKS.names() if name not in KEKS.builtin_names()]
    more = f", or {', '.join(f'{name}:...' for name in others)}" if others else ""
    return UsageError(f"invalid KEK {spec!r}: use local, local:PATH or awskms:<key ARN>, or vault:[MOUNT/]KEY "
                      f"(or hashivault://[MOUNT/]KEY){more}")


def new_dek() -> bytearray:
    """A fresh 256-bit DEK read straight into a bytearray, so that it can be zeroed after use."""
    dek = bytearray(DEK_SIZE)
    with open("/dev/urandom", "rb", buffering=0) as source:
        view = memoryview(dek)
        filled = 0
        while filled < DEK_SIZE:
            filled += source.readinto(view[filled:]) or 0
    return dek


def zero(secret: bytearray) -> None:
    """Overwrite a secret in place (what Python allows: copies made by libraries are out of reach)."""
    if secret:
        ctypes.memset((ctypes.c_char * len(secret)).from_buffer(secret), 0, len(secret))


class KekProvider(abc.ABC):
    """Wraps and unwraps DEKs under one configured KEK.

    `context` (see `WrappedRecord.kek_context`) must be given back unchanged to unwrap: it binds the wrapped
    DEK to its record's name, version and format.
    """

    provider: ClassVar[str]

    @property
    @abc.abstractmethod
    def kek_id(self) -> str:
        """The id a record stores: a key ARN, or the fingerprint of a local KEK."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Names the KEK in messages (never its secret)."""

    @abc.abstractmethod
    def wrap(self, dek: bytearray, context: Mapping[str, str]) -> bytes:
        """Encrypt a DEK under the KEK, bound to `context`."""

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, context: Mapping[str, str], where: str) -> bytearray:
        """Decrypt a wrapped DEK; a tampered blob or a wrong context is a WrappedRecordError."""

    @abc.abstractmethod
    def prepare_write(self) -> None:
        """Checks before wrapping new records (the KEK exists / has the right type). Idempotent."""

    def canary_checks(self) -> None:  # noqa: B027 - optional hook, most providers check nothing first
        """What a provider checks before the canary round trip (e.g. the KEK's key type). Nothing by default."""

    def canary(self) -> None:
        """Wrap then unwrap a throwaway DEK: a missing permission, a wrong key type or an unreachable KEK shows
        now, named, rather than at the first write or rotation."""
        dek = new_dek()
        context = {"keyseal:purpose": "canary", "keyseal:pid": str(os.getpid())}
        try:
            self.canary_checks()
            back = self.unwrap(self.wrap(dek, context), context, f"the {self.provider} key wrapping canary")
            ok = back == dek
            zero(back)
        except UsageError:
            raise  # e.g. a missing SDK's install hint: said as it is, not as a failed check
        except KeysealError as exc:
            raise type(exc)(f"key wrapping startup check failed: {exc.message}") from exc
        finally:
            zero(dek)
        if not ok:
            raise WrappedRecordError(f"{self.describe()} returned another DEK in the canary round trip")

    def check_record(self, record: WrappedRecord, where: str) -> None:
        """Refuse a record of another provider or another KEK, before any unwrap is attempted."""
        if record.kek_provider != self.provider:
            raise KekMismatchError(
                f"{where} is wrapped by the {record.kek_provider} KEK provider, but the configured KEK is "
                f"{self.describe()}: switching KEK providers on existing records is not supported; configure "
                f"the {record.kek_provider} KEK the record was written with ({KEK_ENV}, or --kek / --from-kek)"
            )
        if record.kek_id != self.kek_id:
            raise KekMismatchError(
                f"{where} is wrapped by {record.kek_provider} KEK {record.kek_id}, not by the configured "
                f"{self.describe()}: refusing it; name that KEK if you trust it ({KEK_ENV}, or --kek / "
                f"--from-kek)"
            )
