"""`keyseal-gpg`: the part of gpg's command line that git and release tools use, so keyseal can stand in for gpg.

  sign:    -b / --detach-sign, --clearsign, -s / --sign (a one-pass signed message); -a / --armor or binary;
           -t / --textmode; data from FILE, or standard input (no FILE, `-`, or after `--`); -o / --output
           (default: stdout for stdin, else FILE.asc / FILE.sig / FILE.gpg as gpg names them); --yes;
           --digest-algo; -u / --local-user / --default-key KEY
  verify:  --verify SIG [DATA|-]   a detached signature;  --verify FILE|-  a cleartext signed message
  list:    -k / --list-keys, -K / --list-secret-keys [--with-colons] [PATTERN...]
  --version, --status-fd N

KEY is a key URI, or a fingerprint, key ID or user ID (email) the keyseal keyring maps to one. Status lines follow
gpg's (`[GNUPG:] SIG_CREATED ...`, `GOODSIG`, `VALIDSIG`, `TRUST_FULLY`), since tools parse them; the human messages
go to stderr. Options about secret keys on disk, passphrases, agents and keyrings do not apply to a key keyseal
never holds, and are accepted and ignored (docs/release-tools.md lists them). Anything else is refused with one
line naming the option. Exit status as gpg: 0 good, 1 bad signature, 2 any other error.

Kept free of click and of every backend SDK: a key URI's backend is imported only when it signs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, NoReturn

from keyseal._internal.cli.guard import ExitCodes, report
from keyseal._version import __version__
from keyseal.errors import OutputExistsError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from keyseal._internal.release.gitsign import GitVerification
    from keyseal._internal.release.gpgsign import Kind
    from keyseal.signer import HashName

    _ValueOf = Callable[[str, str | None], str]

__all__ = [
    "GPG_EXIT_CODES",
    "GPG_VERSION",
    "IGNORED_FLAGS",
    "IGNORED_WITH_VALUE",
    "PROG",
    "VERSION_LINE",
    "Arguments",
    "Status",
    "main",
    "parse_arguments",
    "run",
    "run_sign",
    "run_verify",
]

PROG = "keyseal-gpg"
# What tools parse from `gpg --version`: maven-gpg-plugin matches `gpg \([^)]+\) .+`; debsign takes the third
# space-separated field as the version (so no space inside the parentheses).
GPG_VERSION = "2.2.40"
VERSION_LINE = f"gpg (GnuPG-compatible-keyseal) {GPG_VERSION}"

# Options that do not apply to a key that is never on disk (or only change gpg's chatter): accepted, ignored.
IGNORED_FLAGS = frozenset({
    "--batch", "--no-batch", "--no-tty", "--quiet", "--verbose", "--no-verbose", "--no-auto-key-retrieve",
    "--no-permission-warning", "--no-secmem-warning", "--use-agent", "--no-use-agent", "--lock-never",
    "--lock-once", "--lock-multiple", "--no-default-keyring", "--utf8-strings", "--no-utf8-strings", "--openpgp",
    "--rfc4880", "--gnupg", "--no-options", "--no-greeting", "--emit-version", "--no-emit-version",
    "--no-comments", "--always-trust", "--no-show-policy-url", "--no-show-notation", "--expert", "--no-expert",
    "--fixed-list-mode", "--with-keygrip", "--with-subkey-fingerprint", "--with-subkey-fingerprints",
    "--with-secret", "--no-random-seed-file", "--no-sig-cache", "--no-autostart", "--disable-dirmngr",
    "--no-tofu", "--force-v4-certs", "--no-mdc-warning", "--ignore-time-conflict", "--ignore-valid-from",
    "--no-symkey-cache", "--auto-key-retrieve",
})
IGNORED_WITH_VALUE = frozenset({
    "--keyid-format", "--trust-model", "--pinentry-mode", "--homedir", "--passphrase", "--passphrase-file",
    "--passphrase-repeat", "--secret-keyring", "--primary-keyring", "--weak-digest",
    "--list-options", "--verify-options", "--compress-algo", "--compress-level", "--bzip2-compress-level",
    "--cert-digest-algo", "--s2k-digest-algo", "--s2k-cipher-algo", "--s2k-mode", "--s2k-count", "--charset",
    "--display-charset", "--logger-fd", "--logger-file", "--log-file", "--agent-program", "--dirmngr-program",
    "--comment", "--default-preference-list", "--personal-cipher-preferences", "--personal-compress-preferences",
    "--trustdb-name", "--keyserver", "--keyserver-options", "--auto-key-locate", "--command-fd",
    "--attribute-fd", "--default-cert-level", "--min-cert-level", "--completes-needed", "--marginals-needed",
    "--max-cert-depth", "--set-filename", "--sig-notation", "--sig-policy-url", "--set-notation",
    "--tofu-default-policy", "--compliance", "--options",
})
_COMMANDS = {"--detach-sign": "detach", "--detach-sig": "detach", "--sign": "sign", "--clearsign": "clear",
             "--clear-sign": "clear", "--verify": "verify", "--version": "version", "--list-keys": "list-keys",
             "--list-public-keys": "list-keys", "--list-secret-keys": "list-secret-keys",
             "--fingerprint": "list-keys"}
# Flags without a value that set one field of Arguments: option -> (field, value).
_SWITCHES = {"--armor": ("armor", True), "--no-armor": ("armor", False), "--textmode": ("text_mode", True),
             "--no-textmode": ("text_mode", False), "--yes": ("yes", True), "--with-colons": ("with_colons", True)}
_SHORT = {"b": "detach", "s": "sign", "k": "list-keys", "K": "list-secret-keys"}
_SHORT_WITH_VALUE = {"u": "--local-user", "o": "--output", "z": "--compress-level"}
_HASHES: dict[str, HashName] = {"SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
_WEAK = ("MD5", "SHA1", "RIPEMD160", "SHA224")


class Arguments:
    """What the command line asked for (a plain class: git runs this once per commit, and a dataclass costs
    start-up time)."""

    __slots__ = ("armor", "default_key", "digest", "digest_preferences", "keyrings", "local_user", "modes",
                 "output", "passphrase_fd", "positional", "status_fd", "text_mode", "with_colons", "yes")

    def __init__(self) -> None:
        self.modes: set[str] = set()
        self.armor = False
        self.text_mode = False
        self.local_user: str | None = None
        self.default_key: str | None = None
        self.output: str | None = None
        self.yes = False
        self.digest: HashName | None = None
        self.digest_preferences: tuple[HashName, ...] = ()
        self.with_colons = False
        self.passphrase_fd: int | None = None
        self.keyrings: list[str] = []
        self.status_fd: int | None = None
        self.positional: list[str] = []


def parse_arguments(argv: list[str]) -> Arguments:
    """gpg-style options: bundled short flags (`-bsau KEY`, `-sbo FILE`), `--opt=value` and `--opt value`."""
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
            _long_option(args, name, value_of, inline if eq else None)
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            for position, letter in enumerate(letters):
                if letter in _SHORT_WITH_VALUE:
                    rest = letters[position + 1 :]
                    _long_option(args, _SHORT_WITH_VALUE[letter], value_of, rest or None, f"-{letter}")
                    break
                _short_flag(args, letter)
        else:
            args.positional.append(arg)
        index += 1
    return args


def _short_flag(args: Arguments, letter: str) -> None:
    if letter in _SHORT:
        args.modes.add(_SHORT[letter])
    elif letter == "a":
        args.armor = True
    elif letter == "t":
        args.text_mode = True
    elif letter not in ("q", "v"):
        raise UsageError(f"{PROG} does not support -{letter} (it signs, verifies and lists keys; "
                         f"see docs/release-tools.md)")


def _long_option(args: Arguments, name: str, value_of: _ValueOf, inline: str | None, shown: str = "") -> None:
    shown = shown or name
    if name in _COMMANDS and inline is None:
        args.modes.add(_COMMANDS[name])
    elif name in _SWITCHES and inline is None:
        attribute, value = _SWITCHES[name]
        setattr(args, attribute, value)
    elif name == "--with-fingerprint" and inline is None:
        pass  # fingerprints are always listed
    elif name == "--local-user":
        user = value_of(shown, inline)
        if args.local_user is not None and args.local_user != user:
            raise UsageError(f"{PROG} signs with one key: give -u once")
        args.local_user = user
    elif name == "--default-key":
        args.default_key = value_of(shown, inline)
    elif name == "--output":
        args.output = value_of(shown, inline)
    elif name == "--digest-algo":
        args.digest = _hash_name(value_of(shown, inline), shown)
    elif name == "--personal-digest-preferences":
        args.digest_preferences = tuple(_hashes_in(value_of(shown, inline)))
    elif name == "--status-fd":
        args.status_fd = _fd(value_of(shown, inline), shown)
    elif name == "--passphrase-fd":
        args.passphrase_fd = _fd(value_of(shown, inline), shown)
    elif name == "--keyring":
        args.keyrings.append(value_of(shown, inline))
    elif name in IGNORED_WITH_VALUE:
        value_of(shown, inline)
    elif name in IGNORED_FLAGS and inline is None:
        pass
    else:
        raise UsageError(f"{PROG} does not support {shown} (it signs, verifies and lists keys; "
                         f"see docs/release-tools.md)")


def _hash_name(text: str, option: str) -> HashName:
    key = text.strip().upper().replace("-", "")
    if key in _HASHES:
        return _HASHES[key]
    if key in _WEAK:
        raise UsageError(f"{option} {text[:20]}: keyseal signs with SHA256, SHA384 or SHA512 only")
    raise UsageError(f"{option}: unknown hash {text[:20]!r} (use SHA256, SHA384 or SHA512)")


def _hashes_in(text: str) -> list[HashName]:
    return [_HASHES[key] for word in text.replace(",", " ").split()
            if (key := word.upper().replace("-", "")) in _HASHES]


def _fd(text: str, option: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{option} needs a file descriptor number, not {text[:20]!r}")
    return int(text)


class Status:
    """gpg's machine-readable status lines, written to the descriptor the caller named."""

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


