"""The agent configuration: a YAML file (keys mirror the Helm chart's `agent` values); unknown keys are errors."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyseal._internal.agent.k8s import K8sSettings
from keyseal._internal.durations import parse_duration
from keyseal._internal.spiffe.ids import check_trust_domain
from keyseal.errors import InputError, UsageError

__all__ = ["AgentConfig", "WorkloadApiLimits", "load_agent_config", "parse_agent_config"]

_KEYS = {"trustDomain", "serverURL", "serverURLs", "trustBundleFile", "joinToken", "joinTokenFile", "socketPath",
         "socketMode", "socketGroup", "syncInterval", "logLevel", "metrics", "stateDir", "stateKekFile", "workloadAPI",
         "k8sPSAT", "k8s"}
_URL_RE = re.compile(r"https://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})")
_LISTEN_RE = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})")


@dataclass(frozen=True)
class WorkloadApiLimits:
    """What local processes may hold of the agent (docs/agent.md, "Limits"). A call in progress holds one of the
    agent's threads, a connection three file descriptors."""

    max_connections: int = 1024
    max_connections_per_uid: int = 256  # generous: containers often share a uid (e.g. 0)
    max_calls: int = 512
    max_calls_per_uid: int = 128
    idle_timeout: float = 120.0  # seconds without a byte from the client
    jwt_cache_size: int = 1000  # JWT-SVIDs kept, by entry and audience


# workloadAPI key -> (field, largest value)
_LIMIT_KEYS = {"maxConnections": ("max_connections", 65536), "maxConnectionsPerUID": ("max_connections_per_uid", 65536),
               "maxCalls": ("max_calls", 4096), "maxCallsPerUID": ("max_calls_per_uid", 4096),
               "jwtCacheSize": ("jwt_cache_size", 1_000_000)}


@dataclass(frozen=True)
class AgentConfig:
    trust_domain: str
    server_host: str
    server_port: int
    trust_bundle_file: Path
    join_token: str
    socket_path: Path = Path("/run/keyseal/agent.sock")
    socket_mode: int = 0o666
    socket_group: int | None = None
    sync_interval: float = 5.0
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None  # off unless metrics.listen is set
    state_dir: Path | None = None  # the agent SVID and its wrapped key, kept across restarts
    state_kek_file: Path | None = None
    workload_api: WorkloadApiLimits = WorkloadApiLimits()
    psat_token_file: Path | None = None  # join with this projected service account token (keyseal._internal.agent.k8s)
    k8s: K8sSettings | None = None  # k8s: workload selectors from the kubelet
    join_token_file: Path | None = None  # re-read when the agent must join again (keyseal._internal.agent.main)
    more_servers: tuple[tuple[str, int], ...] = ()  # after server_host:server_port, in order (failover)

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """Every server address, the first one first: the agent moves on to the next when one does not answer."""
        return ((self.server_host, self.server_port), *self.more_servers)


def _seconds(value: object, where: str) -> float:
    if isinstance(value, float | int) and not isinstance(value, bool):
        if value <= 0:
            raise UsageError(f"{where} must be longer than zero")
        return float(value)
    return parse_duration(value, where).total_seconds()


def _metrics_listen(value: object) -> tuple[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"listen"}:
        raise UsageError("metrics must be a mapping with one key, listen (e.g. listen: 127.0.0.1:9988)")
    listen = value.get("listen")
    if not listen:
        return None
    match = _LISTEN_RE.fullmatch(str(listen))
    if match is None or int(match.group(2)) > 65535:
        raise UsageError(f"metrics.listen={str(listen)[:60]!r} must be HOST:PORT, e.g. 127.0.0.1:9988")
    return match.group(1).strip("[]"), int(match.group(2))


def _workload_api(value: object) -> WorkloadApiLimits:
    if value is None:
        return WorkloadApiLimits()
    known = sorted((*_LIMIT_KEYS, "idleTimeout"))
    if not isinstance(value, dict) or set(value) - set(known):
        raise UsageError(f"workloadAPI must be a mapping with the keys {', '.join(known)}")
    fields: dict[str, Any] = {}
    for key, (field, largest) in _LIMIT_KEYS.items():
        if key in value:
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= largest:
                raise UsageError(f"workloadAPI.{key} must be a whole number from 1 to {largest}")
            fields[field] = number
    if "idleTimeout" in value:
        fields["idle_timeout"] = _seconds(value["idleTimeout"], "workloadAPI.idleTimeout")
    limits = WorkloadApiLimits(**fields)
    if limits.max_connections_per_uid > limits.max_connections or limits.max_calls_per_uid > limits.max_calls:
        raise UsageError("workloadAPI: a per-UID limit cannot be larger than the total it is part of")
    return limits


