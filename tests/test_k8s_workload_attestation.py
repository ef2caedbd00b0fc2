"""Workload attestation from the caller's pod (#17): the cgroup layouts the runtimes write, and the kubelet's pod
list (an emulated kubelet on TLS with bearer tokens, tests/harness/kube_identity.py)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keyseal._internal.agent.attestation import PeerCredentials, attest
from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.agent.k8s import ContainerRef, K8sAttestor, K8sSettings, parse_cgroup
from keyseal.errors import UsageError
from tests.harness.kube_identity import API_AUDIENCE, Cluster, KubeletPeer

POD_UID = "4c2c9a5e-1f7d-4b63-9a52-0d3c8e7f1a2b"
CID = "a" * 56 + "0123abcd"
REF = ContainerRef(POD_UID, CID)
UNDERSCORED = POD_UID.replace("-", "_")

# Layouts as the runtimes document and write them (kubelet cgroup drivers "cgroupfs" and "systemd").
LAYOUTS = {
    # cgroup v1, cgroupfs driver, containerd or docker: one line per hierarchy, pod<uid>/<container id>
    "v1-cgroupfs": "\n".join(f"{n}:{c}:/kubepods/burstable/pod{POD_UID}/{CID}" for n, c in
                             ((12, "memory"), (11, "cpu,cpuacct"), (10, "pids"), (1, "name=systemd"))),
    # cgroup v1, cgroupfs driver, Guaranteed QoS: no QoS level in the path
    "v1-cgroupfs-guaranteed": f"4:memory:/kubepods/pod{POD_UID}/{CID}\n3:pids:/kubepods/pod{POD_UID}/{CID}",
    # cgroup v1, systemd driver, docker (dockershim / cri-dockerd)
    "v1-systemd-docker": "\n".join(
        f"{n}:{c}:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice/"
        f"docker-{CID}.scope" for n, c in ((9, "memory"), (1, "name=systemd"))),
    # cgroup v1, systemd driver, CRI-O
    "v1-systemd-crio": f"5:memory:/kubepods.slice/kubepods-pod{UNDERSCORED}.slice/crio-{CID}.scope\n"
                       f"1:name=systemd:/kubepods.slice/kubepods-pod{UNDERSCORED}.slice/crio-{CID}.scope",
    # cgroup v2, systemd driver, containerd: one line "0::"
    "v2-systemd-containerd": f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UNDERSCORED}"
                             f".slice/cri-containerd-{CID}.scope",
    # cgroup v2, systemd driver, CRI-O
    "v2-systemd-crio": f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice/"
                       f"crio-{CID}.scope",
    # cgroup v2, cgroupfs driver (k3s, containerd)
    "v2-cgroupfs": f"0::/kubepods/besteffort/pod{POD_UID}/{CID}",
    # kind: the node is itself a container, the kubelet's cgroups under /kubelet.slice
    "v2-kind": f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
               f"kubelet-kubepods-besteffort-pod{UNDERSCORED}.slice/cri-containerd-{CID}.scope",
    # the agent in a cgroup namespace of its own sees other pods' cgroups relative to its own
    "v2-cgroupns": f"0::/../../kubepods-besteffort-pod{UNDERSCORED}.slice/cri-containerd-{CID}.scope",
    # cgroup v1 with controllers the runtime does not manage left at the root, and hybrid mode's unified line
    "v1-unmanaged-controllers": f"13:rdma:/\n12:net_cls,net_prio:/\n4:memory:/kubepods/pod{POD_UID}/{CID}\n"
                                f"1:name=systemd:/kubepods/pod{POD_UID}/{CID}\n0::/system.slice/containerd.service",
    # ... seen from the agent's own cgroup namespace (an unmanaged controller at the host's root is above it)
    "v1-cgroupns-unmanaged": f"13:rdma:/../../..\n4:memory:/../../pod{POD_UID}/{CID}\n"
                             f"1:name=systemd:/../../pod{POD_UID}/{CID}",
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cgroup_layouts(layout: str) -> None:
    assert parse_cgroup(LAYOUTS[layout]) == REF


@pytest.mark.parametrize("text", [
    "0::/user.slice/user-1000.slice/session-2.scope",  # not in a pod
    "0::/system.slice/containerd.service",
    f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UNDERSCORED}.slice",  # the pod itself
    f"0::/kubepods.slice/kubepods-pod{UNDERSCORED}.slice/crio-conmon-{CID}.scope",  # CRI-O's monitor
    f"0::/kubepods/pod{POD_UID}/{CID}/nested",  # a cgroup a container made below its own
    f"0::/kubepods/pod{POD_UID}/{CID}/pod{uuid.uuid4()}/{'b' * 64}",  # ... dressed as another pod
    f"4:memory:/kubepods/pod{POD_UID}/{CID}\n3:pids:/kubepods/pod{POD_UID}/{'b' * 64}",  # lines disagree
    f"0::/kubepods/pod{POD_UID}/not-a-container-id",
    # a node user's delegated systemd subtree (cgroup v2): the pod segment is not under the kubelet's root
    f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{POD_UID}/{CID}",
    f"0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod{POD_UID}/{CID}",
    f"0::/../../../user.slice/user-1000.slice/user@1000.service/pod{POD_UID}/{CID}",  # seen from a cgroupns
    f"0::/system.slice/pod{POD_UID}/{CID}",  # a pod segment not under kubepods
    # cgroup v1 hybrid: only the (user-delegated) name=systemd line spoofed, the controllers not in a pod
    f"12:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/user@1000.service/"
    f"pod{POD_UID}/cri-containerd-{CID}.scope\n0::/user.slice/user-1000.slice/session-3.scope",
    f"12:cpu,cpuacct:/user.slice\n1:name=systemd:/kubepods/pod{POD_UID}/{CID}",  # even a well-formed one
    f"1:name=systemd:/kubepods/pod{POD_UID}/{CID}",  # no controller names the pod
    "",
])
def test_cgroups_that_name_no_container(text: str) -> None:
    assert parse_cgroup(text) is None


# -- the kubelet's pod list --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    api = Cluster().start()
    yield api
    api.stop()


@pytest.fixture
def node(cluster: Cluster) -> str:
    name = f"node-{uuid.uuid4().hex[:6]}"
    cluster.node(name)
    return name


@pytest.fixture
def kubelet(cluster: Cluster, node: str, tmp_path: Path) -> Iterator[KubeletPeer]:
    peer = KubeletPeer(cluster, node, tmp_path / "kubelet").start()
    yield peer
    peer.stop()


@pytest.fixture
def process() -> Iterator[subprocess.Popen[bytes]]:
    """A real process playing a container's: its pid and start time are real, its cgroup file is the test's."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait(timeout=10)


