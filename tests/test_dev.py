"""`keyseal dev`: a whole trust domain on 127.0.0.1 in one command, the way a newcomer runs it from a fresh clone
(the installed `keyseal`, a child process), within a bounded time and leaving nothing running; and the safe
defaults of a server started from a file that names only its trust domain."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from keyseal._internal.agent.config import load_agent_config
from keyseal._internal.ca.config import load_config
from tests.conftest import run_keyseal

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))
BOUND = 90  # seconds: far more than the ~2 s it takes on an idle machine


def fields(stdout: str) -> dict[str, str]:
    """The labelled lines (`label:  value`) as a mapping."""
    pairs = (line.split(":", 1) for line in stdout.splitlines() if ":" in line)
    return {label.strip(): value.strip() for label, value in pairs}


def port_closed(url: str) -> bool:
    port = int(url.split("://", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_dev_check_fetches_svids_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run([KEYSEAL, "dev", "--check"], capture_output=True, text=True, timeout=BOUND, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < BOUND
    shown = fields(result.stdout)
    assert shown["trust domain"] == "example.org"
    assert shown["SPIFFE ID"].startswith("spiffe://example.org/user/")
    assert shown["server"].startswith("https://127.0.0.1:") and "127.0.0.1 only" in shown["server"]
    assert shown["agent socket"].startswith(f"unix:{tmp_path}/keyseal-dev-")
    assert shown["workloads use"] == f"export SPIFFE_ENDPOINT_SOCKET={shown['agent socket']}"
    for label in ("X.509-SVID expires", "JWT-SVID expires"):
        assert shown[label][:4].isdigit() and "Z" in shown[label]
    assert shown["check"].startswith("passed")
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    # Nothing left: the temporary directory (keys, KEK, socket) is gone, the port is closed.
    assert list(tmp_path.iterdir()) == []
    assert port_closed(shown["server"])


@pytest.mark.slow
def test_dev_dir_is_kept_private_reused_and_its_files_load(tmp_path: Path) -> None:
    directory = tmp_path / "td"
    first = run_keyseal("dev", "--check", "--json", "--dir", directory)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["check"] == "passed" and report["kept"] is True
    assert report["socket"] == f"unix:{directory}/agent.sock"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    # What it ran is what `keyseal server` / `keyseal agent` would run from the files it leaves.
    server = load_config(directory / "server.yaml")
    assert (server.listen_host, server.store_path) == ("127.0.0.1", directory / "store")
    assert server.local_kek_file == directory / "kek"
    agent = load_agent_config(directory / "agent.yaml")
    assert agent.socket_mode == 0o600 and agent.socket_path == directory / "agent.sock"
    assert not agent.socket_path.exists()
    # A second run reuses the keys and resumes the agent's saved SVID: no new join token, the same CA.
    second = run_keyseal("dev", "--check", "--json", "--dir", directory)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["bundleSHA256"] == report["bundleSHA256"]
    assert not (directory / "join-token").exists()
    assert "WARNING" not in second.stderr


@pytest.mark.slow
def test_dev_runs_until_interrupted(tmp_path: Path) -> None:
    directory = tmp_path / "td"
    process = subprocess.Popen([KEYSEAL, "dev", "--dir", str(directory)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + BOUND
        while not any(line.startswith("running:") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, process.stderr
            lines.append(process.stdout.readline())
        shown = fields("".join(lines))
        sock = directory / "agent.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopped:" in out
    assert not sock.exists() and port_closed(shown["server"])


@pytest.mark.slow
def test_dev_refuses_a_socket_path_too_long(tmp_path: Path) -> None:
    result = run_keyseal("dev", "--check", "--dir", tmp_path / ("d" * 120))
    assert result.returncode != 0
    assert result.stderr.startswith("keyseal: error: --dir") and "too long for a Unix socket" in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("document", "needle"), [
    ({"trustDomain": "example.org"}, "store.directory.path is not set"),
    ({"trustDomain": "example.org", "store": {"directory": {"path": "STORE"}}}, "keyWrapping.local.kekFile is not set"),
])
def test_server_with_only_a_trust_domain_is_refused(tmp_path: Path, document: dict[str, object], needle: str) -> None:
    """No default writes into the host's /var/lib/keyseal or wraps the CA keys with the user's own KEK."""
    text = json.dumps(document).replace("STORE", str(tmp_path / "store"))
    (tmp_path / "server.yaml").write_text(text)
    result = run_keyseal("server", "--config", tmp_path / "server.yaml", env={"KEYSEAL_HOME": str(tmp_path / "h")})
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "keyseal dev" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "store").exists() and not (tmp_path / "h").exists()


def test_server_listens_on_loopback_unless_told(tmp_path: Path) -> None:
    document = {"trustDomain": "example.org", "keyWrapping": {"local": {"kekFile": str(tmp_path / "kek")}},
                "store": {"directory": {"path": str(tmp_path / "store")}}}
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(document))
    config = load_config(tmp_path / "server.yaml")
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8443)


def test_dev_without_the_agent_extras_says_what_to_install(tmp_path: Path) -> None:
    code = "import sys\nsys.modules['grpc'] = None\nfrom keyseal._internal.cli.quick import main\nmain()\n"
    result = subprocess.run([sys.executable, "-c", code, "dev", "--check", "--dir", str(tmp_path / "td")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == "keyseal: error: keyseal dev runs the server and the agent, which need grpc: pip install " \
                            "'keyseal[server,agent]'\n"
    assert not (tmp_path / "td").exists()
