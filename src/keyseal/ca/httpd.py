"""The TLS listener: a thread per connection (the standard library's threading server), HTTP/1.1 with keep-alive.

The TLS handshake runs in the connection's own thread (never in the accept loop, so a slow client cannot stall
others); connections are capped, idle ones time out, and request bodies are bounded. The SSL context is read
per connection, so a renewed serving certificate applies to new connections without a restart.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from socketserver import BaseRequestHandler
from typing import Any

from keyseal.ca.api import MAX_BODY_BYTES, Api, Request, Response

__all__ = ["TlsHttpServer"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
MAX_DRAIN_BYTES = 1024 * 1024
MAX_HEADERS = 100
MAX_HEADER_LINE = 8192
_SINGLE_HEADERS = frozenset({"content-length", "authorization", "transfer-encoding", "host"})
IDLE_TIMEOUT = 30.0
LINGER_SECONDS = 2.0


@functools.cache
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header (RFC 9110 IMF-fixdate), formatted once per second."""
    global _date_cache  # noqa: PLW0603 - a per-process cache of one string
    second = int(time.time())
    cached_second, text = _date_cache
    if second != cached_second:
        text = email.utils.formatdate(second, usegmt=True)
        _date_cache = (second, text)
    return text


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})
MAX_REQUEST_LINE = 8192
MAX_HEAD = MAX_REQUEST_LINE + (MAX_HEADERS + 1) * (MAX_HEADER_LINE + 2)
READ_SIZE = 65536


class _Close(Exception):
    """End the connection: the peer went away, timed out, or its request cannot be answered on it."""


def _error(status: int, reason: str, message: str) -> Response:
    return Response(status, json.dumps({"error": reason, "message": message}).encode() + b"\n")


