"""The listener's event loop over real TLS on 127.0.0.1: one thread serves every connection, so no client may
hold up another, and every answer owed reaches a client even when it reads late or sends ahead."""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyseal._internal.ca.config import ConnectionLimits, parse_config
from keyseal._internal.ca.http import listener as httpd
from keyseal._internal.ca.issuance import signing_audit
from keyseal._internal.ca.server import CaServer
from tests.harness.ca import TOKENS, TRUST_DOMAIN, Client, base_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    tmp: Path = tmp_path_factory.mktemp("listener")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEYSEAL_HOME", str(tmp / "home"))
        instance = CaServer(parse_config(base_config(tmp)), rotation_thread=False)
        instance.start()
        instance.start_background()
        yield instance
        instance.shutdown()


def tls_connection(server: CaServer, receive_buffer: int | None = None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cadata=server.manager.active().ca_pem)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # before connecting: the window the server may fill is then this small
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", server.port))
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def read_answers(sock: ssl.SSLSocket, count: int) -> list[tuple[int, bytes]]:
    """`count` HTTP/1.1 answers (status, body) read off `sock`."""
    answers: list[tuple[int, bytes]] = []
    buffer = b""
    while len(answers) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode("latin-1").split("\r\n")
            length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
            if len(buffer) >= head_end + 4 + length:
                answers.append((int(head[0].split()[1]), buffer[head_end + 4: head_end + 4 + length]))
                buffer = buffer[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {len(answers)} of {count} answers"
        buffer += chunk
    return answers


def jwt_request(close: bool = False) -> bytes:
    body = json.dumps({"spiffeID": f"spiffe://{TRUST_DOMAIN}/ns/a/web", "audience": ["db"]}).encode()
    connection = b"Connection: close\r\n" if close else b""
    return (f"POST /v1/jwt-svid HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['ns-a']}\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + connection + b"\r\n" + body


def healthy(server: CaServer) -> bool:
    client = Client(server.port, server.manager.active().ca_pem)
    try:
        return client.request("GET", "/healthz")[0] == 200
    finally:
        client.close()


def test_pipelined_requests_are_answered_in_order(server: CaServer) -> None:
    with tls_connection(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
                     + jwt_request())
        answers = read_answers(sock, 3)
    assert [status for status, _ in answers] == [200, 404, 200]
    assert json.loads(answers[2][1])["spiffeID"] == f"spiffe://{TRUST_DOMAIN}/ns/a/web"


@pytest.mark.slow
def test_a_client_that_reads_late_still_gets_every_answer(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """More answers than the socket buffers hold (the kernel lets a send buffer grow to 4 MiB): the loop must
    wait for the client to read, answer others meanwhile, and drop nothing."""
    waited_to_write: list[int] = []
    want = httpd._Connection.want

    def recording_want(self: httpd._Connection, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            waited_to_write.append(events)
        want(self, events)

    monkeypatch.setattr(httpd._Connection, "want", recording_want)
    count = 8000
    with tls_connection(server, receive_buffer=4096) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\n\r\n" * count,))
        sender.start()  # in a thread, so that a send the kernel could not take fails the test instead of hanging it
        sender.join(10)
        assert not sender.is_alive()
        time.sleep(0.5)
        assert waited_to_write  # the answers did not fit: the loop waits for the socket to take more ...
        assert healthy(server)  # ... and meanwhile answers everyone else
        answers = read_answers(sock, count)
    assert len(answers) == count and {status for status, _ in answers} == {200}
    assert len({body for _, body in answers}) == 1 and b"x509-svid" in answers[0][1]


def test_silent_and_half_finished_clients_do_not_hold_up_others(server: CaServer) -> None:
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # never starts TLS
    half = tls_connection(server)
    half.sendall(b"POST /v1/jwt-svid HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")  # body never finished
    try:
        started = time.monotonic()
        assert healthy(server)
        assert time.monotonic() - started < 2
        half.sendall(b" " * 499)  # the rest of its body: that request is answered too
        assert read_answers(half, 1)[0][0] == 401  # no token was sent
    finally:
        silent.close()
        half.close()


def test_expect_100_continue_waits_for_the_body(server: CaServer) -> None:
    request = jwt_request()
    head, body = request.split(b"\r\n\r\n", 1)
    with tls_connection(server) as sock:
        sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_answers(sock, 1)[0][0] == 200


@pytest.mark.slow
def test_a_request_that_trickles_in_too_long_is_answered_408(server: CaServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 1.0)
    with tls_connection(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # still trickling, never idle
            time.sleep(0.5)
            sock.sendall(b"X-Slow: 1\r\n")
        status, body = read_answers(sock, 1)[0]
        assert status == 408 and json.loads(body)["error"] == "timeout"
        assert sock.recv(65536) == b""  # then closed


@pytest.mark.slow
def test_an_idle_connection_is_closed(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "IDLE_TIMEOUT", 1.0)
    with tls_connection(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(sock, 1)[0][0] == 200
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert 0.5 < time.monotonic() - started < 5


def open_connections(server: CaServer) -> int:
    """The connections the server holds once those closing by now are gone (the loop sees a close on its next
    pass; give a loaded machine a moment)."""
    assert server.httpd is not None
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 0.3:
        count = len(server.httpd.connections)
        if count != last:
            last, stable_since = count, time.monotonic()
        time.sleep(0.02)
    return last


@pytest.mark.slow
def test_connections_beyond_the_cap_are_refused(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.httpd is not None
    open_now = open_connections(server)
    monkeypatch.setattr(server.httpd, "limits", ConnectionLimits(open_now + 2, open_now + 2, 0))
    first, second = tls_connection(server), tls_connection(server)
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            third = tls_connection(server)
            third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert third.recv(65536) != b""  # a refused connection reads as closed
        first.close()
        assert open_connections(server) == open_now + 1
        with tls_connection(server) as fourth:  # a slot came free
            fourth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answers(fourth, 1)[0][0] == 200
    finally:
        first.close()
        second.close()


def test_connection_close_is_honoured(server: CaServer) -> None:
    with tls_connection(server) as sock:
        sock.sendall(jwt_request(close=True) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(sock, 1)[0][0] == 200
        assert sock.recv(65536) == b""  # the request after Connection: close is never answered


@pytest.mark.slow
def test_a_handshake_that_never_finishes_is_closed(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 1.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        silent.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and then nothing
        started = time.monotonic()
        assert silent.recv(65536) == b""
        assert 0.5 < time.monotonic() - started < 5


def test_a_worker_answer_over_the_queue_limit_leaves_the_connection_usable(
        server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers queued past MAX_UNWRITTEN, the last from a worker thread (an unknown route is not answered from
    memory): once written, the connection must wait for the next request, not sit with nothing to wait for."""
    monkeypatch.setattr(httpd, "MAX_UNWRITTEN", 100)  # less than the worker's 404: its answer alone is over
    with tls_connection(server) as sock:
        bundle, nowhere = b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /v1/nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(bundle * 10 + nowhere)
        assert [status for status, _ in read_answers(sock, 11)] == [200] * 10 + [404]
        sock.settimeout(5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(sock, 1)[0][0] == 200


@pytest.mark.slow
def test_a_client_that_stops_sending_still_gets_every_answer_owed(server: CaServer) -> None:
    """The client sends its requests, ends its half of the connection without a TLS close_notify, then reads
    slowly: the server owes megabytes of answers when the end arrives, and must write them all, then close
    cleanly (no alert after the answers)."""
    count = 8000
    with tls_connection(server, receive_buffer=4096) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\n\r\n" * count,))
        sender.start()
        sender.join(10)
        assert not sender.is_alive()
        socket.socket.shutdown(sock, socket.SHUT_WR)
        time.sleep(0.5)
        answers = read_answers(sock, count)
        assert {status for status, _ in answers} == {200}
        assert sock.recv(65536) == b""  # and then the server closes


def test_what_may_be_answered_on_the_loop(server: CaServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In wrapped custody issuance signs in memory, so the loop answers it; the agent routes read the store and go
    to workers; with an audit file every signature is a disk write, so issuance goes to workers too."""
    assert all(server.answers_from_memory(path) for path in ("/v1/x509-svid", "/v1/jwt-svid?x=1", "/healthz",
                                                               "/v1/bundle", "/metrics", "/readyz"))
    assert not server.answers_from_memory("/v1/agent/join") and not server.answers_from_memory("/v1/agent/sync")
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(tmp_path / "audit.log"))
    signing_audit.configure_from_environment()
    try:
        assert not server.answers_from_memory("/v1/x509-svid") and server.answers_from_memory("/healthz")
    finally:
        monkeypatch.delenv("KEYSEAL_AUDIT_LOG")
        signing_audit.configure_from_environment()


# -- issue #16: what a network peer can do to the listener ---------------------------------------------------------


def silent_connections(server: CaServer, source: str, count: int) -> list[socket.socket]:
    """`count` TCP connections from `source` that never start TLS (each bound to that source address)."""
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.settimeout(10)
        try:
            sock.connect(("127.0.0.1", server.port))
        except OSError:  # the listen backlog is full: the server refuses faster than we connect
            sock.close()
            continue
        held.append(sock)
    return held


def test_a_flood_of_silent_connections_from_one_address_locks_no_one_else_out(
        server: CaServer, caplog: pytest.LogCaptureFixture) -> None:
    """An attacker on 127.0.0.2 opens more connections than the server holds in all and never starts TLS; a
    client on 127.0.0.1 still gets /healthz and an SVID at once, the attacker holds at most its share, and the
    hundreds of refusals are a line or two in the log, not hundreds."""
    assert server.httpd is not None
    caplog.set_level(logging.WARNING, logger="keyseal._internal.ca.http.listener")
    server.httpd._refusals = httpd._RefusalLog()  # no line of an earlier test's refusals is due now
    limits = server.httpd.limits
    attacker = silent_connections(server, "127.0.0.2", limits.max_connections + 16)
    try:
        open_connections(server)  # the loop has accepted (or refused) them all
        assert server.httpd.held_by("127.0.0.2") <= limits.per_source
        started = time.monotonic()
        client = Client(server.port, server.manager.active().ca_pem, token=TOKENS["ns-a"])
        try:
            assert client.request("GET", "/healthz")[0] == 200
            assert client.x509_svid(f"spiffe://{TRUST_DOMAIN}/ns/a/web")[0] == 200
        finally:
            client.close()
        assert time.monotonic() - started < 5
        refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a connection")]
        assert 1 <= len(refusals) <= 2, refusals
        assert "from 127.0.0.2: it holds 32 connections (server.connections.perSource)" in refusals[0]
    finally:
        for sock in attacker:
            sock.close()


@pytest.mark.parametrize(("address", "source"), [
    ("192.0.2.7", "192.0.2.7"), ("::ffff:192.0.2.7", "192.0.2.7"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::9", "2001:db8:1:2::/64"), ("fe80::1%eth0", "fe80::/64"), ("not-an-address", "not-an-address")])
def test_what_a_source_is(address: str, source: str) -> None:
    """Per-source limits count an IPv6 /64 as one source: one host commonly holds a whole /64."""
    assert httpd.source_of(address) == source


@pytest.mark.slow
def test_the_last_slots_are_kept_for_sources_that_hold_few(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With few slots free the server is busy: a source that already holds its busy share gets no more, however
    far below its own limit, and handshakes that have not finished in BUSY_HANDSHAKE_TIMEOUT are closed."""
    assert server.httpd is not None
    open_now = open_connections(server)
    limits = ConnectionLimits(max_connections=open_now + 10, per_source=open_now + 8, reserved=4)
    monkeypatch.setattr(server.httpd, "limits", limits)
    monkeypatch.setattr(httpd, "BUSY_HANDSHAKE_TIMEOUT", 1.0)
    attacker = silent_connections(server, "127.0.0.2", 10)
    try:
        open_connections(server)
        assert server.httpd.held_by("127.0.0.2") == limits.max_connections - limits.reserved - open_now
        started = time.monotonic()
        assert healthy(server)  # 127.0.0.1 holds fewer than its busy share: a reserved slot is its
        assert time.monotonic() - started < 2
        for sock in attacker:  # busy: the handshakes that never came are cut short, not left for 30 s
            if sock.fileno() >= 0:
                with contextlib.suppress(ConnectionError):
                    assert sock.recv(65536) == b""
        assert time.monotonic() - started < 6
    finally:
        for sock in attacker:
            sock.close()


@pytest.mark.slow
def test_kept_alive_connections_with_nothing_to_do_are_cut_short_when_busy(
        server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy, a connection that holds a slot with no request under way goes after BUSY_IDLE_TIMEOUT, not after
    IDLE_TIMEOUT (30 s): its client reconnects when it next has something to ask."""
    assert server.httpd is not None
    open_now = open_connections(server)
    monkeypatch.setattr(server.httpd, "limits", ConnectionLimits(max_connections=open_now + 4, per_source=32,
                                                                 reserved=3))
    monkeypatch.setattr(httpd, "BUSY_IDLE_TIMEOUT", 1.0)
    with tls_connection(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(sock, 1)[0][0] == 200
        assert sock.recv(65536) == b""
        assert 0.5 < time.monotonic() - started < 5


@pytest.mark.slow
def test_an_old_connection_is_closed(server: CaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection lives at most MAX_CONNECTION_AGE, so that what its handshake decided (the client certificate,
    the CAs trusted then) is decided again on a new one: a request under way is answered with Connection: close,
    an idle connection is closed (IDLE_TIMEOUT, 30 s, is far off)."""
    monkeypatch.setattr(httpd, "MAX_CONNECTION_AGE", 1.0)
    with tls_connection(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(1.5)
        sock.sendall(b"Host: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk
            head += chunk
        assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in head
        while chunk:
            chunk = sock.recv(65536)  # then the server closes
    with tls_connection(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        read_answers(sock, 1)
        assert sock.recv(65536) == b""
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", ["\u00b2", "\u00b9\u00b2", "-1", "+5", "1_0", " ", "0x10"])
def test_a_content_length_that_is_not_ascii_digits_is_400(server: CaServer, value: str) -> None:
    """`²` is a digit to str.isdigit() but not to int(): that raised ValueError in the loop (a traceback in the
    log, and no answer). Only ASCII digits are a length."""
    with tls_connection(server) as sock:
        sock.sendall(b"POST /v1/jwt-svid HTTP/1.1\r\nHost: x\r\nContent-Length: " + value.encode("latin-1")
                     + b"\r\n\r\n")
        status, body = read_answers(sock, 1)[0]
    assert status == 400 and json.loads(body)["error"] == "bad_request"


def test_request_paths_are_logged_escaped_and_capped(server: CaServer, caplog: pytest.LogCaptureFixture) -> None:
    """A path with a terminal escape, an encoded newline and raw bytes (control, DEL, C1, Latin-1) is logged as
    one printable line of bounded length, never as it came."""
    evil = b"/v1/x509-svid?\x1b[2J\x1b[31mFAKE%0a2030-01-01T00:00:00Z%20ERROR\x00\x08\x7f\x9b\xff" + b"A" * 6000
    caplog.set_level(logging.DEBUG, logger="keyseal._internal.ca")
    with tls_connection(server) as sock:
        sock.sendall(b"POST " + evil + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert read_answers(sock, 1)[0][0] == 401
    lines = [r.getMessage() for r in caplog.records if "v1/x509-svid?" in r.getMessage()]
    assert any("not authenticated" in line for line in lines), lines
    for line in lines:
        assert line.isprintable(), line[:300]
        assert "\\x1b[2J" in line and "%0a" in line and "\\x00\\x08\\x7f\\x9b\\xff" in line
        assert len(line) < 1000