# -- signing ---------------------------------------------------------------------------------------------


def _sign_kind(args: Arguments) -> Kind:
    if "clear" in args.modes:
        if "detach" in args.modes:
            raise UsageError("--clearsign and --detach-sign are different signatures: choose one")
        return "clear"
    return "detach" if "detach" in args.modes else "normal"


def _default_output(source: str | None, kind: Kind, armored: bool) -> Path | None:
    """gpg's output names: stdout for stdin; FILE.asc when armored or cleartext, FILE.sig detached, FILE.gpg."""
    from pathlib import Path  # not at import: `--verify`, which git runs once per commit, uses none

    if source is None:
        return None
    suffix = ".asc" if armored or kind == "clear" else ".sig" if kind == "detach" else ".gpg"
    return Path(source + suffix)


def run_sign(args: Arguments, status: Status) -> int:
    from pathlib import Path

    from keyseal._internal.release.gpgsign import SignRequest, sign

    kind = _sign_kind(args)
    if len(args.positional) > 1:
        raise UsageError(f"{PROG} signs one file per call (gpg's usage: --sign [FILE])")
    source = args.positional[0] if args.positional and args.positional[0] != "-" else None
    if source is None and args.passphrase_fd == 0:
        raise UsageError("--passphrase-fd 0 with the data on standard input: keyseal needs no passphrase, drop "
                         "--passphrase-fd")
    target = Path(args.output) if args.output not in (None, "-") else None
    if args.output is None:
        target = _default_output(source, kind, args.armor)
    if target is not None and target.exists() and not args.yes:
        raise OutputExistsError(f"{target} exists: pass --yes to overwrite it")
    data: bytes | Path
    if source is None:
        data = sys.stdin.buffer.read()
    else:
        data = Path(source)
        if not data.is_file():
            raise UsageError(f"{source[:200]}: no such file")
    request = SignRequest(
        key=args.local_user or args.default_key, kind=kind, armored=args.armor,
        text_mode=args.text_mode, digest=args.digest, digest_preferences=args.digest_preferences,
        filename=Path(source).name if source else "", subject=os.path.abspath(source) if source else "stdin")
    signature = sign(request, data)
    status.emit("KEY_CONSIDERED", signature.fingerprint, 0)
    status.emit("BEGIN_SIGNING", f"H{signature.hash_id}")
    if target is None:
        sys.stdout.buffer.write(signature.data)
        sys.stdout.buffer.flush()
    else:
        from keyseal._internal.atomic import write_atomic

        write_atomic(target, signature.data, mode=0o644)
    letter = {"detach": "D", "clear": "C"}.get(kind, "S")
    status.emit("SIG_CREATED", letter, signature.algorithm, signature.hash_id, f"{signature.sig_class:02X}",
                signature.created, signature.fingerprint)
    return 0


