"""The `keyseal` entry point, and the commands it runs without loading the CLI framework.

A verification is often one of many short processes (a CI loop, a release of hundreds of files, a hook), so its
start-up is most of its cost. `keyseal verify` over OpenPGP starts hashing the data first and imports only the
verifier; everything else (other commands, `--help`, any argument this parser is not sure of) goes to the click
group in `keyseal.cli.main`, which stays the one definition of the command line: the fast parser accepts a subset
of what click accepts and gives the same result for it (tests/test_startup.py holds both paths to that).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from keyseal.errors import InputError, KeysealError, UsageError, VerificationError, unexpected

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


def default_signature_path(data: Path) -> Path:
    for suffix in (".asc", ".sig"):
        candidate = data.with_name(data.name + suffix)
        if candidate.exists():
            return candidate
    raise InputError(f"no signature given and neither {data.name}.asc nor {data.name}.sig exists")


def verify_openpgp(certs: tuple[Path, ...], file: Path, signature: Path | None, threshold: int = 1) -> None:
    """`keyseal verify` for OpenPGP: print each counted signer's fingerprint on stdout, a line per good signature
    on stderr; raise VerificationError otherwise."""
    from keyseal.inputfile import read_input
    from keyseal.openpgp import prefetch

    try:
        signature_data = read_input(signature or default_signature_path(file), "signature")
        hashes = prefetch.start(file, signature_data)  # hash the data while the verifier and certificates load
        from keyseal.cli.common import format_time, load_certificate_files
        from keyseal.openpgp.verify import verify_threshold_prefetched

        certificates = load_certificate_files(certs)
        results = verify_threshold_prefetched(certificates, hashes, signature_data, threshold)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    for result in results:
        sys.stdout.write(f"{result.fingerprint}\n")
        uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
        sys.stdout.flush()
        sys.stderr.write(f"Good signature from {uid} made {format_time(result.created)} ({result.hash_name})\n")


@dataclass
class VerifyArguments:
    certs: list[Path] = field(default_factory=list)
    threshold: int = 1
    positional: list[Path] = field(default_factory=list)


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
    from keyseal.cli.main import main as full_main

    full_main(argv)
    raise UsageError("unreachable")  # full_main always exits