def parse_agent_config(data: Any, environ: dict[str, str] | None = None) -> AgentConfig:
    environ = dict(os.environ) if environ is None else environ
    if not isinstance(data, dict):
        raise UsageError("the agent configuration must be a mapping of keys to values")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise UsageError(f"unknown agent configuration key {unknown[0]!r}: the keys are {', '.join(sorted(_KEYS))}")
    trust_domain = check_trust_domain(str(data.get("trustDomain") or ""))
    servers = _servers(data.get("serverURL"), data.get("serverURLs"))
    bundle = data.get("trustBundleFile")
    if not bundle:
        raise UsageError("trustBundleFile is missing: the server's CA certificates (PEM) or its bundle (JSON)")
    state_dir = Path(str(data["stateDir"])) if data.get("stateDir") else None
    node_name = environ.get("NODE_NAME", "")
    for name in ("joinTokenFile", "stateKekFile"):
        if "${NODE_NAME}" in str(data.get(name) or "") and not node_name:
            raise UsageError(f"{name} names ${{NODE_NAME}} but NODE_NAME is not set (the downward API sets it)")
    token = data.get("joinToken") or environ.get("KEYSEAL_JOIN_TOKEN", "")
    psat_token_file = _psat(data.get("k8sPSAT"))
    token_path: Path | None = None
    if data.get("joinTokenFile"):
        token_path = Path(str(data["joinTokenFile"]).replace("${NODE_NAME}", node_name))
        try:
            token = token_path.read_text(encoding="ascii").strip()
        except FileNotFoundError as exc:
            # with saved state, a node's token is needed only until its first join; a service account token joins
            if state_dir is None and psat_token_file is None:
                raise InputError(f"cannot read joinTokenFile: {token_path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read joinTokenFile: {exc}") from exc
    kek_text = str(data.get("stateKekFile") or "")
    if data.get("stateKekFile") and state_dir is None:
        raise UsageError("stateKekFile needs stateDir (where the agent keeps its SVID across restarts)")
    if not token and state_dir is None and psat_token_file is None:
        raise UsageError("no join token: set joinTokenFile or KEYSEAL_JOIN_TOKEN (keyseal entry join-token), or "
                         "k8sPSAT.tokenFile in Kubernetes")
    mode_text = str(data.get("socketMode", "0666"))
    if not re.fullmatch(r"0?[0-7]{3}", mode_text):
        raise UsageError(f"socketMode={mode_text!r} must be an octal mode such as 0660")
    group = data.get("socketGroup")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
        raise UsageError("socketGroup must be a numeric group ID")
    level = str(data.get("logLevel", "info"))
    if level not in ("debug", "info", "warning", "error"):
        raise UsageError("logLevel must be debug, info, warning or error")
    return AgentConfig(
        trust_domain=trust_domain,
        server_host=servers[0][0],
        server_port=servers[0][1],
        more_servers=tuple(servers[1:]),
        trust_bundle_file=Path(str(bundle)),
        join_token=str(token),
        socket_path=Path(str(data.get("socketPath") or "/run/keyseal/agent.sock")),
        socket_mode=int(mode_text, 8),
        socket_group=group,
        sync_interval=_seconds(data.get("syncInterval", "5s"), "syncInterval"),
        log_level=level,
        metrics_listen=_metrics_listen(data.get("metrics")),
        state_dir=state_dir,
        state_kek_file=(Path(kek_text.replace("${NODE_NAME}", node_name)) if kek_text
                        else state_dir / "kek" if state_dir else None),
        workload_api=_workload_api(data.get("workloadAPI")),
        psat_token_file=psat_token_file,
        k8s=_k8s(data.get("k8s"), environ),
        join_token_file=token_path,
    )


