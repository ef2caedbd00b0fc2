"""Trust sets for a tool that verifies its own updates, and `verify_release` for the whole flow.

A tool embeds its release key(s) as armored text (`TrustSet.from_armored`). To survive a stolen or replaced
embedded copy on one side and a hijacked web server on the other, `CrossCheck` also fetches the keys from the
author's Web Key Directory and compares the two sorted fingerprint sets: any difference aborts, whatever the
policy. The only choice is what an unreachable directory means: abort (`fail-closed`, the default) or carry on
with the embedded keys and a warning (`fail-open`).

When both agree, the two copies of each key are merged, so a revocation the author published on the directory
reaches every client that still embeds the old copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from keyseal._internal.inputfile import read_input
from keyseal._internal.openpgp.cert import Certificate, load_certificates, merge_certificates
from keyseal._internal.openpgp.manifest import CheckedArtifact, check_artifacts, parse_manifest
from keyseal._internal.openpgp.verify import MIN_RSA_BITS, VerifiedSignature, verify_threshold_bytes
from keyseal._internal.openpgp.wkd import DEFAULT_TIMEOUT, Endpoint, fetch
from keyseal.errors import (
    KeysealError,
    OpenPGPError,
    TrustError,
    VerificationError,
    WkdUnavailableError,
)

__all__ = [
    "POLICIES",
    "Combined",
    "CrossCheck",
    "Policy",
    "ReleaseVerification",
    "Resolver",
    "TrustSet",
    "WkdResolver",
    "check_certificate",
    "verify_release",
]

Policy = Literal["fail-closed", "fail-open"]
POLICIES: tuple[Policy, ...] = ("fail-closed", "fail-open")
log = logging.getLogger("keyseal.trust")


@dataclass(frozen=True)
class TrustSet:
    """Certificates trusted to sign releases, each checked when the set is made."""

    certificates: tuple[Certificate, ...]
    source: str = "trusted keys"

    def __post_init__(self) -> None:
        if not self.certificates:
            raise TrustError(f"{self.source} hold no certificate")
        for cert in self.certificates:
            check_certificate(cert, self.source)

    @classmethod
    def from_armored(cls, *blocks: str | bytes, source: str = "embedded keys") -> TrustSet:
        """From armored (or binary) certificates embedded in a program. A malformed or weak key is an error."""
        certificates: list[Certificate] = []
        for block in blocks:
            try:
                data = block.encode("ascii") if isinstance(block, str) else block
                certificates += load_certificates(data, source)
            except (OpenPGPError, UnicodeEncodeError) as exc:
                reason = exc.message if isinstance(exc, OpenPGPError) else "it is not ASCII armor"
                raise TrustError(f"{source}: cannot load a certificate: {reason}") from exc
        return cls(tuple(merge_certificates(certificates)), source)

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> TrustSet:
        certificates: list[Certificate] = []
        for path in paths:
            certificates += load_certificates(read_input(path, "certificate"), str(path))
        return cls(tuple(merge_certificates(certificates)), ", ".join(map(str, paths)) or "certificates")

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(sorted(cert.fingerprint for cert in self.certificates))

    def resolve(self) -> TrustSet:
        """A trust set is its own resolver."""
        return self


def check_certificate(cert: Certificate, source: str) -> None:
    """Refuse a certificate keyseal would never accept a signature from: weak RSA, or nothing that may sign."""
    for key in [cert.primary, *cert.subkeys]:
        if isinstance(key.public_key, rsa.RSAPublicKey) and key.public_key.key_size < MIN_RSA_BITS:
            raise TrustError(f"{source}: key {key.fingerprint_hex} is RSA-{key.public_key.key_size}; keyseal "
                             f"requires at least {MIN_RSA_BITS} bits")
    if not cert.signing_keys:
        raise TrustError(f"{source}: certificate {cert.fingerprint} has no key that may sign")


class Resolver(Protocol):
    """Anything that yields the trust set to verify with (a TrustSet, a WKD lookup, a cross-check)."""

    def resolve(self) -> TrustSet: ...


@dataclass(frozen=True)
class WkdResolver:
    """The keys a Web Key Directory publishes for one address (HTTPS, certificate verified)."""

    email: str
    ca_bundle: Path | None = None
    connect_to: tuple[tuple[Endpoint, Endpoint], ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    def resolve(self) -> TrustSet:
        result = fetch(self.email, ca_bundle=self.ca_bundle, connect_to=dict(self.connect_to),
                       timeout=self.timeout)
        for dropped in result.dropped:
            log.info("ignored a key from %s: %s", result.url, dropped)
        return TrustSet(tuple(result.certificates), f"WKD keys for {self.email}")


@dataclass(frozen=True)
class CrossCheck:
    """Trust only what two independent sources agree on: the same sorted fingerprint set, or abort.

    `policy` decides only what an unreachable second source means: `fail-closed` aborts, `fail-open` carries on
    with the first source and reports a warning (to `warn`, else the `keyseal.trust` logger).
    """

    embedded: Resolver
    remote: Resolver
    policy: Policy = "fail-closed"
    warn: Callable[[str], None] | None = None

    def resolve(self) -> TrustSet:
        if self.policy not in POLICIES:
            raise TrustError(f"unknown policy {self.policy!r}: use fail-closed or fail-open")
        local = self.embedded.resolve()
        try:
            remote = self.remote.resolve()
        except WkdUnavailableError as exc:
            if self.policy == "fail-closed":
                raise TrustError(f"cannot cross-check {local.source}: {exc.message} (policy fail-closed)") from exc
            message = (f"cross-check skipped, using {local.source} alone: {exc.message} (policy fail-open)")
            (self.warn or log.warning)(message)
            return local
        except KeysealError as exc:
            raise TrustError(f"cannot cross-check {local.source}: {exc.message}") from exc
        if local.fingerprints != remote.fingerprints:
            raise TrustError(
                f"key mismatch: {local.source} are {', '.join(local.fingerprints)} but {remote.source} are "
                f"{', '.join(remote.fingerprints)}; refusing to verify (one of the two copies was replaced)"
            )
        merged = merge_certificates([*local.certificates, *remote.certificates])
        return TrustSet(tuple(merged), f"{local.source} (cross-checked with {remote.source})")


@dataclass(frozen=True)
class Combined:
    """The keys of several resolvers together; every one must resolve. During a rotation a new client trusts
    v1 (cross-checked at the old WKD address) and v2 (cross-checked at the new one)."""

    resolvers: tuple[Resolver, ...]

    def __init__(self, *resolvers: Resolver) -> None:
        object.__setattr__(self, "resolvers", resolvers)

    def resolve(self) -> TrustSet:
        sets = [resolver.resolve() for resolver in self.resolvers]
        if not sets:
            raise TrustError("no trusted keys: Combined() needs at least one resolver")
        merged = merge_certificates([cert for trust in sets for cert in trust.certificates])
        return TrustSet(tuple(merged), " + ".join(trust.source for trust in sets))


@dataclass(frozen=True)
class ReleaseVerification:
    """A verified release: who signed the manifest (one good signature per distinct certificate counted, at
    least the threshold), and the artifacts whose digests matched."""

    signatures: tuple[VerifiedSignature, ...]
    artifacts: tuple[CheckedArtifact, ...]
    trust: TrustSet

    @property
    def signature(self) -> VerifiedSignature:
        """The first good signature (the only one with the default threshold of 1)."""
        return self.signatures[0]

    @property
    def fingerprint(self) -> str:
        return self.signature.fingerprint

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """The certificates whose signatures were counted, in the order the signature file holds them."""
        return tuple(s.fingerprint for s in self.signatures)


def verify_release(
    manifest: Path | bytes,
    signature: Path | bytes,
    artifacts: Sequence[Path],
    trust: Resolver,
    *,
    manifest_name: str | None = None,
    now: int | None = None,
    threshold: int = 1,
) -> ReleaseVerification:
    """Verify a release: resolve the trusted keys, check the manifest's signature over its raw bytes, parse the
    manifest strictly, then hash each artifact and compare in constant time. Any failure raises a
    VerificationError (or a TrustError, one of them) whose message says which step failed.

    `threshold=K` makes a release valid only with good signatures from K distinct trusted certificates (k of n:
    keys in independent custodies, so that one compromised custody cannot sign a release alone). Every key of the
    trust set goes through the same resolver, so a WKD cross-check covers all of them."""
    name = manifest_name or (str(manifest) if isinstance(manifest, Path) else "the checksum manifest")
    manifest_data = _read(manifest, "manifest")
    signature_data = _read(signature, "signature")
    trusted = trust.resolve()
    try:
        signed = verify_threshold_bytes(list(trusted.certificates), manifest_data, signature_data, threshold, now)
    except KeysealError as exc:
        raise VerificationError(f"{name} is not validly signed by {trusted.source}: {exc.message}") from exc
    parsed = parse_manifest(manifest_data, name)
    checked = check_artifacts(parsed, artifacts, name)
    return ReleaseVerification(tuple(signed), tuple(checked), trusted)


def _read(source: Path | bytes, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    return read_input(source, what)
