"""One audit record: what a signature was over, by which key, for what, and how it ended.

Records name keys by their URI (secrets redacted) and public-key fingerprints, never by anything secret:
the digest is what the custody was asked to sign, not the data, and error text comes only from keyseal's own
typed errors, whose messages are written never to carry key material, PINs or tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Literal

from keyseal._internal.audit.context import AuditContext, current
from keyseal._internal.audit.keyid import key_fingerprint
from keyseal._internal.audit.log import AuditLog, Custody, utc_now
from keyseal._internal.providers.pkcs11 import uri as pkcs11uri
from keyseal.errors import KeysealError, one_line
from keyseal.signer import PublicKey

__all__ = ["body_affixes", "emit", "key_fingerprint", "make_entry", "outcome_of", "record", "redact_uri"]

log = logging.getLogger("keyseal.audit")

Signed = Literal["digest", "message"]

_REDACTED = "REDACTED"
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@:]*):[^/@]*@", re.IGNORECASE)
_SECRET_NAME = re.compile(r"(token|secret|passw|pin-value|^pin$|api[-_]?key|auth|credential)", re.IGNORECASE)
_MAX_URI = 1000
_MAX_TEXT = 500
_MAX_SUBJECT = 4096
_LINE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))  # json.dumps would build one per record


def redact_uri(uri: str) -> str:
    """The key URI with every secret-bearing part replaced: a PKCS#11 `pin-value`, a password in `user:pw@`,
    query values named like a token, secret, password or PIN. The PKCS#11 `token=` label is not a secret."""
    uri = pkcs11uri.redact(uri)
    uri = _USERINFO.sub(rf"\1\2:{_REDACTED}@", uri)
    base, sep, query = uri.partition("?")
    if sep:
        items = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            items.append(f"{name}={_REDACTED}" if eq and _SECRET_NAME.search(name) else item)
        uri = f"{base}?{'&'.join(items)}"
    return one_line(uri, _MAX_URI)




def outcome_of(error: BaseException | None) -> str:
    """`ok`, or `error: <one line>`. Only keyseal's own messages are kept; any other exception is named by its
    type, since its text was not written to be safe to log."""
    if error is None:
        return "ok"
    if isinstance(error, KeysealError):
        return "error: " + one_line(error.message, _MAX_TEXT)
    return f"error: internal error ({type(error).__name__})"


def record(
    *,
    log_file: AuditLog | None,
    key_uri: str,
    key_uri_redacted: bool = False,
    public_key: PublicKey | None,
    hash_name: str,
    fingerprint: str | None = None,
    digest: bytes,
    outcome: str,
    subject: str | None = None,
    purpose: str | None = None,
    openpgp_fingerprint: str | None = None,
    signed: Signed = "digest",
    custody: Custody | None = None,
) -> dict[str, object]:
    """Record one signature: append it to `log_file` (None: no file) and emit it on the `keyseal.audit` logger
    (INFO, the JSON line as the message and the fields as `record.audit`) for structured logs. Without a file
    the record has no seq or prev (there is no chain), only the time.

    `fingerprint` is `key_fingerprint(public_key)` worked out by a caller that signs often with one key;
    `key_uri_redacted=True` says `key_uri` is `redact_uri`'s output, likewise worked out once by such a caller.
    `subject`, `purpose` and `openpgp_fingerprint` default to the caller's `audit.subject(...)` context.
    `signed="digest"`: `digest` is what the custody signed, made with `hash_name`; `signed="message"`: the
    custody signed a message (pure Ed25519) whose SHA-256 is `digest`. Raises AuditError if the file cannot
    be written. `custody` (the key that signed, with its fingerprint and redacted URI) signs a checkpoint when
    one falls due at this line.
    """
    entry = make_entry(key_uri=key_uri if key_uri_redacted else redact_uri(key_uri),
                       fingerprint=fingerprint or (key_fingerprint(public_key) if public_key is not None else None),
                       hash_name=hash_name, digest=digest, outcome=outcome, subject=subject, purpose=purpose,
                       openpgp_fingerprint=openpgp_fingerprint, signed=signed)
    written = log_file.append(entry, custody) if log_file is not None else {"time": utc_now(), **entry}
    emit(written)
    return written


def make_entry(*, key_uri: str, fingerprint: str | None, hash_name: str, digest: bytes, outcome: str,
               subject: str | None = None, purpose: str | None = None, openpgp_fingerprint: str | None = None,
               signed: Signed = "digest", context: AuditContext | None = None) -> dict[str, object]:
    """A record's fields before the log adds v, seq, time and prev (`key_uri` already redacted); subject,
    purpose and OpenPGP fingerprint default to the caller's `audit.subject(...)` context (or `context`)."""
    context = context or current()
    return {
        "key_uri": key_uri,
        "key_fingerprint": fingerprint,
        "openpgp_fingerprint": openpgp_fingerprint or context.openpgp_fingerprint,
        "hash": hash_name,
        "signed": signed,
        "digest": digest.hex(),
        "subject": _text(subject if subject is not None else context.subject),
        "purpose": _text(purpose if purpose is not None else context.purpose),
        "outcome": outcome if outcome == "ok" else one_line(outcome, _MAX_TEXT),
    }


def body_affixes(*, key_uri: str, fingerprint: str | None, hash_name: str, signed: Signed,
                 context: AuditContext) -> tuple[str, str]:
    """The JSON of an `ok` entry's fields (`make_entry`'s, in its order, as the log spells them) before and after
    the digest's hex: `prefix + digest.hex() + suffix` is the entry's line body. Worked out once per key, hash
    and context by a caller that signs often, so no dict is built or encoded per signature."""
    entry = make_entry(key_uri=key_uri, fingerprint=fingerprint, hash_name=hash_name, digest=b"", outcome="ok",
                       signed=signed, context=context)
    names = list(entry)
    at = names.index("digest")
    before = _LINE.encode({name: entry[name] for name in names[:at]})[1:-1]
    after = _LINE.encode({name: entry[name] for name in names[at + 1:]})[1:-1]
    return f'{before},"digest":"', f'",{after}'


def emit(written: Mapping[str, object]) -> None:
    """A record on the `keyseal.audit` logger (INFO, the JSON line as the message, the fields as `record.audit`)."""
    if log.isEnabledFor(logging.INFO):
        log.info("audit %s", _LINE.encode(written), extra={"audit": written})


def _text(value: str | None) -> str | None:
    """A subject or purpose as given (a file name may hold any character: JSON escapes it), length-capped."""
    if value is None or len(value) <= _MAX_SUBJECT:
        return value
    return value[: _MAX_SUBJECT - 3] + "..."