def _psat(value: object) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"tokenFile"} or not value["tokenFile"]:
        raise UsageError("k8sPSAT must be a mapping with one key, tokenFile (the projected service account token)")
    return Path(str(value["tokenFile"]))


_K8S_KEYS = {"nodeName", "kubeletURL", "tokenFile", "kubeletCAFile", "procRoot", "podListCacheTTL", "cgroupRoots"}


def _k8s(value: object, environ: dict[str, str]) -> K8sSettings | None:
    """The k8s workload attestor's settings; ${NODE_NAME} and ${NODE_IP} come from the downward API."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - _K8S_KEYS:
        raise UsageError(f"k8s must be a mapping with the keys {', '.join(sorted(_K8S_KEYS))}")

    def expand(key: str) -> str:
        text = str(value.get(key) or "")
        for name in ("NODE_NAME", "NODE_IP"):
            if "${" + name + "}" in text:
                if not environ.get(name):
                    raise UsageError(f"k8s.{key} names ${{{name}}} but {name} is not set (the downward API sets it)")
                found = environ[name]
                if name == "NODE_IP" and ":" in found and key == "kubeletURL":
                    found = f"[{found}]"  # an IPv6 host IP in a URL
                text = text.replace("${" + name + "}", found)
        return text

    node_name = expand("nodeName")
    if not node_name:
        raise UsageError("k8s.nodeName is missing: set it to ${NODE_NAME} (spec.nodeName from the downward API)")
    defaults = K8sSettings(node_name)
    url = expand("kubeletURL") or defaults.kubelet_url
    if not re.fullmatch(r"https://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):\d{1,5}", url):
        raise UsageError(f"k8s.kubeletURL={url[:80]!r} must be https://HOST:PORT (the kubelet's port 10250)")
    ttl = _seconds(value.get("podListCacheTTL", 2), "k8s.podListCacheTTL")
    if ttl > 60:
        raise UsageError("k8s.podListCacheTTL is at most 60s: a new pod waits that long for its identity")
    roots = value.get("cgroupRoots", list(defaults.cgroup_roots))
    if (not isinstance(roots, list) or not 1 <= len(roots) <= 16
            or not all(isinstance(r, str) and re.fullmatch(r"(/[A-Za-z0-9@._-]+)+", r) and "/../" not in r + "/"
                       for r in roots)):
        raise UsageError("k8s.cgroupRoots must be a list of 1 to 16 absolute cgroup paths such as /kubepods.slice")
    return K8sSettings(
        node_name=node_name, kubelet_url=url, cgroup_roots=tuple(roots),
        token_file=Path(expand("tokenFile")) if value.get("tokenFile") else defaults.token_file,
        kubelet_ca_file=Path(expand("kubeletCAFile")) if value.get("kubeletCAFile") else defaults.kubelet_ca_file,
        proc_root=Path(expand("procRoot")) if value.get("procRoot") else defaults.proc_root,
        cache_seconds=ttl, min_refresh_seconds=min(0.5, ttl))


def _server(value: object, where: str) -> tuple[str, int]:
    match = _URL_RE.fullmatch(str(value or ""))
    if match is None or int(match.group(2)) > 65535:
        raise UsageError(f"{where} must be https://HOST:PORT (the trust-domain server)")
    return match.group(1).strip("[]"), int(match.group(2))


def _servers(single: object, several: object) -> list[tuple[str, int]]:
    """serverURL, then serverURLs (either may be left out, not both), without repeats."""
    if several is not None and (not isinstance(several, list) or not several or len(several) > 16):
        raise UsageError("serverURLs must be a list of 1 to 16 https://HOST:PORT addresses (the server replicas)")
    if not single and not several:
        raise UsageError("serverURL must be https://HOST:PORT (the trust-domain server)")
    found: list[tuple[str, int]] = []
    if single:
        found.append(_server(single, "serverURL"))
    for index, value in enumerate(several or []):
        address = _server(value, f"serverURLs[{index}]")
        if address not in found:
            found.append(address)
    return found


def load_agent_config(path: Path) -> AgentConfig:
    try:
        import yaml
    except ImportError as exc:
        raise UsageError("the agent needs PyYAML: pip install 'keyseal[agent]'") from exc
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read agent configuration {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"agent configuration {path} is not valid YAML") from exc
    try:
        return parse_agent_config(data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc.message}") from exc
