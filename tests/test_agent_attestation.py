"""Workload attestation against a process that changes what it is after it connected: a real fork and exec on a
real Unix socket, the agent's Workload API socket or a plain one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from spiffe import WorkloadApiClient

from keyseal._internal.agent.attestation import peer_credentials, selectors_of
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from tests.harness.agent import (
    AGENT_ID,
    CHILD,
    DROP_ROOT,
    Node,
    end,
    fetch_as,
    socket_dir,
    spawn,
    start_agent,
    start_server,
)
from tests.harness.ca import TRUST_DOMAIN

SLEEP = "/usr/bin/sleep"
PYTHON = os.path.realpath(sys.executable)

# Connects as `uid`, forks; the process that connected execs /usr/bin/sleep (same pid, same start time), and the
# child speaks gRPC on the inherited connection through a local socket of its own.
EXEC_AFTER_CONNECT = DROP_ROOT + r"""
import os, shutil, signal, socket, sys, tempfile, threading, time
import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

path, uid, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
drop_root(uid)
connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
connection.connect(path)
time.sleep(delay)
if os.fork():
    os.execv("/usr/bin/sleep", ["sleep", "60"])
parent = os.getppid()
local_dir = tempfile.mkdtemp()
try:
    deadline = time.monotonic() + 10
    while True:
        try:
            if os.readlink(f"/proc/{parent}/exe") == "/usr/bin/sleep":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the parent did not exec"
        time.sleep(0.01)
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local.bind(local_dir + "/s")
    local.listen(1)

    def pump(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve():
        client, _ = local.accept()
        local.close()  # one connection: gRPC's reconnects are refused
        threading.Thread(target=pump, args=(client, connection), daemon=True).start()
        pump(connection, client)

    threading.Thread(target=serve, daemon=True).start()
    with grpc.insecure_channel("unix:" + local_dir + "/s") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            answer = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10,
                                             metadata=[("workload.spiffe.io", "true")]))
            print("ID", answer.svids[0].spiffe_id, flush=True)
        except grpc.RpcError as exc:
            print("ERROR", exc.code().name, flush=True)
finally:
    shutil.rmtree(local_dir, ignore_errors=True)
    os.kill(parent, signal.SIGKILL)
"""

# Connects, says so, waits for a line on stdin, then execs /usr/bin/sleep.
CONNECT_THEN_EXEC = r"""
import os, socket, sys
connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
connection.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
os.execv("/usr/bin/sleep", ["sleep", "60"])
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("attestation")
    server = start_server(tmp)
    node = start_agent(server, tmp)
    node.entry("/ns/a/sleep", f"unix:path:{SLEEP}")
    node.entry("/ns/a/python", f"unix:path:{PYTHON}", f"unix:uid:{os.getuid()}")
    node.agent.cache.sync()
    yield node
    node.stop()
    server.shutdown()


def _foreign_writers(node: Node) -> int:
    text = node.agent.metrics.render(node.agent.cache).decode()
    lines = [x for x in text.splitlines() if 'connections_closed_total{reason="foreign_writer"}' in x]
    return sum(int(line.split()[-1]) for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 0.0], ids=["exec-after-accept", "exec-at-once"])
def test_a_process_that_execs_after_connecting_does_not_get_the_binarys_identity(node: Node, delay: float) -> None:
    """The attack: the process that connected becomes /usr/bin/sleep (an entry's only selector is its path); the
    child it forked, another program running as a user with no entry, asks for an SVID on that connection. It
    must get none, whether the agent accepted the connection before the exec or after it."""
    closed_before = _foreign_writers(node)
    process = spawn(EXEC_AFTER_CONNECT, str(node.socket), "1003", str(delay))
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        end(process)
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"{lines!r}; stderr: {stderr.strip()[-2000:]}"
    assert lines[0].startswith("ERROR"), lines[0]
    assert "/ns/a/sleep" not in stdout
    assert _foreign_writers(node) == closed_before + 1  # the child's first bytes closed the connection


def test_a_process_running_the_binary_gets_the_path_identity(node: Node) -> None:
    with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
        assert str(client.fetch_x509_svid().spiffe_id) == f"spiffe://{TRUST_DOMAIN}/ns/a/python"


def test_the_executable_is_the_one_seen_when_the_connection_was_accepted(tmp_path: Path) -> None:
    """Attested at accept as the interpreter; after the exec, /proc/<pid>/exe names /usr/bin/sleep, a different
    file: neither path is given."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)
    process = spawn(CONNECT_THEN_EXEC, str(tmp_path / "s"))
    try:
        listener.settimeout(30)
        connection, _ = listener.accept()
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "connected"
        credentials = peer_credentials(connection)
        assert f"unix:path:{PYTHON}" in selectors_of(credentials)
        process.stdin.write("go\n")
        process.stdin.flush()
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{process.pid}/exe") != SLEEP:
            assert time.monotonic() < deadline, "the child did not exec"
            time.sleep(0.01)
        assert [s for s in selectors_of(credentials) if s.startswith("unix:path:")] == []
        assert {f"unix:uid:{os.getuid()}", f"unix:gid:{os.getgid()}"} <= selectors_of(credentials)
        connection.close()
    finally:
        end(process)
        listener.close()


# Connects as `uid`, writes a whole FetchX509SVID request, forks; the process that connected execs /usr/bin/sleep.
# The child says "ready" once the exec happened, then only reads (it never writes, so no foreign-writer close),
# for at most 6 s, and prints what it got.
PREWRITTEN_REQUEST = DROP_ROOT + r"""
import os, signal, socket, struct, sys, time
from spiffe._proto import workload_pb2

