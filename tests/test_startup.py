"""Short commands stay short: `keyseal verify` runs without click, the SDKs, the audit log or any backend, and
`keyseal --help` lists every command without importing one. The fast path is held to the click definition: for
each command line both give the same output and exit status."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from keyseal._internal.cli import main as cli_main
from tests.conftest import run_keyseal

FORBIDDEN_ON_VERIFY = ("click", "boto3", "botocore", "pkcs11", "hvac", "kubernetes", "grpc", "keyseal._internal.audit",
                       "keyseal._internal.backends", "keyseal._internal.wrapping", "keyseal._internal.ca",
                       "keyseal._internal.agent", "keyseal._internal.progress",
                       "tqdm")

PROBE = """
import importlib, sys
module, function = sys.argv[1].split(":")
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    getattr(importlib.import_module(module), function)()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stdout.flush()
print("\\nMODULES", " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def imported_by(entry: str, *args: str | os.PathLike[str], cwd: Path | None = None) -> tuple[set[str], str]:
    """The modules a fresh interpreter holds after running `entry` (module:function) with `args`."""
    result = subprocess.run([sys.executable, "-c", PROBE, entry, *map(str, args)], capture_output=True, text=True,
                            timeout=60, check=False, cwd=cwd)
    head, _, modules = result.stderr.rpartition("\nMODULES ")
    assert modules, result.stderr
    return set(modules.split()), result.stdout + head


def forbidden(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("startup")
    key, cert, data = directory / "k.key", directory / "k.asc", directory / "data"
    assert run_keyseal("keys", "create", "--out", key, "--type", "ed25519").returncode == 0
    assert run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "Start", "--email", "s@example.org",
                       "-o", cert).returncode == 0
    data.write_bytes(b"x" * 1000)
    assert run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data).returncode == 0
    other = directory / "other"
    other.write_bytes(b"y" * 1000)
    return {"cert": cert, "data": data, "sig": directory / "data.asc", "other": other}


@pytest.mark.slow
def test_verify_imports_only_the_verifier(signed: dict[str, Path]) -> None:
    modules, output = imported_by("keyseal._internal.cli.quick:main", "verify", "--cert", signed["cert"],
                                  signed["data"])
    assert output.startswith(("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "A", "B", "C", "D", "E", "F")), output
    assert forbidden(modules, FORBIDDEN_ON_VERIFY) == []
    assert "keyseal._internal.openpgp.verify" in modules  # it did verify, on this path


def test_help_lists_commands_without_importing_them() -> None:
    modules, output = imported_by("keyseal._internal.cli.quick:main", "--help")
    assert "verify-release" in output and "signatures" in output
    commands = {target.split(":")[0] for target in cli_main._COMMANDS.values()}
    assert forbidden(modules, (*commands, "boto3", "keyseal._internal.openpgp", "keyseal._internal.ca",
                               "keyseal._internal.agent")) == []


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_short_help_table_matches_each_command(width: int) -> None:
    """The table `--help` lists from is each command's own short help, shortened by click's own rule."""
    assert set(cli_main._SHORT_HELP) == set(cli_main._COMMANDS)
    for name, target in cli_main._COMMANDS.items():
        module_name, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        stand_in = click.Command(name, help=cli_main._SHORT_HELP[name])
        assert stand_in.get_short_help_str(width) == command.get_short_help_str(width), name
        assert command.help is not None
        first_paragraph = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        assert first_paragraph == " ".join(cli_main._SHORT_HELP[name].split()), name


Completed = subprocess.CompletedProcess[str]


def run_both(*args: str | os.PathLike[str]) -> tuple[Completed, Completed]:
    """The same command line through the fast path (`keyseal`) and through the click group alone."""
    argv = [str(a) for a in args]
    fast = subprocess.run([sys.executable, "-c", "from keyseal._internal.cli.quick import main; main()", *argv],
                          capture_output=True, text=True, timeout=60, check=False)
    full = subprocess.run([sys.executable, "-c", "from keyseal._internal.cli.main import main; main()", *argv],
                          capture_output=True, text=True, timeout=60, check=False)
    return fast, full


@pytest.mark.slow
def test_fast_path_and_click_agree(signed: dict[str, Path], tmp_path: Path) -> None:
    cert, data, sig, other = signed["cert"], signed["data"], signed["sig"], signed["other"]
    cases: list[list[str | os.PathLike[str]]] = [
        ["verify", "--cert", cert, data],
        ["verify", "--cert", cert, data, sig],
        ["verify", f"--cert={cert}", "--format=openpgp", data],
        ["verify", data, "--cert", cert],
        ["verify", "--cert", cert, "--", data, sig],
        ["verify", "--cert", cert, other, sig],  # bad signature
        ["verify", "--cert", cert, tmp_path / "absent"],  # no signature file
        ["verify", "--cert", cert, "--threshold", "2", data],  # more than the certificates given
        ["verify", "--cert", cert, "--threshold", "1", data],
        ["verify", "--cert", tmp_path / "no-cert.asc", data],
        ["verify", "--cert", sig, data],  # a signature where a certificate goes
        ["verify", data],  # no --cert: click's own error
        ["verify", "--cert", cert, "--threshold", "0", data],
        ["verify", "--cert", cert, "--bogus", data],
        ["verify", "--cert", cert, data, sig, sig],
    ]
    for case in cases:
        fast, full = run_both(*case)
        assert (fast.returncode, fast.stdout, fast.stderr) == (full.returncode, full.stdout, full.stderr), case
    good, _ = run_both(*cases[0])
    assert good.returncode == 0 and len(good.stdout.split()) == 1
    bad, _ = run_both(*cases[5])
    assert bad.returncode == 1 and bad.stderr.startswith("keyseal: error: ")


def test_keyseal_gpg_verify_imports_only_the_verifier(signed: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """What git runs once per commit for `log --show-signature`: the keyring's certificates, the verifier,
    nothing of signing, key wrapping or the audit log."""
    from keyseal._internal.openpgp import keyring

    monkeypatch.setenv("KEYSEAL_HOME", str(tmp_path / "home"))
    keyring.add_certificate(signed["cert"].read_bytes(), str(signed["cert"]))
    modules, output = imported_by("keyseal._internal.cli.gpgcompat:main", "--status-fd=1", "--verify", signed["sig"],
                                  signed["data"])
    assert "[GNUPG:] GOODSIG" in output, output
    assert forbidden(modules, FORBIDDEN_ON_VERIFY) == []
