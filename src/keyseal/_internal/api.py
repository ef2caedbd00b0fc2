"""keyseal's Python API: sign and verify files, mint certificates and wrap keys, as the `keyseal` commands do.

The CLI, keyseal-gpg and this API share one composition for each job, so a file signed here is the file
`keyseal sign` writes, checked the same way. Use it as `import keyseal` (`keyseal.sign_file(...)`); only `keyseal`,
`keyseal.errors` and `keyseal.signer` are public, and every failure is a `keyseal.errors.KeysealError` whose
message is one line that says what to do (option names in it are the CLI's).

Keys are named by URI (`file:PATH`, `awskms:ARN`, `pkcs11:...`, `hashivault://...`) or passed as a `Signer`
that `open_signer` returned, to open a remote key once for many calls. Nothing here imports a cloud or HSM SDK
until a key needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

from keyseal.errors import UsageError

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from keyseal._internal.openpgp.trust import ReleaseVerification, Resolver
    from keyseal.signer import HashName, PrivateKey, Signer

__all__ = [
    "CertificateSource",
    "DataSignature",
    "Format",
    "GoodSignature",
    "MintedCertificate",
    "Verification",
    "mint_certificate",
    "open_signer",
    "open_wrapped_key",
    "sign_data",
    "sign_file",
    "sign_files",
    "verify_file",
    "verify_release",
    "wrap_key",
]

Format: TypeAlias = Literal["openpgp", "ssh", "minisign"]
"""The signature formats `sign_file` writes: OpenPGP (FILE.asc / FILE.sig), SSH (FILE.sig, for `ssh-keygen -Y
verify`) and minisign (FILE.minisig, Ed25519 keys only)."""

CertificateSource: TypeAlias = str | os.PathLike[str] | bytes
"""An OpenPGP certificate: a path to an armored or binary file, or the file's bytes."""


def open_signer(uri: str, *, kms_endpoint: str | None = None, kek: str | None = None,
                region: str | None = None) -> Signer:
    """Open the key a URI names, once, for several calls; close it with `with` (or `.close()`).

    Every signature it makes is recorded in keyseal's audit log, whichever custody holds the key. `kek` opens a
    wrapped `file:` key (default: `$KEYSEAL_KEK`, else the local KEK); `kms_endpoint` and `region` are for
    `awskms:` keys.

    Example:
        ```python
        with keyseal.open_signer("awskms:alias/release-signing") as signer:
            keyseal.sign_files(signer, ["dist/a.tar.gz", "dist/b.tar.gz"], certificates=["release-key.asc"])
        ```
    """
    from keyseal._internal.backends import BackendOptions
    from keyseal._internal.backends import open_signer as open_backend

    return open_backend(uri, BackendOptions(kms_endpoint=kms_endpoint, region=region, kek=kek))


def sign_file(key: str | Signer, file: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None,
              format: Format = "openpgp", certificates: Sequence[CertificateSource] = (), armor: bool = True,
              clear: bool = False, digest: HashName | None = None, namespace: str | None = None,
              force: bool = False, append: bool = False, keep_revoked: bool = False,
              kms_endpoint: str | None = None, kek: str | None = None,
              on_warning: Callable[[str], None] | None = None) -> Path:
    """Write a detached signature of one file and return its path (see `sign_files` for every option).

    By default an armored OpenPGP signature FILE.asc; `format="ssh"` writes FILE.sig for `ssh-keygen -Y verify`
    (in `namespace`, default `file`), `format="minisign"` FILE.minisig. An existing signature file is refused
    unless `force` (replace it) or `append` (OpenPGP: add this signature to it, as during a key rotation).

    Example:
        ```python
        keyseal.sign_file("file:release.key", "dist/tool.tar.gz", certificates=["release-key.asc"])
        # -> Path("dist/tool.tar.gz.asc"); gpg --verify and sqv accept it
        keyseal.sign_file("file:ed25519.key", "dist/tool.tar.gz", format="minisign")
        ```
    """
    return sign_files(key, [file], output=output, format=format, certificates=certificates, armor=armor,
                      clear=clear, digest=digest, namespace=namespace, force=force, append=append,
                      keep_revoked=keep_revoked, kms_endpoint=kms_endpoint, kek=kek, on_warning=on_warning)[0]


