"""`keyseal-gpg`: the part of gpg's command line that git uses, so keyseal can be git's `gpg.program`.

  sign:    keyseal-gpg --status-fd=2 -bsau KEY        data on stdin, the armored signature on stdout
  verify:  keyseal-gpg --status-fd=1 --verify SIG -   data on stdin; GOODSIG / BADSIG / ERRSIG status lines

KEY is a key URI, or a fingerprint, long key ID or email address the keyseal keyring maps to one. Status lines
follow gpg's (`[GNUPG:] SIG_CREATED ...`, `GOODSIG`, `VALIDSIG`, `TRUST_FULLY`), since git parses them; the human
messages go to stderr. Exit status as gpg: 0 good, 1 bad signature, 2 any other error.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from keyseal import __version__
from keyseal.errors import KeysealError, UsageError, unexpected

PROG = "keyseal-gpg"
_IGNORED_FLAGS = frozenset({"--batch", "--no-tty", "--yes", "--quiet", "-q", "--verbose", "-v", "--no-verbose",
                            "--no-auto-key-retrieve", "--no-permission-warning"})
_IGNORED_WITH_VALUE = frozenset({"--keyid-format", "--trust-model", "--pinentry-mode", "--homedir"})
_SHORT_FLAGS = {"b": "detach", "s": "sign", "a": "armor", "q": None, "v": None}
_LONG_FLAGS = {"--detach-sign": "detach", "--sign": "sign", "--armor": "armor", "--verify": "verify",
               "--version": "version"}


@dataclass
class Arguments:
    modes: set[str] = field(default_factory=set)
    local_user: str | None = None
    status_fd: int | None = None
    positional: list[str] = field(default_factory=list)


def parse_arguments(argv: list[str]) -> Arguments:
    """gpg-style options: bundled short flags (`-bsau KEY`), `--opt=value` and `--opt value`."""
    args = Arguments()
    index = 0

    def value_of(option: str, inline: str | None) -> str:
        nonlocal index
        if inline is not None:
            return inline
        index += 1
        if index >= len(argv):
            raise UsageError(f"{option} needs a value")
        return argv[index]

    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            args.positional += argv[index + 1 :]
            break
        if arg.startswith("--"):
            name, eq, inline = arg.partition("=")
            inline_value = inline if eq else None
            if name in _LONG_FLAGS and inline_value is None:
                args.modes.add(_LONG_FLAGS[name])
            elif name in ("--local-user", "--default-key"):
                args.local_user = value_of(name, inline_value)
            elif name == "--status-fd":
                args.status_fd = _fd(value_of(name, inline_value))
            elif name in _IGNORED_WITH_VALUE:
                value_of(name, inline_value)
            elif arg not in _IGNORED_FLAGS:
                raise UsageError(f"{PROG} does not support {name}: it signs (-bsau KEY) and verifies "
                                 f"(--verify SIG [DATA]) as git asks gpg to")
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            for position, letter in enumerate(letters):
                if letter == "u":
                    rest = letters[position + 1 :]
                    args.local_user = value_of("-u", rest or None)
                    break
                if letter not in _SHORT_FLAGS:
                    raise UsageError(f"{PROG} does not support -{letter}: it signs (-bsau KEY) and verifies "
                                     f"(--verify SIG [DATA]) as git asks gpg to")
                mode = _SHORT_FLAGS[letter]
                if mode is not None:
                    args.modes.add(mode)
        else:
            args.positional.append(arg)
        index += 1
    return args


def _fd(text: str) -> int:
    if not text.isdigit():
        raise UsageError(f"--status-fd needs a file descriptor number, not {text[:20]!r}")
    return int(text)


class Status:
    """gpg's machine-readable status lines, written to the descriptor git named."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def emit(self, keyword: str, *fields: object) -> None:
        if self.fd is None:
            return
        line = " ".join(["[GNUPG:]", keyword, *(_escape(str(f)) for f in fields)]) + "\n"
        if self.fd in (1, 2):
            stream = sys.stdout if self.fd == 1 else sys.stderr
            stream.flush()
        os.write(self.fd, line.encode("utf-8", errors="replace"))


