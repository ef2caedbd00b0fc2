"""`keyseal keys`: create keys (local, KMS) and mint their OpenPGP certificates."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from keyseal._internal.atomic import refuse_existing, write_atomic
from keyseal._internal.cli.common import (
    KEK_DEFAULT,
    KEK_SPECS,
    json_option,
    kek_option,
    kms_endpoint_option,
    open_key,
    parse_duration,
    parse_rfc3339,
)
from keyseal._internal.cli.export import export
from keyseal._internal.cli.output import print_json
from keyseal._internal.inputfile import read_input
from keyseal._internal.keygen import KEY_TYPES, generate_private_key
from keyseal._internal.openpgp.cert import (
    Certificate,
    armor_certificate,
    load_certificates,
    user_id_for,
)
from keyseal._internal.openpgp.revoke import REASONS
from keyseal._internal.openpgp.revoke import revoke as revoke_certificate
from keyseal._internal.openpgp.signature import HASH_IDS
from keyseal.errors import UsageError

__all__ = ["create", "keys", "mint", "revoke", "rewrap", "rotate"]


@click.group()
def keys() -> None:
    """Create keys and mint their OpenPGP certificates."""


@keys.command()
@click.option("--type", "key_type", type=click.Choice(KEY_TYPES), default="p256", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Local key file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--kms", "in_kms", is_flag=True, help="Create the key inside AWS KMS instead of locally.")
@click.option("--alias", help="KMS alias for --kms, e.g. alias/release-signing.")
@click.option("--pkcs11", "pkcs11_uri", metavar="URI",
              help="Create the key inside a PKCS#11 token: pkcs11:token=T;object=LABEL?module-path=SO")
@click.option("--vault", "vault_uri", metavar="URI",
              help="Create a non-exportable Vault / OpenBao Transit key: hashivault://[MOUNT/]NAME (VAULT_ADDR).")
@click.option("--kek", metavar="KEK", default=None,
              help=f"The KEK that wraps the new --out key: {KEK_SPECS} ({KEK_DEFAULT}).")
@click.option("--unencrypted", is_flag=True, help="Write --out as a clear PKCS#8 PEM instead of a wrapped record.")
@kms_endpoint_option
@json_option
def create(key_type: str, out: Path | None, force: bool, in_kms: bool, alias: str | None,
           pkcs11_uri: str | None, vault_uri: str | None, kek: str | None, unencrypted: bool,
           kms_endpoint: str | None, as_json: bool) -> None:
    """Create a signing key: a local key file (mode 0600), a non-exportable KMS or Transit key, or one in an HSM.

    A local key is written as an envelope-encrypted record (wrapped by --kek) unless --unencrypted is given.
    """
    if (kek is not None or unencrypted) and (in_kms or pkcs11_uri is not None):
        raise UsageError("--kek and --unencrypted apply to a local --out key only, not to --kms or --pkcs11")
    if kek is not None and unencrypted:
        raise UsageError("--unencrypted writes a clear key: it takes no --kek")
    if vault_uri is not None:
        if in_kms or pkcs11_uri is not None or out is not None or alias is not None or kek is not None or unencrypted:
            raise UsageError("--vault takes only --type: no --out, --kms, --alias, --pkcs11, --kek or --unencrypted")
        from keyseal._internal.backends.hashivault import create_transit_key

        _created(as_json, create_transit_key(vault_uri, key_type), key_type)
        return
    if pkcs11_uri is not None:
        if in_kms or out is not None or alias is not None:
            raise UsageError("--pkcs11 takes no --out, --kms or --alias")
        from keyseal._internal.backends.pkcs11 import create_key
        from keyseal._internal.providers.pkcs11.uri import without_pin_value

        create_key(pkcs11_uri, key_type)
        _created(as_json, without_pin_value(pkcs11_uri), key_type)
        return
    if in_kms:
        if out is not None or alias is None:
            raise UsageError("--kms needs --alias alias/NAME and takes no --out")
        from keyseal._internal.providers.aws.kms import create_signing_key

        arn = create_signing_key(alias, key_type, kms_endpoint)
        if as_json:
            _created(as_json, f"awskms:{arn}", key_type, arn=arn)
        else:  # the ARN, then the key URI: two lines scripts already read
            click.echo(arn)
            click.echo(f"awskms:{arn}")
        return
    if out is None:
        raise UsageError("give --out PATH for a local key, or --kms --alias alias/NAME")
    if not unencrypted:
        from keyseal._internal.wrapping.kek import configured_kek_spec
        from keyseal._internal.wrapping.keys import create_wrapped_key_file

        create_wrapped_key_file(out, key_type, configured_kek_spec(kek), force=force, kms_endpoint=kms_endpoint)
        _created(as_json, f"file:{out}", key_type, wrapped=True)
        return
    refuse_existing(out, force)
    key = generate_private_key(key_type)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(out, pem, mode=0o600, force=force)
    _created(as_json, f"file:{out}", key_type, wrapped=False)


def _created(as_json: bool, uri: str, key_type: str, **extra: object) -> None:
    """The new key's URI (what --key takes next), or with --json a document that also names its type."""
    if as_json:
        print_json({"uri": uri, "type": key_type, **extra})
    else:
        click.echo(uri)


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
@kek_option
@json_option
def mint(key_uri: str, name: str, email: str, created: str | None, expires: str | None, digest: str | None,
         output: Path | None, force: bool, kms_endpoint: str | None, kek: str | None, as_json: bool) -> None:
    """Frame the key as an OpenPGP certificate whose self-signature the key's custody computes."""
    from keyseal._internal import api

    expires_seconds = parse_duration(expires) if expires else None
    if output is not None:
        refuse_existing(output, force)
    minted = api.mint_certificate(key_uri, name=name, email=email,
                                  created=parse_rfc3339(created) if created is not None else None,
                                  expires=expires_seconds, digest=digest,  # type: ignore[arg-type]
                                  kms_endpoint=kms_endpoint, kek=kek)
    if output is None:
        if as_json:
            raise UsageError("--json prints a document about the certificate: give -o FILE for the certificate")
        sys.stdout.buffer.write(minted.armored)
        click.echo(minted.fingerprint, err=True)
    else:
        write_atomic(output, minted.armored, mode=0o644, force=force)
        if as_json:
            print_json({"fingerprint": minted.fingerprint, "output": str(output), "userID": minted.user_id})
        else:
            click.echo(minted.fingerprint)