def settings(cluster: Cluster, kubelet: KubeletPeer, node: str, root: Path, token: str | None = None,
             ca: Path | None = None) -> K8sSettings:
    token_file = root / "token"
    token_file.write_text(token if token is not None else cluster.token(None, API_AUDIENCE, namespace="keyseal",
                                                                        service_account="keyseal-agent"))
    return K8sSettings(node_name=node, kubelet_url=kubelet.url, token_file=token_file,
                       kubelet_ca_file=ca or kubelet.tls.ca_pem, proc_root=root / "proc", cache_seconds=30)


def in_container(root: Path, pid: int, pod: dict[str, Any], container: int = 0) -> None:
    """Write the pid's cgroup file under the proc root: containerd on cgroup v2 with the systemd driver."""
    cid = pod["status"]["containerStatuses"][container]["containerID"].partition("://")[2]
    uid = pod["metadata"]["uid"].replace("-", "_")
    (root / "proc" / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / "proc" / str(pid) / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{cid}.scope\n")


def peer_of(process: subprocess.Popen[bytes]) -> PeerCredentials:
    return attest(process.pid, 1000, 1000)


def test_selectors_of_a_pod(cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path,
                            process: subprocess.Popen[bytes]) -> None:
    pod = cluster.pod("shop", "web-1", node, "web", labels={"app": "web", "tier": "front"},
                      containers=[("nginx", "nginx:1.27", f"containerd://{'c' * 64}"),
                                  ("sidecar", "envoy:1.31", f"containerd://{'d' * 64}")])
    in_container(tmp_path, process.pid, pod, container=1)
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path))
    selectors = attestor.selectors(peer_of(process))
    assert selectors == {"k8s:ns:shop", "k8s:sa:web", "k8s:pod-name:web-1", f"k8s:pod-uid:{pod['metadata']['uid']}",
                         f"k8s:node-name:{node}", "k8s:container-name:sidecar", "k8s:container-image:envoy:1.31",
                         "k8s:pod-label:app:web", "k8s:pod-label:tier:front"}
    # The pod list is cached: a second call does not ask the kubelet again.
    assert attestor.selectors(peer_of(process)) == selectors
    assert kubelet.requests == 1


