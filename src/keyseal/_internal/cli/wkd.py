"""`keyseal wkd`: build a Web Key Directory tree to publish, and fetch keys from one."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from keyseal._internal.atomic import refuse_existing, write_atomic
from keyseal._internal.cli.common import json_option
from keyseal._internal.openpgp.armor import KIND_PUBLIC_KEY, armor
from keyseal._internal.openpgp.fileverify import load_certificates_from
from keyseal._internal.openpgp.wkd import DEFAULT_TIMEOUT, METHODS, build_tree, connect_map, fetch, wkd_hash

__all__ = ["build", "fetch_command", "hash_command", "wkd"]


@click.group()
def wkd() -> None:
    """Publish release keys in a Web Key Directory, and look keys up in one."""


@wkd.command()
@click.argument("certs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--domain", required=True, help="The mail domain the directory serves, e.g. example.org.")
@click.option("--email", "emails", multiple=True, metavar="EMAIL",
              help="Publish only this address (repeatable; default: every user ID at --domain).")
@click.option("--method", type=click.Choice(METHODS), default="advanced", show_default=True,
              help="advanced: served by openpgpkey.DOMAIN; direct: served by DOMAIN itself.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory that receives .well-known/.")
@click.option("--submission-address", metavar="ADDR", help="Announce a key submission address in the policy.")
@json_option
def build(certs: tuple[Path, ...], domain: str, emails: tuple[str, ...], method: str, out_dir: Path,
          submission_address: str | None, as_json: bool) -> None:
    """Write the .well-known/openpgpkey tree for CERT... (binary keys, 0644; several keys for one address
    are concatenated, as during a rotation). Prints `<file> <address> <fingerprints>` per address."""
    result = build_tree(load_certificates_from(certs), domain, out_dir, emails=emails,
                        method=method,  # type: ignore[arg-type]
                        submission_address=submission_address)
    if as_json:
        from keyseal._internal.cli.output import print_json

        print_json({"files": [{"path": str(item.path), "address": str(item.address),
                               "fingerprints": list(item.fingerprints)} for item in result.files],
                    "stale": [str(stale) for stale in result.stale]})
    else:
        for item in result.files:
            click.echo(f"{item.path} {item.address} {','.join(item.fingerprints)}")
    for stale in result.stale:
        click.echo(f"keyseal: warning: {stale} is not part of this build and was left in place", err=True)


@wkd.command("fetch")
@click.argument("email")
@click.option("--ca-bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificates (PEM) to verify the server with (default: the system store).")
@click.option("--connect-to", multiple=True, metavar="HOST:PORT:ADDR:PORT",
              help="Reach HOST:PORT at ADDR:PORT instead, like curl's option of that name; TLS still verifies "
                   "the certificate for HOST. Repeatable.")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=DEFAULT_TIMEOUT, show_default=True,
              help="Network timeout in seconds.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the kept certificates here (armored).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@json_option
def fetch_command(email: str, ca_bundle: Path | None, connect_to: tuple[str, ...], timeout: float,
                  output: Path | None, force: bool, as_json: bool) -> None:
    """Fetch the keys published for EMAIL over HTTPS (advanced method, then direct after a 404) and print the
    fingerprints of those with a user ID for EMAIL."""
    if output is not None:
        refuse_existing(output, force)
    result = fetch(email, ca_bundle=ca_bundle, connect_to=connect_map(connect_to), timeout=timeout)
    for dropped in result.dropped:
        click.echo(f"keyseal: warning: dropped {dropped}", err=True)
    if output is not None:
        data = armor(b"".join(cert.binary for cert in result.certificates), KIND_PUBLIC_KEY)
        write_atomic(output, data, mode=0o644, force=force)
    if as_json:
        from keyseal._internal.cli.output import print_json

        print_json({"email": email, "fingerprints": list(result.fingerprints), "url": result.url,
                    "method": result.method, "dropped": [str(d) for d in result.dropped]})
        return
    for fingerprint in result.fingerprints:
        click.echo(fingerprint)
    click.echo(f"from {result.url} ({result.method} method)", err=True)



@wkd.command("hash")
@click.argument("emails", nargs=-1, required=True)
def hash_command(emails: tuple[str, ...]) -> None:
    """Print the WKD hash (the file name under hu/) of each address's local part."""
    from keyseal._internal.openpgp.wkd import parse_address

    for email in emails:
        address = parse_address(email)
        sys.stdout.write(f"{wkd_hash(address.local)} {address}\n")
