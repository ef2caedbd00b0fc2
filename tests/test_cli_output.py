"""Results for scripts (`--json`) and for people (labelled lines), and shared options described once."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import yaml

from keyseal._internal.cli.main import cli
from keyseal._internal.cli.output import labelled
from tests.conftest import run_keyseal
from tests.harness.ca import base_config


def _command(*path: str) -> click.Command:
    command: click.Command = cli
    ctx = click.Context(cli)
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(ctx, name)
        assert found is not None, name
        command = found
    return command


def _help_of(command: click.Command, option: str) -> str:
    found = next(p for p in command.params if isinstance(p, click.Option) and option in p.opts)
    return found.help or ""


@pytest.mark.parametrize("path", [("keys", "mint"), ("sign",), ("keys", "export"), ("keys", "revoke")])
def test_every_kek_option_has_one_help(path: tuple[str, ...]) -> None:
    text = _help_of(_command(*path), "--kek")
    assert text == _help_of(_command("keys", "mint"), "--kek")
    assert "vault:[MOUNT/]KEY" in text and "awskms:<key ARN>" in text and "$KEYSEAL_KEK" in text


def test_labelled_lines_align() -> None:
    assert labelled([("a", 1), ("long label", "x")]) == "a:          1\nlong label: x\n"


@pytest.mark.slow
def test_keys_json(tmp_path: Path) -> None:
    env = {"KEYSEAL_HOME": str(tmp_path / "home")}
    created = run_keyseal("keys", "create", "--out", tmp_path / "k.key", "--type", "ed25519", "--json", env=env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout) == {"uri": f"file:{tmp_path / 'k.key'}", "type": "ed25519", "wrapped": True}
    minted = run_keyseal("keys", "mint", "--key", f"file:{tmp_path / 'k.key'}", "--name", "A", "--email",
                         "a@example.org", "-o", tmp_path / "a.asc", "--json", env=env)
    assert minted.returncode == 0, minted.stderr
    document = json.loads(minted.stdout)
    assert document["userID"] == "A <a@example.org>" and len(document["fingerprint"]) == 40
    (tmp_path / "f").write_text("x")
    signed = run_keyseal("sign", "--key", f"file:{tmp_path / 'k.key'}", tmp_path / "f", env=env)
    assert signed.returncode == 0, signed.stderr
    merged = run_keyseal("signatures", "merge", "--data", tmp_path / "f", "-o", tmp_path / "m.asc", "--json",
                         tmp_path / "f.asc")
    assert json.loads(merged.stdout)["signers"] == [document["fingerprint"]]
    audit = run_keyseal("audit", "verify", "--json", env=env)
    assert audit.returncode == 0, audit.stderr
    assert json.loads(audit.stdout)["chain"] == "intact"


@pytest.mark.slow
def test_entry_json(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(base_config(tmp_path)))
    (tmp_path / "store").mkdir()
    token = run_keyseal("entry", "join-token", "--config", tmp_path / "server.yaml", "--agent", "n1", "--json")
    assert token.returncode == 0, token.stderr
    document = json.loads(token.stdout)
    assert document["agentID"] == "spiffe://example.org/keyseal/agent/n1" and len(document["token"]) > 20
    plain = run_keyseal("entry", "join-token", "--config", tmp_path / "server.yaml", "--agent", "n2")
    assert len(plain.stdout.split()) == 1  # the token alone on stdout, for TOKEN=$(...)
    assert plain.stderr.strip() == "agent SPIFFE ID: spiffe://example.org/keyseal/agent/n2"
    entry = run_keyseal("entry", "create", "--config", tmp_path / "server.yaml", "--spiffe-id",
                        "spiffe://example.org/w", "--parent", document["agentID"], "--selector", "unix:uid:0",
                        "--json")
    assert entry.returncode == 0, entry.stderr
    assert json.loads(entry.stdout)["spiffe_id"] == "spiffe://example.org/w"


@pytest.mark.slow
def test_wkd_build_json(tmp_path: Path) -> None:
    env = {"KEYSEAL_HOME": str(tmp_path / "home")}
    assert run_keyseal("keys", "create", "--out", tmp_path / "k.key", env=env).returncode == 0
    assert run_keyseal("keys", "mint", "--key", f"file:{tmp_path / 'k.key'}", "--name", "R", "--email",
                       "release@example.org", "-o", tmp_path / "r.asc", env=env).returncode == 0
    built = run_keyseal("wkd", "build", tmp_path / "r.asc", "--domain", "example.org", "-o", tmp_path / "site",
                        "--json")
    assert built.returncode == 0, built.stderr
    (item,) = json.loads(built.stdout)["files"]
    assert item["address"] == "release@example.org" and Path(item["path"]).is_file()
