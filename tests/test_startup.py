"""Short commands stay short: `keyseal verify` runs without click, the SDKs, the audit log or any backend, and
`keyseal --help` lists every command without importing one. The fast path is held to the click definition: for
each command line both give the same output and exit status."""

from __future__ import annotations

import gc
import hashlib
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import click
import pytest
from click.utils import _make_default_short_help

from keyseal._internal.cli import commands, fasthelp
from keyseal._internal.cli import main as cli_main
from keyseal._internal.cli.shortlived import ShortLived
from keyseal._internal.frozen import Frozen, Record
from keyseal._internal.openpgp import digests
from keyseal._internal.openpgp.keyring import _suffix
from keyseal._internal.pathtext import join, name_of, path_text
from tests.conftest import run_keyseal

FORBIDDEN_ON_VERIFY = ("click", "boto3", "botocore", "pkcs11", "hvac", "kubernetes", "grpc", "keyseal._internal.audit",
                       "keyseal._internal.backends", "keyseal._internal.wrapping", "keyseal._internal.ca",
                       "keyseal._internal.agent", "keyseal._internal.progress",
                       "tqdm",
                       # what each once cost a verification's start-up (benchmarks/README.md), kept out since:
                       "dataclasses", "inspect", "pathlib", "urllib", "ipaddress", "tempfile", "shutil", "datetime",
                       "hashlib", "_hashlib", "keyseal._internal.atomic", "keyseal.signer",
                       "keyseal._internal.cli.common",
                       "keyseal._internal.openpgp.stream")
# An Ed25519 signature needs none of cryptography's other public-key modules.
FORBIDDEN_FOR_ED25519 = tuple(f"cryptography.hazmat.primitives.asymmetric.{name}" for name in ("ec", "rsa", "padding"))
# `keyseal --help` is a table: no CLI framework, and none of the stdlib modules typing pulls in.
FORBIDDEN_ON_HELP = ("click", "typing", "re", "enum", "pathlib", "textwrap", "shutil", "contextlib",
                     "keyseal._internal.openpgp",
                     "cryptography")

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
    assert forbidden(modules, (*FORBIDDEN_ON_VERIFY, *FORBIDDEN_FOR_ED25519, "threading", "json")) == []
    assert "keyseal._internal.openpgp.verify" in modules  # it did verify, on this path


def test_a_large_file_is_hashed_beside_the_verifier_start(signed: dict[str, Path], tmp_path: Path) -> None:
    """From 1 MiB the data is hashed in a thread (hashlib) while the verifier loads; below, in the caller's thread
    through cryptography's OpenSSL (no threading, no hashlib): both verify."""
    from keyseal._internal.openpgp.prefetch import BACKGROUND_FROM

    large = tmp_path / "large"
    large.write_bytes(b"z" * BACKGROUND_FROM)
    assert run_keyseal("sign", "--key", f"file:{signed['cert'].with_suffix('.key')}", "--cert", signed["cert"],
                       large).returncode == 0
    fingerprint = run_keyseal("verify", "--cert", signed["cert"], signed["data"]).stdout.strip()
    assert len(fingerprint) == 40
    modules, output = imported_by("keyseal._internal.cli.quick:main", "verify", "--cert", signed["cert"], large)
    assert output.split("\n")[0] == fingerprint, output
    assert {"threading", "hashlib"} <= modules
    modules, output = imported_by("keyseal._internal.cli.quick:main", "verify", "--cert", signed["cert"],
                                  signed["data"])
    assert output.split("\n")[0] == fingerprint, output
    assert not {"threading", "hashlib"} & modules


def test_help_lists_commands_without_importing_them() -> None:
    modules, output = imported_by("keyseal._internal.cli.quick:main", "--help")
    assert "verify-release" in output and "signatures" in output
    command_modules = {target.split(":")[0] for target in cli_main._COMMANDS.values()}
    assert forbidden(modules, (*command_modules, *FORBIDDEN_ON_HELP, "boto3", "keyseal._internal.ca",
                               "keyseal._internal.agent")) == []


