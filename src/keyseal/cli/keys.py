"""`keyseal keys`: create keys (local, KMS) and mint their OpenPGP certificates."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from keyseal.atomic import refuse_existing, write_atomic
from keyseal.cli.common import kms_endpoint_option, open_key, parse_duration, parse_rfc3339
from keyseal.errors import UsageError
from keyseal.keygen import KEY_TYPES, generate_private_key
from keyseal.openpgp.cert import armor_certificate, load_certificates, mint_certificate
from keyseal.openpgp.signature import HASH_IDS


@click.group()
def keys() -> None:
    """Create keys and mint their OpenPGP certificates."""


@keys.command()
@click.option("--type", "key_type", type=click.Choice(KEY_TYPES), default="p256", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Local key file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--kms", "in_kms", is_flag=True, help="Create the key inside AWS KMS instead of locally.")
@click.option("--alias", help="KMS alias for --kms, e.g. alias/release-signing.")
@kms_endpoint_option
def create(key_type: str, out: Path | None, force: bool, in_kms: bool, alias: str | None,
           kms_endpoint: str | None) -> None:
    """Create a signing key: a local key file (mode 0600) or a non-exportable KMS key."""
    if in_kms:
        if out is not None or alias is None:
            raise UsageError("--kms needs --alias alias/NAME and takes no --out")
        from keyseal.backends.awskms import create_signing_key

        arn = create_signing_key(alias, key_type, kms_endpoint)
        click.echo(arn)
        click.echo(f"awskms:{arn}")
        return
    if out is None:
        raise UsageError("give --out PATH for a local key, or --kms --alias alias/NAME")
    refuse_existing(out, force)
    key = generate_private_key(key_type)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(out, pem, mode=0o600, force=force)
    click.echo(f"file:{out}")


@keys.command()
@click.option("--key", "key_uri", required=True, metavar="URI", help="Key URI: file:PATH, awskms:ARN ...")
@click.option("--name", required=True, help="Name in the user ID.")
@click.option("--email", required=True, help="Email address in the user ID.")
@click.option("--created", metavar="RFC3339", help="Key creation time (default: the custody's creation date).")
@click.option("--expires", metavar="DURATION", help="Key expiry after creation, e.g. 2y, 365d.")
@click.option("--digest", type=click.Choice(tuple(HASH_IDS)), default=None, help="Hash for the self-signature.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the certificate here.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@kms_endpoint_option
def mint(key_uri: str, name: str, email: str, created: str | None, expires: str | None, digest: str | None,
         output: Path | None, force: bool, kms_endpoint: str | None) -> None:
    """Frame the key as an OpenPGP certificate whose self-signature the key's custody computes."""
    expires_seconds = parse_duration(expires) if expires else None
    if output is not None:
        refuse_existing(output, force)
    with open_key(key_uri, kms_endpoint) as signer:
        if created is not None:
            created_at = parse_rfc3339(created)
        else:
            moment = signer.created_at()
            if moment is None:
                raise UsageError(f"cannot tell when {key_uri} was created: pass --created RFC3339")
            created_at = int(moment.timestamp())
        binary = mint_certificate(
            signer, name=name, email=email, created=created_at, expires_seconds=expires_seconds,
            hash_name=digest,  # type: ignore[arg-type]
        )
    armored = armor_certificate(binary)
    fingerprint = load_certificates(binary)[0].fingerprint
    if output is None:
        sys.stdout.buffer.write(armored)
        click.echo(fingerprint, err=True)
    else:
        write_atomic(output, armored, mode=0o644, force=force)
        click.echo(fingerprint)
