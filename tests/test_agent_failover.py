"""Agent failover between server replicas and re-joining after its own SVID expired:
- serverURLs: the agent moves on to the next replica when one stops, and workloads keep getting valid SVIDs;
- with stateDir and joinTokenFile, an agent whose SVID expired while no server answered joins again by itself
  once a server answers and the re-join hook (a new token in joinTokenFile) offers a credential, and saves the
  new SVID; without one it says once what would help and does not retry a spent token."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.ca.registry.stores import join_tokens_for
from keyseal.errors import UsageError
from tests.harness.agent import Node, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN, wait_for

ME = f"unix:uid:{os.getuid()}"
HEADER = [("workload.spiffe.io", "true")]
BASE = {"trustDomain": TRUST_DOMAIN, "trustBundleFile": "/b.pem", "joinToken": "t"}


def fetch(node: Node) -> x509.Certificate | str:
    with grpc.insecure_channel(node.endpoint) as channel:
        try:
            stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
            answer = next(stream)
            stream.cancel()
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return x509.load_der_x509_certificate(answer.svids[0].x509_svid)


def test_server_urls_are_parsed_in_order_without_repeats() -> None:
    config = parse_agent_config({**BASE, "serverURL": "https://a:1", "serverURLs": ["https://b:2", "https://a:1",
                                                                                     "https://[::1]:3"]}, {})
    assert config.servers == (("a", 1), ("b", 2), ("::1", 3))
    assert (config.server_host, config.server_port) == ("a", 1)
    only_list = parse_agent_config({**BASE, "serverURLs": ["https://b:2"]}, {})
    assert only_list.servers == (("b", 2),)
    for bad, message in (({}, "serverURL must be"), ({"serverURLs": []}, "serverURLs must be a list"),
                         ({"serverURLs": "https://b:2"}, "serverURLs must be a list"),
                         ({"serverURLs": ["http://b:2"]}, r"serverURLs\[0\] must be"),
                         ({"serverURL": "https://a:99999"}, "serverURL must be")):
        with pytest.raises(UsageError, match=message):
            parse_agent_config({**BASE, **bad}, {})


@pytest.mark.slow
def test_agent_fails_over_to_the_next_replica(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = start_server(tmp_path)
    second = start_server(tmp_path)  # the same store: another replica of the same trust domain
    node = start_agent(first, tmp_path, sync_interval=0.3, more_servers=(second,))
    try:
        node.entry("/ns/a/svc", ME, x509_ttl=2)
        node.agent.cache.sync()
        before = fetch(node)
        assert isinstance(before, x509.Certificate)
        with caplog.at_level(logging.WARNING, logger="keyseal._internal.agent"):
            first.shutdown()
            node.agent.client.close()
            serials = set()
            end = time.monotonic() + 6  # three SVID lifetimes: renewed by the second replica alone
            while time.monotonic() < end:
                answer = fetch(node)
                assert isinstance(answer, x509.Certificate), answer
                assert datetime.now(UTC) < answer.not_valid_after_utc
                serials.add(answer.serial_number)
                time.sleep(0.1)
        assert len(serials) >= 3
        assert f"failed over to the keyseal server at 127.0.0.1:{second.port}" in caplog.text
    finally:
        node.stop()
        first.shutdown()
        second.shutdown()


def agent_svid_expired(node: Node) -> None:
    expires = node.agent.cache.agent_expires
    assert expires is not None
    wait_for(lambda: datetime.now(UTC) > expires + timedelta(seconds=0.5), timeout=20)


def restart_on(port: int, tmp: Path, **overrides: Any) -> Any:
    return start_server(tmp, server={"listen": f"127.0.0.1:{port}"}, **overrides)


@pytest.mark.slow
def test_agent_rejoins_after_its_svid_expired_while_no_server_answered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    short = {"x509SVID": {"ttl": "3s"}}
    server = start_server(tmp_path, **short)
    token_file = tmp_path / "join-token"
    node = start_agent(server, tmp_path, sync_interval=0.3, state_dir=tmp_path / "state", token_file=token_file)
    restarted = None
    try:
        node.entry("/ns/a/svc", ME, x509_ttl=2)
        node.agent.cache.sync()
        first_svid = node.agent.cache.state.load() if node.agent.cache.state else None
        assert first_svid is not None
        port = server.port
        with caplog.at_level(logging.INFO, logger="keyseal._internal.agent"):
            server.shutdown()
            node.agent.client.close()
            agent_svid_expired(node)
            wait_for(lambda: fetch(node) == "UNAVAILABLE", timeout=10)
            # The server comes back; the spent token is still in the file: the agent says what would help, once.
            restarted = restart_on(port, tmp_path, **short)
            wait_for(lambda: "no unused join credential" in caplog.text, timeout=20)
            assert fetch(node) == "UNAVAILABLE"
            # The re-join hook offers a credential (here: a new token where joinTokenFile points): back to work.
            token, _ = join_tokens_for(restarted.config).issue("node-1", timedelta(minutes=5))
            token_file.write_text(token + "\n")
            wait_for(lambda: isinstance(fetch(node), x509.Certificate), timeout=20)
        assert "joined again with a new token in" in caplog.text
        assert caplog.text.count("no unused join credential") == 1
        saved = node.agent.cache.state.load() if node.agent.cache.state else None
        assert saved is not None and saved.certificate.serial_number != first_svid.certificate.serial_number
    finally:
        node.stop()
        if restarted is not None:
            restarted.shutdown()
