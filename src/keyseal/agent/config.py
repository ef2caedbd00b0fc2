"""The agent configuration: a YAML file (keys mirror the Helm chart's `agent` values); unknown keys are errors."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyseal.ca.config import parse_duration
from keyseal.ca.spiffeid import check_trust_domain
from keyseal.errors import InputError, UsageError

__all__ = ["AgentConfig", "WorkloadApiLimits", "load_agent_config", "parse_agent_config"]

_KEYS = {"trustDomain", "serverURL", "trustBundleFile", "joinToken", "joinTokenFile", "socketPath", "socketMode",
         "socketGroup", "syncInterval", "logLevel", "metrics", "stateDir", "stateKekFile", "workloadAPI"}
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
    match = _URL_RE.fullmatch(str(data.get("serverURL") or ""))
    if match is None:
        raise UsageError("serverURL must be https://HOST:PORT (the trust-domain server)")
    bundle = data.get("trustBundleFile")
    if not bundle:
        raise UsageError("trustBundleFile is missing: the server's CA certificates (PEM) or its bundle (JSON)")
    state_dir = Path(str(data["stateDir"])) if data.get("stateDir") else None
    node_name = environ.get("NODE_NAME", "")
    for name in ("joinTokenFile", "stateKekFile"):
        if "${NODE_NAME}" in str(data.get(name) or "") and not node_name:
            raise UsageError(f"{name} names ${{NODE_NAME}} but NODE_NAME is not set (the downward API sets it)")
    token = data.get("joinToken") or environ.get("KEYSEAL_JOIN_TOKEN", "")
    if data.get("joinTokenFile"):
        token_path = Path(str(data["joinTokenFile"]).replace("${NODE_NAME}", node_name))
        try:
            token = token_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if state_dir is None:  # with saved state, a node's token is needed only until its first join
                raise InputError(f"cannot read joinTokenFile: {token_path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read joinTokenFile: {exc}") from None
    kek_text = str(data.get("stateKekFile") or "")
    if data.get("stateKekFile") and state_dir is None:
        raise UsageError("stateKekFile needs stateDir (where the agent keeps its SVID across restarts)")
    if not token and state_dir is None:
        raise UsageError("no join token: set joinTokenFile or KEYSEAL_JOIN_TOKEN (keyseal entry join-token)")
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
        server_host=match.group(1).strip("[]"),
        server_port=int(match.group(2)),
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
    )


def load_agent_config(path: Path) -> AgentConfig:
    try:
        import yaml
    except ImportError:
        raise UsageError("the agent needs PyYAML: pip install 'keyseal[agent]'") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read agent configuration {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise UsageError(f"agent configuration {path} is not valid YAML") from None
    try:
        return parse_agent_config(data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc.message}") from None
