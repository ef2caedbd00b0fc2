"""`keyseal entry create --from-file` and `keyseal entry delete --selector`, through the CLI, on the directory
store (SQLite) and the Kubernetes store: a batch is checked whole before any entry is written, a bad line is
named by its number, and a round trip through `entry list --json-lines` gives the same entries."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from keyseal._internal.ca.registry.entries import Entry
from keyseal._internal.ca.registry.sqlite import DirectoryEntryStore
from keyseal._internal.ca.registry.stores import entry_store_for
from tests.conftest import assert_one_line_error
from tests.harness.ca import TRUST_DOMAIN
from tests.test_progress import on_pty

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

AGENT = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"


def line(n: int, **extra: Any) -> str:
    return json.dumps({"spiffe_id": f"spiffe://{TRUST_DOMAIN}/w{n}", "parent_id": AGENT,
                       "selectors": [f"unix:uid:{n}"], **extra})


@pytest.fixture
def keyseal(entry_cli: Any) -> Any:
    """`keyseal entry ... --config` on either store (conftest's entry_cli)."""
    return entry_cli


def test_bulk_create_then_list_round_trip_and_delete_by_selector(keyseal: Any, tmp_path: Path) -> None:
    batch = tmp_path / "entries.jsonl"
    batch.write_text("\n".join([line(1), "", line(2, entry_id="given-id", x509_ttl=600),
                                line(3, selectors=["unix:uid:3", "unix:gid:50"])]) + "\n")
    created = keyseal("create", "--from-file", str(batch))
    assert created.returncode == 0, created.stderr
    ids = created.stdout.split()
    assert len(ids) == 3 and ids[1] == "given-id"
    listed = keyseal("list", "--json-lines")
    assert listed.returncode == 0, listed.stderr
    documents = [json.loads(x) for x in listed.stdout.splitlines()]
    assert sorted(d["entry_id"] for d in documents) == sorted(ids)
    assert json.loads(keyseal("list", "--json").stdout) == documents  # the same shape, one per line

    again = keyseal("create", "--from-file", str(batch))  # every line is stored already: nothing is written
    assert_one_line_error(again)
    assert f"{batch} line 1: entry {ids[0]} already gives" in again.stderr

    gone = keyseal("delete", "--selector", "unix:gid:50")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.split() == [ids[2]]
    assert_one_line_error(keyseal("delete", "--selector", "unix:gid:50"))  # none left has it
    assert_one_line_error(keyseal("delete", ids[0], "--selector", "unix:uid:1"))  # one or the other

    # The listed entries go back in as they are: into an empty store, the same entries with the same IDs.
    round_trip = tmp_path / "listed.jsonl"
    round_trip.write_text(keyseal("list", "--json-lines").stdout)
    for document in documents[:]:
        if document["entry_id"] != ids[2]:
            assert keyseal("delete", document["entry_id"]).returncode == 0
    assert keyseal("list", "--json").stdout.strip() == "[]"
    assert keyseal("create", "--from-file", str(round_trip)).returncode == 0
    assert [d for d in documents if d["entry_id"] != ids[2]] == json.loads(keyseal("list", "--json").stdout)


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", "not JSON"),
    ('["a list"]', "not a JSON object"),
    (line(9, colour="red"), "unknown field 'colour'"),
    (json.dumps({"spiffe_id": f"spiffe://{TRUST_DOMAIN}/x", "parent_id": AGENT}), "missing field 'selectors'"),
    (line(9, selectors=["unix:uid:x"]), "invalid selector"),
    (line(9, x509_ttl="10m"), "TTLs whole seconds"),
    (json.dumps({"spiffe_id": "spiffe://other.example/x", "parent_id": AGENT, "selectors": ["unix:uid:1"]}),
     "not in trust domain"),
    (line(9, entry_id="Not An ID"), "entry_id"),
    (line(1), "the same entry as at"),
    (line(9, entry_id="given"), "is given twice"),
    (line(9, federates_with="partner.example"), "federates_with must be a list"),
    (line(9, federates_with=[TRUST_DOMAIN]), "own trust domain"),
    (line(9, federates_with=["Not A Domain"]), "invalid trust domain"),
])
def test_a_bad_line_is_named_and_nothing_is_written(keyseal: Any, tmp_path: Path, bad: str, message: str) -> None:
    batch = tmp_path / "entries.jsonl"
    batch.write_text("\n".join([line(1), line(2, entry_id="given"), "", bad, line(5)]) + "\n")
    result = keyseal("create", "--from-file", str(batch))
    assert_one_line_error(result)
    assert f"{batch} line 4: " in result.stderr and message in result.stderr, result.stderr
    assert entry_store_for(keyseal.config).entries() == []


