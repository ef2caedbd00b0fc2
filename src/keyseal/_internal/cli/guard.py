"""How every keyseal entry point (`keyseal`, `keyseal-gpg`, `keyseal-ssh-keygen`) ends a failed run: one line on
stderr and a non-zero exit, never a traceback.

keyseal's errors keep their cause (`raise ... from exc`): the SDK or system error underneath is what a maintainer
needs, and what a user should not have to read. With `KEYSEAL_DEBUG=1` (or `keyseal -v`) the line is followed by
that chain of causes, and an exception keyseal did not raise on purpose by its whole traceback. Each entry point
keeps its own exit codes (keyseal-gpg answers as gpg does), named in an `ExitCodes`.

This module is on the short paths (`keyseal verify`, `keyseal-gpg --verify`): it imports only `os` and `sys`
until something fails.
"""

from __future__ import annotations

import os
import sys

from keyseal.errors import KeysealError, one_line, unexpected

# Not `typing.TYPE_CHECKING`: the short paths import no typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

__all__ = ["DEBUG_ENV", "KEYSEAL", "ExitCodes", "cause_lines", "debugging", "fail", "report", "run_guarded",
           "show_causes"]

DEBUG_ENV = "KEYSEAL_DEBUG"
PREFIX = "keyseal: error: "
_verbose = False


class ExitCodes:
    """An entry point's exit statuses: for a keyseal error (from its own `exit_code`), an unexpected exception,
    a reader that went away (broken pipe) and an interrupt."""

    __slots__ = ("broken_pipe", "error", "interrupted", "unexpected")

    def __init__(self, error: Callable[[KeysealError], int], unexpected: int, broken_pipe: int,
                 interrupted: int = 130) -> None:
        self.error = error
        self.unexpected = unexpected
        self.broken_pipe = broken_pipe
        self.interrupted = interrupted


KEYSEAL = ExitCodes(lambda exc: exc.exit_code, unexpected=70, broken_pipe=141)


def show_causes() -> None:
    """`keyseal -v`: errors show their causes too, as with KEYSEAL_DEBUG=1."""
    global _verbose  # noqa: PLW0603 - one switch for the life of the process
    _verbose = True


def debugging() -> bool:
    return _verbose or bool(os.environ.get(DEBUG_ENV))


def cause_lines(exc: BaseException) -> list[str]:
    """`caused by: <type>: <text>` for each exception underneath `exc` (its __cause__, else the __context__ it
    was raised in unless that was suppressed), innermost last; a codec error without the bytes it quotes; a cycle
    is cut, and a keyseal error that repeats the words of one above it is left out."""
    lines: list[str] = []
    seen = {id(exc)}
    said = {exc.message} if isinstance(exc, KeysealError) else set()
    current: BaseException | None = exc
    while current is not None:
        below = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if below is None or id(below) in seen:
            break
        seen.add(id(below))
        current = below
        if isinstance(below, KeysealError):
            if below.message in said:  # re-raised as another type with the same words: nothing new to show
                continue
            said.add(below.message)
        kind = type(below)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        text = one_line(_text(below))
        lines.append(f"  caused by: {name}: {text}" if text else f"  caused by: {name}")
    return lines


def _text(exc: BaseException) -> str:
    """What a cause says, without what it may quote of a secret. A codec error names the byte or character it
    stopped at, and what it was reading may be a PIN, a token or a decrypted key: its codec and reason only. An
    HTTP library that refuses a header quotes its value, and the header may carry a token (X-Vault-Token, an AWS
    session token, a bearer token): the text stops at the quote."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, UnicodeError) and isinstance(reason, str):
        return f"{getattr(exc, 'encoding', 'the')} codec: {reason}"
    text = str(exc)
    if "header" in text.lower():
        import re

        text = re.sub(r"(?is)(\bheader\b[^'\"]*?)\s*(?:\bb)?['\"].*", r"\1 (value withheld)", text)
    return text


def report(exc: BaseException, codes: ExitCodes) -> int:
    """Write what went wrong to stderr and return the exit status for it."""
    if isinstance(exc, BrokenPipeError):
        return codes.broken_pipe
    if isinstance(exc, KeyboardInterrupt):
        _write(PREFIX + "interrupted")
        return codes.interrupted
    if isinstance(exc, KeysealError):
        _write(PREFIX + exc.message, *(cause_lines(exc) if debugging() else ()))
        return codes.error(exc)
    if debugging():
        import traceback

        _write("".join(traceback.format_exception(exc)).rstrip("\n"))
    _write(PREFIX + unexpected(exc))
    return codes.unexpected


def fail(message: str, code: int) -> NoReturn:
    """Stop with one error line (a usage mistake found before any keyseal error was raised)."""
    _write(PREFIX + message)
    sys.exit(code)


def run_guarded(run: Callable[[], object], codes: ExitCodes = KEYSEAL) -> NoReturn:
    """Run a command and exit: its return value (an int) or 0; any failure as `report` says."""
    try:
        rv = run()
    except SystemExit:
        raise
    except BaseException as exc:
        sys.exit(report(exc, codes))
    sys.exit(rv if isinstance(rv, int) else 0)


def _write(*lines: str) -> None:
    try:
        sys.stderr.write("".join(line + "\n" for line in lines))
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # stderr itself closed: nothing left to tell
        pass