@pytest.mark.parametrize("width", range(50, 79))
def test_fast_help_is_clicks_help(width: int) -> None:
    """keyseal._internal.cli.fasthelp renders exactly what click renders for the group, at every width click uses (the
    terminal's columns capped at 80, less 2, at least 50)."""
    context = click.Context(cli_main.cli, info_name="keyseal", terminal_width=width, **cli_main.cli.context_settings)
    assert fasthelp.group_help(width=width) == cli_main.cli.get_help(context) + "\n"


@pytest.mark.parametrize("columns", ["", "20", "60", "79", "80", "200", "0", "-5", "wide"])
def test_keyseal_help_is_the_same_with_and_without_click(columns: str) -> None:
    """Whole processes: `keyseal --help` (the fast path) and the click group print the same, for each COLUMNS
    (empty: unset, and not a terminal, so 80)."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    runs = [subprocess.run([sys.executable, "-c", f"from keyseal._internal.cli.{module} import main; main()", flag],
                           capture_output=True, text=True, timeout=60, check=False, env=env)
            for module in ("quick", "main") for flag in ("--help", "-h")]
    assert {(run.returncode, run.stdout, run.stderr) for run in runs} == {(0, runs[0].stdout, "")}
    assert runs[0].stdout.startswith("Usage: keyseal [OPTIONS] COMMAND [ARGS]...\n")


def test_fast_help_shortens_and_wraps_as_click() -> None:
    """The two textwrap rules the fast help re-implements, against click's own functions, for every text in the
    table at every width."""
    from click.formatting import wrap_text

    texts = [commands.GROUP_HELP, commands.VERBOSE_HELP, commands.QUIET_HELP, *commands.SHORT_HELP.values(),
             "a-b ab-cd abc-de-f x--y (--option) self-signature 0-9 X.509-SVIDs", "averyveryverylongwordindeed x"]
    for text in texts:
        for limit in range(1, 121):
            assert fasthelp.short_help(text, limit) == _make_default_short_help(text, limit).strip(), (text, limit)
        for width in range(8, 101):
            for indent in ("", "  "):
                expected = wrap_text(text, width, initial_indent=indent, subsequent_indent=indent,
                                     preserve_paragraphs=True)
                assert "\n".join(fasthelp.wrap(text, width, indent, indent)) == expected, (text, width, indent)


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
        # paths as typed, and as pathlib spells them in messages (keyseal._internal.pathtext)
        ["verify", "--cert", f"{cert.parent}//./{cert.name}", f"{data}/"],
        ["verify", "--cert", cert, f"{tmp_path}//./absent//"],
        ["verify", "--cert", f"{tmp_path}/./x/../no-cert.asc", data],
        ["verify", "--cert", cert, "."],
        ["verify", "--cert", cert, f"//{str(tmp_path).lstrip('/')}/absent"],
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
    """What git runs once per commit for `log --show-signature` (as git calls it): the keyring's certificates,
    the verifier, nothing of signing, key wrapping or the audit log. The first call parses the keyring and writes
    its cache (openpgp.keyring_cache: pathlib and atomic then); every later call reads the cache."""
    from keyseal._internal.openpgp import keyring

    monkeypatch.setenv("KEYSEAL_HOME", str(tmp_path / "home"))
    keyring.add_certificate(signed["cert"].read_bytes(), str(signed["cert"]))
    args = ("--keyid-format=long", "--status-fd=1", "--verify", signed["sig"], signed["data"])
    first, output = imported_by("keyseal._internal.cli.gpgcompat:main", *args)
    assert "[GNUPG:] GOODSIG" in output, output
    assert keyring.keyring_cache_path().is_file()
    assert forbidden(first, ("click", "boto3", "botocore", "pkcs11", "hvac", "kubernetes", "grpc",
                             "keyseal._internal.audit",
                             "keyseal._internal.backends", "keyseal._internal.wrapping", "dataclasses")) == []
    modules, output = imported_by("keyseal._internal.cli.gpgcompat:main", *args)
    assert "[GNUPG:] GOODSIG" in output, output
    assert forbidden(modules, (*FORBIDDEN_ON_VERIFY, *FORBIDDEN_FOR_ED25519, "threading", "mmap", "json")) == []


def test_keyseal_ssh_keygen_becomes_ssh_keygen_having_loaded_nothing() -> None:
    """git runs `keyseal-ssh-keygen -Y verify` (or find-principals) once per commit for SSH signatures; all it does
    is become OpenSSH's ssh-keygen, so it loads nothing first (tests/test_git_signing.py verifies through it)."""
    probe = ("import os, sys\n"
             "def execv(program, argv):\n"
             "    print('EXEC', program, *argv[1:])\n"
             "    print('MODULES', *sorted(sys.modules))\n"
             "    sys.exit(0)\n"
             "os.execv = execv\n"
             "from keyseal._internal.cli.sshcompat import main\n"
             "main(['-Y', 'verify', '-n', 'git', '-I', 'me', '-s', 'sig'])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "KEYSEAL_SSH_KEYGEN": "/usr/bin/ssh-keygen"})
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["EXEC"] == "/usr/bin/ssh-keygen -Y verify -n git -I me -s sig", result.stderr
    modules = set(lines["MODULES"].split())
    assert forbidden(modules, (*FORBIDDEN_ON_HELP, *FORBIDDEN_ON_VERIFY, "keyseal._internal.formats", "shutil")) == []


def test_pathtext_spells_paths_as_pathlib() -> None:
    cases = ["", ".", "./", "..", "/", "//", "///", "a", "a/", "a//b", "/a/./b/", "//a", "///a/b", "a/../b",
             "./a/.", "~", "a b/c", ".asc", "a/.", "/./", "//./a/", "a/b/c/"]
    for text in cases:
        assert path_text(text) == str(PurePosixPath(text)), text
        assert name_of(text) == PurePosixPath(text).name, text
        for name in ("x", "x.asc", ".hidden"):
            assert join(path_text(text), name) == str(PurePosixPath(text) / name), (text, name)
    for name in (".asc", "a.asc", "..asc", "a.b.asc", "a.asc.", "...asc", ".a.asc", "asc", "a.", ".", "a.gpg"):
        assert _suffix(name) == PurePosixPath(name).suffix, name


class _Point(Frozen):
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: list[int] | int) -> None:
        self.x = x
        self.y = y


