"""Audit records for the CA's own signatures (X.509-SVIDs, JWT-SVIDs).

CA keys sign without an `AuditingSigner` (wrapped keys sign in memory, and `cryptography`'s certificate builder
calls them directly), so each kind of signature is recorded here, at the one place it is made. Every record goes
to the `keyseal.audit` logger (structured logs); it is also appended to a hash-chained file when the server was
given one with `KEYSEAL_AUDIT_LOG` (a pod's home is rarely writable, so the server writes no file by default).
With a file, the CA key that signed a line also signs the checkpoints that fall due (audit.checkpoint),
and `checkpoint_if_due()`, called from the server's periodic loop, writes one after a quiet spell.
"""

from __future__ import annotations

import hashlib
import os
import weakref

from keyseal._internal import audit
from keyseal._internal.ca.custody.keys import CaKey

__all__ = ["checkpoint_if_due", "configure_from_environment", "key_uri_of", "record_signature", "writes_file"]

_log_file: audit.AuditLog | None = None
# Each key's redacted URI, worked out at its first signature rather than at every one (a key's URI never changes).
# Only the redacted text is kept, and weakly by key: a retired keyset's keys are not kept alive by this.
_redacted_uris: weakref.WeakKeyDictionary[CaKey, str] = weakref.WeakKeyDictionary()


def configure_from_environment() -> None:
    """Use `KEYSEAL_AUDIT_LOG` as the server's audit file if it names one; fail now if it cannot be written."""
    global _log_file  # noqa: PLW0603 - one audit file per server process
    value = os.environ.get(audit.ENV, "").strip()
    _log_file = audit.configured_log() if value and value.lower() != audit.OFF else None
    if _log_file is not None:
        _log_file.check_writable()


def writes_file() -> bool:
    """Whether each signature is also appended to an audit file (a disk write per SVID)."""
    return _log_file is not None


def key_uri_of(key: CaKey) -> str:
    """The key's URI where it has one (KMS custody), else its custody: the fingerprint names the key exactly."""
    signer = getattr(key, "signer", None)
    return str(getattr(signer, "uri", "")) or f"{key.custody}:ca-key"


def _redacted_uri(key: CaKey) -> str:
    uri = _redacted_uris.get(key)
    if uri is None:  # two threads may both work it out: the same text, so either may win
        uri = _redacted_uris[key] = audit.redact_uri(key_uri_of(key))
    return uri


def record_signature(key: CaKey, *, purpose: str, subject: str, hash_name: str, signed_bytes: bytes | None = None,
                     digest: bytes | None = None, error: BaseException | None = None) -> None:
    """Record that `key` signed the hash of `signed_bytes` (a TBSCertificate or a JWS signing input), or
    `digest` where the caller has hashed them already; neither when a failure came before those bytes existed
    (the record then has an empty digest)."""
    if digest is None:
        digest = hashlib.new(hash_name, signed_bytes).digest() if signed_bytes is not None else b""
    key_uri = _redacted_uri(key)
    audit.record(
        log_file=_log_file,
        key_uri=key_uri,
        key_uri_redacted=True,
        public_key=key.public_key(),
        fingerprint=key.fingerprint,
        hash_name=hash_name,
        digest=digest,
        outcome=audit.outcome_of(error),
        subject=subject,
        purpose=purpose,
        custody=audit.Custody(key, key.fingerprint, key_uri) if _log_file is not None else None,
    )


def checkpoint_if_due() -> None:
    """A checkpoint of the audit file, signed by the CA key that signed last, if none was made for a while and
    lines were added since (a quiet server's last lines would otherwise wait for the next SVID)."""
    if _log_file is not None:
        try:
            _log_file.checkpoint()
        except audit.AuditError as exc:
            audit.logger.warning("%s", exc.message)
