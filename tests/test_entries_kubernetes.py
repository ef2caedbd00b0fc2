"""Registration entries, join tokens and the published trust bundle in the Kubernetes store, against a
Kubernetes API on 127.0.0.1 (kmock with resourceVersion, PUT and delete preconditions added by the harness),
through the official kubernetes client and the `keyseal entry` CLI; and the node agent end to end on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes
import pytest
import yaml
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import WorkloadApiClient

from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.agent.main import Agent
from keyseal._internal.ca.bundle_configmap import BUNDLE_KEY, ENVIRONMENT, BundleConfigMap
from keyseal._internal.ca.config import Config, parse_config
from keyseal._internal.ca.registry.entries import token_digest
from keyseal._internal.ca.registry.kubernetes import KubeEntryStore, KubeJoinTokens, entry_id_for
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from keyseal._internal.ca.server import CaServer
from keyseal.errors import UsageError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.harness.agent import socket_dir
from tests.harness.ca import TRUST_DOMAIN, base_config
from tests.harness.kube_api import KubeApi
from tests.harness.replicas import run_as_replicas
from tests.test_helm_chart import CHART, render

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "deploy" / "crds"
AGENT = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"
PREFIX = "keyseal-example.org"


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The API server comes from store.kubernetes.apiServer only: no kubeconfig, not a pod."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)


def kube_store(kube_api: KubeApi, namespace: str) -> dict[str, Any]:
    return {"type": "kubernetes", "kubernetes": {"namespace": namespace, "apiServer": kube_api.url}}


def config_for(tmp: Path, kube_api: KubeApi, namespace: str) -> Config:
    return parse_config(base_config(tmp, store=kube_store(kube_api, namespace)))


def custom(kube_api: KubeApi) -> Any:
    return kubernetes.client.CustomObjectsApi(kube_api.api_client())


def objects(kube_api: KubeApi, namespace: str, plural: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = custom(kube_api).list_namespaced_custom_object("keyseal.dev", "v1", namespace,
                                                                             plural)["items"]
    return items


def crd_spec_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"{plural}.keyseal.dev.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


@pytest.mark.slow
def test_entry_cli_against_the_kubernetes_store(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    config_file = tmp_path / "server.yaml"
    config_file.write_text(yaml.safe_dump(base_config(tmp_path, store=kube_store(kube_api, namespace))))
    env = {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    web = f"spiffe://{TRUST_DOMAIN}/ns/a/web"

    def keyseal(*args: str) -> Any:
        return run_keyseal("entry", *args, "--config", config_file, env=env)

    created = keyseal("create", "--spiffe-id", web, "--parent", AGENT, "--selector", "unix:uid:1001",
                      "--selector", "unix:path:/usr/bin/web", "--x509-ttl", "10m")
    assert created.returncode == 0, created.stderr
    entry_id = created.stdout.strip()
    selectors = ("unix:path:/usr/bin/web", "unix:uid:1001")
    assert entry_id == entry_id_for(web, AGENT, selectors)
    (stored,) = objects(kube_api, namespace, "registrationentries")
    assert stored["kind"] == "RegistrationEntry" and stored["metadata"]["name"] == f"{PREFIX}-entry-{entry_id}"
    assert stored["spec"] == {"spiffeID": web, "parentID": AGENT, "selectors": list(selectors), "x509SVIDTTL": 600}
    jsonschema.validate(stored["spec"], crd_spec_schema("registrationentries"))

    listed = keyseal("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"entry_id": entry_id, "spiffe_id": web, "parent_id": AGENT,
                                          "selectors": list(selectors), "x509_ttl": 600, "jwt_ttl": 0}]
    duplicate = keyseal("create", "--spiffe-id", web, "--parent", AGENT, "--selector", "unix:path:/usr/bin/web",
                        "--selector", "unix:uid:1001")
    assert_one_line_error(duplicate)
    assert f"entry {entry_id} already gives" in duplicate.stderr

    token = keyseal("join-token", "--agent", "node-7", "--ttl", "5m")
    assert token.returncode == 0, token.stderr
    secret = token.stdout.strip()
    assert token.stderr.strip() == f"agent SPIFFE ID: spiffe://{TRUST_DOMAIN}/keyseal/agent/node-7"
    (stored_token,) = objects(kube_api, namespace, "jointokens")
    assert stored_token["metadata"]["name"] == f"{PREFIX}-join-{hashlib.sha256(secret.encode()).hexdigest()}"
    assert secret not in json.dumps(stored_token)
    jsonschema.validate(stored_token["spec"], crd_spec_schema("jointokens"))

    assert keyseal("delete", entry_id).returncode == 0
    assert objects(kube_api, namespace, "registrationentries") == []
    assert json.loads(keyseal("list", "--json").stdout) == []
    again = keyseal("delete", entry_id)
    assert_one_line_error(again)
    assert "no entry" in again.stderr


@pytest.mark.slow
def test_entry_cli_with_the_charts_config_and_a_kubeconfig(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    """An operator saves the server configuration the chart rendered and runs `keyseal entry` with their own
    kubeconfig: the namespace comes from the configuration, the API server and credentials from kubeconfig."""
    rendered = helm_python.Chart.load(str(CHART)).render({}, name="trust", namespace=namespace)
    server_yaml = yaml.safe_load(rendered["keyseal/templates/configmap.yaml"])["data"]["config.yaml"]
    (tmp_path / "server.yaml").write_text(server_yaml)
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
                  "clusters": [{"name": "test", "cluster": {"server": kube_api.url}}],
                  "users": [{"name": "operator", "user": {"token": "operator-token"}}],
                  "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    env = {"KUBECONFIG": str(tmp_path / "kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    created = run_keyseal("entry", "create", "--config", tmp_path / "server.yaml", "--spiffe-id",
                          f"spiffe://{TRUST_DOMAIN}/db", "--parent", f"spiffe://{TRUST_DOMAIN}/keyseal/agent",
                          "--selector", "unix:uid:999", env=env)
    assert created.returncode == 0, created.stderr
    (stored,) = objects(kube_api, namespace, "registrationentries")
    assert stored["metadata"]["name"] == f"{PREFIX}-entry-{created.stdout.strip()}"
    listed = run_keyseal("entry", "list", "--config", tmp_path / "server.yaml", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [created.stdout.strip(), f"spiffe://{TRUST_DOMAIN}/db",
                                     f"parent=spiffe://{TRUST_DOMAIN}/keyseal/agent", "unix:uid:999"]


def test_two_replicas_redeem_one_token_exactly_once(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    config = config_for(tmp_path, kube_api, namespace)
    token, agent_id = join_tokens_for(config, kube_api.api_client()).issue("node-1", timedelta(minutes=5))
    both_read = threading.Barrier(2, timeout=30)
    results: dict[str, str | None] = {}

    def replica(label: str) -> None:
        tokens = join_tokens_for(config, kube_api.api_client())  # its own client, as another server replica
        assert isinstance(tokens, KubeJoinTokens)
        real_get = tokens.resources.get

        def get_then_wait(name: str) -> dict[str, Any] | None:
            found = real_get(name)
            both_read.wait()  # both replicas hold the token object before either deletes it
            return found

        tokens.resources.get = get_then_wait  # type: ignore[method-assign]
        results[label] = tokens.redeem(token, datetime.now(UTC))

    conflicts_before, verbs_before = len(kube_api.conflicts(namespace)), len(kube_api.verbs())
    run_as_replicas(replica)
    assert sorted(results.values(), key=str) == [None, agent_id]
    deletes = [v for v in kube_api.verbs()[verbs_before:] if v[0] == "delete" and v[2] == "jointokens"]
    assert len(deletes) == 2  # both replicas read the token and tried to take it: the API server chose one
    assert len(kube_api.conflicts(namespace)) - conflicts_before <= 1  # the loser met the precondition (409) or a 404
    assert objects(kube_api, namespace, "jointokens") == []
    assert join_tokens_for(config, kube_api.api_client()).redeem(token, datetime.now(UTC)) is None


def test_looking_a_token_up_changes_nothing(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    """The join endpoint looks a token up before it checks the CSR or redeems: one GET, no write, for a token that
    was issued, expired, foreign or never existed."""
    config = config_for(tmp_path, kube_api, namespace)
    tokens = join_tokens_for(config, kube_api.api_client())
    now = datetime.now(UTC)
    token, agent_id = tokens.issue("node-1", timedelta(minutes=5))
    custom(kube_api).create_namespaced_custom_object("keyseal.dev", "v1", namespace, "jointokens", {
        "apiVersion": "keyseal.dev/v1", "kind": "JoinToken",
        "metadata": {"name": f"{PREFIX}-join-{token_digest('foreign')}"},
        "spec": {"agentID": "spiffe://other.org/keyseal/agent/x", "expiresAt": "2999-01-01T00:00:00Z"}})
    verbs_before = len(kube_api.verbs())
    assert tokens.lookup(token, now) == agent_id
    assert tokens.lookup(token, now + timedelta(minutes=6)) is None  # expired by then
    assert tokens.lookup("foreign", now) is None
    assert tokens.lookup("never-issued", now) is None
    assert {v[0] for v in kube_api.verbs()[verbs_before:]} == {"get"}
    assert len(objects(kube_api, namespace, "jointokens")) == 2
    assert tokens.redeem(token, now) == agent_id


@pytest.mark.slow
def test_many_concurrent_redemptions(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    """No interleaving forced: 8 redeemers per token, 5 tokens; each token joins exactly one agent."""
    config = config_for(tmp_path, kube_api, namespace)
    issued = [join_tokens_for(config, kube_api.api_client()).issue(f"node-{i}", timedelta(minutes=5))
              for i in range(5)]
    replicas = [join_tokens_for(config, kube_api.api_client()) for _ in range(8)]
    start = threading.Barrier(len(replicas), timeout=30)
    won: list[str] = []
    lock = threading.Lock()

    def run(tokens: Any) -> None:
        start.wait()
        for token, _ in issued:
            agent = tokens.redeem(token, datetime.now(UTC))
            if agent is not None:
                with lock:
                    won.append(agent)

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(won) == sorted(agent for _, agent in issued)


@pytest.mark.slow
def test_concurrent_writers_lose_no_entry(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    config = config_for(tmp_path, kube_api, namespace)
    start = threading.Barrier(2, timeout=30)
    made: dict[str, list[str]] = {"A": [], "B": []}
    same: dict[str, str] = {}

    def writer(label: str) -> None:
        store = entry_store_for(config, kube_api.api_client())
        start.wait()
        for i in range(8):
            made[label].append(store.create(f"spiffe://{TRUST_DOMAIN}/{label}/{i}", AGENT,
                                            (f"unix:uid:{1000 + i}",)).entry_id)
        try:  # both writers add the same entry at once: exactly one may
            same[label] = store.create(f"spiffe://{TRUST_DOMAIN}/same", AGENT, ("unix:uid:7",)).entry_id
        except UsageError as exc:
            same[label] = str(exc)

    run_as_replicas(writer)
    listed = entry_store_for(config, kube_api.api_client()).entries()
    same_id = entry_id_for(f"spiffe://{TRUST_DOMAIN}/same", AGENT, ("unix:uid:7",))
    assert {e.entry_id for e in listed} == set(made["A"]) | set(made["B"]) | {same_id}
    assert len(listed) == 17
    outcomes = sorted(same.values())
    assert outcomes[0] == same_id and outcomes[1].startswith(f"entry {same_id} already gives")


@pytest.mark.slow
def test_stored_data_is_checked(kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    """Expired and foreign tokens join nothing; resources that are not valid entries of this trust domain are
    never served; another record prefix's entries are not ours."""
    config = config_for(tmp_path, kube_api, namespace)
    tokens = join_tokens_for(config, kube_api.api_client())
    now = datetime.now(UTC)
    expired, _ = tokens.issue("node-1", timedelta(minutes=1))
    assert tokens.redeem(expired, now + timedelta(minutes=2)) is None
    assert objects(kube_api, namespace, "jointokens") == []  # the attempt removed it
    api = custom(kube_api)
    foreign = "forged-token"
    api.create_namespaced_custom_object("keyseal.dev", "v1", namespace, "jointokens", {
        "apiVersion": "keyseal.dev/v1", "kind": "JoinToken",
        "metadata": {"name": f"{PREFIX}-join-{token_digest(foreign)}"},
        "spec": {"agentID": "spiffe://other.org/keyseal/agent/x", "expiresAt": "2999-01-01T00:00:00Z"}})
    assert tokens.redeem(foreign, now) is None
    # Issuing removes tokens that expired (this one was never redeemed).
    api.create_namespaced_custom_object("keyseal.dev", "v1", namespace, "jointokens", {
        "apiVersion": "keyseal.dev/v1", "kind": "JoinToken",
        "metadata": {"name": f"{PREFIX}-join-{token_digest('stale')}"},
        "spec": {"agentID": AGENT, "expiresAt": "2001-01-01T00:00:00Z"}})
    fresh, _ = tokens.issue("node-3", timedelta(minutes=5))
    names = {o["metadata"]["name"] for o in objects(kube_api, namespace, "jointokens")}
    assert names == {f"{PREFIX}-join-{token_digest(fresh)}"}

    store = entry_store_for(config, kube_api.api_client())
    good = store.create(f"spiffe://{TRUST_DOMAIN}/good", AGENT, ("unix:uid:5",))
    for name, spec in ((f"{PREFIX}-entry-other-td", {"spiffeID": "spiffe://other.org/x", "parentID": AGENT,
                                                      "selectors": ["unix:uid:1"]}),
                       (f"{PREFIX}-entry-bad-selector", {"spiffeID": f"spiffe://{TRUST_DOMAIN}/y",
                                                          "parentID": AGENT, "selectors": ["k8s:namespace:default"]}),
                       ("keyseal-other-entry-abc", {"spiffeID": f"spiffe://{TRUST_DOMAIN}/z", "parentID": AGENT,
                                                    "selectors": ["unix:uid:1"]}),
                       (f"{PREFIX}-entry-by-hand", {"spiffeID": f"spiffe://{TRUST_DOMAIN}/hand",
                                                     "parentID": AGENT, "selectors": ["unix:gid:9"],
                                                     "jwtSVIDTTL": 30})):
        api.create_namespaced_custom_object("keyseal.dev", "v1", namespace, "registrationentries", {
            "apiVersion": "keyseal.dev/v1", "kind": "RegistrationEntry", "metadata": {"name": name}, "spec": spec})
    fresh_store = entry_store_for(config, kube_api.api_client())
    assert [(e.entry_id, e.spiffe_id, e.jwt_ttl) for e in fresh_store.entries()] == sorted([
        (good.entry_id, good.spiffe_id, 0), ("by-hand", f"spiffe://{TRUST_DOMAIN}/hand", 30)])
    assert [e.entry_id for e in fresh_store.for_agent(AGENT + "-other")] == []
    with pytest.raises(UsageError, match="no entry"):
        fresh_store.delete("../../wrappedkeys/x")


