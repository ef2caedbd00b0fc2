"""Start-up cost of keyseal's short commands, as ratios against baselines run in the same script, in interleaved
rounds (medians):

- `git log --show-signature` over a repository of N commits signed through keyseal-gpg, with
  `gpg.program=keyseal-gpg` against the same with gpg (the certificate imported into a private GNUPGHOME);
  git starts the program once per commit (target <= 5x). keyseal-gpg as installed (its verification server on:
  the first run starts it, and that run is shown on its own), and with KEYSEAL_GPG_SERVER=off (every call
  verifies in its own process);
- `keyseal verify` of a 1 KB file (Ed25519) against `python -c pass` with the same interpreter (target <= 3x)
  and against `sqv`;
- `keyseal --help` against `python -c pass` (target <= 3x);
- `python -X importtime` for each short path: the total, and the biggest imports by their own time;
- with `--instructions` (needs valgrind): the instructions each short command executes (callgrind), against
  `python -c pass`. Unlike times, these repeat to a fraction of a percent on a busy machine, so they compare
  one change with the next.

Everything runs in a temporary directory with its own KEYSEAL_HOME, HOME, GNUPGHOME and XDG_RUNTIME_DIR (where the
verification server's socket lives; the server is stopped at the end): nothing is written to the user's files.
Usage: python benchmarks/startup.py [--commits 200] [--rounds 5] [--instructions]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent


def run(command: Sequence[str | os.PathLike[str]], env: dict[str, str], cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run([str(c) for c in command], env=env, cwd=cwd, capture_output=True, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed: {result.stderr.decode(errors='replace')[-400:]}")
    return result


def timed(command: Sequence[str | os.PathLike[str]], env: dict[str, str],
          cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and everything it waited for). On a busy machine a short
    process waits for a core longer than it runs, so the CPU time is the fairer figure there."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run(command, env, cwd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def setup(work: Path, commits: int) -> tuple[dict[str, str], Path, Path, Path]:
    env = {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(work / "home"),
           "KEYSEAL_HOME": str(work / "keyseal-home"), "GNUPGHOME": str(work / "gnupg"),
           "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C.UTF-8", "XDG_RUNTIME_DIR": str(work / "run"),
           "KEYSEAL_GPG_SERVER": "on"}
    for name in ("home", "keyseal-home", "gnupg", "run"):
        (work / name).mkdir(mode=0o700)
    print(f"keyseal home: {env['KEYSEAL_HOME']}, HOME, GNUPGHOME and XDG_RUNTIME_DIR beside it (temporary, removed "
          f"at the end; the verification server it starts is stopped)", flush=True)
    key, cert = work / "release.key", work / "release.asc"
    run([BIN / "keyseal", "keys", "create", "--out", key, "--type", "ed25519"], env)
    run([BIN / "keyseal", "keys", "mint", "--key", f"file:{key}", "--name", "Bench", "--email",
         "bench@example.org", "-o", cert], env)
    run(["gpg", "--batch", "--import", cert], env)
    repo = work / "repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], env, repo)
    for setting in (("user.name", "Bench"), ("user.email", "bench@example.org"), ("commit.gpgsign", "true")):
        run(["git", "config", *setting], env, repo)
    run([BIN / "keyseal", "git-setup", "--key", f"file:{key}", "--cert", cert, "--apply"], env, repo)
    for index in range(commits):
        (repo / "file").write_text(f"{index}\n")
        run(["git", "add", "file"], env, repo)
        run(["git", "commit", "-q", "-m", f"commit {index}"], env, repo)
    data = work / "small"
    data.write_bytes(os.urandom(1024))
    run([BIN / "keyseal", "sign", "--key", f"file:{key}", "--cert", cert, data], env)
    return env, repo, cert, data


def instructions(command: Sequence[str | os.PathLike[str]], env: dict[str, str], stdin: Path | None = None) -> int:
    """Instructions the command executes (callgrind's total: the interpreter, its libraries, everything)."""
    with open(stdin or os.devnull, "rb") as source:
        result = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                                 *map(str, command)], env=env, stdin=source, capture_output=True, check=False)
    match = re.search(rb"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"{command[0]} under callgrind failed: {result.stderr.decode(errors='replace')[-400:]}")
    return int(match.group(1))


def import_profile(args: Sequence[str | os.PathLike[str]], env: dict[str, str]) -> tuple[float, list[str]]:
    """Total import time (ms) of one run, and its five biggest imports by own time."""
    result = run([sys.executable, "-X", "importtime", *map(str, args)], env, check=False)
    own: dict[str, int] = defaultdict(int)
    total = 0
    for line in result.stderr.decode(errors="replace").splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            own[match.group(4)] += int(match.group(1))
            total += int(match.group(1))
    top = sorted(own.items(), key=lambda item: -item[1])[:5]
    return total / 1000, [f"{name} {us / 1000:.1f}" for name, us in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="also count instructions (valgrind)")
    options = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="keyseal-startup-") as tmp:
        work = Path(tmp)
        env, repo, cert, data = setup(work, options.commits)
        sig = data.with_name("small.asc")
        git_log: list[str | os.PathLike[str]] = ["git", "-c", f"gpg.program={BIN / 'keyseal-gpg'}", "log",
                                                 "--show-signature"]
        commands: dict[str, list[str | os.PathLike[str]]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "keyseal verify 1 KB": [BIN / "keyseal", "verify", "--cert", cert, data, sig],
            "sqv 1 KB": ["sqv", "--keyring", cert, sig, data],
            "keyseal --help": [BIN / "keyseal", "--help"],
            "git log (keyseal-gpg)": git_log,
            "git log (keyseal-gpg, server off)": git_log,
            "git log (gpg)": ["git", "-c", "gpg.program=gpg", "log", "--show-signature"],
        }
        envs = {name: {**env, "KEYSEAL_GPG_SERVER": "off"} if "server off" in name else env for name in commands}
        try:
            start = time.perf_counter()
            checked = run(git_log, env, repo).stdout.decode(errors="replace")  # starts the server on its way
            first_run = time.perf_counter() - start
            assert checked.count("Good signature") == options.commits, "keyseal-gpg did not verify every commit"
            served = run(git_log, {**env, "KEYSEAL_GPG_SERVER": "require"}, repo).stdout.decode(errors="replace")
            assert served == checked, "the server's output differs from the first run's"
            checked = run(commands["git log (gpg)"], env, repo).stdout.decode(errors="replace")
            assert checked.count("Good signature") == options.commits, "gpg did not verify every commit"
            walls: dict[str, list[float]] = defaultdict(list)
            cpus: dict[str, list[float]] = defaultdict(list)
            for _ in range(options.rounds):
                for name, command in commands.items():  # interleaved: each round runs every command once
                    wall, cpu = timed(command, envs[name], repo if name.startswith("git") else None)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            report(options, walls, cpus, first_run, env, cert, data, sig)
        finally:
            stop_servers(work / "run")
        shutil.rmtree(work / "repo", ignore_errors=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def stop_servers(runtime: Path) -> None:
    """Stop the verification servers keyseal-gpg started for this run (each lock file holds its pid), and wait
    until they are gone."""
    pids = [int(text) for lock in (runtime / "keyseal").glob("*.lock") if (text := lock.read_text().strip()).isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Still running (not gone, not a zombie waiting for whoever inherited it)."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def report(options: argparse.Namespace, walls: dict[str, list[float]], cpus: dict[str, list[float]],
           first_run: float, env: dict[str, str], cert: Path, data: Path, sig: Path) -> None:
    median = {name: statistics.median(values) for name, values in walls.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpus.items()}

    def row(name: str, base: str) -> str:
        return (f"| {name} | {median[name] * 1000:.1f} ms | {cpu_median[name] * 1000:.1f} ms | {base} | "
                f"{median[base] * 1000:.1f} ms | {cpu_median[base] * 1000:.1f} ms | "
                f"{median[name] / median[base]:.2f} | {cpu_median[name] / max(cpu_median[base], 1e-4):.2f} |")

    print(f"\n{options.commits} commits, medians of {options.rounds} interleaved rounds\n")
    print("| command | wall | CPU | baseline | baseline wall | baseline CPU | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("git log (keyseal-gpg)", "git log (gpg)") + "  target <= 5")
    print(row("git log (keyseal-gpg, server off)", "git log (gpg)"))
    print(row("keyseal verify 1 KB", "python -c pass") + "  target <= 3")
    print(row("keyseal verify 1 KB", "sqv 1 KB"))
    print(row("keyseal --help", "python -c pass") + "  target <= 3")
    per_commit = (median["git log (keyseal-gpg)"] - median["git log (gpg)"]) / options.commits
    per_commit_cpu = (cpu_median["git log (keyseal-gpg)"] - cpu_median["git log (gpg)"]) / options.commits
    print(f"\nkeyseal-gpg per commit over gpg: {per_commit * 1000:.1f} ms wall, {per_commit_cpu * 1000:.1f} ms CPU")
    print(f"first git log, which started the server: {first_run * 1000:.0f} ms "
          f"({first_run / median['git log (gpg)']:.2f}x gpg's median)")

    print("\n| path | imports (ms, -X importtime) | biggest own times (ms) |")
    print("|---|---|---|")
    paths: dict[str, list[str | os.PathLike[str]]] = {
        "python -c pass": ["-c", "pass"],
        # as the console scripts start (`-m keyseal` would add runpy's imports)
        "keyseal verify": ["-c", "from keyseal._internal.cli.quick import main; main()", "verify", "--cert", cert,
                           data, sig],
        "keyseal --help": ["-c", "from keyseal._internal.cli.quick import main; main()", "--help"],
        "keyseal-gpg --verify (served)": ["-c", "from keyseal._internal.cli.gpgentry import main; main()",
                                          "--keyid-format=long", "--status-fd=1", "--verify", sig, data],
        "keyseal-gpg --verify (server off)": ["-c", "from keyseal._internal.cli.gpgcompat import main; main()",
                                              "--keyid-format=long", "--status-fd=1", "--verify", sig, data],
    }
    for name, args in paths.items():
        total, top = import_profile(args, env)
        print(f"| {name} | {total:.1f} | {', '.join(top)} |")
    if options.instructions:
        # keyseal-gpg as git runs it per commit: the signature in a file, the data on standard input.
        gpg_verify: list[str | os.PathLike[str]] = [BIN / "keyseal-gpg", "--keyid-format=long", "--status-fd=1",
                                                    "--verify", sig, "-"]
        counted: dict[str, tuple[list[str | os.PathLike[str]], Path | None]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], None),
            "keyseal verify 1 KB": ([BIN / "keyseal", "verify", "--cert", cert, data, sig], None),
            "keyseal --help": ([BIN / "keyseal", "--help"], None),
            "keyseal-gpg --verify (as git runs it; the caller, served)": (gpg_verify, data),
            "keyseal-gpg --verify (server off)": (gpg_verify, data),
            "gpg --verify (as git runs it)": (["gpg", "--keyid-format=long", "--status-fd=1", "--verify", sig,
                                               "-"], data),
        }
        counts = {name: instructions(command, {**env, "KEYSEAL_GPG_SERVER": "off"} if "off" in name else env,
                                     stdin) for name, (command, stdin) in counted.items()}
        print("\n| command | instructions (callgrind) | ratio to python -c pass |")
        print("|---|---|---|")
        for name, count in counts.items():
            print(f"| {name} | {count / 1e6:.1f} M | {count / counts['python -c pass']:.2f} |")


if __name__ == "__main__":
    main()
