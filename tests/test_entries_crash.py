"""A writer of the directory store killed (SIGKILL) at random points leaves a store that loads: SQLite's
journal rolls an unfinished write back, so every batch is wholly there or wholly absent, and every write the
writer saw committed is there. The next writer carries on from it."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyseal._internal.ca.registry.sqlite import DirectoryEntryStore

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

TD = "example.org"
BATCH = 40
WRITER = r"""
import sys
from pathlib import Path
from keyseal._internal.ca.registry.entries import Entry
from keyseal._internal.ca.registry.sqlite import DirectoryEntryStore

store = DirectoryEntryStore(Path(sys.argv[1]), "example.org")
round_ = sys.argv[2]
for batch in range(10_000):
    prefix = f"r{round_}-b{batch}-"
    if batch % 3 == 2:  # now and then one entry alone, the path `keyseal entry create` takes
        store.create(f"spiffe://example.org/{prefix}one", "spiffe://example.org/keyseal/agent/n1",
                     (f"unix:uid:{batch}",))
        print(prefix + "one", flush=True)
        continue
    store.create_many([Entry(f"{prefix}{i}", f"spiffe://example.org/{prefix}{i}",
                             f"spiffe://example.org/keyseal/agent/n{i % 7}", (f"unix:uid:{i}",))
                       for i in range(""" + str(BATCH) + r""")])
    print(prefix + "batch", flush=True)
"""


def test_a_writer_killed_at_random_points_leaves_a_store_that_loads(tmp_path: Path) -> None:
    path = tmp_path / "store" / "keyseal-entries.db"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    committed: set[str] = set()
    for round_ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(round_)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            time.sleep(rng.uniform(0.0, 0.6))  # 0: still importing or creating the tables
        finally:
            writer.send_signal(signal.SIGKILL)
            output, _ = writer.communicate(timeout=30)
        committed |= set(output.split())

        store = DirectoryEntryStore(path, TD)  # a fresh reader, as the server after a restart
        names = {e.spiffe_id.removeprefix(f"spiffe://{TD}/") for e in store.entries()}
        batches: dict[str, int] = {}
        for name in names:
            prefix, _, tail = name.rpartition("-")
            if tail != "one":
                batches[prefix] = batches.get(prefix, 0) + 1
        assert all(count == BATCH for count in batches.values()), batches  # none half written
        for done in committed:  # what the writer saw committed is there
            if done.endswith("-one"):
                assert done in names, done
            else:
                assert batches.get(done.removesuffix("-batch")) == BATCH, done
        store.for_agent(f"spiffe://{TD}/keyseal/agent/n1")
        if path.exists():
            with sqlite3.connect(path) as database:
                assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            database.close()
    assert committed, "the writer never committed anything: the kills came too early to test much"
