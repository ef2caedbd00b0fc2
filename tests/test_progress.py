"""Progress bars: on stderr when it is a terminal (a pseudo-terminal here) and the work is long, never on a pipe
or with `keyseal -q`; tqdm is imported only when a bar is shown."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))


def on_pty(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run keyseal with stderr on a pseudo-terminal (stdout on a pipe): exit code, stdout, what the terminal got."""
    master, slave = pty.openpty()
    process = subprocess.Popen([KEYSEAL, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                               env={**os.environ, **(env or {}), "COLUMNS": "100"})
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    out, _ = process.communicate(timeout=60)
    return process.returncode, out.decode(), seen.decode(errors="replace")


@pytest.fixture
def many_files(tmp_path: Path) -> list[str]:
    paths = []
    for index in range(6):
        path = tmp_path / f"artifact-{index}.tar.gz"
        path.write_bytes(os.urandom(4096))
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_bar_for_many_files_on_a_terminal(many_files: list[str]) -> None:
    code, out, terminal = on_pty(["checksums", *many_files])
    assert code == 0
    assert "hashing 6 files" in terminal
    assert len(out.splitlines()) == 6  # the manifest on stdout is untouched


def test_no_bar_on_a_pipe(many_files: list[str]) -> None:
    result = subprocess.run([KEYSEAL, "checksums", *many_files], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and result.stderr == ""


def test_no_bar_with_quiet(many_files: list[str]) -> None:
    code, _, terminal = on_pty(["-q", "checksums", *many_files])
    assert code == 0 and "hashing" not in terminal


def test_no_bar_for_short_work(many_files: list[str]) -> None:
    code, _, terminal = on_pty(["checksums", *many_files[:2]])
    assert code == 0 and "hashing" not in terminal


@pytest.mark.slow
def test_bar_for_a_large_file_shows_bytes_per_second(tmp_path: Path) -> None:
    big = tmp_path / "big.iso"
    with big.open("wb") as handle:
        handle.truncate(80 << 20)  # sparse: costs no disk, hashes like any file
    code, _, terminal = on_pty(["checksums", str(big)])
    assert code == 0
    assert "hashing 1 file" in terminal and "B/s" in terminal


@pytest.mark.slow
def test_bar_while_signing(tmp_path: Path, many_files: list[str]) -> None:
    env = {"KEYSEAL_HOME": str(tmp_path / "home")}
    created = subprocess.run([KEYSEAL, "keys", "create", "--out", str(tmp_path / "k.key"), "--type", "ed25519"],
                             capture_output=True, text=True, env={**os.environ, **env}, timeout=120, check=False)
    assert created.returncode == 0, created.stderr
    code, out, terminal = on_pty(["sign", "--key", f"file:{tmp_path / 'k.key'}", *many_files], env)
    assert code == 0, terminal
    assert "signing 6 files" in terminal
    assert len(out.splitlines()) == 6


def test_tqdm_is_imported_only_for_a_bar() -> None:
    code = ("import sys; from keyseal._internal.progress import meter\n"
            "with meter(10, 'B', 'x'): pass\n"
            "print('tqdm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_bar_for_a_bulk_of_items_on_a_terminal() -> None:
    """The bar bulk operations (entries) use: items per second, shown past ITEMS_THRESHOLD items."""
    code = ("from keyseal._internal.progress import items_done, meter\n"
            "with meter(50, 'entry', 'creating entries'):\n"
            "    for _ in range(50): items_done()\n")
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 10)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert process.wait(timeout=60) == 0
    assert "creating entries" in seen.decode(errors="replace") and "entry/s" in seen.decode(errors="replace")


@pytest.mark.slow
def test_verify_fast_path_shows_a_bar_for_a_large_file_only(tmp_path: Path) -> None:
    env = {"KEYSEAL_HOME": str(tmp_path / "home")}
    full_env = {**os.environ, **env}
    key, cert, big = tmp_path / "k.key", tmp_path / "k.asc", tmp_path / "big.iso"
    def run(*args: str) -> None:
        subprocess.run([KEYSEAL, *args], capture_output=True, env=full_env, timeout=120, check=True)

    run("keys", "create", "--out", str(key), "--type", "ed25519")
    run("keys", "mint", "--key", f"file:{key}", "--name", "A", "--email", "a@example.org", "-o", str(cert))
    with big.open("wb") as handle:
        handle.truncate(80 << 20)
    run("-q", "sign", "--key", f"file:{key}", str(big))
    code, _, terminal = on_pty(["verify", "--cert", str(cert), str(big)], env)
    assert code == 0, terminal
    assert "verifying 1 file" in terminal and "Good signature" in terminal
    small = tmp_path / "small.txt"
    small.write_text("x")
    run("sign", "--key", f"file:{key}", str(small))
    code, _, terminal = on_pty(["verify", "--cert", str(cert), str(small)], env)
    assert code == 0 and "verifying" not in terminal