def test_a_node_user_in_a_cgroup_dressed_as_a_pod_gets_no_k8s_selectors(
        cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path, process: subprocess.Popen[bytes]) -> None:
    """A node user's process (outside any pod) moved into `pod<victim uid>/<victim container id>` below its own
    delegated systemd subtree: both IDs are in the victim's world-readable /proc/<pid>/cgroup."""
    victim = cluster.pod("payments", "api", node, "payments-api")
    uid, cid = victim["metadata"]["uid"], victim["status"]["containerStatuses"][0]["containerID"].partition("://")[2]
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path))
    (tmp_path / "proc" / str(process.pid)).mkdir(parents=True)
    cgroup = tmp_path / "proc" / str(process.pid) / "cgroup"
    for text in (f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{uid}/{cid}\n",
                 f"12:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/user@1000.service/"
                 f"pod{uid}/cri-containerd-{cid}.scope\n0::/user.slice/user-1000.slice/session-3.scope\n"):
        cgroup.write_text(text)
        assert attestor.selectors(peer_of(process)) == frozenset()
    in_container(tmp_path, process.pid, victim)  # the same process in the victim's real cgroup: the control
    assert "k8s:ns:payments" in attestor.selectors(peer_of(process))


@pytest.mark.slow
def test_a_container_the_kubelet_does_not_list_yet_gets_no_k8s_selectors(
        cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path, process: subprocess.Popen[bytes]) -> None:
    other = cluster.pod("shop", "other", node, "other")
    failures: list[str] = []
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path), on_failure=failures.append)
    assert attestor.selectors(peer_of(process)) == frozenset()  # no cgroup file: not in a pod
    assert failures == []  # not a failure: a process outside pods
    starting = {"metadata": {"uid": str(uuid.uuid4())},
                "status": {"containerStatuses": [{"containerID": f"containerd://{'e' * 64}"}]}}
    in_container(tmp_path, process.pid, starting)
    assert attestor.selectors(peer_of(process)) == frozenset()
    assert failures == ["k8s_not_listed"]
    assert kubelet.requests == 1  # a miss asks the kubelet again only after the minimum refresh (0.5s)
    time.sleep(0.6)
    assert attestor.selectors(peer_of(process)) == frozenset()
    assert kubelet.requests == 2
    # Its container ID with another pod's UID (or the reverse) is never that other pod.
    mixed = {"metadata": {"uid": other["metadata"]["uid"]},
             "status": {"containerStatuses": [{"containerID": f"containerd://{'e' * 64}"}]}}
    in_container(tmp_path, process.pid, mixed)
    assert attestor.selectors(peer_of(process)) == frozenset()
    # Once the kubelet lists it (after the cache's minimum refresh), it gets its pod's selectors.
    pod = cluster.pod("shop", "late", node, "late", containers=[("app", "app:2", f"containerd://{'e' * 64}")])
    in_container(tmp_path, process.pid, pod)
    time.sleep(0.6)
    assert "k8s:pod-name:late" in attestor.selectors(peer_of(process))
    # A cgroup naming another pod's UID with this container's ID is neither pod.
    in_container(tmp_path, process.pid, {**pod, "metadata": {"uid": other["metadata"]["uid"]}})
    assert attestor.selectors(peer_of(process)) == frozenset()


