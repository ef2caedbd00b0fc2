"""The `keyseal` entry point, and the commands it runs without loading the CLI framework.

A verification is often one of many short processes (a CI loop, a release of hundreds of files, a hook), so its
start-up is most of its cost. `keyseal verify` over OpenPGP starts hashing the data first and imports only the
verifier; everything else (other commands, `--help`, any argument this parser is not sure of) goes to the click
group in `cli.main`, which stays the one definition of the command line: the fast parser accepts a subset
of what click accepts and gives the same result for it (tests/test_startup.py holds both paths to that).
`keyseal --help` is rendered from the command table without click (keyseal._internal.cli.fasthelp). Paths are text here,
spelt as pathlib spells them (pathtext): importing pathlib would cost a tenth of a verification's start-up.
"""

from __future__ import annotations

import os
import sys

from keyseal._internal.cli.guard import run_guarded
from keyseal._internal.cli.shortlived import ShortLived
from keyseal._internal.pathtext import path_text
from keyseal._internal.timetext import format_time
from keyseal.errors import KeysealError, OutputExistsError, UsageError, VerificationError

# Not `typing.TYPE_CHECKING`: `keyseal --help` imports no typing (it pulls in re, enum, collections, contextlib).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from typing import NoReturn

    from keyseal._internal.openpgp.verify import VerifiedSignature

    StrPath = str | os.PathLike[str]

__all__ = ["main", "verify_openpgp"]


def verify_openpgp(certs: tuple[StrPath, ...], file: StrPath, signature: StrPath | None, threshold: int = 1,
                   output: StrPath | None = None, force: bool = False) -> None:
    """`keyseal verify` for OpenPGP: print each counted signer's fingerprint on stdout, a line per good signature
    on stderr; raise VerificationError otherwise. FILE is the signed data, or (with no SIGNATURE) possibly a
    cleartext signed message, whose text `output` receives once it verifies."""

    cert_paths = tuple(path_text(os.fspath(cert)) for cert in certs)
    data_path = path_text(os.fspath(file))
    signature_path = None if signature is None else path_text(os.fspath(signature))
    if signature_path is None and _starts_cleartext(data_path):
        if threshold > 1:
            raise UsageError("--threshold applies to detached signatures: a cleartext message carries one")
        _verify_cleartext(cert_paths, data_path, output, force)
        return
    if output is not None:
        raise UsageError("--output writes the text of a cleartext signed message; FILE is not one")
    try:
        with _progress_bar(data_path):
            from keyseal._internal.openpgp.fileverify import verify_detached  # as keyseal.api.verify_file

            results = verify_detached(cert_paths, data_path, signature_path, threshold)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from exc
    for result in results:
        _report(result, fingerprint=True)


_LARGE = 64 << 20  # keyseal._internal.progress.BYTES_THRESHOLD, without importing it


class _NoBar:
    """contextlib.nullcontext without importing contextlib (typing and `keyseal --help` would not need it)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress_bar(file: str) -> AbstractContextManager[None]:
    """A progress bar while a large file is hashed on a terminal, else a context that does nothing.
    keyseal._internal.progress (and tqdm) are imported only for a bar: checking costs one stat."""
    try:
        if not sys.stderr.isatty() or os.stat(file).st_size < _LARGE:
            return _NoBar()
    except (OSError, ValueError):
        return _NoBar()
    from keyseal._internal.progress import files_meter

    return files_meter([file], "verifying")




def _report(result: VerifiedSignature, fingerprint: bool, kind: str = "") -> None:
    if fingerprint:
        sys.stdout.write(f"{result.fingerprint}\n")
        sys.stdout.flush()
    uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
    sys.stderr.write(f"Good signature from {uid} made {format_time(result.created)} ({result.hash_name}{kind})\n")
    sys.stderr.flush()




def _starts_cleartext(file: str) -> bool:
    from keyseal._internal.openpgp.armor import is_cleartext

    try:
        with open(file, "rb") as handle:
            return is_cleartext(handle.read(256))
    except OSError:
        return False  # the detached path reports the missing or unreadable file


def _verify_cleartext(certs: tuple[str, ...], file: str, output: StrPath | None, force: bool) -> None:
    from keyseal._internal.inputfile import read_input
    from keyseal._internal.openpgp.verify import verify_cleartext

    try:
        from keyseal._internal.openpgp.fileverify import load_certificates_from

        certificates = load_certificates_from(certs)
        result, message = verify_cleartext(certificates, read_input(file, "signed message"))
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from exc
    if output is not None and str(output) == "-":
        sys.stdout.buffer.write(message.text)
        sys.stdout.buffer.flush()
    elif output is not None:
        from pathlib import Path

        from keyseal._internal.atomic import write_atomic

        target = Path(output)
        if target.exists() and not force:
            raise OutputExistsError(f"{target} exists: refusing to overwrite it (use --force)")
        write_atomic(target, message.text, mode=0o644)
    _report(result, fingerprint=output is None or str(output) != "-", kind=", cleartext")


class VerifyArguments:
    """What the fast parser read (a plain class: building a dataclass costs start-up time on this path)."""

    __slots__ = ("certs", "positional", "threshold")

    def __init__(self) -> None:
        self.certs: list[str] = []
        self.threshold = 1
        self.positional: list[str] = []


def parse_verify(args: list[str]) -> VerifyArguments | None:
    """`verify` arguments the fast path is sure of: `--cert`, `--threshold`, `--format openpgp`, FILE [SIG].
    None for anything else (help, other formats, unknown or malformed options), which click then handles."""
    parsed = VerifyArguments()
    index = 0
    options_done = False
    while index < len(args):
        arg = args[index]
        if options_done or not arg.startswith("-") or arg == "-":
            parsed.positional.append(path_text(arg))
        elif arg == "--":
            options_done = True
        else:
            name, eq, inline = arg.partition("=")
            if name not in ("--cert", "--threshold", "--format"):
                return None
            if eq:
                value = inline
            else:
                index += 1
                if index >= len(args) or args[index].startswith("-"):
                    return None
                value = args[index]
            if name == "--cert":
                if not value:
                    return None
                parsed.certs.append(path_text(value))
            elif name == "--format":
                if value != "openpgp":
                    return None
            elif not value.isascii() or not value.isdigit() or int(value) < 1:
                return None
            else:
                parsed.threshold = int(value)
        index += 1
    if not parsed.certs or not 1 <= len(parsed.positional) <= 2 or any(not str(p) for p in parsed.positional):
        return None
    return parsed


def _print_group_help() -> None:
    from keyseal._internal.cli.fasthelp import group_help

    sys.stdout.write(group_help())
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `keyseal`."""
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]):
        with ShortLived():
            run_guarded(_print_group_help)
    if args[:1] == ["verify"]:
        parsed = parse_verify(args[1:])
        if parsed is not None:
            signature = parsed.positional[1] if len(parsed.positional) == 2 else None
            with ShortLived():
                run_guarded(lambda: verify_openpgp(tuple(parsed.certs), parsed.positional[0], signature,
                                                   parsed.threshold))
    from keyseal._internal.cli.main import main as full_main

    full_main(argv)
    raise UsageError("unreachable")  # full_main always exits