def sign_files(key: str | Signer, files: Iterable[str | os.PathLike[str]], *,
               output: str | os.PathLike[str] | None = None, format: Format = "openpgp",
               certificates: Sequence[CertificateSource] = (), armor: bool = True, clear: bool = False,
               digest: HashName | None = None, namespace: str | None = None, force: bool = False,
               append: bool = False, keep_revoked: bool = False, jobs: int = 4, kms_endpoint: str | None = None,
               kek: str | None = None, on_warning: Callable[[str], None] | None = None,
               progress: bool = False) -> list[Path]:
    """Sign files, one signature call each (files hashed locally as streams, `jobs` at once); return the
    signature files written, in order. Every conflict (an existing output, two inputs writing one file) is
    refused before anything is signed. This is `keyseal sign`.

    OpenPGP options: `certificates` name the key's certificate (the issuer, its hash preferences; a key that is
    not the certificate's, or is revoked or expired in it, is refused); without one the fingerprint is rebuilt
    from the custody's creation date, as `mint_certificate` does. `armor=False` writes binary FILE.sig,
    `clear=True` a cleartext signed message FILE.asc (as `gpg --clearsign`), `digest` forces a hash. `append`
    adds the signature to an existing signature file after checking that what it holds is over this file;
    a signature by a revoked key in it is refused unless `keep_revoked` (then `on_warning` hears of it; default:
    the `keyseal` logger). `output` names the signature file of a single input. `progress` shows a bar on a
    terminal.

    Example:
        ```python
        # A second signature in the same SHA256SUMS.asc, as in a key rotation's dual-sign window:
        keyseal.sign_files("awskms:alias/release-v2", ["dist/SHA256SUMS"], certificates=["v2.asc"], append=True)
        ```
    """
    from keyseal._internal.formats import filesign as other
    from keyseal._internal.openpgp import filesign
    from keyseal._internal.openpgp.detached import KnownCertificates
    from keyseal._internal.openpgp.fileverify import load_certificates_from

    paths = [Path(file) for file in files]
    out = Path(output) if output is not None else None
    if not paths:
        raise UsageError("no files to sign: give at least one")
    if keep_revoked and not append:
        raise UsageError("--keep-revoked-signatures applies to --append only")
    other.check_sign_options(format, bool(certificates), armor, digest, append, namespace)
    if clear and (format != "openpgp" or not armor or append):
        raise UsageError("--clear makes an armored OpenPGP cleartext message: it takes no --binary, --append or "
                         "--format other than openpgp")
    if not 1 <= jobs <= 64:
        raise UsageError(f"jobs must be between 1 and 64, not {jobs}")
    meter = _progress(paths) if progress else None
    if format != "openpgp":
        pairs = filesign.plan_outputs(paths, out, True, force, append=True, suffix=other.SUFFIXES[format])
        _refuse_existing(pairs, force)
        namespace = other.check_namespace(format, namespace)
        with _opened(key, kms_endpoint, kek) as signer:
            return other.sign_files(format, signer, key if isinstance(key, str) else signer.uri, pairs, namespace,
                                    force, jobs, meter)
    if append and force:
        raise UsageError("--append adds to an existing signature file and --force replaces it: choose one")
    pairs = filesign.plan_outputs(paths, out, armor, force, append)
    certs = load_certificates_from(_sources(certificates))
    policy = filesign.AppendPolicy(KnownCertificates(certs), keep_revoked, on_warning or _log_warning) \
        if append else None
    with _opened(key, kms_endpoint, kek) as signer:
        return filesign.sign_files(signer, certs, pairs, armored=armor, force=force, digest=digest, append=policy,
                                   clear=clear, jobs=jobs, progress=meter)


@dataclass(frozen=True)
class DataSignature:
    """A detached OpenPGP signature over bytes: the signature file's content and what it says."""

    signature: bytes
    fingerprint: str
    """The fingerprint of the key that signed (a subkey's, when a certificate names one)."""
    hash_name: HashName
    created: int
    """Unix seconds."""


def sign_data(key: str | Signer, data: bytes, *, certificates: Sequence[CertificateSource] = (),
              armor: bool = True, digest: HashName | None = None, audit_subject: str | None = None,
              kms_endpoint: str | None = None, kek: str | None = None) -> DataSignature:
    """Sign bytes held in memory (a small document, a git object) with a detached OpenPGP signature: one signature
    call. `audit_subject` is what keyseal's audit log names as the thing signed.

    Example:
        ```python
        signed = keyseal.sign_data("file:release.key", b"hello\\n", certificates=["release-key.asc"])
        Path("hello.asc").write_bytes(signed.signature)
        ```
    """
    from keyseal._internal.openpgp.filesign import sign_data as sign
    from keyseal._internal.openpgp.fileverify import load_certificates_from

    certs = load_certificates_from(_sources(certificates))
    with _opened(key, kms_endpoint, kek) as signer:
        signed = sign(signer, certs, data, armored=armor, digest=digest, subject=audit_subject)
    return DataSignature(signed.data, signed.identity.fingerprint_hex, signed.hash_name, signed.created)