def test_the_cli_view_reads_the_api_and_the_server_view_watches(kube_api: KubeApi, namespace: str,
                                                                  tmp_path: Path) -> None:
    """(The watch itself: tests/test_entries_watch.py.)"""
    config = config_for(tmp_path, kube_api, namespace)
    server_view = entry_store_for(config, kube_api.api_client(), serving=True)
    assert isinstance(server_view, KubeEntryStore)
    try:
        assert server_view.entries() == []
        created = entry_store_for(config, kube_api.api_client()).create(f"spiffe://{TRUST_DOMAIN}/w", AGENT,
                                                                     ("unix:uid:1",))
        deadline = time.monotonic() + 1
        while server_view.get(created.entry_id) != created:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        server_view.close()


def test_missing_crd_and_refusals_are_clear(kube_api: KubeApi, tmp_path: Path) -> None:
    store = {"type": "kubernetes", "kubernetes": {"apiServer": kube_api.url}}
    config = parse_config(base_config(tmp_path, store=store))
    with pytest.raises(UsageError, match=r"store\.kubernetes\.namespace is not set"):
        entry_store_for(config, kube_api.api_client())
    store = KubeEntryStore.from_config(config_for(tmp_path, kube_api, "ns-a"), kube_api.api_client())
    store.resources.plural = "notserved"
    with pytest.raises(UsageError, match="install the CRD"):
        store.entries()


