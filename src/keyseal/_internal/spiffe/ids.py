"""SPIFFE IDs (`spiffe://<trust domain>/<path>`) checked as the SPIFFE ID standard requires.

Parsing is strict on purpose: every ID keyseal signs must be read the same way by every SPIFFE library, so
anything a conforming parser could read differently (upper case, percent-encoding, dot segments, empty
segments, a port, a query) is refused with a message naming the rule.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from keyseal.errors import UsageError

__all__ = [
    "SpiffeId", "SpiffeIdError", "check_path_prefix", "check_trust_domain", "parse_spiffe_id", "path_allowed",
]

MAX_ID_BYTES = 2048
PARSED_CACHE_SIZE = 4096
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeIdError(UsageError):
    """A SPIFFE ID or trust domain breaks the standard's rules."""


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg"
    uri: str = field(init=False, repr=False, compare=False)  # spiffe://trust-domain/path, built once

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", f"spiffe://{self.trust_domain}{self.path}")

    def __str__(self) -> str:
        return self.uri


def check_trust_domain(name: str) -> str:
    """A trust domain name: lower-case letters, digits, '.', '-', '_' (at most 255 characters)."""
    if not name or len(name) > 255 or not _TRUST_DOMAIN_RE.fullmatch(name):
        raise SpiffeIdError(
            f"invalid trust domain {name[:80]!r}: use lower-case letters, digits, '.', '-' and '_' "
            f"(e.g. example.org), at most 255 characters"
        )
    return name


def _check_path(path: str, what: str) -> str:
    if path == "":
        return path
    if not path.startswith("/"):
        raise SpiffeIdError(f"invalid {what} {path[:80]!r}: a path starts with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError(f"invalid {what} {path[:80]!r}: empty path segment or trailing '/'")
        if segment in {".", ".."}:
            raise SpiffeIdError(f"invalid {what} {path[:80]!r}: '.' and '..' segments are not allowed")
        if not _SEGMENT_RE.fullmatch(segment):
            raise SpiffeIdError(
                f"invalid {what} {path[:80]!r}: path segments use only letters, digits, '.', '-' and '_'"
            )
    return path


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse `spiffe://trust-domain/path`; the root ID (no path) parses too (callers decide)."""
    if not isinstance(text, str) or not text:
        raise SpiffeIdError("missing SPIFFE ID: give spiffe://<trust domain>/<path>")
    return _parse_spiffe_id(text)


@functools.lru_cache(maxsize=PARSED_CACHE_SIZE)
def _parse_spiffe_id(text: str) -> SpiffeId:
    """The parse itself, remembered: a server is asked for the same few IDs over and over, and the checks
    cost as much as building the SVID's extensions. Refusals raise, so they are never remembered."""
    # surrogatepass: a lone surrogate (JSON "\\udfff") is refused below, like any character an ID may not hold
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "spiffe":
        raise SpiffeIdError(f"invalid SPIFFE ID {text[:80]!r}: it must start with spiffe://")
    authority, slash, path = rest.partition("/")
    if not authority:
        raise SpiffeIdError(f"invalid SPIFFE ID {text[:80]!r}: the trust domain is missing")
    if any(c in authority for c in "@:"):
        raise SpiffeIdError(f"invalid SPIFFE ID {text[:80]!r}: no user info or port in the trust domain")
    if "?" in text or "#" in text:
        raise SpiffeIdError(f"invalid SPIFFE ID {text[:80]!r}: no query or fragment allowed")
    check_trust_domain(authority)
    return SpiffeId(authority, _check_path(slash + path, "SPIFFE ID path"))


def check_path_prefix(prefix: str) -> str:
    """A client's allowed path prefix: "/" (everything) or a SPIFFE ID path such as /ns/a."""
    if prefix == "/":
        return prefix
    return _check_path(prefix, "allowed path prefix")


RESERVED_PATH = "/keyseal"


def is_reserved(path: str) -> bool:
    """Whether a path names the server itself or a node agent (/keyseal, /keyseal/...). Those identities are
    issued only by the server (its serving certificate, an agent's join and renewal), never to a client or a
    registration entry: an agent ID is what the server trusts on an agent's mTLS connection."""
    return path == RESERVED_PATH or path.startswith(RESERVED_PATH + "/")


def path_allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` is one of the prefixes or below one, by whole segments (/ns/a admits /ns/a/x, not /ns/ab)."""
    return any(prefix in ("/", path) or path.startswith(prefix + "/") for prefix in prefixes)
