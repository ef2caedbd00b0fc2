"""End to end (#17): the chart's values -> `keyseal server` and `keyseal agent` processes -> py-spiffe's X509Source in
a "pod" gets spiffe://<td>/ns/<namespace>/sa/<service account>, with no join token and no entry written by hand;
the pod is deleted -> its entry and its SVID go away.

The cluster is the emulated one of tests/harness/kube_identity.py (API server with TokenReview, and a kubelet on
TLS). What differs from a cluster, and only that: file paths (the projected tokens, the kubelet CA, the KEK, the
socket) point into the test's directory; the servers listen on 127.0.0.1; and the agent reads cgroup files from a
proc root the test writes (k8s.procRoot), since this machine runs no pod: the "pod" is a real process whose
pid the test maps to a container of a pod the kubelet lists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import kubernetes
import pytest
import yaml

from tests.harness.agent import socket_dir
from tests.harness.https_server import free_port
from tests.harness.kube_identity import API_AUDIENCE, Cluster, KubeletPeer
from tests.test_helm_chart import CHART

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))
TD = "example.org"
NAMESPACE = "spire"  # the release's
NODE = "node-1"

POD = """
import sys, time
from spiffe import WorkloadApiClient, X509Source
endpoint = sys.argv[1]
sys.stdin.readline()  # the test has written this pid's cgroup file
with X509Source(socket_path=endpoint, timeout_in_seconds=30) as source:
    print("SOURCE", source.svid.spiffe_id, flush=True)
for line in sys.stdin:  # "fetch": a fresh Workload API call
    try:
        with WorkloadApiClient(endpoint, default_timeout=10) as client:
            print("ID", client.fetch_x509_svid().spiffe_id, flush=True)
    except Exception as exc:
        print("ERROR", type(exc).__name__, str(exc).replace(chr(10), " ")[:200], flush=True)
"""


def rendered(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    chart = helm_python.Chart.load(str(CHART))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path, text in chart.render(values, name="trust", namespace=NAMESPACE).items():
        if not path.endswith("NOTES.txt"):
            for document in yaml.safe_load_all(text):
                if document:
                    by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def wait(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


class Processes:
    def __init__(self) -> None:
        self.running: list[tuple[subprocess.Popen[Any], Path | None]] = []

    def start(self, args: list[str], log: Path | None, env: dict[str, str], **options: Any) -> subprocess.Popen[Any]:
        out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE, env=env,
                                   start_new_session=True, **options)
        self.running.append((process, log))
        return process

    def stop(self) -> None:
        for process, _ in reversed(self.running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate(timeout=20)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for _, log in self.running if log)


@pytest.fixture
def processes() -> Iterator[Processes]:
    running = Processes()
    yield running
    running.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    api = Cluster().start()
    yield api
    api.stop()


def test_a_pod_gets_its_identity_from_its_namespace_and_service_account(
        cluster: Cluster, processes: Processes, tmp_path: Path) -> None:
    kubelet = KubeletPeer(cluster, NODE, tmp_path / "kubelet").start()
    sockets = socket_dir()
    try:
        run(cluster, kubelet, processes, tmp_path, sockets)
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop()
        kubelet.stop()
        shutil.rmtree(sockets, ignore_errors=True)


@dataclass
class Launched:
    """The server and agent processes the chart's values configured, and what the test needs of them."""

    port: int
    sock: Path
    node: dict[str, Any]
    agent_pod: dict[str, Any]
    psat_audience: str
    agent: subprocess.Popen[Any]
    custom: Any


