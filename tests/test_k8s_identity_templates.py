"""IdentityTemplate resources (#17): registration entries kept in step with the pods a template selects, without
touching hand-written entries; status on the template."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import kubernetes
import pytest

from keyseal._internal.ca.k8s_config import K8sConfig
from keyseal._internal.ca.registry.kubernetes import KubeEntryStore, _Resources
from keyseal._internal.ca.registry.psat import agent_id_of
from keyseal._internal.ca.registry.templates import MANAGED_BY, TemplateError, TemplateReconciler, render_template
from tests.harness.kube_identity import Cluster

TD = "example.org"
PREFIX = "keyseal-example.org"  # the default store.recordPrefix of example.org
DEFAULT = "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    api = Cluster().start()
    yield api
    api.stop()


class World:
    """One test's store namespace, its templates and a reconciler over them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.store_ns = f"keyseal-{uuid.uuid4().hex[:6]}"
        self.tag = uuid.uuid4().hex[:6]  # keeps this test's pods and templates apart from other tests'
        self.custom = kubernetes.client.CustomObjectsApi(cluster.api_client())
        config = K8sConfig("test", templates=True, template_interval=timedelta(seconds=1))
        self.reconciler = TemplateReconciler(config, TD, PREFIX, self.store_ns, cluster.api_client())
        self.store = KubeEntryStore(_Resources(self.custom, self.store_ns, "registrationentries", cluster.url), TD,
                                    PREFIX)  # not watched: reads the API each time
        self.templates: list[str] = []
        self.node = cluster.node(f"node-{self.tag}")

    def template(self, spec: dict[str, Any], name: str | None = None) -> str:
        name = name or f"t-{self.tag}-{len(self.templates)}"
        selector = spec.setdefault("podSelector", {}).setdefault("matchLabels", {})
        selector["test"] = self.tag
        self.custom.create_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", {
            "apiVersion": "keyseal.dev/v1", "kind": "IdentityTemplate", "metadata": {"name": name}, "spec": spec})
        self.templates.append(name)
        return name

    def status(self, name: str) -> dict[str, Any]:
        obj = self.custom.get_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name)
        return dict(obj.get("status") or {})

    def pod(self, namespace: str, name: str, account: str = "web", labels: dict[str, str] | None = None,
            node: str | None = None) -> dict[str, Any]:
        return self.cluster.pod(namespace, name, node or self.node["metadata"]["name"], account,
                                labels={"test": self.tag, **(labels or {})})

    def entries(self) -> list[Any]:
        return self.store.entries()

    def cleanup(self) -> None:
        for name in self.templates:
            self.custom.delete_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name)


@pytest.fixture
def world(cluster: Cluster) -> Iterator[World]:
    world = World(cluster)
    yield world
    world.cleanup()


@pytest.mark.slow
def test_a_pod_gets_its_entry_and_loses_it_when_deleted(world: World) -> None:
    name = world.template({"spiffeIDTemplate": DEFAULT})
    pod = world.pod("shop", f"web-{world.tag}")
    world.reconciler.reconcile()
    (entry,) = world.entries()
    assert entry.spiffe_id == f"spiffe://{TD}/ns/shop/sa/web"
    assert entry.parent_id == agent_id_of(TD, "test", world.node["metadata"]["uid"])
    assert entry.selectors == ("k8s:ns:shop", f"k8s:pod-uid:{pod['metadata']['uid']}")
    assert world.status(name) == {"podsSelected": 1, "entries": 1, "error": "", "podsSkipped": 0, "podError": ""}
    world.reconciler.reconcile()  # nothing to change: nothing written
    assert len(world.entries()) == 1
    world.cluster.delete_pod("shop", pod["metadata"]["name"])
    world.reconciler.reconcile()
    assert world.entries() == []
    assert world.status(name)["podsSelected"] == 0


def test_hand_written_entries_are_never_touched(world: World) -> None:
    world.template({"spiffeIDTemplate": DEFAULT})
    parent = agent_id_of(TD, "test", world.node["metadata"]["uid"])
    by_hand = world.store.create(f"spiffe://{TD}/ns/shop/sa/web", parent, ("k8s:ns:shop", "k8s:sa:web"))
    # Even one that looks like a managed one but lacks the label.
    world.reconciler.reconcile()
    assert [e.entry_id for e in world.entries()] == [by_hand.entry_id]
    labels = world.custom.get_namespaced_custom_object("keyseal.dev", "v1", world.store_ns, "registrationentries",
                                                       f"{PREFIX}-entry-{by_hand.entry_id}")["metadata"]["labels"]
    assert MANAGED_BY not in labels


