"""`keyseal sign`: detached OpenPGP signatures (or, with --clear, cleartext signed messages), one signature call
per file, files hashed concurrently."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from keyseal._internal import audit
from keyseal._internal.atomic import refuse_existing, write_atomic
from keyseal._internal.cli.common import kek_option, kms_endpoint_option, load_certificate_files, open_key
from keyseal._internal.cli.formats import FORMATS, SUFFIXES, check_sign_options, sign_files
from keyseal._internal.inputfile import read_input
from keyseal._internal.openpgp.armor import is_armored
from keyseal._internal.openpgp.detached import (
    KnownCertificates,
    check_signatures_over,
    encode_signatures,
    revoked_signer,
)
from keyseal._internal.openpgp.sign import (
    HASH_IDS,
    SigningIdentity,
    choose_hash,
    cleartext_document,
    identity_from_certificate,
    identity_from_signer,
    render,
    signature_packet,
)
from keyseal._internal.openpgp.signature import SignaturePacket
from keyseal._internal.openpgp.stream import hash_file
from keyseal._internal.openpgp.verify import parse_detached
from keyseal._internal.progress import files_meter
from keyseal.errors import InputError, OpenPGPError, OutputExistsError, UsageError
from keyseal.signer import HashName, Signer


def plan_outputs(files: tuple[Path, ...], output: Path | None, armored: bool, force: bool,
                 append: bool = False, suffix: str | None = None) -> list[tuple[Path, Path]]:
    """Pair each input with its output and refuse every conflict before anything is signed."""
    if output is not None and len(files) != 1:
        raise UsageError("-o/--output takes exactly one input file")
    suffix = suffix or (".asc" if armored else ".sig")
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
        if dst.exists() and not force and not append:
            raise OutputExistsError(f"{dst} exists: refusing to overwrite it (use --force, or --append to add "
                                    f"a signature to it)")
    return pairs


@dataclass(frozen=True)
class AppendPolicy:
    """What `--append` may keep: `keep_revoked` keeps signatures by revoked keys that no longer count."""

    known: KnownCertificates
    keep_revoked: bool = False


def sign_one(signer: Signer, identity: SigningIdentity, hash_name: HashName, src: Path, dst: Path,
             armored: bool, force: bool, append: AppendPolicy | None = None, clear: bool = False) -> Path:
    # The audit log names the file; set here, in the worker thread, since pool threads do not inherit contexts.
    with audit.subject(os.path.abspath(src)):
        if clear:
            document = cleartext_document(signer, identity, hash_name, read_input(src, "file"))
            write_atomic(dst, document, mode=0o644, force=force)
            return dst
        if append is not None and (existing := _existing_signatures(dst)) is not None:
            return _append_one(signer, identity, hash_name, src, dst, *existing, append)
        hasher = hash_file(src, [HASH_IDS[hash_name]])[HASH_IDS[hash_name]]
        packet = signature_packet(signer, identity, hasher, hash_name)
    write_atomic(dst, render(packet, armored), mode=0o644, force=force)
    return dst


def _existing_signatures(dst: Path) -> tuple[bool, list[SignaturePacket]] | None:
    """(armored?, signatures) of an existing detached signature file, None if there is none."""
    try:
        data = dst.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read {dst}: {exc.strerror}") from None
    try:
        return is_armored(data), parse_detached(data)
    except OpenPGPError as exc:
        raise OpenPGPError(f"cannot append to {dst}: {exc.message}") from None


def _append_one(signer: Signer, identity: SigningIdentity, hash_name: HashName, src: Path, dst: Path,
                armored: bool, existing: list[SignaturePacket], policy: AppendPolicy) -> Path:
    """Add a signature to `dst`, in its armor, after checking that what it holds is over this file: a stale
    signature (from another build of the file) would otherwise ride along in a file that verifies. A signature
    by a revoked key that no longer counts is refused too (unless `policy.keep_revoked`): beside a new one it
    would still verify for every client that has not seen the revocation."""
    hash_id = HASH_IDS[hash_name]
    for sig in existing:
        if sig.issuer_fingerprint == identity.fingerprint:
            raise UsageError(f"{dst} already holds a signature by {identity.fingerprint_hex}")
    try:
        hashers, digests = check_signatures_over(src, existing, str(dst), (hash_id,))
    except OpenPGPError as exc:
        raise OpenPGPError(f"cannot append to {dst}: {exc.message}") from None
    except UsageError as exc:
        raise UsageError(f"{exc.message}: refusing to append to it") from None
    for sig, digest in zip(existing, digests, strict=True):
        _check_revocation(sig, digest, dst, policy)
    packet = signature_packet(signer, identity, hashers[hash_id], hash_name)
    kept = encode_signatures(existing)
    write_atomic(dst, render(kept + packet, armored), mode=0o644, force=True)
    return dst


def _check_revocation(sig: SignaturePacket, digest: bytes, dst: Path, policy: AppendPolicy) -> None:
    """Refuse (or, when asked, keep with a warning) a signature that a known key provably made and that does not
    count because the key is revoked: by the verifier's own rule, all of a compromised key's signatures, and a
    superseded or retired key's from its revocation on (earlier ones still count and are kept silently)."""
    revoked = revoked_signer(sig, digest, policy.known.all())
    if revoked is None:
        return
    fingerprint, problem = revoked
    if not policy.keep_revoked:
        raise UsageError(f"{dst} holds a signature that no longer counts ({problem}): refusing to keep it "
                         f"beside the new one; remove it, or pass --keep-revoked-signatures to keep it anyway")
    click.echo(f"keyseal: warning: kept the signature by revoked key {fingerprint} in {dst} "
               f"(--keep-revoked-signatures)", err=True)


