"""Shared setup for the keyseal-gpg tests: release keys registered in a private keyseal home, keyseal-gpg run as a
release tool runs it, and a private environment (HOME, GNUPGHOME, KEYSEAL_HOME) so no tool touches the user's
files."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keyseal._internal.openpgp.armor import dearmor_or_binary
from tests.conftest import Result, run_keyseal
from tests.formats_peers import ok, script
from tests.harness.release_keys import ReleaseKey, make_key


@dataclass(frozen=True)
class Registered:
    """Keys registered with `keyseal git-setup` (keys.toml + keyring) in a private home."""

    root: Path
    env: dict[str, str]
    keys: dict[str, ReleaseKey]

    def keyring(self, label: str) -> Path:
        """The key's certificate as a binary keyring (gpg --keyring, dscverify, gpgv, rpm take it)."""
        path = self.root / f"{label}.gpg"
        if not path.exists():
            path.write_bytes(dearmor_or_binary(self.keys[label].cert.read_bytes()))
        return path

    def gpg(self, *args: str | os.PathLike[str], input: bytes = b"", cwd: Path | None = None,
            extra_env: dict[str, str] | None = None) -> Result:
        """Run keyseal-gpg (the console script, as a tool finds it) in the private environment."""
        proc = subprocess.run([script("keyseal-gpg"), *map(str, args)], input=input, cwd=cwd,
                              env={**os.environ, **self.env, **(extra_env or {})}, capture_output=True,
                              timeout=120, check=False)
        return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    def run(self, *args: str | os.PathLike[str], input: bytes | None = None, cwd: Path | None = None,
            extra_env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        """Run a real tool in the private environment (keyseal-gpg's directory first on PATH)."""
        path = f"{Path(script('keyseal-gpg')).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return subprocess.run([*map(str, args)], input=input.decode() if input is not None else None, cwd=cwd,
                              env={**os.environ, **self.env, "PATH": path, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)


def register(root: Path, labels: dict[str, tuple[str, str]]) -> Registered:
    """Make keys (label -> (type, email)) and register each with keyseal git-setup in a private home."""
    home, gnupg, keyseal_home = root / "home", root / "gnupg", root / "keyseal-home"
    home.mkdir(parents=True)
    gnupg.mkdir(mode=0o700)
    env = {"HOME": str(home), "GNUPGHOME": str(gnupg), "KEYSEAL_HOME": str(keyseal_home), "LC_ALL": "C.UTF-8",
           "GPG_TTY": ""}
    keys: dict[str, ReleaseKey] = {}
    for label, (key_type, email) in labels.items():
        keys[label] = make_key(root / "keys", label, key_type, email=email)
        ok(run_keyseal("git-setup", "--key", keys[label].uri, "--cert", keys[label].cert, cwd=root, env=env))
    return Registered(root, env, keys)


def kill_agent(registered: Registered) -> None:
    subprocess.run(["gpgconf", "--homedir", registered.env["GNUPGHOME"], "--kill", "all"], capture_output=True,
                   check=False)
