"""Where the audit file's group commit loses against a bare one: keyseal's AuditLog and simpler logs, step by step.

`pkcs11_sign.py` shows keyseal's audited rate beside a bare group commit's; this script takes the difference
apart. The same P-256 key in a throwaway SoftHSM2 token signs, in these rows:
- `raw`: python-pkcs11 `key.sign()`, no log (`pkcs11_sign.py`'s baseline);
- `bare, raw`: the same through `pkcs11_sign.py`'s bare group commit (`BareGroupCommit`: a line of keyseal's length
  queued before the token is asked, one writer thread that waits up to 1 ms for one line per signing thread, then
  one write and one fdatasync, each caller woken once its line is durable). No keyseal code in these two rows.
Every row below signs through keyseal's AuditingSigner (the signer every `open_signer` caller gets: the PKCS#11
signer and the audit wrapper), over a log built up one step at a time:
- `bare`: the same bare group commit (the same class, the same fixed line);
- `+ records`: each line queued as keyseal's record of it (its time taken, a slotted object, whether its caller
  waits), and the writer woken only once as many lines are queued as it waits for (not at each line);
- `+ lines`: each line spelt whole as keyseal writes it (seq, time, prev) and chained by SHA-256;
- `+ checks`: the file locked (flock) for each batch and checked as keyseal checks it (a stat of its path, the
  last line read back);
- `+ gather`: instead of one line per thread (which a library does not know), keyseal's gather: as many lines
  as were queued during the last batch plus one per caller it woke that was waiting, and a caller records that
  it waits under the queue's lock;
- `keyseal`: the AuditLog itself (its queue, writer thread, file lock, checks, checkpoints; a caller done signing
  before the writer took its line writes the queue itself).
Rounds are interleaved; each ratio is taken in its own round, against `raw` and against `bare`; medians over the
rounds. `lines/fsync` counts the lines each fdatasync made durable; `CPU us` and `runs` are the signing threads'
own (Linux's per-thread scheduler statistics): CPU time per signature, and how many times per signature a thread
was put on a core (each sleep on a lock, the interpreter lock included, costs one). In the `keyseal` row a caller
that writes the queue itself also pays that batch's write and fdatasync on its own thread. keyseal's home and
audit file are in the script's temporary directory.

Usage: python benchmarks/audit_steps.py [--signatures 1000] [--rounds 8] [--threads 4]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkcs11_sign import MODULE, PIN, TOKEN, BareGroupCommit, measured, with_token

STEPS = ("+ records", "+ lines", "+ checks", "+ gather")


class StepLog:
    """The bare group commit with the steps named in `steps` (see the module's docstring), serving an
    AuditingSigner as keyseal's AuditLog does (`check_writable`, `submit_body`, `settle`). Its lines are keyseal's
    records from the first step on."""

    def __init__(self, path: Path, line: bytes, threads: int, steps: set[str]) -> None:
        from keyseal._internal.audit.log import GENESIS

        self.path, self.line, self.steps, self.threads = str(path), line, steps, threads
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.queue: list[Any] = []
        self.waiting_for = 0
        self.seq, self.prev, self.last = 1, GENESIS, b""
        self.aim = 1
        threading.Thread(target=self._write, daemon=True).start()

    def check_writable(self) -> None:
        pass

    def submit_body(self, body: str, custody: object = None) -> Any:
        from keyseal._internal.audit.log import Pending

        item = Pending(None, None, body)
        with self.lock:
            self.queue.append(item)
            if self.waiting_for and len(self.queue) >= self.waiting_for:
                self.waiting_for = 0
                self.work.notify()
        return item

    def settle(self, item: Any) -> None:
        if "+ gather" in self.steps and not item.done:
            with self.lock:
                item.waiting = True
        if not item.done:
            item.signal.acquire()

    def _gathered(self) -> list[Any]:
        """The next batch: one line per thread (at most 1 ms after the first), or keyseal's gather (the last
        batch's estimate, at most 1 ms; a lone line is written at once)."""
        with self.lock:
            if "+ gather" in self.steps:
                aim = self.aim
                deadline = time.monotonic() + 0.001 if aim > 1 else 0.0
            else:
                while not self.queue:
                    self.waiting_for = 1
                    self.work.wait()
                aim, deadline = self.threads, time.monotonic() + 0.001
            while len(self.queue) < aim:
                timeout = None
                if deadline:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:  # they did not come: write what there is, else wait for a line
                        aim, deadline = 1, 0.0
                        continue
                self.waiting_for = aim
                self.work.wait(timeout)
            self.waiting_for = 0
            batch, self.queue = self.queue, []
        return batch

    def _write(self) -> None:
        from keyseal._internal.audit.log import _START, line_hash

        while True:
            batch = self._gathered()
            if "+ checks" in self.steps:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                size = os.stat(self.path).st_size
                os.pread(self.fd, len(self.last) + 2, max(0, size - len(self.last) - 2))
            if "+ lines" in self.steps:
                chunks, seq, prev = [], self.seq, self.prev
                for item in batch:
                    line = f'{_START}{seq},"time":"{item.time}",{item.body},"prev":"{prev}"}}'.encode("ascii")
                    item.seq, item.prev, item.line = seq, prev, line
                    chunks.append(line + b"\n")
                    seq, prev = seq + 1, line_hash(line)
                self.seq, self.prev, self.last = seq, prev, chunks[-1][:-1]
                data = b"".join(chunks)
            else:
                data = self.line * len(batch)
            os.write(self.fd, data)
            os.fdatasync(self.fd)
            if "+ checks" in self.steps:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            woken = 0
            for item in batch:
                item.done = True
                woken += item.waiting
                item.signal.release()
            if "+ gather" in self.steps:
                with self.lock:
                    self.aim = max(1, min(len(self.queue) + woken, 64))


class SyncCounter:
    """os.fdatasync, counted while in use (every log here, keyseal's included, makes its lines durable with it)."""

    def __init__(self) -> None:
        self.count = 0
        self.real = os.fdatasync

    def __enter__(self) -> SyncCounter:
        os.fdatasync = self
        return self

    def __exit__(self, *exc: object) -> None:
        os.fdatasync = self.real

    def __call__(self, fd: int) -> None:
        self.count += 1
        self.real(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signatures", type=int, default=1000, help="signatures per measurement")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    with_token("keyseal-steps-bench-", lambda work: run(work, args.signatures, args.rounds, args.threads))


def run(work: Path, count: int, rounds: int, threads: int) -> None:
    import pkcs11

    from keyseal._internal.audit.signer import AuditingSigner, unwrap
    from keyseal._internal.backends import open_signer
    from keyseal._internal.backends.pkcs11 import create_key

    os.environ["KEYSEAL_PKCS11_PIN"] = PIN
    uri = f"pkcs11:token={TOKEN};object=bench-steps?module-path={MODULE}"
    create_key(uri, "p256")
    keyseal = open_signer(uri)  # over the AuditLog in keyseal's (temporary) home
    keyseal.sign_digest(bytes(32), "sha256")
    inner = unwrap(keyseal)
    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    session = token.open()
    key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="bench-steps")

    def raw_sign(digest: bytes) -> object:
        return key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)

    line = (work / "keyseal-home" / "audit.log").read_bytes().splitlines()[-1] + b"\n"  # as long as keyseal's
    bare_raw = BareGroupCommit(work / "bare-raw.log", line, threads, raw_sign)
    signers: dict[str, Callable[[bytes], object]] = {"raw": raw_sign, "bare, raw": bare_raw.sign}
    logs: list[Any] = [BareGroupCommit(work / "bare.log", line, threads, raw_sign)]
    logs += [StepLog(work / f"step-{index}.log", line, threads, set(STEPS[:index + 1])) for index in range(len(STEPS))]
    for name, log in zip(("bare", *STEPS), logs, strict=True):
        audited = AuditingSigner(inner, lambda log=log: log)  # type: ignore[misc]
        signers[name] = lambda digest, audited=audited: audited.sign_digest(digest, "sha256")
    signers["keyseal"] = lambda digest: keyseal.sign_digest(digest, "sha256")
    figures: dict[str, dict[str, list[float]]] = {
        name: {"raw": [], "bare": [], "sync": [], "cpu": [], "runs": []} for name in signers}
    with session, SyncCounter() as syncs:
        for _ in range(rounds):  # interleaved, so load from elsewhere hits every row alike
            rates = {}
            for name, sign in signers.items():
                syncs.count = 0
                rates[name], cpu, runs = measured(count, threads, sign)
                figures[name]["sync"].append(count / syncs.count if syncs.count else 0.0)
                figures[name]["cpu"].append(cpu)
                figures[name]["runs"].append(runs)
            for name in signers:
                figures[name]["raw"].append(rates[name] / rates["raw"])
                figures[name]["bare"].append(rates[name] / rates["bare"])
    keyseal.close()
    print(f"\nP-256, {threads} threads (from `bare` on, through keyseal's signer); medians of {rounds} rounds of "
          f"{count} signatures; CPU and runs: the signing threads', per signature")
    print(f"{'log':10} {'/ raw':>6} {'/ bare':>7} {'lines/fsync':>12} {'CPU us':>7} {'runs':>5}   by round (/ bare)")
    for name, of in figures.items():
        by_round = " ".join(f"{r:.2f}" for r in of["bare"])
        medians = {figure: statistics.median(values) for figure, values in of.items()}
        per_sync = f"{medians['sync']:.2f}" if medians["sync"] else "-"  # raw: no log
        print(f"{name:10} {medians['raw']:>6.2f} {medians['bare']:>7.2f} {per_sync:>12} {medians['cpu']:>7.0f} "
              f"{medians['runs']:>5.1f}   {by_round}")


if __name__ == "__main__":
    main()