def test_a_reused_pid_gets_no_k8s_selectors(cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path,
                                            process: subprocess.Popen[bytes]) -> None:
    pod = cluster.pod("shop", "web-2", node, "web")
    in_container(tmp_path, process.pid, pod)
    peer = peer_of(process)
    assert peer.start is not None
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path))
    assert "k8s:pod-name:web-2" in attestor.selectors(peer)
    reused = PeerCredentials(peer.pid, peer.uid, peer.gid, peer.start - 1)  # another process had this pid
    assert attestor.selectors(reused) == frozenset()


def test_a_pod_of_another_node_gets_no_k8s_selectors(cluster: Cluster, kubelet: KubeletPeer, node: str,
                                                     tmp_path: Path, process: subprocess.Popen[bytes]) -> None:
    pod = cluster.pod("shop", "web-3", node, "web")
    in_container(tmp_path, process.pid, pod)
    attestor = K8sAttestor(settings(cluster, kubelet, "some-other-node", tmp_path))
    assert attestor.selectors(peer_of(process)) == frozenset()


def test_the_kubelet_refuses_a_bad_token(cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path,
                                         process: subprocess.Popen[bytes]) -> None:
    pod = cluster.pod("shop", "web-4", node, "web")
    in_container(tmp_path, process.pid, pod)
    failures: list[str] = []
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path, token="not-a-token"),
                           on_failure=failures.append)
    assert attestor.selectors(peer_of(process)) == frozenset()
    assert failures == ["k8s_kubelet_unavailable"]
    assert kubelet.refused >= 1 and kubelet.requests == 0


def test_a_kubelet_with_a_certificate_from_another_ca_is_not_asked(
        cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path, process: subprocess.Popen[bytes]) -> None:
    from tests.harness.https_server import make_tls

    pod = cluster.pod("shop", "web-5", node, "web")
    in_container(tmp_path, process.pid, pod)
    other_ca = make_tls(tmp_path / "other", ["127.0.0.1"]).ca_pem
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path, ca=other_ca))
    assert attestor.selectors(peer_of(process)) == frozenset()
    assert kubelet.requests == 0


# -- configuration ---------------------------------------------------------------------------------------------

BASE = {"trustDomain": "example.org", "serverURL": "https://keyseal.svc:8443", "trustBundleFile": "/b.pem"}


def test_agent_configuration_for_kubernetes() -> None:
    config = parse_agent_config({**BASE, "k8sPSAT": {"tokenFile": "/var/run/secrets/keyseal/token"},
                                 "k8s": {"nodeName": "${NODE_NAME}", "kubeletURL": "https://${NODE_IP}:10250"}},
                                environ={"NODE_NAME": "node-a", "NODE_IP": "10.0.0.7"})
    assert config.psat_token_file == Path("/var/run/secrets/keyseal/token") and not config.join_token
    assert config.k8s is not None
    assert (config.k8s.node_name, config.k8s.kubelet_url) == ("node-a", "https://10.0.0.7:10250")
    assert config.k8s.proc_root == Path("/proc")
    ipv6 = parse_agent_config({**BASE, "joinToken": "t", "k8s": {"nodeName": "n", "kubeletURL": "https://${NODE_IP}:10250"}},
                              environ={"NODE_IP": "fd00::7"})
    assert ipv6.k8s is not None and ipv6.k8s.kubelet_url == "https://[fd00::7]:10250"
    assert "/kubepods.slice" in ipv6.k8s.cgroup_roots
    custom = parse_agent_config({**BASE, "joinToken": "t", "k8s": {"nodeName": "n", "cgroupRoots": ["/k8s/kubepods"]}})
    assert custom.k8s is not None and custom.k8s.cgroup_roots == ("/k8s/kubepods",)


def test_configured_cgroup_roots() -> None:
    """A kubelet with a custom --cgroup-root: its pods are found only under the configured root."""
    text = f"0::/k8s/kubepods/burstable/pod{POD_UID}/{CID}"
    assert parse_cgroup(text) is None
    assert parse_cgroup(text, ("/k8s/kubepods",)) == REF
    assert parse_cgroup(f"0::/kubepods/pod{POD_UID}/{CID}", ("/k8s/kubepods",)) is None