class _Box(Record):
    __slots__ = ("items",)

    def __init__(self, items: list[int]) -> None:
        self.items = items


def test_record_classes_compare_hash_and_freeze_as_dataclasses() -> None:
    point = _Point(1, 2)
    assert point == _Point(1, 2) and point != _Point(1, 3) and hash(point) == hash(_Point(1, 2))
    assert {point: "p"}[_Point(1, 2)] == "p"
    assert repr(point) == "_Point(x=1, y=2)"
    with pytest.raises(AttributeError):
        point.x = 5
    with pytest.raises(AttributeError):
        del point.y
    assert point.x == 1
    box = _Box([1])
    box.items = [2]  # a Record is mutable, and so unhashable
    assert box == _Box([2]) and box != _Point(1, 2)
    with pytest.raises(TypeError):
        hash(box)


def test_digests_equal_hashlib() -> None:
    for name in ("sha1", "sha224", "sha256", "sha384", "sha512"):
        digest = digests.new(name, b"abc")
        copy = digest.copy()
        digest.update(b"def")
        assert digest.digest() == digest.digest() == hashlib.new(name, b"abcdef").digest()
        assert copy.hexdigest() == hashlib.new(name, b"abc").hexdigest()
    with pytest.raises(ValueError, match="md5"):
        digests.new("md5")


def test_short_lived_freezes_what_it_built_and_restores_the_collector() -> None:
    assert gc.isenabled()
    try:
        with ShortLived():
            assert not gc.isenabled()
            built = [object() for _ in range(10)]
        assert gc.isenabled() and gc.get_freeze_count() > len(built)
    finally:
        gc.unfreeze()
