"""Where wrapped key records live: a directory (the embedded default) or Kubernetes custom resources.

A store holds opaque, already-encrypted records; it never sees a DEK or a key. Writes are compare-and-swap on
a revision (a content hash for a directory, `metadata.resourceVersion` for Kubernetes): a writer that lost a
race reloads and decides again, it never overwrites a newer record blindly. Each store carries the version
ledger that provides rollback protection (see `records.ledger`): a record's versions are remembered under
its location and under its own identity (what its associated data binds: scope and name, plus the creation time
for a record without a scope), so an older copy is refused wherever it is put. A store may have a scope (the
server's: trust domain and namespace): its records are written bound to it, and one bound elsewhere is refused.

Upgrades: a store with a scope still reads unbound (v1) records, which an older keyseal wrote and, during a rolling
upgrade, may still write (an older replica rotating a slot writes v1 at the next version). So a v1 record newer
than the store's mark is accepted, with a warning, until a bound (v2) record of that name has been seen (the
ledger then holds the flag `<identity>#bound`): from then on no older keyseal can have written it (they do not read
v2), and a v1 record of that name is refused whatever its version. An older record is refused as ever.

`import keyseal._internal.store` imports no SDK; `keyseal._internal.store.kubernetes` imports the `kubernetes` client.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.records.record import (
    FORMAT_V2,
    SEEN_VERSIONS_TYPE,
    WrappedRecord,
    check_record_name,
    check_scope,
)
from keyseal.errors import StoreConflictError, WrappedRecordError

__all__ = ["RecordStore", "StoredRecord"]

log = logging.getLogger(__name__)

UPDATE_ATTEMPTS = 5


@dataclass(frozen=True)
class StoredRecord:
    """A record as read from a store, with the revision a conditional write must name."""

    record: WrappedRecord
    revision: str


class RecordStore(abc.ABC):
    """A place that maps record names to records, with conditional (compare-and-swap) writes."""

    def __init__(self, ledger: VersionLedger, scope: str = "") -> None:
        self.ledger = ledger
        self.scope = check_scope(scope)
        self._upgrade_warned: set[tuple[str, int]] = set()  # v1 records taken as written by an older keyseal

    def identity_key(self, record: WrappedRecord, key_id: str | None = None) -> str | None:
        """The record's own identity in the version ledger, wherever it is stored. With a scope: its scope and
        name (bound by its associated data; a v1 record read in a store with a scope, written before the store
        had one, counts as of that scope). Without one (a key file of `keyseal keys`): the key itself, by
        `key_id` (the SHA-256 of its public key, known once the record is opened; None before), so a rewrapped
        key's older copy is refused at any path while two unrelated keys that share a file name never are."""
        scope = record.scope or self.scope
        if scope:
            return f"record:{scope}|{record.name}"
        return f"key:{key_id}" if key_id else None

    def remember(self, record: WrappedRecord, key_id: str | None = None) -> None:
        """Raise the ledger to this record's version, under its location and its identity (after it was
        authenticated or written: a forged record must not poison the ledger). For a bound (v2) record, also flag
        that its name holds bound records now (once; not for the seen-versions record, which keeps no flag)."""
        self.ledger.record(self.ledger_key(record.name), record.version)
        identity = self.identity_key(record, key_id)
        if identity is not None:
            self.ledger.record(identity, record.version)
        if self.scope and record.scope and record.key_type != SEEN_VERSIONS_TYPE:
            self.ledger.record(self._bound_key(record.name), 1)

    def check_opened(self, record: WrappedRecord, key_id: str, where: str) -> None:
        """Refuse an opened record older than a version of the same key already seen (at any path)."""
        identity = self.identity_key(record, key_id)
        if identity is not None:
            self.ledger.check(identity, record.version, where)

    def _bound_key(self, name: str) -> str:
        """The ledger key flagging that a bound (v2) record of `name` was seen here (`#` is in no record name)."""
        return f"record:{self.scope}|{name}#bound"

    def highest_seen(self, name: str) -> int:
        """The highest version of `name` this store's ledger has seen (0: none), for the next write."""
        keys = [self.ledger_key(name)] + ([f"record:{self.scope}|{name}"] if self.scope else [])
        return max((self.ledger.highest(key) or 0) for key in keys)

    @abc.abstractmethod
    def location(self, name: str) -> str:
        """Where a record lives, for messages (a path, or kind/namespace/name)."""

    @abc.abstractmethod
    def ledger_key(self, name: str) -> str:
        """The record's identity in the version ledger: unique across stores."""

    @abc.abstractmethod
    def _read(self, name: str) -> tuple[WrappedRecord, str] | None:
        """The record and its revision, None if absent; an unparsable record is a WrappedRecordError."""

    @abc.abstractmethod
    def current_revision(self, name: str) -> str | None:
        """The revision of whatever is stored under `name` (even if it is not a valid record), or None."""

    @abc.abstractmethod
    def _write(self, name: str, record: WrappedRecord, expected_revision: str | None) -> str:
        """Write only if the stored revision is still `expected_revision` (None: only if absent).

        Returns the new revision; a changed revision is a StoreConflictError and nothing is written.
        """

    def peek(self, name: str) -> StoredRecord | None:
        """A record as stored, parsed but neither checked against the ledger nor against its name and scope: for
        checks that must run before anything is trusted (which KEK wraps the records; the ledger's own record)."""
        check_record_name(name)
        found = self._read(name)
        return None if found is None else StoredRecord(*found)

    def get(self, name: str) -> StoredRecord | None:
        """Read a record; refuse one stored under another name, or older than a version already seen."""
        check_record_name(name)
        found = self._read(name)
        if found is None:
            return None
        record, revision = found
        where = self.location(name)
        if record.name != name:
            raise WrappedRecordError(
                f"{where} holds the record named {record.name!r}, not {name!r}: records are bound to their "
                f"name; move it back to {record.name!r}"
            )
        if record.format == FORMAT_V2 and record.scope != self.scope:
            raise WrappedRecordError(
                f"{where} belongs to {record.scope}, not to {self.scope or 'a store without a scope'}: a record copied "
                f"from another namespace or trust domain is refused (it would not decrypt here either)"
            )
        self.ledger.check(self.ledger_key(name), record.version, where)
        identity = self.identity_key(record)
        if identity is not None:
            self.ledger.check(identity, record.version, where)
        if self.scope and not record.scope:
            self._check_unbound(record, where)
        return StoredRecord(record, revision)

    def _check_unbound(self, record: WrappedRecord, where: str) -> None:
        """A v1 record in a store with a scope (see the module's Upgrades): refused once a bound record of its
        name was seen; accepted, loudly, if newer than the store's mark (an older replica of a rolling upgrade
        rotated it; the mark rises once it is opened under the configured KEK)."""
        if self.ledger.highest(self._bound_key(record.name)):
            raise WrappedRecordError(
                f"{where} is an unbound (format v1) record, but this store has held bound (v2) records of "
                f"{record.name!r}, which no older keyseal rewrites: refusing a record put there from elsewhere; "
                f"restore the store's own record"
            )
        highest = self.ledger.highest(f"record:{self.scope}|{record.name}")
        if highest is not None and record.version > highest and (where, record.version) not in self._upgrade_warned:
            self._upgrade_warned.add((where, record.version))
            log.warning("%s is an unbound (format v1) record of version %d, newer than the version %d this store "
                        "has seen: taken as written by an older keyseal that is still running (a rolling upgrade); "
                        "finish the upgrade. It becomes bound (v2) at its next write", where, record.version,
                        highest)

    def put(self, name: str, record: WrappedRecord, expected_revision: str | None) -> str:
        """Conditional write (see `_write`); the ledger then remembers the new version."""
        check_record_name(name)
        if record.name != name:
            raise WrappedRecordError(f"cannot store the record named {record.name!r} as {name!r}")
        if record.scope != self.scope:
            raise WrappedRecordError(f"cannot store a record of scope {record.scope!r} in a store of scope "
                                     f"{self.scope!r}")
        revision = self._write(name, record, expected_revision)
        self.remember(record)
        return revision

    def update(
        self,
        name: str,
        produce: Callable[[StoredRecord | None], WrappedRecord],
        *,
        replace_invalid: bool = False,
        attempts: int = UPDATE_ATTEMPTS,
    ) -> WrappedRecord:
        """Read, let `produce` decide the new record from the current one, write conditionally; on a
        conflict reload and let `produce` decide again. With replace_invalid, an unreadable (or replayed)
        stored record is replaced as if absent (an explicit --force)."""
        for _ in range(attempts):
            try:
                current = self.get(name)
                revision = current.revision if current else None
            except WrappedRecordError:
                if not replace_invalid:
                    raise
                current, revision = None, self.current_revision(name)
            record = produce(current)
            try:
                self.put(name, record, revision)
            except StoreConflictError:
                log.info("%s changed while it was being written: reloading it", self.location(name))
                continue
            return record
        raise StoreConflictError(
            f"{self.location(name)} kept changing while keyseal tried to write it ({attempts} attempts): "
            f"another writer is busy with it; try again"
        )