# -- verifying -------------------------------------------------------------------------------------------


def run_verify(args: Arguments, status: Status) -> int:
    from keyseal._internal.inputfile import read_input
    from keyseal._internal.openpgp.armor import is_cleartext
    from keyseal._internal.pathtext import path_text
    from keyseal._internal.release import gitsign

    if args.keyrings:
        # Ignoring it would widen trust: the caller meant only that keyring's keys to count.
        raise UsageError(f"{PROG} --verify trusts the keyseal keyring only, not --keyring {args.keyrings[0][:100]}: "
                         f"verify with gpgv or sqv --keyring instead")
    if len(args.positional) > 2:
        raise UsageError(f"usage: {PROG} --verify SIGNATURE [DATA|-] or --verify CLEARTEXT")
    first = args.positional[0] if args.positional else "-"
    signature_data = sys.stdin.buffer.read() if first == "-" else read_input(path_text(first), "signature")
    text: bytes | None = None
    if len(args.positional) < 2 and is_cleartext(signature_data):
        result, text = gitsign.verify_cleartext(signature_data)
    else:
        if len(args.positional) < 2:
            shown = "standard input" if first == "-" else first[:200]
            raise UsageError(f"{shown} is not a cleartext signed message: for a detached signature name the signed "
                             f"data too (--verify SIG DATA)")
        source = args.positional[1]
        data = sys.stdin.buffer.read() if source == "-" else read_input(path_text(source), "data file")
        result = gitsign.verify(signature_data, data)
    code = _report(result, status)
    if code == 0 and text is not None and args.output is not None:
        if args.output == "-":
            sys.stdout.buffer.write(text)
            sys.stdout.buffer.flush()
        else:
            from pathlib import Path

            from keyseal._internal.atomic import write_atomic

            target = Path(args.output)
            if target.exists() and not args.yes:
                raise OutputExistsError(f"{target} exists: pass --yes to overwrite it")
            write_atomic(target, text, mode=0o644)
    return code