class _Connection:
    """One client connection: read a request, answer it, and again while the client keeps the connection.

    One `recv` per TLS record and one `sendall` per answer, parsed with bytes methods (the standard library's
    request handler reads header lines one by one through two buffering layers: about a tenth of an SVID's
    server time, benchmarks/README.md). The rules are the usual ones: request line
    `METHOD PATH HTTP/1.x`, at most MAX_HEADERS header lines of MAX_HEADER_LINE bytes, a repeated header that
    decides something (Content-Length, Authorization, Transfer-Encoding, Host) refused, bodies only by
    Content-Length (chunked is 411), at most MAX_BODY_BYTES, `Expect: 100-continue` honoured, HTTP/1.0
    keep-alive only when asked for.
    """

    def __init__(self, sock: socket.socket, client_address: Any, api: Api) -> None:
        self.sock = sock
        self.peer = f"{client_address[0]}:{client_address[1]}"
        self.api = api
        self.buffer = b""

    def serve(self) -> None:
        try:
            while self._one():
                pass
        except _Close:
            pass
        except (OSError, ssl.SSLError) as exc:  # reset, timeout, TLS alert: the client is gone
            log.debug("connection from %s ended: %s", self.peer, exc)

    def _fill(self) -> None:
        chunk = self.sock.recv(READ_SIZE)
        if not chunk:
            raise _Close
        self.buffer += chunk

    def _head(self) -> bytes | None:
        """The request line and headers, up to the blank line; None when the client closed between requests."""
        while True:
            crlf, lf = self.buffer.find(b"\r\n\r\n"), self.buffer.find(b"\n\n")  # bare LF, as lenient parsers
            if crlf >= 0 and (lf < 0 or crlf < lf):
                head, self.buffer = self.buffer[:crlf], self.buffer[crlf + 4:]
                return head
            if lf >= 0:
                head, self.buffer = self.buffer[:lf], self.buffer[lf + 2:]
                return head
            if len(self.buffer) > MAX_HEAD:
                self._send(_error(431, "too_large", "request line and headers are too long"), close=True)
                raise _Close
            try:
                self._fill()
            except _Close:
                if self.buffer.strip():
                    self._send(_error(400, "bad_request", "incomplete request"), close=True)
                return None

    def _one(self) -> bool:
        """Answer one request; False when the connection is to be closed."""
        head = self._head()
        if head is None:
            return False
        lines = head.replace(b"\r\n", b"\n").split(b"\n")
        while lines and not lines[0]:  # RFC 9112 2.2: empty lines before a request line are ignored
            lines.pop(0)
        request_line = str(lines[0] if lines else b"", "iso-8859-1")
        words = request_line.split()
        if len(request_line) > MAX_REQUEST_LINE:
            self._send(_error(414, "too_large", "request line is too long"), close=True)
            return False
        if len(words) != 3 or words[2] not in _VERSIONS:
            self._send(_error(400, "bad_request", "bad request line (HTTP/1.0 or HTTP/1.1 only)"), close=True)
            return False
        method, path, version = words
        headers = self._headers(lines[1:])
        if headers is None:
            return False
        connection = headers.get("connection", "").lower()
        close = "close" in connection if version == "HTTP/1.1" else "keep-alive" not in connection
        if method not in _METHODS:
            self._send(_error(501, "not_implemented", "method not implemented"), close=True)
            return False
        if "transfer-encoding" in headers:
            self._send(_error(411, "length_required", "send Content-Length"), close=True)
            return False
        text = headers.get("content-length") or "0"
        length = int(text) if text.isdigit() and len(text) < 19 else -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._drain(length)
            self._send(_error(413, "too_large", "request body is too large"), close=True)
            return False
        if headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        certificate = self.sock.getpeercert(binary_form=True) if isinstance(self.sock, ssl.SSLSocket) else None
        response = self.api.handle(Request(method=method, path=path, headers=headers, body=body, peer=self.peer,
                                           peer_certificate=certificate))
        self._send(response, close=close)
        if log.isEnabledFor(logging.DEBUG):  # formatting a line per request costs more than the check
            log.debug("%s %s %s", self.peer, request_line, response.status)
        return not close

    def _headers(self, lines: list[bytes]) -> dict[str, str] | None:
        """Headers by lower-case name (a repeated one joined with ", "); None after answering a bad one."""
        if len(lines) > MAX_HEADERS:
            self._send(_error(431, "too_large", "too many headers"), close=True)
            return None
        headers: dict[str, str] = {}
        for raw in lines:
            if len(raw) > MAX_HEADER_LINE:
                self._send(_error(431, "too_large", "header line too long"), close=True)
                return None
            name, sep, value = str(raw, "iso-8859-1").partition(":")
            key = name.lower()
            if not sep or not name or name != name.strip():
                self._send(_error(400, "bad_request", "malformed header"), close=True)
                return None
            if key in headers:
                if key in _SINGLE_HEADERS:
                    self._send(_error(400, "bad_request", f"repeated {key} header"), close=True)
                    return None
                headers[key] += ", " + value.strip()
            else:
                headers[key] = value.strip()
        return headers

    def _drain(self, length: int) -> None:
        """Read a refused body (at most MAX_DRAIN_BYTES) so the client sees the answer, not a reset."""
        remaining = length - len(self.buffer) if 0 <= length <= MAX_DRAIN_BYTES else 0
        self.buffer = b""
        while remaining > 0:
            chunk = self.sock.recv(min(READ_SIZE, remaining))
            if not chunk:
                break
            remaining -= len(chunk)

    def _send(self, response: Response, *, close: bool = False) -> None:
        """Status line, headers and body in one write."""
        lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}\r\nServer: keyseal\r\n"
                 f"Date: {_http_date()}\r\nContent-Type: {response.content_type}\r\n"
                 f"Content-Length: {len(response.body)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in response.headers.items()]
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        self.sock.sendall("".join(lines).encode("latin-1") + response.body)


def _linger(connection: ssl.SSLSocket) -> None:
    """After a refused handshake: read (below TLS) what the client already sent (in TLS 1.3 a client sends its
    request right after its certificate) until it closes, bounded, so the alert just sent reaches it instead of
    being wiped out by the reset that closing with unread data causes. A refused agent then sees why."""
    deadline = time.monotonic() + LINGER_SECONDS  # in all, not per read: a trickling client gets no more
    with contextlib.suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_WR)
        remaining = MAX_DRAIN_BYTES
        while remaining > 0 and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = socket.socket.recv(connection, min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)


class TlsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, api: Api, context: Callable[[], ssl.SSLContext]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.api = api
        self.context = context
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), BaseRequestHandler)  # finish_request serves the connection itself

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("refused a connection from %s: %d connections are open", client_address[0], MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IDLE_TIMEOUT)
        with contextlib.suppress(OSError):  # a "100 Continue" and its answer must not wait on a delayed ACK
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            connection = self.context().wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS with %s failed: %s", client_address[0], exc)
            return
        try:
            connection.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            _linger(connection)
            with contextlib.suppress(OSError):
                connection.close()
            return
        try:
            _Connection(connection, client_address, self.api).serve()
        finally:
            with contextlib.suppress(OSError):
                connection.close()
