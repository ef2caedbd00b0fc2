"""The chart's agent DaemonSet: off by default; when enabled, valid manifests with the socket on a hostPath and
a configuration the agent itself accepts."""

from __future__ import annotations

import base64
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.agent.config import AgentConfig, parse_agent_config
from keyseal._internal.agent.state import AgentState
from keyseal._internal.ca.registry.entries import AGENT_PATH
from keyseal.errors import KekMismatchError
from tests.test_helm_chart import CHART, render


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


@pytest.mark.slow
def test_agent_is_off_by_default(chart: helm_python.Chart) -> None:
    assert "DaemonSet" not in render(chart)


@pytest.mark.slow
def test_agent_daemonset(chart: helm_python.Chart, tmp_path: Path) -> None:
    manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "agent-join"}})
    documents = [d for docs in manifests.values() for d in docs]
    daemonset = next(d for d in documents if d["kind"] == "DaemonSet")
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["socket-dir"]["hostPath"]["path"] == "/run/keyseal"
    assert volumes["join-tokens"]["secret"]["secretName"] == "agent-join"
    config_map = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-agent"))
    config = yaml.safe_load(config_map["data"]["agent.yaml"])
    (tmp_path / "node-a").write_text("token-for-node-a")
    config["joinTokenFile"] = str(tmp_path / "${NODE_NAME}")
    parsed = parse_agent_config(config, environ={"NODE_NAME": "node-a", "NODE_IP": "10.0.0.7"})
    assert parsed.join_token == "token-for-node-a"
    assert str(parsed.socket_path) == "/run/keyseal/agent.sock" and parsed.socket_mode == 0o666
    assert parsed.server_host.endswith(".svc")


@pytest.mark.slow
def test_agent_trust_bundle_comes_from_the_servers_configmap(chart: helm_python.Chart) -> None:
    """The chart creates the bundle ConfigMap empty, names it to the server (which alone may get and update it,
    by name) and mounts it where the agent's trustBundleFile points."""
    from keyseal._internal.ca.bundle_configmap import BUNDLE_KEY, ENVIRONMENT

    manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "agent-join"}})
    (bundle_map,) = [d for d in manifests["ConfigMap"] if d["metadata"]["name"].endswith("-agent-bundle")]
    name = bundle_map["metadata"]["name"]
    assert name == "trust-keyseal-agent-bundle" and not bundle_map.get("data")  # the server fills it in
    (deployment,) = manifests["Deployment"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": ENVIRONMENT, "value": name} in server["env"]
    (role,) = [r for r in manifests["Role"] if r["metadata"]["name"] == "trust-keyseal"]
    core_rules = [r for r in role["rules"] if r["apiGroups"] == [""] and r.get("resourceNames") == [name]]
    assert core_rules == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name],
                           "verbs": ["get", "update"]}]
    (daemonset,) = manifests["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "bundle")
    assert volume["configMap"] == {"name": name}  # not optional: no agent starts without a verified server
    (agent,) = pod["containers"]
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "bundle")
    assert "subPath" not in mount  # a subPath mount would never see the server's updates
    agent_map = next(d for d in manifests["ConfigMap"] if d["metadata"]["name"].endswith("-agent"))
    config = yaml.safe_load(agent_map["data"]["agent.yaml"])
    assert config["trustBundleFile"] == f"{mount['mountPath']}/{BUNDLE_KEY}"


def test_agent_with_a_directory_store_gets_only_the_configmap_rule(chart: helm_python.Chart) -> None:
    manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j"}, "store": {"type": "directory"},
                               "replicaCount": 1, "persistence": {"existingClaim": "data"}})
    (role,) = [r for r in manifests["Role"] if r["metadata"]["name"] == "trust-keyseal"]
    assert [r["resources"] for r in role["rules"]] == [["configmaps"]]
    assert "Role" not in render(chart, {"store": {"type": "directory"}, "replicaCount": 1,
                                        "persistence": {"existingClaim": "data"}})


# -- metrics and saved state ---------------------------------------------------------------------------------

AGENT_ID = f"spiffe://example.org{AGENT_PATH}/node-a"