@keys.command()
@click.option("--kek", required=True, metavar="KEK", help=f"The new KEK: {KEK_SPECS}.")
@click.option("--from-kek", metavar="KEK", default=None,
              help=f"The records' current KEK: {KEK_SPECS} ({KEK_DEFAULT}; a record already under --kek is "
                   f"opened with it).")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@kms_endpoint_option
def rewrap(kek: str, from_kek: str | None, paths: tuple[Path, ...], kms_endpoint: str | None) -> None:
    """Re-encrypt wrapped key records under a new KEK of the same provider (KEK rotation).

    Each record gets a fresh DEK and nonce and its version goes up by one; the key itself is never written in
    the clear.
    """
    from keyseal._internal.wrapping.keys import rewrap_files

    for path, record in zip(paths, rewrap_files(paths, kek, from_kek, kms_endpoint=kms_endpoint), strict=True):
        click.echo(f"file:{path} version {record.version}")


_ROTATE_KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384", "p521", "ed25519")
_USER_ID = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<email>[^<>]+)>$")


def _user_id_parts(certificate: Certificate) -> tuple[str, str]:
    for user_id in certificate.user_ids:
        match = _USER_ID.match(user_id)
        if match and match["name"].strip():
            return match["name"].strip(), match["email"]
    raise UsageError(f"certificate {certificate.fingerprint} has no 'Name <email>' user ID: give --name and --email")


def _rotation_user_id(cert_path: Path | None, name: str | None,
                      email: str | None) -> tuple[Certificate | None, str, str]:
    """The current certificate (if given) and the user ID parts for the new one; checked before any key exists."""
    current_cert = None
    if cert_path is not None:
        loaded = load_certificates(read_input(cert_path, "certificate"), str(cert_path))
        if len(loaded) != 1:
            raise UsageError(f"{cert_path} holds {len(loaded)} certificates: give the current key's only")
        current_cert = loaded[0]
        if name is None or email is None:
            cert_name, cert_email = _user_id_parts(current_cert)
            name, email = name or cert_name, email or cert_email
    if name is None or email is None:
        raise UsageError("give --cert with the current certificate, or --name and --email")
    user_id_for(name, email)
    return current_cert, name, email


