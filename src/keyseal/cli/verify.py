"""`keyseal verify`: check a detached signature, or a cleartext signed message, with keyseal's own verifier
(no gpg)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from keyseal.cli.common import format_time, load_certificate_files
from keyseal.cli.formats import FORMATS
from keyseal.errors import InputError, KeysealError, OutputExistsError, UsageError, VerificationError
from keyseal.inputfile import read_input

if TYPE_CHECKING:
    from keyseal.openpgp.verify import VerifiedSignature


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
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Cleartext signed message: write the text the signature covers here ('-': stdout), only once "
                   "it verifies.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("signature", required=False, type=click.Path(path_type=Path))
def verify(certs: tuple[Path, ...], fmt: str, namespace: str | None, output: Path | None, force: bool, file: Path,
           signature: Path | None) -> None:
    """Exit 0 and print the signer's fingerprint if FILE carries a valid signature from one of the certificates.

    FILE is the signed data (its signature is SIGNATURE, or FILE.asc / FILE.sig), or a cleartext signed message
    (`-----BEGIN PGP SIGNED MESSAGE-----`, as `keyseal sign --clear` and `gpg --clearsign` write it)."""
    if signature is None and fmt == "openpgp" and namespace is None and _starts_cleartext(file):
        _verify_cleartext(certs, file, output, force)
        return
    if output is not None:
        raise UsageError("--output writes the text of a cleartext signed message; FILE is not one")
    if fmt != "openpgp" or namespace is not None:
        from keyseal.cli.formats import verify_file as verify_other_format

        verify_other_format(fmt, certs, file, signature, namespace)
        return
    signature_data = b""
    try:
        from keyseal.openpgp import prefetch

        signature_data = read_input(signature or default_signature_path(file), "signature")
        hashes = prefetch.start(file, signature_data)  # hash the data while the verifier and certificates load
        from keyseal.openpgp.verify import verify_prefetched

        certificates = load_certificate_files(certs)
        result = verify_prefetched(certificates, hashes, signature_data)
    except VerificationError:
        text_result = _text_mode(certs, file, signature_data)
        if text_result is None:
            raise
        result = text_result
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    click.echo(result.fingerprint)
    uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
    click.echo(f"Good signature from {uid} made {format_time(result.created)} ({result.hash_name})", err=True)


def _text_mode(certs: tuple[Path, ...], file: Path, signature_data: bytes) -> VerifiedSignature | None:
    """A text-mode (0x01) detached signature (`gpg -abst`) is checked over the file with CR LF line endings. Only
    tried once the binary check failed, so the usual path keeps hashing while the verifier loads."""
    from keyseal.openpgp.signature import SIG_TEXT
    from keyseal.openpgp.verify import parse_detached, verify_bytes

    try:
        if not signature_data or any(sig.sig_type != SIG_TEXT for sig in parse_detached(signature_data)):
            return None
    except KeysealError:
        return None
    try:
        return verify_bytes(load_certificate_files(certs), read_input(file, "file"), signature_data, text_mode=True)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None


def _starts_cleartext(file: Path) -> bool:
    from keyseal.openpgp.cleartext import is_cleartext

    try:
        with file.open("rb") as handle:
            return is_cleartext(handle.read(256))
    except OSError:
        return False  # the detached path reports the missing or unreadable file


def _verify_cleartext(certs: tuple[Path, ...], file: Path, output: Path | None, force: bool) -> None:
    from keyseal.openpgp.verify import verify_cleartext

    try:
        certificates = load_certificate_files(certs)
        result, message = verify_cleartext(certificates, read_input(file, "signed message"))
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
    if output is not None and str(output) == "-":
        sys.stdout.buffer.write(message.text)
        sys.stdout.buffer.flush()
    elif output is not None:
        from keyseal.atomic import write_atomic

        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists: refusing to overwrite it (use --force)")
        write_atomic(output, message.text, mode=0o644)
    if output is None or str(output) != "-":
        click.echo(result.fingerprint)
    uid = result.certificate.user_ids[0] if result.certificate.user_ids else ""
    click.echo(f"Good signature from {uid} made {format_time(result.created)} ({result.hash_name}, cleartext)",
               err=True)
