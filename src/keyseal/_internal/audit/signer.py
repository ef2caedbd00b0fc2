"""The Signer every `open_signer` caller gets: the backend's, with each signature call recorded.

Wrapping at the registry covers every backend and every caller at once (the CLI, keyseal-gpg, keyseal-ssh-keygen
and library users), so no command can forget it. Only signature calls touch the log: opening a key to read its
public key (export, git-setup) writes nothing and needs no writable log.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from keyseal._internal.audit.log import AuditLog, Custody, configured_log
from keyseal._internal.audit.record import Signed, key_fingerprint, outcome_of, record, redact_uri
from keyseal._internal.audit.record import log as audit_logger
from keyseal.errors import AuditError
from keyseal.signer import HashName, PublicKey, Signer

__all__ = ["AuditingSigner", "unwrap"]


class AuditingSigner(Signer):
    """A Signer that appends an audit record for every `sign_digest` / `sign_message`, success or failure.

    The public key is fetched (once; every backend caches it) before the first signature, so each record names
    the key that signed; if it cannot be fetched, nothing is signed and the failure is recorded. A log that
    cannot be written stops the signature before the custody is asked; a record that cannot be appended after
    a signature discards the signature (AuditError), so no output is written that the log does not show.
    Backend-specific attributes (`key_spec`, `version` ...) are read through from the wrapped signer.
    """

    def __init__(self, inner: Signer, log_file: Callable[[], AuditLog | None] = configured_log) -> None:
        self.inner = inner
        self.uri = inner.uri
        self._resolve_log = log_file
        self._lock = threading.Lock()
        self._ready = False
        self._log: AuditLog | None = None
        self._redacted_uri = redact_uri(self.uri)
        self._custody: Custody | None = None  # the key, its fingerprint and URI: worked out at the first signature

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    def supported_hashes(self) -> tuple[HashName, ...]:
        return self.inner.supported_hashes()

    def created_at(self) -> datetime | None:
        return self.inner.created_at()

    def close(self) -> None:
        self.inner.close()

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        log_file = self._log if self._ready else self._log_file()
        custody = self._custody
        if custody is None:  # the first signature: the key is identified first
            return self._audited(lambda: self.inner.sign_digest(digest, hash_name), hash_name, digest, "digest")
        if log_file is None:
            return self._sign_and_record(log_file, custody, digest, hash_name)
        with log_file.signing():  # concurrent signers' lines share one fsync
            return self._sign_and_record(log_file, custody, digest, hash_name)

    def _sign_and_record(self, log_file: AuditLog | None, custody: Custody, digest: bytes,
                         hash_name: HashName) -> bytes:
        """The common case, kept short: one call into the custody, one record."""
        try:
            signature = self.inner.sign_digest(digest, hash_name)
        except Exception as exc:
            self._record_failure(log_file, custody, hash_name, digest, "digest", exc)
            raise
        self._record(log_file, custody, hash_name, digest, "digest")
        return signature

    def sign_message(self, message: bytes) -> bytes:
        return self._audited(lambda: self.inner.sign_message(message), "sha256",
                             hashlib.sha256(message).digest(), "message")

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _log_file(self) -> AuditLog | None:
        """The configured log, checked writable before the first signature (again until that succeeds)."""
        with self._lock:
            if not self._ready:
                log_file = self._resolve_log()
                if log_file is not None:
                    log_file.check_writable()
                self._log, self._ready = log_file, True
            return self._log

    def _identify(self) -> Custody:
        """The key that signs here (its public key fetched once; every backend caches it)."""
        custody = self._custody
        if custody is None:
            public_key = self.inner.public_key()
            custody = self._custody = Custody(self.inner, key_fingerprint(public_key), self._redacted_uri)
        return custody

    def _audited(self, call: Callable[[], bytes], hash_name: str, digest: bytes, signed: Signed) -> bytes:
        log_file = self._log_file()
        custody: Custody | None = None
        try:
            custody = self._identify()
            signature = call()
        except Exception as exc:
            self._record_failure(log_file, custody, hash_name, digest, signed, exc)
            raise
        self._record(log_file, custody, hash_name, digest, signed)
        return signature

    def _record(self, log_file: AuditLog | None, custody: Custody, hash_name: str, digest: bytes,
                signed: Signed) -> None:
        try:
            record(log_file=log_file, key_uri=self._redacted_uri, key_uri_redacted=True, public_key=None,
                   fingerprint=custody.fingerprint, hash_name=hash_name, digest=digest, outcome="ok", signed=signed,
                   custody=custody)
        except AuditError as exc:
            raise AuditError(f"{exc.message}: the signature was discarded") from None

    def _record_failure(self, log_file: AuditLog | None, custody: Custody | None, hash_name: str, digest: bytes,
                        signed: Signed, error: Exception) -> None:
        try:
            record(log_file=log_file, key_uri=self._redacted_uri, key_uri_redacted=True, public_key=None,
                   fingerprint=custody.fingerprint if custody else None, hash_name=hash_name, digest=digest,
                   outcome=outcome_of(error), signed=signed, custody=custody)
        except AuditError as audit_error:  # the signature failed anyway: report that, not the log
            audit_logger.warning("%s", audit_error.message)


def unwrap(signer: Signer) -> Signer:
    """The backend's own signer behind an AuditingSigner (for tests and backend-specific checks)."""
    return signer.inner if isinstance(signer, AuditingSigner) else signer

