"""The TLS listener: one thread runs every connection's I/O from a selector loop (HTTP/1.1, keep-alive).

Why a loop and not a thread per connection: with threads, each request hands the interpreter lock from thread
to thread at every blocking read, which on a small machine added a quarter to an SVID's server time
(benchmarks/README.md). In the loop, sockets are non-blocking and the TLS handshake is a state like any other,
so a slow or silent client stalls nobody. A request whose answer comes from memory alone (`answer_inline`: the
bundle, health, metrics, and issuance when the CA keys are in memory) is answered on the loop's thread; any
other (a key manager's remote signature, the store, an audit file) runs on a worker thread and its answer is
handed back to the loop. Answers are written once per pass of the loop, after every ready request is
answered, so that a busy server wakes several clients at once instead of one per answer. Handshakes run on
the loop's thread too: each costs about a millisecond, which bounds new connections, not requests.

Limits (`ConnectionLimits`, the `server.connections` configuration): at most `max_connections` open connections,
at most `per_source` from one source address (an IPv6 /64 counts as one), and once the server is busy (no more
than `reserved` slots free) a source gets a new one only while it holds fewer than `busy_share`, so that a flood
from a few addresses leaves room for everyone else. Closed: a handshake not complete REQUEST_TIMEOUT after it
began; a request not complete REQUEST_TIMEOUT after it began (answered 408 first); a connection idle for
IDLE_TIMEOUT (a client that stops reading included). While the server is busy, or for a source at its limit,
handshakes get BUSY_HANDSHAKE_TIMEOUT and kept-alive connections with no request under way BUSY_IDLE_TIMEOUT.
The answer after MAX_CONNECTION_AGE closes its connection, so that what the handshake decided is decided again.
Request heads and bodies are bounded (`ca.http.http1`); a client that sends far ahead of what it reads has at
most MAX_UNWRITTEN bytes of answers queued. The SSL context is read per connection, so a renewed serving
certificate applies to new connections at once.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import ipaddress
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from keyseal._internal.ca.config import ConnectionLimits
from keyseal._internal.ca.http.api import MAX_BODY_BYTES
from keyseal._internal.ca.http.http1 import MAX_DRAIN_BYTES, MAX_HEAD, Incoming, Refusal, RequestReader, error, render
from keyseal._internal.ca.http.messages import Request, Response
from keyseal.errors import loggable

__all__ = ["Handler", "TlsHttpServer", "source_of"]

log = logging.getLogger(__name__)

MAX_WORKERS = 32
IDLE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
BUSY_HANDSHAKE_TIMEOUT = 5.0  # a handshake takes a few round trips: seconds are plenty, even far away
BUSY_IDLE_TIMEOUT = 5.0  # a kept-alive connection with no request under way, while the server is busy
MAX_CONNECTION_AGE = 600.0
REFUSAL_LOG_SECONDS = 10.0  # refused connections are logged once per this, with how many: a flood is one line
LINGER_SECONDS = 2.0
DRAIN_SECONDS = 10.0  # reading a refused body (at most MAX_DRAIN_BYTES) so that the client sees the 413
READ_SIZE = 16384  # a TLS record carries at most 16 KiB: one read never returns more
# How far to read ahead of the requests not yet answered: more than one request can be, so that a request never
# waits for bytes the loop chose not to read yet.
READ_AHEAD = MAX_HEAD + MAX_BODY_BYTES + READ_SIZE
SWEEP_SECONDS = 1.0
MAX_UNWRITTEN = 256 * 1024  # answers queued on one connection before the loop stops answering it to write

DEFAULT_LIMITS = ConnectionLimits()

_HANDSHAKE, _OPEN, _BUSY, _LINGER, _CLOSED = range(5)
_ACCEPT, _WAKE = object(), object()  # the selector's keys for the listener and the workers' wake-up


class _Connection:
    """One client: its TLS socket, what it sent that is not yet answered, what we owe it."""

    def __init__(self, server: TlsHttpServer, sock: ssl.SSLSocket, address: Any, source: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = f"{address[0]}:{address[1]}"
        self.source = source
        self.reader = RequestReader()
        self.state = _HANDSHAKE
        self.events = 0
        self.out = b""
        self.close_after = False
        self.eof = False
        self.opened = self.active = time.monotonic()
        self.deadline = self.opened + IDLE_TIMEOUT
        self.request_started: float | None = None
        self.linger_budget = MAX_DRAIN_BYTES
        self.peer_certificate: bytes | None = None
        self.linger_seconds = LINGER_SECONDS

    # -- selector events -----------------------------------------------------------------------------------

    def ready(self) -> None:
        if self.state == _LINGER:  # its deadline is set once: a client trickling bytes gets no more time
            self._linger()
            return
        self.active = time.monotonic()
        self.deadline = self.active + IDLE_TIMEOUT
        if self.state == _HANDSHAKE:
            self._handshake()
        elif self.state == _OPEN and (not self.out or self._flush()):
            self._read()

    def want(self, events: int) -> None:
        """Wait for `events` (0: for nothing, while a worker answers)."""
        if events == self.events:
            return
        selector = self.server.selector
        if not events:
            selector.unregister(self.sock)
        elif not self.events:
            selector.register(self.sock, events, self)
        else:
            selector.modify(self.sock, events, self)
        self.events = events

    def close(self) -> None:
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        self.want(0)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.server.forget(self)

    # -- states ----------------------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want(selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self.want(selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            self._start_linger()
            return
        self.state = _OPEN
        # Read once: no renegotiation (the context forbids it), so the certificate cannot change later.
        self.peer_certificate = self.sock.getpeercert(binary_form=True)
        self._read()

    def _read(self) -> None:
        """Read what the client sent, then answer what is complete. One read from the socket per readiness event
        (the selector is level-triggered: it reports the rest again), but all that TLS already decrypted."""
        while self.reader.buffered < READ_AHEAD and not self.eof:
            try:
                chunk = self.sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:  # TLS needs to write first (a key update): wait until it can
                self.want(selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as exc:  # reset, TLS alert: the client is gone
                log.debug("connection from %s ended: %s", self.peer, exc)
                self.close()
                return
            if not chunk:
                self.eof = True
                break
            if self.reader.idle:
                self.request_started = time.monotonic()
            self.reader.feed(chunk)
            if not self.sock.pending():
                break
        self._answer()

    def _answer(self) -> None:
        """Answer the complete requests in the buffer, one at a time, until one must wait (for more bytes, a
        worker, or a client slow to read)."""
        while self.state == _OPEN:
            if len(self.out) > MAX_UNWRITTEN:  # a client sending far ahead of what it reads: write first
                return
            event = self.reader.next(eof=self.eof)
            if event is None:
                if self.eof and self.out:  # the client is done sending, but still owed answers
                    self.close_after = True
                elif self.eof:
                    self.close()
                elif self.sock.pending():  # read-ahead stopped with decrypted bytes still in TLS
                    self._read()
                else:
                    self.want(selectors.EVENT_READ)
                return
            if isinstance(event, bytes):  # 100 Continue
                self.out += event
                if not self._flush():
                    return
                continue
            self.request_started = None if self.reader.idle else time.monotonic()
            if isinstance(event, Refusal):
                # The drain is counted below TLS: add its record overhead (under 1%) and one record more.
                self.linger_budget = event.drain + event.drain // 64 + READ_SIZE
                self.linger_seconds = DRAIN_SECONDS if event.drain else LINGER_SECONDS
                self.respond(event.response, close=True)
                return
            request = event.request(self.peer, self.peer_certificate)
            if not self.server.answer_inline(event.path):
                self.state = _BUSY
                self.want(0)
                self.server.hand_to_worker(self, request, event)
                return
            if not self.respond(self.server.api.handle(request), close=event.close, request=event):
                return  # the connection closes once the answer is written

    def worker_answered(self, incoming: Incoming, response: Response) -> None:
        """Queue a worker's answer, then go on with the requests already read, or wait for more."""
        self.active = time.monotonic()
        self.deadline = self.active + IDLE_TIMEOUT
        if self.respond(response, close=incoming.close, request=incoming):
            self._answer()

    def respond(self, response: Response, *, close: bool, request: Incoming | None = None) -> bool:
        """Queue the answer; the loop writes it once it has answered every request that is ready (several
        clients are then woken in one go rather than one after each answer). True if the connection may go
        on to its next request."""
        if request is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s", self.peer, loggable(request.request_line), response.status)
        if not close and time.monotonic() - self.opened > MAX_CONNECTION_AGE:
            close = True  # the client opens a new connection, with a new handshake, for what it asks next
        self.state = _OPEN
        self.out += render(response, close=close)
        self.close_after = close
        self.server.unwritten.append(self)
        return not close

    def write_queued(self) -> None:
        """Write the answers queued by `respond` (what the socket does not take waits for it to be writable),
        then go on: with requests left in the buffer while too much was unwritten, or by waiting for more."""
        if self.state == _OPEN and self.out and self._flush():
            self._answer()

    def _flush(self) -> bool:
        """Write what we owe; True when all of it went and the connection stays open."""
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except ssl.SSLWantWriteError:
                self.want(selectors.EVENT_WRITE)
                return False
            except ssl.SSLWantReadError:
                self.want(selectors.EVENT_READ)
                return False
            except (ssl.SSLError, OSError) as exc:
                log.debug("connection from %s ended: %s", self.peer, exc)
                self.close()
                return False
            self.out = self.out[sent:]
        if self.close_after:
            self._start_linger()
            return False
        return True

    def _start_linger(self) -> None:
        """Before closing: stop writing, then read (below TLS) and drop what the client still sends until it
        closes, bounded in bytes and time. Closing with unread data would reset the connection and wipe out
        what we just sent (an answer, or the alert of a refused handshake: in TLS 1.3 a client sends its
        request right after its certificate, so a refused agent would not learn why)."""
        self.state = _LINGER
        self.deadline = time.monotonic() + self.linger_seconds
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.want(selectors.EVENT_READ)
        self._linger()

    def _linger(self) -> None:
        while self.linger_budget > 0:
            try:
                chunk = socket.socket.recv(self.sock, min(self.linger_budget, READ_SIZE))
            except BlockingIOError:
                return
            except OSError:
                break
            if not chunk:
                break
            self.linger_budget -= len(chunk)
        self.close()

    def expire(self, now: float, pressed: bool) -> None:
        """Close an idle or old connection, or answer 408 to a request that has trickled in for too long.
        `pressed`: the server is busy, or this connection's source is at its limit, so a handshake that has not
        finished by now, or a kept-alive connection with nothing to do, makes room (for its source's next
        connection, or anyone's)."""
        if self.state == _BUSY:
            return
        if self.state == _HANDSHAKE:
            if now - self.opened > (BUSY_HANDSHAKE_TIMEOUT if pressed else REQUEST_TIMEOUT):
                log.debug("TLS handshake with %s took too long", self.peer)
                self.close()
        elif (self.state == _OPEN and not self.out and not self.close_after and self.request_started is not None
              and now - self.request_started > REQUEST_TIMEOUT):  # with nothing owed, what waits is incomplete
            log.debug("request from %s took too long to arrive", self.peer)
            self.request_started = None
            self.respond(error(408, "timeout", f"the request did not arrive within {REQUEST_TIMEOUT:.0f}s"),
                         close=True)
        elif now > self.deadline or (self.state == _OPEN and not self.out and self.reader.idle and (
                now - self.opened > MAX_CONNECTION_AGE or (pressed and now - self.active > BUSY_IDLE_TIMEOUT))):
            log.debug("connection from %s closed: idle, or old", self.peer)
            self.close()


