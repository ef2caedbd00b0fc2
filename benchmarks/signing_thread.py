"""One thread that makes every C_Sign, against callers that take turns at the token: with the audit file on.

keyseal's callers each ask the token themselves, one at a time (the PKCS#11 module's lock), queue their audit
line before they ask and sleep until it is durable. This script measures the other way to share a token that
signs one at a time: each caller queues its line as before, then hands its C_Sign to one signing thread that
makes every call, and sleeps until that thread has the signature (and then, if need be, until the line is
durable). The signing thread never waits for a caller to be put back on a core between two signatures, and no
caller waits for the token's lock. It is not keyseal's design: these figures are what that design would give
here, for the team to weigh.

Rows, for each key type and thread count, in a throwaway SoftHSM2 token (the same key for every row):
- `raw`: python-pkcs11 `key.sign()`, no log (`pkcs11_sign.py`'s baseline);
- `bare`: `pkcs11_sign.py`'s `BareGroupCommit` (a fixed line queued before the token is asked, one writer
  thread that waits up to 1 ms for one line per thread, one write and one fdatasync), raw signatures;
- `signer, bare`: keyseal's signer (the PKCS#11 signer and the audit wrapper, as `open_signer` gives it) over
  that same bare group commit as its log;
- `keyseal`: keyseal's signer over its own AuditLog, as every caller signs;
and each of the last three again `+ thread`: the C_Sign calls made by one signing thread (`SigningThread`).
Rounds are interleaved; each ratio is taken against `raw` in its own round; medians over the rounds. keyseal's
home and audit file are in the script's temporary directory.

Usage: python benchmarks/signing_thread.py [--signatures 1000] [--rounds 5] [--threads 1,4]
                                           [--key-types p256,ed25519,rsa2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkcs11_sign import KEY_TYPES, MODULE, PIN, TOKEN, BareGroupCommit, rate, raw_signer, with_token

ROWS = ("raw", "bare", "bare + thread", "signer, bare", "signer, bare + thread", "keyseal", "keyseal + thread")


class _Call:
    __slots__ = ("args", "done", "error", "result", "sign")

    def __init__(self, sign: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.sign, self.args = sign, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


class SigningThread:
    """One daemon thread that makes every signature handed to it, in order; the caller sleeps on a lock of its
    own until its signature (or the error) is there. The thread sleeps only when nothing is queued."""

    def __init__(self) -> None:
        self.calls: deque[_Call] = deque()
        self.wake = threading.Condition()
        self.idle = False
        threading.Thread(target=self._run, daemon=True).start()

    def call(self, sign: Callable[..., Any], *args: Any) -> Any:
        call = _Call(sign, args)
        self.calls.append(call)
        if self.idle:
            with self.wake:
                self.wake.notify()
        call.done.acquire()
        if call.error is not None:
            raise call.error
        return call.result

    def _run(self) -> None:
        calls = self.calls
        while True:
            try:
                call = calls.popleft()
            except IndexError:
                with self.wake:
                    self.idle = True  # before looking: a caller that queues after the look sees it and wakes us
                    while not calls:
                        self.wake.wait()
                    self.idle = False
                continue
            try:
                call.result = call.sign(*call.args)
            except BaseException as exc:  # the caller raises it
                call.error = exc
            call.done.release()


class HandedOff:
    """keyseal's PKCS#11 signer whose `sign_digest` calls are made by a SigningThread; everything else (the
    public key, the URI) is the signer's own."""

    def __init__(self, inner: Any, thread: SigningThread) -> None:
        self.inner, self.thread, self.uri = inner, thread, inner.uri

    def sign_digest(self, digest: bytes, hash_name: str) -> bytes:
        signature: bytes = self.thread.call(self.inner.sign_digest, digest, hash_name)
        return signature

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signatures", type=int, default=1000, help="signatures per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,4", help="thread counts, comma-separated")
    parser.add_argument("--key-types", default=",".join(KEY_TYPES))
    args = parser.parse_args()
    if args.signatures < 1 or args.rounds < 1:
        sys.exit("--signatures and --rounds: at least 1")
    key_types = [k for k in args.key_types.split(",") if k]
    if not key_types or any(k not in KEY_TYPES for k in key_types):
        sys.exit(f"--key-types: choose from {','.join(KEY_TYPES)}")
    try:
        counts = [int(n) for n in args.threads.split(",") if n]
    except ValueError:
        sys.exit("--threads: thread counts, comma-separated (1,4)")
    if not counts or min(counts) < 1:
        sys.exit("--threads: thread counts, comma-separated (1,4)")
    with_token("keyseal-thread-bench-",
               lambda work: run(work, args.signatures, args.rounds, counts, key_types))


