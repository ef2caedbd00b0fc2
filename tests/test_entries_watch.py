"""The server's view of the Kubernetes store's entries as an informer (list once, then watch from the list's
resourceVersion), against the harness's API peer: another writer's change reaches a replica within a second, a
watch that ends with 410 Gone ("too old") lists again, a dropped watch resumes from its version without listing,
and a replica started (or restarted) mid-stream converges. Every replica answers one agent with the same
entries."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyseal._internal.ca.config import Config, parse_config
from keyseal._internal.ca.registry.entries import Entry
from keyseal._internal.ca.registry.index import entries_digest
from keyseal._internal.ca.registry.kubernetes import KubeEntryStore
from keyseal._internal.ca.registry.stores import entry_store_for
from tests.harness.ca import TRUST_DOMAIN, base_config
from tests.harness.kube_api import KubeApi

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

AGENT = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"
CONVERGE_SECONDS = 1.0


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)


@pytest.fixture
def config(kube_api: KubeApi, namespace: str, tmp_path: Path) -> Config:
    store = {"type": "kubernetes", "kubernetes": {"namespace": namespace, "apiServer": kube_api.url}}
    return parse_config(base_config(tmp_path, store=store))


@pytest.fixture
def replicas(kube_api: KubeApi, config: Config) -> Iterator[Callable[[], KubeEntryStore]]:
    """Server replicas' entry views (watching); every one started is stopped at the end."""
    started: list[KubeEntryStore] = []

    def start() -> KubeEntryStore:
        store = entry_store_for(config, kube_api.api_client(), serving=True)
        assert isinstance(store, KubeEntryStore) and store.watch
        started.append(store)
        store.entries()  # lists, then watches
        return store

    yield start
    for store in started:
        store.close()


def writer(kube_api: KubeApi, config: Config) -> KubeEntryStore:
    """Another writer: the `keyseal entry` CLI's view, which reads the API directly."""
    store = entry_store_for(config, kube_api.api_client())
    assert isinstance(store, KubeEntryStore) and not store.watch
    return store


def converges(condition: Callable[[], bool], seconds: float = CONVERGE_SECONDS) -> float:
    """How long the condition took to hold (fails past `seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "the replica's view did not converge in time"
        time.sleep(0.005)
    return time.monotonic() - start


def other_namespace(config: Config, kube_api: KubeApi) -> Config:
    """The same trust domain's store in another namespace: writes there move the API server's version on."""
    return parse_config(base_config(config.store_path.parent / "other", store={
        "type": "kubernetes", "kubernetes": {"namespace": config.kube_namespace + "-x", "apiServer": kube_api.url}}))


def workload(n: int) -> tuple[str, str, tuple[str, ...]]:
    return f"spiffe://{TRUST_DOMAIN}/w{n}", AGENT, (f"unix:uid:{n}",)


def test_a_change_by_another_writer_reaches_every_replica_within_a_second(
        kube_api: KubeApi, config: Config, replicas: Callable[[], KubeEntryStore]) -> None:
    first, second = replicas(), replicas()
    cli = writer(kube_api, config)
    created = cli.create(*workload(1))
    converges(lambda: first.get(created.entry_id) == created and second.get(created.entry_id) == created)
    cli.delete(created.entry_id)
    converges(lambda: first.get(created.entry_id) is None and second.get(created.entry_id) is None)
    assert first.informer is not None and first.informer.lists == 1  # watched, never listed again


def test_replicas_answer_an_agent_with_the_same_entries(
        kube_api: KubeApi, config: Config, replicas: Callable[[], KubeEntryStore]) -> None:
    stores = [replicas() for _ in range(3)]
    cli = writer(kube_api, config)
    cli.create_many([Entry("", *workload(n)) for n in range(20)])
    cli.create(f"spiffe://{TRUST_DOMAIN}/all", f"spiffe://{TRUST_DOMAIN}/keyseal/agent", ("unix:uid:7",))
    cli.create(f"spiffe://{TRUST_DOMAIN}/other", AGENT + "-2", ("unix:uid:7",))
    converges(lambda: all(len(s.entries()) == 22 for s in stores))
    answers = {entries_digest(s.for_agent(AGENT)) for s in stores}
    assert len(answers) == 1
    assert len(stores[0].for_agent(AGENT)) == 21  # its own 20 and the one for every agent, not node-1-2's


def test_a_watch_that_ends_too_old_lists_again(kube_api: KubeApi, config: Config,
                                               replicas: Callable[[], KubeEntryStore]) -> None:
    replica = replicas()
    informer = replica.informer
    assert informer is not None
    cli = writer(kube_api, config)
    before = cli.create(*workload(1))
    converges(lambda: replica.get(before.entry_id) is not None)
    handler = kube_api._handler()
    bookmarks, handler.bookmark_seconds = handler.bookmark_seconds, 60.0
    try:  # the API server moves on (a write this replica does not watch, and no bookmark tells it) ...
        entry_store_for(other_namespace(config, kube_api), kube_api.api_client()).create(*workload(1))
        kube_api.compact()  # ... then forgets its history and ends the open watch: resuming is "too old"
    finally:
        handler.bookmark_seconds = bookmarks
    after = cli.create(*workload(2))
    cli.delete(before.entry_id)
    converges(lambda: informer.lists == 2, 5)
    converges(lambda: replica.get(after.entry_id) == after and replica.get(before.entry_id) is None)


def test_a_dropped_watch_resumes_from_its_version_and_misses_nothing(
        kube_api: KubeApi, config: Config, replicas: Callable[[], KubeEntryStore]) -> None:
    replica = replicas()
    informer = replica.informer
    assert informer is not None
    cli = writer(kube_api, config)
    kube_api.end_watches()
    made = [cli.create(*workload(n)) for n in range(5)]  # while the watch is being resumed
    converges(lambda: all(replica.get(e.entry_id) == e for e in made), 5)
    assert informer.lists == 1  # resumed from its resourceVersion, not listed again


def test_a_replica_restarted_mid_stream_converges(kube_api: KubeApi, config: Config,
                                                  replicas: Callable[[], KubeEntryStore]) -> None:
    cli = writer(kube_api, config)
    replica = replicas()
    kept = [cli.create(*workload(n)) for n in range(3)]
    converges(lambda: len(replica.entries()) == 3)
    replica.close()  # stopped mid-stream: what happens now, it does not see
    cli.delete(kept[0].entry_id)
    added = cli.create(*workload(9))
    assert replica.informer is None
    restarted = replicas()
    assert {e.entry_id for e in restarted.entries()} == {kept[1].entry_id, kept[2].entry_id, added.entry_id}
    later = cli.create(*workload(10))
    converges(lambda: restarted.get(later.entry_id) == later)


def test_bookmarks_advance_the_version_of_an_idle_watch(kube_api: KubeApi, config: Config,
                                                        replicas: Callable[[], KubeEntryStore]) -> None:
    replica = replicas()
    informer = replica.informer
    assert informer is not None
    listed = informer.version
    # Writes in another namespace move the API server's version on; this replica's watch sees none of them,
    # only the bookmarks that say how far it has got.
    entry_store_for(other_namespace(config, kube_api), kube_api.api_client()).create(*workload(1))
    converges(lambda: informer.version != listed, 3)
    assert replica.entries() == []