@dataclass(frozen=True)
class GoodSignature:
    """One good signature over a verified file."""

    fingerprint: str
    """The certificate's fingerprint (its primary key's): what `keyseal verify` prints."""
    key_fingerprint: str
    """The fingerprint of the key that signed: the primary key's, or a signing subkey's."""
    created: int
    """When the signature was made (Unix seconds)."""
    hash_name: str
    user_id: str
    """The certificate's first user ID ("" if it has none)."""


@dataclass(frozen=True)
class Verification:
    """The good signatures that made a file valid: one per distinct certificate, at least the threshold."""

    signatures: tuple[GoodSignature, ...]

    @property
    def fingerprint(self) -> str:
        """The first signer's certificate fingerprint (with the default threshold of 1, the signer)."""
        return self.signatures[0].fingerprint


def verify_file(file: str | os.PathLike[str], signature: str | os.PathLike[str] | None = None, *,
                certificates: Sequence[CertificateSource], threshold: int = 1) -> Verification:
    """Check a detached OpenPGP signature over a file against trusted certificates, with keyseal's own verifier
    (no gpg). This is `keyseal verify`.

    The signature is `signature`, else FILE.asc, else FILE.sig. `threshold=K` requires good signatures by K
    distinct certificates (k of n). A signature that does not verify (tampered file, unknown, revoked or expired
    key, weak hash) raises `keyseal.errors.VerificationError`; a missing file or malformed OpenPGP raises the
    `KeysealError` that says so.

    Example:
        ```python
        result = keyseal.verify_file("dist/tool.tar.gz", certificates=["release-key.asc"])
        print(result.fingerprint)
        ```
    """
    from keyseal._internal.openpgp.fileverify import verify_detached

    if threshold < 1:
        raise UsageError(f"threshold must be 1 or more, not {threshold}")
    results = verify_detached(_sources(certificates), file, signature, threshold)
    return Verification(tuple(GoodSignature(r.fingerprint, r.key_fingerprint, r.created, r.hash_name,
                                            r.certificate.user_ids[0] if r.certificate.user_ids else "")
                              for r in results))


def verify_release(manifest: str | os.PathLike[str] | bytes, signature: str | os.PathLike[str] | bytes,
                   artifacts: Sequence[str | os.PathLike[str]], trust: Resolver, *,
                   threshold: int = 1) -> ReleaseVerification:
    """Verify downloaded release artifacts against a signed checksum manifest (SHA256SUMS and its .asc), with keys
    from `trust`: `TrustSet.from_armored(KEY)` embeds them, `CrossCheck(embedded, WkdResolver(address))` also
    requires the author's Web Key Directory to publish the same keys. This is `keyseal verify-release`.

    Any failure raises a `keyseal.errors.VerificationError` (a `TrustError` when the key sources disagree or a
    required one is unreachable) whose message names the failed step.

    Example:
        ```python
        trust = keyseal.CrossCheck(keyseal.TrustSet.from_armored(RELEASE_KEY),
                                   keyseal.WkdResolver("releases@example.org"), policy="fail-closed")
        keyseal.verify_release(dl / "SHA256SUMS", dl / "SHA256SUMS.asc", [dl / "tool-2.0.tar.gz"], trust)
        ```
    """
    from keyseal._internal.openpgp.trust import verify_release as verify

    return verify(manifest if isinstance(manifest, bytes) else Path(manifest),
                  signature if isinstance(signature, bytes) else Path(signature),
                  [Path(artifact) for artifact in artifacts], trust, threshold=threshold)


@dataclass(frozen=True)
class MintedCertificate:
    """A new OpenPGP certificate for a key: what to publish (WKD, keyservers) and give to verifiers."""

    armored: bytes
    """The certificate as an ASCII-armored public key block (`release-key.asc`)."""
    binary: bytes
    fingerprint: str
    user_id: str