path, uid = sys.argv[1], int(sys.argv[2])
drop_root(uid)

def frame(kind, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def literal(name, value):
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

headers = b"".join(literal(k, v) for k, v in [
    (":method", "POST"), (":scheme", "http"), (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
    (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
    ("workload.spiffe.io", "true")])
request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 4, 1, headers)
           + frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
connection.connect(path)
connection.sendall(request)
if os.fork():
    os.execv("/usr/bin/sleep", ["sleep", "60"])
parent = os.getppid()
deadline = time.monotonic() + 10
while True:
    try:
        if os.readlink(f"/proc/{parent}/exe") == "/usr/bin/sleep":
            break
    except OSError:
        pass
    assert time.monotonic() < deadline, "the parent did not exec"
    time.sleep(0.01)
print("ready", flush=True)
buffer, data = b"", b""
deadline = time.monotonic() + 6
try:
    while (left := deadline - time.monotonic()) > 0:
        connection.settimeout(left)
        chunk = connection.recv(65536)
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            length = int.from_bytes(buffer[:3], "big")
            if buffer[3] == 0 and int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF == 1:
                data += buffer[9:9 + length]
            buffer = buffer[9 + length:]
        if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
            break
except OSError:
    pass
os.kill(parent, signal.SIGKILL)
if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
    answer = workload_pb2.X509SVIDResponse.FromString(data[5:5 + int.from_bytes(data[1:5], "big")])
    print("GOT", " ".join(s.spiffe_id for s in answer.svids), flush=True)
else:
    print("NOTHING", flush=True)
"""

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))


@pytest.fixture(scope="module")
def agent_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`keyseal agent` as a process of its own, so a test can stop it (SIGSTOP): a connection made then waits in
    the listen backlog, provably not accepted, for as long as the test wants."""
    tmp = tmp_path_factory.mktemp("attestation-process")
    server = start_server(tmp)
    sock_dir = socket_dir()
    sock = sock_dir / "agent.sock"
    process: subprocess.Popen[str] | None = None
    try:
        token, _ = join_tokens_for(server.config).issue("node-1", timedelta(minutes=5))
        entries = entry_store_for(server.config)
        entries.create(f"spiffe://{TRUST_DOMAIN}/ns/a/sleep", AGENT_ID, (f"unix:path:{SLEEP}",), 0, 0)
        entries.create(f"spiffe://{TRUST_DOMAIN}/ns/a/python", AGENT_ID,
                       (f"unix:path:{PYTHON}", f"unix:uid:{os.getuid()}"), 0, 0)
        (tmp / "bundle.pem").write_text("".join(k.ca_pem for k, _ in server.manager.live()))
        config = {"trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
                  "trustBundleFile": str(tmp / "bundle.pem"), "joinToken": token, "socketPath": str(sock),
                  "socketMode": "0666", "syncInterval": 0.3}
        (tmp / "agent.yaml").write_text(json.dumps(config))
        process = subprocess.Popen([KEYSEAL, "agent", "--config", str(tmp / "agent.yaml")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 30
        while True:  # serving, with the entries synced
            assert process.poll() is None and time.monotonic() < deadline, "the agent did not start"
            if sock.exists() and fetch_as(os.getuid(), f"unix:{sock}").endswith("/ns/a/python"):
                break
            time.sleep(0.2)
        yield process, sock
    finally:
        if process is not None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        server.shutdown()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_request_written_before_an_exec_the_agent_accepts_after_gets_nothing(
        agent_process: tuple[subprocess.Popen[str], Path]) -> None:
    """The attack on the accept race, made certain: while the agent is stopped, a process connects, writes a
    complete request, and execs /usr/bin/sleep (an entry's only selector); then the agent runs again and accepts
    a connection whose process is sleep by now. The queued request carries the right pid, and the child that
    inherited the socket only reads. It must not get the sleep entry's SVID."""
    process, sock = agent_process
    os.kill(process.pid, signal.SIGSTOP)
    attacker: subprocess.Popen[str] | None = None
    try:
        attacker = spawn(PREWRITTEN_REQUEST, str(sock), "1003")
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready", attacker.communicate(timeout=30)[1][-2000:]
    finally:
        os.kill(process.pid, signal.SIGCONT)
    try:
        stdout, stderr = attacker.communicate(timeout=60)
    finally:
        end(attacker)
    assert stdout.strip() == "NOTHING", f"{stdout!r}; stderr: {stderr.strip()[-2000:]}"


@pytest.mark.slow
def test_a_client_whose_request_was_queued_before_accept_keeps_its_path_identity(
        agent_process: tuple[subprocess.Popen[str], Path]) -> None:
    """A real gRPC client (py-spiffe) writes its preface and request as soon as it connects, mostly before the
    agent accepts: it still gets its path identity (it answers the server's SETTINGS, which proves it)."""
    process, sock = agent_process
    os.kill(process.pid, signal.SIGSTOP)
    client: subprocess.Popen[str] | None = None
    try:
        client = spawn(CHILD, f"unix:{sock}", str(os.getuid()))
        time.sleep(3)  # it imports, connects and writes into the backlog of the stopped agent
    finally:
        os.kill(process.pid, signal.SIGCONT)
    try:
        stdout, stderr = client.communicate(timeout=60)
    finally:
        end(client)
    assert stdout.strip() == f"ID spiffe://{TRUST_DOMAIN}/ns/a/python", stderr[-2000:]
