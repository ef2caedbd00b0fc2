"""The verification server behind `keyseal-gpg --verify` (see keyseal._internal.cli.gpgentry for the why).

Started by a `keyseal-gpg` that found none (`python -P -m keyseal._internal.cli.gpgserver NAME`, in its own
session, with /dev/null for its standard descriptors): it takes NAME.lock (an flock: one server per context; the
lock file holds its pid), imports the verifier, binds NAME.sock (mode 0600, in the caller's private runtime
directory) and forks a worker that serves callers one after another. For each, the worker checks the caller's
user ID, answers R (ready: only then does the caller send its request and descriptors), checks its context,
answers S, puts the caller's descriptors 0-2 in place of its own (with standard streams made for that request
alone), changes to the caller's directory, runs `keyseal-gpg` as the caller would have, puts /dev/null back and
answers the exit status. Nothing of one request is kept for the next: the verification
path holds no cache in memory (a keyring changed a moment ago is read afresh, tests/test_gpg_server.py holds
that), and a worker is replaced by a fresh fork after MAX_REQUESTS callers. A worker rather than a fork per
request: in a fresh fork a verification takes about 2 ms against 0.5 ms (copy-on-write faults), a sixth of the budget.
The server exits when its worker waited KEYSEAL_GPG_SERVER_IDLE seconds (default 60) for a caller, when a
keyseal module it imported changed on disk (that caller is told N and verifies itself), and on SIGTERM, SIGINT
or SIGHUP; its socket goes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from typing import NoReturn, TextIO

from keyseal._internal.cli.gpgentry import (
    IDLE_ENV,
    MAX_REQUEST,
    PROTOCOL,
    context,
    context_digest,
    private_directory,
    runtime_directory,
    server_name,
)

__all__ = ["DEFAULT_IDLE_SECONDS", "main", "serve"]

DEFAULT_IDLE_SECONDS = 60.0
REQUEST_SECONDS = 5.0  # a caller that connects must send its request within this
MAX_REQUESTS = 1000  # a worker serves this many callers, then the server forks a fresh one
# How a child ended, as its exit status tells the server.
_SERVED, _IDLE, _STALE, _FAILED, _GONE = 0, 3, 4, 5, 6
_MAX_FAILURES = 5  # children failing one after another: something is wrong, stop


class _Stop(Exception):
    """A signal asked the server to stop."""


def main() -> None:
    """`python -P -m keyseal._internal.cli.gpgserver NAME`: serve until idle; quietly do nothing when another
    server holds NAME, or when NAME is not this process's own context's."""
    if len(sys.argv) != 2:
        sys.exit(2)
    name = sys.argv[1]
    directory = runtime_directory()
    if os.path.dirname(name) != directory or private_directory(directory, create=False) is not None:
        sys.exit(2)
    digest = context_digest(context())
    if name != server_name(directory, digest):
        sys.exit(2)  # started with another environment than the one NAME stands for
    lock = os.open(name + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(0)  # another server serves this context
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    os.chdir("/")
    clean = False
    try:
        clean = serve(name, digest, _idle_seconds())
    finally:
        os.ftruncate(lock, 0)  # no pid left behind for anyone to signal once it is another process's
        if clean:  # gone by design, not a failed start: the next caller may start a server at once
            os.utime(lock, ns=(0, 0))
        os.close(lock)  # the lock goes with the socket, not after the interpreter's shutdown


def serve(name: str, digest: str, idle_seconds: float) -> bool:
    """Bind NAME.sock and fork a worker at a time to serve callers, until idle, stale or stopped (True), or
    until its workers failed _MAX_FAILURES times in a row (False). `digest`: this server's context's, which a
    caller's must equal."""
    expected = digest.encode()
    _warm()
    modules = _module_files()
    listener = _listen(name + ".sock")
    bound = os.stat(name + ".sock").st_ino
    child = 0

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    gc.freeze()  # the workers share the server's objects: the collector need not walk them in each
    failures = 0
    try:
        while failures < _MAX_FAILURES:
            child = os.fork()
            if child == 0:
                _worker(listener, expected, modules, idle_seconds)
            _, status = os.waitpid(child, 0)
            child = 0
            ended = os.waitstatus_to_exitcode(status)
            if ended in (_IDLE, _STALE):
                return True
            failures = 0 if ended in (_SERVED, _GONE) else failures + 1  # a caller that went is no failure
    except _Stop:
        return True
    finally:
        if child:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGTERM)
                os.waitpid(child, 0)
        listener.close()  # first: a caller still queued hears at once that no one will answer, and verifies itself
        with contextlib.suppress(OSError):
            if os.stat(name + ".sock").st_ino == bound:
                os.unlink(name + ".sock")
    return False