def mint_certificate(key: str | Signer, *, name: str, email: str, created: datetime | int | None = None,
                     expires: timedelta | int | None = None, digest: HashName | None = None,
                     kms_endpoint: str | None = None, kek: str | None = None) -> MintedCertificate:
    """Frame a key as an OpenPGP certificate whose self-signature the key's custody computes (one signature
    call). This is `keyseal keys mint`.

    `created` is the key's creation time in the certificate (part of its fingerprint); by default the custody's
    own creation date, so minting again gives the same fingerprint. `expires` is a lifetime after `created`
    (seconds or a timedelta).

    Example:
        ```python
        cert = keyseal.mint_certificate("awskms:alias/release-signing", name="Example Releases",
                                        email="releases@example.org")
        Path("release-key.asc").write_bytes(cert.armored)
        ```
    """
    from datetime import datetime, timedelta

    from keyseal._internal.openpgp.cert import (
        armor_certificate,
        creation_time,
        load_certificates,
        user_id_for,
    )
    from keyseal._internal.openpgp.cert import mint_certificate as mint

    created_at = int(created.timestamp()) if isinstance(created, datetime) else created
    lifetime = int(expires.total_seconds()) if isinstance(expires, timedelta) else expires
    if lifetime is not None and lifetime <= 0:
        raise UsageError("a certificate's lifetime must be positive")
    with _opened(key, kms_endpoint, kek) as signer:
        binary = mint(signer, name=name, email=email, created=creation_time(signer, created_at),
                      expires_seconds=lifetime, hash_name=digest)
    return MintedCertificate(armor_certificate(binary), binary, load_certificates(binary)[0].fingerprint,
                             user_id_for(name, email))


def wrap_key(private_key: PrivateKey, path: str | os.PathLike[str], *, kek: str | None = None,
             force: bool = False, kms_endpoint: str | None = None) -> str:
    """Seal a private key you hold as an envelope-encrypted key record at `path` and return its key URI
    (`file:PATH`), which every function here takes. The key is never written in the clear: a fresh AES-256-GCM
    DEK encrypts it, and the KEK wraps the DEK.

    `kek`: `local` (the KEK file in `$KEYSEAL_HOME`), `local:PATH`, `awskms:<key ARN>` or `vault:[MOUNT/]KEY`;
    default `$KEYSEAL_KEK`, else `local`. A wrap/unwrap round trip checks the KEK before anything is written. An
    existing record is refused unless `force` (its version counter goes on).

    Example:
        ```python
        from cryptography.hazmat.primitives.asymmetric import ed25519

        uri = keyseal.wrap_key(ed25519.Ed25519PrivateKey.generate(), "release.key")  # -> "file:release.key"
        ```
    """
    from keyseal._internal.wrapping.keys import wrap_key_file

    target = Path(path)
    wrap_key_file(target, private_key, kek, force=force, kms_endpoint=kms_endpoint)
    return f"file:{target}"


def open_wrapped_key(path: str | os.PathLike[str], *, kek: str | None = None,
                     kms_endpoint: str | None = None) -> PrivateKey:
    """Open a key record (`wrap_key`, `keyseal keys create`) in memory: authenticated, decrypted with the KEK
    (default as for `wrap_key`) and checked against the records this machine has seen, so a tampered, replayed
    or foreign record raises `keyseal.errors.WrappedRecordError` (or a subclass) instead.

    To sign, prefer `sign_file("file:PATH", ...)`: it opens the record the same way and records each signature
    in the audit log. This is for handing the key to code that needs the key object itself.

    Example:
        ```python
        key = keyseal.open_wrapped_key("release.key", kek="awskms:arn:aws:kms:...:key/...")
        ```
    """
    from keyseal._internal.wrapping.keys import load_wrapped_key_file

    return load_wrapped_key_file(Path(path), kek, kms_endpoint=kms_endpoint).private_key


@contextmanager
def _opened(key: str | Signer, kms_endpoint: str | None, kek: str | None) -> Iterator[Signer]:
    """The signer for `key`: opened (and closed after) for a URI, as given for a Signer the caller owns."""
    if not isinstance(key, str):
        yield key
        return
    with open_signer(key, kms_endpoint=kms_endpoint, kek=kek) as signer:
        yield signer


def _sources(certificates: Sequence[CertificateSource]) -> list[Path | bytes]:
    if isinstance(certificates, str | bytes | os.PathLike):
        raise UsageError("certificates is a list of paths or certificate bytes, not one")
    return [source if isinstance(source, bytes) else Path(source) for source in certificates]


def _refuse_existing(pairs: list[tuple[Path, Path]], force: bool) -> None:
    from keyseal._internal.atomic import refuse_existing

    for _, dst in pairs:
        refuse_existing(dst, force)


def _progress(paths: list[Path]) -> Callable[[], AbstractContextManager[object]]:
    from keyseal._internal.progress import files_meter

    return lambda: files_meter(paths, "signing")


def _log_warning(message: str) -> None:
    import logging

    logging.getLogger("keyseal").warning("%s", message)
