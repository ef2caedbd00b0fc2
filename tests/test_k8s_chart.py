"""The chart's Kubernetes-native identity (#17): agent.enabled alone gives agents that join with a projected
service account token, a server that checks it, RBAC limited to what is used, and a default IdentityTemplate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes
import pytest
import yaml

from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.ca.config import Config, parse_config
from keyseal._internal.ca.k8s_config import K8sConfig
from keyseal._internal.ca.registry.psat import PsatAttestor
from keyseal._internal.ca.registry.templates import TemplateReconciler
from tests.harness.kube_identity import Cluster
from tests.test_helm_chart import CHART, render

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def agent_parts(manifests: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (daemonset,) = manifests["DaemonSet"]
    (config_map,) = [d for d in manifests["ConfigMap"] if d["metadata"]["name"] == "trust-keyseal-agent"]
    return daemonset["spec"]["template"]["spec"], yaml.safe_load(config_map["data"]["agent.yaml"])


def server_config(manifests: dict[str, list[dict[str, Any]]]) -> Config:
    (config_map,) = [d for d in manifests["ConfigMap"] if d["metadata"]["name"] == "trust-keyseal"]
    return parse_config(yaml.safe_load(config_map["data"]["config.yaml"]))


def rules(manifests: dict[str, list[dict[str, Any]]], suffix: str) -> list[dict[str, Any]]:
    (role,) = [r for r in manifests["ClusterRole"] if r["metadata"]["name"].endswith(suffix)]
    return list(role["rules"])


def test_agent_enabled_alone_needs_no_join_token(chart: helm_python.Chart, tmp_path: Path) -> None:
    manifests = render(chart, {"agent": {"enabled": True}})
    pod, config = agent_parts(manifests)
    assert pod["serviceAccountName"] == "trust-keyseal-agent" and pod["hostPID"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "join-tokens" not in volumes
    sources = volumes["service-account"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"] == {"audience": "keyseal-server", "expirationSeconds": 600,
                                                 "path": "token"}
    assert sources[1]["serviceAccountToken"]["path"] == "kubelet-token"
    assert "audience" not in sources[1]["serviceAccountToken"]  # the API server's: the kubelet reviews it
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "service-account")
    assert config["k8sPSAT"]["tokenFile"].startswith(mount["mountPath"] + "/")
    assert {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in container["env"]
    parsed = parse_agent_config(config, environ={"NODE_NAME": "node-a", "NODE_IP": "10.0.0.7"})
    assert parsed.psat_token_file is not None and not parsed.join_token
    assert parsed.k8s is not None and parsed.k8s.kubelet_url == "https://10.0.0.7:10250"
    assert parsed.k8s.kubelet_ca_file.parent == Path(mount["mountPath"])
    # The server accepts that token from that service account only, for that audience, and runs the templates.
    server = server_config(manifests)
    assert server.kubernetes is not None
    assert server.kubernetes.node_attestation and server.kubernetes.templates
    assert server.kubernetes.service_accounts == ("spire/trust-keyseal-agent",)
    assert server.kubernetes.audience == "keyseal-server" and server.kubernetes.cluster == "cluster"
    agent_accounts = [s for s in manifests["ServiceAccount"] if s["metadata"]["name"] == "trust-keyseal-agent"]
    assert len(agent_accounts) == 1


def test_the_rbac_is_what_is_used(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"agent": {"enabled": True}})
    assert rules(manifests, "-k8s-identity") == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list"]},
        {"apiGroups": ["keyseal.dev"], "resources": ["identitytemplates"], "verbs": ["list"]},
        {"apiGroups": ["keyseal.dev"], "resources": ["identitytemplates/status"], "verbs": ["patch"]}]
    assert rules(manifests, "-entry-writer") == [
        {"apiGroups": ["keyseal.dev"], "resources": ["registrationentries"],
         "verbs": ["list", "create", "update", "delete"]}]
    (writer_binding,) = [b for b in manifests["RoleBinding"] if b["metadata"]["name"].endswith("-entry-writer")]
    assert writer_binding["metadata"]["namespace"] == "spire"  # entries only in the release namespace
    assert rules(manifests, "-agent") == [{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]
    older = render(chart, {"agent": {"enabled": True, "kubernetes": {"kubeletNodesProxy": True}}})
    assert rules(older, "-agent")[0]["resources"] == ["nodes/pods", "nodes/proxy"]
    subjects = {(b["roleRef"]["name"], s["name"]) for b in manifests["ClusterRoleBinding"] for s in b["subjects"]}
    assert ("trust-keyseal-spire-agent", "trust-keyseal-agent") in subjects
    assert ("trust-keyseal-spire-k8s-identity", "trust-keyseal") in subjects


def granted(manifests: dict[str, list[dict[str, Any]]], *suffixes: str) -> set[tuple[str, str, str]]:
    return {(verb, group, resource) for suffix in suffixes for rule in rules(manifests, suffix)
            for verb in rule["verbs"] for group in rule["apiGroups"] for resource in rule["resources"]}


def test_every_granted_verb_is_one_the_server_calls(chart: helm_python.Chart, tmp_path: Path) -> None:
    """Node attestation and a template pass (namespace selector, create, replace, delete, status) against the API
    emulator: the verbs the server's Kubernetes-identity code calls are exactly the ones the chart grants it."""
    manifests = render(chart, {"agent": {"enabled": True}})
    cluster = Cluster().start()
    try:
        store_ns = "spire"
        config = K8sConfig("test", node_attestation=True, audience="keyseal-server",
                           service_accounts=("spire/trust-keyseal-agent",), templates=True)
        node = cluster.node("node-rbac")
        agent = cluster.pod("spire", "trust-keyseal-agent-x", "node-rbac", "trust-keyseal-agent")
        custom = kubernetes.client.CustomObjectsApi(cluster.api_client())
        cluster.core().create_namespace({"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": "shop", "labels": {"team": "blue"}}})
        custom.create_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", {
            "apiVersion": "keyseal.dev/v1", "kind": "IdentityTemplate", "metadata": {"name": "rbac"},
            "spec": {"spiffeIDTemplate": "spiffe://example.org/{{ .PodMeta.Namespace }}/{{ .PodMeta.Name }}",
                     "namespaceSelector": {"matchLabels": {"team": "blue"}}}})
        web = cluster.pod("shop", "web", "node-rbac", "web")
        called: set[tuple[str, str, str]] = set()

        def server_calls(call: Any) -> None:  # only the server's own requests, not the test's set-up
            before = len(cluster.verbs())
            call()
            called.update(c[:3] for c in cluster.verbs()[before:])

        token = cluster.token(agent, "keyseal-server", node=node)
        server_calls(lambda: PsatAttestor(config, "example.org", cluster.api_client()).attest(token))
        reconciler = TemplateReconciler(config, "example.org", "trust", store_ns, cluster.api_client())
        server_calls(reconciler.reconcile)  # create, status
        custom.patch_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", "rbac",
                                           {"spec": {"x509SVIDTTL": 600}})
        server_calls(reconciler.reconcile)  # replace
        cluster.delete_pod("shop", web["metadata"]["name"])
        server_calls(reconciler.reconcile)  # delete
    finally:
        cluster.stop()
    assert sorted(called) == sorted(granted(manifests, "-k8s-identity", "-entry-writer"))


