"""Node attestation with projected service account tokens (#17): the server checks an agent's token with the
API server's TokenReview (emulated in tests/harness/kube_identity.py, real RS256 signatures) and the pod and node
it is bound to, and issues spiffe://<td>/keyseal/agent/k8s_psat/<cluster>/<node-uid>."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.server import CaServer
from keyseal.errors import UsageError
from tests.harness.agent import agent_call
from tests.harness.ca import TRUST_DOMAIN, base_config, make_csr, new_key
from tests.harness.kube_identity import ISSUER, Cluster

AUDIENCE = "keyseal-server"
AGENT_NS, AGENT_SA = "keyseal", "keyseal-agent"
PATH = "/v1/agent/attest/k8s_psat"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    api = Cluster().start()
    yield api
    api.stop()


def k8s_section(**overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"cluster": "test", "nodeAttestation": {
        "enabled": True, "audience": AUDIENCE, "serviceAccounts": [f"{AGENT_NS}/{AGENT_SA}"]}}
    section.update(overrides)
    return section


@pytest.fixture
def server(cluster: Cluster, tmp_path: Path) -> Iterator[CaServer]:
    config = parse_config(base_config(tmp_path, kubernetes=k8s_section()))
    server = CaServer(config, rotation_thread=False, kube_api_client=cluster.api_client())
    server.start()
    server.start_background()
    yield server
    server.shutdown()


@pytest.fixture
def node(cluster: Cluster) -> dict[str, Any]:
    return cluster.node(f"node-{uuid.uuid4().hex[:6]}", labels={"topology.kubernetes.io/zone": "z1"})


def agent_pod(cluster: Cluster, node: dict[str, Any], account: str = AGENT_SA) -> dict[str, Any]:
    return cluster.pod(AGENT_NS, f"keyseal-agent-{uuid.uuid4().hex[:5]}", node["metadata"]["name"], account)


def join(server: CaServer, token: str, csr: str | None = None) -> tuple[int, Any]:
    return agent_call(server, None, PATH, {"token": token, "csr": csr or make_csr()})


@pytest.mark.slow
def test_an_agent_joins_with_its_projected_token(server: CaServer, cluster: Cluster, node: dict[str, Any]) -> None:
    pod = agent_pod(cluster, node)
    key = new_key()
    status, body = join(server, cluster.token(pod, AUDIENCE, node=node), make_csr(key))
    assert status == 200, body
    agent_id = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/k8s_psat/test/{node['metadata']['uid']}"
    assert body["spiffeID"] == agent_id
    certificate = x509.load_pem_x509_certificate(body["certChain"][0].encode())
    uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [agent_id]
    assert set(body["selectors"]) >= {
        "k8s_psat:cluster:test", f"k8s_psat:agent_ns:{AGENT_NS}", f"k8s_psat:agent_sa:{AGENT_SA}",
        f"k8s_psat:agent_node_name:{node['metadata']['name']}", f"k8s_psat:agent_node_uid:{node['metadata']['uid']}",
        "k8s_psat:agent_node_label:topology.kubernetes.io/zone:z1"}
    # The SVID is an agent's: it authenticates the agent's other calls (mutual TLS).
    status, synced = agent_call(server, (key, certificate), "/v1/agent/sync", {})
    assert status == 200 and synced["agentID"] == agent_id
    # Each review asked the API server for the server's audience.
    assert cluster.cluster.reviews[-1]["spec"]["audiences"] == [AUDIENCE]


def test_an_older_api_server_without_node_claims_still_joins(server: CaServer, cluster: Cluster,
                                                             node: dict[str, Any]) -> None:
    """Before 1.30 tokens name the pod only; the node comes from the pod."""
    status, body = join(server, cluster.token(agent_pod(cluster, node), AUDIENCE))
    assert status == 200, body
    assert body["spiffeID"].endswith(f"/k8s_psat/test/{node['metadata']['uid']}")


@pytest.fixture
def refused(server: CaServer, caplog: pytest.LogCaptureFixture) -> Any:
    """A join with the token is refused (401), for the reason the server logs (a fragment of it)."""

    def check(token: str, reason: str) -> None:
        caplog.clear()
        status, body = join(server, token)
        assert status == 401, body
        assert body["error"] == "unauthenticated"
        logged = [r.getMessage() for r in caplog.records if "refused a k8s_psat join" in r.getMessage()]
        assert len(logged) == 1 and reason in logged[0], logged

    return check


@pytest.mark.slow
def test_a_token_for_another_audience_is_refused(server: CaServer, refused: Any, cluster: Cluster,
                                                node: dict[str, Any]) -> None:
    pod = agent_pod(cluster, node)
    before = len(cluster.cluster.reviews)
    refused(cluster.token(pod, "vault", node=node), "is not for audience 'keyseal-server' (its own claims)")
    refused(cluster.token(pod, "https://kubernetes.default.svc.cluster.local", node=node), "(its own claims)")
    assert len(cluster.cluster.reviews) == before  # refused without asking the API server
    # A token whose claims were changed to name the audience: the API server (its signature) refuses it.
    genuine = jwt.decode(cluster.token(pod, "vault", node=node), options={"verify_signature": False})
    header, _, signature = cluster.token(pod, "vault", node=node).split(".")
    claims = base64.urlsafe_b64encode(json.dumps({**genuine, "aud": [AUDIENCE]}).encode()).rstrip(b"=").decode()
    refused(f"{header}.{claims}.{signature}", "did not authenticate the token")
    assert join(server, cluster.token(pod, ["vault", AUDIENCE], node=node))[0] == 200


def test_an_api_server_that_ignores_the_audience_does_not_let_its_own_tokens_join(
        refused: Any, cluster: Cluster, node: dict[str, Any]) -> None:
    """Its review authenticates a token for the API server itself and names no audience: not the server's."""
    pod = agent_pod(cluster, node)
    cluster.cluster.ignore_audiences = True
    try:
        token = cluster.token(pod, ["https://kubernetes.default.svc.cluster.local", AUDIENCE], node=node)
        before = len(cluster.cluster.reviews)
        refused(token, "is not for audience 'keyseal-server'")
        assert len(cluster.cluster.reviews) == before + 1  # refused on the review's answer, not the claims'
        assert cluster.cluster.reviews[-1]["status"] == {**cluster.cluster.reviews[-1]["status"], "audiences": []}
    finally:
        cluster.cluster.ignore_audiences = False


