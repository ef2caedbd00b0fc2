"""Fixtures that start real peers on 127.0.0.1: the moto KMS server, a throwaway gpg home, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.kms_emulator import KmsEmulator
from tests.harness.kube_api import KubeApi
from tests.harness.openbao import OpenBao
from tests.harness.softhsm import SoftHsm

REGION = "us-east-1"


@pytest.fixture(scope="session", autouse=True)
def keyseal_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Per-session (per xdist worker) KEYSEAL_HOME: the default local KEK and the seen-versions ledger live
    here, never in the real ~/.config/keyseal; children started by run_keyseal inherit it."""
    home = tmp_path_factory.mktemp("keyseal-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEYSEAL_HOME", str(home))
        patch.delenv("KEYSEAL_KEK", raising=False)
        # The session's tests share this home's audit log, and a worker runs for minutes: with the default
        # intervals a checkpoint (one more signature by the key that signed) would fall in whichever test writes
        # the 1000th line or signs first after 5 minutes, and add a call to a test that counts its KMS, Transit
        # or PKCS#11 calls. Tests of checkpoints set their own intervals.
        patch.setenv("KEYSEAL_AUDIT_CHECKPOINT_LINES", "1000000")
        patch.setenv("KEYSEAL_AUDIT_CHECKPOINT_SECONDS", "1000000")
        # keyseal-gpg verifies in its own process unless a test asks for the verification server (and stops it):
        # a server per test's context would outlive the test (tests/test_gpg_server.py).
        patch.setenv("KEYSEAL_GPG_SERVER", "off")
        yield home


@pytest.fixture(scope="session", autouse=True)
def empty_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """HOME is an empty directory for the whole run, here and in children: a test (or a benchmark a test runs)
    that writes under the user's home, through keyseal's defaults or a tool's, fails the session at its end."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield home
    left = sorted(str(path.relative_to(home)) for path in home.rglob("*"))
    assert not left, f"tests wrote under HOME ({home}): {', '.join(left[:10])}"


@pytest.fixture(scope="session", autouse=True)
def agent_socket_dirs() -> Iterator[None]:
    """The agent tests' socket directories (under /tmp, where other users can reach them) go at the session's
    end, as every other temporary directory does."""
    yield
    harness = sys.modules.get("tests.harness.agent")
    if harness is not None:
        harness.remove_socket_dirs()


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeApi]:
    """A Kubernetes-like API on 127.0.0.1 (kmock, with PUT, resourceVersion and conditional delete added), one
    per test process; tests keep apart by namespace."""
    api = KubeApi().start()
    yield api
    api.stop()


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own in the shared Kubernetes API."""
    return f"ns-{uuid.uuid4().hex[:8]}"


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
    kms_emulator.allow_all()  # lift denials and injected faults a previous test set
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


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A SoftHSM2 token store for this test process; SoftHSM reads SOFTHSM2_CONF once, so it is set here."""
    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm")).setup()
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    yield hsm
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A real OpenBao dev server on 127.0.0.1 (Transit enabled, audit log on) for this test process."""
    server = OpenBao(tmp_path_factory.mktemp("openbao")).start()
    yield server
    server.stop()


VAULT_ENV_NAMES = ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_NAMESPACE", "VAULT_CACERT", "BAO_ADDR", "BAO_TOKEN",
                   "BAO_NAMESPACE", "BAO_CACERT", "KEYSEAL_VAULT_TOKEN_FILE", "KEYSEAL_VAULT_K8S_ROLE",
                   "KEYSEAL_VAULT_K8S_MOUNT", "KEYSEAL_VAULT_K8S_TOKEN_FILE")


@pytest.fixture
def vault_env(openbao: OpenBao, monkeypatch: pytest.MonkeyPatch,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment that points keyseal (here and in children) at the OpenBao server with the root token; HOME
    is a fresh directory so the CLI's ~/.vault-token fallback never reads the real one."""
    for name in VAULT_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")  # outside tmp_path: tests list what they wrote there
    env = {"VAULT_ADDR": openbao.address, "VAULT_TOKEN": "root", "HOME": str(home)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(params=["directory", "kubernetes"])
def entry_cli(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """`keyseal entry ... --config` on either store, in a child process; `.config` (parsed), `.config_file`,
    `.env` and `.api_client` (the Kubernetes peer's, or None) for checks from the test's side."""
    import yaml

    from keyseal._internal.ca.config import parse_config
    from tests.harness.ca import base_config

    overrides: dict[str, Any] = {}
    env = {"KUBECONFIG": str(tmp_path / "no-kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    kube_api: KubeApi | None = None
    if request.param == "kubernetes":
        kube_api = request.getfixturevalue("kube_api")
        overrides["store"] = {"type": "kubernetes", "kubernetes": {
            "namespace": request.getfixturevalue("namespace"), "apiServer": kube_api.url}}
    config = base_config(tmp_path, **overrides)
    config_file = tmp_path / "server.yaml"
    config_file.write_text(yaml.safe_dump(config))

    def run(*args: str) -> Any:
        return run_keyseal("entry", *args, "--config", config_file, env=env)

    run.config = parse_config(config)  # type: ignore[attr-defined]
    run.config_file = config_file  # type: ignore[attr-defined]
    run.env = env  # type: ignore[attr-defined]
    run.api_client = kube_api.api_client() if kube_api is not None else None  # type: ignore[attr-defined]
    return run