def _worker(listener: socket.socket, digest: bytes, modules: dict[str, tuple[int, int]],
           idle_seconds: float) -> NoReturn:
    """A worker: serve callers one after another (up to MAX_REQUESTS), then exit with how it ended (never
    returns into the server's loop)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    try:
        listener.settimeout(idle_seconds)
        for _ in range(MAX_REQUESTS):
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                os._exit(_IDLE)
            with connection:
                if _serve_one(connection, digest, modules) == _STALE:
                    os._exit(_STALE)
    except BaseException:  # the worker's last word is its exit status
        os._exit(_FAILED)
    os._exit(_SERVED)


def _serve_one(connection: socket.socket, digest: bytes, modules: dict[str, tuple[int, int]]) -> int:
    """One caller: S and its verification's exit status, or N (another user's, another context's, or this
    server's code changed on disk)."""
    connection.settimeout(REQUEST_SECONDS)
    pid_uid_gid = struct.Struct("3i")
    _, uid, _ = pid_uid_gid.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         pid_uid_gid.size))
    if uid != os.getuid():
        return _SERVED  # not this user's caller: closed without a word
    try:  # a caller that gave up waiting has closed its end: it sent nothing, and is no failure of the worker's
        connection.send(b"R")
        request, ancillary, flags, _ = connection.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(3 * 4))
    except OSError:
        return _SERVED
    descriptors = _descriptors(ancillary)
    try:
        parts = request.split(b"\0")
        if (flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(descriptors) != 3 or len(parts) < 3
                or parts[0] != PROTOCOL or parts[1] != digest):
            with contextlib.suppress(OSError):
                connection.send(b"N")
            return _SERVED
        if _changed(modules):
            with contextlib.suppress(OSError):
                connection.send(b"N")
            return _STALE
        directory, argv = os.fsdecode(parts[2]), [os.fsdecode(part) for part in parts[3:]]
        try:
            connection.send(b"S")
        except OSError:  # gone since it sent its request: verify nothing on its descriptors
            return _SERVED
        with _caller_streams(descriptors), _while_connected(connection):
            for fd in descriptors:
                os.close(fd)
            descriptors = []
            code = _run(directory, argv)
    finally:
        for fd in descriptors:
            os.close(fd)
    connection.settimeout(None)
    with contextlib.suppress(OSError):  # the caller went away: nothing to tell it, and no failure of the worker's
        connection.send(bytes([code]))
    return _SERVED


