"""The chart's agent DaemonSet: off by default; when enabled, valid manifests with the socket on a hostPath and
a configuration the agent itself accepts."""

from __future__ import annotations

from pathlib import Path

import helm_python
import pytest
import yaml

from keyseal.agent.config import parse_agent_config
from tests.test_helm_chart import CHART, render


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def test_agent_is_off_by_default(chart: helm_python.Chart) -> None:
    assert "DaemonSet" not in render(chart)


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
    parsed = parse_agent_config(config, environ={"NODE_NAME": "node-a"})
    assert parsed.join_token == "token-for-node-a"
    assert str(parsed.socket_path) == "/run/keyseal/agent.sock" and parsed.socket_mode == 0o666
    assert parsed.server_host.endswith(".svc")
