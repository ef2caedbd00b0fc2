"""What a local user can take from the agent: connections, calls (each holds one of the agent's threads), file
descriptors, and the agent's JWT-SVID cache. Strangers run as their own uid in child processes; every count and
wait is bounded."""

from __future__ import annotations

import array
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keyseal._internal.ca.registry.stores import join_tokens_for
from tests.harness.agent import DROP_ROOT, Node, end, fetch_as, socket_dir, spawn, start_agent, start_server
from tests.harness.ca import TRUST_DOMAIN, wait_for

ME = f"unix:uid:{os.getuid()}"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/a/web"
HEADER = [("workload.spiffe.io", "true")]
KEYSEAL = str(Path(sys.executable).with_name("keyseal"))

# As `uid` (no entry): open `count` FetchX509Bundles streams over 8 connections and hold them until stdin says.
STREAMS = DROP_ROOT + r"""
import sys, grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc
path, uid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
drop_root(uid)
channels = [grpc.insecure_channel("unix:" + path) for _ in range(8)]
held, refused, other = [], 0, set()
for i in range(count):
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channels[i % len(channels)])
    stream = stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), timeout=120,
                                   metadata=[("workload.spiffe.io", "true")])
    try:
        next(stream)
        held.append(stream)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            refused += 1
        else:
            other.add(exc.code().name)
print("HELD", len(held), "REFUSED", refused, "OTHER", ",".join(sorted(other)) or "-", flush=True)
sys.stdin.readline()
"""

# As `uid`: open `count` connections that never send a byte; report how many the agent left open, hold them.
CONNECTIONS = DROP_ROOT + r"""
import select, socket, sys, time
path, uid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
drop_root(uid)
held = []
for _ in range(count):
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)  # blocking: waits while the listen backlog is full
    held.append(connection)
closed = set()
deadline, quiet = time.monotonic() + 20, time.monotonic() + 1.5
while time.monotonic() < min(deadline, quiet):
    readable = [c for c in held if c not in closed]
    for connection in select.select(readable, [], [], 0.2)[0]:
        try:
            data = connection.recv(1)
        except OSError:
            data = b""
        if not data:
            closed.add(connection)
            quiet = time.monotonic() + 1.5
print("OPEN", len(held) - len(closed), "CLOSED", len(closed), flush=True)
sys.stdin.readline()
"""


def _result(process: subprocess.Popen[str], timeout: float = 120) -> list[str]:
    """The child's one report line, split; it keeps running (holding what it opened) until end()."""
    assert process.stdout is not None
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()) if process.stdout else None,
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not (found and found[0].strip()):
        stderr = process.stderr.read()[-3000:] if process.poll() is not None and process.stderr else ""
        pytest.fail(f"the child reported nothing (exit {process.poll()}): {stderr}")
    return found[0].split()


def _threads() -> int:
    return threading.active_count()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("limits")
    server = start_server(tmp)
    node = start_agent(server, tmp)
    node.entry("/ns/a/web", ME)
    node.entry("/ns/a/user1001", "unix:uid:1001")
    node.agent.cache.sync()
    yield node
    node.stop()
    server.shutdown()


def _counted(node: Node, metric: str, reason: str) -> int:
    text = node.agent.metrics.render(node.agent.cache).decode()
    return sum(int(line.split()[-1]) for line in text.splitlines() if line.startswith(f'{metric}{{reason="{reason}"}}'))


def _legitimate_workloads_are_served(node: Node) -> None:
    with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
        assert str(client.fetch_x509_svid().spiffe_id) == WEB
    assert fetch_as(1001, node.endpoint) == f"ID spiffe://{TRUST_DOMAIN}/ns/a/user1001"


@pytest.mark.slow
def test_a_stranger_holding_many_streams_does_not_starve_other_users(node: Node) -> None:
    refused_before = _counted(node, "keyseal_agent_workload_api_calls_refused_total", "too_many_calls_for_uid")
    stranger = spawn(STREAMS, str(node.socket), "1003", "300")  # more than the default per-uid limit
    try:
        report = _result(stranger)
        held, refused = int(report[1]), int(report[3])
        assert report[5] == "-", report
        assert held + refused == 300
        limits = node.agent.config.workload_api
        assert held == limits.max_calls_per_uid < limits.max_calls  # the rest were refused at once
        assert _counted(node, "keyseal_agent_workload_api_calls_refused_total", "too_many_calls_for_uid") == \
            refused_before + refused
        _legitimate_workloads_are_served(node)
    finally:
        end(stranger)


