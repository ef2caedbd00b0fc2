"""`keyseal sign/verify --format ssh|minisign`: the formats beside OpenPGP, behind the same two commands."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import click

from keyseal._internal.atomic import write_atomic
from keyseal._internal.cli.common import open_key
from keyseal._internal.inputfile import read_input
from keyseal.errors import InputError, KeysealError, UsageError, VerificationError

if TYPE_CHECKING:
    from keyseal.signer import Signer

FORMATS = ("openpgp", "ssh", "minisign")
SUFFIXES = {"ssh": ".sig", "minisign": ".minisig"}


def check_sign_options(fmt: str, certs: tuple[Path, ...], armored: bool, digest: str | None, append: bool,
                       namespace: str | None) -> None:
    """Refuse options that mean nothing for the format, rather than ignore them."""
    if fmt == "openpgp":
        if namespace is not None:
            raise UsageError("--namespace applies to --format ssh only")
        return
    given = [name for name, used in (("--cert", bool(certs)), ("--binary", not armored), ("--digest", digest),
                                     ("--append", append)) if used]
    if given:
        raise UsageError(f"{', '.join(given)} apply to --format openpgp only")
    if namespace is not None and fmt != "ssh":
        raise UsageError("--namespace applies to --format ssh only")


def sign_files(fmt: str, key_uri: str, pairs: list[tuple[Path, Path]], namespace: str | None, force: bool,
               jobs: int, kms_endpoint: str | None, kek: str | None) -> list[Path]:
    """Sign each (input, output) pair in `fmt`; the key is checked once, before any file is hashed."""
    from keyseal._internal import audit
    from keyseal._internal.formats import minisign, ssh

    if fmt == "ssh":
        ssh.check_namespace(namespace or ssh.DEFAULT_NAMESPACE)
    with open_key(key_uri, kms_endpoint, kek) as signer:
        public_key = signer.public_key()
        if fmt == "minisign":
            minisign.require_ed25519(public_key, key_uri)
        else:
            ssh.scheme_for(signer, public_key)

        def one(src: Path, dst: Path, signer: Signer = signer) -> Path:
            with audit.subject(os.path.abspath(src), purpose=fmt):  # in the worker: pool threads start bare
                if fmt == "ssh":
                    data = ssh.sign_file(signer, src, namespace or ssh.DEFAULT_NAMESPACE)
                else:
                    data = minisign.sign_file(signer, src)
            write_atomic(dst, data, mode=0o644, force=force)
            return dst

        with ThreadPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
            futures = [pool.submit(one, src, dst) for src, dst in pairs]
            return [future.result() for future in futures]


def default_signature(fmt: str, data: Path) -> Path:
    candidate = data.with_name(data.name + SUFFIXES[fmt])
    if not candidate.exists():
        raise InputError(f"no signature given and {candidate.name} does not exist")
    return candidate


def verify_file(fmt: str, certs: tuple[Path, ...], data: Path, signature: Path | None,
                namespace: str | None) -> None:
    """Verify and report: the key's fingerprint (SSH) or key ID (minisign) on stdout, a summary on stderr."""
    from keyseal._internal.formats import minisign, ssh

    if namespace is not None and fmt != "ssh":
        raise UsageError("--namespace applies to --format ssh only")
    try:
        sig_path = signature or default_signature(fmt, data)
        signature_data = read_input(sig_path, "signature")
        if fmt == "ssh":
            trusted = [key for path in certs for key in ssh.load_trusted_keys(read_input(path, "public key"),
                                                                               str(path))]
            verified = ssh.verify_file(trusted, data, signature_data, namespace or ssh.DEFAULT_NAMESPACE)
            who = f" for {','.join(verified.key.principals)}" if verified.key.principals else ""
            click.echo(verified.fingerprint)
            click.echo(f"Good \"{verified.namespace}\" signature{who} with {ssh.describe_key(verified.key.public_key)} "
                       f"key {verified.fingerprint} ({verified.signature_type})", err=True)
            return
        keys = [key for path in certs for key in minisign.load_public_keys(read_input(path, "public key"), str(path))]
        result = minisign.verify_file(keys, data, signature_data)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    click.echo(result.fingerprint)
    click.echo(f"Good signature from minisign key {result.fingerprint}; trusted comment: "
               f"{result.trusted_comment}", err=True)
