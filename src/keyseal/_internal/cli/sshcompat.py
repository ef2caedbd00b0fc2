"""`keyseal-ssh-keygen`: `ssh-keygen -Y sign` with a keyseal key, so keyseal can be git's `gpg.ssh.program`.

git signs with `-Y sign -n git -f KEY [-U] FILE` and reads FILE.sig. KEY is a public key file (git writes one
for `user.signingkey = key::ssh-ed25519 AAAA...`) whose key the keyseal key map (`keyseal git-setup --format
ssh`) names a URI for, or a key URI itself (`user.signingkey = awskms:alias/release-signing`).

Everything else (`-Y verify`, `-Y find-principals`, `-Y check-novalidate`, which git runs to verify) is handed to
the real `ssh-keygen` unchanged: verification stays with OpenSSH's own verifier. `$KEYSEAL_SSH_KEYGEN` names it
when it is not on PATH.
"""

from __future__ import annotations

import os
import sys

from keyseal._internal.cli.guard import ExitCodes, report
from keyseal.errors import InputError, KeyMismatchError, KeysealError, UsageError

# Not `typing.TYPE_CHECKING`: git runs `-Y verify` through this program once per commit, and all it does then is
# become ssh-keygen, so it imports nothing it does not need (no typing, dataclasses, pathlib or shutil).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = [
    "PROG",
    "SSH_EXIT_CODES",
    "Arguments",
    "is_sign",
    "main",
    "parse_arguments",
    "real_ssh_keygen",
    "resolve_key",
    "run_sign",
]

PROG = "keyseal-ssh-keygen"
_WITH_VALUE = frozenset("YnfOIsr")
_FLAGS = frozenset("Uqv")


class Arguments:
    """What `-Y sign`'s command line asked for."""

    __slots__ = ("files", "flags", "hash_options", "options")

    def __init__(self) -> None:
        self.options: dict[str, str] = {}
        self.hash_options: list[str] = []
        self.flags: set[str] = set()
        self.files: list[str] = []


def parse_arguments(argv: list[str]) -> Arguments:
    """getopt-style: bundled flags (`-qU`), values attached (`-ngit`) or separate (`-n git`)."""
    args = Arguments()
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            args.files += argv[index + 1 :]
            break
        if arg.startswith("-") and len(arg) > 1:
            for position, letter in enumerate(arg[1:], 1):
                if letter in _FLAGS:
                    args.flags.add(letter)
                    continue
                if letter not in _WITH_VALUE:
                    raise UsageError(f"{PROG} -Y sign does not support -{letter}")
                value = arg[position + 1 :]
                if not value:
                    index += 1
                    if index >= len(argv):
                        raise UsageError(f"-{letter} needs a value")
                    value = argv[index]
                if letter == "O":
                    args.hash_options.append(value)
                else:
                    args.options[letter] = value
                break
        else:
            args.files.append(arg)
        index += 1
    return args


def is_sign(argv: list[str]) -> bool:
    """True when the command line asks for `-Y sign` (anything else goes to ssh-keygen)."""
    for index, arg in enumerate(argv):
        if arg == "-Y" and index + 1 < len(argv):
            return argv[index + 1] == "sign"
        if arg.startswith("-Y") and len(arg) > 2:
            return arg[2:] == "sign"
    return False


def real_ssh_keygen() -> str:
    """The OpenSSH ssh-keygen: $KEYSEAL_SSH_KEYGEN, else the first on PATH that is not this program."""
    named = os.environ.get("KEYSEAL_SSH_KEYGEN")
    if named:
        return named
    own = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", "ssh-keygen")
        if _executable(candidate) and os.path.realpath(candidate) != own:
            return candidate
    raise UsageError("ssh-keygen was not found: install OpenSSH (Debian: openssh-client) to verify SSH signatures, "
                     "or set KEYSEAL_SSH_KEYGEN; keyseal-ssh-keygen itself only signs")


def _executable(path: str) -> bool:
    """What shutil.which accepts on POSIX: an existing, executable path that is not a directory."""
    return os.path.exists(path) and os.access(path, os.X_OK) and not os.path.isdir(path)


