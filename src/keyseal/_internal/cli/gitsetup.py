"""`keyseal git-setup`: make git sign commits and tags with a keyseal key, OpenPGP or SSH.

It registers the key with keyseal (the key map in `$KEYSEAL_HOME/keys.toml`; for OpenPGP the certificate in the
keyring, for SSH with --principal a line in `$KEYSEAL_HOME/allowed_signers`), then prints the `git config`
commands, or runs them with --apply.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click

from keyseal._internal.cli.common import open_key
from keyseal._internal.inputfile import read_input
from keyseal.errors import UsageError
from keyseal.signer import PublicKey

__all__ = ["GPG_PROGRAM", "SSH_PROGRAM", "absolute_file_uri", "git_setup", "program_path"]

GPG_PROGRAM = "keyseal-gpg"
SSH_PROGRAM = "keyseal-ssh-keygen"


def program_path(name: str) -> str:
    """The console script beside the running Python (the same keyseal install), else on PATH, else the name."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name) or name


def absolute_file_uri(uri: str) -> str:
    """`file:PATH` with an absolute path: git runs the signer from whichever repository directory it is in."""
    scheme, _, rest = uri.partition(":")
    if scheme != "file" or rest.startswith("//"):
        return uri
    return f"file:{Path(rest).expanduser().absolute()}"


def _openpgp_settings(signer_uri: str, public_key: PublicKey, cert_path: Path | None) -> tuple[list[tuple[str, str]],
                                                                                            list[str]]:
    from keyseal._internal.formats import ssh
    from keyseal._internal.openpgp.cert import load_certificates
    from keyseal._internal.openpgp.keyring import (
        KeyEntry,
        add_certificate,
        certificate_for_key,
        keyring_certificates,
        save_entry,
    )
    from keyseal._internal.openpgp.keys import same_public_key

    if cert_path is not None:
        data = read_input(cert_path, "certificate")
        loaded = load_certificates(data, str(cert_path))
        if len(loaded) != 1:
            raise UsageError(f"{cert_path} holds {len(loaded)} certificates: give the key's only")
        if not any(same_public_key(entry.key.public_key, public_key) for entry in loaded[0].signing_keys):
            raise UsageError(f"{cert_path} is not a certificate of {signer_uri}'s key")
        cert = add_certificate(data, str(cert_path))
    else:
        found = certificate_for_key(public_key, keyring_certificates())
        if found is None:
            raise UsageError(f"no certificate of {signer_uri} in the keyseal keyring: give --cert CERT (made by "
                             f"keyseal keys mint --key {signer_uri} ... -o CERT)")
        cert = found
    entry = next(e for e in cert.signing_keys if same_public_key(e.key.public_key, public_key))
    keys_file = save_entry(KeyEntry(signer_uri, openpgp=entry.key.fingerprint_hex,
                                    ssh=ssh.fingerprint(public_key)))
    settings = [("gpg.format", "openpgp"), ("gpg.program", program_path(GPG_PROGRAM)),
                ("user.signingkey", cert.fingerprint)]
    notes = [f"certificate {cert.fingerprint} is in the keyseal keyring ({cert.user_ids[0] if cert.user_ids else ''})",
             f"{cert.fingerprint} signs with {signer_uri} ({keys_file})"]
    return settings, notes


def _ssh_settings(signer_uri: str, public_key: PublicKey, principal: str | None) -> tuple[list[tuple[str, str]],
                                                                                     list[str]]:
    from keyseal._internal.formats import ssh
    from keyseal._internal.openpgp.keyring import KeyEntry, add_allowed_signer, save_entry

    line = ssh.public_key_line(public_key, "keyseal")
    fingerprint = ssh.fingerprint(public_key)
    keys_file = save_entry(KeyEntry(signer_uri, ssh=fingerprint))
    settings = [("gpg.format", "ssh"), ("gpg.ssh.program", program_path(SSH_PROGRAM)),
                ("user.signingkey", f"key::{line}")]
    notes = [f"{fingerprint} signs with {signer_uri} ({keys_file})"]
    if principal is not None:
        allowed = add_allowed_signer(principal, line)
        settings.append(("gpg.ssh.allowedSignersFile", str(allowed)))
        notes.append(f"{principal} may sign with {fingerprint} ({allowed})")
    return settings, notes


@click.command("git-setup")
@click.option("--key", "key_uri", required=True, metavar="URI", help="Key URI: awskms:..., pkcs11:..., file:...")
@click.option("--format", "fmt", type=click.Choice(("openpgp", "ssh")), default="openpgp", show_default=True,
              help="openpgp: keyseal-gpg as gpg.program; ssh: keyseal-ssh-keygen as gpg.ssh.program.")
@click.option("--cert", "cert_path", type=click.Path(dir_okay=False, path_type=Path),
              help="OpenPGP: the key's certificate (keyseal keys mint), added to the keyseal keyring.")
@click.option("--principal", default=None,
              help="SSH: add PRINCIPAL and the key to keyseal's allowed_signers and point git at it.")
@click.option("--apply", "apply_config", is_flag=True, help="Run the git config commands instead of printing them.")
@click.option("--global", "global_scope", is_flag=True, help="git config --global (default: --local, this repo).")
@click.option("--sign-by-default/--no-sign-by-default", default=True, show_default=True,
              help="Also set commit.gpgSign and tag.gpgSign.")
def git_setup(key_uri: str, fmt: str, cert_path: Path | None, principal: str | None, apply_config: bool,
              global_scope: bool, sign_by_default: bool) -> None:
    """Register a key for git signing and print (or --apply) the git config that uses it.

    git runs keyseal with no options: the environment names the KMS endpoint (AWS_ENDPOINT_URL_KMS) and the KEK
    of a wrapped key (KEYSEAL_KEK), for this command as for every signature.
    """
    from keyseal._internal.openpgp.keyring import check_storable_uri

    if fmt == "ssh" and cert_path is not None:
        raise UsageError("--cert applies to --format openpgp only")
    if fmt == "openpgp" and principal is not None:
        raise UsageError("--principal applies to --format ssh only")
    key_uri = absolute_file_uri(key_uri)
    check_storable_uri(key_uri)
    with open_key(key_uri, None) as signer:
        public_key = signer.public_key()
        if fmt == "openpgp":
            settings, notes = _openpgp_settings(key_uri, public_key, cert_path)
        else:
            from keyseal._internal.formats import ssh

            ssh.scheme_for(signer, public_key)
            settings, notes = _ssh_settings(key_uri, public_key, principal)
    if sign_by_default:
        settings += [("commit.gpgSign", "true"), ("tag.gpgSign", "true")]
    scope = "--global" if global_scope else "--local"
    for note in notes:
        click.echo(f"keyseal: {note}", err=True)
    for name, value in settings:
        command = ["git", "config", scope, name, value]
        if not apply_config:
            click.echo(shlex.join(command))
            continue
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["git config failed"])[-1]
            raise UsageError(f"git config {scope} {name} failed: {reason}")
        click.echo(f"{name} = {value}")
