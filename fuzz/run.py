"""Run the fuzz targets for long: `python -m fuzz.run [--engine E] [--runs N] [--target NAME ...]`.

The CI properties (tests/test_fuzz_*.py) run the same targets a few hundred times each; this runs them
1,000,000 times each by default and reports, per target, how many inputs ran, how many were accepted and
rejected, the time, and the process's peak memory. Exit status 1 if any input crashed (raised something other
than a KeysealError) or hung; the input is saved under --out for replay (`--replay FILE --target NAME`).

Engines:
- `atheris` (default when installed: `pip install -e '.[fuzz]'`): coverage-guided libFuzzer,
  one child process per target, the seeds as its starting corpus; `-timeout` catches hangs and `-rss_limit_mb`
  memory growth.
- `hypothesis`: the CI properties with a large max_examples (slower, shrinks a failure to a small input).
- `random`: a plain seeded loop over the same mutators, the fastest; a per-input alarm catches hangs.

Half the inputs are random bytes and half structure-aware mutations of valid inputs (fuzz/mutate.py): the first
byte of an input picks which (even: raw bytes; odd: a mutation program for a seed).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

DEFAULT_RUNS = 1_000_000
HANG_SECONDS = 10


@dataclass
class Report:
    target: str
    engine: str
    runs: int = 0
    accepted: int = 0
    rejected: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    failure: str = ""

    def line(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        counts = f"accepted {self.accepted:,} rejected {self.rejected:,}" if self.accepted + self.rejected else ""
        status = f"FAILED: {self.failure}" if self.failure else "ok"
        return (f"{self.target:12} {self.engine:10} {self.runs:>11,} inputs  {counts:34} {self.seconds:8.1f} s "
                f"({rate:,.0f}/s)  peak RSS {self.peak_rss_mb:6.0f} MiB  {status}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _targets() -> dict[str, object]:
    from fuzz.formats import shared_format_targets
    from fuzz.server import shared_server_targets
    from fuzz.targets import shared_targets

    return {**shared_targets(), **shared_format_targets(), **shared_server_targets()}


def decode_input(name: str, data: bytes) -> bytes:
    """What a fuzzer input means for a target: raw bytes (first byte even) or a mutation of a seed (odd)."""
    from fuzz.targets import Target

    target = _targets()[name]
    assert isinstance(target, Target)
    if not data or data[0] % 2 == 0:
        return data[1:]
    return target.mutant(data[1:])


def check_input(name: str, data: bytes) -> str:
    from fuzz.targets import Target, run_one

    target = _targets()[name]
    assert isinstance(target, Target)
    return run_one(target, decode_input(name, data))


# -- engines ------------------------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise Hang(f"one input ran longer than {HANG_SECONDS} s")


def _save(out: Path, name: str, data: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"crash-{name}-{hashlib.sha256(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def run_random(name: str, runs: int, seed: int, out: Path) -> Report:
    report = Report(name, "random")
    rng = random.Random(f"{seed}:{name}")  # noqa: S311 - fuzz inputs, not secrets
    previous = signal.signal(signal.SIGALRM, _alarm)
    started = time.monotonic()
    try:
        for _ in range(runs):
            data = bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 512 if rng.random() < 0.5 else 96))
            signal.alarm(HANG_SECONDS)
            try:
                outcome = check_input(name, data)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                report.failure = f"{type(exc).__name__}: {exc} (input saved to {_save(out, name, data)})"
                break
            finally:
                signal.alarm(0)
            report.runs += 1
            if outcome == "accepted":
                report.accepted += 1
            else:
                report.rejected += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = peak_rss_mb()
    return report


def run_hypothesis(name: str, runs: int, out: Path) -> Report:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    report = Report(name, "hypothesis")
    last: list[bytes] = [b""]

    @settings(max_examples=runs, deadline=HANG_SECONDS * 1000, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=600))
    def prop(data: bytes) -> None:
        last[0] = data
        outcome = check_input(name, data)
        report.runs += 1
        if outcome == "accepted":
            report.accepted += 1
        else:
            report.rejected += 1

    started = time.monotonic()
    try:
        prop()
    except Exception as exc:
        report.failure = f"{type(exc).__name__}: {exc} (input saved to {_save(out, name, last[0])})"
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = peak_rss_mb()
    return report


def run_atheris_child(name: str, runs: int, out: Path, workdir: Path) -> None:
    """In a child process: libFuzzer over one target, starting from its seeds."""
    atheris = importlib.import_module("atheris")  # optional, untyped

    assert "keyseal" not in sys.modules, "keyseal must be imported under instrumentation"
    with atheris.instrument_imports(include=["keyseal", "fuzz"]):
        from fuzz.targets import Target

        target = _targets()[name]
    assert isinstance(target, Target)
    seeds = workdir / "corpus"
    seeds.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(target.seeds):
        (seeds / f"seed-{index}").write_bytes(b"\x00" + seed)  # raw mode: the seed as it is
        (seeds / f"mutate-{index}").write_bytes(b"\x01" + bytes([index]))  # mutation mode, from this seed

    def one(data: bytes) -> None:
        check_input(name, data)

    out.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-runs={runs}", f"-timeout={HANG_SECONDS}", "-rss_limit_mb=2048", "-max_len=65536",
            f"-artifact_prefix={out}/crash-{name}-", "-print_final_stats=1", str(seeds)]
    atheris.Setup(args, one)
    atheris.Fuzz()


def run_atheris(name: str, runs: int, out: Path) -> Report:
    report = Report(name, "atheris")
    with tempfile.TemporaryDirectory(prefix=f"keyseal-fuzz-{name}-") as workdir:
        log = Path(workdir) / "log"
        started = time.monotonic()
        with log.open("wb") as sink:
            proc = subprocess.run(
                [sys.executable, "-m", "fuzz.run", "--engine", "atheris-child", "--target", name, "--runs",
                 str(runs), "--out", str(out), "--workdir", workdir],
                stdout=sink, stderr=subprocess.STDOUT, check=False, cwd=Path(__file__).resolve().parent.parent,
            )
        report.seconds = time.monotonic() - started
        text = log.read_text(errors="replace")
    done = re.search(r"Done (\d+) runs", text)
    report.runs = int(done.group(1)) if done else 0
    rss = re.findall(r"rss: (\d+)Mb", text)
    report.peak_rss_mb = float(max(map(int, rss))) if rss else 0.0
    if proc.returncode != 0 or not done:
        tail = " | ".join(line for line in text.splitlines()[-12:] if line.strip())
        report.failure = f"libFuzzer exit {proc.returncode}: {tail[-600:]}"
    return report


# -- command line -------------------------------------------------------------------------------------------


def _engines() -> list[str]:
    try:
        importlib.import_module("atheris")
    except ImportError:
        return ["hypothesis", "random"]
    return ["atheris", "hypothesis", "random"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=[*_engines(), "atheris-child"], default=_engines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("KEYSEAL_FUZZ_RUNS", DEFAULT_RUNS)),
                        help=f"inputs per target (default {DEFAULT_RUNS:,}, or $KEYSEAL_FUZZ_RUNS)")
    parser.add_argument("--target", action="append", help="a target name (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random engine")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "keyseal-fuzz-crashes",
                        help="where crashing inputs go (default: %(default)s)")
    parser.add_argument("--replay", type=Path, help="run one saved input through --target and show the result")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="list the targets and their seed counts")
    args = parser.parse_args(argv)
    if args.engine == "atheris-child":  # before anything imports keyseal: it must load under instrumentation
        assert args.workdir is not None and args.target
        run_atheris_child(args.target[0], args.runs, args.out.resolve(), args.workdir)
        return 0
    names = args.target or list(_targets())
    unknown = sorted(set(names) - set(_targets()))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}: choose from {', '.join(_targets())}")
    if args.list:
        from fuzz.targets import Target

        for name, target in _targets().items():
            assert isinstance(target, Target)
            sys.stdout.write(f"{name:12} {len(target.seeds)} seeds\n")
        return 0
    if args.replay:
        sys.stdout.write(f"{check_input(names[0], args.replay.read_bytes())}\n")
        return 0
    runners: dict[str, Callable[[str], Report]] = {
        "atheris": lambda name: run_atheris(name, args.runs, args.out.resolve()),
        "hypothesis": lambda name: run_hypothesis(name, args.runs, args.out),
        "random": lambda name: run_random(name, args.runs, args.seed, args.out),
    }
    sys.stdout.write(f"keyseal fuzz: engine {args.engine}, {args.runs:,} inputs per target\n")
    failed = 0
    total = 0
    for name in names:
        report = runners[args.engine](name)
        sys.stdout.write(report.line() + "\n")
        sys.stdout.flush()
        failed += bool(report.failure)
        total += report.runs
    sys.stdout.write(f"total: {total:,} inputs over {len(names)} targets, {failed} failed\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
