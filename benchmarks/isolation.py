"""Every benchmark runs keyseal with a home and an audit log of its own, in its temporary directory.

keyseal's defaults are the user's: `~/.config/keyseal` (the local KEK, the ledger) and its `audit.log`, and
`$KEYSEAL_AUDIT_LOG` if the user set it. A benchmark that signed thousands of times with those would fill the
user's audit log with its own lines, so each script calls `private_keyseal` before keyseal runs, in this
process and in every child it starts (they inherit the environment), and prints where its files went.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_keyseal(work: Path, audit: str = "file") -> dict[str, str]:
    """Point KEYSEAL_HOME and KEYSEAL_AUDIT_LOG into `work` (audit "file": `work/keyseal-home/audit.log`; "off":
    no audit file, records only on the logger) for this process and its children; returns the variables."""
    home = work / "keyseal-home"
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    variables = {"KEYSEAL_HOME": str(home), "KEYSEAL_AUDIT_LOG": str(home / "audit.log") if audit == "file" else "off"}
    os.environ.update(variables)
    print(f"keyseal home: {home}, audit log: {variables['KEYSEAL_AUDIT_LOG']} (temporary, removed at the end; "
          f"the user's ~/.config/keyseal and $KEYSEAL_AUDIT_LOG are not touched)", flush=True)
    return variables


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the record: figures taken on a busy machine do not hold."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def fsync_latency(directory: Path, count: int = 100) -> str:
    """The median and 90th percentile of one append and fdatasync of an audit-sized line in `directory` (where the
    audit file is): the floor under every audited signature, and what a busy disk moves most. Also the CPU time
    each costs the thread that calls it (the file system's work in the kernel, on a core the signers then do not
    have): on a small machine that, more than the wait, bounds how fast signers that share fsyncs go."""
    import statistics
    import time

    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        times, cpu = [], []
        for _ in range(count):
            start, start_cpu = time.perf_counter(), time.thread_time()
            os.write(fd, b"x" * 400 + b"\n")
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
    finally:
        os.close(fd)
        path.unlink()
    return (f"{statistics.median(times) * 1e6:.0f} us median, {statistics.quantiles(times, n=10)[-1] * 1e6:.0f} us "
            f"p90, {statistics.fmean(cpu) * 1e6:.0f} us CPU mean")

