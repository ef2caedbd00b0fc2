"""`keyseal verify --format ssh|minisign`: the formats beside OpenPGP, behind the same command (signing them is
keyseal.api.sign_files)."""

from __future__ import annotations

from pathlib import Path

import click

from keyseal._internal.formats.filesign import FORMATS, SUFFIXES
from keyseal._internal.inputfile import read_input
from keyseal.errors import InputError, KeysealError, UsageError, VerificationError

__all__ = ["FORMATS", "SUFFIXES", "default_signature", "verify_file"]


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
        raise VerificationError(exc.message) from exc
    click.echo(result.fingerprint)
    click.echo(f"Good signature from minisign key {result.fingerprint}; trusted comment: "
               f"{result.trusted_comment}", err=True)
