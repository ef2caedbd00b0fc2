"""Where wrapped key records live: a directory (the embedded default) or Kubernetes custom resources.

A store holds opaque, already-encrypted records; it never sees a DEK or a key. Writes are compare-and-swap on
a revision (a content hash for a directory, `metadata.resourceVersion` for Kubernetes): a writer that lost a
race reloads and decides again, it never overwrites a newer record blindly. Each store carries the version
ledger that provides rollback protection (see `keyseal.wrapping.ledger`).

`import keyseal.store` imports no SDK; `keyseal.store.kubernetes` imports the `kubernetes` client.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from keyseal.errors import StoreConflictError, WrappedRecordError
from keyseal.wrapping.ledger import VersionLedger
from keyseal.wrapping.record import WrappedRecord, check_record_name

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

    def __init__(self, ledger: VersionLedger) -> None:
        self.ledger = ledger

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
        self.ledger.check(self.ledger_key(name), record.version, where)
        return StoredRecord(record, revision)

    def put(self, name: str, record: WrappedRecord, expected_revision: str | None) -> str:
        """Conditional write (see `_write`); the ledger then remembers the new version."""
        check_record_name(name)
        if record.name != name:
            raise WrappedRecordError(f"cannot store the record named {record.name!r} as {name!r}")
        revision = self._write(name, record, expected_revision)
        self.ledger.record(self.ledger_key(name), record.version)
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
