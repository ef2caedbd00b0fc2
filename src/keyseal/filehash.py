"""Hash files as streams: a release of any size costs one pass and a fixed buffer, never its size in memory.

One reader for every format keyseal signs or checks (OpenPGP, checksum manifests, SSH signatures, minisign).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from keyseal.errors import InputError

CHUNK = 1 << 20


class Updatable(Protocol):
    def update(self, data: bytes, /) -> None: ...


def feed_stream(stream: BinaryIO, targets: Sequence[Updatable]) -> None:
    """Feed every byte of `stream` to each target, in a single pass over a fixed buffer."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while count := stream.readinto(view):  # type: ignore[attr-defined]
        chunk = view[:count]
        for target in targets:
            target.update(chunk)  # type: ignore[arg-type]


def feed_file(path: Path, targets: Sequence[Updatable]) -> None:
    """`feed_stream` over a file; a missing or unreadable file is one clear error."""
    try:
        with path.open("rb", buffering=0) as stream:
            feed_stream(stream, targets)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
