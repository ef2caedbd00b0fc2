"""`directory` store: one file per record, `<root>/<name>`, mode 0600.

Writes are atomic (temporary file, fsync, rename, fsync the directory: a crash leaves the old record or the
new one, never a mix) and conditional: under an exclusive lock on the directory, the stored file's SHA-256
must still be the revision the writer read.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from keyseal._internal.atomic import directory_locked, write_atomic
from keyseal._internal.records.ledger import VersionLedger, default_ledger
from keyseal._internal.records.record import WrappedRecord, check_record_name
from keyseal._internal.store import RecordStore
from keyseal.errors import InputError, StoreConflictError

__all__ = ["RECORD_MODE", "DirectoryStore"]

RECORD_MODE = 0o600


class DirectoryStore(RecordStore):
    """Records as files in one directory. The ledger defaults to `$KEYSEAL_HOME/seen-versions.json`."""

    def __init__(self, root: Path, ledger: VersionLedger | None = None, scope: str = "") -> None:
        super().__init__(ledger if ledger is not None else default_ledger(), scope)
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / check_record_name(name)

    def location(self, name: str) -> str:
        return str(self.path(name))

    def ledger_key(self, name: str) -> str:
        return f"dir:{self.root.resolve() / name}"

    def read_bytes(self, name: str) -> bytes | None:
        path = self.path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from exc

    def _read(self, name: str) -> tuple[WrappedRecord, str] | None:
        data = self.read_bytes(name)
        if data is None:
            return None
        return WrappedRecord.from_bytes(data, self.location(name)), _revision(data)

    def current_revision(self, name: str) -> str | None:
        data = self.read_bytes(name)
        return None if data is None else _revision(data)

    def _write(self, name: str, record: WrappedRecord, expected_revision: str | None) -> str:
        data = record.to_bytes()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            current = self.current_revision(name)
            if current != expected_revision:
                raise StoreConflictError(
                    f"{self.location(name)} changed since it was read: reload it and decide again"
                )
            write_atomic(self.path(name), data, mode=RECORD_MODE)
        return _revision(data)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return directory_locked(self.root)


def _revision(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
