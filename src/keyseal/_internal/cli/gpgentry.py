"""`keyseal-gpg`'s entry point: a verification in git's form goes to a warm verification server when one is up.

git runs `gpg.program` once per commit (`log --show-signature`, `verify-commit` in a loop, `%G?` in a prompt), and
a process that starts CPython and imports `cryptography` costs about seven gpg starts before it verifies
anything. The server (keyseal._internal.cli.gpgserver) has the verifier imported already; this entry point, which
imports nothing beyond the interpreter's own modules, hands it the command line and its standard input, output
and error descriptors over a Unix socket, and exits with the status it answers. Each request is served by a
worker forked from the server that runs the very `keyseal-gpg` code this process would have run, in the caller's
directory, writing to the caller's descriptors: the output is the same byte for byte, and requests share nothing
(see keyseal._internal.cli.gpgserver).

Trust: the socket lives in a directory only this user can enter ($XDG_RUNTIME_DIR/keyseal, else /tmp/keyseal-UID,
refused unless owned by this user with mode 0700), each side checks the other's user ID (SO_PEERCRED), and a server
serves only callers whose context is its own (keyseal's file and version, the interpreter, the user, the mount
namespace and root, and every environment variable keyseal's verification reads: KEYSEAL_*, HOME, GNUPGHOME,
PYTHON*, locale, OPENSSL_*, CRYPTOGRAPHY_*): anything else gets "not mine" and verifies in its own process. The
server exits when idle (KEYSEAL_GPG_SERVER_IDLE seconds, default 60) and as soon as one of its keyseal modules
changes on disk.
Only a verification whose options are all in _FLAGS and _WITH_VALUE goes there (`servable`); everything else
(signing, listing, any other option) runs here, as before.

KEYSEAL_GPG_SERVER: `on` (default: start a server when none answers, verify here meanwhile), `off` (always verify
in this process), `require` (verify through the server or fail: for tests and benchmarks that must know which
path ran).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = [
    "IDLE_ENV",
    "PROTOCOL",
    "SERVER_ENV",
    "ServerUnavailable",
    "ask_server",
    "context",
    "context_digest",
    "main",
    "private_directory",
    "runtime_directory",
    "servable",
    "server_name",
]

SERVER_ENV = "KEYSEAL_GPG_SERVER"
IDLE_ENV = "KEYSEAL_GPG_SERVER_IDLE"
PROTOCOL = b"keyseal-gpg-server 2"
MODES = ("on", "off", "require")
START_SECONDS = 2.0  # how long a caller waits for a busy server to take its request before verifying itself
REQUIRE_SECONDS = 15.0  # how long `require` waits for a server it started to answer
SPAWN_INTERVAL = 30.0  # at most one server start per this many seconds and context (a failing one is not retried)
MAX_REQUEST = 65536
SOCKET_PATH_MAX = 107  # sun_path, less its final NUL

# Options a served verification may carry (git passes --keyid-format=long --status-fd=1 --verify FILE -):
# none of them names a descriptor beyond 0-2 or a file to write.
_FLAGS = frozenset({"--verify", "--batch", "--no-tty", "-q", "--quiet", "--status-fd=1", "--status-fd=2"})
_WITH_VALUE = {"--status-fd": frozenset({"1", "2"}), "--keyid-format": None}  # None: any value (ignored anyway)
# What keyseal's verification reads from the environment, beyond KEYSEAL_* and PYTHON*: a server serves only
# callers that agree with it on all of them.
_CONTEXT_NAMES = frozenset({"HOME", "GNUPGHOME", "LANG", "LANGUAGE", "TZ", "XDG_CONFIG_HOME", "XDG_DATA_HOME"})
# OPENSSL_* and CRYPTOGRAPHY_* are read when the verifier loads (OPENSSL_CONF may load a FIPS provider).
_CONTEXT_PREFIXES = ("KEYSEAL_", "PYTHON", "LC_", "OPENSSL_", "CRYPTOGRAPHY_")
_NOT_CONTEXT = frozenset({SERVER_ENV, IDLE_ENV})  # settings of the server itself


class ServerUnavailable(Exception):
    """KEYSEAL_GPG_SERVER=require and no server could take the verification."""


def main() -> NoReturn:
    """`keyseal-gpg`: through the server when the command line is a verification it can serve, else here."""
    argv = sys.argv[1:]
    mode = os.environ.get(SERVER_ENV, "").strip().lower() or "on"
    if mode not in MODES:  # on every call, not only those the server would take: a setting is right or wrong
        _fail(f"{SERVER_ENV}={mode[:20]!r}: use on, off or require")
    if mode != "off" and servable(argv):
        try:
            code = ask_server(argv, required=mode == "require")
        except ServerUnavailable as exc:
            _fail(str(exc))
        except KeyboardInterrupt:  # as keyseal-gpg says it in process; the server stops the verification
            _fail("interrupted", 130)
        if code is not None:
            sys.exit(code)
    from keyseal._internal.cli.gpgcompat import main as run_here

    run_here()


def servable(argv: list[str]) -> bool:
    """A verification (`--verify SIG [DATA|-]` or `--verify CLEARTEXT|-`) with only the options in _FLAGS and
    _WITH_VALUE: what git and verification loops pass."""
    verify = False
    positional = 0
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, eq, value = arg.partition("=")
        if arg in _FLAGS:
            verify = verify or arg == "--verify"
        elif name in _WITH_VALUE:
            if not eq:
                index += 1
                if index >= len(argv):
                    return False
                value = argv[index]
            allowed = _WITH_VALUE[name]
            if allowed is not None and value not in allowed:
                return False
        elif arg == "-" or not arg.startswith("-"):
            positional += 1
        else:
            return False
        index += 1
    return verify and positional <= 2 and argv.count("--verify") == 1


def context() -> bytes:
    """What a server and its caller must agree on: the same keyseal, interpreter and user, the same view of the
    file system (mount namespace and root: a caller in a container that shares this runtime directory names
    files the server would find elsewhere), and the same value of every environment variable keyseal's
    verification reads."""
    from keyseal import _version

    settings = sorted(f"{name}={value}" for name, value in os.environ.items()
                      if (name in _CONTEXT_NAMES or name.startswith(_CONTEXT_PREFIXES)) and name not in _NOT_CONTEXT)
    root = os.stat("/")
    parts = [PROTOCOL.decode(), sys.executable, sys.version, str(_version.__file__), _version.__version__,
             str(os.getuid()), _mount_namespace(), f"root={root.st_dev}:{root.st_ino}", *settings]
    return "\0".join(parts).encode("utf-8", "surrogateescape")


def _mount_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/mnt")  # e.g. mnt:[4026531841]
    except OSError:
        return "mnt:unknown"


def context_digest(value: bytes) -> str:
    """SHA-256 (hex) by the interpreter's own module: hashlib would load OpenSSL, a tenth of the budget."""
    try:
        from _sha2 import sha256  # type: ignore[import-not-found]  # CPython 3.12 and later
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found]  # CPython 3.11
        except ImportError:
            from hashlib import sha256
    return str(sha256(value).hexdigest())