@pytest.mark.slow
def test_bundle_configmap_is_published_only_forward(kube_api: KubeApi, namespace: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server = CaServer(config_for(tmp_path, kube_api, namespace), rotation_thread=False,
                      kube_api_client=kube_api.api_client())
    server.manager.start()
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    assert BundleConfigMap.from_environment(kube_api.api_client()) is None  # not asked for
    monkeypatch.setenv(ENVIRONMENT, "trust-keyseal-agent-bundle")
    publisher = BundleConfigMap.from_environment(kube_api.api_client())
    assert publisher is not None and publisher.namespace == namespace
    keysets = [k for k, _ in server.manager.live()]
    with pytest.raises(UsageError, match="does not exist"):  # the chart creates it; the server never does
        publisher.publish(keysets, timedelta(minutes=5))
    core = kubernetes.client.CoreV1Api(kube_api.api_client())
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "trust-keyseal-agent-bundle"}})
    assert publisher.publish(keysets, timedelta(minutes=5)) is True
    assert publisher.publish(keysets, timedelta(minutes=5)) is False  # unchanged: not written again
    stored = core.read_namespaced_config_map("trust-keyseal-agent-bundle", namespace).data[BUNDLE_KEY]
    assert json.loads(stored)["keys"][0]["x5c"]
    newer = json.loads(stored) | {"spiffe_sequence": 99}
    current = core.read_namespaced_config_map("trust-keyseal-agent-bundle", namespace)
    current.data = {BUNDLE_KEY: json.dumps(newer)}
    core.replace_namespaced_config_map("trust-keyseal-agent-bundle", namespace, current)
    other_replica = BundleConfigMap.from_environment(kube_api.api_client())
    assert other_replica is not None
    assert other_replica.publish(keysets, timedelta(minutes=5)) is False  # a replica that is behind keeps off
    assert json.loads(core.read_namespaced_config_map("trust-keyseal-agent-bundle",
                                                      namespace).data[BUNDLE_KEY])["spiffe_sequence"] == 99


