"""`keyseal sign`: detached OpenPGP signatures, one signature call per file, files hashed concurrently."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from keyseal.atomic import write_atomic
from keyseal.backends.base import HashName, Signer
from keyseal.cli.common import kms_endpoint_option, load_certificate_files, open_key
from keyseal.errors import InputError, OutputExistsError, UsageError
from keyseal.openpgp.sign import (
    HASH_IDS,
    SigningIdentity,
    choose_hash,
    identity_from_certificate,
    identity_from_signer,
    render,
    signature_packet,
)
from keyseal.openpgp.stream import hash_file


def plan_outputs(files: tuple[Path, ...], output: Path | None, armored: bool, force: bool) -> list[tuple[Path, Path]]:
    """Pair each input with its output and refuse every conflict before anything is signed."""
    if output is not None and len(files) != 1:
        raise UsageError("-o/--output takes exactly one input file")
    suffix = ".asc" if armored else ".sig"
    pairs = [(src, output if output is not None else src.with_name(src.name + suffix)) for src in files]
    inputs = {os.path.realpath(src) for src in files}
    seen: set[str] = set()
    for src, dst in pairs:
        if not src.is_file():
            raise InputError(f"{src} does not exist or is not a file")
        real = os.path.realpath(dst)
        if real in inputs:
            raise OutputExistsError(f"refusing to write the signature over the input file {dst}")
        if real in seen:
            raise UsageError(f"two inputs would write the same signature file {dst}")
        seen.add(real)
        if dst.exists() and not force:
            raise OutputExistsError(f"{dst} exists: refusing to overwrite it (use --force)")
    return pairs


def sign_one(signer: Signer, identity: SigningIdentity, hash_name: HashName, src: Path, dst: Path,
             armored: bool, force: bool) -> Path:
    hasher = hash_file(src, [HASH_IDS[hash_name]])[HASH_IDS[hash_name]]
    packet = signature_packet(signer, identity, hasher, hash_name)
    write_atomic(dst, render(packet, armored), mode=0o644, force=force)
    return dst


@click.command()
@click.option("--key", "key_uri", required=True, metavar="URI", help="Key URI: file:PATH, awskms:ARN ...")
@click.option("--cert", "certs", multiple=True, type=click.Path(path_type=Path),
              help="The key's certificate: names the issuer and refuses a key that is not its key.")
@click.option("--armor/--binary", "armored", default=True, help="FILE.asc (default) or binary FILE.sig.")
@click.option("--digest", type=click.Choice(tuple(HASH_IDS)), default=None, help="Hash (default: the key's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output (one input only).")
@click.option("--force", is_flag=True, help="Overwrite existing signature files.")
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True, help="Files signed at once.")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@kms_endpoint_option
def sign(key_uri: str, certs: tuple[Path, ...], armored: bool, digest: str | None, output: Path | None,
         force: bool, jobs: int, files: tuple[Path, ...], kms_endpoint: str | None) -> None:
    """Write detached OpenPGP signatures that gpg and sqv verify."""
    pairs = plan_outputs(files, output, armored, force)
    certificates = load_certificate_files(certs)
    with open_key(key_uri, kms_endpoint) as signer:
        identity = identity_from_certificate(signer, certificates) if certificates else identity_from_signer(signer)
        hash_name = choose_hash(signer, identity.public_key, digest)  # type: ignore[arg-type]
        with ThreadPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
            futures = [pool.submit(sign_one, signer, identity, hash_name, src, dst, armored, force)
                       for src, dst in pairs]
            written = [future.result() for future in futures]
    for path in written:
        click.echo(str(path))