def launch(cluster: Cluster, kubelet: KubeletPeer, processes: Processes, tmp_path: Path, sockets: Path,
           **values: Any) -> Launched:
    """`helm install --set agent.enabled=true` (plus faster intervals for the test, and `values`): the cluster's
    node and agent pod, the keyseal server and agent processes, the agent joined with its projected token."""
    # -- the chart ---------------------------------------------------------------------------------------------
    manifests = rendered({"trustDomain": TD, "agent": {"enabled": True, "syncInterval": "1s", "kubernetes": {
        "kubeletPort": kubelet.port, "templateInterval": "1s"}}, **values})
    (server_map,) = [d for d in manifests["ConfigMap"] if d["metadata"]["name"] == "trust-keyseal"]
    (agent_map,) = [d for d in manifests["ConfigMap"] if d["metadata"]["name"] == "trust-keyseal-agent"]
    server_config = yaml.safe_load(server_map["data"]["config.yaml"])
    agent_config = yaml.safe_load(agent_map["data"]["agent.yaml"])
    (daemonset,) = manifests["DaemonSet"]
    agent_account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    projected = next(v for v in daemonset["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == "service-account")["projected"]["sources"]
    psat_audience = projected[0]["serviceAccountToken"]["audience"]

    # -- the cluster: a node, the agent's pod on it, and what `helm install` applied ----------------------------
    node = cluster.node(NODE, labels={"kubernetes.io/os": "linux"})
    agent_pod = cluster.pod(NAMESPACE, "trust-keyseal-agent-x7k2p", NODE, agent_account)
    custom = kubernetes.client.CustomObjectsApi(cluster.api_client())
    for template in manifests["IdentityTemplate"]:
        custom.create_cluster_custom_object("keyseal.dev", "v1", "identitytemplates", template)

    # -- keyseal server ------------------------------------------------------------------------------------------
    port = free_port()
    server_config["keyWrapping"]["local"]["kekFile"] = str(tmp_path / "server-kek")
    server_config["store"]["kubernetes"]["apiServer"] = cluster.url
    server_config["server"]["listen"] = f"127.0.0.1:{port}"
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(server_config))
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "HOME": str(tmp_path)}  # no kubeconfig: the apiServer
    server = processes.start([KEYSEAL, "server", "--config", str(tmp_path / "server.yaml")], tmp_path / "server.log",
                             env)
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE

    def bundle() -> bytes | None:
        assert server.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/bundle", context=insecure, timeout=5) as answer:
                return bytes(answer.read())
        except OSError:
            return None

    (tmp_path / "bundle.json").write_bytes(wait(bundle, "the server serves its bundle"))

    # -- keyseal agent, with the DaemonSet's projected tokens -------------------------------------------------
    (tmp_path / "psat").write_text(cluster.token(agent_pod, psat_audience, node=node))
    (tmp_path / "kubelet-token").write_text(cluster.token(agent_pod, API_AUDIENCE, node=node))
    sock = sockets / "agent.sock"
    agent_config.update({"serverURL": f"https://127.0.0.1:{port}", "trustBundleFile": str(tmp_path / "bundle.json"),
                         "socketPath": str(sock), "stateDir": str(tmp_path / "agent-state")})
    agent_config.pop("stateKekFile")
    agent_config["k8sPSAT"]["tokenFile"] = str(tmp_path / "psat")
    agent_config["k8s"].update({"tokenFile": str(tmp_path / "kubelet-token"),
                                "kubeletCAFile": str(kubelet.tls.ca_pem), "procRoot": str(tmp_path / "proc")})
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(agent_config))
    agent = processes.start([KEYSEAL, "agent", "--config", str(tmp_path / "agent.yaml")], tmp_path / "agent.log",
                            {**env, "NODE_NAME": NODE, "NODE_IP": "127.0.0.1"})
    wait(lambda: sock.exists() or agent.poll() is not None, "the agent opens its socket")
    assert agent.poll() is None, "the agent exited"
    agent_log = (tmp_path / "agent.log").read_text()
    assert f"agent SVID spiffe://{TD}/keyseal/agent/k8s_psat/cluster/{node['metadata']['uid']}" in agent_log
    return Launched(port, sock, node, agent_pod, psat_audience, agent, custom)


