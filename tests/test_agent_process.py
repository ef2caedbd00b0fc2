"""`keyseal agent` as a process, the way an operator starts it: what it writes to stderr is keyseal's own log and
nothing a dependency printed at import (the `spiffe` package trips a `cryptography` deprecation warning)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from spiffe import WorkloadApiClient

from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from tests.harness.agent import AGENT_ID, socket_dir, start_server
from tests.harness.ca import TRUST_DOMAIN

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))


def _no_warning_lines(stderr: str) -> None:
    warned = [line for line in stderr.splitlines() if "Warning" in line]
    assert warned == [], stderr


def test_agent_help_prints_no_warning() -> None:
    result = subprocess.run([KEYSEAL, "agent", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    _no_warning_lines(result.stderr)


def test_agent_start_up_prints_no_dependency_warning(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    sock_dir = socket_dir()
    process: subprocess.Popen[str] | None = None
    try:
        token, _ = join_tokens_for(server.config).issue("node-1", timedelta(minutes=5))
        entry_store_for(server.config).create(f"spiffe://{TRUST_DOMAIN}/ns/a/web", AGENT_ID,
                                              (f"unix:uid:{os.getuid()}",), 0, 0)
        (tmp_path / "bundle.pem").write_text("".join(k.ca_pem for k, _ in server.manager.live()))
        sock = sock_dir / "agent.sock"
        config = {
            "trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
            "trustBundleFile": str(tmp_path / "bundle.pem"), "joinToken": token, "socketPath": str(sock),
            "syncInterval": 0.3,
        }
        (tmp_path / "agent.yaml").write_text(json.dumps(config))  # JSON is YAML
        # The default warning filters of a plain `python` run, so an import-time warning would be printed.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        process = subprocess.Popen([KEYSEAL, "agent", "--config", str(tmp_path / "agent.yaml")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the agent did not open its socket"
            time.sleep(0.05)
        with WorkloadApiClient(f"unix:{sock}", default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/a/web"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert "serving the SPIFFE Workload API" in stderr
        _no_warning_lines(stderr)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.communicate()
        server.shutdown()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.parametrize("module", ["keyseal._internal.agent.workload", "keyseal._internal.agent.main"])
def test_importing_the_agent_raises_no_warning(module: str) -> None:
    """Every warning turned into an error: the import succeeds only if nothing warns during it."""
    result = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
