"""Workload attestation from the kernel's view of the caller: SO_PEERCRED gives the pid, uid and gid of the
process that connected; /proc/<pid>/exe gives its executable.

Both are read when the connection is accepted, never only when a request arrives: a process can connect, fork,
and exec another binary, keeping its pid and start time, while the child it forked goes on using the connection.
So the executable (its path, device and inode) is taken at accept, and when a request is served the path
selector is given only if the same process (same start time: pids are reused) still runs the same file (same
device and inode). The relay (relay.py) adds that every byte on the connection comes from the process that
connected, and holds bytes written before the executable was read until that process, running the executable
read, answers on the connection."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PeerCredentials", "attest", "peer_credentials", "peer_ids", "selectors_of", "start_time"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    start: int | None  # /proc/<pid>/stat field 22 at accept
    exe: str | None = None  # /proc/<pid>/exe at accept, None if it could not be read safely
    exe_file: tuple[int, int] | None = None  # (st_dev, st_ino) of that executable at accept


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # the command name may contain spaces and ')'
    return int(fields[19])


_AT_FDCWD, _AT_STATX_DONT_SYNC, _STATX_INO = -100, 0x4000, 0x100
_STATX_SIZE = 256  # struct statx: stx_mask u32 at 0, stx_ino u64 at 32, stx_dev_major/minor u32 at 136/140
_statx: Any = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)  # glibc >= 2.28, musl >= 1.2.5


def _executable_file(pid: int) -> tuple[int, int] | None:
    """(device, inode) of the process's executable, as the kernel has them cached: with AT_STATX_DONT_SYNC the
    file system is not asked, so a caller running a binary from a FUSE file system it serves itself cannot make
    attestation (on the relay's one thread) wait. Without statx() in the C library, a plain stat()."""
    path = f"/proc/{pid}/exe"
    if _statx is None:
        try:
            status = os.stat(path)
        except OSError:
            return None
        return status.st_dev, status.st_ino
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(_AT_FDCWD, path.encode(), _AT_STATX_DONT_SYNC, _STATX_INO, buffer) != 0:
        return None
    (mask,) = struct.unpack_from("I", buffer, 0)
    if not mask & _STATX_INO:
        return None
    (inode,) = struct.unpack_from("Q", buffer, 32)
    major, minor = struct.unpack_from("II", buffer, 136)
    return os.makedev(major, minor), inode


def _executable(pid: int) -> tuple[str, tuple[int, int]] | None:
    """The path and (device, inode) of the process's executable; None if an exec changed it while it was read."""
    before = _executable_file(pid)
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError as exc:
        log.debug("cannot read the executable of pid %d: %s", pid, exc.strerror)
        return None
    if before is None or _executable_file(pid) != before:
        return None
    return path, before


def peer_ids(connection: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED: pid, uid and gid of the process that connected, as they were when it called connect()."""
    pid, uid, gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def peer_credentials(connection: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connection just accepted, with the executable the caller runs now."""
    return attest(*peer_ids(connection))


def attest(pid: int, uid: int, gid: int) -> PeerCredentials:
    """The credentials of a connection just accepted (peer_ids), with the executable the caller runs now."""
    start = start_time(pid) if pid > 0 else None
    executable = _executable(pid) if start is not None else None
    if executable is not None and start_time(pid) != start:
        log.warning("pid %d was replaced while it was attested: no path selector", pid)
        executable = None
    if executable is None:
        return PeerCredentials(pid, uid, gid, start)
    return PeerCredentials(pid, uid, gid, start, executable[0], executable[1])


def selectors_of(peer: PeerCredentials, on_failure: Callable[[str], None] = lambda reason: None) -> frozenset[str]:
    """unix:uid:N, unix:gid:N and, if the process that connected still runs the executable it ran when it was
    accepted, unix:path:<that executable>. `on_failure` gets "pid_replaced" or "exe_changed" when the path
    selector is withheld for that reason."""
    selectors = {f"unix:uid:{peer.uid}", f"unix:gid:{peer.gid}"}
    if peer.exe is None or peer.exe_file is None:
        return frozenset(selectors)
    now = _executable_file(peer.pid)
    if start_time(peer.pid) != peer.start:
        log.warning("pid %d exited or was reused since it connected: no path selector", peer.pid)
        on_failure("pid_replaced")
    elif now != peer.exe_file:
        log.warning("pid %d runs another executable than when it connected (%r): no path selector",
                    peer.pid, peer.exe)
        on_failure("exe_changed")
    else:
        selectors.add(f"unix:path:{peer.exe}")
    return frozenset(selectors)