@keys.command()
@click.option("--kms", "in_kms", is_flag=True, help="Rotate an AWS KMS key named by --alias.")
@click.option("--alias", help="The current KMS key's alias, e.g. alias/release-signing.")
@click.option("--pkcs11", "pkcs11_uri", metavar="URI",
              help="Rotate a PKCS#11 key: the current key's URI, e.g. pkcs11:token=T;object=release.")
@click.option("--cert", "cert_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The current key's certificate: its user ID is reused (and it must be the current key's).")
@click.option("--name", help="Name in the new user ID (default: from --cert).")
@click.option("--email", help="Email address in the new user ID (default: from --cert).")
@click.option("--type", "key_type", type=click.Choice(_ROTATE_KEY_TYPES), default=None,
              help="Type of the new key (default: the current key's).")
@click.option("--created", metavar="RFC3339",
              help="Creation time for the new certificate (default: KMS's; for PKCS#11, when the key is made).")
@click.option("--expires", metavar="DURATION", help="Key expiry after creation, e.g. 2y, 365d.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the new certificate.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@kms_endpoint_option
def rotate(in_kms: bool, alias: str | None, pkcs11_uri: str | None, cert_path: Path | None, name: str | None,
           email: str | None, key_type: str | None, created: str | None, expires: str | None,
           output: Path | None, force: bool, kms_endpoint: str | None) -> None:
    """Create the next key version and mint its certificate with the same user ID: alias/NAME-v2, -v3 ... in
    KMS; LABEL-v2, -v3 ... on the same PKCS#11 token (non-extractable, like keys create --pkcs11).

    The current key is left as it is: dual-sign with both (`keyseal sign --append`) until clients trust the new
    one; see the rotation runbook in the README.
    """
    from keyseal._internal.release.rotation import RotationRequest, rotate_kms, rotate_pkcs11

    if pkcs11_uri is not None:
        if in_kms or alias is not None:
            raise UsageError("--pkcs11 URI rotates a PKCS#11 key: it takes no --kms or --alias")
    elif not in_kms or alias is None:
        raise UsageError("keys rotate needs the current key: --kms --alias alias/NAME, or --pkcs11 URI")
    expires_seconds = parse_duration(expires) if expires else None
    created_at = parse_rfc3339(created) if created else None
    if output is not None:
        refuse_existing(output, force)
    current_cert, name, email = _rotation_user_id(cert_path, name, email)
    request = RotationRequest(name, email, current_cert, key_type, created_at, expires_seconds)
    if pkcs11_uri is not None:
        rotated = rotate_pkcs11(pkcs11_uri, request)
    else:
        assert alias is not None
        rotated = rotate_kms(alias, request, kms_endpoint)
    armored = armor_certificate(rotated.certificate)
    if output is None:
        sys.stdout.buffer.write(armored)
        for line in rotated.report:
            click.echo(line, err=True)
    else:
        write_atomic(output, armored, mode=0o644, force=force)
        for line in rotated.report:
            click.echo(line)


@keys.command()
@click.option("--key", "key_uri", required=True, metavar="URI", help="The certificate's key: file:PATH, awskms:...")
@click.option("--cert", "cert_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The certificate to revoke.")
@click.option("--reason", required=True, type=click.Choice(tuple(REASONS)),
              help="compromised: every signature becomes invalid; superseded/retired: those made from now on.")
@click.option("--description", default="", help="A one-line note carried in the revocation.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the revoked certificate here (default: standard output).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@kms_endpoint_option
@kek_option
def revoke(key_uri: str, cert_path: Path, reason: str, description: str, output: Path | None, force: bool,
           kms_endpoint: str | None, kek: str | None) -> None:
    """Write the certificate with a revocation signature that its key computes. Publish it where the
    certificate is published (WKD, release page); `gpg --import` merges it into a keyring."""
    loaded = load_certificates(read_input(cert_path, "certificate"), str(cert_path))
    if len(loaded) != 1:
        raise UsageError(f"{cert_path} holds {len(loaded)} certificates: give the one to revoke")
    if output is not None:
        refuse_existing(output, force)
    with open_key(key_uri, kms_endpoint, kek) as signer:
        binary = revoke_certificate(signer, loaded[0], reason, description=description)
    armored = armor_certificate(binary)
    if output is None:
        sys.stdout.buffer.write(armored)
    else:
        write_atomic(output, armored, mode=0o644, force=force)
    click.echo(f"{loaded[0].fingerprint} revoked ({reason})", err=output is None)


keys.add_command(export)  # `keys export`: public keys in every format (cli/export.py)
