"""Registration entries as server and agent both see them: selectors -> SPIFFE ID, under a parent agent.

The server stores and serves them (ca.registry); the agent caches them and matches workloads against them
(agent.cache, agent.workload). Both import this module, so neither imports the other.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from keyseal._internal.spiffe.ids import SpiffeIdError, is_reserved, parse_spiffe_id
from keyseal.errors import UsageError

__all__ = [
    "AGENT_PATH",
    "ENTRY_ID_RE",
    "MAX_DNS_NAMES",
    "MAX_ENTRY_TTL",
    "MAX_FEDERATES_WITH",
    "MAX_SELECTORS",
    "Entry",
    "check_dns_name",
    "check_dns_names",
    "check_selector",
    "is_served",
]

AGENT_PATH = "/keyseal/agent"
_SELECTOR_RE = re.compile(
    r"unix:(uid:\d{1,10}|gid:\d{1,10}|path:/[^\x00-\x1f]{0,4095})"
    # keyseal._internal.agent.k8s: what the kubelet says of the caller's pod and container
    r"|k8s:(ns|sa|pod-name|pod-uid|node-name|container-name):[A-Za-z0-9._-]{1,253}"
    r"|k8s:container-image:[\x21-\x7e]{1,1024}|k8s:pod-label:[A-Za-z0-9./_-]{1,317}:[A-Za-z0-9._-]{0,63}")
MAX_SELECTORS = 16
MAX_ENTRY_TTL = 366 * 24 * 3600
MAX_FEDERATES_WITH = 16
MAX_DNS_NAMES = 32
_HEX_NUMBER_RE = re.compile(r"0x[0-9a-f]*")
_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


ENTRY_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")


def is_served(entry: Entry) -> bool:
    """Whether an entry may be handed out at all (see `_reserved`); one whose DNS names are not valid (written
    by hand into a store) is not either: its SVID would carry them."""
    return not _reserved(entry) and (not entry.dns_names or _valid_dns_names(entry.dns_names))


def _valid_dns_names(names: tuple[str, ...]) -> bool:
    try:
        return check_dns_names(names) == names
    except UsageError:
        return False


def _reserved(entry: Entry) -> bool:
    try:
        return is_reserved(parse_spiffe_id(entry.spiffe_id).path)
    except SpiffeIdError:
        return True  # not a SPIFFE ID at all: never served either


def check_selector(text: str) -> str:
    """A workload selector the agent can attest: unix:uid:N, unix:gid:N, unix:path:/absolute/exe, or a k8s: one
    (ns, sa, pod-name, pod-uid, node-name, container-name, container-image, pod-label:KEY:VALUE)."""
    if not isinstance(text, str) or not _SELECTOR_RE.fullmatch(text):
        raise UsageError(f"invalid selector {str(text)[:80]!r}: use unix:uid:N, unix:gid:N, unix:path:/abs/exe or "
                         f"k8s:ns:NAME, k8s:sa:NAME, k8s:pod-uid:UID, k8s:pod-label:KEY:VALUE ...")
    return text


def check_dns_name(text: object) -> str:
    """A DNS name for an X.509-SVID's DNS SANs, lower-cased: an RFC 1123 host name (labels of letters, digits and
    inner hyphens, 1-63 characters each, 253 in all), not a bare IP address. Wildcards (`*.example.org`) are
    refused: an SVID names one workload, and a wildcard would let that workload answer for every name below."""
    shown = str(text)[:80]
    if not isinstance(text, str) or not text:
        raise UsageError(f"invalid DNS name {shown!r}: give a host name such as web.example.org")
    name = text.lower()
    if "*" in name:
        raise UsageError(f"invalid DNS name {shown!r}: wildcards are not allowed in an SVID; give each name")
    if not name.isascii():
        raise UsageError(f"invalid DNS name {shown!r}: write an internationalized name in its ASCII form (xn--...)")
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise UsageError(f"invalid DNS name {shown!r}: use labels of 1-63 letters, digits and inner hyphens "
                         f"separated by dots (RFC 1123), at most 253 characters, no trailing dot")
    if labels[-1].isdigit() or _HEX_NUMBER_RE.fullmatch(labels[-1]):  # URL parsers read 0x7f000001 as IPv4
        raise UsageError(f"invalid DNS name {shown!r}: an IP address is not a DNS name")
    return name


def check_dns_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names checked (`check_dns_name`), lower-cased, each once, in the order given."""
    if len(names) > MAX_DNS_NAMES:
        raise UsageError(f"an entry has at most {MAX_DNS_NAMES} DNS names")
    return tuple(dict.fromkeys(check_dns_name(n) for n in names))


@dataclass(frozen=True)
class Entry:
    """A workload matching all `selectors`, attested by an agent whose SPIFFE ID is `parent_id` or below it,
    gets `spiffe_id`. TTLs of 0 mean the server's configured x509SVID.ttl / jwtSVID.ttl."""

    entry_id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    x509_ttl: int = 0
    jwt_ttl: int = 0
    federates_with: tuple[str, ...] = ()  # foreign trust domains whose bundles the workload gets (federation)
    dns_names: tuple[str, ...] = ()  # DNS SANs of its X.509-SVIDs, after the URI SAN (JWT-SVIDs carry none)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["selectors"] = list(self.selectors)
        del document["federates_with"], document["dns_names"]
        if self.federates_with:  # absent when empty: what entries without federation always looked like
            document["federates_with"] = list(self.federates_with)
        if self.dns_names:  # likewise: an entry without DNS names reads (and digests) as it always did
            document["dns_names"] = list(self.dns_names)
        return document

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(str(data["entry_id"]), str(data["spiffe_id"]), str(data["parent_id"]),
                   tuple(str(s) for s in data["selectors"]), int(data.get("x509_ttl", 0)),
                   int(data.get("jwt_ttl", 0)), tuple(str(t) for t in data.get("federates_with", ())),
                   tuple(str(n) for n in data.get("dns_names", ())))

    def parented_by(self, agent_id: str) -> bool:
        """Whether an agent may serve this entry: its ID is the parent, or below it by whole segments."""
        return agent_id == self.parent_id or agent_id.startswith(self.parent_id.rstrip("/") + "/")


