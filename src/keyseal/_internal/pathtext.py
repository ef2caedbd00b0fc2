"""Paths as text, spelt as `pathlib` spells them, for the short commands that must not import pathlib.

`pathlib` imports `urllib.parse`, `ipaddress`, `fnmatch` and `ntpath`: about 2 ms of a `keyseal-gpg --verify` that
git runs once per commit. The verification paths work on `str` paths instead, normalised by `path_text` exactly as
`str(Path(text))` would be, so every message names a file as the pathlib-based commands do
(tests/test_startup.py holds the two equal).
"""

from __future__ import annotations

__all__ = ["join", "name_of", "path_text"]


def path_text(text: str) -> str:
    """`str(pathlib.PurePosixPath(text))`: repeated and trailing slashes and `.` components dropped, `..` kept,
    a leading `//` kept (POSIX leaves it to the system), `.` for an empty path."""
    if text.startswith("/"):
        rest = text.lstrip("/")
        root = "//" if len(text) - len(rest) == 2 else "/"
    else:
        root, rest = "", text
    parts = [part for part in rest.split("/") if part and part != "."]
    return root + "/".join(parts) if root or parts else "."


def name_of(text: str) -> str:
    """`PurePosixPath(text).name`: the last component, empty for `.` and the root."""
    normal = path_text(text)
    if normal == "." or normal.endswith("/"):
        return ""
    return normal.rsplit("/", 1)[-1]


def join(directory: str, name: str) -> str:
    """`str(Path(directory) / name)` for a normalised `directory` and a plain file name."""
    return path_text(directory + name if directory.endswith("/") else directory + "/" + name)
