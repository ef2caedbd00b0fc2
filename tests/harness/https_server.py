"""A real HTTPS server on 127.0.0.1 for Web Key Directory tests, with a CA the test makes.

It serves a directory (the tree `keyseal wkd build` writes) for any Host, so one server plays both the
advanced host `openpgpkey.DOMAIN` and the direct host `DOMAIN`; clients reach it through keyseal's
`--connect-to HOST:443:127.0.0.1:PORT`, and TLS is verified for the real host name against the test CA.
Per-path overrides answer a status, an oversized body, a body without Content-Length, answer late, or trickle
the headers or the body a byte at a time, and every request is logged as (Host header, path) so tests can assert
which URLs were (not) tried. `TrickleProxy` trickles everything a server sends, the TLS handshake included.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_tls(directory: Path, hostnames: list[str], *, ca_name: str = "keyseal test CA") -> TlsFiles:
    """A fresh CA and a server certificate it issues for `hostnames` (DNS names, or IP addresses)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return files


TRICKLE_LIMIT = 20.0  # a trickling answer gives up after this long, so a client without a deadline still ends


@dataclass
class Override:
    """What to answer for one path instead of the file: a status and body, optionally late or unframed, or with
    the headers or the body sent one byte every `interval` seconds (`trickle`)."""

    status: int = 200
    body: bytes = b""
    content_length: bool = True
    delay: float = 0.0
    trickle: Literal["headers", "body"] | None = None
    interval: float = 0.5


@dataclass
class HttpsServer:
    root: Path
    tls: TlsFiles
    overrides: dict[str, Override] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def connect_to(self, *hosts: str) -> list[str]:
        """keyseal --connect-to values that send `hosts` (port 443) to this server."""
        return [f"{host}:443:127.0.0.1:{self.port}" for host in hosts]

    def start(self) -> HttpsServer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.cert_pem, self.tls.key_pem)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                owner.requests.append((self.headers.get("Host", ""), path))
                override = owner.overrides.get(path)
                if override is not None:
                    time.sleep(override.delay)
                    if override.trickle is not None:
                        self._trickle(override)
                    else:
                        self._answer(override.status, override.body, override.content_length)
                    return
                target = (owner.root / path.lstrip("/")).resolve()
                if owner.root.resolve() not in target.parents or not target.is_file():
                    self._answer(404, b"not found\n", True)
                    return
                self._answer(200, target.read_bytes(), True)

            def _answer(self, status: int, body: bytes, content_length: bool) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if content_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def _trickle(self, override: Override) -> None:
                head = (f"HTTP/1.1 {override.status} OK\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Length: {len(override.body)}\r\n\r\n").encode()
                slow = head if override.trickle == "headers" else override.body
                give_up = time.monotonic() + TRICKLE_LIMIT
                with contextlib.suppress(OSError):
                    if override.trickle == "body":
                        self.wfile.write(head)
                    for index in range(len(slow)):
                        if time.monotonic() > give_up:
                            return
                        self.wfile.write(slow[index:index + 1])
                        time.sleep(override.interval)
                    if override.trickle == "headers":
                        self.wfile.write(override.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The TLS handshake runs in the request's own thread, so a stalled client blocks nobody.
                request.settimeout(10)
                try:
                    tls = context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                try:
                    super().finish_request(tls, client_address)
                finally:
                    tls.close()  # HTTP/1.0: the end of the connection ends a body sent without Content-Length

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that reject the certificate or hang up are part of the tests

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def free_port() -> int:
    """A loopback port with nothing listening (for 'the directory is down')."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TrickleProxy:
    """A TCP relay on 127.0.0.1 in front of `target`: what the client sends goes through at once, what the server
    answers (the TLS handshake first) reaches the client one byte every `interval` seconds, for at most
    TRICKLE_LIMIT seconds a connection."""

    target: tuple[str, int]
    interval: float = 0.5
    _listener: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def connect_to(self, *hosts: str) -> list[str]:
        return [f"{host}:443:127.0.0.1:{self.port}" for host in hosts]

    def start(self) -> TrickleProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._spawn(self._forward, client, upstream)
            self._spawn(self._trickle, upstream, client)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.2)
        with contextlib.suppress(OSError):
            while not self._stopping.is_set():
                try:
                    data = source.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    return
                sink.sendall(data)

    def _trickle(self, source: socket.socket, sink: socket.socket) -> None:
        give_up = time.monotonic() + TRICKLE_LIMIT
        source.settimeout(0.2)
        try:
            while not self._stopping.is_set() and time.monotonic() < give_up:
                try:
                    data = source.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    return
                for index in range(len(data)):
                    if self._stopping.is_set() or time.monotonic() > give_up:
                        return
                    sink.sendall(data[index:index + 1])
                    time.sleep(self.interval)
        except OSError:
            return
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for thread in self._threads:
            thread.join(timeout=5)
