"""HTTP/1.1 requests out of a byte stream, and answers back into bytes, with no socket in sight.

The listener (`ca.http.listener`) feeds `RequestReader` what it reads and writes what `render` returns; the fuzz
targets feed it raw bytes the same way. The rules are the usual ones: request line `METHOD PATH HTTP/1.x`, at
most MAX_HEADERS header lines of MAX_HEADER_LINE bytes, a repeated header that decides something
(Content-Length, Authorization, Transfer-Encoding, Host) refused, bodies only by Content-Length (ASCII digits
only; chunked is 411), at most MAX_BODY_BYTES, `Expect: 100-continue` honoured, HTTP/1.0 keep-alive only when
asked for. Parsing uses bytes methods on the whole head at once: reading header lines one by one through
buffered files costs about a tenth of an SVID's server time (benchmarks/README.md).
"""

from __future__ import annotations

import email.utils
import functools
import json
import time
from dataclasses import dataclass
from http import HTTPStatus

from keyseal._internal.ca.http.api import MAX_BODY_BYTES
from keyseal._internal.ca.http.messages import Request, Response

__all__ = ["CONTINUE", "MAX_DRAIN_BYTES", "Incoming", "Refusal", "RequestReader", "error", "render"]

MAX_HEADERS = 100
MAX_HEADER_LINE = 8192
MAX_REQUEST_LINE = 8192
MAX_HEAD = MAX_REQUEST_LINE + (MAX_HEADERS + 1) * (MAX_HEADER_LINE + 2)
MAX_DRAIN_BYTES = 1024 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})
_SINGLE_HEADERS = frozenset({"content-length", "authorization", "transfer-encoding", "host"})


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds to build, and one is built per request
class Incoming:
    """One whole request; `close`: the client does not keep the connection after the answer."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header joined with ", "
    body: bytes
    close: bool
    request_line: str

    def request(self, peer: str, peer_certificate: bytes | None) -> Request:
        """The API's view of it, from the connection it came on."""
        return Request(method=self.method, path=self.path, headers=self.headers, body=self.body, peer=peer,
                       peer_certificate=peer_certificate)


@dataclass(frozen=True)
class Refusal:
    """A request that cannot be answered on this connection: send `response`, then close. `drain`: bytes of a
    refused body still on their way, to be read and dropped so that the client sees the answer, not a reset."""

    response: Response
    drain: int = 0


@dataclass(slots=True)
class _Head:
    method: str
    path: str
    headers: dict[str, str]
    close: bool
    length: int
    request_line: str
    expect_continue: bool


def error(status: int, reason: str, message: str) -> Response:
    return Response(status, json.dumps({"error": reason, "message": message}).encode() + b"\n")


def _refuse(status: int, reason: str, message: str, drain: int = 0) -> Refusal:
    return Refusal(error(status, reason, message), drain)


class RequestReader:
    """Requests from the bytes one connection received, in order. `next()` returns one of: an `Incoming`
    request, a `Refusal`, `CONTINUE` (send it: the client waits for it before its body), or None (more bytes
    are needed, or the client closed cleanly between requests).

    The bytes wait in one buffer read from an offset, and a search for the end of a head looks no further than
    a head may be long: however many requests a client sends ahead, each costs the same to take out."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the bytes not yet taken begin
        self._head: _Head | None = None
        self._continued = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken out as part of a request."""
        return len(self._buffer) - self._start

    @property
    def idle(self) -> bool:
        """No request under way: nothing buffered, no head waiting for its body."""
        return self.buffered == 0 and self._head is None

    def feed(self, data: bytes) -> None:
        if self._start and self._start >= len(self._buffer) // 2:  # drop what was taken, now and then
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next(self, *, eof: bool = False) -> Incoming | Refusal | bytes | None:
        """The next thing to do; `eof`: the client will send nothing more."""
        if self._head is None:
            raw_head = self._take_head()
            if raw_head is None:
                if self.buffered > MAX_HEAD:
                    return _refuse(431, "too_large", "request line and headers are too long")
                if eof and self._buffer[self._start:].strip():
                    return _refuse(400, "bad_request", "incomplete request")
                return None
            parsed = _parse_head(raw_head)
            if isinstance(parsed, Refusal):
                return parsed
            if parsed.length > MAX_BODY_BYTES:
                drain = parsed.length - self.buffered if parsed.length <= MAX_DRAIN_BYTES else 0
                self._start = len(self._buffer)
                return _refuse(413, "too_large", "request body is too large", max(drain, 0))
            self._head = parsed
        head = self._head
        if head.expect_continue and not self._continued:
            self._continued = True
            return CONTINUE
        if self.buffered < head.length:
            return None  # at eof: the client gave up on its own request, there is no one to answer
        body = bytes(self._buffer[self._start: self._start + head.length])
        self._start += head.length
        self._head, self._continued = None, False
        return Incoming(head.method, head.path, head.headers, body, head.close, head.request_line)

    def _take_head(self) -> bytes | None:
        """The request line and headers up to the blank line (a bare LF accepted, as lenient parsers do)."""
        start, limit = self._start, self._start + MAX_HEAD + 4
        crlf = self._buffer.find(b"\r\n\r\n", start, limit)
        lf = self._buffer.find(b"\n\n", start, crlf + 2 if crlf >= 0 else limit)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            end, skip = crlf, 4
        elif lf >= 0:
            end, skip = lf, 2
        else:
            return None
        head = bytes(self._buffer[start:end])
        self._start = end + skip
        return head