def _escape(text: str) -> str:
    """Percent-escape as gpg does, so a user ID can never start a status line of its own."""
    return "".join(f"%{ord(ch):02X}" if ch == "%" or ord(ch) < 0x20 else ch for ch in text)


def _say(message: str) -> None:
    shown = "".join(ch if ch.isprintable() else "?" for ch in message)
    sys.stderr.write(f"{PROG}: {shown}\n")
    sys.stderr.flush()


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def run_sign(args: Arguments, status: Status) -> int:
    from keyseal.gitsign import sign

    if "detach" not in args.modes:
        raise UsageError(f"{PROG} makes detached signatures only: pass -b (git passes -bsau KEY)")
    if args.positional:
        raise UsageError(f"{PROG} signs standard input only (as git uses it), not files")
    if not args.local_user:
        raise UsageError("name the key with -u KEY: set git's user.signingkey to a key URI or a fingerprint "
                         "registered with keyseal git-setup")
    data = sys.stdin.buffer.read()
    signature = sign(args.local_user, data, armored="armor" in args.modes)
    status.emit("KEY_CONSIDERED", signature.fingerprint, 0)
    status.emit("BEGIN_SIGNING", f"H{signature.hash_id}")
    sys.stdout.buffer.write(signature.data)
    sys.stdout.buffer.flush()
    status.emit("SIG_CREATED", "D", signature.algorithm, signature.hash_id, "00", signature.created,
                signature.fingerprint)
    return 0


def run_verify(args: Arguments, status: Status) -> int:
    from keyseal.gitsign import verify
    from keyseal.inputfile import read_input

    if not 1 <= len(args.positional) <= 2:
        raise UsageError(f"usage: {PROG} --verify SIGNATURE [DATA|-]")
    signature_data = read_input(Path(args.positional[0]), "signature")
    source = args.positional[1] if len(args.positional) == 2 else "-"
    data = sys.stdin.buffer.read() if source == "-" else read_input(Path(source), "data file")
    result = verify(signature_data, data)
    status.emit("NEWSIG")
    _say(f"Signature made {_utc(result.created)}")
    _say(f"               using key {result.issuer_fingerprint or result.key_id}")
    if result.outcome == "no-key":
        status.emit("ERRSIG", result.key_id, result.algorithm, result.hash_id, "00", result.created, 9,
                    result.issuer_fingerprint or "-")
        status.emit("NO_PUBKEY", result.key_id)
        _say(f"Can't check signature: {result.reason}")
        return 2
    if result.outcome == "bad":
        status.emit("BADSIG", result.key_id, result.user_id)
        _say(result.reason if result.reason.startswith("BAD") else
             f"BAD signature from \"{result.user_id}\": {result.reason}")
        return 1
    assert result.certificate is not None and result.signing_fingerprint is not None
    status.emit("GOODSIG", result.key_id, result.user_id)
    status.emit("VALIDSIG", result.signing_fingerprint, time.strftime("%Y-%m-%d", time.gmtime(result.created)),
                result.created, 0, 4, 0, result.algorithm, result.hash_id, "00", result.certificate.fingerprint)
    status.emit("TRUST_FULLY", 0, "pgp")
    _say(f"Good signature from \"{result.user_id}\" [keyseal keyring]")
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `keyseal-gpg`; errors are one `keyseal: error:` line on stderr and exit status 2."""
    status = Status(None)
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        status = Status(args.status_fd)
        if "version" in args.modes:
            sys.stdout.write(f"{PROG} (keyseal) {__version__}\n")
            sys.exit(0)
        if "verify" in args.modes:
            code = run_verify(args, status)
        elif "sign" in args.modes:
            code = run_sign(args, status)
        else:
            raise UsageError(f"{PROG} signs (-bsau KEY) and verifies (--verify SIG [DATA]); nothing else")
    except KeysealError as exc:
        sys.stderr.write(f"keyseal: error: {exc.message}\n")
        code = 1 if exc.exit_code == 1 else 2
    except BrokenPipeError:
        code = 2
    except Exception as exc:
        if os.environ.get("KEYSEAL_DEBUG"):
            raise
        sys.stderr.write(f"keyseal: error: {unexpected(exc)}\n")
        code = 2
    sys.exit(code)
