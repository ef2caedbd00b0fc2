"""Detached OpenPGP signatures over files and bytes: the one composition `keyseal sign`, keyseal-gpg's git
signing and the Python API (keyseal.api) share.

It plans every output before anything is signed, checks what an `--append` keeps, names the file in the audit log
and signs each file with one signature call, files hashed concurrently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from keyseal._internal import audit
from keyseal._internal.atomic import write_atomic
from keyseal._internal.inputfile import read_input
from keyseal._internal.openpgp.armor import is_armored
from keyseal._internal.openpgp.cert import Certificate
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
from keyseal._internal.openpgp.signature import SignaturePacket, new_hasher
from keyseal._internal.openpgp.stream import hash_file
from keyseal._internal.openpgp.verify import parse_detached
from keyseal.errors import InputError, OpenPGPError, OutputExistsError, UsageError
from keyseal.signer import HashName, Signer

__all__ = ["AppendPolicy", "DataSignature", "plan_outputs", "sign_data", "sign_files", "signing_identity"]

Warn = Callable[[str], None]


def plan_outputs(files: Sequence[Path], output: Path | None, armored: bool, force: bool,
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
    """What `--append` may keep: `keep_revoked` keeps signatures by revoked keys that no longer count (each kept
    one is reported to `warn`)."""

    known: KnownCertificates
    keep_revoked: bool = False
    warn: Warn | None = None


def signing_identity(signer: Signer, certificates: list[Certificate],
                     digest: HashName | None) -> tuple[SigningIdentity, HashName]:
    """The signer's key as its certificate names it (or as its custody dates it), and the hash to sign with: the
    requested one, else the key's natural hash as far as the certificate's preferences allow."""
    identity = identity_from_certificate(signer, certificates) if certificates else identity_from_signer(signer)
    preferences = next((cert.hash_preferences for cert in certificates
                        if any(e.key.fingerprint == identity.fingerprint for e in cert.signing_keys)), ())
    return identity, choose_hash(signer, identity.public_key, digest, preferences)


def sign_files(signer: Signer, certificates: list[Certificate], pairs: list[tuple[Path, Path]], *, armored: bool,
               force: bool, digest: HashName | None = None, append: AppendPolicy | None = None, clear: bool = False,
               jobs: int = 4, progress: Callable[[], AbstractContextManager[object]] | None = None) -> list[Path]:
    """Sign each (input, output) pair planned by `plan_outputs`; the identity and hash are settled once, before
    any file is hashed. `progress` opens a progress display around the hashing (the CLI's bar)."""
    identity, hash_name = signing_identity(signer, certificates, digest)
    with (progress or nullcontext)(), ThreadPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
        futures = [pool.submit(_sign_one, signer, identity, hash_name, src, dst, armored, force, append, clear)
                   for src, dst in pairs]
        return [future.result() for future in futures]


@dataclass(frozen=True)
class DataSignature:
    """A detached signature over bytes, and its particulars (gpg's SIG_CREATED line reports them)."""

    data: bytes
    identity: SigningIdentity
    hash_name: HashName
    created: int


def sign_data(signer: Signer, certificates: list[Certificate], data: bytes, *, armored: bool = True,
              digest: HashName | None = None, subject: str | None = None, created: int | None = None) -> DataSignature:
    """A binary-document signature over `data` held in memory (a git commit or tag object): one signature call.
    `subject` is what the audit log names."""
    identity, hash_name = signing_identity(signer, certificates, digest)
    hasher = new_hasher(HASH_IDS[hash_name])
    hasher.update(data)
    when = int(time.time()) if created is None else created
    with audit.subject(subject):
        packet = signature_packet(signer, identity, hasher, hash_name, when)
    return DataSignature(render(packet, armored), identity, hash_name, when)


def _sign_one(signer: Signer, identity: SigningIdentity, hash_name: HashName, src: Path, dst: Path,
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
        raise InputError(f"cannot read {dst}: {exc.strerror}") from exc
    try:
        return is_armored(data), parse_detached(data)
    except OpenPGPError as exc:
        raise OpenPGPError(f"cannot append to {dst}: {exc.message}") from exc


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
        raise OpenPGPError(f"cannot append to {dst}: {exc.message}") from exc
    except UsageError as exc:
        raise UsageError(f"{exc.message}: refusing to append to it") from exc
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
    if policy.warn is not None:
        policy.warn(f"kept the signature by revoked key {fingerprint} in {dst} (--keep-revoked-signatures)")
