"""The agent over time: short-lived SVIDs renewed into an open X509Source, a CA rotation reaching the client's
bundle, deleted entries ending the stream, and a stopped server (cached SVIDs until they expire, then an error).
Each test has its own server and agent; every wait is bounded."""

from __future__ import annotations

import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families
from spiffe import WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.ca.issuance.x509svid import issue_x509_svid
from keyseal._internal.ca.registry.stores import entry_store_for
from keyseal._internal.spiffe.ids import SpiffeId
from keyseal.errors import UsageError
from tests.harness.agent import Node, agent_call, fetch_as, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN, wait_for

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_server_stopped_cached_svid_until_expiry_then_error(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.entry("/ns/a/svc", ME, x509_ttl=3)
    node.agent.cache.sync()
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.agent"):
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


@pytest.mark.slow
def test_ca_rotation_reaches_the_source_bundle_and_keeps_the_agent_working(tmp_path: Path) -> None:
    """A whole CA rotation in 12 s: keyset 2 is published at 6 s (the server trusts it for client certificates at
    once; the agent and an open X509Source get it), becomes active at 10 s (the agent renews its own SVID under
    it and keeps syncing over mTLS with it), and keyset 1 expires at 12 s (it leaves the bundle and the server's
    trust; the agent, now under keyset 2, goes on).

    The clock is not moved forward here: OpenSSL checks certificate times against real time at every handshake,
    and the agent renews its 2 s SVID by its own clock, so a server clock jumping ahead would only show that
    an agent whose SVID expired on the server is refused (tests/test_agent_mtls.py checks that)."""
    server = start_server(tmp_path, ca={"ttl": "12s"}, x509SVID={"ttl": "2s"}, jwtSVID={"ttl": "2s"},
                          bundle={"refreshHint": "2s"})
    stop = threading.Event()

    def rotation() -> None:  # the server's rotation loop, at test speed
        while not stop.wait(0.1):
            server.tick()

    ticker = threading.Thread(target=rotation, daemon=True)
    ticker.start()
    node = start_agent(server, tmp_path, sync_interval=0.1)
    cache = node.agent.cache
    try:
        node.entry("/ns/a/svc", ME)
        cache.sync()
        first = server.manager.active()
        source = X509Source(socket_path=node.endpoint, timeout_in_seconds=10)
        try:
            domain = source.get_x509_context().default_svid.spiffe_id.trust_domain

            def authorities() -> list[x509.Name]:
                bundle = source.get_bundle_for_trust_domain(domain)
                return [c.subject for c in bundle.x509_authorities] if bundle is not None else []

            assert authorities() == [first.ca_certificate.subject]
            wait_for(lambda: len(server.manager.live()) == 2, timeout=15)  # half of ca.ttl: keyset 2 prepared
            second = server.manager.live()[1][0]
            assert second.number == first.number + 1
            # published, not active yet: the server already trusts it for agents' client certificates
            key = ec.generate_private_key(ec.SECP256R1())
            early = issue_x509_svid(second, SpiffeId(TRUST_DOMAIN, "/keyseal/agent/node-1"), key.public_key(),
                                    datetime.now(UTC), timedelta(seconds=2))

            def accepted() -> bool:  # the server's tick publishes first, then rebuilds its TLS context
                try:
                    return agent_call(server, (key, early), "/v1/agent/sync")[0] == 200
                except (ssl.SSLError, ConnectionError):
                    return False

            wait_for(accepted, timeout=2)  # keyset 2 becomes active only 4 s after it is published
            wait_for(lambda: second.ca_certificate.subject in authorities(), timeout=10)
            wait_for(lambda: server.manager.active().number == second.number, timeout=15)  # at 5/6: active

            def agent_under_second() -> bool:
                certificate = node.agent.client.certificate
                return certificate is not None and certificate.issuer == second.ca_certificate.subject

            wait_for(agent_under_second, timeout=10)  # the agent renewed its own SVID (over mTLS) in time
            renewed_at = datetime.now(UTC)
            wait_for(lambda: cache.last_sync is not None and cache.last_sync > renewed_at and cache.server_reachable,
                     timeout=10)  # ... and the server accepts it: syncs go on over mTLS with the new SVID

            def workload_under_second() -> bool:
                return source.get_x509_context().default_svid.leaf.issuer == second.ca_certificate.subject

            wait_for(workload_under_second, timeout=10)
            wait_for(lambda: first.number not in [k.number for k, _ in server.manager.live()], timeout=10)
            wait_for(lambda: first.ca_certificate.subject not in authorities(), timeout=10)
            expired_at = datetime.now(UTC)
            wait_for(lambda: cache.last_sync is not None and cache.last_sync > expired_at and cache.server_reachable,
                     timeout=10)
            assert cache.sync_failures == 0
        finally:
            source.close()
    finally:
        stop.set()
        ticker.join(timeout=10)
        node.stop()
        server.shutdown()


@pytest.mark.slow
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
              f"spiffe://{TRUST_DOMAIN}/keyseal/agent", "--selector", "k8s:namespace:x")
    assert bad.returncode != 0 and bad.stderr.startswith("keyseal: error: invalid selector")
    agent_id = cli("entry", "create", "--config", config_file, "--spiffe-id",
                   f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-2", "--parent",
                   f"spiffe://{TRUST_DOMAIN}/keyseal/agent", "--selector", "unix:uid:1001")
    assert agent_id.returncode != 0 and "reserved for the keyseal server" in agent_id.stderr  # a workload
    assert len(agent_id.stderr.strip().splitlines()) == 1  # must never be handed an agent's identity
    token = cli("entry", "join-token", "--config", config_file, "--agent", "node-9")
    assert token.returncode == 0 and len(token.stdout.strip()) >= 40
    assert f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-9" in token.stderr
    stored = (tmp_path / "store").glob("*join-tokens.json")
    assert all(token.stdout.strip() not in p.read_text() for p in stored)  # only its SHA-256 is stored
    assert cli("entry", "delete", "--config", config_file, entry_id).returncode == 0
    assert entry_id not in cli("entry", "list", "--config", config_file).stdout


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_metrics_show_the_server_unreachable_while_cached_svids_are_served(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, sync_interval=0.2, metrics=True)
    try:
        node.entry("/ns/a/svc", ME)
        node.agent.cache.sync()
        assert node.agent.metrics_server is not None
        port = node.agent.metrics_server.port
        with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == SVC
        assert "no identity issued" in fetch_as(1003, node.endpoint)
        with grpc.insecure_channel(node.endpoint) as channel, pytest.raises(grpc.RpcError):
            next(workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                                                               timeout=10))
        up = _scrape(port)
        assert up[("keyseal_agent_server_reachable", ())] == 1
        assert up[("keyseal_agent_x509_svids_cached", ())] == 1
        assert up[("keyseal_agent_entries", ())] == 1
        assert up[("keyseal_agent_last_sync_timestamp_seconds", ())] > datetime.now(UTC).timestamp() - 60
        assert up[("keyseal_agent_svid_expiry_timestamp_seconds", ())] > datetime.now(UTC).timestamp()
        requests = "keyseal_agent_workload_api_requests_total"
        assert up[(requests, (("method", "FetchX509SVID"), ("outcome", "ok")))] >= 1
        assert up[(requests, (("method", "FetchX509SVID"), ("outcome", "permission_denied")))] >= 1
        assert up[(requests, (("method", "FetchX509SVID"), ("outcome", "invalid_argument")))] == 1
        assert up[("keyseal_agent_attestation_failures_total", (("reason", "no_matching_entry"),))] >= 1
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert not_found.value.code == 404

        server.shutdown()
        node.agent.client.close()  # a stopped server process would have closed the kept-alive connection too
        wait_for(lambda: _scrape(port)[("keyseal_agent_server_reachable", ())] == 0, timeout=10)
        with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == SVC  # the cached, still valid SVID
        down = _scrape(port)
        assert down[("keyseal_agent_x509_svids_cached", ())] == 1
        assert down[("keyseal_agent_sync_failures_total", ())] >= 1
        assert down[("keyseal_agent_last_sync_timestamp_seconds", ())] <= \
            up[("keyseal_agent_last_sync_timestamp_seconds", ())] + 1
        assert down[(requests, (("method", "FetchX509SVID"), ("outcome", "ok")))] > \
            up[(requests, (("method", "FetchX509SVID"), ("outcome", "ok")))]
    finally:
        node.stop()
        server.shutdown()


