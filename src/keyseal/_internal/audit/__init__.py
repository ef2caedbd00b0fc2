"""The audit trail: every signature keyseal makes appends one hash-chained JSON line to an audit log.

Where: `$KEYSEAL_AUDIT_LOG`, else `$KEYSEAL_HOME/audit.log` (~/.config/keyseal/audit.log); `KEYSEAL_AUDIT_LOG=off`
turns the file off. Every record is also emitted on the `keyseal.audit` logger (INFO) for structured logs.

- `open_signer` wraps every backend in `AuditingSigner`, so the CLI and library callers need do nothing but
  name what they sign: `with audit.subject("dist/tool.tar.gz"):` (OpenPGP signatures add their purpose and
  fingerprint themselves, in `make_signature`).
- Code that signs without a Signer (the CA server's in-memory keys) calls `audit.record(...)` itself.
- `audit.verify_log(path)` checks the chain (`keyseal audit verify`), and with public keys the signed
  checkpoints (keyseal._internal.audit.checkpoint) that the signing keys add every N lines: a rewritten chain shows.

A line: `{"v":1,"seq":N,"time":RFC 3339 UTC,"key_uri","key_fingerprint":"sha256:<SPKI hex>",
"openpgp_fingerprint","hash","signed":"digest"|"message","digest":hex,"subject","purpose","outcome":"ok"|"error: ...",
"prev":SHA-256 hex of the previous line's bytes (64 zeros for the first)}`. An AuditingSigner writes the line
before it asks the custody to sign; a signature that then fails adds a line with the error and "corrects": the
first line's seq. Lines keyseal adds itself carry a
"kind": "checkpoint" (a signed head, keyseal._internal.audit.checkpoint) or "continued" (the first line of a file that
`AuditLog.rotate()` started, going on from the previous file's head); a log without them is read as before.
- `Custody` (a key, its fingerprint and redacted URI) passed to `record` signs the checkpoints that fall due.
"""

from __future__ import annotations

from keyseal._internal.audit.chain import ChainReport, verify_log
from keyseal._internal.audit.context import AuditContext, current, subject
from keyseal._internal.audit.log import ENV, GENESIS, OFF, AuditLog, Custody, configured_log, line_hash, logger
from keyseal._internal.audit.record import key_fingerprint, outcome_of, record, redact_uri
from keyseal._internal.audit.signer import AuditingSigner, unwrap
from keyseal.errors import AuditError

__all__ = [
    "ENV",
    "GENESIS",
    "OFF",
    "AuditContext",
    "AuditError",
    "AuditLog",
    "AuditingSigner",
    "ChainReport",
    "Custody",
    "configured_log",
    "current",
    "key_fingerprint",
    "line_hash",
    "logger",
    "outcome_of",
    "record",
    "redact_uri",
    "subject",
    "unwrap",
    "verify_log",
]
