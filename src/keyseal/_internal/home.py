"""Where keyseal keeps per-user state: `$KEYSEAL_HOME`, by default ~/.config/keyseal (local KEK, seen versions,
keyring, audit log). A module of its own so that reading the keyring imports nothing of key wrapping."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_HOME", "HOME_ENV", "keyseal_home"]

HOME_ENV = "KEYSEAL_HOME"
DEFAULT_HOME = "~/.config/keyseal"


def keyseal_home() -> Path:
    """Per-user keyseal state: `$KEYSEAL_HOME`, by default ~/.config/keyseal."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()