def render_agent(chart: helm_python.Chart, root: Path, **agent: Any
                 ) -> tuple[dict[str, Any], dict[str, Any], AgentConfig]:
    """The agent pod template, its container, and the rendered agent.yaml as the agent itself parses it on node
    node-a, with the pod's files under root (only the join token file is read while parsing)."""
    manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "agent-join", **agent}})
    (daemonset,) = manifests["DaemonSet"]
    template = daemonset["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (config_map,) = [d for d in manifests["ConfigMap"] if d["metadata"]["name"] == "trust-keyseal-agent"]
    config = yaml.safe_load(config_map["data"]["agent.yaml"])
    node_token = Path(config["joinTokenFile"].replace("${NODE_NAME}", "node-a"))
    assert mount_of(template, container, node_token)[0]["name"] == "join-tokens"
    token_file = in_pod(root, node_token)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text("token-for-node-a")
    config["joinTokenFile"] = str(in_pod(root, Path(config["joinTokenFile"])))
    return template, container, parse_agent_config(config, environ={"NODE_NAME": "node-a", "NODE_IP": "10.0.0.7"})


def mount_of(template: dict[str, Any], container: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volumeMount a path inside the container lies on (the deepest one), and its volume."""
    mounts = [m for m in container["volumeMounts"]
              if PurePosixPath(path).is_relative_to(PurePosixPath(m["mountPath"]))]
    assert mounts, f"{path} is on no volume: the container's root filesystem is read-only"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    return mount, volumes[mount["name"]]


def in_pod(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def write_kek(path: Path) -> None:
    """A KEK as the kubelet mounts a Secret's key: a symlink through ..data to a file of mode 0400 (defaultMode),
    in the local KEK format."""
    data = path.parent / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    (data / path.name).write_text(f"keyseal-local-kek-v1:{base64.b64encode(os.urandom(32)).decode()}\n")
    (data / path.name).chmod(0o400)
    (path.parent / "..data").symlink_to(data.name)
    path.symlink_to(f"..data/{path.name}")


def agent_svid() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(AGENT_ID)]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    return key, certificate


def saved_and_resumed(state_dir: Path, kek_file: Path) -> None:
    """An agent saves its SVID; a restarted agent (a new AgentState on the same files) takes it up."""
    key, certificate = agent_svid()
    AgentState(state_dir, kek_file, "example.org").save(key, certificate)
    resumed = AgentState(state_dir, kek_file, "example.org").load()
    assert resumed is not None and resumed.certificate == certificate
    assert resumed.key.private_numbers() == key.private_numbers()


@pytest.mark.slow
def test_agent_metrics_are_off_by_default(chart: helm_python.Chart, tmp_path: Path) -> None:
    _, container, config = render_agent(chart, tmp_path)
    assert config.metrics_listen is None
    assert "ports" not in container


@pytest.mark.slow
def test_agent_metrics_port(chart: helm_python.Chart, tmp_path: Path) -> None:
    template, container, config = render_agent(chart, tmp_path, metrics={"enabled": True, "port": 9100})
    assert config.metrics_listen == ("0.0.0.0", 9100)  # the pod IP: the config has no env expansion for it
    assert container["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    # The server's pods carry no scrape annotations; the agent's do not either.
    assert not [a for a in template["metadata"].get("annotations", {}) if a.startswith("prometheus.io/")]
    assert render_agent(chart, tmp_path, metrics={"enabled": True})[2].metrics_listen == ("0.0.0.0", 9988)


def test_agent_state_by_default_keeps_the_kek_beside_the_record(chart: helm_python.Chart, tmp_path: Path) -> None:
    template, container, config = render_agent(chart, tmp_path)
    assert config.state_dir == Path("/var/lib/keyseal-agent")
    assert config.state_kek_file == config.state_dir / "kek"
    mount, volume = mount_of(template, container, config.state_dir)
    assert mount == {"name": "state", "mountPath": str(config.state_dir)}  # writable
    assert volume["hostPath"] == {"path": "/var/lib/keyseal-agent", "type": "DirectoryOrCreate"}
    assert mount_of(template, container, config.state_kek_file)[0] is mount
    assert "state-kek" not in {v["name"] for v in template["spec"]["volumes"]}
    tokens = next(v for v in template["spec"]["volumes"] if v["name"] == "join-tokens")
    assert tokens["secret"]["optional"] is True  # a node's token matters only until its first join
    # The agent creates the KEK there on first save, owner-only, and resumes after a restart.
    state_dir = in_pod(tmp_path, config.state_dir)
    saved_and_resumed(state_dir, in_pod(tmp_path, config.state_kek_file))
    assert stat.S_IMODE((state_dir / "kek").stat().st_mode) == 0o600


@pytest.mark.slow
def test_agent_state_on_another_host_path(chart: helm_python.Chart, tmp_path: Path) -> None:
    template, container, config = render_agent(chart, tmp_path, state={"hostPath": "/mnt/disk/keyseal"})
    assert config.state_dir is not None
    _, volume = mount_of(template, container, config.state_dir)
    assert volume["hostPath"] == {"path": "/mnt/disk/keyseal", "type": "DirectoryOrCreate"}


@pytest.mark.slow
def test_agent_state_kek_from_a_secret(chart: helm_python.Chart, tmp_path: Path) -> None:
    kek_secret = {"name": "agent-kek", "key": "k1"}
    template, container, config = render_agent(chart, tmp_path, state={"kekSecret": kek_secret})
    assert config.state_dir is not None and config.state_kek_file is not None
    assert not config.state_kek_file.is_relative_to(config.state_dir)
    mount, volume = mount_of(template, container, config.state_kek_file)
    assert mount["readOnly"] is True
    (item,) = volume["secret"]["items"]
    assert volume["secret"]["secretName"] == "agent-kek" and volume["secret"]["defaultMode"] == 0o400
    assert item == {"key": "k1", "path": str(config.state_kek_file.relative_to(mount["mountPath"]))}
    assert mount_of(template, container, config.state_dir)[0]["name"] == "state"
    # The kubelet's copy of the Secret: a KEK in the local format, mode 0400. The agent uses it as it is and
    # writes no KEK of its own beside the record.
    kek_file = in_pod(tmp_path, config.state_kek_file)
    write_kek(kek_file)
    state_dir = in_pod(tmp_path, config.state_dir)
    saved_and_resumed(state_dir, kek_file)
    assert not (state_dir / "kek").exists()
    # Another KEK in the Secret: the saved record is refused, not silently replaced (values.yaml says so).
    other = tmp_path / "other" / "kek"
    write_kek(other)
    with pytest.raises(KekMismatchError, match="not by the configured local KEK"):
        AgentState(state_dir, other, "example.org").load()


@pytest.mark.slow
def test_agent_state_off(chart: helm_python.Chart, tmp_path: Path) -> None:
    off = {"enabled": False, "kekSecret": {"name": "agent-kek"}}
    template, container, config = render_agent(chart, tmp_path, state=off)
    assert config.state_dir is None and config.state_kek_file is None
    assert {"state", "state-kek"}.isdisjoint(v["name"] for v in template["spec"]["volumes"])
    assert {"state", "state-kek"}.isdisjoint(m["name"] for m in container["volumeMounts"])
    tokens = next(v for v in template["spec"]["volumes"] if v["name"] == "join-tokens")
    assert "optional" not in tokens["secret"]  # without saved state every start needs the token


@pytest.mark.slow
@pytest.mark.parametrize(("agent", "where"), [
    ({"metrics": {"enabled": True, "port": 0}}, "/agent/metrics/port"),
    ({"metrics": {"enabled": True, "port": 70000}}, "/agent/metrics/port"),
    ({"metrics": {"port": "9988"}}, "/agent/metrics/port"),
    ({"metrics": {"listen": "0.0.0.0:9988"}}, "/agent/metrics"),
    ({"state": {"hostPath": "var/lib/keyseal-agent"}}, "/agent/state/hostPath"),
    ({"state": {"hostPath": "/"}}, "/agent/state/hostPath"),
    ({"state": {"enabled": "yes"}}, "/agent/state/enabled"),
    ({"state": {"kekSecret": {"name": "Agent_KEK"}}}, "/agent/state/kekSecret/name"),
    ({"state": {"kekSecret": {"key": "a/b"}}}, "/agent/state/kekSecret/key"),
    ({"state": {"kekFile": "/etc/kek"}}, "/agent/state"),
])
def test_agent_schema_refuses_bad_values(chart: helm_python.Chart, agent: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=f"'{where}'"):
        chart.render({"agent": {"enabled": True, "joinTokenSecret": "j", **agent}}, name="trust", namespace="spire")


@pytest.mark.slow
def test_agent_posture_takes_only_what_attestation_needs(chart: helm_python.Chart) -> None:
    """Attesting by uid and gid (SO_PEERCRED: no /proc access, no host pid namespace) takes no hostPID and no
    capabilities; seccomp RuntimeDefault and bounded resources always. Pods (agent.kubernetes, the default) are
    attested from /proc/<pid>/cgroup of the caller, which needs the node's pids but no capability: hostPID alone.
    Executable paths (unix:path selectors) need the node's pids and /proc/<pid>/exe of other users' processes:
    hostPID and CAP_SYS_PTRACE only then."""
    def pod(values: dict[str, Any]) -> dict[str, Any]:
        manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j", **values}})
        (daemonset,) = manifests["DaemonSet"]
        return dict(daemonset["spec"]["template"]["spec"])

    uids = pod({"kubernetes": {"enabled": False}})
    (agent,) = uids["containers"]
    assert "hostPID" not in uids and "hostNetwork" not in uids
    assert uids["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = agent["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context.get("privileged", False) is False
    assert agent["resources"]["requests"] and agent["resources"]["limits"]["memory"]
    assert uids["automountServiceAccountToken"] is False
    pods = pod({})
    (agent,) = pods["containers"]
    assert pods["hostPID"] is True and "hostNetwork" not in pods
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pods["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pods["automountServiceAccountToken"] is False
    for values in ({"attestation": {"executablePath": True}},
                   {"attestation": {"executablePath": True}, "kubernetes": {"enabled": False}}):
        paths = pod(values)
        (agent,) = paths["containers"]
        assert paths["hostPID"] is True
        assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
        assert paths["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    with pytest.raises(helm_python.HelmValuesError, match="/agent/attestation"):
        pod({"attestation": {"executablePath": "yes"}})


def test_agent_notes_name_the_pod_security_level(chart: helm_python.Chart) -> None:
    notes = chart.render({"agent": {"enabled": True, "joinTokenSecret": "j"}}, name="trust",
                         namespace="spire")["keyseal/templates/NOTES.txt"]
    assert "kubectl label namespace spire pod-security.kubernetes.io/enforce=privileged" in notes
    assert "uses hostPID (pod attestation" in notes
    notes = chart.render({"agent": {"enabled": True, "joinTokenSecret": "j", "kubernetes": {"enabled": False}}},
                         name="trust", namespace="spire")["keyseal/templates/NOTES.txt"]
    assert "hostPID" not in notes


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_attestation_without_capabilities_reads_uid_and_gid_only() -> None:
    """What the DaemonSet's default posture (no CAP_SYS_PTRACE) gives the agent's attestation, checked on this
    kernel: a process without capabilities reads another user's start time (/proc/<pid>/stat) but not its
    executable (/proc/<pid>/exe is a ptrace read access check), so it attests uid and gid only; a process of its
    own uid still yields a path."""
    import subprocess
    import sys

    probe = (
        "import os, sys\n"
        "from keyseal._internal.agent.attestation import attest, selectors_of, start_time\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"  # also drops every capability
        "other = int(sys.argv[1])\n"
        "print(sorted(selectors_of(attest(other, 0, 0))))\n"  # as the agent attests a connection it accepts
        "print(start_time(other) is not None)\n"
        "me = os.getpid()\n"
        "print(sorted(selectors_of(attest(me, 65534, 65534))))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(os.getpid())], capture_output=True, text=True,
                            timeout=60, check=True)
    other, readable, own = result.stdout.splitlines()
    assert other == "['unix:gid:0', 'unix:uid:0']"  # no unix:path: exe is not readable without CAP_SYS_PTRACE
    assert readable == "True"
    assert "unix:path:" in own
