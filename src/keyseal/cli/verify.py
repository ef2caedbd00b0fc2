"""`keyseal verify`: check a detached signature with keyseal's own verifier (no gpg)."""

from __future__ import annotations

from pathlib import Path

import click

from keyseal.cli.common import format_time, load_certificate_files
from keyseal.cli.formats import FORMATS
from keyseal.errors import InputError, KeysealError, UsageError, VerificationError
from keyseal.inputfile import read_input


def default_signature_path(data: Path) -> Path:
    for suffix in (".asc", ".sig"):
        candidate = data.with_name(data.name + suffix)
        if candidate.exists():
            return candidate
    raise InputError(f"no signature given and neither {data.name}.asc nor {data.name}.sig exists")


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
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("signature", required=False, type=click.Path(path_type=Path))
def verify(certs: tuple[Path, ...], fmt: str, namespace: str | None, threshold: int, file: Path,
           signature: Path | None) -> None:
    """Exit 0 and print the signer's fingerprint if FILE carries a valid signature from one of the certificates."""
    if threshold > 1 and (fmt != "openpgp" or namespace is not None):
        raise UsageError("--threshold applies to OpenPGP signatures only")
    if fmt != "openpgp" or namespace is not None:
        from keyseal.cli.formats import verify_file as verify_other_format

        verify_other_format(fmt, certs, file, signature, namespace)
        return
    try:
        from keyseal.openpgp import prefetch

        signature_data = read_input(signature or default_signature_path(file), "signature")
        hashes = prefetch.start(file, signature_data)  # hash the data while the verifier and certificates load
        from keyseal.openpgp.verify import verify_threshold_prefetched

        certificates = load_certificate_files(certs)
        results = verify_threshold_prefetched(certificates, hashes, signature_data, threshold)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    for result in results:
        click.echo(result.fingerprint)
        uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
        click.echo(f"Good signature from {uid} made {format_time(result.created)} ({result.hash_name})", err=True)
