"""`keyseal verify`: check a detached signature, or a cleartext signed message, with keyseal's own verifier
(no gpg).

The OpenPGP case usually runs without click, from keyseal._internal.cli.quick; this definition is the reference for the
command line, and handles what the fast path leaves to it (help, other formats, errors in the arguments)."""

from __future__ import annotations

from pathlib import Path

import click

from keyseal._internal.cli.formats import FORMATS
from keyseal._internal.cli.quick import verify_openpgp
from keyseal.errors import UsageError

__all__ = ["verify"]


@click.command()
@click.option("--cert", "certs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A trusted certificate (repeatable); with --format ssh an SSH public key or plain "
                   "allowed_signers file, with --format minisign a minisign public key file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="openpgp", show_default=True,
              help="The signature's format (ssh: FILE.sig, minisign: FILE.minisig by default).")
@click.option("--namespace", default=None, help="SSH signature namespace (--format ssh; default: file).")
@click.option("--threshold", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="Require good signatures from K distinct certificates (OpenPGP; k of n release policies). "
                   "Prints every signer's fingerprint.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Cleartext signed message: write the text the signature covers here ('-': stdout), only once "
                   "it verifies.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("signature", required=False, type=click.Path(path_type=Path))
def verify(certs: tuple[Path, ...], fmt: str, namespace: str | None, threshold: int, output: Path | None,
           force: bool, file: Path, signature: Path | None) -> None:
    """Exit 0 and print the signer's fingerprint if FILE carries a valid signature from one of the certificates.

    FILE is the signed data (its signature is SIGNATURE, or FILE.asc / FILE.sig), or a cleartext signed message
    (`-----BEGIN PGP SIGNED MESSAGE-----`, as `keyseal sign --clear` and `gpg --clearsign` write it)."""
    if fmt != "openpgp" or namespace is not None:
        if threshold > 1 or output is not None:
            raise UsageError("--threshold and --output apply to OpenPGP signatures only")
        from keyseal._internal.cli.formats import verify_file as verify_other_format

        verify_other_format(fmt, certs, file, signature, namespace)
        return
    verify_openpgp(certs, file, signature, threshold, output, force)
