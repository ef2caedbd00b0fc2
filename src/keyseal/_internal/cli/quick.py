"""The `keyseal` entry point, and the commands it runs without loading the CLI framework.

A verification is often one of many short processes (a CI loop, a release of hundreds of files, a hook), so its
start-up is most of its cost. `keyseal verify` over OpenPGP starts hashing the data first and imports only the
verifier; everything else (other commands, `--help`, any argument this parser is not sure of) goes to the click
group in `cli.main`, which stays the one definition of the command line: the fast parser accepts a subset
of what click accepts and gives the same result for it (tests/test_startup.py holds both paths to that).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NoReturn

from keyseal.errors import KeysealError, OutputExistsError, UsageError, VerificationError, unexpected

__all__ = ["fail", "main", "run_guarded", "verify_openpgp"]


def fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"keyseal: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def run_guarded(run: Callable[[], object]) -> NoReturn:
    """Run a command; every expected failure is one line on stderr and a non-zero exit, never a traceback."""
    try:
        rv = run()
    except KeysealError as exc:
        fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(141)
    except Exception as exc:
        if os.environ.get("KEYSEAL_DEBUG"):
            raise
        fail(unexpected(exc), 70)
    sys.exit(rv if isinstance(rv, int) else 0)


def verify_openpgp(certs: tuple[Path, ...], file: Path, signature: Path | None, threshold: int = 1,
                   output: Path | None = None, force: bool = False) -> None:
    """`keyseal verify` for OpenPGP: print each counted signer's fingerprint on stdout, a line per good signature
    on stderr; raise VerificationError otherwise. FILE is the signed data, or (with no SIGNATURE) possibly a
    cleartext signed message, whose text `output` receives once it verifies. The detached case is
    keyseal.api.verify_file."""
    if signature is None and _starts_cleartext(file):
        if threshold > 1:
            raise UsageError("--threshold applies to detached signatures: a cleartext message carries one")
        _verify_cleartext(certs, file, output, force)
        return
    if output is not None:
        raise UsageError("--output writes the text of a cleartext signed message; FILE is not one")
    try:
        with _progress_bar(file):
            from keyseal._internal.api import verify_file

            verification = verify_file(file, signature, certificates=certs, threshold=threshold)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    for good in verification.signatures:
        _report(good.fingerprint, good.user_id, good.created, good.hash_name, fingerprint=True)


_LARGE = 64 << 20  # keyseal._internal.progress.BYTES_THRESHOLD, without importing it


def _progress_bar(file: Path) -> AbstractContextManager[None]:
    """A progress bar while a large file is hashed on a terminal, else a context that does nothing.
    keyseal._internal.progress (and tqdm) are imported only for a bar: checking costs one stat."""
    try:
        if not sys.stderr.isatty() or os.stat(file).st_size < _LARGE:
            return nullcontext()
    except (OSError, ValueError):
        return nullcontext()
    from keyseal._internal.progress import files_meter

    return files_meter([file], "verifying")


def _report(signer: str, user_id: str, created: int, hash_name: str, fingerprint: bool, kind: str = "") -> None:
    from keyseal._internal.cli.common import format_time

    if fingerprint:
        sys.stdout.write(f"{signer}\n")
        sys.stdout.flush()
    sys.stderr.write(f"Good signature from {user_id} made {format_time(created)} ({hash_name}{kind})\n")
    sys.stderr.flush()


def _starts_cleartext(file: Path) -> bool:
    from keyseal._internal.openpgp.cleartext import is_cleartext

    try:
        with file.open("rb") as handle:
            return is_cleartext(handle.read(256))
    except OSError:
        return False  # the detached path reports the missing or unreadable file


def _verify_cleartext(certs: tuple[Path, ...], file: Path, output: Path | None, force: bool) -> None:
    from keyseal._internal.cli.common import load_certificate_files
    from keyseal._internal.inputfile import read_input
    from keyseal._internal.openpgp.verify import verify_cleartext

    try:
        certificates = load_certificate_files(certs)
        result, message = verify_cleartext(certificates, read_input(file, "signed message"))
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    if output is not None and str(output) == "-":
        sys.stdout.buffer.write(message.text)
        sys.stdout.buffer.flush()
    elif output is not None:
        from keyseal._internal.atomic import write_atomic

        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists: refusing to overwrite it (use --force)")
        write_atomic(output, message.text, mode=0o644)
    uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
    _report(result.fingerprint, uid, result.created, result.hash_name, fingerprint=output is None or str(output) != "-",
            kind=", cleartext")


class VerifyArguments:
    """What the fast parser read (a plain class: building a dataclass costs start-up time on this path)."""

    __slots__ = ("certs", "positional", "threshold")

    def __init__(self) -> None:
        self.certs: list[Path] = []
        self.threshold = 1
        self.positional: list[Path] = []


def parse_verify(args: list[str]) -> VerifyArguments | None:
    """`verify` arguments the fast path is sure of: `--cert`, `--threshold`, `--format openpgp`, FILE [SIG].
    None for anything else (help, other formats, unknown or malformed options), which click then handles."""
    parsed = VerifyArguments()
    index = 0
    options_done = False
    while index < len(args):
        arg = args[index]
        if options_done or not arg.startswith("-") or arg == "-":
            parsed.positional.append(Path(arg))
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
                parsed.certs.append(Path(value))
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


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `keyseal`."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["verify"]:
        parsed = parse_verify(args[1:])
        if parsed is not None:
            signature = parsed.positional[1] if len(parsed.positional) == 2 else None
            run_guarded(lambda: verify_openpgp(tuple(parsed.certs), parsed.positional[0], signature,
                                               parsed.threshold))
    from keyseal._internal.cli.main import main as full_main

    full_main(argv)
    raise UsageError("unreachable")  # full_main always exits
