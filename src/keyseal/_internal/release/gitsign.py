"""Signing and verifying git commits and tags with OpenPGP, for the gpg-compatible `keyseal-gpg`.

git hands over the object's bytes and a key name (`user.signingkey`): a key URI, or a fingerprint, key ID or
email address that the keyseal keyring maps to a URI. Verification trusts only the keyring's certificates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from keyseal._internal.frozen import Frozen
from keyseal._internal.openpgp.cert import Certificate
from keyseal._internal.openpgp.keyring import (
    certificate_for_key,
    find_certificates,
    fingerprints_of,
    is_key_uri,
    keyring_certificates,
    keyring_dir,
    uri_for_openpgp,
)
from keyseal._internal.openpgp.keys import algorithm_of
from keyseal._internal.openpgp.signature import HASH_IDS, SIG_TEXT, SignaturePacket
from keyseal._internal.openpgp.verify import VerifiedSignature, parse_detached, verify_bytes
from keyseal._internal.openpgp.verify import verify_cleartext as check_cleartext
from keyseal.errors import OpenPGPError, UsageError, VerificationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from keyseal._internal.backends import BackendOptions


class GitSignature(Frozen):
    """A detached signature and what gpg's SIG_CREATED status line reports about it."""

    __slots__ = ("algorithm", "created", "data", "fingerprint", "hash_id")

    def __init__(self, data: bytes, fingerprint: str, algorithm: int, hash_id: int, created: int) -> None:
        self.data = data
        self.fingerprint = fingerprint
        self.algorithm = algorithm
        self.hash_id = hash_id
        self.created = created


def resolve_signing_key(spec: str, certificates: list[Certificate]) -> tuple[str, Certificate | None]:
    """The key URI (and its certificate, when the keyring names it) for git's `-u SPEC`."""
    if is_key_uri(spec):
        return spec, None
    found = find_certificates(spec, certificates)
    if not found:
        raise UsageError(f"no certificate in the keyseal keyring ({keyring_dir()}) matches {spec[:80]!r}: run "
                         f"keyseal git-setup --key URI --cert CERT, or set user.signingkey to a key URI")
    mapped = [(cert, uri) for cert in found if (uri := uri_for_openpgp(fingerprints_of(cert))) is not None]
    if not mapped:
        raise UsageError(f"no key URI is registered for {found[0].fingerprint}: run keyseal git-setup --key URI "
                         f"--cert CERT")
    if len(mapped) > 1:
        names = ", ".join(cert.fingerprint for cert, _ in mapped)
        raise UsageError(f"{spec[:80]!r} names several registered keys ({names}): set user.signingkey to one "
                         f"fingerprint")
    cert, uri = mapped[0]
    return uri, cert


def sign(spec: str, data: bytes, options: BackendOptions | None = None, armored: bool = True) -> GitSignature:
    """A detached binary-document signature over `data` (a commit or tag object): one signature call, made by
    keyseal.api.sign_data, as any other signature over bytes."""
    # Signing's imports stay here: `keyseal-gpg --verify`, which git runs once per commit, needs none of them.
    from keyseal._internal import api
    from keyseal._internal.backends import open_signer

    certificates = keyring_certificates()
    uri, cert = resolve_signing_key(spec, certificates)
    with open_signer(uri, options) as signer:
        if cert is None:
            cert = certificate_for_key(signer.public_key(), certificates)
        signed = api.sign_data(signer, data, certificates=[cert.binary] if cert is not None else [], armor=armored,
                               audit_subject=_git_subject(data))
        algorithm = algorithm_of(signer.public_key())
    return GitSignature(signed.signature, signed.fingerprint, algorithm, HASH_IDS[signed.hash_name], signed.created)


def _git_subject(data: bytes) -> str:
    """What the audit log names: `git tag v1.0` for a tag (its name is in the object), else `git commit`."""
    if data.startswith(b"object "):
        for line in data.split(b"\n\n", 1)[0].split(b"\n"):
            if line.startswith(b"tag "):
                return "git tag " + line[4:].decode("utf-8", "replace")
        return "git tag"
    return "git commit" if data.startswith(b"tree ") else "git object"


Outcome = Literal["good", "bad", "no-key"]


