"""Hash signed data with the OpenPGP hash algorithms its signatures name, in one pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from keyseal._internal.filehash import feed_file, feed_stream
from keyseal._internal.openpgp.signature import new_hasher

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from keyseal._internal.openpgp.signature import Hasher

__all__ = ["hash_file", "hash_stream"]


def hash_stream(stream: BinaryIO, hash_ids: Iterable[int]) -> dict[int, Hasher]:
    """One hasher per OpenPGP hash ID, fed with every byte of `stream`."""
    hashers = {hash_id: new_hasher(hash_id) for hash_id in set(hash_ids)}
    feed_stream(stream, list(hashers.values()))
    return hashers


def hash_file(path: str | Path, hash_ids: Iterable[int]) -> dict[int, Hasher]:
    """`hash_stream` over a file, with missing or unreadable files reported as one clear error."""
    hashers = {hash_id: new_hasher(hash_id) for hash_id in set(hash_ids)}
    feed_file(path, list(hashers.values()))
    return hashers