@pytest.mark.slow
def test_many_idle_connections_take_neither_threads_nor_slots_from_others(node: Node) -> None:
    threads, fds = _threads(), _fds()
    closed_before = _counted(node, "keyseal_agent_workload_api_connections_closed_total",
                             "too_many_connections_for_uid")
    stranger = spawn(CONNECTIONS, str(node.socket), "1003", "300")  # more than the default per-uid limit
    try:
        report = _result(stranger)
        left_open, closed = int(report[1]), int(report[3])
        assert left_open + closed == 300
        assert left_open == node.agent.config.workload_api.max_connections_per_uid  # the rest closed at once
        assert _counted(node, "keyseal_agent_workload_api_connections_closed_total",
                        "too_many_connections_for_uid") == closed_before + closed
        assert _threads() - threads <= 8  # the relay has one thread, whatever the number of connections
        assert _fds() - fds <= 3 * left_open + 16
        _legitimate_workloads_are_served(node)
    finally:
        end(stranger)
    wait_for(lambda: _fds() - fds <= 16, timeout=10)  # a closed connection's descriptors are given back


@pytest.mark.slow
def test_connections_are_bounded_in_total_across_users(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, workload_api={"maxConnections": 20, "maxConnectionsPerUID": 8})
    strangers = [spawn(CONNECTIONS, str(node.socket), str(uid), "12") for uid in (1003, 1004, 1005)]
    try:
        reports = [_result(s) for s in strangers]
        opened = [int(r[1]) for r in reports]
        assert all(0 < n <= 8 for n in opened), reports
        assert sum(opened) <= 20, reports
    finally:
        for stranger in strangers:
            end(stranger)
        node.stop()
        server.shutdown()


@pytest.mark.slow
def test_idle_connections_are_closed_and_open_streams_kept(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, workload_api={"idleTimeout": "1s"})
    try:
        node.entry("/ns/a/web", ME)
        node.agent.cache.sync()
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.settimeout(10)
        idle.connect(str(node.socket))
        started = time.monotonic()
        while idle.recv(4096):  # the gRPC server's first frames, then the end: closed by the agent ...
            pass
        assert 0.5 < time.monotonic() - started < 8  # ... after about idleTimeout
        idle.close()
        with grpc.insecure_channel(node.endpoint) as channel:
            stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30)
            assert [s.spiffe_id for s in next(stream).svids] == [WEB]
            time.sleep(3)  # three idle timeouts with no change to send: the agent's keepalive pings go on
            node.entry("/ns/a/other", ME)
            node.agent.cache.sync()
            assert sorted(s.spiffe_id for s in next(stream).svids) == [f"spiffe://{TRUST_DOMAIN}/ns/a/other", WEB]
    finally:
        node.stop()
        server.shutdown()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_the_agent_backs_off_when_it_runs_out_of_file_descriptors(tmp_path: Path) -> None:
    """At the fd limit accept() fails while connections wait: the agent must wait, not spin, and serve again
    once descriptors are free."""
    server = start_server(tmp_path)
    sock_dir = socket_dir()
    sock = sock_dir / "agent.sock"
    process: subprocess.Popen[str] | None = None
    waiting: list[socket.socket] = []
    try:
        token, _ = join_tokens_for(server.config).issue("node-1", timedelta(minutes=5))
        from keyseal._internal.ca.registry.stores import entry_store_for
        from tests.harness.agent import AGENT_ID

        entry_store_for(server.config).create(WEB, AGENT_ID, (ME,), 0, 0)
        (tmp_path / "bundle.pem").write_text("".join(k.ca_pem for k, _ in server.manager.live()))
        config = {"trustDomain": TRUST_DOMAIN, "serverURL": f"https://127.0.0.1:{server.port}",
                  "trustBundleFile": str(tmp_path / "bundle.pem"), "joinToken": token, "socketPath": str(sock),
                  "syncInterval": "60s"}
        (tmp_path / "agent.yaml").write_text(json.dumps(config))
        process = subprocess.Popen([KEYSEAL, "agent", "--config", str(tmp_path / "agent.yaml")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: sock.exists() or process is None or process.poll() is not None, timeout=30)
        assert process.poll() is None, process.communicate()[1]
        with WorkloadApiClient(f"unix:{sock}", default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == WEB
        time.sleep(0.5)
        soft, hard = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{process.pid}/fd")), hard))
        for _ in range(4):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(10)
            connection.connect(str(sock))  # into the backlog: accept() fails with EMFILE for each
            waiting.append(connection)
        time.sleep(0.5)
        before = _cpu_seconds(process.pid)
        time.sleep(3)
        spent = _cpu_seconds(process.pid) - before
        assert spent < 0.5, f"the agent used {spent:.2f} s of CPU in 3 s while it could not accept"
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (soft, hard))
        for connection in waiting:
            connection.close()
        with WorkloadApiClient(f"unix:{sock}", default_timeout=10) as client:
            assert str(client.fetch_x509_svid().spiffe_id) == WEB
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        warned = [line for line in stderr.splitlines() if "cannot accept" in line]
        assert 1 <= len(warned) <= 3, stderr[-3000:]
    finally:
        for connection in waiting:
            connection.close()
        if process is not None and process.poll() is None:
            process.kill()
            process.communicate()
        server.shutdown()
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.slow
def test_expired_jwt_svids_leave_the_cache(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path)
    try:
        node.entry("/ns/a/web", ME, jwt_ttl=2)
        node.agent.cache.sync()
        with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
            token = client.fetch_jwt_svid({"db"})
        assert len(node.agent.cache.jwt) == 1
        wait_for(lambda: datetime.now(UTC).timestamp() > token.expiry + 0.5, timeout=10)
        node.agent.cache.sync()
        assert len(node.agent.cache.jwt) == 0
    finally:
        node.stop()
        server.shutdown()


def test_the_jwt_svid_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, workload_api={"jwtCacheSize": 4})
    try:
        node.entry("/ns/a/web", ME)
        node.agent.cache.sync()
        cache = node.agent.cache

        def cached(audience: str) -> object:
            return next((v for (_, a), v in cache.jwt.items() if a == (audience,)), None)

        with WorkloadApiClient(node.endpoint, default_timeout=10) as client:
            for n in range(10):
                client.fetch_jwt_svid({f"aud-{n}"})
                assert len(cache.jwt) <= 4
            six = cached("aud-6")
            client.fetch_jwt_svid({"aud-6"})
            assert cached("aud-6") is six  # served from the cache, and now the most recently used
            client.fetch_jwt_svid({"aud-10"})  # evicts aud-7, the least recently used
            assert sorted(a for _, (a,) in cache.jwt) == ["aud-10", "aud-6", "aud-8", "aud-9"]
            client.fetch_jwt_svid({"aud-7"})  # fetched again from the server
            assert sorted(a for _, (a,) in cache.jwt) == ["aud-10", "aud-6", "aud-7", "aud-9"]
    finally:
        node.stop()
        server.shutdown()