class GitVerification(Frozen):
    """What gpg's status lines say about a verification: the outcome and the signature's particulars."""

    __slots__ = (
        "algorithm",
        "certificate",
        "created",
        "hash_id",
        "issuer_fingerprint",
        "key_id",
        "outcome",
        "reason",
        "signing_fingerprint",
    )

    def __init__(self, outcome: Outcome, key_id: str, issuer_fingerprint: str | None, algorithm: int,
                 hash_id: int, created: int, reason: str = "", certificate: Certificate | None = None,
                 signing_fingerprint: str | None = None) -> None:
        self.outcome = outcome
        self.key_id = key_id
        self.issuer_fingerprint = issuer_fingerprint
        self.algorithm = algorithm
        self.hash_id = hash_id
        self.created = created
        self.reason = reason
        self.certificate = certificate
        self.signing_fingerprint = signing_fingerprint

    @property
    def user_id(self) -> str:
        if self.certificate is not None and self.certificate.user_ids:
            return self.certificate.user_ids[0]
        return "[no user ID]"


def verify(signature_data: bytes, data: bytes) -> GitVerification:
    """Check a detached signature with the keyring's certificates. Malformed signatures raise OpenPGPError.
    A text-mode (0x01) signature is checked over the data with CR LF line endings, as gpg does."""
    text_mode = parse_detached(signature_data)[0].sig_type == SIG_TEXT
    return _verify_with_keyring(signature_data,
                                lambda certs: verify_bytes(certs, data, signature_data, text_mode=text_mode))


def verify_cleartext(document: bytes) -> tuple[GitVerification, bytes]:
    """Check a cleartext signed message with the keyring's certificates; also the text it covers."""
    from keyseal._internal.openpgp.cleartext import parse_cleartext

    message = parse_cleartext(document)
    result = _verify_with_keyring(message.signature_armor, lambda certs: check_cleartext(certs, document)[0])
    return result, message.text


def _verify_with_keyring(signature_data: bytes,
                         check: Callable[[list[Certificate]], VerifiedSignature]) -> GitVerification:
    signatures = parse_detached(signature_data)
    certificates = keyring_certificates()
    known = [sig for sig in signatures if _certificate_of(sig, certificates) is not None]
    if not known:
        return _describe(signatures[0], "no-key", f"no certificate in the keyseal keyring ({keyring_dir()}) has "
                                                  f"the signing key {_key_id(signatures[0])}")
    try:
        result = check(certificates)
    except VerificationError as exc:
        sig = known[0]
        outcome: Outcome = "bad"
        return _describe(sig, outcome, exc.message, _certificate_of(sig, certificates))
    sig = next(s for s in known if _signed_by(s, result.key_fingerprint))
    return _describe(sig, "good", "", result.certificate, result.key_fingerprint)


def _signed_by(sig: SignaturePacket, fingerprint_hex: str) -> bool:
    if sig.issuer_fingerprint is not None:
        return sig.issuer_fingerprint.hex().upper() == fingerprint_hex
    return any(fingerprint_hex.endswith(key_id.hex().upper()) for key_id in sig.issuer_key_ids)


def _certificate_of(sig: SignaturePacket, certificates: list[Certificate]) -> Certificate | None:
    for cert in certificates:
        if any(_signed_by(sig, entry.key.fingerprint_hex) for entry in cert.signing_keys):
            return cert
    return None


def _key_id(sig: SignaturePacket) -> str:
    if sig.issuer_fingerprint is not None:
        return sig.issuer_fingerprint[-8:].hex().upper()
    ids = sorted(sig.issuer_key_ids)
    return ids[0].hex().upper() if ids else "0000000000000000"


def _describe(sig: SignaturePacket, outcome: Outcome, reason: str,
              certificate: Certificate | None = None, signing_fingerprint: str | None = None) -> GitVerification:
    issuer = sig.issuer_fingerprint.hex().upper() if sig.issuer_fingerprint is not None else None
    return GitVerification(outcome, _key_id(sig), issuer, sig.algorithm, sig.hash_id, sig.created or 0, reason,
                           certificate, signing_fingerprint)


__all__ = ["GitSignature", "GitVerification", "OpenPGPError", "resolve_signing_key", "sign", "verify",
           "verify_cleartext"]
