"""keyseal-gpg's verification server: what git's once-per-commit `--verify` calls go through.

Each test gets a runtime directory of its own (XDG_RUNTIME_DIR) and stops every server started in it. With
KEYSEAL_GPG_SERVER=require a verification is served by the server or fails, so a passing `require` run proves the
server ran it; its output is compared byte for byte with the same call verified in process (`off`).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyseal._internal.cli import gpgentry
from keyseal._internal.openpgp import keyring
from tests.conftest import run_keyseal
from tests.harness.release_keys import ReleaseKey, make_key, sign_file

KEYSEAL_GPG = str(Path(sys.executable).with_name("keyseal-gpg"))
GIT_ARGS = ("--keyid-format=long", "--status-fd=1", "--verify")  # as git passes them


class Servers:
    """The runtime directory of one test, and the servers started in it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def keyseal_dir(self) -> Path:
        return self.directory / "keyseal"

    def pids(self) -> list[int]:
        found = []
        for lock in self.keyseal_dir.glob("*.lock"):
            text = lock.read_text().strip()
            if text.isdigit() and alive(int(text)):
                found.append(int(text))
        return found

    def sockets(self) -> list[Path]:
        return sorted(self.keyseal_dir.glob("*.sock"))

    def stop(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGTERM)
            assert wait_until(lambda pid=pid: not alive(pid)), f"server {pid} did not stop"


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for whoever inherited it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_until(condition: object, seconds: float = 15.0) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Servers]:
    # Short: a socket path has at most 107 bytes, and pytest's temporary paths are long.
    directory = Path(tempfile.mkdtemp(prefix="ks-run-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))
    monkeypatch.setenv("KEYSEAL_GPG_SERVER_IDLE", "60")
    found = Servers(directory)
    try:
        yield found
    finally:
        found.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A key in this test's keyring, a signed payload, and a key the keyring does not hold."""
    monkeypatch.setenv("KEYSEAL_HOME", str(tmp_path / "keyseal-home"))
    known = make_key(tmp_path / "keys", "known", email="known@example.org")
    stranger = make_key(tmp_path / "keys", "stranger", email="stranger@example.org")
    keyring.add_certificate(known.cert.read_bytes(), str(known.cert))
    payload = tmp_path / "payload"
    payload.write_bytes(b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\nrelease 1.0\n")
    return {"known": known, "stranger": stranger, "payload": payload,
            "good": sign_file(known, payload, tmp_path / "good.asc"),
            "unknown": sign_file(stranger, payload, tmp_path / "unknown.asc")}


def keyseal_gpg(mode: str, *args: str | os.PathLike[str], input: bytes = b"",
                env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([KEYSEAL_GPG, *map(str, args)], input=input, capture_output=True, timeout=60, check=False,
                          env={**os.environ, **(env or {}), "KEYSEAL_GPG_SERVER": mode}, cwd=cwd)


def same(served: subprocess.CompletedProcess[bytes], local: subprocess.CompletedProcess[bytes]) -> None:
    assert (served.returncode, served.stdout, served.stderr) == (local.returncode, local.stdout, local.stderr)


def test_served_verifications_are_the_local_ones_byte_for_byte(servers: Servers, release: dict[str, object],
                                                               tmp_path: Path) -> None:
    payload = release["payload"]
    assert isinstance(payload, Path)
    forged = payload.read_bytes().replace(b"1.0", b"6.6")
    cases = {
        "good": (release["good"], payload.read_bytes(), 0, b"[GNUPG:] GOODSIG"),
        "bad": (release["good"], forged, 1, b"[GNUPG:] BADSIG"),
        "no key": (release["unknown"], payload.read_bytes(), 2, b"[GNUPG:] NO_PUBKEY"),
    }
    for name, (signature, data, code, status) in cases.items():
        served = keyseal_gpg("require", *GIT_ARGS, signature, "-", input=data)
        local = keyseal_gpg("off", *GIT_ARGS, signature, "-", input=data)
        assert served.returncode == code and status in served.stdout, (name, served)
        same(served, local)
    # The data as a file named relative to the caller's directory, which the server enters.
    served = keyseal_gpg("require", *GIT_ARGS, release["good"], "payload", cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    same(served, keyseal_gpg("off", *GIT_ARGS, release["good"], "payload", cwd=tmp_path))
    # More data than a pipe holds, read by the server from the caller's standard input.
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    known = release["known"]
    assert isinstance(known, ReleaseKey)
    signature = sign_file(known, big, tmp_path / "big.asc")
    served = keyseal_gpg("require", *GIT_ARGS, signature, "-", input=big.read_bytes())
    assert served.returncode == 0 and b"[GNUPG:] GOODSIG" in served.stdout, served.stderr
    assert len(servers.pids()) == 1  # one server for this context, still up


def test_a_keyring_change_applies_to_the_next_served_verification(servers: Servers, release: dict[str, object],
                                                                  tmp_path: Path) -> None:
    payload, good, known = release["payload"], release["good"], release["known"]
    assert isinstance(payload, Path) and isinstance(good, Path) and isinstance(known, ReleaseKey)
    first = keyseal_gpg("require", *GIT_ARGS, good, payload)
    assert first.returncode == 0, first.stderr
    # A revocation put into the keyring: the very next call through the same server sees it.
    revoked = tmp_path / "revoked.asc"
    result = run_keyseal("keys", "revoke", "--key", known.uri, "--cert", known.cert, "--reason", "compromised",
                         "-o", revoked)
    assert result.returncode == 0, result.stderr
    shutil.copyfile(revoked, keyring.keyring_dir() / f"{known.fingerprint}.asc")
    after = keyseal_gpg("require", *GIT_ARGS, good, payload)
    assert after.returncode != 0 and b"GOODSIG" not in after.stdout, after
    same(after, keyseal_gpg("off", *GIT_ARGS, good, payload))
    # The certificate removed: no key at all.
    (keyring.keyring_dir() / f"{known.fingerprint}.asc").unlink()
    gone = keyseal_gpg("require", *GIT_ARGS, good, payload)
    assert gone.returncode == 2 and b"[GNUPG:] NO_PUBKEY" in gone.stdout, gone
    assert len(servers.pids()) == 1


def test_git_log_show_signature_through_the_server(servers: Servers, release: dict[str, object],
                                                    tmp_path: Path) -> None:
    known = release["known"]
    assert isinstance(known, ReleaseKey)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "KEYSEAL_GPG_SERVER": "off"}

    def git(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["git", "-C", str(repo), *args], env={**env, **extra}, capture_output=True,
                                text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        return result

    git("init", "-q", "-b", "main")
    for setting in (("user.name", "Example Releases"), ("user.email", "known@example.org"),
                    ("gpg.program", KEYSEAL_GPG), ("user.signingkey", known.uri)):
        git("config", *setting)
    for index in range(3):
        (repo / "file").write_text(f"{index}\n")
        git("add", "file")
        git("commit", "-q", "-S", "-m", f"commit {index}")
    served = git("log", "--show-signature", KEYSEAL_GPG_SERVER="require")
    assert served.stdout.count('Good signature from "Example Releases <known@example.org>"') == 3, served.stdout
    assert served.stdout == git("log", "--show-signature").stdout
    assert git("log", "--format=%G?", KEYSEAL_GPG_SERVER="require").stdout.split() == ["G", "G", "G"]


def test_a_server_serves_only_its_own_user_and_context(servers: Servers, release: dict[str, object]) -> None:
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0
    [path] = servers.sockets()

    def ask(digest: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection, open(os.devnull, "r+b") as null:
            connection.settimeout(10)
            connection.connect(str(path))
            assert connection.recv(16) == b"R"  # the server is ready for this caller's request
            words = [*GIT_ARGS, str(good), str(payload)]
            request = b"\0".join([gpgentry.PROTOCOL, digest, b"/", *(os.fsencode(word) for word in words)])
            connection.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            b"".join(fd.to_bytes(4, sys.byteorder) for fd in (null.fileno(),) * 3))])
            answer = connection.recv(16)
            return answer + (connection.recv(16) if answer == b"S" else b"")

    own = gpgentry.context_digest(gpgentry.context()).encode()
    assert ask(own) == b"S\0"  # the same request with the caller's real context is taken (and verifies) ...
    assert ask(b"0" * 64) == b"N"  # ... and one from another context is not
    # Another context (here another KEYSEAL_HOME) has a server of its own.
    other = keyseal_gpg("require", *GIT_ARGS, good, payload, env={"KEYSEAL_HOME": str(payload.parent / "other")})
    assert other.returncode == 2 and b"NO_PUBKEY" in other.stdout, other  # an empty keyring there
    assert len(servers.sockets()) == 2 and len(servers.pids()) == 2


def test_a_runtime_directory_others_may_enter_is_not_used(servers: Servers, release: dict[str, object]) -> None:
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    servers.keyseal_dir.mkdir(mode=0o755)
    os.chmod(servers.keyseal_dir, 0o755)
    refused = keyseal_gpg("require", *GIT_ARGS, good, payload)
    assert refused.returncode == 2 and refused.stdout == b""
    assert refused.stderr.decode().splitlines() == [
        f"keyseal: error: KEYSEAL_GPG_SERVER=require: the verification server's directory: {servers.keyseal_dir} "
        f"may be entered by other users (mode 755): it must be 0700"]
    local = keyseal_gpg("on", *GIT_ARGS, good, payload)  # the default: verified here, no server started
    assert local.returncode == 0 and b"[GNUPG:] GOODSIG" in local.stdout
    assert servers.sockets() == [] and list(servers.keyseal_dir.iterdir()) == []


def test_the_server_exits_when_idle_and_takes_its_socket(servers: Servers, release: dict[str, object]) -> None:
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    served = keyseal_gpg("require", *GIT_ARGS, good, payload, env={"KEYSEAL_GPG_SERVER_IDLE": "1"})
    assert served.returncode == 0, served.stderr
    [pid] = servers.pids()
    assert wait_until(lambda: not alive(pid)) and servers.sockets() == []


def test_the_server_steps_aside_when_its_code_changes(servers: Servers, release: dict[str, object],
                                                       tmp_path: Path) -> None:
    """An upgrade in place: the caller that notices verifies itself, and the server exits."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    package = Path(gpgentry.__file__).parents[2]
    copy = tmp_path / "src" / "keyseal"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(copy.parent)}
    assert keyseal_gpg("require", *GIT_ARGS, good, payload, env=env).returncode == 0
    [pid] = servers.pids()
    module = copy / "_internal" / "openpgp" / "verify.py"
    module.write_text(module.read_text() + "\n")
    after = keyseal_gpg("on", *GIT_ARGS, good, payload, env=env)
    assert after.returncode == 0 and b"[GNUPG:] GOODSIG" in after.stdout, after.stderr
    assert wait_until(lambda: not alive(pid))


def test_only_verifications_in_gits_form_are_servable() -> None:
    assert gpgentry.servable(["--keyid-format=long", "--status-fd=1", "--verify", "/tmp/sig", "-"])
    assert gpgentry.servable(["--status-fd", "2", "--verify", "clear.asc"])
    assert gpgentry.servable(["--batch", "--keyid-format", "long", "--verify", "sig", "data"])
    for argv in (["--verify", "sig", "data", "more"],  # too many files
                 ["--verify", "--verify", "sig", "data"],
                 ["--status-fd=3", "--verify", "sig", "-"],  # a descriptor beyond 0-2
                 ["--status-fd", "5", "--verify", "sig", "-"],
                 ["--verify", "clear.asc", "--output", "text"],  # writes a file
                 ["-bsau", "key"], ["--list-keys"], ["sig", "data"], ["--status-fd"]):
        assert not gpgentry.servable(argv), argv


def test_a_bad_setting_is_one_line(release: dict[str, object]) -> None:
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    for args in ((*GIT_ARGS, good, payload), ("--list-keys",)):  # whether or not the server would take the call
        result = keyseal_gpg("sometimes", *args)
        assert result.returncode == 2 and result.stdout == b""
        assert result.stderr.decode().splitlines() == ["keyseal: error: KEYSEAL_GPG_SERVER='sometimes': use on, off "
                                                       "or require"]


PROBE = """
import sys
from keyseal._internal.cli.gpgentry import main
sys.argv = ["keyseal-gpg", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print("\\nMODULES", " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def test_a_served_call_loads_nothing_of_the_verifier(servers: Servers, release: dict[str, object]) -> None:
    """The caller's whole cost is the interpreter's start: the verifier, cryptography and OpenSSL stay in the
    server."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0  # a server is up
    result = subprocess.run([sys.executable, "-c", PROBE, *GIT_ARGS, str(good), str(payload)], capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, "KEYSEAL_GPG_SERVER": "require"})
    head, _, listed = result.stderr.rpartition("\nMODULES ")
    assert "[GNUPG:] GOODSIG" in result.stdout, head
    modules = set(listed.split())
    loaded = sorted(m for m in modules if m.split(".")[0] in ("cryptography", "hashlib", "_hashlib", "typing", "re",
                                                               "enum", "socket", "json", "threading")
                    or m.startswith(("keyseal._internal.openpgp", "keyseal._internal.release", "keyseal.errors",
                                     "keyseal._internal.cli.gpgcompat")))
    assert loaded == []
    assert "keyseal._internal.cli.gpgentry" in modules and "_socket" in modules  # it did ask the server


def holders(inode: int) -> list[int]:
    """The processes with a descriptor on the pipe `inode`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"pipe:[{inode}]":
                        found.append(int(pid))
                        break
    return found


def drained(stream: object, seconds: float = 15.0) -> bytes | None:
    """What is left to read from `stream` (a pipe's reading end), or None when whoever writes to it did not let
    go of it within `seconds`."""
    assert hasattr(stream, "fileno")
    fd = stream.fileno()
    deadline = time.monotonic() + seconds
    read = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if chunk == b"":
            return read
        read += chunk


def busy_caller(servers: Servers, signature: Path) -> subprocess.Popen[bytes]:
    """A served `--verify SIG -` whose standard input stays open: the server's worker waits on it."""
    # SIGINT as a terminal delivers it: a test run started as a background job inherits it ignored, and an
    # interpreter started so never turns it into KeyboardInterrupt.
    caller = subprocess.Popen([KEYSEAL_GPG, *GIT_ARGS, str(signature), "-"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "KEYSEAL_GPG_SERVER": "require"},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    assert caller.stdin is not None
    inode = os.fstat(caller.stdin.fileno()).st_ino
    [server] = servers.pids() or [0]
    assert wait_until(lambda: any(pid not in (os.getpid(), caller.pid, server) for pid in holders(inode))), "not served"
    return caller


def test_callers_that_give_up_on_a_busy_server_leave_it_none_of_their_descriptors(
        servers: Servers, release: dict[str, object]) -> None:
    """Callers that waited in vain for a busy server verify themselves; their output must end when they exit
    (git reads it to the end), not when the server gets to their abandoned requests, and those requests are no
    failure of the server's."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0
    [pid] = servers.pids()
    busy = busy_caller(servers, good)
    try:
        waiting = [subprocess.Popen([KEYSEAL_GPG, *GIT_ARGS, str(good), str(payload)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "KEYSEAL_GPG_SERVER": "on"}) for _ in range(6)]
        for caller in waiting:
            assert caller.wait(timeout=60) == 0
        for caller in waiting:
            out = drained(caller.stdout)
            assert out is not None, "the server holds the output of a caller that verified itself"
            assert b"[GNUPG:] GOODSIG" in out
            caller.stdout.close()  # type: ignore[union-attr]
    finally:
        out, _ = busy.communicate(payload.read_bytes(), timeout=60)
    assert busy.returncode == 0 and b"[GNUPG:] GOODSIG" in out
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0
    assert servers.pids() == [pid]


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_a_caller_stopped_mid_verification_takes_the_verification_with_it(
        servers: Servers, release: dict[str, object], how: signal.Signals) -> None:
    """Ctrl-C (or any end) of a caller whose verification waits on its standard input: the server must not read
    on from that input (a terminal's next line would go to it) nor keep its output open, and it serves on."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0
    [pid] = servers.pids()
    busy = busy_caller(servers, good)
    assert busy.stdin is not None and busy.stdout is not None and busy.stderr is not None
    inode = os.fstat(busy.stdin.fileno()).st_ino
    busy.send_signal(how)
    try:
        assert busy.wait(timeout=30) == (130 if how == signal.SIGINT else -how)
        out, err = drained(busy.stdout), drained(busy.stderr)
        assert out is not None and err is not None, "the server holds the output of a caller that is gone"
        assert holders(inode) == [os.getpid()]  # and its input: no one reads it but this test
    finally:
        busy.kill()
        busy.wait(timeout=30)
        for stream in (busy.stdin, busy.stdout, busy.stderr):  # the end of the input, should a server wait on it
            stream.close()
    if how == signal.SIGINT:  # as when verifying in process: one line, and gpg's status for an interrupt
        assert (out, err) == (b"", b"keyseal: error: interrupted\n")
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0
    assert servers.pids() == [pid]


def test_the_server_a_caller_starts_holds_none_of_its_descriptors(servers: Servers,
                                                                  release: dict[str, object]) -> None:
    """A caller may hold descriptors beyond 0-2 (a shell's `3>&1`, a parent's pipe it was told to keep): the
    server it starts, which lives on, must not keep them, or whoever reads that pipe waits for the server. Nor
    does it keep the signals its caller blocked: it stops on SIGTERM."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    reader, writer = os.pipe()
    with open(reader, "rb") as pipe:
        try:
            caller = subprocess.run([KEYSEAL_GPG, *GIT_ARGS, good, payload], capture_output=True, timeout=60,
                                    check=False, pass_fds=(writer,), env={**os.environ, "KEYSEAL_GPG_SERVER": "on"},
                                    preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))
        finally:
            os.close(writer)
        assert caller.returncode == 0 and b"[GNUPG:] GOODSIG" in caller.stdout, caller.stderr  # verified itself
        assert wait_until(lambda: servers.sockets() != [] and servers.pids() != [])  # and started a server
        assert drained(pipe) == b"", "the server holds a descriptor of the caller that started it"
    servers.stop()
    assert servers.sockets() == []


def test_a_caller_after_an_idle_exit_starts_a_new_server(servers: Servers, release: dict[str, object]) -> None:
    """A server that left because no one called is no failed start: the next caller starts another at once
    (rather than every call verifying in its own process for the next half minute)."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    assert keyseal_gpg("require", *GIT_ARGS, good, payload, env={"KEYSEAL_GPG_SERVER_IDLE": "1"}).returncode == 0
    [pid] = servers.pids()
    assert wait_until(lambda: not alive(pid))
    caller = keyseal_gpg("on", *GIT_ARGS, good, payload)
    assert caller.returncode == 0 and b"[GNUPG:] GOODSIG" in caller.stdout, caller.stderr
    assert wait_until(lambda: servers.sockets() != [] and servers.pids() != [], seconds=10)


def test_served_answers_to_every_servable_form_are_the_local_ones(servers: Servers, release: dict[str, object],
                                                                   tmp_path: Path) -> None:
    """Cleartext from a file or standard input, status on stderr, and the errors (a missing file, a detached
    signature without its data, KEYSEAL_DEBUG): byte for byte what the caller's own process says."""
    good, payload, known = release["good"], release["payload"], release["known"]
    assert isinstance(good, Path) and isinstance(payload, Path) and isinstance(known, ReleaseKey)
    signed = keyseal_gpg("off", "--clearsign", "-u", known.uri, "-o", "clear.asc", payload, cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    clear = (tmp_path / "clear.asc").read_bytes()
    cases: list[tuple[tuple[str, ...], bytes, dict[str, str]]] = [
        (("--status-fd=2", "--verify", "clear.asc"), b"", {}),
        (("--status-fd", "1", "--verify"), clear, {}),
        (("-q", "--batch", "--status-fd=1", "--verify", "-"), clear, {}),
        (("--status-fd=2", "--verify", "good.asc", "-"), payload.read_bytes(), {}),
        ((*GIT_ARGS, "missing.asc", "-"), b"", {}),
        ((*GIT_ARGS, "good.asc", "missing"), b"", {"KEYSEAL_DEBUG": "1"}),
        ((*GIT_ARGS, "good.asc"), b"", {}),
        ((*GIT_ARGS, "payload", "-"), payload.read_bytes(), {}),
    ]
    for args, data, env in cases:
        served = keyseal_gpg("require", *args, input=data, env=env, cwd=tmp_path)
        local = keyseal_gpg("off", *args, input=data, env=env, cwd=tmp_path)
        assert local.stdout or local.stderr, args
        same(served, local)
    assert (keyseal_gpg("require", "--status-fd=2", "--verify", "clear.asc", cwd=tmp_path).returncode,
            keyseal_gpg("require", *GIT_ARGS, "missing.asc", "-", cwd=tmp_path).returncode) == (0, 2)


def test_the_cryptography_settings_of_the_environment_are_part_of_the_context(servers: Servers,
                                                                               release: dict[str, object],
                                                                               tmp_path: Path) -> None:
    """OpenSSL's configuration (a FIPS provider refuses some algorithms) is read when the verifier loads: a
    caller with another one is not served by a server started without it."""
    good, payload = release["good"], release["payload"]
    assert isinstance(good, Path) and isinstance(payload, Path)
    assert keyseal_gpg("require", *GIT_ARGS, good, payload).returncode == 0
    config = tmp_path / "openssl.cnf"
    config.write_text("openssl_conf = keyseal_test\n\n[keyseal_test]\n")
    for env in ({"OPENSSL_CONF": str(config)}, {"CRYPTOGRAPHY_OPENSSL_NO_LEGACY": "1"}):
        assert keyseal_gpg("require", *GIT_ARGS, good, payload, env=env).returncode == 0
    assert len(servers.sockets()) == 3 and len(servers.pids()) == 3


def test_the_file_system_a_caller_sees_is_part_of_the_context() -> None:
    """A caller in another mount namespace or under another root (a container sharing the runtime directory and
    the environment) names files the server would look up elsewhere: it has a context of its own."""
    own = gpgentry.context()
    root = os.stat("/")
    assert os.readlink("/proc/self/ns/mnt").encode() in own.split(b"\0")
    assert f"root={root.st_dev}:{root.st_ino}".encode() in own.split(b"\0")
