"""Fuzz targets for what the trust-domain server reads from its clients: the PKCS#10 CSR, the JSON request bodies
of the issuance API, and the raw HTTP/1.1 request (request line, headers, body) its listener parses.

The server is a real `CaServer` (local KEK, directory store in a temporary directory), driven in process: the API
through `Api.handle`, the raw bytes through the listener's HTTP/1.1 reader (`ca.http.http1`, which parses what
the listener reads; TLS is the `ssl` module's, not keyseal's, so it is left out). Outside input must never make
the server fail: an answer with status 500, an exception out of the handler, or a response that is not HTTP is a
crash.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fuzz.targets import Target
from keyseal.errors import KeysealError

TRUST_DOMAIN = "example.org"
TOKEN = "fuzz-token-0123456789abcdef0123"  # noqa: S105 - the test client's bearer token, not a secret
CHUNK = 7  # bytes per read: requests arrive split at every possible place


class ServerCrash(AssertionError):
    """The server answered a client's input with an internal error: a bug, not a rejection."""


@functools.cache
def _server() -> Any:
    """One in-process server per process (its keyset is made once). KEYSEAL_HOME points at its own temporary
    directory when the caller has not set one (the seen-versions ledger lives there)."""
    import hashlib

    from keyseal._internal.ca.config import parse_config
    from keyseal._internal.ca.server import CaServer

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
    from keyseal._internal.ca.http.messages import Request

    response = _server().api.handle(Request(method="POST", path=path, body=body, peer="127.0.0.1:1",
                                            headers={"authorization": f"Bearer {TOKEN}"}, peer_certificate=None))
    if response.status >= 500:
        raise ServerCrash(f"{path} answered {response.status} to a client's body: {response.body[:200]!r}")
    if response.status != 200:
        raise KeysealError(json.loads(response.body)["message"])  # a refusal, with the message the client sees


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


def _answer_what_arrived(reader: Any, answer: bytearray, *, eof: bool) -> bool:
    """Answer every complete request `reader` holds, appending to `answer`; True once the connection closes."""
    from keyseal._internal.ca.http.http1 import Refusal, render

    while (event := reader.next(eof=eof)) is not None:
        if isinstance(event, bytes):  # 100 Continue
            answer += event
            continue
        if isinstance(event, Refusal):
            answer += render(event.response, close=True)
            return True
        try:
            response = _server().api.handle(event.request("127.0.0.1:1", None))
        except Exception as exc:
            raise ServerCrash(f"the request handler raised {type(exc).__name__}: {exc}") from exc
        answer += render(response, close=event.close)
        if event.close:
            return True
    return eof


def _http(raw: bytes) -> None:
    """Feed raw bytes to the listener's HTTP/1.1 reader as one client connection would arrive (in pieces, then
    the end of the stream), answer each request through the API, and check what the client would read."""
    from keyseal._internal.ca.http.http1 import RequestReader

    reader = RequestReader()
    answer = bytearray()
    pieces = [raw[i:i + CHUNK] for i in range(0, len(raw), CHUNK)]
    for number, piece in enumerate([*pieces, b""]):
        reader.feed(piece)
        if _answer_what_arrived(reader, answer, eof=number == len(pieces)):
            break  # the connection is closed: what follows is never read
    statuses = _statuses(bytes(answer))
    if any(status >= 500 and status != 501 for status in statuses):  # 501: a method HTTP does not know
        raise ServerCrash(f"answered {statuses} to {raw[:120]!r}")
    if not statuses or any(status >= 400 for status in statuses):
        raise KeysealError(f"refused ({statuses})")


@functools.cache
def shared_server_targets() -> dict[str, Target]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from keyseal._internal.ca.issuance.x509svid import parse_csr

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
