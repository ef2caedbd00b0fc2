"""Hash files as streams: a release of any size costs one pass and a fixed buffer, never its size in memory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from keyseal.errors import InputError
from keyseal.openpgp.signature import Hasher, new_hasher

CHUNK = 1 << 20


def hash_stream(stream: BinaryIO, hash_ids: Iterable[int]) -> dict[int, Hasher]:
    """Feed every byte of `stream` to one hasher per OpenPGP hash ID, in a single pass."""
    hashers = {hash_id: new_hasher(hash_id) for hash_id in set(hash_ids)}
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    targets = list(hashers.values())
    while True:
        count = stream.readinto(view)  # type: ignore[attr-defined]
        if not count:
            break
        chunk = view[:count]
        for hasher in targets:
            hasher.update(chunk)  # type: ignore[arg-type]
    return hashers


def hash_file(path: Path, hash_ids: Iterable[int]) -> dict[int, Hasher]:
    """`hash_stream` over a file, with missing or unreadable files reported as one clear error."""
    try:
        with path.open("rb", buffering=0) as stream:
            return hash_stream(stream, hash_ids)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