def resolve_key(reference: str) -> tuple[str, str | None]:
    """(key URI, expected SSH fingerprint) for `-f`: a public key file registered in the key map, or a URI."""
    from pathlib import Path

    from keyseal._internal.formats import ssh
    from keyseal._internal.openpgp.keyring import is_key_uri, keys_path, uri_for_ssh

    path = Path(reference).expanduser()
    if not path.is_file():
        if is_key_uri(reference):
            return reference, None
        raise InputError(f"{reference} is neither a public key file nor a key URI")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if "PRIVATE KEY-----" in text:
        raise UsageError(f"{path} is a private key file: {PROG} signs with keyseal keys only (a key URI, or a "
                         f"public key registered with keyseal git-setup --format ssh); use ssh-keygen for it")
    keys = ssh.load_trusted_keys(text.encode("utf-8"), str(path))
    fingerprint = keys[0].fingerprint
    uri = uri_for_ssh(fingerprint)
    if uri is None:
        raise UsageError(f"no key URI is registered for the SSH key {fingerprint} in {keys_path()}: run keyseal "
                         f"git-setup --format ssh --key URI")
    return uri, fingerprint


def _hash_option(values: list[str]) -> str:
    hash_name = "sha512"
    for value in values:
        name, _, setting = value.partition("=")
        if name != "hashalg" or setting not in ("sha256", "sha512"):
            raise UsageError(f"{PROG} -Y sign accepts only -O hashalg=sha256|sha512, not -O {value[:40]}")
        hash_name = setting
    return hash_name


def run_sign(args: Arguments) -> int:
    import hashlib
    from pathlib import Path

    from keyseal._internal import audit
    from keyseal._internal.atomic import write_atomic
    from keyseal._internal.backends import open_signer
    from keyseal._internal.formats import hash_path, ssh

    if args.options.get("Y") != "sign":
        raise UsageError(f"{PROG} signs (-Y sign); other operations run ssh-keygen")
    namespace = args.options.get("n")
    if not namespace:
        raise UsageError("-Y sign needs a namespace: -n NAMESPACE (git passes -n git)")
    if "f" not in args.options:
        raise UsageError("-Y sign needs the key: -f KEYFILE or -f KEY-URI")
    if not args.files:
        raise UsageError("-Y sign needs a file to sign (or - for standard input)")
    hash_name = _hash_option(args.hash_options)
    ssh.check_namespace(namespace)
    uri, expected = resolve_key(args.options["f"])
    with open_signer(uri) as signer:
        if expected is not None and ssh.fingerprint(signer.public_key()) != expected:
            raise KeyMismatchError(f"the key map names {uri} for {expected}, but that key is "
                                   f"{ssh.fingerprint(signer.public_key())}: run keyseal git-setup again")
        for name in args.files:
            # The audit log's subject: git hands over a temporary file, so name what it signs instead.
            what = "git object" if namespace == "git" else "standard input" if name == "-" else os.path.abspath(name)
            if name == "-":
                digest = hashlib.new(hash_name, sys.stdin.buffer.read()).digest()
                with audit.subject(what, purpose="ssh"):
                    signature = ssh.sign_message_digest(signer, digest, namespace, hash_name)
                sys.stdout.buffer.write(signature)
                sys.stdout.buffer.flush()
                continue
            path = Path(name)
            if "q" not in args.flags:
                sys.stderr.write(f"Signing file {path}\n")
            digest = hash_path(path, getattr(hashlib, hash_name))
            target = path.with_name(path.name + ".sig")
            with audit.subject(what, purpose="ssh"):
                signature = ssh.sign_message_digest(signer, digest, namespace, hash_name)
            write_atomic(target, signature, mode=0o644)
            if "q" not in args.flags:
                sys.stderr.write(f"Write signature to {target}\n")
    return 0


# ssh-keygen's statuses: keyseal's own for its errors, 2 for any other failure.
SSH_EXIT_CODES = ExitCodes(lambda exc: exc.exit_code, unexpected=2, broken_pipe=2)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of `keyseal-ssh-keygen`: `-Y sign` here, everything else replaced by ssh-keygen."""
    arguments = sys.argv[1:] if argv is None else argv
    try:
        if not is_sign(arguments):
            program = real_ssh_keygen()
            try:
                os.execv(program, [program, *arguments])  # noqa: S606 - becomes OpenSSH's ssh-keygen
            except OSError as exc:
                raise KeysealError(f"cannot run ssh-keygen {program}: {exc.strerror}") from exc
        code = run_sign(parse_arguments(arguments))
    except SystemExit:
        raise
    except BaseException as exc:  # every other way out: one line and a status (cli.guard)
        code = report(exc, SSH_EXIT_CODES)
    sys.exit(code)
