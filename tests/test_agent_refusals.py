"""An agent keeps its identity through refusals it can survive:
- a stale replica first in serverURLs (one that does not know this trust domain's current CA: here, a server on
  a store of its own) refuses the join token and the agent SVID; the agent moves on to the next replica instead
  of needing a new join token;
- a refused re-join does not drop the agent SVID it still holds, and a successful sync clears the need to join;
- a restarted agent (stateDir) does not offer the server again the join token it has already spent."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from keyseal._internal.agent.client import ServerRefusedError
from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.agent.main import Agent
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from tests.harness.agent import AGENT_ID, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN

ME = f"unix:uid:{os.getuid()}"


def test_a_stale_replica_first_in_server_urls_costs_no_identity(tmp_path: Path) -> None:
    good = start_server(tmp_path / "good")
    stale = start_server(tmp_path / "stale")  # same trust domain, another CA: it knows neither token nor SVID
    token, _ = join_tokens_for(good.config).issue("node-1", timedelta(minutes=5))
    bundle = "".join(k.ca_pem for s in (good, stale) for k, _ in s.manager.live())
    node = start_agent(stale, tmp_path, token=token, bundle_pem=bundle, more_servers=(good,))
    try:
        entry_store_for(good.config).create(f"spiffe://{TRUST_DOMAIN}/ns/a/svc", AGENT_ID, (ME,), 0, 0)
        cache = node.agent.cache
        for _ in range(3):
            node.agent.client.close()
            node.agent.client.host, node.agent.client.port = "127.0.0.1", stale.port  # back to the stale one
            cache.sync()
            assert not cache.needs_join
            assert cache.server_reachable
        assert [e.spiffe_id for e in cache.entries] == [f"spiffe://{TRUST_DOMAIN}/ns/a/svc"]
    finally:
        node.stop()
        good.shutdown()
        stale.shutdown()


def test_a_refused_rejoin_keeps_the_agent_svid_and_a_good_sync_clears_the_need(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, state_dir=tmp_path / "state", token_file=tmp_path / "join-token")
    try:
        cache, client = node.agent.cache, node.agent.client
        held = client.certificate
        assert held is not None
        spent = (tmp_path / "join-token").read_text().strip()
        with pytest.raises(ServerRefusedError):
            cache.join(spent)
        assert client.certificate == held  # still the agent's identity
        cache.needs_join = True  # as after a refusal the agent survived
        cache.sync()
        assert cache.server_reachable and not cache.needs_join
    finally:
        node.stop()
        server.shutdown()


def test_a_restarted_agent_does_not_offer_its_spent_token_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(tmp_path)
    token_file = tmp_path / "join-token"
    node = start_agent(server, tmp_path, state_dir=tmp_path / "state", token_file=token_file)
    config = node.agent.config
    node.stop()
    again = Agent(parse_agent_config({
        "trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
        "trustBundleFile": str(config.trust_bundle_file), "joinTokenFile": str(token_file),
        "socketPath": str(config.socket_path), "stateDir": str(tmp_path / "state")}, environ={}))
    try:
        again._identity()  # resumes the saved SVID: no token spent
        held = again.client.certificate
        assert isinstance(held, x509.Certificate)
        with caplog.at_level(logging.INFO, logger="keyseal._internal.agent"):
            again._rejoin()  # the token in joinTokenFile is the one spent at the first start
        assert "was refused" not in caplog.text
        assert "no unused join credential" in caplog.text
        assert again.client.certificate == held
    finally:
        again.stop()
        server.shutdown()
