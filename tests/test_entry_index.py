"""The index by parent (ca.registry.index) and the SQLite directory store answer every agent exactly what a
brute-force scan with `Entry.parented_by` does, through random sequences of creates and deletes, with parent
IDs that are prefixes of each other (an entry for `.../agent` reaches every agent below it, but not
`.../agentx`), trailing slashes written by hand, and reserved IDs that are never served."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyseal._internal.ca.registry.entries import Entry, is_served
from keyseal._internal.ca.registry.index import EntryIndex, agent_keys
from keyseal._internal.ca.registry.sqlite import DirectoryEntryStore

TD = "example.org"
ROOT = f"spiffe://{TD}"
PARENTS = [f"{ROOT}/keyseal/agent", f"{ROOT}/keyseal/agent/", f"{ROOT}/keyseal/agent/n1", f"{ROOT}/keyseal/agent/n1/",
           f"{ROOT}/keyseal/agent/n1x", f"{ROOT}/keyseal/agent/n2", f"{ROOT}/keyseal", f"{ROOT}/keyseal/agent/n1/sub",
           f"{ROOT}/keyseal/agen", f"{ROOT}/other/agent/n1", ROOT + "/", "spiffe://other.org/keyseal/agent/n1"]
AGENTS = [f"{ROOT}/keyseal/agent/n1", f"{ROOT}/keyseal/agent/n1x", f"{ROOT}/keyseal/agent/n2",
          f"{ROOT}/keyseal/agent/n1/sub", f"{ROOT}/keyseal/agent/n1/", f"{ROOT}/keyseal/agent/n3", "spiffe:/x"]
SPIFFE_IDS = [f"{ROOT}/web", f"{ROOT}/db", f"{ROOT}/keyseal/agent/n9", "not a spiffe id"]
# The checked store takes only what `keyseal entry create` accepts: no trailing slash, no reserved ID.
CHECKED_PARENTS = [p for p in PARENTS if not p.endswith("/") and p.startswith(ROOT + "/")]
CHECKED_IDS = [f"{ROOT}/web", f"{ROOT}/db", f"{ROOT}/ns/a/api"]
SETTINGS = settings(max_examples=60, deadline=timedelta(seconds=10), database=None,
                    suppress_health_check=[HealthCheck.too_slow])

create = st.tuples(st.just("create"), st.integers(0, 1 << 16), st.sampled_from(PARENTS), st.sampled_from(SPIFFE_IDS),
                   st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))
delete = st.tuples(st.just("delete"), st.integers(0, 40))
operations = st.lists(st.one_of(create, delete), max_size=40)


def brute_force(entries: list[Entry], agent_id: str) -> list[Entry]:
    return sorted((e for e in entries if e.parented_by(agent_id) and is_served(e)), key=lambda e: e.entry_id)


def test_agent_keys_are_the_prefixes_before_a_slash() -> None:
    assert agent_keys(f"{ROOT}/keyseal/agent/n1") == [f"{ROOT}/keyseal/agent/n1", "spiffe:", "spiffe:/", ROOT,
                                                      f"{ROOT}/keyseal", f"{ROOT}/keyseal/agent"]


@pytest.mark.slow
@SETTINGS
@given(operations)
def test_the_index_matches_a_brute_force_scan(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    index = EntryIndex()
    truth: dict[str, Entry] = {}
    for op in ops:
        if op[0] == "create":
            _, number, parent, spiffe_id, selectors = op
            entry = Entry(f"e{number % 50}", spiffe_id, parent, tuple(f"unix:uid:{s}" for s in sorted(selectors)))
            index.put(entry)  # a new ID, or the same ID changed (a watched MODIFIED event)
            truth[entry.entry_id] = entry
        else:
            gone = index.remove(f"e{op[1]}")
            assert gone == truth.pop(f"e{op[1]}", None)
        for agent in AGENTS:
            assert index.for_agent(agent) == brute_force(list(truth.values()), agent), agent
        assert index.all() == sorted(truth.values(), key=lambda e: e.entry_id)
        for entry in truth.values():
            duplicate = index.duplicate_of(Entry("x", entry.spiffe_id, entry.parent_id, entry.selectors))
            assert duplicate is not None and duplicate.selectors == entry.selectors
            assert (duplicate.spiffe_id, duplicate.parent_id) == (entry.spiffe_id, entry.parent_id)


checked_create = st.tuples(st.just("create"), st.sampled_from(CHECKED_PARENTS), st.sampled_from(CHECKED_IDS),
                           st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))
checked_operations = st.lists(st.one_of(checked_create, delete), max_size=25)


@pytest.mark.slow
@SETTINGS
@given(checked_operations)
def test_the_sqlite_store_matches_a_brute_force_scan(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as directory:
        store = DirectoryEntryStore(Path(directory) / "entries.db", TD)
        truth: list[Entry] = []
        for op in ops:
            if op[0] == "create":
                _, parent, spiffe_id, selectors = op
                wanted = (spiffe_id, parent, tuple(sorted(f"unix:uid:{s}" for s in selectors)))
                if any((e.spiffe_id, e.parent_id, e.selectors) == wanted for e in truth):
                    continue  # a duplicate: refused (tests/test_entry_bulk.py); nothing else to compare
                truth.append(store.create(*wanted))
            elif truth:
                doomed = truth.pop(op[1] % len(truth))
                store.delete(doomed.entry_id)
            for agent in AGENTS:
                assert store.for_agent(agent) == brute_force(truth, agent), agent
            assert store.entries() == sorted(truth, key=lambda e: e.entry_id)