def source_of(address: str) -> str:
    """What per-source limits count by: the IPv4 address (also when written as IPv4-mapped IPv6), or the IPv6 /64
    (one host, or one subnet, commonly holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _RefusalLog:
    """Refused connections, logged at most once per REFUSAL_LOG_SECONDS: a warning per refusal would let a flood
    fill the log as well as the listener."""

    def __init__(self) -> None:
        self._count = 0
        self._last: tuple[str, str] = ("", "")
        self._next = 0.0

    def note(self, source: str, reason: str) -> None:
        self._count += 1
        self._last = (source, reason)
        self.flush(time.monotonic())

    def flush(self, now: float) -> None:
        if self._count and now >= self._next:
            source, reason = self._last
            more = f"; {self._count - 1} other connections refused since the last such line" if self._count > 1 else ""
            log.warning("refused a connection from %s: %s%s", source, reason, more)
            self._count = 0
            self._next = now + REFUSAL_LOG_SECONDS


class _Workers:
    """Up to `size` daemon threads for requests that wait on something outside the process (a key manager, the
    store). Daemon threads: a key manager that hangs must not keep a stopping server from exiting."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                return
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._run, name=f"keyseal-request-{self._threads}", daemon=True).start()
        self._queue.put(work)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            work = self._queue.get()
            with self._lock:
                self._idle -= 1
            if work is None:
                return
            work()

    def shutdown(self) -> None:
        """Let idle threads end; a busy one ends after its request (and never holds up the process's exit)."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)


class Handler(Protocol):
    """What a listener answers with: the API, or a public listener's few routes (keyseal._internal.ca.oidc)."""

    def handle(self, request: Request) -> Response: ...


