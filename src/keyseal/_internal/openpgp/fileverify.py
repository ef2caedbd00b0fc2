"""Verify a detached OpenPGP signature over a file: the composition `keyseal verify` and the Python API
(keyseal.api) share.

`keyseal verify` is often one of many short processes, so the data starts hashing (in a thread) as soon as the
signature is read, while the verifier and the certificates load; a text-mode signature (`gpg -abst`) is tried
only once the binary check failed. Imports stay inside the functions: this module is on that short path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from keyseal.errors import KeysealError, VerificationError

if TYPE_CHECKING:
    from keyseal._internal.openpgp.cert import Certificate
    from keyseal._internal.openpgp.verify import VerifiedSignature

__all__ = ["load_certificates_from", "verify_detached"]


def load_certificates_from(sources: Iterable[Path | bytes]) -> list[Certificate]:
    """Every certificate in these files (a Path) or armored or binary blobs (bytes), in order."""
    from keyseal._internal.inputfile import read_input
    from keyseal._internal.openpgp.cert import load_certificates

    certificates: list[Certificate] = []
    for source in sources:
        if isinstance(source, bytes):
            certificates += load_certificates(source)
        else:
            certificates += load_certificates(read_input(source, "certificate"), str(source))
    return certificates


def verify_detached(sources: Iterable[Path | bytes], file: Path, signature: Path | None,
                    threshold: int = 1) -> list[VerifiedSignature]:
    """The good signatures of at least `threshold` distinct certificates over `file`; its signature is
    `signature`, else FILE.asc, else FILE.sig. A bad signature raises VerificationError; an unreadable file or
    certificate, or malformed OpenPGP, raises the error that says so."""
    from keyseal._internal.inputfile import default_signature_path, read_input

    sources = list(sources)
    signature_data = b""
    try:
        from keyseal._internal.openpgp import prefetch

        signature_data = read_input(signature or default_signature_path(file), "signature")
        hashes = prefetch.start(file, signature_data)  # hash the data while the verifier and certificates load
        from keyseal._internal.openpgp.verify import verify_threshold_prefetched

        return verify_threshold_prefetched(load_certificates_from(sources), hashes, signature_data, threshold)
    except VerificationError:
        text_results = _text_mode(sources, file, signature_data, threshold)
        if text_results is None:
            raise
        return text_results


def _text_mode(sources: list[Path | bytes], file: Path, signature_data: bytes,
               threshold: int) -> list[VerifiedSignature] | None:
    """A text-mode (0x01) detached signature (`gpg -abst`) is checked over the file with CR LF line endings. Only
    tried once the binary check failed, so the usual path keeps hashing while the verifier loads."""
    from keyseal._internal.inputfile import read_input
    from keyseal._internal.openpgp.signature import SIG_TEXT
    from keyseal._internal.openpgp.verify import parse_detached, verify_threshold_bytes

    try:
        if not signature_data or any(sig.sig_type != SIG_TEXT for sig in parse_detached(signature_data)):
            return None
    except KeysealError:
        return None
    try:
        return verify_threshold_bytes(load_certificates_from(sources), read_input(file, "file"), signature_data,
                                      threshold, text_mode=True)
    except VerificationError:
        raise
    except KeysealError as exc:
        raise VerificationError(exc.message) from None