def _report(result: GitVerification, status: Status) -> int:
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


# -- entry point -----------------------------------------------------------------------------------------


def run(args: Arguments, status: Status) -> int:
    commands = args.modes & {"verify", "version", "list-keys", "list-secret-keys"}
    if len(commands) > 1 or (commands and args.modes & {"sign", "detach", "clear"}):
        raise UsageError("conflicting commands: give one of sign, verify, list keys, version")
    if "version" in args.modes:
        sys.stdout.write(f"{VERSION_LINE}\nkeyseal {__version__}: signs with keys it never holds\n")
        return 0
    if "verify" in args.modes:
        return run_verify(args, status)
    if args.modes & {"list-keys", "list-secret-keys"}:
        from keyseal._internal.cli.gpglist import list_keys

        sys.stdout.write(list_keys(args.positional, secret="list-secret-keys" in args.modes,
                                   colons=args.with_colons))
        return 0
    if args.modes & {"sign", "detach", "clear"}:
        return run_sign(args, status)
    raise UsageError(f"{PROG} signs (-b, -s, --clearsign), verifies (--verify) and lists keys (-k, -K); "
                     f"give one of them")


# gpg's statuses: 1 for a bad signature, 2 for any other error.
GPG_EXIT_CODES = ExitCodes(lambda exc: 1 if exc.exit_code == 1 else 2, unexpected=2, broken_pipe=2)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `keyseal-gpg`; errors are one `keyseal: error:` line on stderr and exit status 2."""
    status = Status(None)
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        status = Status(args.status_fd)
        if "verify" in args.modes:
            # git starts one per commit under `log --show-signature`: a short-lived process, never a signer
            # (whose backend may hold sessions that must be closed), see keyseal._internal.cli.shortlived.
            from keyseal._internal.cli.shortlived import ShortLived

            with ShortLived():
                code = run(args, status)
        else:
            code = run(args, status)
    except SystemExit:
        raise
    except BaseException as exc:  # every other way out: one line and a status (cli.guard)
        code = report(exc, GPG_EXIT_CODES)
    sys.exit(code)
