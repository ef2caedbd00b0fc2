"""Workload attestation from the caller's pod, as SPIRE's `k8s` workload attestor.

The caller's pod UID and container ID come from `/proc/<pid>/cgroup` (the agent runs with hostPID to read it),
in every layout the container runtimes write under the kubelet:

- cgroupfs driver (cgroup v1 or v2): `/kubepods[/burstable|/besteffort]/pod<uid>/<container-id>`;
- systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with '_'>.slice/
  <runtime>-<container-id>.scope`, runtime `cri-containerd` (containerd), `crio` (CRI-O) or `docker`
  (dockershim, cri-dockerd);
- anything before the kubepods part (kind's `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-...`, a
  nested `/docker/<id>/`) and the `..` a reader in its own cgroup namespace sees.

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

from keyseal.agent.attestation import PeerCredentials, start_time
from keyseal.errors import BackendUnavailableError, InputError

__all__ = ["ContainerRef", "K8sAttestor", "K8sSettings", "KubeletClient", "container_of", "parse_cgroup"]

log = logging.getLogger(__name__)

_ID = r"[0-9a-f]{64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# pod segment: "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid_>.slice" (systemd; kind: "kubelet-kubepods-...")
_POD_RE = re.compile(rf"(?:[a-z]+-)*pod({_UID})(?:\.slice)?")
_CONTAINER_RE = re.compile(rf"(?:(?:cri-containerd|crio|docker|containerd)-)?({_ID})(?:\.scope)?")
MAX_CGROUP_BYTES = 64 * 1024
MAX_POD_LIST_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ContainerRef:
    pod_uid: str
    container_id: str


def _from_path(path: str) -> ContainerRef | None:
    segments = [s for s in path.split("/") if s and s != ".."]
    for index, segment in enumerate(segments):
        pod = _POD_RE.fullmatch(segment)
        if pod is None or index + 1 >= len(segments):
            continue
        if segments[index + 1].startswith("crio-conmon-"):
            return None
        container = _CONTAINER_RE.fullmatch(segments[index + 1])
        if container is None or index + 2 != len(segments):
            return None  # the pod's own cgroup, or something below a container: not a container's process
        return ContainerRef(pod.group(1).replace("_", "-"), container.group(1))
    return None


def parse_cgroup(text: str) -> ContainerRef | None:
    """The pod UID and container ID of a /proc/<pid>/cgroup file, or None (not in a pod, or lines disagree)."""
    found: set[ContainerRef | None] = set()
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        found.add(_from_path(parts[2]))
    found.discard(None)
    if len(found) != 1:
        return None
    return found.pop()


def container_of(pid: int, proc_root: Path) -> ContainerRef | None:
    try:
        with open(proc_root / str(pid) / "cgroup", "rb") as handle:
            data = handle.read(MAX_CGROUP_BYTES)
    except OSError:
        return None
    return parse_cgroup(data.decode("utf-8", "replace"))


@dataclass(frozen=True)
class K8sSettings:
    node_name: str
    kubelet_url: str = "https://127.0.0.1:10250"
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubelet_ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    proc_root: Path = Path("/proc")
    cache_seconds: float = 2.0
    min_refresh_seconds: float = 0.5  # a miss asks the kubelet again at most this often


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
                raise InputError(f"cannot read the kubelet CA {self.settings.kubelet_ca_file}: {exc}") from None
        return self._context

    def pods(self) -> list[dict[str, Any]]:
        try:
            token = self.settings.token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the service account token {self.settings.token_file}: {exc}") from None
        connection = http.client.HTTPSConnection(self.host, self.port, context=self._ssl(), timeout=10)
        try:
            connection.request("GET", "/pods", headers={"Authorization": f"Bearer {token}",
                                                        "Accept": "application/json"})
            response = connection.getresponse()
            body = response.read(MAX_POD_LIST_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise BackendUnavailableError(f"cannot read the pod list from the kubelet at {self.host}:{self.port}: "
                                          f"{exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise BackendUnavailableError(f"the kubelet at {self.host}:{self.port} answered {response.status} to "
                                          f"GET /pods (is the agent's service account allowed nodes/pods?)")
        if len(body) > MAX_POD_LIST_BYTES:
            raise BackendUnavailableError("the kubelet's pod list is larger than the agent reads")
        try:
            document = json.loads(body)
        except ValueError:
            raise BackendUnavailableError("the kubelet's pod list is not JSON") from None
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
        ref = container_of(peer.pid, self.settings.proc_root)
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