def test_metrics_listen_is_checked() -> None:
    base = {"trustDomain": TRUST_DOMAIN, "serverURL": "https://127.0.0.1:8443", "trustBundleFile": "/b.pem",
            "joinToken": "t"}
    assert parse_agent_config(base, environ={}).metrics_listen is None
    assert parse_agent_config({**base, "metrics": {"listen": "[::1]:9988"}}, environ={}).metrics_listen == \
        ("::1", 9988)
    for bad in ({"listen": "9988"}, {"listen": "127.0.0.1:99999"}, {"port": 1}, "127.0.0.1:9988"):
        with pytest.raises(UsageError) as refused:
            parse_agent_config({**base, "metrics": bad}, environ={})
        assert "metrics" in refused.value.message


def test_a_stored_entry_with_a_reserved_id_is_never_served(tmp_path: Path) -> None:
    """An entry giving a workload an agent's ID (written before that was refused, or by hand into the store)
    is neither listed for the agent nor issued: it would let one node act as another over mTLS."""
    import sqlite3

    from keyseal._internal.ca.config import parse_config
    from keyseal._internal.ca.registry.stores import entry_store_for
    from tests.harness.ca import base_config

    config = parse_config(base_config(tmp_path))
    store = entry_store_for(config)
    parent = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"
    kept = store.create(SVC, parent, ("unix:uid:1001",))
    (path,) = (tmp_path / "store").glob("*-entries.db")
    with sqlite3.connect(path) as database:  # written into the store by hand, past `keyseal entry create`
        database.execute("INSERT INTO entries (entry_id, spiffe_id, parent_id, parent_key, selectors, x509_ttl, "
                         "jwt_ttl) SELECT 'forged', ?, parent_id, parent_key, selectors, x509_ttl, jwt_ttl "
                         "FROM entries", (f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-2",))
    database.close()
    assert [e.entry_id for e in store.entries()] == [kept.entry_id, "forged"]  # it is in the store ...
    assert [e.entry_id for e in store.for_agent(parent)] == [kept.entry_id]  # ... but never handed out
    assert store.get("forged") is None and store.get(kept.entry_id) == kept
