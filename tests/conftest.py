"""Fixtures that start real peers on 127.0.0.1: the moto KMS server, a throwaway gpg home, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.kms_emulator import KmsEmulator

REGION = "us-east-1"


@pytest.fixture(scope="session")
def kms_emulator() -> Iterator[KmsEmulator]:
    emulator = KmsEmulator().start()
    yield emulator
    emulator.stop()


@pytest.fixture
def aws_env(kms_emulator: KmsEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Environment that points boto3 (in this process and in children) at the emulator, and nowhere else."""
    env = {
        "AWS_ENDPOINT_URL_KMS": kms_emulator.endpoint,
        "AWS_ENDPOINT_URL_STS": kms_emulator.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials-absent"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kms_emulator.calls.clear()
    return env


@pytest.fixture
def kms_client(aws_env: dict[str, str]):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("kms", region_name=REGION, endpoint_url=aws_env["AWS_ENDPOINT_URL_KMS"])


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_keyseal(*args: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None,
                input: bytes | None = None) -> Result:
    """Run the CLI in a child process, as a user would, and capture what it printed."""
    child_env = dict(os.environ)
    if env:
        child_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "keyseal", *map(str, args)],
        cwd=cwd,
        env=child_env,
        input=input,
        capture_output=True,
        timeout=300,
        check=False,
    )
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def assert_one_line_error(result: Result) -> None:
    """Bad input: non-zero exit, exactly one line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keyseal: error: "), lines[0]


@pytest.fixture
def cli():  # type: ignore[no-untyped-def]
    return run_keyseal


@dataclass
class Gpg:
    home: Path

    def run(self, *args: str | os.PathLike[str], input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--no-tty", "--status-fd", "2", *map(str, args)],
            input=input,
            capture_output=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def gpg(tmp_path: Path) -> Iterator[Gpg]:
    """A throwaway GnuPG home; its agent is killed afterwards."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    yield Gpg(home)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)


def sqv_verify(keyring: Path, signature: Path, data: Path) -> subprocess.CompletedProcess[bytes]:
    """Verify with sqv (Sequoia's stand-alone verifier): an independent OpenPGP implementation."""
    sqv = shutil.which("sqv")
    assert sqv, "sqv is required (Debian package sqv); .ci/run installs it"
    return subprocess.run([sqv, "--keyring", str(keyring), str(signature), str(data)],
                          capture_output=True, timeout=120, check=False)
