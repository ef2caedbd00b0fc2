"""Workload attestation from the caller's pod, as SPIRE's `k8s` workload attestor.

The caller's pod UID and container ID come from `/proc/<pid>/cgroup` (the agent runs with hostPID to read it),
in every layout the container runtimes write under the kubelet:

- cgroupfs driver (cgroup v1 or v2): `/kubepods[/burstable|/besteffort]/pod<uid>/<container-id>`;
- systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with '_'>.slice/
  <runtime>-<container-id>.scope`, runtime `cri-containerd` (containerd), `crio` (CRI-O) or `docker`
  (dockershim, cri-dockerd);
- kind's `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-...`, other roots from `k8s.cgroupRoots`, and
  the leading `..` a reader in its own cgroup namespace sees.

The path must start at one of those roots (only root can make cgroups there): a node user can move a shell into
`pod<victim uid>/<victim container id>` below its own delegated `user@.service` subtree, both IDs being in the
victim's world-readable /proc/<pid>/cgroup. On cgroup v1 every controller line must agree (see parse_cgroup).

CRI-O's `crio-conmon-<id>.scope` is the container monitor, not the container: it gets no k8s selectors. A
process whose lines (cgroup v1 has one per hierarchy) disagree gets none either.

The pod itself comes from the node's kubelet (GET /pods on its authenticated port, with the agent's service
account token, TLS verified against the kubelet's CA): the container ID must be one of that pod's containers and
the pod UID that pod's. The list is cached briefly; a pid whose container is not (yet) in it gets no k8s
selectors, never another pod's. The pid's start time is compared before and after the cgroup file is read, so
a pid that exited and was reused in between gets none.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyseal._internal.agent.attestation import PeerCredentials, start_time
from keyseal.errors import BackendUnavailableError, InputError

__all__ = ["ContainerRef", "K8sAttestor", "K8sSettings", "KubeletClient", "container_of", "parse_cgroup"]

log = logging.getLogger(__name__)

_ID = r"[0-9a-f]{64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# pod segment: "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid_>.slice" (systemd; kind: "kubelet-kubepods-...")
_POD_RE = re.compile(rf"(?:[a-z]+-)*pod({_UID})(?:\.slice)?")
_QOS_RE = re.compile(r"(?:[a-z]+-)*(?:burstable|besteffort)(?:\.slice)?")
_CONTAINER_RE = re.compile(rf"(?:(?:cri-containerd|crio|docker|containerd)-)?({_ID})(?:\.scope)?")
# The kubelet's pod cgroup roots: cgroupfs driver, systemd driver, kind (kubelet --cgroup-root=/kubelet). Only
# root can make cgroups there; a node user can make "pod<uid>/<id>" below their own delegated user@.service.
DEFAULT_CGROUP_ROOTS: tuple[str, ...] = ("/kubepods", "/kubepods.slice", "/kubelet.slice/kubelet-kubepods.slice")
MAX_CGROUP_BYTES = 64 * 1024
MAX_POD_LIST_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ContainerRef:
    pod_uid: str
    container_id: str


def _below_root(tail: list[str]) -> ContainerRef | None:
    """[<qos>] pod<uid> <container>: what the kubelet and runtime make below the kubepods root."""
    if tail and _QOS_RE.fullmatch(tail[0]):
        tail = tail[1:]
    if len(tail) != 2:
        return None  # the pod's own cgroup, or something below a container: not a container's process
    pod = _POD_RE.fullmatch(tail[0])
    container = _CONTAINER_RE.fullmatch(tail[1])
    if pod is None or container is None or tail[1].startswith("crio-conmon-"):
        return None
    return ContainerRef(pod.group(1).replace("_", "-"), container.group(1))


def _from_path(path: str, roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS) -> ContainerRef | None:
    """The container a cgroup path names, only if the path is anchored at one of the kubelet's roots.

    A path starting with ".." is relative to the reader's cgroup namespace root (the agent's own pod cgroup):
    it climbs to a common ancestor, which is inside the kubepods tree or the host root, so its first segment
    after the ".." must be a suffix of a root, a QoS level or a pod, never a user's slice.
    """
    segments = [s for s in path.split("/") if s]
    climbed = 0
    while climbed < len(segments) and segments[climbed] == "..":
        climbed += 1
    segments = segments[climbed:]
    if ".." in segments:
        return None
    for root in roots:
        parts = [s for s in root.split("/") if s]
        if not climbed:
            if segments[:len(parts)] == parts:
                return _below_root(segments[len(parts):])
            continue
        for start in range(len(parts) + 1):  # the reader's namespace root is somewhere below the host's root
            suffix = parts[start:]
            if segments[:len(suffix)] == suffix:
                found = _below_root(segments[len(suffix):])
                if found is not None:
                    return found
    return None


def _at_root(path: str) -> bool:
    """The hierarchy's root ("/"), or an ancestor of the reader's cgroup namespace ("/../.."): only root puts a
    process there."""
    return all(s == ".." for s in path.split("/") if s)


def parse_cgroup(text: str, roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS) -> ContainerRef | None:
    """The pod UID and container ID of a /proc/<pid>/cgroup file, or None (not in a pod, or lines disagree).

    cgroup v2 has one line, "0::<path>", which must name the container. cgroup v1 has one line per hierarchy:
    every controller line must name the same container, except a controller left at the root "/" (one the
    runtime does not manage, e.g. rdma or net_cls in some setups). At least one controller line must name it:
    named hierarchies ("name=systemd") and hybrid mode's unified "0::" line can be delegated to a node user by
    systemd, so they never decide alone; when they name a container it must be the same one.
    """
    unified: list[str] = []
    controllers: list[str] = []
    named: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            unified.append(parts[2])
        elif parts[1].startswith("name=") or parts[1] == "":
            named.append(parts[2])
        else:
            controllers.append(parts[2])
    if not controllers and not named:  # cgroup v2
        found = {_from_path(p, roots) for p in unified}
        return found.pop() if len(found) == 1 else None
    deciding = {_from_path(p, roots) for p in controllers if not _at_root(p)}
    if len(deciding) != 1 or None in deciding:
        return None
    ref = deciding.pop()
    for path in named + unified:
        other = _from_path(path, roots)
        if other is not None and other != ref:
            return None
        if other is None and path in named and not _at_root(path):
            return None  # a named hierarchy elsewhere: a user's spoof, or a process that is not the container's
    return ref


def container_of(pid: int, proc_root: Path,
                 roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS) -> ContainerRef | None:
    try:
        with open(proc_root / str(pid) / "cgroup", "rb") as handle:
            data = handle.read(MAX_CGROUP_BYTES)
    except OSError:
        return None
    return parse_cgroup(data.decode("utf-8", "replace"), roots)


@dataclass(frozen=True)
class K8sSettings:
    node_name: str
    kubelet_url: str = "https://127.0.0.1:10250"
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubelet_ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    proc_root: Path = Path("/proc")
    cache_seconds: float = 2.0
    min_refresh_seconds: float = 0.5  # a miss asks the kubelet again at most this often
    cgroup_roots: tuple[str, ...] = DEFAULT_CGROUP_ROOTS  # where the kubelet's pod cgroups may start


class KubeletClient:
    """GET /pods on the kubelet's authenticated port. The token file is read on every call: the kubelet
    rotates projected tokens."""

    def __init__(self, settings: K8sSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.kubelet_url)
        if parts.scheme != "https" or not parts.hostname:
            raise InputError(f"kubeletURL {settings.kubelet_url[:80]!r} must be https://HOST:PORT")
        self.host, self.port = parts.hostname, parts.port or 10250
        self._context: ssl.SSLContext | None = None

    def _ssl(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = ssl.create_default_context(cafile=str(self.settings.kubelet_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise InputError(f"cannot read the kubelet CA {self.settings.kubelet_ca_file}: {exc}") from exc
        return self._context

    def pods(self) -> list[dict[str, Any]]:
        try:
            token = self.settings.token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the service account token {self.settings.token_file}: {exc}") from exc
        if not token or not all("!" <= char <= "~" for char in token):  # http.client's refusal would quote it
            raise InputError(f"the service account token {self.settings.token_file} is not one token: it is empty "
                             f"or has spaces, line breaks or non-ASCII characters inside")
        connection = http.client.HTTPSConnection(self.host, self.port, context=self._ssl(), timeout=10)
        try:
            connection.request("GET", "/pods", headers={"Authorization": f"Bearer {token}",
                                                        "Accept": "application/json"})
            response = connection.getresponse()
            body = response.read(MAX_POD_LIST_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise BackendUnavailableError(f"cannot read the pod list from the kubelet at {self.host}:{self.port}: "
                                          f"{exc}") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise BackendUnavailableError(f"the kubelet at {self.host}:{self.port} answered {response.status} to "
                                          f"GET /pods (is the agent's service account allowed nodes/pods?)")
        if len(body) > MAX_POD_LIST_BYTES:
            raise BackendUnavailableError("the kubelet's pod list is larger than the agent reads")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise BackendUnavailableError("the kubelet's pod list is not JSON") from exc
        items = document.get("items") if isinstance(document, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]


def _container_id(status: dict[str, Any]) -> str:
    """`containerd://<id>`, `cri-o://<id>`, `docker://<id>` -> <id>."""
    return str(status.get("containerID") or "").partition("://")[2]


_VALUE_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")


class K8sAttestor:
    """The k8s: selectors of a caller, from its cgroup and the kubelet's pod list."""

    def __init__(self, settings: K8sSettings, kubelet: KubeletClient | None = None,
                 on_failure: Callable[[str], None] = lambda reason: None) -> None:
        self.on_failure = on_failure  # the metrics' attestation failures: k8s_pid_replaced, ... (docs/agent.md)
        self.settings = settings
        self.kubelet = kubelet or KubeletClient(settings)
        self._lock = threading.Lock()
        self._pods: list[dict[str, Any]] = []
        self._fetched = -1e9

    def _pod_list(self, refresh: bool) -> list[dict[str, Any]]:
        with self._lock:
            age = time.monotonic() - self._fetched
            if age >= self.settings.cache_seconds or (refresh and age >= self.settings.min_refresh_seconds):
                self._pods = self.kubelet.pods()
                self._fetched = time.monotonic()
            return self._pods

    def _find(self, ref: ContainerRef, pods: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        for pod in pods:
            if (pod.get("metadata") or {}).get("uid") != ref.pod_uid:
                continue
            status = pod.get("status") or {}
            for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
                for container in status.get(key) or []:
                    if isinstance(container, dict) and _container_id(container) == ref.container_id:
                        return pod, container
        return None

    def selectors(self, peer: PeerCredentials) -> frozenset[str]:
        if peer.start is None:
            return frozenset()
        ref = container_of(peer.pid, self.settings.proc_root, self.settings.cgroup_roots)
        if ref is None:
            return frozenset()  # not in a pod's container: nothing to say
        if start_time(peer.pid) != peer.start:
            self.on_failure("k8s_pid_replaced")
            return frozenset()
        try:
            found = self._find(ref, self._pod_list(refresh=False)) or self._find(ref, self._pod_list(refresh=True))
        except (BackendUnavailableError, InputError) as exc:
            log.warning("no k8s selectors for pid %d: %s", peer.pid, exc.message)
            self.on_failure("k8s_kubelet_unavailable")
            return frozenset()
        if found is None:
            log.info("pid %d runs in container %s of pod %s, which the kubelet does not list (yet): no k8s "
                     "selectors", peer.pid, ref.container_id[:12], ref.pod_uid)
            self.on_failure("k8s_not_listed")
            return frozenset()
        pod, container = found
        metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if self.settings.node_name and spec.get("nodeName") != self.settings.node_name:
            log.warning("the kubelet listed pod %s of another node: no k8s selectors", ref.pod_uid)
            self.on_failure("k8s_other_node")
            return frozenset()
        values = {"ns": metadata.get("namespace"), "sa": spec.get("serviceAccountName"),
                  "pod-name": metadata.get("name"), "pod-uid": metadata.get("uid"),
                  "node-name": spec.get("nodeName"), "container-name": container.get("name")}
        selectors = {f"k8s:{k}:{v}" for k, v in values.items() if isinstance(v, str) and _VALUE_RE.fullmatch(v)}
        image = container.get("image")
        if isinstance(image, str) and 0 < len(image) <= 1024 and image.isprintable() and " " not in image:
            selectors.add(f"k8s:container-image:{image}")
        for key, value in (metadata.get("labels") or {}).items():
            if isinstance(value, str):
                selectors.add(f"k8s:pod-label:{key}:{value}")
        return frozenset(selectors)