class TlsHttpServer:
    """`serve_forever()` on one thread; `shutdown()` from another stops it; `server_close()` frees everything."""

    def __init__(self, host: str, port: int, api: Handler, context: Callable[[], ssl.SSLContext], *,
                 answer_inline: Callable[[str], bool] = lambda path: False,
                 limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        self.api = api
        self.context = context
        self.answer_inline = answer_inline
        self.limits = limits
        self.selector = selectors.DefaultSelector()
        self.connections: set[_Connection] = set()
        self._by_source: dict[str, int] = {}
        self._refusals = _RefusalLog()
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(limits.max_connections)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.selector.register(self._listener, selectors.EVENT_READ, _ACCEPT)
        self.selector.register(self._wake_read, selectors.EVENT_READ, _WAKE)
        self._workers = _Workers(MAX_WORKERS)
        self.unwritten: list[_Connection] = []  # connections with answers queued in this pass of the loop
        self._answered: collections.deque[tuple[_Connection, Incoming, Response]] = collections.deque()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._accept_paused_until = 0.0

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def held_by(self, address: str) -> int:
        """How many connections the source of `address` holds."""
        return self._by_source.get(source_of(address), 0)

    def _refusal(self, source: str) -> str | None:
        """Why a new connection from `source` is refused, or None."""
        limits, held, open_now = self.limits, self._by_source.get(source, 0), len(self.connections)
        if open_now >= limits.max_connections:
            return f"{open_now} connections are open (server.connections.max)"
        if held >= limits.per_source:
            return f"it holds {held} connections (server.connections.perSource)"
        if open_now >= limits.max_connections - limits.reserved and held >= limits.busy_share:
            return (f"it holds {held} connections and only {limits.max_connections - open_now} are free "
                    f"(server.connections.reserved)")
        return None

    def forget(self, connection: _Connection) -> None:
        """A connection closed: its slot, and its source's, are free."""
        if connection in self.connections:
            self.connections.discard(connection)
            held = self._by_source.get(connection.source, 0) - 1
            if held > 0:
                self._by_source[connection.source] = held
            else:
                self._by_source.pop(connection.source, None)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        next_sweep = time.monotonic() + SWEEP_SECONDS
        try:
            while not self._stopping.is_set():
                for key, _ in self.selector.select(min(poll_interval, SWEEP_SECONDS)):
                    if key.data is _ACCEPT:
                        self._accept()
                    elif key.data is _WAKE:
                        self._take_answers()
                    else:
                        self._guarded(key.data.ready, key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_SECONDS
                    self._sweep(now)
                self._write_queued()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait for it."""
        self._stopping.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        self._workers.shutdown()
        self.selector.close()
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()

    # -- the loop's work ----------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                raw, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors: stop accepting for a moment rather than spin
                log.warning("cannot accept a connection: %s", exc.strerror or exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.selector.unregister(self._listener)
                    self._accept_paused_until = time.monotonic() + SWEEP_SECONDS / 2
                return
            source = source_of(address[0])
            refusal = self._refusal(source)
            if refusal is not None:
                self._refusals.note(source, refusal)
                raw.close()
                continue
            raw.setblocking(False)
            with contextlib.suppress(OSError):  # a "100 Continue" and its answer must not wait on a delayed ACK
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock = self.context().wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS with %s failed: %s", address[0], exc)
                raw.close()
                continue
            connection = _Connection(self, sock, address, source)
            self.connections.add(connection)
            self._by_source[source] = self._by_source.get(source, 0) + 1
            self._guarded(connection.ready, connection)

    def _guarded(self, step: Callable[[], None], connection: _Connection) -> None:
        """Run one connection's step; a bug there closes that connection, never the loop."""
        try:
            step()
        except Exception:
            log.exception("internal error on the connection from %s", connection.peer)
            connection.close()

    def hand_to_worker(self, connection: _Connection, request: Request, incoming: Incoming) -> None:
        def work() -> None:
            try:
                response = self.api.handle(request)
            except BaseException:  # Api.handle answers its own errors; this is the last resort
                log.exception("internal error answering %s %s", request.method, loggable(request.path))
                response = error(500, "internal", "internal error; see the server log")
            self._answered.append((connection, incoming, response))
            self._wake()

        self._workers.submit(work)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: the loop is awake already
            self._wake_write.send(b"\0")

    def _take_answers(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_read.recv(4096):
                pass
        while self._answered:
            connection, incoming, response = self._answered.popleft()
            if connection.state == _BUSY:  # else closed while the worker was busy
                self._guarded(functools.partial(connection.worker_answered, incoming, response), connection)

    def _write_queued(self) -> None:
        while self.unwritten:
            connection = self.unwritten.pop()
            self._guarded(connection.write_queued, connection)

    def _sweep(self, now: float) -> None:
        # Who is pressed is decided once per sweep: each close below would otherwise spare the rest.
        limits = self.limits
        busy = len(self.connections) >= limits.max_connections - limits.reserved
        full = {source for source, held in self._by_source.items() if held >= limits.per_source}
        for connection in list(self.connections):
            pressed = busy or connection.source in full
            self._guarded(functools.partial(connection.expire, now, pressed), connection)
        self._refusals.flush(now)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.selector.register(self._listener, selectors.EVENT_READ, _ACCEPT)

