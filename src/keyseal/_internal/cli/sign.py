"""`keyseal sign`: detached OpenPGP signatures (or, with --clear, cleartext signed messages), SSH or minisign
signatures, one signature call per file, files hashed concurrently. The work is keyseal.api.sign_files."""

from __future__ import annotations

from pathlib import Path

import click

from keyseal._internal import api
from keyseal._internal.cli.common import kek_option, kms_endpoint_option
from keyseal._internal.formats.filesign import FORMATS
from keyseal._internal.openpgp.signature import HASH_IDS

__all__ = ["sign"]


def _warn(message: str) -> None:
    click.echo(f"keyseal: warning: {message}", err=True)


@click.command()
@click.option("--key", "key_uri", required=True, metavar="URI", help="Key URI: file:PATH, awskms:ARN ...")
@click.option("--cert", "certs", multiple=True, type=click.Path(path_type=Path),
              help="The key's certificate: names the issuer and refuses a key that is not its key.")
@click.option("--armor/--binary", "armored", default=True, help="FILE.asc (default) or binary FILE.sig.")
@click.option("--clear", is_flag=True,
              help="A cleartext signed message FILE.asc (the text, readable, then its signature), as gpg "
                   "--clearsign writes it: for text such as APT's InRelease or Debian .dsc/.changes files.")
@click.option("--digest", type=click.Choice(tuple(HASH_IDS)), default=None, help="Hash (default: the key's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output (one input only).")
@click.option("--force", is_flag=True, help="Overwrite existing signature files.")
@click.option("--append", is_flag=True,
              help="Add the signature to an existing signature file, in its armor (dual signing during a key "
                   "rotation); without one, sign as usual.")
@click.option("--keep-revoked-signatures", "keep_revoked", is_flag=True,
              help="With --append: keep a signature already in the file although its key is revoked and it no "
                   "longer counts (refused by default; --cert and the keyring tell which keys are revoked).")
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True, help="Files signed at once.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="openpgp", show_default=True,
              help="openpgp: FILE.asc; ssh: FILE.sig for ssh-keygen -Y verify; minisign: FILE.minisig (Ed25519).")
@click.option("--namespace", default=None, help="SSH signature namespace (--format ssh; default: file).")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@kms_endpoint_option
@kek_option
def sign(key_uri: str, certs: tuple[Path, ...], armored: bool, clear: bool, digest: str | None,
         output: Path | None, force: bool, append: bool, keep_revoked: bool, jobs: int, fmt: str,
         namespace: str | None, files: tuple[Path, ...], kms_endpoint: str | None, kek: str | None) -> None:
    """Write detached signatures: OpenPGP (gpg and sqv verify them), SSH or minisign; or cleartext signed
    OpenPGP messages (--clear)."""
    written = api.sign_files(key_uri, files, output=output, format=fmt, certificates=certs,  # type: ignore[arg-type]
                             armor=armored, clear=clear, digest=digest, namespace=namespace,  # type: ignore[arg-type]
                             force=force, append=append, keep_revoked=keep_revoked, jobs=jobs,
                             kms_endpoint=kms_endpoint, kek=kek, on_warning=_warn, progress=True)
    for path in written:
        click.echo(str(path))
