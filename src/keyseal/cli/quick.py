"""The `keyseal` entry point, and the commands it runs without loading the CLI framework.

A verification is often one of many short processes (a CI loop, a release of hundreds of files, a hook), so its
start-up is most of its cost. `keyseal verify` over OpenPGP starts hashing the data first and imports only the
verifier; everything else (other commands, `--help`, any argument this parser is not sure of) goes to the click
group in `keyseal.cli.main`, which stays the one definition of the command line: the fast parser accepts a subset
of what click accepts and gives the same result for it (tests/test_startup.py holds both paths to that).
`keyseal --help` is rendered from the command table without click (keyseal.cli.fasthelp). Paths are text here,
spelt as pathlib spells them (keyseal.pathtext): importing pathlib would cost a tenth of a verification's start-up.
"""

from __future__ import annotations

import os
import sys

from keyseal.cli.shortlived import ShortLived
from keyseal.errors import InputError, KeysealError, OutputExistsError, UsageError, VerificationError, unexpected
from keyseal.pathtext import name_of, path_text

# Not `typing.TYPE_CHECKING`: `keyseal --help` imports no typing (it pulls in re, enum, collections, contextlib).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from typing import NoReturn

    from keyseal.openpgp.cert import Certificate
    from keyseal.openpgp.verify import VerifiedSignature

    StrPath = str | os.PathLike[str]

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


def default_signature_path(data: StrPath, option: str = "signature") -> str:
    """DATA.asc, else DATA.sig: where keyseal and gpg put a detached signature when none is named (`option` is
    what the user could have named it with, for the error)."""
    text = path_text(os.fspath(data))
    name = name_of(text)
    if not name:
        raise InputError(f"{text} is a directory, not a file")
    for suffix in (".asc", ".sig"):
        candidate = text + suffix
        if os.path.exists(candidate):
            return candidate
    raise InputError(f"no {option} given and neither {name}.asc nor {name}.sig exists")


def verify_openpgp(certs: tuple[StrPath, ...], file: StrPath, signature: StrPath | None, threshold: int = 1,
                   output: StrPath | None = None, force: bool = False) -> None:
    """`keyseal verify` for OpenPGP: print each counted signer's fingerprint on stdout, a line per good signature
    on stderr; raise VerificationError otherwise. FILE is the signed data, or (with no SIGNATURE) possibly a
    cleartext signed message, whose text `output` receives once it verifies."""
    from keyseal.inputfile import read_input

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
    signature_data = b""
    try:
        with _progress_bar(data_path):
            from keyseal.openpgp import prefetch

            signature_data = read_input(signature_path or default_signature_path(data_path), "signature")
            hashes = prefetch.start(data_path, signature_data)  # hashing starts while the verifier loads
            from keyseal.openpgp.verify import verify_threshold_prefetched

            results = verify_threshold_prefetched(_load_certificates(cert_paths), hashes, signature_data, threshold)
    except VerificationError:
        text_results = _text_mode(cert_paths, data_path, signature_data, threshold)
        if text_results is None:
            raise
        results = text_results
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    for result in results:
        _report(result, fingerprint=True)


_LARGE = 64 << 20  # keyseal.progress.BYTES_THRESHOLD, without importing it


class _NoBar:
    """contextlib.nullcontext without importing contextlib (typing and `keyseal --help` would not need it)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress_bar(file: str) -> AbstractContextManager[None]:
    """A progress bar while a large file is hashed on a terminal, else a context that does nothing.
    keyseal.progress (and tqdm) are imported only for a bar: checking costs one stat."""
    try:
        if not sys.stderr.isatty() or os.stat(file).st_size < _LARGE:
            return _NoBar()
    except (OSError, ValueError):
        return _NoBar()
    from keyseal.progress import files_meter

    return files_meter([file], "verifying")


def _load_certificates(paths: tuple[str, ...]) -> list[Certificate]:
    """keyseal.cli.common.load_certificate_files, without that module's imports."""
    from keyseal.inputfile import read_input
    from keyseal.openpgp.cert import load_certificates

    certificates: list[Certificate] = []
    for path in paths:
        certificates += load_certificates(read_input(path, "certificate"), path)
    return certificates


def format_time(seconds: int) -> str:
    """keyseal.cli.common.format_time (UTC, RFC 3339), without importing datetime."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _report(result: VerifiedSignature, fingerprint: bool, kind: str = "") -> None:
    if fingerprint:
        sys.stdout.write(f"{result.fingerprint}\n")
        sys.stdout.flush()
    uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
    sys.stderr.write(f"Good signature from {uid} made {format_time(result.created)} ({result.hash_name}{kind})\n")
    sys.stderr.flush()


def _text_mode(certs: tuple[str, ...], file: str, signature_data: bytes,
               threshold: int) -> list[VerifiedSignature] | None:
    """A text-mode (0x01) detached signature (`gpg -abst`) is checked over the file with CR LF line endings. Only
    tried once the binary check failed, so the usual path keeps hashing while the verifier loads."""
    from keyseal.inputfile import read_input
    from keyseal.openpgp.signature import SIG_TEXT
    from keyseal.openpgp.verify import parse_detached, verify_threshold_bytes

    try:
        if not signature_data or any(sig.sig_type != SIG_TEXT for sig in parse_detached(signature_data)):
            return None
    except KeysealError:
        return None
    try:
        return verify_threshold_bytes(_load_certificates(certs), read_input(file, "file"), signature_data,
                                      threshold, text_mode=True)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None


def _starts_cleartext(file: str) -> bool:
    from keyseal.openpgp.armor import is_cleartext

    try:
        with open(file, "rb") as handle:
            return is_cleartext(handle.read(256))
    except OSError:
        return False  # the detached path reports the missing or unreadable file


def _verify_cleartext(certs: tuple[str, ...], file: str, output: StrPath | None, force: bool) -> None:
    from keyseal.inputfile import read_input
    from keyseal.openpgp.verify import verify_cleartext

    try:
        certificates = _load_certificates(certs)
        result, message = verify_cleartext(certificates, read_input(file, "signed message"))
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    if output is not None and str(output) == "-":
        sys.stdout.buffer.write(message.text)
        sys.stdout.buffer.flush()
    elif output is not None:
        from pathlib import Path

        from keyseal.atomic import write_atomic

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
    from keyseal.cli.fasthelp import group_help

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
    from keyseal.cli.main import main as full_main

    full_main(argv)
    raise UsageError("unreachable")  # full_main always exits