def test_an_expired_token_is_refused(refused: Any, cluster: Cluster, node: dict[str, Any]) -> None:
    import time

    pod = agent_pod(cluster, node)
    refused(cluster.token(pod, AUDIENCE, node=node, issued=time.time() - 3600, lifetime=600),
            "has expired (its own claims)")


@pytest.mark.slow
def test_a_token_not_signed_by_the_cluster_is_refused(refused: Any, cluster: Cluster,
                                                     node: dict[str, Any]) -> None:
    pod = agent_pod(cluster, node)
    genuine = jwt.decode(cluster.token(pod, AUDIENCE, node=node), options={"verify_signature": False})
    forged = jwt.encode(genuine, rsa.generate_private_key(65537, 2048), algorithm="RS256")
    refused(forged, "did not authenticate the token: invalid bearer token")
    refused("not-a-jwt", "not a JWT")
    assert genuine["iss"] == ISSUER


@pytest.mark.slow
def test_a_replayed_token_after_its_pod_is_gone_is_refused(server: CaServer, refused: Any, cluster: Cluster,
                                                          node: dict[str, Any]) -> None:
    pod = agent_pod(cluster, node)
    token = cluster.token(pod, AUDIENCE, node=node)
    assert join(server, token)[0] == 200
    assert join(server, token)[0] == 200  # while its pod runs, as SPIRE's k8s_psat (the agent restarted)
    cluster.delete_pod(AGENT_NS, pod["metadata"]["name"])
    refused(token, "token has been invalidated")


