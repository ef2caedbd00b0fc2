"""Read a whole input file (a key, certificate, signature, audit log) with one clear error for each way it fails."""

from __future__ import annotations

from pathlib import Path

from keyseal.errors import InputError

__all__ = ["default_signature_path", "read_input"]


def read_input(path: Path, what: str) -> bytes:
    """The file's bytes; `what` names it in the error ("key file", "signature", ...)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None


def default_signature_path(data: Path, option: str = "signature") -> Path:
    """DATA.asc, else DATA.sig: where keyseal and gpg put a detached signature when none is named (`option` is
    what the user could have named it with, for the error)."""
    for suffix in (".asc", ".sig"):
        candidate = data.with_name(data.name + suffix)
        if candidate.exists():
            return candidate
    raise InputError(f"no {option} given and neither {data.name}.asc nor {data.name}.sig exists")