def runtime_directory() -> str:
    """$XDG_RUNTIME_DIR/keyseal (the per-user directory the session provides), else /tmp/keyseal-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base.startswith("/"):
        return base.rstrip("/") + "/keyseal"
    return f"/tmp/keyseal-{os.getuid()}"  # noqa: S108 - checked to be this user's own, mode 0700, before use


def private_directory(path: str, create: bool) -> str | None:
    """None when `path` is a directory of this user's that no one else may enter (made so if absent and
    `create`), else what is wrong with it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return f"{path} does not exist"
        try:
            os.mkdir(path, 0o700)
            info = os.lstat(path)
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if info.st_mode & 0o170000 != 0o040000:
        return f"{path} is not a directory"
    if info.st_uid != os.getuid():
        return f"{path} belongs to user {info.st_uid}, not to this user"
    if info.st_mode & 0o077:
        return f"{path} may be entered by other users (mode {info.st_mode & 0o777:o}): it must be 0700"
    return None


def server_name(directory: str, digest: str) -> str:
    """The socket's path without its suffix: one server per context (`.sock`, and `.lock` with its pid)."""
    return f"{directory}/gpg-{digest[:24]}"


def ask_server(argv: list[str], required: bool) -> int | None:
    """The exit status of the verification as the server ran it; None when no server took it (verify here).
    With `required`, a server is started if need be and waited for; ServerUnavailable when none answers."""
    import _socket

    own = context()
    digest = context_digest(own)
    directory = runtime_directory()
    problem = private_directory(directory, create=True)
    if problem is not None:
        return _unavailable(required, f"the verification server's directory: {problem}")
    name = server_name(directory, digest)
    if len((name + ".sock").encode()) > SOCKET_PATH_MAX:
        return _unavailable(required, f"the verification server's socket path would be too long: {name}.sock")
    try:
        request = b"\0".join([PROTOCOL, digest.encode(), os.fsencode(os.getcwd()), *map(os.fsencode, argv)])
    except OSError:  # the working directory was removed
        return _unavailable(required, "the working directory no longer exists")
    if len(request) > MAX_REQUEST:
        return _unavailable(required, "the command line is too long for the verification server")
    import time

    deadline = time.monotonic() + REQUIRE_SECONDS
    spawned = False
    while True:
        connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            connection.settimeout(START_SECONDS)
            try:
                connection.connect(name + ".sock")
            except (FileNotFoundError, ConnectionRefusedError):
                if not spawned:
                    spawned = _start_server(name, forced=required)
                if not required or time.monotonic() > deadline:
                    return _unavailable(required, "no verification server answered")
                time.sleep(0.02)
                continue
            except OSError as exc:
                return _unavailable(required, f"cannot reach the verification server: {exc.strerror}")
            return _exchange(connection, request, required)
        finally:
            connection.close()


