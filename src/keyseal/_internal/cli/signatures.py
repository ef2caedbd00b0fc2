"""`keyseal signatures merge`: one detached signature file from the files that several custodies wrote for the
same artifact, in separate jobs (k-of-n releases; see docs/threshold-releases.md)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from keyseal._internal.atomic import write_atomic
from keyseal._internal.cli.common import json_option
from keyseal._internal.inputfile import read_input
from keyseal.errors import OutputExistsError

__all__ = ["signatures"]


@click.group()
def signatures() -> None:
    """Work with detached OpenPGP signature files."""


@signatures.command("merge")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The signed file: every signature merged must be over it.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write (default: DATA.asc, or DATA.sig with --binary).")
@click.option("--armor/--binary", "armored", default=True, help="Armored (default) or binary output.")
@click.option("--force", is_flag=True, help="Replace an existing output that is not one of the inputs.")
@click.option("--cert", "certs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Certificates that may hold revocations (repeatable), besides the keyseal keyring's.")
@click.option("--keep-revoked-signatures", "keep_revoked", is_flag=True,
              help="Keep a signature by a key revoked so that it no longer counts (a warning is printed).")
@json_option
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def merge(data: Path, output: Path | None, armored: bool, force: bool, certs: tuple[Path, ...], keep_revoked: bool,
          as_json: bool, files: tuple[Path, ...]) -> None:
    """Merge the signatures of FILES (armored or binary) into one file: each must be over DATA; an exact
    duplicate is kept once, and two different signatures by one key, or a signature by a key revoked so that it
    no longer counts (known from --cert or the keyseal keyring), are refused."""
    from keyseal._internal.openpgp.detached import KnownCertificates, encode_signatures, merge_signatures
    from keyseal._internal.openpgp.fileverify import load_certificates_from
    from keyseal._internal.openpgp.sign import render

    def keep(name: str, fingerprint: str) -> bool:
        if keep_revoked:
            click.echo(f"keyseal: warning: kept the signature by revoked key {fingerprint} from {name} "
                       f"(--keep-revoked-signatures)", err=True)
        return keep_revoked

    target = output or data.with_name(data.name + (".asc" if armored else ".sig"))
    is_input = any(os.path.realpath(f) == os.path.realpath(target) for f in files)
    if target.exists() and not (force or is_input):
        raise OutputExistsError(f"{target} exists: refusing to overwrite it (use --force, or name it as an input "
                                f"to merge into it)")
    known = KnownCertificates(load_certificates_from(certs))
    merged = merge_signatures(data, [(str(f), read_input(f, "signature")) for f in files], known, keep)
    write_atomic(target, render(encode_signatures(merged), armored), mode=0o644, force=True)
    if as_json:
        from keyseal._internal.cli.output import print_json

        print_json({"output": str(target), "signatures": len(merged),
                    "signers": [sig.issuer_fingerprint.hex().upper() for sig in merged if sig.issuer_fingerprint]})
        return
    click.echo(f"{target}: {len(merged)} signature(s)")