@pytest.mark.slow
def test_selectors_of_pods_and_namespaces(world: World) -> None:
    core = world.cluster.core()
    for namespace, team in ((f"a-{world.tag}", "blue"), (f"b-{world.tag}", "red")):
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": namespace, "labels": {"team": team}}})
    name = world.template({"spiffeIDTemplate": "spiffe://example.org/{{ .PodMeta.Namespace }}/{{ .PodMeta.Name }}",
                           "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                 "values": ["front"]}]},
                           "namespaceSelector": {"matchLabels": {"team": "blue"}}, "x509SVIDTTL": 600})
    world.pod(f"a-{world.tag}", "front-1", labels={"tier": "front"})
    world.pod(f"a-{world.tag}", "back-1", labels={"tier": "back"})
    world.pod(f"b-{world.tag}", "front-2", labels={"tier": "front"})
    world.reconciler.reconcile()
    (entry,) = world.entries()
    assert entry.spiffe_id == f"spiffe://{TD}/a-{world.tag}/front-1" and entry.x509_ttl == 600
    assert world.status(name)["podsSelected"] == 1


def test_a_pod_not_on_a_known_node_gets_no_entry(world: World) -> None:
    world.template({"spiffeIDTemplate": DEFAULT})
    world.pod("shop", f"pending-{world.tag}", node="no-such-node")
    world.reconciler.reconcile()
    assert world.entries() == []


@pytest.mark.slow
@pytest.mark.parametrize(("template", "error"), [
    ("spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Labels }}", "unknown template field .PodMeta.Labels"),
    ("spiffe://other.org/ns/{{ .PodMeta.Namespace }}", "not a workload SPIFFE ID of trust domain"),
    ("spiffe://{{ .TrustDomain }}/keyseal/agent/{{ .PodMeta.Name }}", "not a workload SPIFFE ID"),
    ("spiffe://{{ .TrustDomain }}/{{ printf \"%s\" .PodMeta.Name }}", "only {{ .Field }} is supported"),
    ("not a spiffe id", "gives no SPIFFE ID"),
])
def test_template_errors_show_in_the_status(world: World, template: str, error: str) -> None:
    name = world.template({"spiffeIDTemplate": template})
    world.pod("shop", f"web-{world.tag}")
    world.reconciler.reconcile()
    assert world.entries() == []
    status = world.status(name)
    assert error in status["error"] and status["podsSelected"] == 0


@pytest.mark.slow
def test_a_pod_the_template_cannot_name_is_skipped_not_the_whole_template(world: World) -> None:
    """A pod named `keyseal` renders the reserved /keyseal path: that pod gets no entry, the others keep theirs."""
    name = world.template({"spiffeIDTemplate": "spiffe://{{ .TrustDomain }}/{{ .PodMeta.Name }}/{{ .PodMeta.UID }}"})
    world.pod("shop", "keyseal")  # listed first
    web, db = world.pod("shop", f"web-{world.tag}"), world.pod("shop", f"db-{world.tag}")
    world.reconciler.reconcile()
    assert sorted(e.spiffe_id for e in world.entries()) == sorted(
        f"spiffe://{TD}/{p['metadata']['name']}/{p['metadata']['uid']}" for p in (web, db))
    status = world.status(name)
    assert (status["podsSelected"], status["entries"], status["error"], status["podsSkipped"]) == (2, 2, "", 1)
    assert status["podError"].startswith("shop/keyseal: ") and "not a workload SPIFFE ID" in status["podError"]
    world.reconciler.reconcile()  # and the next pass deletes nothing
    assert len(world.entries()) == 2


@pytest.mark.slow
def test_mirror_pods_get_no_entry_unless_the_template_says_so(world: World) -> None:
    """A kubelet makes mirror pods of its static pods in any namespace: by default they are not workloads."""
    name = world.template({"spiffeIDTemplate": DEFAULT})
    pod = world.pod(f"kube-system-{world.tag}", f"static-{world.tag}", account="default")
    world.cluster.core().patch_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], {
        "metadata": {"annotations": {"kubernetes.io/config.mirror": "0123abcd",
                                     "kubernetes.io/config.source": "file"}}})
    world.reconciler.reconcile()
    assert world.entries() == []
    assert world.status(name)["podsSelected"] == 0
    world.custom.patch_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name,
                                             {"spec": {"includeMirrorPods": True}})
    world.reconciler.reconcile()
    (entry,) = world.entries()
    assert entry.spiffe_id == f"spiffe://{TD}/ns/kube-system-{world.tag}/sa/default"


