"""Where keyseal keeps per-user state: `$KEYSEAL_HOME`, by default ~/.config/keyseal (local KEK, seen versions,
keyring, audit log). A module of its own so that reading the keyring imports nothing of key wrapping."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["DEFAULT_HOME", "HOME_ENV", "home_text", "keyseal_home"]

HOME_ENV = "KEYSEAL_HOME"
DEFAULT_HOME = "~/.config/keyseal"


def keyseal_home() -> Path:
    """Per-user keyseal state: `$KEYSEAL_HOME`, by default ~/.config/keyseal."""
    from pathlib import Path

    return Path(home_text())


def home_text() -> str:
    """`keyseal_home()` as text, for the paths that `keyseal-gpg --verify` reads without importing pathlib (git
    runs it once per commit): the same directory, spelt as pathlib spells it."""
    from keyseal._internal.pathtext import path_text

    home = os.path.expanduser(os.environ.get(HOME_ENV) or DEFAULT_HOME)
    if home.startswith("~"):
        raise RuntimeError("Could not determine home directory.")  # as pathlib's expanduser()
    return path_text(home)