@contextlib.contextmanager
def _caller_streams(descriptors: list[int]) -> Iterator[None]:
    """The caller's descriptors as 0-2, with standard streams of their own for this request only; afterwards
    /dev/null again, so the worker holds nothing of the caller's (its reader sees the end of its pipes) and
    nothing one caller's streams kept can reach the next caller."""
    saved = sys.stdin, sys.stdout, sys.stderr
    for target, fd in enumerate(descriptors):
        os.dup2(fd, target)
    sys.stdin, sys.stdout, sys.stderr = (_stream(0, saved[0]), _stream(1, saved[1]), _stream(2, saved[2]))
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        sys.stdin, sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def _while_connected(connection: socket.socket) -> Iterator[None]:
    """Run the body only while the caller is there: when it goes (killed, interrupted), its connection hangs up,
    the kernel sends SIGIO and the worker exits at once, closing the caller's descriptors. Else it would read on
    from the caller's standard input (a terminal's next line) and hold its output, for ever if that input never
    ends, while every other caller waits."""
    fd = connection.fileno()

    def hung_up() -> bool:
        watch = select.poll()
        watch.register(fd, select.POLLRDHUP)
        return any(events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, events in watch.poll(0))

    def on_io(signum: int, frame: object) -> None:
        if hung_up():
            os._exit(_GONE)

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    signal.signal(signal.SIGIO, on_io)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)
    try:
        if hung_up():  # gone before the kernel was told to say so
            os._exit(_GONE)
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def _stream(fd: int, like: TextIO) -> TextIO:
    """A text stream on `fd` spelt as the interpreter spelt `like` at start-up (encoding, errors, buffering)."""
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, encoding=like.encoding, errors=like.errors,
                            line_buffering=bool(like.line_buffering))


def _run(directory: str, argv: list[str]) -> int:
    """`keyseal-gpg ARGV` in `directory`, on the caller's descriptors; its exit status."""
    from keyseal._internal.cli.gpgcompat import PROG, main

    try:
        os.chdir(directory)
    except OSError as exc:
        sys.stderr.write(f"keyseal: error: cannot enter the working directory {directory}: {exc.strerror}\n")
        return 2
    sys.argv = [PROG, *argv]
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # main reports every error itself; one it could not report (its stderr is gone)
        return 2
    else:
        code = 0
    if code is None:
        return 0
    return code if isinstance(code, int) and 0 <= code < 256 else 2


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    received: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            received += [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4)]
    return received


def _listen(path: str) -> socket.socket:
    """A SEQPACKET listener at `path`, in place only once it listens (bound under a temporary name, then
    renamed over any socket a dead server left)."""
    temporary = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(temporary)
    os.chmod(temporary, 0o600)
    listener.listen(64)
    os.rename(temporary, path)
    return listener


def _warm() -> None:
    """Import what a verification uses, and let OpenSSL fetch its algorithms once, before the first fork."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    import keyseal._internal.cli.gpgcompat
    import keyseal._internal.cli.shortlived
    import keyseal._internal.inputfile
    import keyseal._internal.openpgp.cleartext
    import keyseal._internal.openpgp.keyring_cache
    import keyseal._internal.pathtext
    import keyseal._internal.release.gitsign  # noqa: F401

    message = b"keyseal"
    key = ed25519.Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(message), message)
    curve_key = ec.generate_private_key(ec.SECP256R1())
    curve_key.public_key().verify(curve_key.sign(message, ec.ECDSA(hashes.SHA256())), message,
                                  ec.ECDSA(hashes.SHA256()))


def _module_files() -> dict[str, tuple[int, int]]:
    """The files of the keyseal modules this server imported, with their mtime and size."""
    files: dict[str, tuple[int, int]] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and getattr(module, "__name__", "").startswith("keyseal"):
            with contextlib.suppress(OSError):
                info = os.stat(path)
                files[path] = (info.st_mtime_ns, info.st_size)
    return files


def _changed(modules: dict[str, tuple[int, int]]) -> bool:
    """True when a keyseal module this server runs was changed or removed since it started (an upgrade)."""
    for path, (mtime, size) in modules.items():
        try:
            info = os.stat(path)
        except OSError:
            return True
        if (info.st_mtime_ns, info.st_size) != (mtime, size):
            return True
    return False


def _idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_IDLE_SECONDS
    except ValueError:
        return DEFAULT_IDLE_SECONDS
    return min(max(value, 0.1), 86400.0)


if __name__ == "__main__":
    main()