def run(work: Path, count: int, rounds: int, counts: list[int], key_types: list[str]) -> None:
    import pkcs11

    from keyseal._internal.audit.signer import unwrap
    from keyseal._internal.backends import open_signer
    from keyseal._internal.backends.pkcs11 import create_key

    os.environ["KEYSEAL_PKCS11_PIN"] = PIN
    audit_file = work / "keyseal-home" / "audit.log"
    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    print(f"\nmedians of {rounds} rounds of {count} signatures; each ratio against raw in its own round")
    print(f"{'key':8} {'threads':>7} {'log':22} {'/ raw':>6}   by round")
    for key_type in key_types:
        label = f"bench-thread-{key_type}"
        uri = f"pkcs11:token={TOKEN};object={label}?module-path={MODULE}"
        create_key(uri, key_type)
        keyseal = open_signer(uri)  # over the AuditLog in keyseal's (temporary) home
        keyseal.sign_digest(bytes(32), "sha256")
        inner = unwrap(keyseal)
        handed_off = HandedOff(inner, SigningThread())
        line = audit_file.read_bytes().splitlines()[-1] + b"\n"  # as long as keyseal's
        with token.open() as session:  # a second session (the login is the application's, shared)
            raw_sign = raw_signer(session, label, key_type)
            thread = SigningThread()
            for n_threads in counts:
                signers = _signers(work / f"{key_type}-{n_threads}", line, n_threads, raw_sign, thread, keyseal,
                                   inner, handed_off)
                ratios: dict[str, list[float]] = {name: [] for name in signers}
                for _ in range(rounds):  # interleaved, so load from elsewhere hits every row alike
                    rates = {name: rate(count, n_threads, sign) for name, sign in signers.items()}
                    for name in signers:
                        ratios[name].append(rates[name] / rates["raw"])
                for name, of in ratios.items():
                    print(f"{key_type:8} {n_threads:>7} {name:22} {statistics.median(of):>6.2f}   "
                          f"{' '.join(f'{r:.2f}' for r in of)}", flush=True)
        keyseal.close()


def _signers(prefix: Path, line: bytes, threads: int, raw_sign: Callable[[bytes], object], thread: SigningThread,
             keyseal: Any, inner: Any, handed_off: HandedOff) -> dict[str, Callable[[bytes], object]]:
    """Every row's way of signing a digest, in ROWS' order; each bare group commit in a file of its own."""
    from keyseal._internal.audit.signer import AuditingSigner

    auditing: Any = AuditingSigner  # given stand-ins: HandedOff as its Signer, BareGroupCommit as its AuditLog
    bare = BareGroupCommit(Path(f"{prefix}-bare.log"), line, threads, raw_sign)
    bare_thread = BareGroupCommit(Path(f"{prefix}-bare-thread.log"), line, threads,
                                  lambda digest: thread.call(raw_sign, digest))
    signer_bare = auditing(inner, lambda: BareGroupCommit(Path(f"{prefix}-signer.log"), line, threads, raw_sign))
    signer_bare_thread = auditing(
        handed_off, lambda: BareGroupCommit(Path(f"{prefix}-signer-thread.log"), line, threads, raw_sign))
    keyseal_thread = auditing(handed_off)  # the configured AuditLog: the same file as `keyseal`'s
    signers: dict[str, Callable[[bytes], object]] = {
        "raw": raw_sign,
        "bare": bare.sign,
        "bare + thread": bare_thread.sign,
        "signer, bare": lambda digest: signer_bare.sign_digest(digest, "sha256"),
        "signer, bare + thread": lambda digest: signer_bare_thread.sign_digest(digest, "sha256"),
        "keyseal": lambda digest: keyseal.sign_digest(digest, "sha256"),
        "keyseal + thread": lambda digest: keyseal_thread.sign_digest(digest, "sha256"),
    }
    assert tuple(signers) == ROWS
    return signers


if __name__ == "__main__":
    main()
