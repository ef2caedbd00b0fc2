"""What the signature being made is for: set by the caller that knows it, read when the record is written.

A backend only sees a digest; the file name, user ID or SPIFFE ID behind it is known several calls up. A
context variable carries it down without widening the Signer contract. Nested contexts add to the outer one
(an inner value wins), so the CLI names the file and `make_signature` adds the OpenPGP purpose and fingerprint.
Threads started by a ThreadPoolExecutor do not inherit it: set it inside the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["AuditContext", "current", "subject"]


@dataclass(frozen=True)
class AuditContext:
    subject: str | None = None
    purpose: str | None = None
    openpgp_fingerprint: str | None = None


_NONE = AuditContext()  # frozen: safe to share as the default
_CURRENT: ContextVar[AuditContext] = ContextVar("keyseal_audit_context", default=_NONE)


def current() -> AuditContext:
    return _CURRENT.get()


@contextmanager
def subject(name: str | None = None, *, purpose: str | None = None,
            openpgp_fingerprint: str | None = None) -> Iterator[AuditContext]:
    """`with audit.subject("dist/tool.tar.gz", purpose="openpgp-detached"):` around the signature calls."""
    outer = _CURRENT.get()
    inner = AuditContext(
        subject=name if name is not None else outer.subject,
        purpose=purpose if purpose is not None else outer.purpose,
        openpgp_fingerprint=openpgp_fingerprint if openpgp_fingerprint is not None else outer.openpgp_fingerprint,
    )
    token = _CURRENT.set(inner)
    try:
        yield inner
    finally:
        _CURRENT.reset(token)