@pytest.mark.slow
@pytest.mark.parametrize("recreate", [False, True])
def test_keyseal_checks_the_bound_pod_itself(refused: Any, cluster: Cluster, node: dict[str, Any],
                                             recreate: bool) -> None:
    """An API server that does not invalidate tokens of deleted pods (switched off in the emulator) does not
    let a replayed token through: keyseal reads the pod and compares its uid."""
    pod = agent_pod(cluster, node)
    token = cluster.token(pod, AUDIENCE, node=node)
    cluster.delete_pod(AGENT_NS, pod["metadata"]["name"])
    if recreate:  # a new pod of the same name (a StatefulSet, or a DaemonSet pod name reused): another uid
        cluster.pod(AGENT_NS, pod["metadata"]["name"], node["metadata"]["name"], AGENT_SA)
    cluster.cluster.check_bound_pods = False
    try:
        assert cluster.review(token, AUDIENCE)["status"]["authenticated"] is True
        refused(token, "of the token is gone")
    finally:
        cluster.cluster.check_bound_pods = True


def test_a_token_whose_pod_is_not_on_the_node_it_names_is_refused(refused: Any, cluster: Cluster,
                                                                 node: dict[str, Any]) -> None:
    other = cluster.node(f"node-{uuid.uuid4().hex[:6]}")
    pod = agent_pod(cluster, other)  # runs on `other`, but the token names `node`
    refused(cluster.token(pod, AUDIENCE, node=node), "but its pod runs on")


def test_a_token_naming_a_rebuilt_node_is_refused(refused: Any, cluster: Cluster) -> None:
    """The node was deleted and made again under its name: the token's node uid is no longer that node's."""
    node = cluster.node(f"node-{uuid.uuid4().hex[:6]}")
    pod = agent_pod(cluster, node)
    stale = {"metadata": {"name": node["metadata"]["name"], "uid": str(uuid.uuid4())}}
    refused(cluster.token(pod, AUDIENCE, node=stale), "but that node now has uid")


def test_a_pod_on_a_node_that_does_not_exist_is_refused(refused: Any, cluster: Cluster) -> None:
    pod = cluster.pod(AGENT_NS, f"a-{uuid.uuid4().hex[:5]}", "no-such-node", AGENT_SA)
    refused(cluster.token(pod, AUDIENCE), "node no-such-node of pod")


def test_another_service_account_is_refused(refused: Any, cluster: Cluster, node: dict[str, Any]) -> None:
    """Any pod may ask the kubelet for a token with the server's audience: only the agents' account joins."""
    pod = agent_pod(cluster, node, account="default")
    refused(cluster.token(pod, AUDIENCE, node=node), "is not an agent's")
    # A token claiming the agent account for a pod that runs as another one (the pod's spec decides).
    refused(cluster.token(pod, AUDIENCE, node=node, service_account=AGENT_SA),
            "does not run as service account")


def test_a_token_bound_to_no_pod_is_refused(refused: Any, cluster: Cluster) -> None:
    """A legacy or TokenRequest token for the service account itself names no pod, hence no node."""
    refused(cluster.token(None, AUDIENCE, namespace=AGENT_NS, service_account=AGENT_SA), "not bound to a pod")


def test_a_bad_csr_costs_no_token_review(server: CaServer, cluster: Cluster, node: dict[str, Any]) -> None:
    before = len(cluster.cluster.reviews)
    status, body = agent_call(server, None, PATH, {"token": cluster.token(agent_pod(cluster, node), AUDIENCE),
                                                   "csr": "not a CSR"})
    assert status == 400, body
    assert len(cluster.cluster.reviews) == before


def test_node_attestation_is_off_unless_configured(cluster: Cluster, tmp_path: Path, node: dict[str, Any]) -> None:
    server = CaServer(parse_config(base_config(tmp_path)), rotation_thread=False,
                      kube_api_client=cluster.api_client())
    server.start()
    server.start_background()
    try:
        status, body = join(server, cluster.token(agent_pod(cluster, node), AUDIENCE, node=node))
        assert status == 404, body
    finally:
        server.shutdown()


