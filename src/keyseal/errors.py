"""Typed errors. Each message tells the user what went wrong and what to do; the CLI prints it as one line.

Messages never contain key material, DEKs, PINs or tokens.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AuditChainError",
    "AuditError",
    "BackendUnavailableError",
    "CustodyIntegrityError",
    "InputError",
    "InvalidKeyFileError",
    "KekMismatchError",
    "KeyMismatchError",
    "KeyNotFoundError",
    "KeyURIError",
    "KeysealError",
    "OpenPGPError",
    "OutputError",
    "OutputExistsError",
    "RecordRollbackError",
    "StoreConflictError",
    "TrustError",
    "UnsupportedKeyError",
    "UsageError",
    "VerificationError",
    "WkdError",
    "WkdUnavailableError",
    "WrappedRecordError",
    "loggable",
    "one_line",
    "unexpected",
]


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace collapsed and the length capped, so text from a server or a file cannot break the CLI's
    one-line error rule or swell a log record."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)} | {ord("\\"): "\\\\"}


def loggable(text: str, limit: int = 200) -> str:
    """Text a peer chose (a request path, a certificate's error) as it may appear in a log line: the first `limit`
    characters, with every character that is not printable ASCII escaped (`\\x1b`, `\\xff`, `\\u2028`; a
    backslash doubled), so it cannot move the cursor, colour the terminal or start a fake line."""
    cut = text[:limit].translate(_CONTROL_ESCAPES).encode("ascii", "backslashreplace").decode("ascii")
    return cut if len(text) <= limit else f"{cut}...({len(text) - limit} more characters)"


def unexpected(exc: BaseException) -> str:
    """The line for an exception keyseal did not raise on purpose: its type only (its text was not written to be
    safe to show), and how to see the rest."""
    return f"internal error ({type(exc).__name__}); rerun with KEYSEAL_DEBUG=1 and report it"


class KeysealError(Exception):
    """Base of every error keyseal raises on purpose. The CLI exits non-zero with its message."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(KeysealError):
    """A command-line argument or configuration value is invalid."""


class KeyURIError(KeysealError):
    """A key URI cannot be parsed or names an unknown backend."""


class BackendUnavailableError(KeysealError):
    """The key manager (KMS, HSM, Vault) could not be reached or answered with a server error."""


class AccessDeniedError(KeysealError):
    """The key manager refused the call: a permission is missing."""


class KeyNotFoundError(KeysealError):
    """The key named by a URI does not exist."""


class UnsupportedKeyError(KeysealError):
    """The key exists but cannot be used for this purpose (wrong usage, type, size or algorithm)."""


class InvalidKeyFileError(KeysealError):
    """A key file cannot be read or parsed."""


class OutputExistsError(KeysealError):
    """An output file exists and --force was not given, or an output would overwrite an input."""


class OutputError(KeysealError, OSError):
    """An output file cannot be written (a missing directory, a full disk, a directory in its place). Also an
    OSError with the cause's errno and strerror, for callers that treat a failed write like any other I/O error."""

    def __init__(self, message: str, cause: OSError) -> None:
        super().__init__(message)
        self.errno, self.strerror = cause.errno, cause.strerror


class InputError(KeysealError):
    """An input file is missing or unreadable."""


class OpenPGPError(KeysealError):
    """OpenPGP data is malformed, truncated or uses a feature keyseal does not accept."""


class VerificationError(KeysealError):
    """A signature did not verify against any of the given certificates."""

    exit_code = 1


class KeyMismatchError(KeysealError):
    """The backend's public key is not the key of the given certificate."""


class WrappedRecordError(KeysealError):
    """A wrapped key record is malformed, was tampered with, or does not belong where it was found."""


class RecordRollbackError(WrappedRecordError):
    """A record is older than a version this store has already seen (a replayed record)."""


class KekMismatchError(WrappedRecordError):
    """A record was wrapped by another KEK provider or another KEK than the one configured."""


class StoreConflictError(KeysealError):
    """A record changed in the store between reading and writing it (optimistic concurrency)."""


class CustodyIntegrityError(KeysealError):
    """A CA key, alias, marker or keyset pin is not what keyseal made and pinned for this trust domain."""


class WkdError(KeysealError):
    """A Web Key Directory answered with something keyseal refuses, or published no key for the address."""


class WkdUnavailableError(WkdError):
    """A Web Key Directory could not be reached (network, TLS, timeout, server error)."""


class TrustError(VerificationError):
    """The trusted keys could not be established: sources disagree, or one is required and unreachable."""


class AuditError(KeysealError):
    """The audit log cannot be written (or its last line cannot be read): keyseal signs nothing it cannot record."""


class AuditChainError(VerificationError):
    """The audit log's hash chain is broken: a line was deleted, edited, inserted or moved."""
