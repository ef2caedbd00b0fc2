"""Sign and verify a generated 1 GiB file; print keyseal's times as ratios against baselines run here.

- keyseal sign (local key) vs hashlib streaming the same digest (in a fresh interpreter, as keyseal runs; once
  reading into a buffer, once through mapped windows as keyseal does) and vs `gpg --detach-sign`;
- keyseal verify vs `sqv` and `gpg --verify`.

Usage: python benchmarks/sign_verify.py [--size-mib 1024] [--rounds 3] [--key-type p256]
Each figure is the best of N rounds, each started from a warm page cache. keyseal's home and audit file, and
gpg's home, are in the benchmark's temporary directory, never the user's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from isolation import load_average, private_keyseal

HASH_FOR = {"p256": "sha256", "p384": "sha384", "ed25519": "sha512", "rsa3072": "sha256"}
GPG_ALGO = {"p256": "nistp256", "p384": "nistp384", "ed25519": "ed25519", "rsa3072": "rsa3072"}


def warm(path: Path) -> None:
    """Read the file once, untimed, so every timed run starts from the page cache (this machine reclaims cached
    pages continuously, and whichever tool ran first after a reclaim would otherwise pay for the disk)."""
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(8 << 20)
        while handle.readinto(buffer):
            pass


def best_of(rounds: int, command: Sequence[str], env: dict[str, str] | None = None,
            data: Path | None = None) -> float:
    best = float("inf")
    for _ in range(rounds):
        if data is not None:
            warm(data)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        best = min(best, time.perf_counter() - start)
    return best


def make_file(path: Path, size_mib: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as handle:
        for _ in range(size_mib):
            handle.write(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--key-type", choices=sorted(HASH_FOR), default="p256")
    args = parser.parse_args()
    for tool in ("gpg", "sqv"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required for the baselines")
    work = Path(tempfile.mkdtemp(prefix="keyseal-bench-"))
    try:
        private_keyseal(work)
        print(f"load average before: {load_average()}")
        run(work, args.size_mib, args.rounds, args.key_type)
        print(f"load average after: {load_average()}")
    finally:
        subprocess.run(["gpgconf", "--homedir", str(work / "gnupg"), "--kill", "all"], capture_output=True,
                       check=False)
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, size_mib: int, rounds: int, key_type: str) -> None:
    keyseal = [sys.executable, "-m", "keyseal"]
    env = dict(os.environ)  # with keyseal's home and audit file in `work` (private_keyseal)
    data = work / "release.bin"
    make_file(data, size_mib)
    key, cert = work / "k.key", work / "k.asc"
    subprocess.run([*keyseal, "keys", "create", "--out", str(key), "--type", key_type], check=True, env=env,
                   capture_output=True)
    subprocess.run([*keyseal, "keys", "mint", "--key", f"file:{key}", "--name", "Bench", "--email",
                    "bench@example.org", "-o", str(cert)], check=True, env=env, capture_output=True)
    digest = HASH_FOR[key_type]

    hashlib_cmd = [sys.executable, "-c",
                   "import hashlib, sys\n"
                   f"h = hashlib.new({digest!r}); b = bytearray(1 << 20); v = memoryview(b)\n"
                   "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
                   "    while (n := f.readinto(v)):\n"
                   "        h.update(v[:n])\n"
                   "print(h.hexdigest())", str(data)]
    t_hashlib = best_of(rounds, hashlib_cmd, data=data)
    mmap_cmd = [sys.executable, "-c",
                "import hashlib, mmap, os, sys\n"
                f"h = hashlib.new({digest!r}); w = 64 << 20\n"
                "with open(sys.argv[1], 'rb') as f:\n"
                "    size = os.fstat(f.fileno()).st_size\n"
                "    for off in range(0, size, w):\n"
                "        with mmap.mmap(f.fileno(), min(w, size - off), offset=off, access=mmap.ACCESS_READ) as m:\n"
                "            h.update(m)\n"
                "print(h.hexdigest())", str(data)]
    t_hashlib_mmap = best_of(rounds, mmap_cmd, data=data)
    sign_cmd = [*keyseal, "sign", "--key", f"file:{key}", "--cert", str(cert), "--force", "-o",
                str(work / "release.bin.asc"), str(data)]
    t_sign = best_of(rounds, sign_cmd, env, data)

    home = work / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "Bench <gpg@example.org>", GPG_ALGO[key_type], "sign", "never"],
                   check=True, capture_output=True)
    t_gpg_sign = best_of(rounds, [*gpg, "--digest-algo", digest.upper(), "--detach-sign", "-o",
                                  str(work / "gpg.sig"), str(data)], data=data)

    signature = work / "release.bin.asc"
    t_verify = best_of(rounds, [*keyseal, "verify", "--cert", str(cert), str(data), str(signature)], env, data)
    t_sqv = best_of(rounds, ["sqv", "--keyring", str(cert), str(signature), str(data)], data=data)
    subprocess.run([*gpg, "--import", str(cert)], check=True, capture_output=True)
    t_gpg_verify = best_of(rounds, [*gpg, "--verify", str(signature), str(data)], data=data)

    print(f"file: {size_mib} MiB, key: {key_type}, digest: {digest}, best of {rounds}")
    print(f"hashlib stream       {t_hashlib:7.3f} s   (read into a 1 MiB buffer)")
    print(f"hashlib mmap         {t_hashlib_mmap:7.3f} s   (64 MiB mapped windows, as keyseal reads)")
    print(f"keyseal sign         {t_sign:7.3f} s   {t_sign / t_hashlib:5.2f}x hashlib stream (target <= 1.10x), "
          f"{t_sign / t_hashlib_mmap:5.2f}x hashlib mmap")
    print(f"gpg --detach-sign    {t_gpg_sign:7.3f} s   keyseal is {t_sign / t_gpg_sign:5.2f}x gpg")
    print(f"sqv                  {t_sqv:7.3f} s")
    print(f"keyseal verify       {t_verify:7.3f} s   {t_verify / t_sqv:5.2f}x sqv (target <= 1.10x)")
    print(f"gpg --verify         {t_gpg_verify:7.3f} s   keyseal is {t_verify / t_gpg_verify:5.2f}x gpg")


if __name__ == "__main__":
    main()
