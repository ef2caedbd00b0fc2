"""Fuzz targets for what the trust-domain server reads from its clients: the PKCS#10 CSR, the JSON request bodies
of the issuance API, and the raw HTTP/1.1 request (request line, headers, body) its listener parses.

The server is a real `CaServer` (local KEK, directory store in a temporary directory), driven in process: the API
through `Api.handle`, the HTTP parser through the listener's connection loop on one end of a socket pair (TLS is
the `ssl` module's, not keyseal's, so it is left out). Outside input must never make the server fail: an answer
with status 500, an exception out of the handler, or a response that is not HTTP is a crash.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from fuzz.targets import Target
from keyseal.errors import KeysealError

TRUST_DOMAIN = "example.org"
TOKEN = "fuzz-token-0123456789abcdef0123"  # noqa: S105 - the test client's bearer token, not a secret
MAX_ANSWER = 1 << 20


class ServerCrash(AssertionError):
    """The server answered a client's input with an internal error: a bug, not a rejection."""


@functools.cache
def _server() -> Any:
    """One in-process server per process (its keyset is made once). KEYSEAL_HOME points at its own temporary
    directory when the caller has not set one (the seen-versions ledger lives there)."""
    import hashlib

    from keyseal.ca.config import parse_config
    from keyseal.ca.server import CaServer

    work = Path(tempfile.mkdtemp(prefix="keyseal-fuzz-server-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # its local KEK goes with it
    os.environ.setdefault("KEYSEAL_HOME", str(work / "home"))
    config = parse_config({
        "trustDomain": TRUST_DOMAIN,
        "keyWrapping": {"provider": "local", "local": {"kekFile": str(work / "kek")}},
        "store": {"type": "directory", "directory": {"path": str(work / "store")}},
        "server": {"listen": "127.0.0.1:0"},
        "clients": [{"name": "fuzz", "tokenSHA256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                     "allowedPathPrefixes": ["/ns"]}],
    })
    server = CaServer(config, rotation_thread=False)
    server.manager.start()
    return server


def _answer(path: str, body: bytes) -> None:
    from keyseal.ca.api import Request

    response = _server().api.handle(Request(method="POST", path=path, body=body, peer="127.0.0.1:1",
                                            headers={"authorization": f"Bearer {TOKEN}"}, peer_certificate=None))
    if response.status >= 500:
        raise ServerCrash(f"{path} answered {response.status} to a client's body: {response.body[:200]!r}")
    if response.status != 200:
        raise KeysealError(json.loads(response.body)["message"])  # a refusal, with the message the client sees


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on 127.0.0.1 (the handler sets TCP options, so not a Unix socket pair)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


def _statuses(answer: bytes) -> list[int]:
    """The status of each response in a stream of HTTP/1.1 responses (bodies skipped by Content-Length)."""
    statuses: list[int] = []
    rest = answer
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if not sep or len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
            raise ServerCrash(f"an answer that is not HTTP/1.1: {head[:80]!r}")
        statuses.append(int(parts[1]))
        length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        rest = rest[length:]
    return statuses


def _http(raw: bytes) -> None:
    """Feed raw bytes to the listener's request handler as one client connection; read what it answers."""
    from keyseal.ca.httpd import _Connection

    api = _server().api
    ours, theirs = _connected_pair()
    ours.settimeout(5)
    failure: list[BaseException] = []

    def handle() -> None:
        try:
            _Connection(theirs, ("127.0.0.1", 1), api).serve()
        except BaseException as exc:
            failure.append(exc)
        finally:
            theirs.close()

    worker = threading.Thread(target=handle, daemon=True)
    worker.start()
    try:
        ours.sendall(raw)
        ours.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the handler closed early (e.g. a request line it refused): its answer is still readable
    answer = b""
    while len(answer) < MAX_ANSWER:
        try:
            chunk = ours.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
    ours.close()
    worker.join(10)
    if worker.is_alive():
        raise ServerCrash(f"the request handler hung on {raw[:80]!r}")
    if failure:
        raise ServerCrash(f"the request handler raised {type(failure[0]).__name__}: {failure[0]}")
    statuses = _statuses(answer)
    if any(status >= 500 and status != 501 for status in statuses):  # 501: a method HTTP does not know
        raise ServerCrash(f"answered {statuses} to {raw[:120]!r}")
    if not statuses or any(status >= 400 for status in statuses):
        raise KeysealError(f"refused ({statuses})")


@functools.cache
def shared_server_targets() -> dict[str, Target]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from keyseal.ca.x509svid import parse_csr

    def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        return request.public_bytes(serialization.Encoding.PEM)

    csrs = [make_csr(ec.generate_private_key(ec.SECP256R1())), make_csr(rsa.generate_private_key(65537, 2048))]
    workload = f"spiffe://{TRUST_DOMAIN}/ns/a/web"
    x509_bodies = [json.dumps({"spiffeID": workload, "csr": csr.decode()}).encode() for csr in csrs]
    x509_bodies.append(json.dumps({"spiffeID": workload, "csr": csrs[0].decode(), "ttlSeconds": 60}).encode())
    jwt_bodies = [json.dumps({"spiffeID": workload, "audience": ["db"]}).encode(),
                  json.dumps({"spiffeID": workload, "audience": "db", "ttlSeconds": 30}).encode()]

    def http_request(path: str, body: bytes, extra: bytes = b"") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: keyseal\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body

    http_seeds = [http_request("/v1/x509-svid", x509_bodies[0]), http_request("/v1/jwt-svid", jwt_bodies[0]),
                  b"GET /v1/bundle HTTP/1.1\r\nHost: keyseal\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n",
                  http_request("/v1/jwt-svid", jwt_bodies[1], b"Expect: 100-continue\r\nConnection: close\r\n")]

    def csr_target(data: bytes) -> None:
        parse_csr(data.decode("utf-8", "surrogateescape"))

    pool = tuple(csrs + x509_bodies + jwt_bodies)
    return {
        target.name: target
        for target in (
            Target("csr", csr_target, csrs, "b64text", pool),
            Target("x509_request", lambda data: _answer("/v1/x509-svid", data), x509_bodies, "record", pool),
            Target("jwt_request", lambda data: _answer("/v1/jwt-svid", data), jwt_bodies, "record", pool),
            Target("http_request", _http, http_seeds, "bytes", pool),
        )
    }