def test_the_default_template(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"agent": {"enabled": True}})
    (template,) = manifests["IdentityTemplate"]
    assert template["spec"]["spiffeIDTemplate"] == (
        "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}")
    off = render(chart, {"agent": {"enabled": True, "kubernetes": {"defaultTemplate": {"enabled": False}}}})
    assert "IdentityTemplate" not in off
    chosen = render(chart, {"agent": {"enabled": True, "kubernetes": {"defaultTemplate": {
        "namespaceSelector": {"matchLabels": {"keyseal.dev/identity": "on"}}}}}})
    assert chosen["IdentityTemplate"][0]["spec"]["namespaceSelector"] == {
        "matchLabels": {"keyseal.dev/identity": "on"}}
    assert "dnsNameTemplates" not in template["spec"]  # none by default
    names = ["{{ .PodSpec.ServiceAccountName }}.{{ .PodMeta.Namespace }}.svc"]
    named = render(chart, {"agent": {"enabled": True, "kubernetes": {"defaultTemplate": {"dnsNameTemplates": names}}}})
    assert named["IdentityTemplate"][0]["spec"]["dnsNameTemplates"] == names


def test_a_directory_store_gets_node_attestation_but_no_templates(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"agent": {"enabled": True}, "store": {"type": "directory"}, "replicaCount": 1,
                               "persistence": {"existingClaim": "data"}})
    server = server_config(manifests)
    assert server.kubernetes is not None and server.kubernetes.node_attestation
    assert not server.kubernetes.templates
    assert "IdentityTemplate" not in manifests
    assert {r for rule in rules(manifests, "-k8s-identity") for r in rule["resources"]} == \
        {"tokenreviews", "pods", "nodes"}
    assert granted(manifests, "-k8s-identity") == {("create", "authentication.k8s.io", "tokenreviews"),
                                                   ("get", "", "pods"), ("get", "", "nodes")}  # attestation only


def test_join_tokens_remain_for_agents_outside_kubernetes_identity(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j", "kubernetes": {"enabled": False}}})
    pod, config = agent_parts(manifests)
    assert "k8sPSAT" not in config and "k8s" not in config and "serviceAccountName" not in pod
    assert "ClusterRole" not in manifests and server_config(manifests).kubernetes is None
    with pytest.raises(helm_python.HelmError, match="joinTokenSecret is required"):
        chart.render({"agent": {"enabled": True, "kubernetes": {"enabled": False}}}, name="trust", namespace="spire")


@pytest.mark.parametrize(("kubernetes", "where"), [
    ({"cluster": "Prod"}, "/agent/kubernetes/cluster"),
    ({"tokenExpirationSeconds": 60}, "/agent/kubernetes/tokenExpirationSeconds"),
    ({"kubeletPort": 0}, "/agent/kubernetes/kubeletPort"),
    ({"kubeletCA": {"configMap": "Bad_Name"}}, "/agent/kubernetes/kubeletCA/configMap"),
    ({"podListCacheTTL": "soon"}, "/agent/kubernetes/podListCacheTTL"),
    ({"defaultTemplate": {"spiffeIDTemplate": "ns/{{ .PodMeta.Namespace }}"}},
     "/agent/kubernetes/defaultTemplate/spiffeIDTemplate"),
    ({"defaultTemplate": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}}},
     "/agent/kubernetes/defaultTemplate/podSelector/matchExpressions/0/operator"),
    ({"audiences": ["x"]}, "/agent/kubernetes"),
    ({"defaultTemplate": {"dnsNameTemplates": ["*.{{ .PodMeta.Namespace }}.svc"]}},
     "/agent/kubernetes/defaultTemplate/dnsNameTemplates/0"),
    ({"defaultTemplate": {"dnsNameTemplates": "web.svc"}}, "/agent/kubernetes/defaultTemplate/dnsNameTemplates"),
])
def test_the_schema_refuses_bad_values(chart: helm_python.Chart, kubernetes: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=f"'{where}'"):
        chart.render({"agent": {"enabled": True, "kubernetes": kubernetes}}, name="trust", namespace="spire")
