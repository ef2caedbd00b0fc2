"""Rollback protection every replica shares: the highest record versions, kept in the store itself.

A replica's own memory (or ledger file) is empty when it starts fresh, so on its own it would accept an older
record put back into the store and rotate keys over it. A store with a scope (the server's) therefore holds the
record `keyseal-seen-versions` (format v2, keyType `seen-versions`): a JSON map of record name -> highest version
ever written or opened (and `<name>#bound` -> 1 once a v2 record of that name was: see keyseal._internal.store), sealed
like any record (AES-256-GCM under a fresh DEK wrapped by the same KEK, bound to the store's scope, its own name
and version). Every replica reads it (one unwrap per change of it) and refuses a record
older than it; every write or first open of a newer version raises it, by conditional write (replicas that raise
it at once merge). It is itself versioned, so a replica that read it refuses an older copy of it too.

Not covered: someone who can write the store and kept an older copy of both a record and this one can put both
back together; a replica that saw the newer ones refuses them (its own memory or file), a fresh one cannot tell.
Deleting it (delete on wrappedkeys, which the server's Role does not hold) resets it the same way. A tampered or
unreadable seen-versions record is refused, and with it every record of the store, until it is restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from datetime import UTC, datetime

from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.records.record import MAX_VERSION, SEEN_VERSIONS_TYPE, WrappedRecord
from keyseal._internal.store import RecordStore, StoredRecord
from keyseal._internal.wrapping.envelope import seal, unseal
from keyseal._internal.wrapping.provider import KekProvider
from keyseal.errors import KekMismatchError, WrappedRecordError

__all__ = ["LEDGER_NAME", "StoreLedger"]

log = logging.getLogger(__name__)

LEDGER_NAME = "keyseal-seen-versions"


class StoreLedger(VersionLedger):
    """The store's own seen-versions record, plus `local` (this process's memory or a ledger file). Installs
    itself as `store.ledger`; the store must have a scope."""

    def __init__(self, store: RecordStore, kek: KekProvider) -> None:
        super().__init__()
        if not store.scope:
            raise WrappedRecordError("a seen-versions record needs a store with a scope")
        self.store = store
        self.kek = kek
        self.local = store.ledger
        self._prefix = f"record:{store.scope}|"
        self._cache: tuple[str, dict[str, int]] | None = None  # (SHA-256 of the record's bytes, its map)
        self._cache_lock = threading.Lock()
        store.ledger = self

    def describe(self) -> str:
        return f"{self.store.location(LEDGER_NAME)} and {self.local.describe()}"

    def highest(self, key: str) -> int | None:
        local = self.local.highest(key)
        name = self._name_of(key)
        stored = self._stored_marks().get(name) if name is not None else None
        values = [v for v in (local, stored) if v is not None]
        return max(values) if values else None

    def record(self, key: str, version: int) -> None:
        self.local.record(key, version)
        name = self._name_of(key)
        if name is not None and version > self._stored_marks().get(name, 0):
            self._raise(name, version)

    # -- internals -------------------------------------------------------------------------------------

    def _name_of(self, key: str) -> str | None:
        """The record name of one of this store's identity keys (never the seen-versions record itself, whose
        own version only the local ledger keeps)."""
        if not key.startswith(self._prefix) or key[len(self._prefix):] == LEDGER_NAME:
            return None
        return key[len(self._prefix):]

    def _stored_marks(self) -> dict[str, int]:
        stored = self.store.peek(LEDGER_NAME)  # not get(): its rollback check would ask this ledger again
        return {} if stored is None else self._open(stored)

    def _open(self, stored: StoredRecord) -> dict[str, int]:
        record = stored.record
        digest = hashlib.sha256(record.to_bytes()).hexdigest()
        with self._cache_lock:
            if self._cache is not None and self._cache[0] == digest:
                return self._cache[1]
        where = self.store.location(LEDGER_NAME)
        if record.name != LEDGER_NAME or record.scope != self.store.scope or record.key_type != SEEN_VERSIONS_TYPE:
            raise WrappedRecordError(f"{where} is not this store's seen-versions record (scope {self.store.scope}): "
                                     f"restore it from a backup")
        identity = f"record:{self.store.scope}|{record.name}"  # the store's own record: always scoped
        self.local.check(identity, record.version, where)
        if record.kek_provider == self.kek.provider and record.kek_id != self.kek.kek_id:
            raise KekMismatchError(
                f"{where} (the store's seen-versions record) is wrapped by {record.kek_provider} KEK "
                f"{record.kek_id}, and no configured KEK opens it (the configured one is {self.kek.describe()}, id "
                f"{self.kek.kek_id}): the store's records are unreadable until that KEK is restored"
            )
        payload = unseal(record, self.kek, where)
        try:
            document = json.loads(payload)
            seen = {str(k): v for k, v in document["seen"].items()}
            if not all(type(v) is int and 1 <= v <= MAX_VERSION for v in seen.values()):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WrappedRecordError(f"{where} decrypts, but not to a map of seen versions: restore it") from exc
        self.local.record(identity, record.version)
        with self._cache_lock:
            self._cache = (digest, seen)
        return seen

    def _raise(self, name: str, version: int) -> None:
        def produce(current: StoredRecord | None) -> WrappedRecord:
            seen = dict(self._open(current)) if current is not None else {}
            seen[name] = max(seen.get(name, 0), version)
            payload = json.dumps({"seen": seen}, sort_keys=True, separators=(",", ":")).encode()
            record = seal(payload, name=LEDGER_NAME, version=current.record.version + 1 if current else 1,
                          created=datetime.now(UTC), key_type=SEEN_VERSIONS_TYPE, kek=self.kek,
                          scope=self.store.scope)
            with self._cache_lock:
                self._cache = (hashlib.sha256(record.to_bytes()).hexdigest(), seen)
            return record

        self.store.update(LEDGER_NAME, produce)
        log.debug("%s: %s is now at version %d", self.store.location(LEDGER_NAME), name, version)