def run(cluster: Cluster, kubelet: KubeletPeer, processes: Processes, tmp_path: Path, sockets: Path) -> None:
    launched = launch(cluster, kubelet, processes, tmp_path, sockets)
    sock, custom, agent_pod = launched.sock, launched.custom, launched.agent_pod
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "HOME": str(tmp_path)}

    # -- a pod of namespace shop, service account web, on the node -------------------------------------------------
    container_id = "5f" * 32
    pod = cluster.pod("shop", "web-6d4cf56db6-8kq2x", NODE, "web", labels={"app": "web"},
                      containers=[("web", "registry.example/web:1.4", f"containerd://{container_id}")])
    workload = processes.start([sys.executable, "-c", POD, f"unix:{sock}"], None, env, stdin=subprocess.PIPE,
                               text=True, cwd="/")
    cgroup = tmp_path / "proc" / str(workload.pid) / "cgroup"
    cgroup.parent.mkdir(parents=True)
    uid = pod["metadata"]["uid"].replace("-", "_")
    cgroup.write_text(f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/"
                      f"cri-containerd-{container_id}.scope\n")
    assert workload.stdin is not None and workload.stdout is not None
    workload.stdin.write("go\n")
    workload.stdin.flush()
    line = workload.stdout.readline().strip()
    assert line == f"SOURCE spiffe://{TD}/ns/shop/sa/web", line

    def managed() -> list[dict[str, Any]]:
        listed = custom.list_namespaced_custom_object("keyseal.dev", "v1", NAMESPACE, "registrationentries")
        return [e for e in listed["items"]
                if (e["metadata"].get("labels") or {}).get("keyseal.dev/managed-by") == "identity-templates"]

    (entry,) = [e for e in managed() if f"k8s:pod-uid:{pod['metadata']['uid']}" in e["spec"]["selectors"]]
    assert entry["spec"]["spiffeID"] == f"spiffe://{TD}/ns/shop/sa/web"

    # -- the pod is deleted: its entry goes, and so does its SVID ----------------------------------------------
    cluster.delete_pod("shop", pod["metadata"]["name"])
    wait(lambda: not [e for e in managed() if f"k8s:pod-uid:{pod['metadata']['uid']}" in e["spec"]["selectors"]],
         "the deleted pod's entry goes away", 20)

    def refused() -> str | None:
        workload.stdin.write("fetch\n")  # type: ignore[union-attr]
        workload.stdin.flush()  # type: ignore[union-attr]
        answer = str(workload.stdout.readline().strip())  # type: ignore[union-attr]
        return answer if answer.startswith("ERROR") else None

    answer = wait(refused, "the SVID goes away", 20)
    assert "no identity issued" in answer, answer
    # The agent's own pod, whose entry the default template also made, is untouched by the deletion.
    assert [e for e in managed() if f"k8s:pod-uid:{agent_pod['metadata']['uid']}" in e["spec"]["selectors"]]
    assert json.loads((tmp_path / "bundle.json").read_text())["keys"]


def test_the_agent_renews_by_attesting_again_until_its_node_is_gone(cluster: Cluster, processes: Processes,
                                                                     tmp_path: Path) -> None:
    """The agent process renews its SVID with its projected token as the kubelet rotated it (the server asks the
    API server again); once its node is deleted, the server refuses the renewal and the agent says so."""
    kubelet = KubeletPeer(cluster, NODE, tmp_path / "kubelet").start()
    sockets = socket_dir()
    try:
        launched = launch(cluster, kubelet, processes, tmp_path, sockets, x509SVID={"ttl": "8s"})
        agent_log, server_log = tmp_path / "agent.log", tmp_path / "server.log"
        agent_id = f"spiffe://{TD}/keyseal/agent/k8s_psat/cluster/{launched.node['metadata']['uid']}"
        rotated = cluster.token(launched.agent_pod, launched.psat_audience, node=launched.node)
        (tmp_path / "psat.new").write_text(rotated)
        (tmp_path / "psat.new").rename(tmp_path / "psat")  # as the kubelet swaps a projected volume's file

        def renewed_with_rotated() -> bool:
            assert launched.agent.poll() is None, "the agent exited"
            reviewed = any(r["spec"].get("token") == rotated and r["status"].get("authenticated")
                           for r in list(cluster.cluster.reviews))
            return reviewed and agent_log.read_text().count(f"agent SVID {agent_id} valid until") >= 2

        wait(renewed_with_rotated, "the agent renews with the rotated token", 20)
        assert server_log.read_text().count(f"agent {agent_id} joined from") == 1  # renewed, not joined again

        cluster.core().delete_node(NODE)
        refusal = "the keyseal server refused to renew the agent SVID (re-attestation with the service account " \
                  "token failed)"
        wait(lambda: refusal in agent_log.read_text(), "the agent logs the refused renewal", 20)
        assert f"refused the renewal of k8s_psat agent {agent_id}" in server_log.read_text()
        assert f"node {NODE} of pod {NAMESPACE}/{launched.agent_pod['metadata']['name']} does not exist" \
            in server_log.read_text()
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop()
        kubelet.stop()
        shutil.rmtree(sockets, ignore_errors=True)
