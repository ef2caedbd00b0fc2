"""The agent over time: short-lived SVIDs renewed into an open X509Source, a CA rotation reaching the client's
bundle, deleted entries ending the stream, and a stopped server (cached SVIDs until they expire, then an error).
Each test has its own server and agent; every wait is bounded."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keyseal.ca.entries import entry_store_for
from tests.harness.agent import Node, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN, FakeClock, wait_for

ME = f"unix:uid:{os.getuid()}"
SVC = f"spiffe://{TRUST_DOMAIN}/ns/a/svc"
HEADER = [("workload.spiffe.io", "true")]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, sync_interval=0.2)
    yield node
    node.stop()
    server.shutdown()


def test_short_ttl_svid_is_renewed_into_an_open_source(node: Node) -> None:
    node.entry("/ns/a/svc", ME, x509_ttl=4)
    node.agent.cache.sync()
    source = X509Source(socket_path=node.endpoint, timeout_in_seconds=10)
    try:
        first = source.get_x509_context().default_svid
        lifetime = first.leaf.not_valid_after_utc - first.leaf.not_valid_before_utc
        assert lifetime <= timedelta(seconds=15)  # 4 s plus the 10 s backdate
        wait_for(lambda: source.get_x509_context().default_svid.leaf.serial_number != first.leaf.serial_number,
                 timeout=10)
        second = source.get_x509_context().default_svid
        assert str(second.spiffe_id) == SVC
        assert datetime.now(UTC) < first.leaf.not_valid_after_utc  # renewed before the old one expired
    finally:
        source.close()


def test_deleted_entry_ends_the_stream(node: Node) -> None:
    entry_id = node.entry("/ns/a/svc", ME)
    node.agent.cache.sync()
    with grpc.insecure_channel(node.endpoint) as channel:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20)
        assert next(stream).svids[0].spiffe_id == SVC
        entry_store_for(node.server.config).delete(entry_id)
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ended.value.details() == "no identity issued"


def test_server_stopped_cached_svid_until_expiry_then_error(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.entry("/ns/a/svc", ME, x509_ttl=3)
    node.agent.cache.sync()
    with caplog.at_level(logging.WARNING, logger="keyseal.agent"):
        node.server.shutdown()
        node.agent.client.close()  # a stopped server process would have closed the kept-alive connection too
        with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
            svid = client.fetch_x509_svid()
            assert str(svid.spiffe_id) == SVC
            wait_for(lambda: "unreachable" in caplog.text or "cannot reach" in caplog.text, timeout=10)
            assert datetime.now(UTC) < svid.leaf.not_valid_after_utc
            wait_for(lambda: datetime.now(UTC) > svid.leaf.not_valid_after_utc + timedelta(seconds=0.5), timeout=10)
            with pytest.raises(Exception) as failed:
                client.fetch_x509_svid()
    assert "UNAVAILABLE" in str(failed.value) and "server is unreachable" in str(failed.value)
    assert "serving 1 cached X.509-SVIDs until they expire" in caplog.text


def test_ca_rotation_reaches_the_source_bundle(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    from keyseal.ca.config import parse_config
    from keyseal.ca.server import CaServer
    from tests.harness.ca import base_config

    config = parse_config(base_config(tmp_path, ca={"ttl": "60s"}, x509SVID={"ttl": "10s"}, jwtSVID={"ttl": "10s"},
                                      bundle={"refreshHint": "10s"}))
    server = CaServer(config, clock=clock, rotation_thread=False)
    server.start()
    server.start_background()
    node = start_agent(server, tmp_path, sync_interval=0.2)
    try:
        node.entry("/ns/a/svc", ME)
        node.agent.cache.sync()
        source = X509Source(socket_path=node.endpoint, timeout_in_seconds=10)
        try:
            domain = source.get_x509_context().default_svid.spiffe_id.trust_domain
            before = source.get_bundle_for_trust_domain(domain)
            assert before is not None and len(before.x509_authorities) == 1
            for _ in range(7):  # to half of ca.ttl, where keyset 2 is prepared and published; the agent renews
                clock.advance(timedelta(seconds=4.5))  # its own 10 s SVID on the way, as it would in real time
                server.tick()
                node.agent.cache.sync(renew_agent=True)
            assert len(server.manager.live()) == 2

            def two_authorities() -> bool:
                bundle = source.get_bundle_for_trust_domain(domain)
                return bundle is not None and len(bundle.x509_authorities) == 2

            wait_for(two_authorities, timeout=10)
        finally:
            source.close()
    finally:
        node.stop()
        server.shutdown()


def test_cli_entry_and_join_token(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from tests.harness.ca import base_config

    config_file = tmp_path / "server.yaml"
    config_file.write_text(yaml.safe_dump(base_config(tmp_path)))
    created = cli("entry", "create", "--config", config_file, "--spiffe-id", SVC, "--parent",
                  f"spiffe://{TRUST_DOMAIN}/keyseal/agent", "--selector", "unix:uid:1001", "--x509-ttl", "60s")
    assert created.returncode == 0, created.stderr
    entry_id = created.stdout.strip()
    listed = cli("entry", "list", "--config", config_file)
    assert entry_id in listed.stdout and "unix:uid:1001" in listed.stdout
    bad = cli("entry", "create", "--config", config_file, "--spiffe-id", SVC, "--parent",
              f"spiffe://{TRUST_DOMAIN}/keyseal/agent", "--selector", "k8s:ns:x")
    assert bad.returncode != 0 and bad.stderr.startswith("keyseal: error: invalid selector")
    token = cli("entry", "join-token", "--config", config_file, "--agent", "node-9")
    assert token.returncode == 0 and len(token.stdout.strip()) >= 40
    assert f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-9" in token.stderr
    stored = (tmp_path / "store").glob("*join-tokens.json")
    assert all(token.stdout.strip() not in p.read_text() for p in stored)  # only its SHA-256 is stored
    assert cli("entry", "delete", "--config", config_file, entry_id).returncode == 0
    assert entry_id not in cli("entry", "list", "--config", config_file).stdout
