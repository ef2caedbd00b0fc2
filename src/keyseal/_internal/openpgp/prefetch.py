"""Start hashing the signed file while the rest of the verifier loads.

Hashing a release is most of a verification's cost, and it needs only the hash algorithms the signature names;
loading `cryptography`, the certificates and their self-signatures needs none of the data. Run side by side (the
hash releases the GIL), verification costs about as much as hashing alone. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

from keyseal._internal.filehash import feed_file
from keyseal._internal.openpgp import hashids
from keyseal._internal.openpgp.armor import dearmor_or_binary
from keyseal._internal.openpgp.packets import TAG_SIGNATURE, iter_packets
from keyseal.errors import KeysealError

if TYPE_CHECKING:
    import threading
    from pathlib import Path

__all__ = ["BACKGROUND_FROM", "PrefetchedHashes", "signature_hash_ids", "start"]

# A regular file smaller than this is hashed when its hashes are asked for, in the caller's thread: it takes less
# than starting a thread (and importing `threading`), which a short command pays at start-up.
BACKGROUND_FROM = 1 << 20


def signature_hash_ids(signature_data: bytes) -> set[int]:
    """The accepted hash algorithms named by the v4 signatures in a detached signature; empty if unreadable
    (the full parse that follows reports what is wrong)."""
    try:
        packets = list(iter_packets(dearmor_or_binary(signature_data)))
    except KeysealError:
        return set()
    return {p.body[3] for p in packets
            if p.tag == TAG_SIGNATURE and len(p.body) > 3 and p.body[0] == 4 and p.body[3] in hashids.ACCEPTED}


class PrefetchedHashes:
    """Hashers for `path`, fed in a background thread (a small regular file: by `get`); `get(ids)` waits for
    them."""

    def __init__(self, path: str | Path, hash_ids: set[int]) -> None:
        self.path = path
        self.error: KeysealError | None = None
        self._thread: threading.Thread | None = None
        self._fed = False
        small = _small_file(path)
        self.hashers: dict[int, Any] = {i: _hasher(hashids.ACCEPTED[i], small) for i in hash_ids}
        if self.hashers and not small:
            import threading

            self._thread = threading.Thread(target=self._run, name="keyseal-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        self._fed = True
        if not self.hashers:
            return
        try:
            feed_file(self.path, list(self.hashers.values()))
        except KeysealError as exc:  # reported by get(), in the caller's thread
            self.error = exc

    def get(self, hash_ids: list[int]) -> dict[int, Any]:
        """The hashers for `hash_ids`, once the data has been read; anything not prefetched is hashed now."""
        if self._thread is not None:
            self._thread.join()
        elif not self._fed:
            self._run()
        if self.error is not None:
            raise self.error
        missing = set(hash_ids) - set(self.hashers)
        if missing:
            from keyseal._internal.openpgp.stream import hash_file

            self.hashers.update(hash_file(self.path, missing))
        return {i: self.hashers[i] for i in hash_ids}


def _hasher(name: str, small: bool) -> Any:
    """A small file is hashed through the OpenSSL that `cryptography` loads anyway (keyseal._internal.openpgp.digests);
    a large one through hashlib, in a thread beside the verifier's start-up."""
    if small:
        from keyseal._internal.openpgp import digests

        return digests.new(name)
    import hashlib

    return hashlib.new(name)


def _small_file(path: str | Path) -> bool:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return True  # feed_file reports it, from get()
    return stat.S_ISREG(info.st_mode) and info.st_size < BACKGROUND_FROM


def start(path: str | Path, signature_data: bytes) -> PrefetchedHashes:
    return PrefetchedHashes(path, signature_hash_ids(signature_data))