@pytest.mark.parametrize(("data", "message"), [
    ({"joinToken": "t", "k8s": {"kubeletURL": "https://x:10250"}}, "k8s.nodeName is missing"),
    ({"joinToken": "t", "k8s": {"nodeName": "${NODE_NAME}"}}, "NODE_NAME is not set"),
    ({"joinToken": "t", "k8s": {"nodeName": "n", "kubeletURL": "http://n:10255"}}, "must be https"),
    ({"joinToken": "t", "k8s": {"nodeName": "n", "podListCacheTTL": "5m"}}, "at most 60s"),
    ({"joinToken": "t", "k8s": {"nodeName": "n", "insecure": True}}, "k8s must be a mapping"),
    ({"joinToken": "t", "k8s": {"nodeName": "n", "cgroupRoots": ["user.slice"]}}, "absolute cgroup paths"),
    ({"joinToken": "t", "k8s": {"nodeName": "n", "cgroupRoots": "/kubepods"}}, "absolute cgroup paths"),
    ({"k8sPSAT": {"tokenFile": ""}}, "k8sPSAT must be a mapping"),
    ({}, "no join token"),
])
def test_agent_kubernetes_configuration_is_checked(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_agent_config({**BASE, **data}, environ={})


@pytest.mark.slow
@given(lines=st.lists(st.tuples(st.sampled_from(["0", "4", "12"]), st.sampled_from(["", "memory", "name=systemd"]),
                                st.lists(st.sampled_from([
                                    "kubepods", "kubepods.slice", f"pod{POD_UID}", f"kubepods-pod{UNDERSCORED}.slice",
                                    CID, f"cri-containerd-{CID}.scope", f"crio-conmon-{CID}.scope", "..", "",
                                    "burstable", "x", "user.slice", "user@1000.service", "kubelet.slice",
                                    "kubelet-kubepods.slice"]), max_size=6)), max_size=4),
       noise=st.text(max_size=40))
@hypothesis_settings(max_examples=300, deadline=None)
def test_any_cgroup_file_gives_at_most_the_container_it_names(lines: list[tuple[str, str, list[str]]],
                                                              noise: str) -> None:
    """Never an exception; a result is always the one container the file's paths end in."""
    text = "\n".join(f"{n}:{c}:/{'/'.join(parts)}" for n, c, parts in lines) + "\n" + noise
    found = parse_cgroup(text)
    assert found is None or found == REF
    if found is not None:  # some line is anchored at the kubelet's cgroup root (or relative, inside it)
        anchored = {"kubepods", "kubepods.slice", "kubelet.slice"}
        relative = {f"pod{POD_UID}", f"kubepods-pod{UNDERSCORED}.slice", "burstable"}
        assert any(c != "name=systemd" and ((parts[:1] and parts[0] in anchored) or
                                           (parts[:1] == [".."] and any(p in relative for p in parts)))
                   for _, c, parts in [(n, c, [p for p in ps if p]) for n, c, ps in lines])


def test_a_token_file_holding_two_lines_is_refused_without_showing_it(
        cluster: Cluster, kubelet: KubeletPeer, node: str, tmp_path: Path, process: subprocess.Popen[bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    """A service account token an HTTP header cannot carry (a line break inside): http.client's refusal quotes
    the header, `Bearer <token>`; the agent says which file is wrong, counts a failure and keeps the token out."""
    pod = cluster.pod("shop", "web-two-line-token", node, "web")
    in_container(tmp_path, process.pid, pod)
    failures: list[str] = []
    attestor = K8sAttestor(settings(cluster, kubelet, node, tmp_path, token="eyJFIRSTSECRET\neyJSECONDSECRET"),
                           on_failure=failures.append)
    caplog.set_level("DEBUG")
    assert attestor.selectors(peer_of(process)) == frozenset()
    assert failures == ["k8s_kubelet_unavailable"] and kubelet.requests == 0
    assert f"the service account token {tmp_path / 'token'}" in caplog.text and "SECRET" not in caplog.text
