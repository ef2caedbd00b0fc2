"""Rollback protection: the highest version of each record a store has seen.

A record's version is bound by its AES-GCM associated data and KEK context, so it cannot be edited; but an
old, genuine record can be put back (replayed). The ledger remembers the highest version seen per record and
an older one is refused. The memory must live apart from the records (whoever can write the store must not be
able to lower it): by default a JSON file in `$KEYSEAL_HOME` (`seen-versions.json`), plus an in-process copy.
A ledger is raised only after a record authenticated (opened) or was written, so a forged record cannot poison
it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from keyseal._internal.atomic import write_atomic
from keyseal._internal.home import keyseal_home
from keyseal.errors import RecordRollbackError

__all__ = ["LEDGER_FILE", "FileLedger", "VersionLedger", "default_ledger"]

log = logging.getLogger(__name__)

LEDGER_FILE = "seen-versions.json"


class VersionLedger:
    """In-process memory only: what a long-running server keeps when no ledger file is configured."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "this process's memory of seen versions"

    def highest(self, key: str) -> int | None:
        with self._lock:
            return self._seen.get(key)

    def check(self, key: str, version: int, where: str) -> None:
        """Refuse a record older than one already seen (equal is fine: the same record read again)."""
        highest = self.highest(key)
        if highest is not None and version < highest:
            raise RecordRollbackError(
                f"{where} is version {version}, but version {highest} of this record was already seen: "
                f"refusing a replayed older record; restore the newest record (or, if the rollback is "
                f"intended, remove {key!r} from {self.describe()})"
            )

    def record(self, key: str, version: int) -> None:
        with self._lock:
            if version > self._seen.get(key, 0):
                self._seen[key] = version


class FileLedger(VersionLedger):
    """Seen versions persisted in a JSON file (mode 0600), shared by processes under a lock file.

    Failing to persist (a read-only home) is logged and the in-process memory still applies: it weakens
    rollback protection, it does not stop signing.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def highest(self, key: str) -> int | None:
        on_disk = self._read().get(key)
        in_memory = super().highest(key)
        values = [v for v in (on_disk, in_memory) if v is not None]
        return max(values) if values else None

    def record(self, key: str, version: int) -> None:
        super().record(key, version)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self._locked():
                seen = self._read()
                if version <= seen.get(key, 0):
                    return
                seen[key] = version
                data = json.dumps(seen, sort_keys=True, indent=2).encode() + b"\n"
                write_atomic(self.path, data, mode=0o600)
        except OSError as exc:
            log.warning("cannot record seen record versions in %s (%s): rollback protection is limited to "
                        "this process", self.path, exc.strerror)

    def _read(self) -> dict[str, int]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError):
            log.warning("cannot read the seen-versions ledger %s: treating it as empty", self.path)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items() if isinstance(k, str) and type(v) is int}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_ledger() -> FileLedger:
    """The per-user ledger, `$KEYSEAL_HOME/seen-versions.json`."""
    return FileLedger(keyseal_home() / LEDGER_FILE)
