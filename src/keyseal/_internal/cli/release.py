"""`keyseal checksums` and `keyseal verify-release`: signed checksum manifests for a release."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from keyseal._internal.atomic import refuse_existing, write_atomic
from keyseal._internal.cli.common import json_option
from keyseal._internal.inputfile import read_input
from keyseal._internal.openpgp.fileverify import default_signature_path
from keyseal._internal.openpgp.manifest import DIGESTS, build_manifest
from keyseal._internal.openpgp.trust import (
    POLICIES,
    Combined,
    CrossCheck,
    Resolver,
    TrustSet,
    WkdResolver,
    verify_release,
)
from keyseal._internal.openpgp.wkd import DEFAULT_TIMEOUT, connect_map
from keyseal._internal.progress import files_meter
from keyseal._internal.timetext import format_time
from keyseal.errors import KeysealError, UsageError, VerificationError

__all__ = ["checksums", "verify_release_command"]


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the manifest here (default: standard output).")
@click.option("--digest", type=click.Choice(tuple(DIGESTS)), default="sha256", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def checksums(files: tuple[Path, ...], output: Path | None, digest: str, force: bool) -> None:
    """Write a checksum manifest (`<hex>  <name>` lines, names without directories), then sign it with
    `keyseal sign`."""
    if output is not None:
        refuse_existing(output, force)
        if output.resolve() in {path.resolve() for path in files}:
            raise UsageError(f"refusing to write the manifest over the input file {output}")
    with files_meter(files, "hashing"):
        manifest = build_manifest(files, digest)
    if output is None:
        sys.stdout.buffer.write(manifest)
        return
    write_atomic(output, manifest, mode=0o644, force=force)
    click.echo(str(output))


@click.command("verify-release")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The checksum manifest, e.g. SHA256SUMS.")
@click.option("--sig", "signature", type=click.Path(dir_okay=False, path_type=Path),
              help="Its detached signature (default: MANIFEST.asc, else MANIFEST.sig).")
@click.option("--cert", "certs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A trusted certificate (repeatable).")
@click.option("--wkd", "wkd_emails", metavar="EMAIL", multiple=True,
              help="Cross-check the certificates against the keys the Web Key Directory publishes for EMAIL "
                   "(repeatable: the union of every address's keys must equal the certificates).")
@click.option("--ca-bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificates (PEM) for the WKD's HTTPS (default: the system store).")
@click.option("--connect-to", multiple=True, metavar="HOST:PORT:ADDR:PORT",
              help="Reach HOST:PORT at ADDR:PORT instead (TLS still verifies HOST); repeatable.")
@click.option("--wkd-policy", type=click.Choice(POLICIES), default="fail-closed", show_default=True,
              help="An unreachable WKD aborts (fail-closed) or is skipped with a warning (fail-open). A key "
                   "mismatch always aborts.")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=DEFAULT_TIMEOUT, show_default=True,
              help="WKD network timeout in seconds.")
@click.option("--threshold", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="Require good manifest signatures from K distinct certificates (k of n).")
@json_option
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
def verify_release_command(manifest: Path, signature: Path | None, certs: tuple[Path, ...],
                           wkd_emails: tuple[str, ...], ca_bundle: Path | None, connect_to: tuple[str, ...],
                           wkd_policy: str, timeout: float, threshold: int, as_json: bool,
                           artifacts: tuple[Path, ...]) -> None:
    """Verify the manifest's signature, then every ARTIFACT against the manifest. Exit 0 only if all pass."""
    if not wkd_emails and (ca_bundle or connect_to):
        raise UsageError("--ca-bundle and --connect-to apply to --wkd only")
    try:
        trust: Resolver = TrustSet.from_files(list(certs))
        if wkd_emails:
            endpoints = tuple(connect_map(connect_to).items())
            remotes = [WkdResolver(email, ca_bundle, endpoints, timeout) for email in wkd_emails]
            trust = CrossCheck(trust, remotes[0] if len(remotes) == 1 else Combined(*remotes),
                               wkd_policy,  # type: ignore[arg-type]
                               warn=lambda message: click.echo(f"keyseal: warning: {message}", err=True))
        sig_path = signature or default_signature_path(manifest, "--sig")
        with files_meter(artifacts, "checking"):
            result = verify_release(manifest, read_input(sig_path, "signature"), list(artifacts), trust,
                                    threshold=threshold)
    except (VerificationError, UsageError):
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from exc
    if as_json:
        from keyseal._internal.cli.output import print_json

        print_json({"manifest": str(manifest), "artifacts": [{"path": str(item.path), "ok": True}
                                                              for item in result.artifacts],
                    "signatures": [{"fingerprint": signed.fingerprint, "created": format_time(signed.created)}
                                   for signed in result.signatures]})
        return
    for item in result.artifacts:
        click.echo(f"{item.path}: OK")
    for signed in result.signatures:
        cert = signed.certificate
        uid = cert.user_ids[0] if cert.user_ids else cert.fingerprint
        click.echo(f"Good signature on {manifest} from {uid} ({signed.fingerprint}) made "
                   f"{format_time(signed.created)}", err=True)

