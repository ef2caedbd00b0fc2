"""The node agent end to end: a server on 127.0.0.1, an agent joined with a one-time token, and the PyPI
`spiffe` package's unmodified clients on the agent's Workload API socket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keyseal._internal.ca.server import CaServer
from tests.harness.agent import Node, fetch_as, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN, Client, bundle_authorities

WEB = f"spiffe://{TRUST_DOMAIN}/ns/a/web"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("agent")
    server = start_server(tmp)
    node = start_agent(server, tmp)
    node.entry("/ns/a/web", f"unix:uid:{os.getuid()}")
    node.entry("/ns/a/user1001", "unix:uid:1001")
    node.entry("/ns/b/user1002", "unix:uid:1002", "unix:gid:1002")
    node.agent.cache.sync()
    yield node
    node.stop()
    server.shutdown()


def _server_bundle(server: CaServer) -> list[x509.Certificate]:
    client = Client(server.port, server.manager.active().ca_pem)
    try:
        return bundle_authorities(client.bundle())
    finally:
        client.close()


@pytest.mark.slow
def test_workload_api_client_gets_svid_that_chains_to_server_bundle(node: Node) -> None:
    with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        jwt_bundles = client.fetch_jwt_bundles()
        token = client.fetch_jwt_svid({"db"})
        validated = client.validate_jwt_svid(token.token, "db")
    assert str(svid.spiffe_id) == WEB
    authorities = _server_bundle(node.server)
    verifier = PolicyBuilder().store(Store(authorities)).time(datetime.now(UTC)).build_client_verifier()
    verified = verifier.verify(svid.leaf, svid.cert_chain[1:])
    assert [u.value for u in verified.subjects if isinstance(u, x509.UniformResourceIdentifier)] == [WEB]
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    assert {c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities} == \
        {c.public_bytes(serialization.Encoding.DER) for c in authorities}
    assert str(token.spiffe_id) == WEB and token.audience == {"db"}
    assert str(validated.spiffe_id) == WEB
    assert jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None


def test_x509_source_and_jwt_source(node: Node) -> None:
    source = X509Source(socket_path=node.endpoint, timeout_in_seconds=10)
    try:
        assert str(source.get_x509_context().default_svid.spiffe_id) == WEB
    finally:
        source.close()
    jwt_source = JwtSource(socket_path=node.endpoint, timeout_in_seconds=10)
    try:
        svid = jwt_source.fetch_svid({"api"})
        assert str(svid.spiffe_id) == WEB
    finally:
        jwt_source.close()


@pytest.mark.slow
def test_users_get_their_own_identity_and_a_stranger_none(node: Node) -> None:
    assert fetch_as(1001, node.endpoint) == f"ID spiffe://{TRUST_DOMAIN}/ns/a/user1001"
    assert fetch_as(1002, node.endpoint) == f"ID spiffe://{TRUST_DOMAIN}/ns/b/user1002"
    stranger = fetch_as(1003, node.endpoint)
    assert stranger.startswith("ERROR") and "no identity issued" in stranger and "PERMISSION_DENIED" in stranger


def test_call_without_security_header_is_refused(node: Node) -> None:
    with grpc.insecure_channel(node.endpoint) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as refused_jwt:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), timeout=10)
        assert refused_jwt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answer = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10,
                                         metadata=[("workload.spiffe.io", "true")]))
        assert answer.svids[0].spiffe_id == WEB


def test_socket_mode(node: Node) -> None:
    assert node.socket.stat().st_mode & 0o777 == 0o666


def test_join_token_is_one_time(node: Node, tmp_path: Path) -> None:
    from keyseal._internal.agent.client import ServerRefusedError

    token_file = tmp_path / "token"
    from keyseal._internal.ca.registry.stores import join_tokens_for

    token, _ = join_tokens_for(node.server.config).issue("node-2", __import__("datetime").timedelta(minutes=1))
    token_file.write_text(token)
    second = start_agent(node.server, tmp_path, token=token)
    second.stop()
    with pytest.raises(ServerRefusedError) as refused:
        start_agent(node.server, tmp_path, token=token)
    assert refused.value.status == 401