@pytest.mark.slow
def test_a_ttl_change_replaces_the_entry(world: World) -> None:
    name = world.template({"spiffeIDTemplate": DEFAULT})
    world.pod("shop", f"web-{world.tag}")
    world.reconciler.reconcile()
    assert world.entries()[0].x509_ttl == 0
    obj = world.custom.get_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name)
    obj["spec"]["x509SVIDTTL"] = 900
    world.custom.replace_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name, obj)
    world.reconciler.reconcile()
    (entry,) = world.entries()
    assert entry.x509_ttl == 900


@pytest.mark.slow
def test_two_replicas_reconcile_to_the_same_entries(world: World, cluster: Cluster) -> None:
    world.template({"spiffeIDTemplate": DEFAULT})
    world.template({"spiffeIDTemplate": DEFAULT})  # two templates giving the same entry: one entry
    for index in range(3):
        world.pod("shop", f"web-{world.tag}-{index}")
    other = TemplateReconciler(world.reconciler.config, TD, PREFIX, world.store_ns, cluster.api_client())
    world.reconciler.reconcile()
    other.reconcile()
    assert len(world.entries()) == 3


def test_render_template() -> None:
    fields = {"TrustDomain": TD, "PodMeta.Name": "a/b"}
    with pytest.raises(TemplateError, match="not a SPIFFE ID path segment"):
        render_template("spiffe://{{ .TrustDomain }}/{{ .PodMeta.Name }}", fields)
    assert render_template("spiffe://{{.TrustDomain}}/x", fields) == f"spiffe://{TD}/x"


@pytest.mark.slow
def test_the_reconciler_runs_in_the_server(cluster: Cluster, tmp_path: Any) -> None:
    """kubernetes.identityTemplates.enabled starts it with the server; a new pod gets its entry within seconds."""
    import time

    from keyseal._internal.ca.config import parse_config
    from keyseal._internal.ca.server import CaServer
    from tests.harness.ca import base_config

    world = World(cluster)
    try:
        world.template({"spiffeIDTemplate": DEFAULT})
        config = parse_config(base_config(
            tmp_path, store={"type": "kubernetes", "kubernetes": {"namespace": world.store_ns}},
            kubernetes={"cluster": "test", "identityTemplates": {"enabled": True, "interval": "1s"}}))
        server = CaServer(config, rotation_thread=False, kube_api_client=cluster.api_client())
        server.start()
        server.start_background()
        try:
            world.pod("shop", f"web-{world.tag}")
            deadline = time.monotonic() + 10
            while not world.entries() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(world.entries()) == 1
        finally:
            server.shutdown()
    finally:
        world.cleanup()


def test_templates_need_the_kubernetes_store(tmp_path: Any) -> None:
    from keyseal._internal.ca.config import parse_config
    from keyseal.errors import UsageError
    from tests.harness.ca import base_config

    with pytest.raises(UsageError, match=r"needs store\.type kubernetes"):
        parse_config(base_config(tmp_path, kubernetes={"cluster": "c", "identityTemplates": {"enabled": True}}))


@pytest.mark.parametrize("selector", [
    "k8s:ns:shop", "k8s:sa:web", "k8s:pod-uid:4c2c9a5e-1f7d-4b63-9a52-0d3c8e7f1a2b", "k8s:pod-name:web-1",
    "k8s:node-name:ip-10-0-0-7.ec2.internal", "k8s:container-name:nginx", "k8s:container-image:nginx:1.27@sha256:ab",
    "k8s:pod-label:app.kubernetes.io/name:web", "k8s:pod-label:empty:", "unix:uid:1000",
    "k8s:namespace:shop", "k8s:ns:", "k8s:ns:a/b", "k8s:pod-label:app", "k8s:container-image:a b", "k8s:x",
])
def test_the_entry_crd_takes_the_selectors_keyseal_takes(selector: str) -> None:
    """The RegistrationEntry CRD's pattern and keyseal's own check agree (an API server must store what the
    reconciler writes, and nothing keyseal would skip)."""
    import re
    from pathlib import Path

    import yaml

    from keyseal._internal.ca.registry.entries import check_selector
    from keyseal.errors import UsageError

    crd = yaml.safe_load((Path(__file__).parent.parent / "deploy" / "crds" /
                          "registrationentries.keyseal.dev.yaml").read_text())
    pattern = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "selectors"]["items"]["pattern"]
    by_crd = re.search(pattern, selector) is not None
    try:
        check_selector(selector)
        by_keyseal = True
    except UsageError:
        by_keyseal = False
    assert by_crd == by_keyseal


