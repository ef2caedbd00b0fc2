"""Incremental agent sync over mutual TLS against the server the harness starts: an agent that holds the current
revision gets an answer with neither entries nor bundle; a change to its own entries (not another agent's) or to
the bundle sends that part again; a revision the server cannot tell sends everything; the old request (`{}`)
still gets everything; replicas on one store answer the same; the agent's own sync loop uses revisions, and
falls back to the old request against a server that does not know them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.agent.cache import AgentCache
from keyseal._internal.agent.client import ServerClient
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from keyseal._internal.ca.server import CaServer
from tests.harness.agent import agent_call, start_server
from tests.harness.ca import TRUST_DOMAIN, make_csr, new_key

AGENT = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/a/web"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    server = start_server(tmp_path_factory.mktemp("incremental"))
    yield server
    server.shutdown()


def join(server: CaServer, name: str = "node-1") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    token, _ = join_tokens_for(server.config).issue(name, timedelta(minutes=5))
    key = new_key()
    status, answer = agent_call(server, None, "/v1/agent/join", {"token": token, "csr": make_csr(key)})
    assert status == 200, answer
    return key, x509.load_pem_x509_certificate(answer["certChain"][0].encode())


def sync(server: CaServer, identity: Any, document: dict[str, Any] | None = None) -> dict[str, Any]:
    status, answer = agent_call(server, identity, "/v1/agent/sync", document or {})
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


def test_the_old_request_still_gets_everything(server: CaServer) -> None:
    identity = join(server, "node-old")
    answer = sync(server, identity)
    assert answer["agentID"] == f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-old"
    assert answer["entries"] == [] and answer["bundle"]["keys"] and isinstance(answer["revision"], str)


def test_a_current_agent_gets_an_empty_answer_until_its_own_entries_change(server: CaServer) -> None:
    identity = join(server)
    store = entry_store_for(server.config)
    first = sync(server, identity)
    revision = first["revision"]
    assert sync(server, identity, {"revision": revision}) == {"agentID": AGENT, "revision": revision}

    store.create(f"spiffe://{TRUST_DOMAIN}/elsewhere", AGENT + "-2", ("unix:uid:5",))  # another agent's
    assert sync(server, identity, {"revision": revision}) == {"agentID": AGENT, "revision": revision}

    mine = store.create(WEB, AGENT, ("unix:uid:1001",))
    changed = sync(server, identity, {"revision": revision})
    assert [e["entry_id"] for e in changed["entries"]] == [mine.entry_id]
    assert "bundle" not in changed and changed["revision"] != revision
    assert sync(server, identity, {"revision": changed["revision"]}).keys() == {"agentID", "revision"}

    store.delete(mine.entry_id)
    removed = sync(server, identity, {"revision": changed["revision"]})
    assert removed["entries"] == [] and removed["revision"] == revision  # the same entries: the same revision


def test_a_bundle_change_sends_the_bundle_only(server: CaServer) -> None:
    identity = join(server, "node-b")
    revision = sync(server, identity)["revision"]
    entries_part, _, _ = revision.partition(".")
    answer = sync(server, identity, {"revision": f"{entries_part}.an-older-bundle"})
    assert "bundle" in answer and "entries" not in answer and answer["revision"] == revision


def test_a_revision_the_server_cannot_tell_gets_everything(server: CaServer) -> None:
    identity = join(server, "node-c")
    answer = sync(server, identity, {"revision": "from-another-server-entirely"})
    assert {"entries", "bundle", "revision"} <= answer.keys()
    status, refused = agent_call(server, identity, "/v1/agent/sync", {"revision": 7})
    assert status == 400 and "revision" in refused["message"]
    status, refused = agent_call(server, identity, "/v1/agent/sync", {"since": "x"})
    assert status == 400


def test_replicas_on_one_store_answer_the_same(server: CaServer, tmp_path: Path) -> None:
    identity = join(server, "node-r")
    entry_store_for(server.config).create(f"spiffe://{TRUST_DOMAIN}/r", f"spiffe://{TRUST_DOMAIN}/keyseal/agent",
                                          ("unix:uid:77",))
    replica = CaServer(server.config, rotation_thread=False)  # the same store and keys: another replica
    replica.start()
    replica.start_background()
    try:
        assert sync(replica, identity) == sync(server, identity)
    finally:
        replica.shutdown()


class CountingClient(ServerClient):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[dict[str, Any]] = []

    def call(self, path: str, document: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((path, document))
        answer = super().call(path, document)
        self.answers.append(answer)
        return answer


def agent_cache(server: CaServer, name: str) -> tuple[AgentCache, CountingClient]:
    client = CountingClient("127.0.0.1", server.port, "".join(k.ca_pem for k, _ in server.manager.live()))
    cache = AgentCache(client, TRUST_DOMAIN)
    token, _ = join_tokens_for(server.config).issue(name, timedelta(minutes=5))
    cache.join(token)
    return cache, client


def test_the_agent_syncs_by_revision(server: CaServer) -> None:
    cache, client = agent_cache(server, "node-loop")
    entry = entry_store_for(server.config).create(f"spiffe://{TRUST_DOMAIN}/loop",
                                                  f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-loop", ("unix:uid:9",))
    cache.sync()
    held = [e.entry_id for e in cache.entries]  # (and any entry for every agent other tests made)
    assert entry.entry_id in held and entry.entry_id in cache.x509
    first = [a for p, a in zip(client.sent, client.answers, strict=True) if p[0] == "/v1/agent/sync"][-1]
    client.sent.clear()
    client.answers.clear()
    version = cache.version
    cache.sync()
    assert client.sent == [("/v1/agent/sync", {"revision": first["revision"]})]
    assert client.answers[0].keys() == {"agentID", "revision"}
    assert [e.entry_id for e in cache.entries] == held and cache.version == version  # kept as is
    client.close()


def test_the_agent_falls_back_to_the_old_request(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, client = agent_cache(server, "node-fallback")
    routes = server.api._routes
    method, current = routes["/v1/agent/sync"]

    def old_sync(request: Any) -> Any:  # a server from before revisions: the body must be {}
        server.api._body(request, set())
        response = current(request)
        return response

    monkeypatch.setitem(routes, "/v1/agent/sync", (method, old_sync))
    cache.sync()
    cache.sync()  # holds a revision now: refused with 400 once, then asked the old way
    cache.sync()
    syncs = [document for path, document in client.sent if path == "/v1/agent/sync"]
    assert syncs == [{}, {"revision": syncs[1]["revision"]}, {}, {}]
    assert cache.server_reachable and cache.sync_failures == 0
    client.close()


def test_a_remembered_agent_certificate_still_needs_a_live_ca(server: CaServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents are verified once and remembered (a sync every few seconds each): only while the live CAs are
    the ones that verified it, and never past its validity (tests/test_agent_mtls.py: expiry)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.verification import VerificationError

    from keyseal._internal.ca.http.agents import AgentApi

    _, certificate = join(server, "node-cached")
    der = certificate.public_bytes(serialization.Encoding.DER)
    agents = AgentApi(server.api)
    assert agents._verify_agent(der) == f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-cached"
    assert der in agents._verified
    other = start_server(tmp_path)  # another trust domain's server: other CAs
    try:
        monkeypatch.setattr(server.manager, "live", other.manager.live)
        with pytest.raises(VerificationError):
            agents._verify_agent(der)
    finally:
        other.shutdown()