def _exchange(connection: object, request: bytes, required: bool) -> int | None:
    """Wait for the server's R (ready: it took this connection), then send the request and descriptors 0-2; the
    server answers S (started: the verification is its now) or N (not its context: verify here), and after S the
    exit status. Nothing is sent before R: a caller that gives up on a busy server leaves no descriptor of its
    own queued there (git reads our output until every copy of it is closed), and the server runs nothing for a
    caller that verifies itself."""
    import _socket

    assert isinstance(connection, _socket.socket)
    try:
        credentials = connection.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(credentials[4:8], sys.byteorder) != os.getuid():
            return _unavailable(required, "the verification server's socket is held by another user")
        ready = connection.recv(16)
    except OSError as exc:  # a server that went away or is busy for too long
        return _unavailable(required, f"the verification server did not take the request: {exc}")
    if ready != b"R":
        return _unavailable(required, "the verification server did not take the request")
    connection.settimeout(None)  # the server is at this request: it answers at once, or goes away
    try:
        descriptors = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        connection.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, descriptors)])
        answer = connection.recv(16)
    except OSError as exc:  # a closed descriptor, a server that went away
        return _unavailable(required, f"the verification server did not take the request: {exc}")
    if answer != b"S":
        return _unavailable(required, "the verification server did not take the request")
    # The verification is the server's now: wait for it as for a local one.
    try:
        status = connection.recv(16)
    except OSError:
        status = b""
    if len(status) != 1:
        _fail("the verification server stopped before it answered (KEYSEAL_GPG_SERVER=off verifies in this "
              "process)")
    return status[0]


def _start_server(name: str, forced: bool) -> bool:
    """Start a server for this context in its own session, with no descriptor of ours, unless one was started
    in the last SPAWN_INTERVAL seconds (it is starting, or failed: verify here meanwhile)."""
    import time

    lock = name + ".lock"
    try:
        started = os.stat(lock).st_mtime
    except OSError:
        started = 0.0
    if not forced and time.time() - started < SPAWN_INTERVAL:
        return False
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
        devnull = os.devnull
        # It outlives us: every descriptor we were given beyond 0-2 (a shell's `3>&1`, a pipe a parent asked us
        # to keep) is closed in it, or whoever reads that pipe waits for the server's exit.
        closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_descriptors()]
        os.posix_spawn(sys.executable, [sys.executable, "-P", "-m", "keyseal._internal.cli.gpgserver", name],
                       os.environ, setsid=True, setsigmask=(),  # no signal blocked: SIGTERM stops it
                       file_actions=[(os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 2, devnull, os.O_WRONLY, 0), *closes])
    except OSError:
        return False
    return True


def _inherited_descriptors() -> list[int]:
    """Our descriptors beyond 0-2 that a spawned process would inherit (those without close-on-exec)."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the descriptor that listed the directory, closed since
            continue
    return found


def _unavailable(required: bool, reason: str) -> int | None:
    """None (verify in this process), or with KEYSEAL_GPG_SERVER=require the reason it cannot be served."""
    if not required:
        return None
    raise ServerUnavailable(f"{SERVER_ENV}=require: {reason}")


def _fail(message: str, code: int = 2) -> NoReturn:
    shown = "".join(ch if ch.isprintable() else "?" for ch in message)
    sys.stderr.write(f"keyseal: error: {shown}\n")
    sys.stderr.flush()
    sys.exit(code)
