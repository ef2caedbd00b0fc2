"""`keyseal keys export`: a key's public half in the format a verifier reads (OpenPGP, SSH, minisign, PEM)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from keyseal._internal.atomic import refuse_existing, write_atomic
from keyseal._internal.cli.common import kek_option, kms_endpoint_option, open_key, parse_rfc3339
from keyseal.errors import UsageError
from keyseal.signer import PublicKey, Signer

__all__ = ["EXPORT_FORMATS", "export", "render"]

EXPORT_FORMATS = ("openpgp", "ssh", "minisign", "pem")


def _openpgp(signer: Signer, public_key: PublicKey, name: str | None, email: str | None,
             created: str | None) -> bytes:
    """The keyring's certificate for the key; else a freshly minted one when --name and --email are given."""
    from keyseal._internal.openpgp.cert import armor_certificate, creation_time, mint_certificate
    from keyseal._internal.openpgp.keyring import certificate_for_key, keyring_certificates

    if name is None and email is None:
        cert = certificate_for_key(public_key, keyring_certificates())
        if cert is None:
            raise UsageError(f"no certificate for {signer.uri} in the keyseal keyring: give --name and --email to "
                             f"mint one (as keyseal keys mint does)")
        return armor_certificate(cert.binary)
    if name is None or email is None:
        raise UsageError("minting a certificate needs both --name and --email")
    created_at = creation_time(signer, parse_rfc3339(created) if created is not None else None)
    return armor_certificate(mint_certificate(signer, name=name, email=email, created=created_at))


def render(fmt: str, signer: Signer, comment: str | None, principal: str | None, name: str | None,
           email: str | None, created: str | None) -> bytes:
    public_key = signer.public_key()
    if fmt == "pem":
        return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if fmt == "ssh":
        from keyseal._internal.formats import ssh

        line = ssh.public_key_line(public_key, comment if comment is not None else "keyseal")
        return f"{principal} {line}\n".encode() if principal else f"{line}\n".encode()
    if fmt == "minisign":
        from keyseal._internal.formats import minisign

        return minisign.public_key_file(public_key, signer.uri)
    return _openpgp(signer, public_key, name, email, created)


@click.command()
@click.option("--key", "key_uri", required=True, metavar="URI", help="Key URI: file:PATH, awskms:ARN ...")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="openpgp: the certificate (keyring copy, or minted with --name/--email); ssh: a public key "
                   "line; minisign: a public key file (Ed25519); pem: SubjectPublicKeyInfo.")
@click.option("--comment", default=None, help="Comment at the end of the SSH line (default: keyseal).")
@click.option("--principal", default=None,
              help="SSH: prefix the line with this principal, making it an allowed_signers line.")
@click.option("--name", default=None, help="OpenPGP: name in the user ID of a newly minted certificate.")
@click.option("--email", default=None, help="OpenPGP: email address in the user ID of a newly minted certificate.")
@click.option("--created", metavar="RFC3339", default=None, help="OpenPGP: creation time when minting.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not to stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@kms_endpoint_option
@kek_option
def export(key_uri: str, fmt: str, comment: str | None, principal: str | None, name: str | None,
           email: str | None, created: str | None, output: Path | None, force: bool, kms_endpoint: str | None,
           kek: str | None) -> None:
    """Print (or write) the key's public half for a verifier: gpg/sqv, ssh-keygen, minisign or any X.509 tool."""
    if fmt != "ssh" and (comment is not None or principal is not None):
        raise UsageError("--comment and --principal apply to --format ssh only")
    if fmt != "openpgp" and (name is not None or email is not None or created is not None):
        raise UsageError("--name, --email and --created apply to --format openpgp only")
    if principal is not None and (not principal or any(ch.isspace() for ch in principal)):
        raise UsageError("invalid --principal: it must be non-empty and contain no spaces")
    if output is not None:
        refuse_existing(output, force)
    with open_key(key_uri, kms_endpoint, kek) as signer:
        data = render(fmt, signer, comment, principal, name, email, created)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        write_atomic(output, data, mode=0o644, force=force)
        click.echo(str(output))
