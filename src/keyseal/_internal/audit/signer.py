"""The Signer every `open_signer` caller gets: the backend's, with each signature call recorded.

Wrapping at the registry covers every backend and every caller at once (the CLI, keyseal-gpg, keyseal-ssh-keygen
and library users), so no command can forget it. Only signature calls touch the log: opening a key to read its
public key (export, git-setup) writes nothing and needs no writable log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from keyseal._internal.audit.context import AuditContext, current
from keyseal._internal.audit.log import AuditLog, Custody, Pending, configured_log, utc_now
from keyseal._internal.audit.record import (
    Signed,
    body_affixes,
    emit,
    key_fingerprint,
    make_entry,
    outcome_of,
    redact_uri,
)
from keyseal._internal.audit.record import log as audit_logger
from keyseal.errors import AuditError
from keyseal.signer import HashName, PublicKey, Signer

__all__ = ["AuditingSigner", "unwrap"]


class AuditingSigner(Signer):
    """A Signer that records every `sign_digest` / `sign_message`, success or failure.

    The public key is fetched (once; every backend caches it) before the first signature, so each record names
    the key that signs; if it cannot be fetched, nothing is signed and the failure is recorded. A log that
    cannot be written stops the first signature before the custody is asked.

    With an audit file, the line is queued *before* the custody is asked, and the signature is returned only
    once that line is durable: the log's fsync runs while the custody signs, instead of after it. A signature
    that then fails adds a second line (`outcome` "error: ...", `corrects` naming the first line's `seq`); a
    line that cannot be made durable discards the signature (AuditError), so no output exists that the log does
    not show. The `keyseal.audit` logger gets one record per signature, with its real outcome, once it is known.
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
        # The last line body's JSON around the digest, for the context, hash and way of signing it was made for:
        # (context, hash name, signed, custody, prefix, suffix). Replaced whole, so threads need no lock for it.
        self._affixes: tuple[AuditContext, str, str, Custody, str, str] | None = None

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    def supported_hashes(self) -> tuple[HashName, ...]:
        return self.inner.supported_hashes()

    def created_at(self) -> datetime | None:
        return self.inner.created_at()

    def close(self) -> None:
        self.inner.close()

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        return self._recorded(hash_name, digest, "digest", self.inner.sign_digest, digest, hash_name)

    def sign_message(self, message: bytes) -> bytes:
        return self._recorded("sha256", hashlib.sha256(message).digest(), "message", self.inner.sign_message,
                              message)

    def _recorded(self, hash_name: str, digest: bytes, signed: Signed, sign: Callable[..., bytes],
                  *args: object) -> bytes:
        """`sign(*args)` with its record: with an audit file, the line first and the signature returned once
        the line is durable; without, a record on the logger if anyone listens."""
        log_file = self._log if self._ready else self._log_file()
        custody = self._custody or self._identified(log_file, hash_name, digest, signed)
        if log_file is not None:
            pending = log_file.submit_body(self._body(custody, hash_name, digest, signed), custody)
            try:
                signature = sign(*args)
            except Exception as exc:
                self._record_failure(log_file, custody, hash_name, digest, signed, exc, pending)
                raise  # (interrupted instead: the line is written with the next batch, a line with no signature)
            self._settle(log_file, pending)
            return signature
        try:  # no file: the common case kept short, one call into the custody and a record if anyone listens
            signature = sign(*args)
        except Exception as exc:
            self._record_failure(None, custody, hash_name, digest, signed, exc)
            raise
        if audit_logger.isEnabledFor(logging.INFO):
            emit({"time": utc_now(), **self._entry(custody, hash_name, digest, signed)})
        return signature

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _body(self, custody: Custody, hash_name: str, digest: bytes, signed: Signed) -> str:
        """The `ok` line's fields as JSON (`make_entry`'s, for the log's `submit_body`): the digest's hex between
        a prefix and suffix made once per context, hash and way of signing."""
        context = current()
        affixes = self._affixes
        if affixes is None or affixes[0] is not context or affixes[1] != hash_name or affixes[2] != signed or \
                affixes[3] is not custody:
            prefix, suffix = body_affixes(key_uri=self._redacted_uri, fingerprint=custody.fingerprint,
                                          hash_name=hash_name, signed=signed, context=context)
            affixes = self._affixes = (context, hash_name, signed, custody, prefix, suffix)
        return affixes[4] + digest.hex() + affixes[5]

    def _settle(self, log_file: AuditLog, pending: Pending) -> None:
        """Return once the line is durable (else discard the signature: AuditError); then the record on the
        `keyseal.audit` logger, built only if that logger listens."""
        try:
            log_file.settle(pending)
        except AuditError as exc:
            raise AuditError(f"{exc.message}: the signature was discarded") from exc
        if audit_logger.isEnabledFor(logging.INFO):
            emit(pending.written())

    def _entry(self, custody: Custody | None, hash_name: str, digest: bytes, signed: Signed,
               outcome: str = "ok") -> dict[str, object]:
        return make_entry(key_uri=self._redacted_uri, fingerprint=custody.fingerprint if custody else None,
                          hash_name=hash_name, digest=digest, outcome=outcome, signed=signed)

    def _log_file(self) -> AuditLog | None:
        """The configured log, checked writable before the first signature (again until that succeeds)."""
        with self._lock:
            if not self._ready:
                log_file = self._resolve_log()
                if log_file is not None:
                    log_file.check_writable()
                self._log, self._ready = log_file, True
            return self._log

    def _identified(self, log_file: AuditLog | None, hash_name: str, digest: bytes, signed: Signed) -> Custody:
        """The key that signs here (its public key fetched once; every backend caches it); a key that cannot
        be identified is recorded as a failed signature and nothing is signed."""
        try:
            custody = self._custody
            if custody is None:
                public_key = self.inner.public_key()
                custody = self._custody = Custody(self.inner, key_fingerprint(public_key), self._redacted_uri)
            return custody
        except Exception as exc:
            self._record_failure(log_file, None, hash_name, digest, signed, exc)
            raise

    def _record_failure(self, log_file: AuditLog | None, custody: Custody | None, hash_name: str, digest: bytes,
                        signed: Signed, error: Exception, pending: Pending | None = None) -> None:
        """A failed signature's record; after a line written before the custody was asked (`pending`), a
        second line that `corrects` it. A log that fails now is logged, not raised: the signature failed
        anyway, and that is what the caller hears."""
        entry = self._entry(custody, hash_name, digest, signed, outcome_of(error))
        try:
            if pending is not None:
                entry["corrects"] = log_file.wait(pending)["seq"] if log_file is not None else None
            written = log_file.append(entry, custody) if log_file is not None else {"time": utc_now(), **entry}
        except AuditError as audit_error:
            audit_logger.warning("%s", audit_error.message)
            return
        emit(written)


def unwrap(signer: Signer) -> Signer:
    """The backend's own signer behind an AuditingSigner (for tests and backend-specific checks)."""
    return signer.inner if isinstance(signer, AuditingSigner) else signer