def test_from_file_and_one_entry_options_do_not_mix(keyseal: Any, tmp_path: Path) -> None:
    batch = tmp_path / "entries.jsonl"
    batch.write_text(line(1) + "\n")
    assert_one_line_error(keyseal("create", "--from-file", str(batch), "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/x"))
    assert_one_line_error(keyseal("create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/x"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_one_line_error(keyseal("create", "--from-file", str(empty)))
    assert_one_line_error(keyseal("create", "--from-file", str(tmp_path / "missing.jsonl")))


def test_federates_with_goes_through_a_bulk_file_and_reaches_the_servers_view(
        keyseal: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    batch = tmp_path / "entries.jsonl"
    batch.write_text(line(1, federates_with=["partner.example", "b.example"]) + "\n" + line(2) + "\n")
    created = keyseal("create", "--from-file", str(batch), "--json")  # with --json: each entry as a JSON line
    assert created.returncode == 0, created.stderr
    documents = [json.loads(x) for x in created.stdout.splitlines()]
    assert documents[0]["federates_with"] == ["b.example", "partner.example"]
    assert "federates_with" not in documents[1]  # absent when empty, as `entry list --json` has always shown
    listed = [json.loads(x) for x in keyseal("list", "--json-lines").stdout.splitlines()]
    assert sorted(listed, key=lambda d: d["entry_id"]) == sorted(documents, key=lambda d: d["entry_id"])
    assert_one_line_error(keyseal("create", "--from-file", str(batch), "--federates-with", "partner.example"))

    # What a server answers agents from: the SQLite database, or the informer's view of the Kubernetes objects.
    kubernetes = keyseal.config.store_type == "kubernetes"
    api_client = request.getfixturevalue("kube_api").api_client() if kubernetes else None
    served = entry_store_for(keyseal.config, api_client, serving=True)
    try:
        assert {e.entry_id: e.federates_with for e in served.for_agent(AGENT)} == {
            documents[0]["entry_id"]: ("b.example", "partner.example"), documents[1]["entry_id"]: ()}
    finally:
        served.close()


OLD_SCHEMA = """
CREATE TABLE entries (
    entry_id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL, parent_key TEXT NOT NULL,
    selectors TEXT NOT NULL, x509_ttl INTEGER NOT NULL, jwt_ttl INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('imported', '1');
"""


def test_a_database_from_before_federation_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "keyseal-entries.db"
    with sqlite3.connect(path) as database:  # what the SQLite store wrote before entries could federate
        database.executescript(OLD_SCHEMA)
        database.execute("INSERT INTO entries VALUES ('old', ?, ?, ?, '[\"unix:uid:1\"]', 0, 0)",
                         (f"spiffe://{TRUST_DOMAIN}/old", AGENT, AGENT))
    database.close()
    store = DirectoryEntryStore(path, TRUST_DOMAIN)
    assert store.entries() == [Entry("old", f"spiffe://{TRUST_DOMAIN}/old", AGENT, ("unix:uid:1",))]
    new = store.create(f"spiffe://{TRUST_DOMAIN}/new", AGENT, ("unix:uid:2",), federates_with=("b.example",))
    again = DirectoryEntryStore(path, TRUST_DOMAIN)  # another process, after a restart
    assert again.get(new.entry_id) == new and new.federates_with == ("b.example",)
    assert [e.entry_id for e in again.for_agent(AGENT)] == sorted(["old", new.entry_id])


def test_bulk_operations_show_progress_on_a_terminal_only(keyseal: Any, tmp_path: Path) -> None:
    batch = tmp_path / "entries.jsonl"
    batch.write_text("".join(line(n, selectors=[f"unix:uid:{n}", "unix:gid:77"]) + "\n" for n in range(6)))
    config = ["--config", str(keyseal.config_file)]
    code, out, terminal = on_pty(["entry", "create", "--from-file", str(batch), *config], keyseal.env)
    assert code == 0, terminal
    assert "creating entries" in terminal and len(out.split()) == 6  # the IDs on stdout are untouched
    code, out, terminal = on_pty(["entry", "delete", "--selector", "unix:gid:77", *config], keyseal.env)
    assert code == 0 and "deleting entries" in terminal and len(out.split()) == 6

    code, _, terminal = on_pty(["-q", "entry", "create", "--from-file", str(batch), *config], keyseal.env)
    assert code == 0 and "creating entries" not in terminal  # keyseal -q: no bar
    piped = keyseal("delete", "--selector", "unix:gid:77")  # stderr on a pipe: no bar
    assert piped.returncode == 0 and piped.stderr == "" and len(piped.stdout.split()) == 6
    few = tmp_path / "few.jsonl"
    few.write_text(line(100) + "\n" + line(101) + "\n")
    code, _, terminal = on_pty(["entry", "create", "--from-file", str(few), *config], keyseal.env)
    assert code == 0 and "creating entries" not in terminal  # a few entries: no bar