@pytest.mark.parametrize(("section", "message"), [
    ({"cluster": "Prod"}, "name the cluster"),
    ({"nodeAttestation": {"enabled": True}}, "serviceAccounts is empty"),
    ({"nodeAttestation": {"enabled": True, "serviceAccounts": ["agent"]}}, "NAMESPACE/NAME"),
    ({"nodeAttestation": {"enabled": "yes", "serviceAccounts": ["a/b"]}}, "true or false"),
    ({"nodeAttestation": {"audiences": ["x"]}}, "unknown configuration key 'kubernetes.nodeAttestation.audiences'"),
    ({"identityTemplates": {"interval": "1h"}}, "at most 10m"),
])
def test_the_kubernetes_section_is_checked(tmp_path: Path, section: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_config(base_config(tmp_path, kubernetes={**k8s_section(), **section}))


def test_no_join_token_names_the_k8s_psat_agents(tmp_path: Path) -> None:
    """Entries parented by .../agent/k8s_psat go to every agent attested by a service account token: a join-token
    agent of that name would be their parent."""
    from datetime import timedelta

    from keyseal._internal.ca.registry.stores import join_tokens_for

    tokens = join_tokens_for(parse_config(base_config(tmp_path)))
    with pytest.raises(UsageError, match="k8s_psat"):
        tokens.issue("k8s_psat", timedelta(minutes=5))


def psat_agent(cluster: Cluster, tmp_path: Path, node: dict[str, Any], port: int,
               server: CaServer) -> tuple[Any, dict[str, Any], Path]:
    """An in-process agent, not started, that attests with a projected token of its pod on `node` (written to
    tmp_path/psat) and trusts `server`'s CAs: (the agent, its pod, its socket directory, which the caller removes)."""
    from keyseal._internal.agent.config import parse_agent_config
    from keyseal._internal.agent.main import Agent
    from tests.harness.agent import socket_dir

    pod = agent_pod(cluster, node)
    (tmp_path / "psat").write_text(cluster.token(pod, AUDIENCE, node=node))
    (tmp_path / "bundle.pem").write_text("".join(k.ca_pem for k, _ in server.manager.live()))
    sockets = socket_dir()
    agent = Agent(parse_agent_config({
        "trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{port}",
        "trustBundleFile": str(tmp_path / "bundle.pem"), "k8sPSAT": {"tokenFile": str(tmp_path / "psat")},
        "socketPath": str(sockets / "agent.sock"), "syncInterval": 0.3}, environ={}))
    return agent, pod, sockets


def wait_for_a_new_agent_svid(agent: Any, first: datetime) -> None:
    """Until the agent holds an SVID that expires after `first` and reaches its server (15 s at most)."""
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (agent.cache.agent_expires and agent.cache.agent_expires > first
                                                and agent.cache.server_reachable):
        time.sleep(0.2)
    assert agent.cache.agent_expires is not None and agent.cache.agent_expires > first
    assert agent.cache.server_reachable


@pytest.mark.slow
def test_an_agent_whose_svid_expired_joins_again_with_its_token(cluster: Cluster, tmp_path: Path,
                                                                node: dict[str, Any]) -> None:
    """The server was away longer than the agent SVID lives: the agent, refused at the handshake, attests again
    with its (rotated) service account token instead of staying locked out until someone restarts it."""
    import shutil
    import time

    from tests.harness.https_server import free_port

    port = free_port()
    config = parse_config(base_config(tmp_path, kubernetes=k8s_section(), x509SVID={"ttl": "3s"},
                                      server={"listen": f"127.0.0.1:{port}"}))

    def serve() -> CaServer:
        server = CaServer(config, rotation_thread=False, kube_api_client=cluster.api_client())
        server.start()
        server.start_background()
        return server

    server = serve()
    agent, pod, sockets = psat_agent(cluster, tmp_path, node, port, server)
    try:
        agent.start()
        first = agent.cache.agent_expires
        server.shutdown()
        assert first is not None
        time.sleep(max(0.0, (first - datetime.now(UTC)).total_seconds()) + 0.5)  # its SVID expires meanwhile
        (tmp_path / "psat").write_text(cluster.token(pod, AUDIENCE, node=node))  # the kubelet rotated it
        server = serve()
        wait_for_a_new_agent_svid(agent, first)
    finally:
        agent.stop()
        server.shutdown()
        shutil.rmtree(sockets, ignore_errors=True)


def test_an_unreachable_api_server_is_503_not_a_refusal(tmp_path: Path, cluster: Cluster, node: dict[str, Any],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The agent retries a 503; a 401 would tell it its token is bad."""
    import kubernetes as kube

    from tests.harness.https_server import free_port

    configuration = kube.client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = CaServer(parse_config(base_config(tmp_path, kubernetes=k8s_section())), rotation_thread=False,
                      kube_api_client=kube.client.ApiClient(configuration))
    server.start()
    server.start_background()
    try:
        status, body = join(server, cluster.token(agent_pod(cluster, node), AUDIENCE, node=node))
        assert status == 503 and body["error"] == "unavailable", body
        assert any("cannot attest a k8s_psat join" in r.getMessage() for r in caplog.records)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_refused_service_account_token_is_offered_again(cluster: Cluster, tmp_path: Path,
                                                           node: dict[str, Any]) -> None:
    """The service account token is a re-joiner that is not one-time: refused once (here a server that does not
    yet allow the agents' service account), the same token is presented again at a later sync and taken, where
    a join token, once refused, is never offered twice."""
    import shutil
    import time

    from tests.harness.https_server import free_port

    port = free_port()

    def serve(accounts: list[str]) -> CaServer:
        section = k8s_section(nodeAttestation={"enabled": True, "audience": AUDIENCE, "serviceAccounts": accounts})
        config = parse_config(base_config(tmp_path, kubernetes=section, x509SVID={"ttl": "3s"},
                                          server={"listen": f"127.0.0.1:{port}"}))
        server = CaServer(config, rotation_thread=False, kube_api_client=cluster.api_client())
        server.start()
        server.start_background()
        return server

    server = serve([f"{AGENT_NS}/{AGENT_SA}"])
    agent, _, sockets = psat_agent(cluster, tmp_path, node, port, server)
    refusals: list[str] = []
    (rejoiner,) = agent.rejoiners
    assert not rejoiner.one_time

    def counted_join(token: str) -> None:
        try:
            rejoiner.join(token)
        except Exception as exc:
            refusals.append(type(exc).__name__)
            raise

    agent.rejoiners[0] = dataclasses.replace(rejoiner, join=counted_join)
    try:
        agent.start()
        first = agent.cache.agent_expires
        assert first is not None
        server.shutdown()
        time.sleep(max(0.0, (first - datetime.now(UTC)).total_seconds()) + 0.5)  # its SVID expires meanwhile
        server = serve(["other/other"])  # refuses the agents' service account
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "ServerRefusedError" not in refusals:
            time.sleep(0.1)
        assert "ServerRefusedError" in refusals
        server.shutdown()
        server = serve([f"{AGENT_NS}/{AGENT_SA}"])
        wait_for_a_new_agent_svid(agent, first)
    finally:
        agent.stop()
        server.shutdown()
        shutil.rmtree(sockets, ignore_errors=True)


def test_the_service_account_token_is_the_first_rejoiner(tmp_path: Path) -> None:
    """With both, the agent joins again with its service account token (presented again, not one-time) first
    and with a new token in joinTokenFile (one-time) after it."""
    from keyseal._internal.agent.config import parse_agent_config
    from keyseal._internal.agent.main import Agent

    (tmp_path / "bundle.pem").write_text(_self_signed_pem())
    (tmp_path / "join").write_text("a-join-token")
    agent = Agent(parse_agent_config({
        "trustDomain": TRUST_DOMAIN, "serverURL": "https://127.0.0.1:9",
        "trustBundleFile": str(tmp_path / "bundle.pem"), "k8sPSAT": {"tokenFile": str(tmp_path / "psat")},
        "joinTokenFile": str(tmp_path / "join"), "socketPath": str(tmp_path / "agent.sock")}, environ={}))
    try:
        assert [r.one_time for r in agent.rejoiners] == [False, True]
        assert "service account token" in agent.rejoiners[0].what
        assert agent.rejoiners[0].offer() is None  # no token file yet: nothing offered (and said why)
        (tmp_path / "psat").write_text("header.claims.signature\n")
        assert agent.rejoiners[0].offer() == "header.claims.signature"
        assert agent.rejoiners[1].offer() == "a-join-token"
    finally:
        agent.client.close()


def _self_signed_pem() -> str:
    """A CA certificate for a trust bundle file (the agent is never started against it)."""
    from datetime import timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "test")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


# -- renewal: a k8s_psat agent is attested again ------------------------------------------------------------

RENEW = "/v1/agent/renew"


def joined(server: CaServer, cluster: Cluster, node: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """An agent of `node` joined with its pod's token: its (key, SVID) and its pod."""
    pod = agent_pod(cluster, node)
    key = new_key()
    status, body = join(server, cluster.token(pod, AUDIENCE, node=node), make_csr(key))
    assert status == 200, body
    return (key, x509.load_pem_x509_certificate(body["certChain"][0].encode())), pod


def renew(server: CaServer, identity: Any, **extra: Any) -> tuple[int, Any]:
    return agent_call(server, identity, RENEW, {"csr": make_csr(), **extra})


@pytest.fixture
def refused_renewal(server: CaServer, caplog: pytest.LogCaptureFixture) -> Any:
    """A renewal is refused (401), for the reason the server logs (a fragment of it)."""

    def check(identity: Any, reason: str, **extra: Any) -> None:
        caplog.clear()
        status, body = renew(server, identity, **extra)
        assert status == 401, body
        assert body["error"] == "unauthenticated" and "needs a fresh token" in body["message"], body
        logged = [r.getMessage() for r in caplog.records if "refused the renewal of k8s_psat agent" in r.getMessage()]
        assert len(logged) == 1 and reason in logged[0], logged

    return check


def test_a_psat_agent_renews_with_a_fresh_token(server: CaServer, cluster: Cluster, node: dict[str, Any]) -> None:
    identity, pod = joined(server, cluster, node)
    fresh = cluster.token(pod, AUDIENCE, node=node)  # the kubelet rotated the projected token
    status, body = renew(server, identity, token=fresh)
    assert status == 200, body
    assert body["spiffeID"] == f"spiffe://{TRUST_DOMAIN}/keyseal/agent/k8s_psat/test/{node['metadata']['uid']}"
    assert cluster.cluster.reviews[-1]["spec"] == {"token": fresh, "audiences": [AUDIENCE]}  # checked again
    # The new SVID renews the same way.
    key = new_key()
    status, body = agent_call(server, identity, RENEW, {"csr": make_csr(key), "token": fresh})
    assert status == 200, body
    renewed = (key, x509.load_pem_x509_certificate(body["certChain"][0].encode()))
    status, body = renew(server, renewed, token=cluster.token(pod, AUDIENCE, node=node))
    assert status == 200, body


def test_a_psat_agent_without_a_token_or_with_an_expired_one_is_not_renewed(
        refused_renewal: Any, server: CaServer, cluster: Cluster, node: dict[str, Any]) -> None:
    import time

    identity, pod = joined(server, cluster, node)
    refused_renewal(identity, "sent no service account token")
    refused_renewal(identity, "sent no service account token", token="")
    refused_renewal(identity, "has expired (its own claims)",
                    token=cluster.token(pod, AUDIENCE, node=node, issued=time.time() - 3600, lifetime=600))
    refused_renewal(identity, "is not for audience", token=cluster.token(pod, "vault", node=node))


def test_a_psat_agent_whose_node_was_deleted_is_not_renewed(refused_renewal: Any, cluster: Cluster,
                                                            server: CaServer, node: dict[str, Any]) -> None:
    identity, pod = joined(server, cluster, node)
    cluster.core().delete_node(node["metadata"]["name"])
    # Its pod is still listed (the emulator does not evict it): the node check alone refuses.
    refused_renewal(identity, f"node {node['metadata']['name']} of pod", token=cluster.token(pod, AUDIENCE))
    # A node made again under the same name is another node (another uid): the old agent is still refused.
    again = cluster.node(node["metadata"]["name"])
    refused_renewal(identity, "another node (or the node was made again under its name)",
                    token=cluster.token(pod, AUDIENCE, node=again))


def test_a_token_of_another_node_does_not_renew_an_agent(refused_renewal: Any, server: CaServer, cluster: Cluster,
                                                         node: dict[str, Any]) -> None:
    """A stolen agent SVID used with a token of an agent pod on another node: that token attests the other node."""
    identity, _ = joined(server, cluster, node)
    other = cluster.node(f"node-{uuid.uuid4().hex[:6]}")
    token = cluster.token(agent_pod(cluster, other), AUDIENCE, node=other)
    refused_renewal(identity, f"attests spiffe://{TRUST_DOMAIN}/keyseal/agent/k8s_psat/test/"
                              f"{other['metadata']['uid']}, another node", token=token)


def test_a_join_token_agent_renews_on_its_svid_alone(server: CaServer, cluster: Cluster) -> None:
    from datetime import timedelta

    from keyseal._internal.ca.registry.stores import join_tokens_for

    token, agent_id = join_tokens_for(server.config).issue("plain-node", timedelta(minutes=5))
    key = new_key()
    status, body = agent_call(server, None, "/v1/agent/join", {"token": token, "csr": make_csr(key)})
    assert status == 200, body
    identity = (key, x509.load_pem_x509_certificate(body["certChain"][0].encode()))
    before = len(cluster.cluster.reviews)
    status, body = renew(server, identity)
    assert status == 200 and body["spiffeID"] == agent_id, body
    assert len(cluster.cluster.reviews) == before  # no TokenReview for it
    status, body = renew(server, identity, token="a.b.c")
    assert status == 400 and "only agents attested by their service account token" in body["message"], body


@contextlib.contextmanager
def server_and_psat_agent(cluster: Cluster, tmp_path: Path, node: dict[str, Any], ttl: str,
                          client_id: str | None = None, rotation_thread: bool = True) -> Iterator[
        tuple[CaServer, Any, dict[str, Any]]]:
    """A server (X.509-SVIDs of `ttl`) on the cluster's API, and an in-process agent configured to attest with a
    projected token of its pod on `node` (written to tmp_path/psat), not started yet: yields (server, agent, the
    agent's pod); both are stopped afterwards."""
    import shutil

    from tests.harness.https_server import free_port

    port = free_port()
    config = parse_config(base_config(tmp_path, kubernetes=k8s_section(), x509SVID={"ttl": ttl},
                                      server={"listen": f"127.0.0.1:{port}"}))
    api_client = cluster.api_client(client_id) if client_id else cluster.api_client()
    server = CaServer(config, rotation_thread=rotation_thread, kube_api_client=api_client)
    server.start()
    server.start_background()
    agent, pod, sockets = psat_agent(cluster, tmp_path, node, port, server)
    try:
        yield server, agent, pod
    finally:
        agent.stop()
        server.shutdown()
        shutil.rmtree(sockets, ignore_errors=True)


def test_the_agent_renews_with_its_rotated_token_and_says_when_it_is_refused(
        cluster: Cluster, tmp_path: Path, node: dict[str, Any], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent (in process) sends the token file as it is at each renewal; once its node is deleted, the
    refusal is logged as such, and its attempt to join again is refused too."""
    import logging
    import time

    # With its rotation thread, which renews its serving certificate (as short-lived as the SVIDs here): ticking
    # more often than the certificate's lifetime.
    monkeypatch.setattr("keyseal._internal.ca.server.TICK_SECONDS", 0.5)
    caplog.set_level(logging.INFO)
    with server_and_psat_agent(cluster, tmp_path, node, "4s") as (_, agent, pod):
        agent.start()
        first = agent.cache.agent_expires
        assert first is not None
        rotated = cluster.token(pod, AUDIENCE, node=node)
        (tmp_path / "psat").write_text(rotated + "\n")  # the kubelet rotated it

        def renewed_with_rotated() -> bool:
            return any(r.get("spec", {}).get("token") == rotated and r["status"].get("authenticated")
                       for r in list(cluster.cluster.reviews))

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (renewed_with_rotated() and agent.cache.agent_expires
                                                    and agent.cache.agent_expires > first):
            time.sleep(0.1)
        assert renewed_with_rotated() and agent.cache.agent_expires is not None and agent.cache.agent_expires > first
        assert not any("k8s_psat join" in r.getMessage() for r in caplog.records)  # renewed, not joined again

        cluster.core().delete_node(node["metadata"]["name"])
        wanted = "the keyseal server refused to renew the agent SVID (re-attestation with the service account " \
                 "token failed)"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(wanted in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        (line,) = {r.getMessage() for r in caplog.records if wanted in r.getMessage()}
        assert "needs a fresh token that attests the agent's node again" in line
        assert any(f"node {node['metadata']['name']} of pod" in r.getMessage() for r in caplog.records
                   if "refused the renewal of k8s_psat agent" in r.getMessage())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("joining again with the service account token" in
                                                      r.getMessage() for r in caplog.records):
            time.sleep(0.1)
        assert any("refused a k8s_psat join" in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]


def test_a_kubernetes_api_outage_at_renewal_does_not_stop_the_workload_svids(
        cluster: Cluster, tmp_path: Path, node: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The server cannot reach the Kubernetes API when the agent's SVID is due (503, not a refusal): the agent
    keeps the SVID it holds (still valid) and the rest of the pass goes on with it, so the workloads' X.509-SVIDs
    are still renewed; the agent SVID is tried again at the next pass."""
    import logging
    import time

    from keyseal._internal.ca.registry.stores import entry_store_for

    client_id = f"server-{uuid.uuid4().hex[:6]}"
    caplog.set_level(logging.INFO)
    with server_and_psat_agent(cluster, tmp_path, node, "6s", client_id, rotation_thread=False) as (server, agent, _):
        agent_id = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/k8s_psat/test/{node['metadata']['uid']}"
        entry = entry_store_for(server.config).create(f"spiffe://{TRUST_DOMAIN}/ns/shop/web", agent_id,
                                                      ("unix:uid:1001",))
        agent.start()
        first = agent.cache.agent_expires
        assert first is not None and entry.entry_id in agent.cache.x509
        cluster.cut(client_id)  # the server's Kubernetes API calls fail from now on
        cut_at = datetime.now(UTC)
        deadline = time.monotonic() + max(0.0, (first - datetime.now(UTC)).total_seconds()) - 0.5

        def renewed() -> bool:
            cached = agent.cache.x509.get(entry.entry_id)  # dropped once it expired unrenewed
            return cached is not None and cached.issued > cut_at

        while time.monotonic() < deadline and not renewed():
            time.sleep(0.1)
        assert renewed()  # renewed with the agent SVID still held
        assert agent.cache.agent_expires == first  # not renewed: the API server could not attest it again
        assert any("cannot attest the renewal of k8s_psat agent" in r.getMessage() for r in caplog.records)
        assert not agent.cache.needs_join
        cluster.restore(client_id)
