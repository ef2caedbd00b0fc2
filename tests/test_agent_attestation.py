"""Workload attestation against a process that changes what it is after it connected: a real fork and exec on a
real Unix socket, the agent's Workload API socket or a plain one."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spiffe import WorkloadApiClient

from keyseal.agent.attestation import peer_credentials, selectors_of
from tests.harness.agent import DROP_ROOT, Node, end, spawn, start_agent, start_server
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
