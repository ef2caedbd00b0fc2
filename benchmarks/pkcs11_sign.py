"""Signatures per second through keyseal's pkcs11: backend against raw python-pkcs11 calls on the same token.

A throwaway SoftHSM2 token is made under a temporary SOFTHSM2_CONF; for each key type the same private key object
signs the same digests, once through `key.sign()` directly (the raw rate: one C_Sign per call, nothing else) and
once through `open_signer(...).sign_digest()` as every keyseal caller signs (the audit wrapper, DigestInfo
prefix, lock, DER conversion), in each audit configuration:
- `off`: KEYSEAL_AUDIT_LOG=off, records only on the `keyseal.audit` logger (the structured-log sink);
- `file`: the hash-chained audit file. Each line is queued before the token is asked and fsynced by the log's
  writer thread while the token signs; the signature returns once both are done (one fsync per signature for
  one thread, overlapped with its C_Sign; threads that sign at once share fsyncs).
keyseal's home and audit file are in the benchmark's temporary directory, never the user's.

With the audit file, each round also measures a bare group commit (`BareGroupCommit` below): raw `key.sign()`
with a line of the same length as keyseal's queued before it, one writer thread that waits (up to 1 ms) for one
line per thread, then one write and one fdatasync, each signer woken once its line is durable. No chain, no
lock, no record: what any Python signer that keeps the guarantee can reach on this machine and disk, printed as
`bare` beside keyseal's ratio.

Rounds are interleaved: in each round the raw rate is measured, then keyseal's in each configuration, and each
ratio is taken against the raw rate of its own round; the tables show medians over the rounds (this machine's
speed drifts within minutes). The load average and the disk's append+fdatasync latency (in the directory of the
audit file) are printed before and after: figures taken while the machine is busy do not hold, and the audit
file's figures follow the fsync latency. Targets: ratio >= 0.85 with the audit off (every key type, 1 and 4
threads); >= 0.6 with the audit file at 4 threads.

Usage: python benchmarks/pkcs11_sign.py [--signatures 2000] [--rounds 5] [--threads 4] [--audit off|file|both]
                                        [--key-types p256,ed25519,rsa2048]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from isolation import fsync_latency, load_average, private_keyseal

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-pin-1234"
TOKEN = "keyseal-bench"
KEY_TYPES = ("p256", "ed25519", "rsa2048")
TARGETS = {"off": (0.85, (1, 4)), "file": (0.6, (4,))}  # minimum ratio, at these thread counts


def setup_token(work: Path) -> None:
    (work / "tokens").mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before the module is loaded: SoftHSM reads it once
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--so-pin", "so-" + PIN,
                    "--pin", PIN], check=True, capture_output=True)


class BareGroupCommit:
    """The least a signer that returns a signature only once its line is durable can do: queue a fixed line,
    sign, sleep until a writer thread has written and fdatasync'ed a batch holding it. The writer waits up to
    1 ms for `expect` lines (every thread's), so the threads share one fsync in lockstep."""

    def __init__(self, path: Path, line: bytes, expect: int, sign: Callable[[bytes], object]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.line, self.expect, self.raw_sign = line, expect, sign
        self.cond = threading.Condition()
        self.queue: list[threading.Lock] = []
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                deadline = time.monotonic() + 0.001
                while len(self.queue) < self.expect and (remaining := deadline - time.monotonic()) > 0:
                    self.cond.wait(remaining)
                batch, self.queue = self.queue, []
            os.write(self.fd, self.line * len(batch))
            os.fdatasync(self.fd)
            for done in batch:
                done.release()

    def sign(self, digest: bytes) -> object:
        done = threading.Lock()
        done.acquire()
        with self.cond:
            self.queue.append(done)
            self.cond.notify()
        signature = self.raw_sign(digest)
        done.acquire()
        return signature

    # The same queue as the log of keyseal's AuditingSigner (audit_steps.py): the line is the fixed one.

    def check_writable(self) -> None:
        pass

    def submit_body(self, body: str, custody: object = None) -> threading.Lock:
        done = threading.Lock()
        done.acquire()
        with self.cond:
            self.queue.append(done)
            self.cond.notify()
        return done

    def settle(self, done: threading.Lock) -> None:
        done.acquire()


def raw_signer(session: Any, label: str, key_type: str) -> Callable[[bytes], object]:
    """The raw baseline: C_Sign through python-pkcs11 on `session`, with the key labelled `label`, over the bare
    digest (RSA: the same SHA-256 DigestInfo prefix keyseal adds)."""
    import pkcs11

    key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=label)
    mechanism = {"p256": pkcs11.Mechanism.ECDSA, "ed25519": pkcs11.Mechanism.EDDSA,
                 "rsa2048": pkcs11.Mechanism.RSA_PKCS}[key_type]
    extra = bytes.fromhex("3031300d060960864801650304020105000420") if key_type.startswith("rsa") else b""

    def raw_sign(digest: bytes, key: Any = key, extra: bytes = extra, mechanism: Any = mechanism) -> object:
        return key.sign(extra + digest, mechanism=mechanism)
    return raw_sign


def rate(count: int, threads: int, sign: Callable[[bytes], object]) -> float:
    """Signatures a second: `count` digests signed by `threads` threads, each its share."""
    return measured(count, threads, sign)[0]


def measured(count: int, threads: int, sign: Callable[[bytes], object]) -> tuple[float, float, float]:
    """(signatures a second, CPU µs per signature of the signing threads, times per signature they were put on a
    core): the last two from each thread's /proc/self/task/TID/schedstat (its time on a core, its time waiting
    for one, how many times it was put on one), read before and after its share."""
    digests = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(count)]
    chunks = [digests[i::threads] for i in range(threads)]
    used: list[tuple[int, int]] = []

    def schedstat() -> tuple[int, int]:
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as stat:
                on_core, _waiting, runs = map(int, stat.read().split())
        except OSError:  # no /proc: the rate alone
            return 0, 0
        return on_core, runs

    failed: list[BaseException] = []

    def work(chunk: list[bytes]) -> None:
        before = schedstat()
        try:
            for digest in chunk:
                sign(digest)
        except BaseException as exc:  # a signature that failed is no figure: the run stops with it
            failed.append(exc)
        after = schedstat()
        used.append((after[0] - before[0], after[1] - before[1]))

    workers = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if failed:
        raise failed[0]
    return (count / elapsed, sum(ns for ns, _ in used) / count / 1000, sum(runs for _, runs in used) / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signatures", type=int, default=2000, help="signatures per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--audit", choices=("off", "file", "both"), default="both")
    parser.add_argument("--key-types", default=",".join(KEY_TYPES))
    args = parser.parse_args()
    key_types = [k for k in args.key_types.split(",") if k]
    if not key_types or any(k not in KEY_TYPES for k in key_types):
        sys.exit(f"--key-types: choose from {','.join(KEY_TYPES)}")
    modes = ["off", "file"] if args.audit == "both" else [args.audit]
    with_token("keyseal-p11-bench-",
               lambda work: run(work, args.signatures, args.rounds, args.threads, modes, key_types))


def with_token(prefix: str, measure: Callable[[Path], None]) -> None:
    """`measure(work)` with keyseal's home, its audit file and a SoftHSM2 token in a temporary directory `work`
    (removed after), the load average and the disk's fsync figures printed before and after."""
    if not os.path.exists(MODULE) or not shutil.which("softhsm2-util"):
        sys.exit("SoftHSM2 is required (Debian package softhsm2)")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        private_keyseal(work)
        print(f"load average before: {load_average()} ({os.cpu_count()} CPUs); append+fdatasync where the audit "
              f"file is: {fsync_latency(work)}")
        setup_token(work)
        measure(work)
        print(f"load average after: {load_average()}; append+fdatasync: {fsync_latency(work)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, count: int, rounds: int, threads: int, modes: list[str], key_types: list[str]) -> None:
    import pkcs11

    from keyseal._internal.backends import open_signer
    from keyseal._internal.backends.pkcs11 import create_key

    os.environ["KEYSEAL_PKCS11_PIN"] = PIN
    audit_file = work / "keyseal-home" / "audit.log"
    # rows[mode] = [(key, threads, raw rates, keyseal rates, ratios, bare group commit ratios)]
    rows: dict[str, list[tuple[str, int, list[float], list[float], list[float], list[float]]]] = {m: [] for m in modes}
    for key_type in key_types:
        label = f"bench-{key_type}"
        uri = f"pkcs11:token={TOKEN};object={label}?module-path={MODULE}"
        create_key(uri, key_type)
        signers = {}
        for mode in modes:  # each signer reads KEYSEAL_AUDIT_LOG when it is opened and first signs
            os.environ["KEYSEAL_AUDIT_LOG"] = str(audit_file) if mode == "file" else "off"
            signers[mode] = open_signer(uri)
            signers[mode].sign_digest(bytes(32), "sha256")
        # The raw baseline: a second session on the same token and key (the login is shared by the application),
        # C_Sign on the bare digest (RSA: the same DigestInfo prefix keyseal adds).
        token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
        with token.open() as session:
            raw_sign = raw_signer(session, label, key_type)
            for n_threads in sorted({1, threads}):
                raw: list[float] = []
                bare: list[float] = []
                ours: dict[str, list[float]] = {m: [] for m in modes}
                committer = None
                if "file" in modes:  # a line as long as keyseal's last one, in a file beside keyseal's
                    line = audit_file.read_bytes().splitlines()[-1] + b"\n"
                    committer = BareGroupCommit(work / f"bare-{key_type}-{n_threads}.log", line, n_threads, raw_sign)
                for _ in range(rounds):  # interleaved, so load from elsewhere hits both alike
                    raw.append(rate(count, n_threads, raw_sign))
                    if committer is not None:
                        bare.append(rate(count, n_threads, committer.sign) / raw[-1])
                    for mode in modes:
                        ours[mode].append(rate(count, n_threads, _keyseal_sign(signers[mode])))
                for mode in modes:
                    ratios = [k / r for k, r in zip(ours[mode], raw, strict=True)]
                    rows[mode].append((key_type, n_threads, raw, ours[mode], ratios, bare))
        for signer in signers.values():
            signer.close()
    for mode in modes:
        minimum, at = TARGETS[mode]
        title = ("audit off (KEYSEAL_AUDIT_LOG=off: records on the logger only)" if mode == "off"
                 else "audit file (each line fsynced before its signature returns, while the token signs; "
                       "concurrent threads share fsyncs)")
        print(f"\n{title}; medians of {rounds} rounds of {count} signatures")
        bare_column = f" {'bare':>5}" if mode == "file" else ""
        print(f"{'key':8} {'threads':>7} {'raw sig/s':>10} {'keyseal sig/s':>14}{bare_column} {'by round':>30} "
              f"{'ratio':>6}")
        checked: list[bool] = []
        for key_type, n_threads, raw, ours_rates, ratios, bare in rows[mode]:
            ratio = statistics.median(ratios)
            by_round = " ".join(f"{r:.2f}" for r in ratios)
            bare_figure = f" {statistics.median(bare):>5.2f}" if mode == "file" else ""
            print(f"{key_type:8} {n_threads:>7} {statistics.median(raw):>10.0f} {statistics.median(ours_rates):>14.0f}"
                  f"{bare_figure} {by_round:>30} {ratio:>6.2f}")
            if n_threads in at:
                checked.append(ratio >= minimum)
        verdict = "not measured" if not checked else "met" if all(checked) else "NOT met"
        print(f"target ratio >= {minimum} at {'/'.join(map(str, at))} thread(s): {verdict}")
        if mode == "file":
            print("bare: a bare group commit's ratio (raw signatures, a fixed line of keyseal's length, one writer "
                  "thread, no chain or lock): the most a Python signer that keeps the guarantee reaches here")


def _keyseal_sign(signer: Any) -> Callable[[bytes], object]:
    def sign(digest: bytes) -> object:
        return signer.sign_digest(digest, "sha256")
    return sign


if __name__ == "__main__":
    main()
