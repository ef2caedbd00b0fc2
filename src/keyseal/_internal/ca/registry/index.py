"""Registration entries indexed by who may receive them, so one agent's sync costs O(its own entries).

An entry reaches the agent named by its parent ID and every agent below it by whole path segments
(`Entry.parented_by`). The index keys entries by their parent ID without trailing slashes; an agent looks up
its own ID and each of its prefixes that ends before a "/", a handful of dictionary lookups whatever the total,
then keeps only what `parented_by` accepts (so the index can never widen what an agent is given).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable

from keyseal._internal.ca.registry.entries import Entry, is_served

__all__ = ["EntryIndex", "agent_keys", "entries_digest", "meaning_of", "parent_key"]

Meaning = tuple[str, str, tuple[str, ...]]


def parent_key(parent_id: str) -> str:
    """Where an entry with this parent ID is filed."""
    return parent_id.rstrip("/")


def agent_keys(agent_id: str) -> list[str]:
    """Every key under which an entry this agent may receive can be filed: its ID and its prefixes before a '/'."""
    keys = dict.fromkeys([agent_id, *(agent_id[:i] for i, c in enumerate(agent_id) if c == "/")])
    return list(keys)


def meaning_of(entry: Entry) -> Meaning:
    """What makes two entries duplicates: the same SPIFFE ID for the same parent and selectors."""
    return entry.spiffe_id, entry.parent_id, entry.selectors


def entries_digest(entries: Iterable[Entry]) -> str:
    """A short digest of a set of entries, the same on every replica that holds the same entries."""
    documents = sorted((e.to_json() for e in entries), key=lambda d: str(d["entry_id"]))
    return hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()[:32]


class EntryIndex:
    """Entries by ID, by parent key and by meaning; every operation O(1) (for_agent: O(the agent's entries))."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Entry] = {}
        self._by_parent: dict[str, dict[str, Entry]] = {}
        self._by_meaning: dict[Meaning, set[str]] = {}
        for entry in entries:
            self.put(entry)

    def __len__(self) -> int:
        return len(self._by_id)

    def put(self, entry: Entry) -> None:
        """Add an entry, or replace the one with its ID."""
        with self._lock:
            self._remove(entry.entry_id)
            self._by_id[entry.entry_id] = entry
            self._by_parent.setdefault(parent_key(entry.parent_id), {})[entry.entry_id] = entry
            self._by_meaning.setdefault(meaning_of(entry), set()).add(entry.entry_id)

    def remove(self, entry_id: str) -> Entry | None:
        with self._lock:
            return self._remove(entry_id)

    def _remove(self, entry_id: str) -> Entry | None:
        old = self._by_id.pop(entry_id, None)
        if old is None:
            return None
        siblings = self._by_parent[parent_key(old.parent_id)]
        del siblings[entry_id]
        if not siblings:
            del self._by_parent[parent_key(old.parent_id)]
        same = self._by_meaning[meaning_of(old)]
        same.discard(entry_id)
        if not same:
            del self._by_meaning[meaning_of(old)]
        return old

    def get(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def duplicate_of(self, entry: Entry) -> Entry | None:
        """A stored entry with the same meaning, if any."""
        with self._lock:
            ids = self._by_meaning.get(meaning_of(entry))
            return self._by_id[min(ids)] if ids else None

    def for_agent(self, agent_id: str) -> list[Entry]:
        """The entries this agent may serve (reserved IDs left out), sorted by ID."""
        with self._lock:
            found = [e for key in agent_keys(agent_id) for e in self._by_parent.get(key, {}).values()]
        return sorted((e for e in found if e.parented_by(agent_id) and is_served(e)), key=lambda e: e.entry_id)

    def all(self) -> list[Entry]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda e: e.entry_id)
