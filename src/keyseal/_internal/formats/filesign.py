"""SSH and minisign signatures over files: the composition `keyseal sign --format ssh|minisign` and the Python API
(keyseal.api) share. The key is checked once, before any file is hashed; files are signed concurrently."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from keyseal.errors import UsageError

if TYPE_CHECKING:
    from keyseal.signer import Signer

__all__ = ["FORMATS", "SUFFIXES", "OtherFormat", "check_namespace", "check_sign_options", "sign_files"]

FORMATS = ("openpgp", "ssh", "minisign")
OtherFormat = Literal["ssh", "minisign"]
SUFFIXES: dict[str, str] = {"ssh": ".sig", "minisign": ".minisig"}


def check_sign_options(fmt: str, certs: bool, armored: bool, digest: str | None, append: bool,
                       namespace: str | None) -> None:
    """Refuse options that mean nothing for the format, rather than ignore them (named as the CLI names them)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown signature format {fmt!r}: use {', '.join(FORMATS)}")
    if fmt == "openpgp":
        if namespace is not None:
            raise UsageError("--namespace applies to --format ssh only")
        return
    given = [name for name, used in (("--cert", certs), ("--binary", not armored), ("--digest", digest),
                                     ("--append", append)) if used]
    if given:
        raise UsageError(f"{', '.join(given)} apply to --format openpgp only")
    if namespace is not None and fmt != "ssh":
        raise UsageError("--namespace applies to --format ssh only")


def check_namespace(fmt: OtherFormat, namespace: str | None) -> str:
    """The SSH namespace to sign in (refused before a key is opened if malformed); "" for minisign."""
    from keyseal._internal.formats import ssh

    if fmt != "ssh":
        return ""
    ssh.check_namespace(namespace or ssh.DEFAULT_NAMESPACE)
    return namespace or ssh.DEFAULT_NAMESPACE


def sign_files(fmt: OtherFormat, signer: Signer, key_name: str, pairs: list[tuple[Path, Path]], namespace: str,
               force: bool, jobs: int,
               progress: Callable[[], AbstractContextManager[object]] | None = None) -> list[Path]:
    """Sign each (input, output) pair in `fmt`; `key_name` names the key in errors (the URI the caller gave)."""
    from keyseal._internal import audit
    from keyseal._internal.atomic import write_atomic
    from keyseal._internal.formats import minisign, ssh

    public_key = signer.public_key()
    if fmt == "minisign":
        minisign.require_ed25519(public_key, key_name)
    else:
        ssh.scheme_for(signer, public_key)

    def one(src: Path, dst: Path) -> Path:
        with audit.subject(os.path.abspath(src), purpose=fmt):  # in the worker: pool threads start bare
            data = ssh.sign_file(signer, src, namespace) if fmt == "ssh" else minisign.sign_file(signer, src)
        write_atomic(dst, data, mode=0o644, force=force)
        return dst

    with (progress or nullcontext)(), ThreadPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
        futures = [pool.submit(one, src, dst) for src, dst in pairs]
        return [future.result() for future in futures]
