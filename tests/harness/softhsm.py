"""A real SoftHSM2 token store under a temporary SOFTHSM2_CONF, with tokens made by softhsm2-util.

SoftHSM reads SOFTHSM2_CONF once, at C_Initialize, so a test process uses one configuration for its whole life:
the session fixture sets it before any test loads the module. Child processes (the CLI) get it through `env()`.
SoftHSM also builds its slot list at C_Initialize: a token initialised later is seen only by new processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN = "so-pin-1234"
USER_PIN = "user-pin-5678"


@dataclass
class SoftHsm:
    root: Path
    module: str = MODULE
    tokens: dict[str, str] = field(default_factory=dict)  # label -> user PIN

    @property
    def conf(self) -> Path:
        return self.root / "softhsm2.conf"

    def setup(self) -> SoftHsm:
        assert os.path.exists(self.module), f"{self.module} missing: install the Debian package softhsm2"
        assert shutil.which("softhsm2-util"), "softhsm2-util missing: install the Debian package softhsm2"
        (self.root / "tokens").mkdir(parents=True, exist_ok=True)
        self.write_conf(self.conf)
        return self

    def write_conf(self, path: Path, disabled_mechanisms: tuple[str, ...] = ()) -> Path:
        """A configuration over the same token directory, optionally hiding some mechanisms.

        SoftHSM 2.6.1 parses `slots.mechanisms = -A,B,C` so that the first name keeps its '-' and matches nothing:
        CKM_MD5 goes first as a sacrificial entry, so every mechanism we name after it is really disabled.
        """
        lines = [
            f"directories.tokendir = {self.root / 'tokens'}",
            "objectstore.backend = file",
            "log.level = ERROR",
            "slots.removable = false",
        ]
        if disabled_mechanisms:
            lines.append("slots.mechanisms = -" + ",".join(("CKM_MD5", *disabled_mechanisms)))
        path.write_text("\n".join(lines) + "\n")
        return path

    def env(self, conf: Path | None = None) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(conf or self.conf)}

    def init_token(self, label: str, pin: str = USER_PIN) -> str:
        """Initialise a fresh token in the next free slot; returns its label."""
        proc = subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", pin],
            env={**os.environ, **self.env()},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        self.tokens[label] = pin
        self.rescan()
        return label

    def rescan(self) -> None:
        """If this process has SoftHSM loaded already, re-initialise it so that it lists the new token (it builds
        its slot list at C_Initialize). keyseal's sessions are closed first; tests close theirs after each test."""
        import sys

        backend = sys.modules.get("keyseal._internal.providers.pkcs11.session")
        loaded = getattr(backend, "_MODULES", {}).get(self.module) if backend is not None else None
        if loaded is not None:
            backend.close_all_sessions()  # type: ignore[union-attr]
            loaded.lib.reinitialize()

    def uri(self, token: str, obj: str | None = None, *, module: str | None = None, **query: str) -> str:
        """`pkcs11:token=T;object=O?module-path=M&...`, percent-encoding the values."""
        def enc(value: str) -> str:
            return urllib.parse.quote(value, safe="")

        path = f"token={enc(token)}" + (f";object={enc(obj)}" if obj is not None else "")
        params = {"module-path": module or self.module, **{k.replace("_", "-"): v for k, v in query.items()}}
        return f"pkcs11:{path}?" + "&".join(f"{k}={urllib.parse.quote(v, safe='/:')}" for k, v in params.items())
