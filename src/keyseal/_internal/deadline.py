"""One deadline for a whole HTTPS fetch (resolve, connect, TLS handshake, request, every read of the answer).

Socket timeouts bound each operation on its own, so a server that trickles a byte at a time could hold a
fetch (and the thread doing it, and whatever waits on that thread) forever. Used by the WKD client and the
federation bundle client."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["Deadline", "DeadlineConnection", "DeadlineSocket", "Endpoint", "resolve"]

Endpoint = tuple[str, int]


class Deadline:
    """One deadline for a whole fetch. Socket timeouts bound each read on its own, so a server sending a byte
    at a time could hold a fetch forever; every network step asks this for the time left instead."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left; TimeoutError once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        return left


class DeadlineSocket(ssl.SSLSocket):
    """A TLS socket whose every read and write waits at most until the fetch's deadline (http.client reads the
    status line, headers and body through `recv_into`, and writes the request through `send`)."""

    deadline: Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.remaining())

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._arm()
        return super().recv(buflen, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        self._arm()
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        self._arm()
        return super().send(data, flags)


def resolve(host: str, port: int, deadline: Deadline) -> list[tuple[Any, ...]]:
    """getaddrinfo, waited for only until the deadline: the resolver's own retries can take far longer, and
    it cannot be interrupted, so it runs in a daemon thread that is left behind if it is late."""
    found: list[tuple[Any, ...]] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            failed.append(exc)

    thread = threading.Thread(target=run, name="keyseal-resolve", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if thread.is_alive():
        raise TimeoutError(f"no address for {host} within {deadline.timeout:g} s")
    if failed:
        raise failed[0]
    return found


class DeadlineConnection(http.client.HTTPSConnection):
    """HTTPS to `host`:`port`, with the TCP connection optionally sent elsewhere (`target`); TLS always checks
    `host`. Resolving, connecting, the TLS handshake, the request and every read of the answer share one
    deadline, provided `context.sslsocket_class` is DeadlineSocket."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, deadline: Deadline,
                 target: Endpoint | None = None) -> None:
        super().__init__(host, port, timeout=deadline.timeout, context=context)
        self._target = target or (host, port)
        self._tls = context
        self._deadline = deadline

    def connect(self) -> None:
        sock = self._tcp()
        try:
            sock.settimeout(self._deadline.remaining())  # CPython bounds the whole handshake by this
            tls = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        if isinstance(tls, DeadlineSocket):
            tls.deadline = self._deadline
        self.sock = tls

    def _tcp(self) -> socket.socket:
        error: OSError | None = None
        for family, kind, proto, _, address in resolve(*self._target, self._deadline):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self._deadline.remaining())
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                if isinstance(exc, TimeoutError):
                    raise
                error = exc
        raise error or OSError(f"no address for {self._target[0]}")
