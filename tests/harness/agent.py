"""Helpers for the agent tests: a trust-domain server on 127.0.0.1 and a node agent joined to it, with a
Workload API socket in a directory that unprivileged test users can reach."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.agent.main import Agent
from keyseal._internal.ca.config import Config, parse_config
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from keyseal._internal.ca.server import CaServer
from keyseal._internal.spiffe.tls import load_chain
from tests.harness.ca import TRUST_DOMAIN, base_config

AGENT_ID = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"


def start_server(tmp: Path, clock: Any = None, **overrides: Any) -> CaServer:
    extra = {"clock": clock} if clock is not None else {}
    server = CaServer(parse_config(base_config(tmp, **overrides)), rotation_thread=False, **extra)
    server.start()
    server.start_background()
    return server


_SOCKET_DIRS: list[Path] = []  # removed at the session's end (conftest), whichever test made them


def socket_dir() -> Path:
    """A directory under /tmp that other users can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="keyseal-agent-test-", dir="/tmp"))
    path.chmod(0o755)
    _SOCKET_DIRS.append(path)
    return path


def remove_socket_dirs() -> None:
    """Remove every directory socket_dir made in this process (a test that stops early leaves its own)."""
    while _SOCKET_DIRS:
        shutil.rmtree(_SOCKET_DIRS.pop(), ignore_errors=True)


@dataclass
class Node:
    server: CaServer
    agent: Agent
    socket: Path

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket}"

    def entry(self, spiffe_path: str, *selectors: str, x509_ttl: int = 0, jwt_ttl: int = 0) -> str:
        store = entry_store_for(self.server.config)
        return store.create(f"spiffe://{TRUST_DOMAIN}{spiffe_path}", AGENT_ID, selectors, x509_ttl, jwt_ttl).entry_id

    def stop(self) -> None:
        self.agent.stop()
        shutil.rmtree(self.socket.parent, ignore_errors=True)


def start_agent(server: CaServer, tmp: Path, sync_interval: float = 0.3, token: str | None = None,
                metrics: bool = False, bundle_pem: str | None = None, state_dir: Path | None = None,
                workload_api: dict[str, Any] | None = None, more_servers: tuple[CaServer, ...] = (),
                token_file: Path | None = None) -> Node:
    """An agent joined to `server` (and failing over to `more_servers`, as serverURLs); with `token_file`, the
    join token is read from that file (joinTokenFile) instead of given in the configuration."""
    config: Config = server.config
    if token is None:
        token, _ = join_tokens_for(config).issue("node-1", timedelta(minutes=5))
    (tmp / "bundle.pem").write_text(bundle_pem or "".join(k.ca_pem for k, _ in server.manager.live()))
    sock = socket_dir() / "agent.sock"
    data: dict[str, Any] = {
        "trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
        "trustBundleFile": str(tmp / "bundle.pem"), "joinToken": token, "socketPath": str(sock),
        "socketMode": "0666", "syncInterval": sync_interval,
    }
    if more_servers:
        data["serverURLs"] = [f"https://127.0.0.1:{other.port}" for other in more_servers]
    if token_file is not None:
        token_file.write_text(token + "\n")
        del data["joinToken"]
        data["joinTokenFile"] = str(token_file)
    if metrics:
        data["metrics"] = {"listen": "127.0.0.1:0"}
    if state_dir is not None:
        data["stateDir"] = str(state_dir)
    if workload_api is not None:
        data["workloadAPI"] = workload_api
    try:
        agent = Agent(parse_agent_config(data, environ={}))
        agent.start()
    except BaseException:
        shutil.rmtree(sock.parent, ignore_errors=True)
        raise
    return Node(server, agent, sock)


CHILD = """
import os, sys
import grpc, spiffe.workloadapi.workload_api_client  # imported as root: the interpreter lives under /root (0700)
from spiffe import WorkloadApiClient
uid = int(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
assert os.getuid() == uid and os.geteuid() == uid
try:
    with WorkloadApiClient(sys.argv[1], default_timeout=10) as client:
        print("ID", client.fetch_x509_svid().spiffe_id)
except Exception as exc:
    print("ERROR", type(exc).__name__, exc)
"""


def fetch_as(uid: int, endpoint: str) -> str:
    """py-spiffe's WorkloadApiClient in a child process that drops root for `uid` (uid = gid) before connecting.

    Returns the child's one result line from stdout. Its stderr belongs to the libraries it imports (warnings,
    gRPC notices) and is never part of the result; a child that printed no result fails with it instead."""
    result = subprocess.run([sys.executable, "-c", CHILD, endpoint, str(uid)], capture_output=True, text=True,
                            timeout=60, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin")}, check=False)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"child for uid {uid} printed {lines!r}; stderr: {result.stderr.strip()}"
    return lines[0]


Identity = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def tls_context(server: CaServer, identity: Identity | None, trust: str = "") -> ssl.SSLContext:
    """Trust the server's live CAs (and `trust`, PEM: the CA of a serving certificate from files); present
    `identity` (key, certificate) as the client certificate if given."""
    context = ssl.create_default_context(cadata="".join(k.ca_pem for k, _ in server.manager.live()) + trust)
    if identity is not None:
        key, certificate = identity
        load_chain(context, certificate.public_bytes(serialization.Encoding.PEM), key)
    return context


def post(connection: http.client.HTTPSConnection, path: str, document: dict[str, Any]) -> tuple[int, Any]:
    connection.request("POST", path, body=json.dumps(document).encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def agent_call(server: CaServer, identity: Identity | None, path: str,
               document: dict[str, Any] | None = None, trust: str = "") -> tuple[int, Any]:
    """One POST on a new TLS connection; ssl.SSLError / ConnectionError when the handshake is refused."""
    connection = http.client.HTTPSConnection("127.0.0.1", server.port,
                                             context=tls_context(server, identity, trust), timeout=10)
    try:
        return post(connection, path, document if document is not None else {})
    finally:
        connection.close()


DROP_ROOT = """
import os


def drop_root(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    assert os.getuid() == uid and os.geteuid() == uid
"""


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    """`python -c script args...` in a session of its own (stdin, stdout piped) so `end()` can stop it and every
    process it forked. A script that drops root (DROP_ROOT) does so after its imports: the interpreter lives
    under /root (0700)."""
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/", start_new_session=True,
                            env={"PATH": os.environ.get("PATH", "/usr/bin")})


def end(process: subprocess.Popen[str]) -> None:
    """Stop a spawn()ed child and everything in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
