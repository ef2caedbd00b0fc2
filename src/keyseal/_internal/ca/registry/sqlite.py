"""Registration entries of the directory store in one SQLite database, `<recordPrefix>-entries.db` (mode 0600).

Why SQLite: it is in the standard library, a write is one small transaction instead of a rewrite of every entry,
its B-tree indexes make create, delete, the duplicate check and one agent's entries O(log n), and its journal
makes a write atomic: a process killed mid-write leaves the database with the write wholly there or wholly
absent (an append-only log would need its own recovery and compaction; one file per entry a directory scan
per duplicate check and no batch that is all or nothing). The `keyseal entry` CLI and a running server share the
file under SQLite's own locking, with a busy timeout. The database is not a security boundary: whoever can
write the store directory can write entries, as with the JSON file it replaces.

An earlier store's `<recordPrefix>-entries.json` is imported once, when the database is first created.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keyseal._internal.ca.registry.entries import Entry, EntryStore, Progress, is_served
from keyseal._internal.ca.registry.index import agent_keys, parent_key
from keyseal.errors import InputError, UsageError

__all__ = ["DirectoryEntryStore"]

log = logging.getLogger(__name__)

BUSY_TIMEOUT = 30.0
CHECKPOINT_BATCH = 1000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    entry_id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL, parent_key TEXT NOT NULL,
    selectors TEXT NOT NULL, x509_ttl INTEGER NOT NULL, jwt_ttl INTEGER NOT NULL,
    federates_with TEXT NOT NULL DEFAULT '[]', dns_names TEXT NOT NULL DEFAULT '[]') WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_parent ON entries (parent_key);
CREATE INDEX IF NOT EXISTS entries_by_meaning ON entries (spiffe_id, parent_id, selectors);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def _row(entry: Entry) -> tuple[Any, ...]:
    return (entry.entry_id, entry.spiffe_id, entry.parent_id, parent_key(entry.parent_id),
            json.dumps(list(entry.selectors)), entry.x509_ttl, entry.jwt_ttl, json.dumps(list(entry.federates_with)),
            json.dumps(list(entry.dns_names)))


_INSERT = ("INSERT INTO entries (entry_id, spiffe_id, parent_id, parent_key, selectors, x509_ttl, jwt_ttl, "
           "federates_with, dns_names) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SELECT_ALL = ("SELECT entry_id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, federates_with, dns_names "
               "FROM entries ORDER BY entry_id")
_SELECT_ONE = ("SELECT entry_id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, federates_with, dns_names "
               "FROM entries WHERE entry_id = ?")
_SELECT_AGENT = ("SELECT entry_id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, federates_with, dns_names "
                 "FROM entries WHERE parent_key IN (SELECT value FROM json_each(?)) ORDER BY entry_id")
# Columns later keyseal versions added, with what the rows written before them mean: a database an older keyseal
# made gains them when it is opened (ALTER TABLE ... ADD COLUMN writes no row). An older keyseal that opens the
# database afterwards names its columns in every statement, so it still reads and writes it.
_ADDED_COLUMNS = (("federates_with", "TEXT NOT NULL DEFAULT '[]'"),  # federation
                  ("dns_names", "TEXT NOT NULL DEFAULT '[]'"))  # DNS SANs


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(str(row[0]), str(row[1]), str(row[2]), tuple(str(s) for s in json.loads(row[3])), int(row[4]),
                 int(row[5]), tuple(str(t) for t in json.loads(row[6])), tuple(str(n) for n in json.loads(row[7])))


class DirectoryEntryStore(EntryStore):
    """Entries in SQLite: one connection per thread (the server answers agents on many)."""

    def __init__(self, path: Path, trust_domain: str, legacy: Path | None = None) -> None:
        super().__init__(trust_domain)
        self.path = path
        self.legacy = legacy
        self._local = threading.local()
        self._setup_lock = threading.Lock()
        self._ready = False

    # -- connection -------------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            with self._setup_lock:
                if not self._ready:
                    self._create()
            connection = self._connect()
            self._local.connection = connection
        return connection

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise InputError(f"cannot open {self.path}: {exc}") from exc
        return connection

    def _create(self) -> None:
        """Create the file (0600) and its tables, importing a JSON entries file of an earlier keyseal once."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # Created 0600 before SQLite opens it. Only a new file is opened this way: closing any other
            # descriptor of a database file drops the POSIX locks of every SQLite connection of this process
            # on it, which corrupts it under a concurrent writer.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        connection = self._connect()
        try:
            with self._write(connection):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    connection.execute(statement)
                columns = {row[1] for row in connection.execute("PRAGMA table_info(entries)")}
                for column, definition in _ADDED_COLUMNS:
                    if column not in columns:  # a database an older keyseal wrote: add the column
                        connection.execute(f"ALTER TABLE entries ADD COLUMN {column} {definition}")
                        log.info("%s: added the column %s to its entries", self.path, column)
                imported = connection.execute("SELECT value FROM meta WHERE name = 'imported'").fetchone()
                if imported is None:
                    self._import_legacy(connection)
                    connection.execute("INSERT INTO meta VALUES ('imported', '1')")
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot read {self.path}: {exc}; restore it from a backup or remove it") from exc
        finally:
            connection.close()
        self._ready = True

    def _import_legacy(self, connection: sqlite3.Connection) -> None:
        if self.legacy is None or not self.legacy.exists():
            return
        try:
            documents = json.loads(self.legacy.read_bytes()).get("entries", [])
            entries = [Entry.from_json(d) for d in documents]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"cannot import {self.legacy}: {exc}; fix or remove the file") from exc
        connection.executemany(_INSERT.replace("INSERT", "INSERT OR REPLACE", 1),
                               [_row(e) for e in entries])
        log.info("imported %d entries from %s into %s", len(entries), self.legacy, self.path)

    @contextmanager
    def _write(self, connection: sqlite3.Connection) -> Iterator[None]:
        """One transaction that takes the write lock at once (so a check and the write that follows it are
        atomic against other writers), committed whole or rolled back."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, parameters).fetchall()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot read {self.path}: {exc}") from exc

    # -- the store --------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return [_entry(r) for r in self._query(_SELECT_ALL)]

    def get(self, entry_id: str) -> Entry | None:
        rows = self._query(_SELECT_ONE, (entry_id,))
        entry = _entry(rows[0]) if rows else None
        return entry if entry is not None and is_served(entry) else None

    def for_agent(self, agent_id: str) -> list[Entry]:
        rows = self._query(_SELECT_AGENT, (json.dumps(agent_keys(agent_id)),))
        return [e for e in map(_entry, rows) if e.parented_by(agent_id) and is_served(e)]

    def _duplicate(self, connection: sqlite3.Connection, entry: Entry) -> None:
        found = connection.execute("SELECT entry_id FROM entries WHERE entry_id = ? OR (spiffe_id = ? AND "
                                   "parent_id = ? AND selectors = ?) LIMIT 1",
                                   (entry.entry_id, entry.spiffe_id, entry.parent_id,
                                    json.dumps(list(entry.selectors)))).fetchone()
        if found is not None:
            if found[0] == entry.entry_id:
                raise UsageError(f"an entry {entry.entry_id} exists already")
            raise UsageError(f"entry {found[0]} already gives {entry.spiffe_id} to these selectors")

    def _add(self, entry: Entry) -> Entry:
        return self._add_many([entry], [""])[0]

    def _add_many(self, entries: list[Entry], labels: list[str], progress: Progress | None = None) -> list[Entry]:
        """One transaction: all of the batch is written, or (a duplicate, a crash) none of it."""
        connection = self._connection()
        try:
            with self._write(connection):
                for label, entry in zip(labels, entries, strict=True):
                    try:
                        self._duplicate(connection, entry)
                    except UsageError as exc:
                        raise UsageError(f"{label}: {exc}" if label else exc.message) from exc
                    connection.execute(_INSERT, _row(entry))
                    if progress is not None:
                        progress(1)
            if len(entries) >= CHECKPOINT_BATCH:  # fold a big batch into the database now: readers then search
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # a short write-ahead log
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot write {self.path}: {exc}") from exc
        return entries

    def delete(self, entry_id: str) -> None:
        self.delete_many([entry_id])

    def delete_many(self, entry_ids: list[str], progress: Progress | None = None) -> None:
        """All or none: an unknown ID refuses the whole batch."""
        connection = self._connection()
        try:
            with self._write(connection):
                for entry_id in entry_ids:
                    if connection.execute("DELETE FROM entries WHERE entry_id = ?", (entry_id,)).rowcount != 1:
                        raise UsageError(f"no entry {entry_id[:40]!r}: see keyseal entry list")
                    if progress is not None:
                        progress(1)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot write {self.path}: {exc}") from exc
