"""Verify a detached OpenPGP signature over a file: the one composition `keyseal verify` and the Python API
(keyseal.api.verify_file) share.

`keyseal verify` is often one of many short processes, so the data starts hashing (in a thread, for a large file)
as soon as the signature is read, while the verifier and the certificates load; a text-mode signature
(`gpg -abst`) is tried only once the binary check failed. This module is on that short path: paths are text
(spelt as pathlib spells them, keyseal._internal.pathtext), and nothing but the verifier is imported.
"""

from __future__ import annotations

import os

from keyseal._internal.pathtext import name_of, path_text
from keyseal.errors import InputError, KeysealError, VerificationError

# Not `typing.TYPE_CHECKING`: the short path imports no typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from keyseal._internal.openpgp.cert import Certificate
    from keyseal._internal.openpgp.verify import VerifiedSignature

    StrPath = str | os.PathLike[str]

__all__ = ["default_signature_path", "load_certificates_from", "verify_detached"]


def default_signature_path(data: StrPath, option: str = "signature") -> str:
    """DATA.asc, else DATA.sig: where keyseal and gpg put a detached signature when none is named (`option` is
    what the user could have named it with, for the error)."""
    text = path_text(os.fspath(data))
    name = name_of(text)
    if not name:
        raise InputError(f"{text} is a directory, not a file")
    for suffix in (".asc", ".sig"):
        candidate = text + suffix
        if os.path.exists(candidate):
            return candidate
    raise InputError(f"no {option} given and neither {name}.asc nor {name}.sig exists")


def load_certificates_from(sources: Iterable[StrPath | bytes]) -> list[Certificate]:
    """Every certificate in these files (a path) or armored or binary blobs (bytes), in order."""
    from keyseal._internal.inputfile import read_input
    from keyseal._internal.openpgp.cert import load_certificates

    certificates: list[Certificate] = []
    for source in sources:
        if isinstance(source, bytes):
            certificates += load_certificates(source)
        else:
            path = path_text(os.fspath(source))
            certificates += load_certificates(read_input(path, "certificate"), path)
    return certificates


def verify_detached(sources: Iterable[StrPath | bytes], file: StrPath, signature: StrPath | None,
                    threshold: int = 1) -> list[VerifiedSignature]:
    """The good signatures of at least `threshold` distinct certificates over `file`; its signature is
    `signature`, else FILE.asc, else FILE.sig. A bad signature raises VerificationError; an unreadable file or
    certificate, or malformed OpenPGP, raises the error that says so."""
    from keyseal._internal.inputfile import read_input

    sources = list(sources)
    data_path = path_text(os.fspath(file))
    signature_data = b""
    try:
        from keyseal._internal.openpgp import prefetch

        signature_path = default_signature_path(data_path) if signature is None else path_text(os.fspath(signature))
        signature_data = read_input(signature_path, "signature")
        hashes = prefetch.start(data_path, signature_data)  # hashing starts while the verifier loads
        from keyseal._internal.openpgp.verify import verify_threshold_prefetched

        return verify_threshold_prefetched(load_certificates_from(sources), hashes, signature_data, threshold)
    except VerificationError:
        text_results = _text_mode(sources, data_path, signature_data, threshold)
        if text_results is None:
            raise
        return text_results


def _text_mode(sources: list[StrPath | bytes], file: str, signature_data: bytes,
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
        raise VerificationError(exc.message) from exc