@pytest.mark.slow
def test_finished_pods_get_no_entry(world: World) -> None:
    """A pod that has run to completion (Succeeded or Failed) has no container left to attest."""
    world.template({"spiffeIDTemplate": DEFAULT})
    pod = world.pod("shop", f"job-{world.tag}")
    world.reconciler.reconcile()
    assert len(world.entries()) == 1
    pod["status"]["phase"] = "Succeeded"
    world.cluster.core().replace_namespaced_pod(pod["metadata"]["name"], "shop", pod)
    world.reconciler.reconcile()
    assert world.entries() == []


@pytest.mark.slow
def test_a_long_template_name_makes_a_valid_label(world: World) -> None:
    """Label values are at most 63 characters and end alphanumeric (the API server refuses others with 422)."""
    import re

    name = world.template({"spiffeIDTemplate": DEFAULT}, name=f"t-{world.tag}-" + "a" * 53 + ".b" + "c" * 40)
    world.pod("shop", f"web-{world.tag}")
    world.reconciler.reconcile()
    (obj,) = world.custom.list_namespaced_custom_object("keyseal.dev", "v1", world.store_ns,
                                                        "registrationentries")["items"]
    label = obj["metadata"]["labels"]["keyseal.dev/template"]
    assert re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]", label), label
    assert name.startswith(label)


SVC_DNS = "{{ .PodSpec.ServiceAccountName }}.{{ .PodMeta.Namespace }}.svc"


def test_a_pods_entry_gets_the_rendered_dns_names(world: World) -> None:
    name = world.template({"spiffeIDTemplate": DEFAULT,
                           "dnsNameTemplates": [SVC_DNS, "{{ .PodMeta.Name }}.pods.{{ .ClusterName }}", SVC_DNS]})
    pod = world.pod("shop", f"web-{world.tag}")
    world.reconciler.reconcile()
    (entry,) = world.entries()
    assert entry.dns_names == ("web.shop.svc", f"{pod['metadata']['name']}.pods.test")  # each once, in order
    assert world.status(name)["podsSelected"] == 1
    obj = world.custom.get_namespaced_custom_object("keyseal.dev", "v1", world.store_ns, "registrationentries",
                                                    f"{PREFIX}-entry-{entry.entry_id}")
    assert obj["spec"]["dnsNames"] == list(entry.dns_names)
    # The names change with the template: the same entry (same meaning) is replaced with the new names.
    template = world.custom.get_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name)
    template["spec"]["dnsNameTemplates"] = [SVC_DNS.replace(".svc", ".svc.cluster.local")]
    world.custom.replace_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", name, template)
    world.reconciler.reconcile()
    (changed,) = world.entries()
    assert changed.entry_id == entry.entry_id and changed.dns_names == ("web.shop.svc.cluster.local",)


def test_a_pod_whose_values_make_an_invalid_dns_name_is_skipped(world: World) -> None:
    """A pod name is a DNS subdomain whose parts may be longer than a DNS label (63): that pod alone is skipped,
    with the reason in the template's status."""
    name = world.template({"spiffeIDTemplate": DEFAULT, "dnsNameTemplates": ["{{ .PodMeta.Name }}.pods.local"]})
    long_name = f"w{world.tag}" + "x" * 64
    world.pod("shop", long_name)
    web = world.pod("shop", f"web-{world.tag}", account="db")
    world.reconciler.reconcile()
    (entry,) = world.entries()
    assert entry.dns_names == (f"{web['metadata']['name']}.pods.local",)
    status = world.status(name)
    assert (status["podsSelected"], status["error"], status["podsSkipped"]) == (1, "", 1)
    assert status["podError"].startswith(f"shop/{long_name}: spec.dnsNameTemplates gives invalid DNS name"), status


@pytest.mark.parametrize(("templates", "error"), [
    (["*.{{ .PodMeta.Namespace }}.svc"], "wildcards are not allowed"),
    (["{{ .PodMeta.Labels }}.svc"], "unknown template field .PodMeta.Labels"),
    (["{{ .PodMeta.Name }}_{{ .PodMeta.Namespace }}"], "RFC 1123"),
    ("web.svc", "must be a list"),
    (["{{ .PodMeta.Name | lower }}.svc"], "only {{ .Field }} is supported in spec.dnsNameTemplates[0]"),
])
def test_dns_name_template_errors_show_in_the_status(world: World, templates: Any, error: str) -> None:
    name = world.template({"spiffeIDTemplate": DEFAULT, "dnsNameTemplates": templates})
    world.pod("shop", f"web-{world.tag}")
    world.reconciler.reconcile()
    assert world.entries() == []
    status = world.status(name)
    assert error in status["error"] and status["podsSelected"] == 0, status
