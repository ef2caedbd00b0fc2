"""Errors a newcomer meets first say what was given and what to give instead, on one line, naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_keyseal

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Path]:
    env = {"KEYSEAL_HOME": str(tmp_path / "home")}
    key, cert, data = tmp_path / "k.key", tmp_path / "k.asc", tmp_path / "f.txt"
    assert run_keyseal("keys", "create", "--out", key, "--type", "ed25519", env=env).returncode == 0
    assert run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "A", "--email", "a@example.org",
                       "-o", cert, env=env).returncode == 0
    data.write_text("hello\n")
    assert run_keyseal("sign", "--key", f"file:{key}", data, env=env).returncode == 0
    return {"key": key, "cert": cert, "data": data, "home": tmp_path / "home"}


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyseal: error: "), stderr
    return lines[0]


def test_certificate_given_as_the_signature(signed: dict[str, Path]) -> None:
    result = run_keyseal("verify", "--cert", signed["cert"], signed["data"], signed["cert"])
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "is an OpenPGP key or certificate, not a signature" in line and "--cert" in line
    assert "packet of type" not in line


def test_non_openpgp_cert_names_the_file(signed: dict[str, Path], tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("these are not the keys you are looking for\n")
    result = run_keyseal("verify", "--cert", bogus, signed["data"])
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert f"{bogus} is not an OpenPGP certificate" in line and "keyseal keys mint" in line


def test_certificate_given_as_the_key(signed: dict[str, Path]) -> None:
    result = run_keyseal("sign", "--key", f"file:{signed['cert']}", signed["data"], "--force",
                         env={"KEYSEAL_HOME": str(signed["home"])})
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "is an OpenPGP certificate, not a key" in line and "--cert" in line
    assert "unencrypted" not in line


def test_missing_sdk_is_an_install_hint_not_a_failed_check(tmp_path: Path) -> None:
    """keys create --kek awskms:... without boto3 (hidden from the child): the hint alone."""
    code = ("import sys\nsys.modules['boto3'] = None\nsys.modules['botocore'] = None\n"
            "from keyseal._internal.cli.quick import main\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code, "keys", "create", "--out", str(tmp_path / "k.key"),
                             "--kek", f"awskms:{ARN}"], capture_output=True, text=True, timeout=60, check=False,
                            env={"KEYSEAL_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "pip install 'keyseal[aws]'" in line and "startup check failed" not in line
    assert not (tmp_path / "k.key").exists()