def allowed_by(role: dict[str, Any], verb: str, group: str, plural: str, name: str) -> bool:
    """Whether a Role's rules allow a request, as the API server's RBAC authorizer decides."""
    return any(group in rule["apiGroups"] and plural in rule["resources"] and verb in rule["verbs"]
               and (not rule.get("resourceNames") or name in rule["resourceNames"]) for rule in role["rules"])


@pytest.mark.slow
def test_agent_end_to_end_on_the_kubernetes_store(kube_api: KubeApi, namespace: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A server on the Kubernetes store publishes its bundle to the chart's ConfigMap; an agent trusting only
    that ConfigMap's bundle.json joins with a token and serves an entry to py-spiffe. Every Kubernetes API call
    the server makes meanwhile is one the chart's Role allows."""
    roles = render(helm_python.Chart.load(str(CHART)), {"agent": {"enabled": True, "joinTokenSecret": "j"}})["Role"]
    (role,) = [r for r in roles if r["metadata"]["name"] == "trust-keyseal"]
    bundle_map = "trust-keyseal-agent-bundle"  # the chart's name for release "trust"
    config = config_for(tmp_path, kube_api, namespace)
    server = CaServer(config, rotation_thread=False, kube_api_client=kube_api.api_client())
    server.start()
    server.start_background()
    sock = socket_dir() / "agent.sock"
    agent: Agent | None = None
    try:
        core = kubernetes.client.CoreV1Api(kube_api.api_client())
        core.create_namespaced_config_map(namespace, {"metadata": {"name": bundle_map}})  # by the chart
        web = f"spiffe://{TRUST_DOMAIN}/ns/a/web"
        entry_store_for(config, kube_api.api_client()).create(web, AGENT, (f"unix:uid:{os.getuid()}",))
        token, _ = join_tokens_for(config, kube_api.api_client()).issue("node-1", timedelta(minutes=5))
        server_calls_from = len(kube_api.verbs())  # from here on only the server calls the Kubernetes API
        monkeypatch.setenv("POD_NAMESPACE", namespace)
        monkeypatch.setenv(ENVIRONMENT, bundle_map)
        publisher = BundleConfigMap.from_environment(kube_api.api_client())
        assert publisher is not None
        publisher.publish([k for k, _ in server.manager.live()], config.refresh_hint)
        (tmp_path / "bundle.json").write_text(core.read_namespaced_config_map(bundle_map, namespace).data[BUNDLE_KEY])
        server_calls_to = len(kube_api.verbs()) - 1  # the read above is the kubelet's
        agent = Agent(parse_agent_config({
            "trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
            "trustBundleFile": str(tmp_path / "bundle.json"), "joinToken": token, "socketPath": str(sock),
            "socketMode": "0666", "syncInterval": 0.3}, environ={}))
        agent.start()
        with WorkloadApiClient(f"unix:{sock}", default_timeout=10) as client:
            svid = client.fetch_x509_svid()
        assert str(svid.spiffe_id) == web
        authorities = [k.ca_certificate for k, _ in server.manager.live()]
        verifier = PolicyBuilder().store(Store(authorities)).time(datetime.now(UTC)).build_client_verifier()
        verified = verifier.verify(svid.leaf, svid.cert_chain[1:])
        assert [u.value for u in verified.subjects if isinstance(u, x509.UniformResourceIdentifier)] == [web]
        assert objects(kube_api, namespace, "jointokens") == []  # spent
        calls = kube_api.verbs()
        server_calls = calls[server_calls_from:server_calls_to] + calls[server_calls_to + 1:-1]
        assert {c[:3] for c in server_calls} >= {("update", "", "configmaps"), ("get", "keyseal.dev", "jointokens"),
                                                 ("delete", "keyseal.dev", "jointokens"),
                                                 ("list", "keyseal.dev", "registrationentries"),
                                                 ("watch", "keyseal.dev", "registrationentries"),
                                                 ("create", "keyseal.dev", "joinedagents")}
        refused = [c for c in server_calls if not allowed_by(role, *c)]
        assert refused == []
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(sock.parent, ignore_errors=True)
        server.shutdown()


def test_new_crds_are_structural(tmp_path: Path) -> None:
    """The API server refuses a CRD schema with additionalProperties beside properties (unknown fields are
    pruned instead), and needs a type on every node."""
    for plural in ("registrationentries", "jointokens", "joinedagents"):
        crd = yaml.safe_load((CRDS / f"{plural}.keyseal.dev.yaml").read_text())
        assert crd["metadata"]["name"] == f"{plural}.keyseal.dev" and crd["spec"]["scope"] == "Namespaced"

        def walk(node: dict[str, Any], where: str) -> None:
            assert "type" in node, where
            assert not ("additionalProperties" in node and "properties" in node), where
            for key, child in (node.get("properties") or {}).items():
                walk(child, f"{where}.{key}")
            if "items" in node:
                walk(node["items"], f"{where}[]")

        walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], plural)
    schema = crd_spec_schema("registrationentries")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spiffeID": "spiffe://a/b", "parentID": "spiffe://a/c", "selectors": ["k8s:x"]}, schema)
