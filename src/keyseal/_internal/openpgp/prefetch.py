"""Start hashing the signed file while the rest of the verifier loads.

Hashing a release is most of a verification's cost, and it needs only the hash algorithms the signature names;
loading `cryptography`, the certificates and their self-signatures needs none of the data. Run side by side (the
hash releases the GIL), verification costs about as much as hashing alone. This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from keyseal._internal.filehash import feed_file
from keyseal._internal.openpgp import hashids
from keyseal._internal.openpgp.armor import dearmor_or_binary
from keyseal._internal.openpgp.packets import TAG_SIGNATURE, iter_packets
from keyseal.errors import KeysealError


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
    """Hashers for `path`, fed in a background thread; `get(ids)` waits for them."""

    def __init__(self, path: Path, hash_ids: set[int]) -> None:
        self.path = path
        self.hashers: dict[int, Any] = {i: hashlib.new(hashids.ACCEPTED[i]) for i in hash_ids}
        self.error: KeysealError | None = None
        self._thread = threading.Thread(target=self._run, name="keyseal-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if not self.hashers:
            return
        try:
            feed_file(self.path, list(self.hashers.values()))
        except KeysealError as exc:  # reported by get(), in the caller's thread
            self.error = exc

    def get(self, hash_ids: list[int]) -> dict[int, Any]:
        """The hashers for `hash_ids`, once the data has been read; anything not prefetched is hashed now."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        missing = set(hash_ids) - set(self.hashers)
        if missing:
            from keyseal._internal.openpgp.stream import hash_file

            self.hashers.update(hash_file(self.path, missing))
        return {i: self.hashers[i] for i in hash_ids}


def start(path: Path, signature_data: bytes) -> PrefetchedHashes:
    return PrefetchedHashes(path, signature_hash_ids(signature_data))
