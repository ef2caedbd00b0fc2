"""Where keysets come from: the contract between the keyset manager and a custody's persistence.

`wrapped` custody keeps each key as an envelope-encrypted record in a record store (directory or Kubernetes);
`kms` custody keeps each key in AWS KMS under an alias per keyset. Either way keysets are numbered 1, 2, ...,
and creating keyset n is a create-if-absent that exactly one writer wins.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from keyseal._internal.ca.custody.keys import CaKey
from keyseal.errors import KeysealError

if TYPE_CHECKING:
    from keyseal._internal.ca.custody.pins import KeysetPins

__all__ = ["CustodyContext", "KeysetKeys", "KeysetSource", "Loaded", "SlotBusyError"]


@dataclass(frozen=True)
class CustodyContext:
    """What a custody's registry entry point (`open(config, context)`, keyseal._internal.registry.CUSTODIES)
    gets from the server beside its Config, so that no custody imports the server that builds it."""

    kube_api_client: Any  # a given Kubernetes API client (tests, the server's own); None: from the environment
    pins: Callable[[str], KeysetPins]  # the keyset pins of a key-manager custody, by its alias / label prefix


class SlotBusyError(KeysealError):
    """The place for a new keyset still holds a keyset that has not expired: rotation waits."""


@dataclass(frozen=True)
class KeysetKeys:
    number: int
    not_before: datetime
    x509_key: CaKey
    jwt_key: CaKey


@dataclass(frozen=True)
class Loaded:
    """What a scan of the custody found: the live keysets, and the highest keyset number ever created (0 if
    none; the next keyset is this + 1)."""

    keysets: tuple[KeysetKeys, ...]
    highest: int


class KeysetSource(abc.ABC):
    @abc.abstractmethod
    def describe(self) -> str:
        """Where keysets live, for logs."""

    @abc.abstractmethod
    def startup_check(self) -> None:
        """Fail now, naming what is missing, if the custody cannot be used (before anything is written)."""

    @abc.abstractmethod
    def load(self, live_after: datetime) -> Loaded:
        """Keysets whose not_before is after `live_after` (older ones have expired and are not opened).
        Keys already opened are kept, so a reload after a rotation opens only the new keyset."""

    @abc.abstractmethod
    def create(self, number: int, not_before: datetime, live_after: datetime) -> bool:
        """Create keyset `number`; False if another writer created it first. A place still held by a keyset
        not older than `live_after` is a SlotBusyError."""
