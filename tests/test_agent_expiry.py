"""The Workload API at SVID expiry with the server stopped: polled every 50 ms around the moment the cached
SVID runs out, no answer ever carries an expired SVID (X.509 or JWT), and the first answer after the last valid
one is UNAVAILABLE. With the server reachable, a short-lived SVID is renewed before a workload sees a gap."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from spiffe._proto import workload_pb2, workload_pb2_grpc

from tests.harness.agent import Node, start_agent, start_server

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

ME = f"unix:uid:{os.getuid()}"
HEADER = [("workload.spiffe.io", "true")]
POLL = 0.05


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    server = start_server(tmp_path)
    # A slow sync: before the fix an expired SVID stayed in the cache until the next one.
    node = start_agent(server, tmp_path, sync_interval=2.0)
    yield node
    node.stop()
    server.shutdown()


def _x509_once(stub: workload_pb2_grpc.SpiffeWorkloadAPIStub) -> datetime | str:
    """The notAfter of the SVID one FetchX509SVID answers with, or the status code name of its error."""
    try:
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
        answer = next(stream)
        stream.cancel()
    except grpc.RpcError as exc:
        return str(exc.code().name)
    leaf = x509.load_der_x509_certificate(answer.svids[0].x509_svid)  # the leaf comes first in the DER chain
    return leaf.not_valid_after_utc


def _jwt_once(stub: workload_pb2_grpc.SpiffeWorkloadAPIStub) -> datetime | str:
    try:
        answer = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER, timeout=5)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    payload = answer.svids[0].svid.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return datetime.fromtimestamp(claims["exp"], UTC)


def _poll_through_expiry(node: Node, fetch: object, expires: datetime) -> list[tuple[datetime, datetime | str]]:
    answers: list[tuple[datetime, datetime | str]] = []
    with grpc.insecure_channel(node.endpoint) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        deadline = expires + timedelta(seconds=1.5)
        while datetime.now(UTC) < deadline:
            answer = fetch(stub)  # type: ignore[operator]
            answers.append((datetime.now(UTC), answer))  # when the workload had it in hand
            time.sleep(POLL)
    return answers


def _check(answers: list[tuple[datetime, datetime | str]]) -> None:
    served = [(at, a) for at, a in answers if isinstance(a, datetime)]
    assert served, answers[:3]
    for at, not_after in served:
        assert at < not_after, f"an expired SVID was served at {at} (notAfter {not_after})"
    last_valid = max(i for i, (_, a) in enumerate(answers) if isinstance(a, datetime))
    after = [a for _, a in answers[last_valid + 1:]]
    assert after, "no answer after the last valid SVID"
    assert all(a == "UNAVAILABLE" for a in after), after


def test_x509_svid_never_served_past_expiry_with_the_server_stopped(node: Node) -> None:
    node.entry("/ns/a/svc", ME, x509_ttl=2)
    node.agent.cache.sync()
    expires = node.agent.cache.x509[next(iter(node.agent.cache.x509))].expires
    node.server.shutdown()
    node.agent.client.close()
    _check(_poll_through_expiry(node, _x509_once, expires))


def test_jwt_svid_never_served_past_expiry_with_the_server_stopped(node: Node) -> None:
    node.entry("/ns/a/svc", ME, jwt_ttl=3)
    node.agent.cache.sync()
    with grpc.insecure_channel(node.endpoint) as channel:
        first = _jwt_once(workload_pb2_grpc.SpiffeWorkloadAPIStub(channel))
    assert isinstance(first, datetime)
    node.server.shutdown()
    node.agent.client.close()
    _check(_poll_through_expiry(node, _jwt_once, first))


def test_open_stream_ends_unavailable_when_its_svid_runs_out(node: Node) -> None:
    node.entry("/ns/a/svc", ME, x509_ttl=2)
    node.agent.cache.sync()
    expires = node.agent.cache.x509[next(iter(node.agent.cache.x509))].expires
    node.server.shutdown()
    node.agent.client.close()
    with grpc.insecure_channel(node.endpoint) as channel:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30)
        next(stream)
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        at = datetime.now(UTC)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert at < expires + timedelta(seconds=0.5), (at, expires)  # told at expiry, not at the next sync


def test_no_gap_while_the_server_is_reachable(tmp_path: Path) -> None:
    """A sync interval twice the SVID's life: the agent still renews before the margin, at the renewal point."""
    server = start_server(tmp_path)
    node = start_agent(server, tmp_path, sync_interval=6.0)
    try:
        node.entry("/ns/a/svc", ME, x509_ttl=3)  # 3 s left after each fetch: renewed after 1.2 s
        node.agent.cache.sync()
        with grpc.insecure_channel(node.endpoint) as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            not_afters = set()
            end = time.monotonic() + 12
            while time.monotonic() < end:
                answer = _x509_once(stub)
                assert isinstance(answer, datetime), answer
                assert datetime.now(UTC) < answer
                not_afters.add(answer)
                time.sleep(0.1)
        assert len(not_afters) >= 6  # renewed every 1.2 s or so, not every sync interval
    finally:
        node.stop()
        server.shutdown()
