"""Every file in examples/ loads with the real configuration parser, so the samples never drift from the schema;
the server samples are exactly what `keyseal server --print-config NAME` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyseal._internal.agent.config import load_agent_config
from keyseal._internal.ca.config import load_config
from keyseal._internal.cli.server import EXAMPLES, example_config
from tests.conftest import run_keyseal

ROOT = Path(__file__).resolve().parent.parent / "examples"
SAMPLES = sorted(p for p in ROOT.iterdir() if p.suffix == ".yaml")


def test_every_sample_is_tested() -> None:
    names = {p.name for p in SAMPLES}
    assert {f"server-{n}.yaml" for n in EXAMPLES} <= names
    assert {"agent-local.yaml", "agent-kubernetes.yaml"} <= names
    assert all(n.startswith(("server-", "agent-")) for n in names), names
    assert {p.name for p in ROOT.iterdir()} - names == {"README.md"}


@pytest.mark.parametrize("path", [p for p in SAMPLES if p.name.startswith("server-")], ids=lambda p: p.name)
def test_server_sample_loads(path: Path) -> None:
    config = load_config(path)
    assert config.trust_domain == "example.org"
    assert config.listen_host == "127.0.0.1"
    expected = path.stem.removeprefix("server-")
    custody = {"kms": "kms", "pkcs11": "pkcs11"}.get(expected, "wrapped")
    assert config.custody == custody
    if custody == "wrapped":
        assert config.wrapping_provider == {"awskms": "awskms", "vault": "vault"}.get(expected, "local")


@pytest.mark.parametrize("path", [p for p in SAMPLES if p.name.startswith("agent-")], ids=lambda p: p.name)
def test_agent_sample_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-1")
    config = load_agent_config(path)
    assert config.trust_domain == "example.org"
    assert config.state_dir is not None  # no join token is read: the agent may have joined already


@pytest.mark.parametrize("name", EXAMPLES)
def test_print_config_is_the_sample(name: str) -> None:
    assert example_config(name) == (ROOT / f"server-{name}.yaml").read_text(encoding="utf-8")


@pytest.mark.slow
def test_print_config_command(tmp_path: Path) -> None:
    result = run_keyseal("server", "--print-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "server-local.yaml").read_text(encoding="utf-8")
    assert result.stdout.startswith("# keyseal trust-domain server")
    (tmp_path / "server.yaml").write_text(result.stdout)
    assert load_config(tmp_path / "server.yaml").store_path == Path("/var/lib/keyseal")
