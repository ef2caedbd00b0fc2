"""Shared setup for the SSH, minisign and git tests: keys in each custody made through the CLI, and the real
verifiers (OpenSSH's ssh-keygen, minisign, git, gpg) run as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import Result, run_keyseal
from tests.harness.softhsm import USER_PIN, SoftHsm

FORMATS_TOKEN = "keyseal-formats"
_TOKENS: set[Path] = set()


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (Debian package {package}); scripts/test installs it"
    return path


def script(name: str) -> str:
    """A keyseal console script of this install (beside the test's Python), as git will run it."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} is missing: pip install -e . installs keyseal's console scripts"
    return str(path)


@dataclass
class Custody:
    """A key URI and the environment a child process needs to use it (PKCS#11 module and PIN)."""

    uri: str
    env: dict[str, str] = field(default_factory=dict)

    def keyseal(self, *args: str | os.PathLike[str], input: bytes | None = b"") -> Result:
        return run_keyseal(*args, env=self.env, input=input)


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def local_key(directory: Path, key_type: str) -> Custody:
    """A wrapped key file (the default `keys create --out`: envelope under the local KEK in $KEYSEAL_HOME)."""
    path = directory / f"{key_type}-{uuid.uuid4().hex[:6]}.key"
    created = ok(run_keyseal("keys", "create", "--out", path, "--type", key_type))
    assert created.stdout.strip() == f"file:{path}"
    assert b"PRIVATE KEY" not in path.read_bytes()  # wrapped, never a clear PEM
    return Custody(f"file:{path}")


def kms_key(key_type: str) -> Custody:
    """A non-exportable key in the KMS emulator (the caller holds the `aws_env` fixture)."""
    alias = f"alias/formats/{key_type}-{uuid.uuid4().hex[:8]}"
    created = ok(run_keyseal("keys", "create", "--kms", "--alias", alias, "--type", key_type))
    return Custody(created.stdout.split()[1])


def pkcs11_key(softhsm: SoftHsm, key_type: str) -> Custody:
    """A key generated inside a SoftHSM token; module and PIN come from the environment, as in CI."""
    if softhsm.root not in _TOKENS:
        softhsm.init_token(FORMATS_TOKEN)
        _TOKENS.add(softhsm.root)
    env = {**softhsm.env(), "KEYSEAL_PKCS11_MODULE": softhsm.module, "KEYSEAL_PKCS11_PIN": USER_PIN}
    uri = f"pkcs11:token={FORMATS_TOKEN};object={key_type}-{uuid.uuid4().hex[:6]}"
    custody = Custody(uri, env)
    ok(custody.keyseal("keys", "create", "--pkcs11", uri, "--type", key_type))
    return custody


def flip(path: Path, out: Path, index: int = 0) -> Path:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def ssh_keygen_verify(allowed_signers: Path, principal: str, namespace: str, signature: Path,
                      data: Path) -> subprocess.CompletedProcess[bytes]:
    """OpenSSH's own verifier: `ssh-keygen -Y verify`, data on stdin."""
    with data.open("rb") as stdin:
        return subprocess.run(
            [tool("ssh-keygen", "openssh-client"), "-Y", "verify", "-f", str(allowed_signers), "-I", principal,
             "-n", namespace, "-s", str(signature)],
            stdin=stdin, capture_output=True, timeout=60, check=False,
        )


def minisign_verify(public_key: Path, data: Path, signature: Path) -> subprocess.CompletedProcess[bytes]:
    """The minisign tool itself: `minisign -V`."""
    return subprocess.run(
        [tool("minisign", "minisign"), "-V", "-p", str(public_key), "-m", str(data), "-x", str(signature)],
        capture_output=True, timeout=60, check=False,
    )


__all__ = ["USER_PIN", "Custody", "flip", "kms_key", "local_key", "minisign_verify", "ok", "pkcs11_key",
           "script", "ssh_keygen_verify", "tool"]
