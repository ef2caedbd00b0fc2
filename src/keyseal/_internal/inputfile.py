"""Read a whole input file (a key, certificate, signature, audit log) with one clear error for each way it fails."""

from __future__ import annotations

import os

from keyseal.errors import InputError

__all__ = ["read_input"]


def read_input(path: str | os.PathLike[str], what: str) -> bytes:
    """The file's bytes; `what` names it in the error ("key file", "signature", ...). The verification paths
    pass `str` paths (keyseal._internal.pathtext), the others `Path`s."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise InputError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{what} {path} is a directory") from exc
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from exc
