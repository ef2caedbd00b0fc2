"""The TLS listener: the standard library's threading HTTP server, HTTP/1.1 with keep-alive.

The TLS handshake runs in the connection's own thread (never in the accept loop, so a slow client cannot stall
others); connections are capped, idle ones time out, and request bodies are bounded. The SSL context is read
per connection, so a renewed serving certificate applies to new connections without a restart.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keyseal"
    sys_version = ""
    wbufsize = 64 * 1024  # headers and body leave in one TLS write; flushed after each request
    disable_nagle_algorithm = True
    server: TlsHttpServer

    headers_by_name: dict[str, str]

    def parse_request(self) -> bool:
        """Request line and headers, parsed plainly: the standard parser builds an email message per request,
        which costs more than signing an SVID. Headers become a dict by lower-case name; a repeated header that
        decides something (Content-Length, Authorization, Transfer-Encoding, Host) is refused."""
        self.command = ""
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.requestline = str(getattr(self, "raw_requestline", b""), "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(400, "bad request line (HTTP/1.0 or HTTP/1.1 only)")
            return False
        self.command, self.path, self.request_version = words
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            raw = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(raw) > MAX_HEADER_LINE:
                self.send_error(431, "header line too long")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = str(raw, "iso-8859-1").partition(":")
            key = name.lower()
            if not sep or not name or name != name.strip():
                self.send_error(400, "malformed header")
                return False
            if key in headers:
                if key in _SINGLE_HEADERS:
                    self.send_error(400, f"repeated {name} header")
                    return False
                headers[key] += ", " + value.strip()
            else:
                headers[key] = value.strip()
        else:
            self.send_error(431, "too many headers")
            return False
        self.headers_by_name = headers
        connection = headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        if headers.get("expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
            self.wfile.flush()
        return True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        headers = self.headers_by_name
        if "transfer-encoding" in headers:
            self._send(Response(411, b'{"error":"length_required","message":"send Content-Length"}\n'), close=True)
            return
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            remaining = length if length <= MAX_DRAIN_BYTES else 0  # read it, so the client sees the answer
            while remaining > 0:  # rather than a connection reset; bounded by MAX_DRAIN_BYTES
                chunk = self.rfile.read(min(65536, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
            self._send(Response(413, b'{"error":"too_large","message":"request body is too large"}\n'), close=True)
            return
        body = self.rfile.read(length) if length else b""
        certificate = self.connection.getpeercert(binary_form=True) if isinstance(self.connection, ssl.SSLSocket) \
            else None
        request = Request(
            method=method,
            path=self.path,
            headers=headers,
            body=body,
            peer=f"{self.client_address[0]}:{self.client_address[1]}",
            peer_certificate=certificate,
        )
        self._send(self.server.api.handle(request))

    def _send(self, response: Response, *, close: bool = False) -> None:
        """Status line, headers and body in one buffered write: the standard path formats and appends each
        header separately, which costs a tenth of an SVID per response."""
        lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}\r\nServer: keyseal\r\n"
                 f"Date: {_http_date()}\r\nContent-Type: {response.content_type}\r\n"
                 f"Content-Length: {len(response.body)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in response.headers.items()]
        if close:
            lines.append("Connection: close\r\n")
            self.close_connection = True
        lines.append("\r\n")
        self.wfile.write("".join(lines).encode("latin-1") + response.body)
        self.log_request(response.status, len(response.body))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):  # formatting a line per request costs more than the check
            log.debug("%s %s %s", self.address_string(), self.requestline, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _linger(connection: ssl.SSLSocket) -> None:
    """After a refused handshake: read (below TLS) what the client already sent (in TLS 1.3 a client sends its
    request right after its certificate) until it closes, bounded, so the alert just sent reaches it instead of
    being wiped out by the reset that closing with unread data causes. A refused agent then sees why."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_WR)
        connection.settimeout(LINGER_SECONDS)
        remaining = MAX_DRAIN_BYTES
        while remaining > 0 and (chunk := socket.socket.recv(connection, min(remaining, 65536))):
            remaining -= len(chunk)


class TlsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, api: Api, context: Callable[[], ssl.SSLContext]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.api = api
        self.context = context
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), _Handler)

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
            _Handler(connection, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                connection.close()
