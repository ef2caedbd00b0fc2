"""Workload attestation from the kernel's view of the caller: SO_PEERCRED gives the pid, uid and gid of the
process that connected; /proc/<pid>/exe gives its executable. A pid can be reused once the caller exits, so the
process start time read at connect time must still be the same before and after the executable is read: if it
changed, the path belongs to another process and no path selector is given."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PeerCredentials", "peer_credentials", "selectors_of", "start_time"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    start: int | None  # /proc/<pid>/stat field 22 at connect time


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # the command name may contain spaces and ')'
    return int(fields[19])


def peer_credentials(connection: socket.socket) -> PeerCredentials:
    pid, uid, gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return PeerCredentials(pid, uid, gid, start_time(pid))


def selectors_of(peer: PeerCredentials, on_race: Callable[[], None] = lambda: None) -> frozenset[str]:
    """unix:uid:N, unix:gid:N and, when it can be read safely, unix:path:/exe (`on_race` is called when the
    pid was reused while it was read)."""
    selectors = {f"unix:uid:{peer.uid}", f"unix:gid:{peer.gid}"}
    if peer.start is not None and peer.pid > 0:
        try:
            exe = os.readlink(f"/proc/{peer.pid}/exe")
        except OSError as exc:
            log.debug("cannot read the executable of pid %d: %s", peer.pid, exc.strerror)
        else:
            if start_time(peer.pid) == peer.start:
                selectors.add(f"unix:path:{exe}")
            else:
                log.warning("pid %d was replaced while it was attested: no path selector", peer.pid)
                on_race()
    return frozenset(selectors)
