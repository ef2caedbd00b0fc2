"""Vault / OpenBao Transit key references, one spelling parsed one way for signing keys and KEKs.

The canonical spelling is `hashivault://[MOUNT/]KEY[?version=N]`: it is what keyseal prints in every message and
stores as a record's KEK id, so a value copied from either works as input anywhere, and it is the spelling
other signing tools (cosign) use for Transit keys. `vault:[MOUNT/]KEY[?version=N]` is an alias, accepted
wherever the canonical spelling is (a signing key `--key vault:transit/release`, a KEK `--kek vault:server-kek`).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from keyseal.errors import KeyURIError

__all__ = ["ALIAS_SCHEME", "DEFAULT_MOUNT", "SCHEME", "TransitKeyRef", "parse_transit_ref"]

SCHEME = "hashivault"
ALIAS_SCHEME = "vault"
DEFAULT_MOUNT = "transit"

# Transit key names and mount path segments: what keyseal accepts (a subset of what Vault accepts, so a path
# can never be bent by `..`, `?`, `#`, `*`, `+` or whitespace, and the policy paths it prints match exactly).
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class TransitKeyRef:
    """A Transit key: its mount (which may have several segments) and name, and a pinned version or None."""

    mount: str
    name: str
    version: int | None = None

    @property
    def uri(self) -> str:
        """The canonical URI, with the mount always spelled out."""
        suffix = f"?version={self.version}" if self.version is not None else ""
        return f"{SCHEME}://{self.mount}/{self.name}{suffix}"

    @property
    def key_uri(self) -> str:
        """The URI of the key itself, without a pinned version."""
        return f"{SCHEME}://{self.mount}/{self.name}"

    def path(self, endpoint: str) -> str:
        """The API path of one endpoint for this key, e.g. `transit/sign/NAME` (also the policy path)."""
        return f"{self.mount}/{endpoint}/{self.name}"


def parse_transit_ref(text: str) -> TransitKeyRef:
    """`hashivault://[MOUNT/]KEY[?version=N]` or its alias `vault:[MOUNT/]KEY[?version=N]` (MOUNT defaults to
    `transit` and may hold several segments).

    Also accepts the part after `hashivault:` (`//MOUNT/KEY`), as older callers hand it over.
    """
    hint = f"use {SCHEME}://MOUNT/KEY or {SCHEME}://KEY (mount transit), optionally ?version=N"
    if text.startswith(f"{ALIAS_SCHEME}:"):
        rest = text[len(ALIAS_SCHEME) + 1:]
        rest = rest if rest.startswith("//") else f"//{rest}"
    else:
        rest = text[len(SCHEME) + 1:] if text.startswith(f"{SCHEME}:") else text
    if not rest.startswith("//"):
        raise KeyURIError(f"invalid Vault Transit key URI {text!r}: {hint}")
    path, sep, query = rest[2:].partition("?")
    segments = path.split("/")
    if not path or not all(_SEGMENT_RE.fullmatch(s) for s in segments):
        raise KeyURIError(
            f"invalid Vault Transit key URI {text!r}: mount and key names are letters, digits, '.', '_' and '-' "
            f"separated by '/'; {hint}"
        )
    name = segments[-1]
    mount = "/".join(segments[:-1]) or DEFAULT_MOUNT
    version: int | None = None
    if sep:
        try:
            params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise KeyURIError(f"invalid query in Vault Transit key URI {text!r}: {hint}") from exc
        unknown = set(params) - {"version"}
        if unknown:
            raise KeyURIError(
                f"unknown parameter {sorted(unknown)[0]!r} in Vault Transit key URI {text!r}: only version=N"
            )
        values = params.get("version", [])
        if len(values) != 1 or not re.fullmatch(r"[1-9][0-9]{0,8}", values[0]):
            raise KeyURIError(
                f"invalid version in Vault Transit key URI {text!r}: give one whole number from 1, e.g. ?version=2"
            )
        version = int(values[0])
    return TransitKeyRef(mount, name, version)
