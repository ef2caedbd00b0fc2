"""The public Workload API socket, relayed on one thread to the gRPC server's private socket.

gRPC for Python does not expose a Unix-socket caller's credentials, so this relay accepts on the public socket,
attests the caller at once (attestation.py: SO_PEERCRED and the executable), and relays the connection's bytes
to the gRPC server from a socket bound to a fresh random abstract name; the gRPC handler sees that name as its
peer and looks the credentials up here.

Because any local user may connect, the relay bounds what a connection can cost: one thread for all connections,
at most `max_connections` of them and `max_connections_per_uid` per uid (others are closed as soon as they are
accepted), a connection whose client sends nothing for `idle_timeout` is closed, a failing accept() (e.g. no
file descriptor left) pauses accepting instead of spinning, and every byte must come from the process that
connected (SCM_CREDENTIALS on each read): a connection handed on to another process, e.g. across a fork and
exec, is closed.

The executable is read at accept, but a client may have written before that: a process can connect, write a
whole request, and exec another binary before the relay accepts (under load, or while the relay thread waits
for a core). Those bytes were written by whatever the process ran before. So when bytes are already queued once
the executable has been read (FIONREAD), the relay holds everything the client sends and forwards only the
server's side, until the same process writes an HTTP/2 SETTINGS acknowledgement after attestation: the answer a
live HTTP/2 client sends to the gRPC server's SETTINGS, written by the executable that was attested. A process
that exec'd a binary which does not speak HTTP/2 on that connection never releases its request and is closed
after `PROOF_TIMEOUT`. Legitimate gRPC clients, which write their preface at once and so usually have bytes
queued at accept, pay one local round trip.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import resource
import secrets
import selectors
import socket
import struct
import termios
import threading
import time
from collections import Counter
from pathlib import Path

from keyseal._internal.agent.attestation import PeerCredentials, attest, peer_ids
from keyseal._internal.agent.config import WorkloadApiLimits
from keyseal._internal.agent.metrics import AgentMetrics

__all__ = ["Relay"]

log = logging.getLogger(__name__)

CHUNK = 16384  # read at most this much at once; no more than one chunk waits in each direction
_CREDENTIALS = struct.calcsize("3i")
_ANCILLARY = socket.CMSG_SPACE(_CREDENTIALS)
_DESCRIPTORS_PER_CONNECTION = 3  # the client's, the relay's upstream end, the gRPC server's end
_DESCRIPTORS_SPARE = 256  # the agent's own: gRPC, the server connection, logs, state files
_BACKOFF_FIRST, _BACKOFF_MOST = 0.05, 1.0
_WARN_EVERY = 30.0
_CLIENT, _UPSTREAM = "client", "upstream"
PROOF_TIMEOUT = 10.0  # a connection held for proof (see above) is closed if none comes in this long
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
_SETTINGS, _ACK = 4, 1


class _ForeignWriter(Exception):
    """Bytes on a connection came from a process other than the one that connected."""


class _Connection:
    __slots__ = ("accepted", "client", "client_done", "credentials", "last_heard", "name", "queued", "scan",
                 "to_client", "to_upstream", "upstream", "upstream_done")

    def __init__(self, name: str, credentials: PeerCredentials, client: socket.socket, upstream: socket.socket,
                 now: float) -> None:
        self.name, self.credentials, self.client, self.upstream = name, credentials, client, upstream
        self.to_upstream, self.to_client = bytearray(), bytearray()
        self.client_done = self.upstream_done = False  # that side sent its end of file
        self.last_heard = now  # when the client last sent a byte
        self.accepted = now
        # Bytes the client had written before its executable was read: its bytes are held until it proves that
        # the attested executable speaks on the connection (None: nothing was queued, or proven).
        self.queued: int | None = None
        self.scan = len(_PREFACE)  # where the next client frame header starts while held

    def prove(self) -> bool | None:
        """While held: True once a SETTINGS acknowledgement starts at or after `queued` (frames read from the
        start of the client's bytes, all still in `to_upstream`), False if the bytes are not HTTP/2, else
        None (wait for more)."""
        assert self.queued is not None
        data = self.to_upstream
        if data[:len(_PREFACE)] != _PREFACE[:len(data)]:
            return False
        while len(data) >= self.scan + _FRAME_HEADER:
            header = data[self.scan:self.scan + _FRAME_HEADER]
            length = int.from_bytes(header[:3], "big")
            if self.scan >= self.queued and header[3] == _SETTINGS and header[4] & _ACK and length == 0:
                return True
            self.scan += _FRAME_HEADER + length
        return None


def fit_descriptors(wanted: int) -> int:
    """The most connections the file descriptor limit allows, at most `wanted`: the soft limit is raised
    towards the hard one if it is too low."""
    needed = wanted * _DESCRIPTORS_PER_CONNECTION + _DESCRIPTORS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitting = max(1, (soft - _DESCRIPTORS_SPARE) // _DESCRIPTORS_PER_CONNECTION)
    log.warning("the file descriptor limit (%d) allows %d Workload API connections, not the %d configured",
                soft, fitting, wanted)
    return fitting


class Relay:
    """Public Unix socket -> the gRPC server's private socket, remembering each connection's credentials."""

    def __init__(self, path: Path, mode: int, group: int | None, upstream: str, limits: WorkloadApiLimits,
                 metrics: AgentMetrics) -> None:
        self.path, self.upstream, self.limits, self.metrics = path, upstream, limits, metrics
        self.max_connections = fit_descriptors(limits.max_connections)
        self._peers: dict[str, PeerCredentials] = {}  # read by the gRPC threads
        self._lock = threading.Lock()
        self._connections: dict[str, _Connection] = {}
        self._per_uid: Counter[int] = Counter()
        self._stop = threading.Event()
        self._backoff = 0.0
        self._resume_at: float | None = None
        self._warned: dict[str, float] = {}
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Accepted sockets inherit SO_PASSCRED: each read then says which process wrote the bytes.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old_umask = os.umask(0o177)  # no moment where the socket is more open than asked
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        self.listener.listen(512)  # a burst of connections over a limit must not crowd out others in the queue
        self.listener.setblocking(False)
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self.thread = threading.Thread(target=self._run, name="keyseal-agent-relay", daemon=True)

    # -- for the gRPC handlers and the tests --------------------------------------------------------------

    def credentials(self, peer: str) -> PeerCredentials | None:
        with self._lock:
            return self._peers.get(peer)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._peers)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        else:
            self._close_all()
        self._wake_write.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- the loop -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        tick = min(1.0, self.limits.idle_timeout / 4)
        next_scan = time.monotonic() + tick
        try:
            while not self._stop.is_set():
                timeout = tick
                if self._resume_at is not None:
                    timeout = max(0.0, min(timeout, self._resume_at - time.monotonic()))
                for key, mask in self._selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_read.recv(64)
                    else:
                        connection, side = key.data
                        self._serve(connection, side, mask)
                now = time.monotonic()
                if self._resume_at is not None and now >= self._resume_at:
                    self._resume_at = None
                    self._selector.register(self.listener, selectors.EVENT_READ, None)
                if now >= next_scan:  # once a tick, not on every event
                    next_scan = now + tick
                    for connection in [c for c in self._connections.values()
                                       if now - c.last_heard > self.limits.idle_timeout]:
                        self._close(connection, "idle")
                    for connection in [c for c in self._connections.values()
                                       if c.queued is not None and now - c.accepted > PROOF_TIMEOUT]:
                        self._close(connection, "unproven")
        except Exception:
            log.exception("the Workload API relay failed")
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for connection in list(self._connections.values()):
            self._close(connection, None)
        with contextlib.suppress(OSError):
            self.listener.close()
        self._wake_read.close()
        self._selector.close()

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """At most one warning of a kind every 30 s: a local user can make these happen at will."""
        now = time.monotonic()
        if now - self._warned.get(kind, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[kind] = now
            log.warning(message, *args)

    # -- accepting ----------------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):  # then serve the open connections again
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays in the backlog and accept() would fail
                # again at once; wait, longer each time, and try again.
                self._backoff = min(max(self._backoff * 2, _BACKOFF_FIRST), _BACKOFF_MOST)
                self._resume_at = time.monotonic() + self._backoff
                self._selector.unregister(self.listener)
                self.metrics.connection_closed("accept_failed")
                self._warn("accept", "cannot accept a Workload API connection (%s): pausing up to %.1f s each time",
                           exc.strerror or exc, _BACKOFF_MOST)
                return
            self._backoff = 0.0
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        try:
            client.setblocking(False)
            pid, uid, gid = peer_ids(client)
        except OSError as exc:
            client.close()
            self._warn("attest", "cannot attest a Workload API connection: %s", exc)
            return
        if len(self._connections) >= self.max_connections:
            client.close()
            self.metrics.connection_closed("too_many_connections")
            self._warn("total", "%d Workload API connections are open, the most allowed (workloadAPI."
                       "maxConnections): refusing more", len(self._connections))
            return
        if self._per_uid[uid] >= self.limits.max_connections_per_uid:
            client.close()
            self.metrics.connection_closed("too_many_connections_for_uid")
            self._warn(f"uid {uid}", "uid %d holds %d Workload API connections, the most allowed "
                       "(workloadAPI.maxConnectionsPerUID): refusing more", uid, self._per_uid[uid])
            return
        credentials = attest(pid, uid, gid)  # only for a connection within the limits: /proc is read here
        try:  # after the executable was read: what is queued now may have been written by a former one
            queued = struct.unpack("i", fcntl.ioctl(client.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError as exc:
            client.close()
            self._warn("attest", "cannot attest a Workload API connection: %s", exc)
            return
        name = f"keyseal-agent-{secrets.token_hex(16)}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind("\0" + name)
            upstream.setblocking(False)
            upstream.connect(self.upstream)  # a Unix socket connects at once or fails (EAGAIN: backlog full)
        except OSError as exc:
            upstream.close()
            client.close()
            self._warn("upstream", "cannot relay a Workload API connection: %s", exc)
            return
        connection = _Connection(name, credentials, client, upstream, time.monotonic())
        if queued and credentials.exe is not None:
            connection.queued = queued
        self._connections[name] = connection
        self._per_uid[uid] += 1
        with self._lock:
            self._peers[f"unix-abstract:{name}"] = credentials
        self._watch(connection)

    # -- relaying -----------------------------------------------------------------------------------------

    def _watch(self, connection: _Connection) -> None:
        """Wait to read from a side only while the other side's buffer has room; to write only with something
        to write."""
        room_up, room_down = len(connection.to_upstream) < CHUNK, len(connection.to_client) < CHUNK
        for sock, side, readable, pending in (
                (connection.client, _CLIENT, room_up and not connection.client_done, connection.to_client),
                (connection.upstream, _UPSTREAM, room_down and not connection.upstream_done,
                 connection.to_upstream if connection.queued is None else b"")):
            events = (selectors.EVENT_READ if readable else 0) | (selectors.EVENT_WRITE if pending else 0)
            try:
                key: selectors.SelectorKey | None = self._selector.get_key(sock)
            except KeyError:
                key = None
            if key is None and events:
                self._selector.register(sock, events, (connection, side))
            elif key is not None and not events:
                self._selector.unregister(sock)
            elif key is not None and key.events != events:
                self._selector.modify(sock, events, (connection, side))

    def _serve(self, connection: _Connection, side: str, mask: int) -> None:
        if connection.name not in self._connections:  # closed by an earlier event of the same round
            return
        try:
            if side == _CLIENT:
                if mask & selectors.EVENT_READ:
                    self._read_client(connection)
                    if connection.queued is not None and not self._proven(connection):
                        return
                self._send(connection.client, connection.to_client)
                if connection.queued is None:
                    self._send(connection.upstream, connection.to_upstream)
            else:
                if mask & selectors.EVENT_READ:
                    self._read_upstream(connection)
                if connection.queued is None:
                    self._send(connection.upstream, connection.to_upstream)
                self._send(connection.client, connection.to_client)
        except _ForeignWriter:
            self._close(connection, "foreign_writer")
            return
        except OSError:
            self._close(connection, None)
            return
        if connection.client_done and not connection.to_upstream:
            with contextlib.suppress(OSError):
                connection.upstream.shutdown(socket.SHUT_WR)
        if connection.upstream_done and not connection.to_client:
            with contextlib.suppress(OSError):
                connection.client.shutdown(socket.SHUT_WR)
        if connection.client_done and connection.upstream_done and not connection.to_client \
                and not connection.to_upstream:
            self._close(connection, None)
        else:
            self._watch(connection)

    def _read_client(self, connection: _Connection) -> None:
        try:
            data, ancillary, flags, _ = connection.client.recvmsg(CHUNK, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        writer: int | None = None
        passed: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDENTIALS:
                writer = struct.unpack("3i", payload[:_CREDENTIALS])[0]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                descriptors = array.array("i")
                descriptors.frombytes(payload[:len(payload) - len(payload) % descriptors.itemsize])
                passed.extend(descriptors)
        for descriptor in passed:  # nobody passes descriptors to the agent; do not keep them open
            with contextlib.suppress(OSError):
                os.close(descriptor)
        if not data:
            connection.client_done = True
            return
        if writer != connection.credentials.pid or passed or flags & socket.MSG_CTRUNC:
            self._warn("foreign", "pid %s wrote on a Workload API connection that pid %d (uid %d) opened: closed",
                       writer, connection.credentials.pid, connection.credentials.uid)
            raise _ForeignWriter
        connection.last_heard = time.monotonic()
        connection.to_upstream += data

    def _proven(self, connection: _Connection) -> bool:
        """For a held connection: release it once proven; close it (and say False) when it cannot be."""
        proof = connection.prove()
        if proof:
            connection.queued = None
            return True
        if proof is False or connection.client_done or len(connection.to_upstream) >= CHUNK:
            self._close(connection, "unproven")
            return False
        return True

    def _read_upstream(self, connection: _Connection) -> None:
        try:
            data = connection.upstream.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            connection.upstream_done = True
        connection.to_client += data

    @staticmethod
    def _send(sock: socket.socket, pending: bytearray) -> None:
        if not pending:
            return
        try:
            sent = sock.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        del pending[:sent]

    def _close(self, connection: _Connection, reason: str | None) -> None:
        if self._connections.pop(connection.name, None) is None:
            return
        self._per_uid[connection.credentials.uid] -= 1
        if self._per_uid[connection.credentials.uid] <= 0:
            del self._per_uid[connection.credentials.uid]
        with self._lock:
            self._peers.pop(f"unix-abstract:{connection.name}", None)
        for sock in (connection.client, connection.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        if reason is not None:
            self.metrics.connection_closed(reason)
