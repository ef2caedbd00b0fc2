"""Benchmarks never touch the user's files: each script, run in a tiny mode with HOME pointed at an empty
directory and no KEYSEAL_HOME or KEYSEAL_AUDIT_LOG of the caller's, leaves that directory empty and says where
its own keyseal home went. (The test session itself runs with an empty HOME, checked at its end: conftest.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: gpg's agent socket (in the benchmark's gpg home) must fit."""
    path = Path(tempfile.mkdtemp(prefix="ks-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_benchmark(script: str, *args: str, home: Path, tmp_path: Path) -> str:
    home.mkdir()
    env = {name: value for name, value in os.environ.items()
           if name not in ("KEYSEAL_HOME", "KEYSEAL_AUDIT_LOG", "KEYSEAL_PKCS11_PIN", "SOFTHSM2_CONF")}
    env.update(HOME=str(home), TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], check=False, env=env,
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(home.rglob("*")) == [], f"{script} wrote under HOME"
    assert "keyseal home: " in result.stdout and str(tmp_path) in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["home"]  # its temporary directory was removed again
    return result.stdout


def test_pkcs11_benchmark_keeps_to_its_own_home(short_tmp: Path) -> None:
    out = run_benchmark("pkcs11_sign.py", "--signatures", "40", "--rounds", "2", "--threads", "2",
                        "--key-types", "p256", home=short_tmp / "home", tmp_path=short_tmp)
    assert "audit off" in out and "audit file" in out and "load average before:" in out
    assert "load average after:" in out
    off_table, file_table = (part.splitlines() for part in out.split("audit off (")[1].split("audit file ("))
    for table, columns in ((off_table, 7), (file_table, 8)):  # 2 rounds; the file table adds the bare column
        rows = [line.split() for line in table if line.startswith("p256")]
        assert [row[1] for row in rows] == ["1", "2"]
        assert all(len(row) == columns and float(row[-1]) > 0 for row in rows)  # the ratio: each row's last column
    # key, threads, raw, keyseal, the bare group commit's ratio (measured in the same rounds), rounds, ratio
    assert next(line for line in file_table if line.startswith("key ")).split()[6] == "bare"
    assert all(float(line.split()[4]) > 0 for line in file_table if line.startswith("p256"))


def test_audit_steps_benchmark_keeps_to_its_own_home(short_tmp: Path) -> None:
    out = run_benchmark("audit_steps.py", "--signatures", "40", "--rounds", "2", "--threads", "2",
                        home=short_tmp / "home", tmp_path=short_tmp)
    lines = out.splitlines()
    table = lines[next(n for n, line in enumerate(lines) if line.startswith("log ")):-1]  # to "load average after"
    rows = {line[:10].strip(): line[10:].split() for line in table}
    assert list(rows) == ["log", "raw", "bare, raw", "bare", "+ records", "+ lines", "+ checks", "+ gather",
                          "keyseal"]
    # / raw, / bare, lines per fsync, CPU µs and runs per signature, then each round's / bare
    assert rows["raw"][0] == "1.00" and rows["raw"][2] == "-" and rows["bare"][1] == "1.00"
    for name, row in list(rows.items())[1:]:
        assert len(row) == 7, name
        ratios, cpu, runs = [float(row[0]), float(row[1]), *map(float, row[5:])], float(row[3]), float(row[4])
        assert all(ratio > 0 for ratio in ratios) and cpu > 0 and runs >= 0, name
        assert name == "raw" or 1 <= float(row[2]) <= 2  # 2 threads: one or two lines per fdatasync
    assert rows["bare"][5:] == ["1.00", "1.00"]


def test_signing_thread_benchmark_keeps_to_its_own_home(short_tmp: Path) -> None:
    out = run_benchmark("signing_thread.py", "--signatures", "40", "--rounds", "2", "--threads", "1,2",
                        "--key-types", "p256", home=short_tmp / "home", tmp_path=short_tmp)
    lines = out.splitlines()
    table = lines[next(n for n, line in enumerate(lines) if line.startswith("key ")) + 1:-1]  # to "load average"
    rows = [(line[:8].strip(), line[8:16].strip(), line[17:39].strip(), line[39:].split()) for line in table]
    names = ["raw", "bare", "bare + thread", "signer, bare", "signer, bare + thread", "keyseal", "keyseal + thread"]
    assert [(key, threads, name) for key, threads, name, _ in rows] == \
        [("p256", threads, name) for threads in ("1", "2") for name in names]
    for _, _, name, figures in rows:  # the median, then each round's ratio against raw in that round
        assert len(figures) == 3 and all(float(figure) > 0 for figure in figures), name
        assert name != "raw" or figures == ["1.00", "1.00", "1.00"]


def test_sign_verify_benchmark_keeps_to_its_own_home(short_tmp: Path) -> None:
    out = run_benchmark("sign_verify.py", "--size-mib", "1", "--rounds", "1", home=short_tmp / "home",
                        tmp_path=short_tmp)
    assert "keyseal verify" in out


def test_svid_benchmark_keeps_to_its_own_home(short_tmp: Path) -> None:
    out = run_benchmark("svid_issuance.py", "--svids", "50", "--seconds", "1", "--rounds", "1", "--connections",
                        "1", home=short_tmp / "home", tmp_path=short_tmp)
    assert "audit log: off" in out


def test_startup_benchmark_keeps_to_its_own_home_and_stops_its_server(short_tmp: Path) -> None:
    out = run_benchmark("startup.py", "--commits", "3", "--rounds", "1", home=short_tmp / "home",
                        tmp_path=short_tmp)
    assert "| git log (keyseal-gpg) |" in out and "| git log (keyseal-gpg, server off) |" in out
    assert "first git log, which started the server" in out
    # The verification server it started (its argv names the run's runtime directory) is gone.
    still = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(short_tmp).encode() in _cmdline(pid)
             and b"gpgserver" in _cmdline(pid)]
    assert still == []


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