def _parse_head(head: bytes) -> _Head | Refusal:
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    while lines and not lines[0]:  # RFC 9112 2.2: empty lines before a request line are ignored
        lines.pop(0)
    request_line = str(lines[0] if lines else b"", "iso-8859-1")
    if len(request_line) > MAX_REQUEST_LINE:
        return _refuse(414, "too_large", "request line is too long")
    words = request_line.split()
    if len(words) != 3 or words[2] not in _VERSIONS:
        return _refuse(400, "bad_request", "bad request line (HTTP/1.0 or HTTP/1.1 only)")
    method, path, version = words
    headers = _headers(lines[1:])
    if isinstance(headers, Refusal):
        return headers
    connection = headers.get("connection", "").lower()
    close = "close" in connection if version == "HTTP/1.1" else "keep-alive" not in connection
    if method not in _METHODS:
        return _refuse(501, "not_implemented", "method not implemented")
    if "transfer-encoding" in headers:
        return _refuse(411, "length_required", "send Content-Length")
    length = _content_length(headers.get("content-length", "0"))
    if isinstance(length, Refusal):
        return length
    expect = headers.get("expect", "").lower() == "100-continue" and length <= MAX_BODY_BYTES
    return _Head(method, path, headers, close, length, request_line, expect)


def _content_length(text: str) -> int | Refusal:
    """A decimal number of ASCII digits, nothing else: `str.isdigit()` also takes `²`, which `int()` refuses, and
    `int()` also takes `+5`, `1_0` and spaces."""
    if not text or not text.isascii() or not text.isdigit():
        return _refuse(400, "bad_request", "Content-Length must be a decimal number (ASCII digits)")
    if len(text) > 18:  # more than MAX_BODY_BYTES anyway, and int() of a long string costs time
        return _refuse(413, "too_large", "request body is too large")
    return int(text)


def _headers(lines: list[bytes]) -> dict[str, str] | Refusal:
    if len(lines) > MAX_HEADERS:
        return _refuse(431, "too_large", "too many headers")
    headers: dict[str, str] = {}
    for raw in lines:
        if len(raw) > MAX_HEADER_LINE:
            return _refuse(431, "too_large", "header line too long")
        name, sep, value = str(raw, "iso-8859-1").partition(":")
        key = name.lower()
        if not sep or not name or name != name.strip():
            return _refuse(400, "bad_request", "malformed header")
        if key in headers:
            if key in _SINGLE_HEADERS:
                return _refuse(400, "bad_request", f"repeated {key} header")
            headers[key] += ", " + value.strip()
        else:
            headers[key] = value.strip()
    return headers


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


def render(response: Response, *, close: bool = False) -> bytes:
    """Status line, headers and body, ready for one write."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers.items())
    connection = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {response.status} {_reason(response.status)}\r\nServer: keyseal\r\n"
            f"Date: {_http_date()}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n{extra}{connection}\r\n").encode("latin-1") + response.body
