"""Helpers for the agent tests: a trust-domain server on 127.0.0.1 and a node agent joined to it, with a
Workload API socket in a directory that unprivileged test users can reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from keyseal.agent.config import parse_agent_config
from keyseal.agent.main import Agent
from keyseal.ca.config import Config, parse_config
from keyseal.ca.entries import entry_store_for, join_tokens_for
from keyseal.ca.server import CaServer
from tests.harness.ca import TRUST_DOMAIN, base_config

AGENT_ID = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"


def start_server(tmp: Path, **overrides: Any) -> CaServer:
    server = CaServer(parse_config(base_config(tmp, **overrides)), rotation_thread=False)
    server.start()
    server.start_background()
    return server


def socket_dir() -> Path:
    """A directory under /tmp that other users can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="keyseal-agent-test-", dir="/tmp"))
    path.chmod(0o755)
    return path


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


def start_agent(server: CaServer, tmp: Path, sync_interval: float = 0.3, token: str | None = None) -> Node:
    config: Config = server.config
    if token is None:
        token, _ = join_tokens_for(config).issue("node-1", timedelta(minutes=5))
    (tmp / "bundle.pem").write_text("".join(k.ca_pem for k, _ in server.manager.live()))
    sock = socket_dir() / "agent.sock"
    agent_config = parse_agent_config({
        "trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
        "trustBundleFile": str(tmp / "bundle.pem"), "joinToken": token, "socketPath": str(sock),
        "socketMode": "0666", "syncInterval": sync_interval,
    }, environ={})
    agent = Agent(agent_config)
    try:
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
    """py-spiffe's WorkloadApiClient in a child process that drops root for `uid` (uid = gid) before connecting."""
    result = subprocess.run([sys.executable, "-c", CHILD, endpoint, str(uid)], capture_output=True, text=True,
                            timeout=60, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin")}, check=False)
    return (result.stdout + result.stderr).strip()