def test_workload_api_limits_are_checked() -> None:
    from keyseal._internal.agent.config import WorkloadApiLimits, parse_agent_config
    from keyseal.errors import UsageError

    base = {"trustDomain": TRUST_DOMAIN, "serverURL": "https://127.0.0.1:8443", "trustBundleFile": "/b.pem",
            "joinToken": "t"}
    assert parse_agent_config(base, environ={}).workload_api == WorkloadApiLimits()
    limits = parse_agent_config({**base, "workloadAPI": {"maxCalls": 64, "maxCallsPerUID": 8, "idleTimeout": "30s",
                                                         "jwtCacheSize": 10}}, environ={}).workload_api
    assert (limits.max_calls, limits.max_calls_per_uid, limits.idle_timeout, limits.jwt_cache_size) == (64, 8, 30, 10)
    for bad in ({"maxCalls": 0}, {"maxCalls": 5000}, {"maxConnections": "many"}, {"maxCallsPerUID": True},
                {"idleTimeout": "soon"}, {"maxConnections": 8, "maxConnectionsPerUID": 9}, {"other": 1}, [1]):
        with pytest.raises(UsageError) as refused:
            parse_agent_config({**base, "workloadAPI": bad}, environ={})
        assert "workloadAPI" in refused.value.message


@pytest.mark.slow
def test_the_relay_carries_large_messages_and_concurrent_callers(node: Node) -> None:
    """Megabytes each way through the relay's 16 KiB buffers, from many threads of one process at once."""
    big = "x" * (3 * 1024 * 1024)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            with grpc.insecure_channel(node.endpoint) as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=big),
                                         metadata=HEADER, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                for _ in range(5):
                    stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30)
                    assert [s.spiffe_id for s in next(stream).svids] == [WEB]
                    stream.cancel()
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=caller) for _ in range(12)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in callers) and errors == []


def test_descriptors_passed_to_the_agent_are_closed_with_the_connection(node: Node) -> None:
    """Nobody passes file descriptors to the agent (SCM_RIGHTS): the agent keeps none and closes the connection."""
    fds = _fds()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection, open("/dev/null", "rb") as passed:
        connection.settimeout(10)
        connection.connect(str(node.socket))
        connection.sendmsg([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed.fileno()] * 4))])
        while connection.recv(4096):  # the gRPC server's first frames, perhaps; then the end
            pass
    wait_for(lambda: _fds() <= fds, timeout=10)
