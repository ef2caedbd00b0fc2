"""`keyseal bundle fetch`: a node's first trust bundle, pinned by the CA fingerprint (spiffe.bootstrap)."""

from __future__ import annotations

from pathlib import Path

import click

from keyseal._internal.cli.common import json_option

__all__ = ["bundle"]


@click.group("bundle")
def bundle() -> None:
    """Fetch a trust-domain server's trust bundle, pinned by the CA fingerprint it printed at start-up."""


@bundle.command("fetch")
@click.option("--server", "server_url", required=True, metavar="URL",
              help="The trust-domain server, https://HOST:PORT.")
@click.option("--sha256", "fingerprint", required=True, metavar="FINGERPRINT",
              help="SHA-256 of the server's CA certificate, as its start-up log prints it (\"trust bundle CA "
                   "sha256 ...\"); hex, colons allowed.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CA certificates (PEM): the agent's trustBundleFile.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@json_option
def fetch(server_url: str, fingerprint: str, output: Path, force: bool, as_json: bool) -> None:
    """Fetch /v1/bundle and write it only if a CA in it has FINGERPRINT: trust on first use, with a pin."""
    from keyseal._internal.atomic import refuse_existing, write_atomic
    from keyseal._internal.cli.output import print_json, print_labelled
    from keyseal._internal.spiffe.bootstrap import ca_fingerprint, fetch_bundle
    from keyseal._internal.timetext import format_time

    refuse_existing(output, force)
    fetched = fetch_bundle(server_url, fingerprint)
    write_atomic(output, fetched.pem().encode("ascii"), mode=0o644, force=force)
    expires = format_time(int(fetched.pinned.not_valid_after_utc.timestamp()))
    kept = ("the whole bundle (the server's TLS certificate is from the pinned CA)" if fetched.whole_bundle
            else "the pinned CA only (the server's TLS certificate is not from it)")
    if as_json:
        print_json({"output": str(output), "server": server_url, "pinnedSHA256": ca_fingerprint(fetched.pinned),
                    "pinnedExpires": expires, "certificates": len(fetched.certificates),
                    "wholeBundle": fetched.whole_bundle})
        return
    print_labelled([("wrote", output), ("pinned CA", f"sha256 {ca_fingerprint(fetched.pinned)}"),
                    ("pinned CA expires", expires), ("CA certificates", len(fetched.certificates)), ("kept", kept)])