@click.command()
@click.option("--key", "key_uri", required=True, metavar="URI", help="Key URI: file:PATH, awskms:ARN ...")
@click.option("--cert", "certs", multiple=True, type=click.Path(path_type=Path),
              help="The key's certificate: names the issuer and refuses a key that is not its key.")
@click.option("--armor/--binary", "armored", default=True, help="FILE.asc (default) or binary FILE.sig.")
@click.option("--clear", is_flag=True,
              help="A cleartext signed message FILE.asc (the text, readable, then its signature), as gpg "
                   "--clearsign writes it: for text such as APT's InRelease or Debian .dsc/.changes files.")
@click.option("--digest", type=click.Choice(tuple(HASH_IDS)), default=None, help="Hash (default: the key's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output (one input only).")
@click.option("--force", is_flag=True, help="Overwrite existing signature files.")
@click.option("--append", is_flag=True,
              help="Add the signature to an existing signature file, in its armor (dual signing during a key "
                   "rotation); without one, sign as usual.")
@click.option("--keep-revoked-signatures", "keep_revoked", is_flag=True,
              help="With --append: keep a signature already in the file although its key is revoked and it no "
                   "longer counts (refused by default; --cert and the keyring tell which keys are revoked).")
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True, help="Files signed at once.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="openpgp", show_default=True,
              help="openpgp: FILE.asc; ssh: FILE.sig for ssh-keygen -Y verify; minisign: FILE.minisig (Ed25519).")
@click.option("--namespace", default=None, help="SSH signature namespace (--format ssh; default: file).")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@kms_endpoint_option
@kek_option
def sign(key_uri: str, certs: tuple[Path, ...], armored: bool, clear: bool, digest: str | None,
         output: Path | None, force: bool, append: bool, keep_revoked: bool, jobs: int, fmt: str,
         namespace: str | None, files: tuple[Path, ...], kms_endpoint: str | None, kek: str | None) -> None:
    """Write detached signatures: OpenPGP (gpg and sqv verify them), SSH or minisign; or cleartext signed
    OpenPGP messages (--clear)."""
    if keep_revoked and not append:
        raise UsageError("--keep-revoked-signatures applies to --append only")
    check_sign_options(fmt, certs, armored, digest, append, namespace)
    if clear and (fmt != "openpgp" or not armored or append):
        raise UsageError("--clear makes an armored OpenPGP cleartext message: it takes no --binary, --append or "
                         "--format other than openpgp")
    if fmt != "openpgp":
        pairs = plan_outputs(files, output, True, force, append=True, suffix=SUFFIXES[fmt])
        for _, dst in pairs:
            refuse_existing(dst, force)
        with files_meter([src for src, _ in pairs], "signing"):
            written = sign_files(fmt, key_uri, pairs, namespace, force, jobs, kms_endpoint, kek)
        for path in written:
            click.echo(str(path))
        return
    if append and force:
        raise UsageError("--append adds to an existing signature file and --force replaces it: choose one")
    pairs = plan_outputs(files, output, armored, force, append)
    certificates = load_certificate_files(certs)
    policy = AppendPolicy(KnownCertificates(certificates), keep_revoked) if append else None
    with open_key(key_uri, kms_endpoint, kek) as signer:
        identity = identity_from_certificate(signer, certificates) if certificates else identity_from_signer(signer)
        preferences = next((cert.hash_preferences for cert in certificates
                            if any(e.key.fingerprint == identity.fingerprint for e in cert.signing_keys)), ())
        hash_name = choose_hash(signer, identity.public_key, digest, preferences)  # type: ignore[arg-type]
        with files_meter([src for src, _ in pairs], "signing"), \
                ThreadPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
            futures = [pool.submit(sign_one, signer, identity, hash_name, src, dst, armored, force, policy, clear)
                       for src, dst in pairs]
            written = [future.result() for future in futures]
    for path in written:
        click.echo(str(path))
