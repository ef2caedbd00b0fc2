"""Web Key Directory (draft-koch-openpgp-webkey-service): the address hash, the published tree, and a client.

The client speaks HTTPS only and always verifies the server certificate (against a given CA bundle or the system
store). It asks the advanced host `openpgpkey.<domain>` first and the domain itself (the direct method) only when
the advanced host answers 404 or does not exist in DNS; any other failure is reported, never papered over by
trying elsewhere, and redirects are not followed. Responses are capped in size, and one deadline (the timeout)
bounds the whole look-up: resolving, connecting, TLS, the request and every byte of both answers. Only certificates
with a (self-signed) user ID for the asked address are kept, so a directory cannot slip in a key for someone else.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from keyseal._internal.deadline import Deadline as _Deadline
from keyseal._internal.deadline import DeadlineConnection
from keyseal._internal.deadline import DeadlineSocket as _DeadlineSocket
from keyseal._internal.openpgp.cert import Certificate, load_certificates, merge_certificates
from keyseal._internal.openpgp.packets import (
    TAG_PUBLIC_SUBKEY,
    TAG_USER_ATTRIBUTE,
    TAG_USER_ID,
    encode_packet,
    iter_packets,
)
from keyseal.errors import KeysealError, OpenPGPError, UsageError, WkdError, WkdUnavailableError

__all__ = [
    "DEFAULT_TIMEOUT",
    "HTTPS_PORT",
    "MAX_RESPONSE_BYTES",
    "METHODS",
    "Address",
    "BuildResult",
    "Endpoint",
    "FetchResult",
    "Method",
    "PublishedFile",
    "addresses_at",
    "build_tree",
    "connect_map",
    "email_of",
    "fetch",
    "keep_user_ids",
    "parse_address",
    "parse_connect_to",
    "tls_context",
    "urls_for",
    "validate_domain",
    "wkd_hash",
    "zbase32",
]

Method = Literal["advanced", "direct"]
METHODS: tuple[Method, ...] = ("advanced", "direct")
MAX_RESPONSE_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 10.0
HTTPS_PORT = 443

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LOCAL = re.compile(r"^[^\s@<>()\[\],;:\"/\\]+$")
_ANGLE = re.compile(r"<([^<>]*)>\s*$")


# -- addresses and hashes --------------------------------------------------------------------------------


def zbase32(data: bytes) -> str:
    """z-base-32 (the human-oriented base-32 the WKD draft names), without padding."""
    bits = int.from_bytes(data, "big")
    count = (len(data) * 8 + 4) // 5
    bits <<= count * 5 - len(data) * 8
    return "".join(_ZBASE32[(bits >> (5 * (count - 1 - i))) & 31] for i in range(count))


def _ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only: the WKD hash maps the local part this way (non-ASCII stays as it is)."""
    return text.translate({code: code + 32 for code in range(ord("A"), ord("Z") + 1)})


def validate_domain(domain: str) -> str:
    """A DNS domain as a directory name: lower-cased LDH labels, no empty label, no '/', no '..'.

    Internationalised domains must be given in their ASCII (xn--) form.
    """
    candidate = domain.strip().lower().removesuffix(".")
    labels = candidate.split(".")
    if (not candidate or len(candidate) > 253 or len(labels) < 2
            or not all(_LABEL.match(label) for label in labels)):
        raise UsageError(
            f"invalid domain {domain!r}: use a DNS name such as example.org (letters, digits and '-' in "
            f"dot-separated labels; an internationalised name in its xn-- form)"
        )
    return candidate


@dataclass(frozen=True)
class Address:
    """A mail address split for WKD: the local part as written, and the lower-cased domain."""

    local: str
    domain: str

    @property
    def hash(self) -> str:
        return wkd_hash(self.local)

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    def matches(self, other: str) -> bool:
        """The same mailbox: local parts compared as the WKD hash compares them, domains case-insensitively."""
        try:
            parsed = parse_address(other)
        except UsageError:
            return False
        return parsed.domain == self.domain and _ascii_lower(parsed.local) == _ascii_lower(self.local)


def parse_address(email: str) -> Address:
    local, sep, domain = email.strip().rpartition("@")
    if not sep or not local or not _LOCAL.match(local):
        raise UsageError(f"invalid email address {email!r}: expected local-part@domain")
    try:
        return Address(local, validate_domain(domain))
    except UsageError as exc:
        raise UsageError(f"invalid email address {email!r}: the domain is not a valid DNS name") from exc


def wkd_hash(local_part: str) -> str:
    """z-base-32(SHA-1(local part with ASCII letters lower-cased)): the file name under `hu/`."""
    digest = hashlib.sha1(_ascii_lower(local_part).encode("utf-8"), usedforsecurity=False).digest()
    return zbase32(digest)


def email_of(user_id: str) -> str | None:
    """The address in a user ID: `Name <addr>` or a bare `addr`."""
    match = _ANGLE.search(user_id)
    candidate = match.group(1) if match else user_id.strip()
    return candidate if "@" in candidate and " " not in candidate else None


def urls_for(address: Address) -> dict[Method, tuple[str, str]]:
    """(host, path) for the advanced and the direct method."""
    query = "?l=" + quote(address.local, safe="")
    return {
        "advanced": (f"openpgpkey.{address.domain}",
                     f"/.well-known/openpgpkey/{address.domain}/hu/{address.hash}{query}"),
        "direct": (address.domain, f"/.well-known/openpgpkey/hu/{address.hash}{query}"),
    }


# -- building the published tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedFile:
    address: str
    path: Path
    fingerprints: tuple[str, ...]


@dataclass
class BuildResult:
    root: Path
    files: list[PublishedFile] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)  # files under hu/ this build did not write (left in place)


def keep_user_ids(certificate: Certificate, address: Address) -> bytes:
    """The certificate with only the user IDs for `address` (and their signatures); other user IDs and user
    attributes are left out, so a directory publishes nothing about addresses outside its domain."""
    out: list[bytes] = []
    keep = True
    for packet in iter_packets(certificate.binary):
        if packet.tag == TAG_USER_ID:
            email = email_of(packet.body.decode("utf-8", errors="replace"))
            keep = email is not None and address.matches(email)
        elif packet.tag == TAG_USER_ATTRIBUTE:
            keep = False
        elif packet.tag == TAG_PUBLIC_SUBKEY:
            keep = True
        if keep:
            out.append(encode_packet(packet.tag, packet.body))
    return b"".join(out)


def addresses_at(certificate: Certificate, domain: str) -> list[Address]:
    """The addresses of a certificate's (self-signed) user IDs at `domain`, one per mailbox."""
    found: list[Address] = []
    for user_id in certificate.user_ids:
        email = email_of(user_id)
        if email is None:
            continue
        try:
            address = parse_address(email)
        except UsageError:
            continue
        if address.domain == domain and not any(known.hash == address.hash for known in found):
            found.append(address)
    return found


def build_tree(
    certificates: Sequence[Certificate],
    domain: str,
    out_dir: Path,
    *,
    emails: Sequence[str] = (),
    method: Method = "advanced",
    submission_address: str | None = None,
) -> BuildResult:
    """Write `.well-known/openpgpkey/...` under `out_dir`: one file per address holding every certificate for it
    (concatenated, binary: several during a rotation), and the `policy` file. Files 0644, directories 0755."""
    domain = validate_domain(domain)
    if method not in METHODS:
        raise UsageError(f"unknown WKD method {method!r}: use advanced or direct")
    wanted = [parse_address(email) for email in emails]
    for address in wanted:
        if address.domain != domain:
            raise UsageError(f"{address} is not at {domain}: a WKD for {domain} publishes only its own addresses")
    by_hash: dict[str, tuple[Address, list[Certificate]]] = {}
    for cert in merge_certificates(list(certificates)):
        for address in addresses_at(cert, domain):
            if wanted and not any(w.hash == address.hash for w in wanted):
                continue
            by_hash.setdefault(address.hash, (address, []))[1].append(cert)
    for address in wanted:
        if address.hash not in by_hash:
            raise UsageError(f"no given certificate has a self-signed user ID for {address}")
    if not by_hash:
        raise UsageError(f"no given certificate has a user ID at {domain}: nothing to publish")
    if submission_address is not None:
        parse_address(submission_address)
    base = out_dir / ".well-known" / "openpgpkey"
    top = base / domain if method == "advanced" else base
    hu = top / "hu"
    _make_dirs(out_dir, hu)
    result = BuildResult(out_dir)
    for digest, (address, certs) in sorted(by_hash.items()):
        path = hu / digest
        _write_public(path, b"".join(keep_user_ids(cert, address) for cert in certs))
        result.files.append(PublishedFile(str(address), path, tuple(cert.fingerprint for cert in certs)))
    policy = "" if submission_address is None else f"submission-address: {submission_address}\n"
    _write_public(top / "policy", policy.encode("utf-8"))
    if submission_address is not None:
        _write_public(top / "submission-address", f"{submission_address}\n".encode())
    written = {item.path.name for item in result.files}
    result.stale = sorted(p for p in hu.iterdir() if p.name not in written and not p.name.startswith("."))
    return result


def _make_dirs(root: Path, leaf: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        relative = leaf.relative_to(root)
        current = root
        for part in relative.parts:
            current = current / part
            current.mkdir(exist_ok=True)
            os.chmod(current, 0o755)  # noqa: S103 - a published web tree must be world-readable
    except OSError as exc:
        raise KeysealError(f"cannot create {leaf}: {exc.strerror}") from exc


def _write_public(path: Path, data: bytes) -> None:
    from keyseal._internal.atomic import write_atomic

    write_atomic(path, data, mode=0o644)  # a failure is an OutputError: "cannot write PATH: reason"


# -- fetching ----------------------------------------------------------------------------------------------


Endpoint = tuple[str, int]


def parse_connect_to(spec: str) -> tuple[Endpoint, Endpoint]:
    """`HOST:PORT:ADDRESS:PORT2` (an IPv6 address in brackets): connect to ADDRESS:PORT2 whenever HOST:PORT is
    asked for. Only the TCP destination changes; TLS still verifies the certificate for HOST."""
    match = re.fullmatch(r"([^:\[\]]+):(\d+):(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):(\d+)", spec.strip())
    if match is None:
        raise UsageError(f"invalid --connect-to {spec!r}: use HOST:PORT:ADDRESS:PORT, e.g. "
                         f"openpgpkey.example.org:443:127.0.0.1:8443")
    host, port, target, target_port = match.groups()
    ports = int(port), int(target_port)
    if not all(0 < p < 65536 for p in ports):
        raise UsageError(f"invalid --connect-to {spec!r}: ports are 1-65535")
    return (host.lower(), ports[0]), (target.strip("[]"), ports[1])


def connect_map(specs: Iterable[str]) -> dict[Endpoint, Endpoint]:
    return dict(parse_connect_to(spec) for spec in specs)


@dataclass(frozen=True)
class FetchResult:
    """What a directory published for an address: the certificates kept, and what was dropped and why."""

    address: str
    url: str
    method: Method
    certificates: list[Certificate]
    dropped: list[str]

    @property
    def fingerprints(self) -> list[str]:
        return sorted(cert.fingerprint for cert in self.certificates)


# getaddrinfo's "no such name" answers: only these mean the advanced host does not exist (a DNS outage does not).
_NO_SUCH_HOST = frozenset(code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
                          if code is not None)


class _NotFound(Exception):
    """The advanced method found nothing (HTTP 404, or no such host): try the direct method."""


class _Connection(DeadlineConnection):
    """HTTPS to `host` on port 443, the TCP connection sent to `target` (connect_to); one deadline."""

    def __init__(self, host: str, target: Endpoint, context: ssl.SSLContext, deadline: _Deadline) -> None:
        super().__init__(host, HTTPS_PORT, context, deadline, target=target)


def tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Certificate and host-name verification always on; the given bundle replaces the system store."""
    try:
        context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle is not None else None)
    except FileNotFoundError as exc:
        raise UsageError(f"CA bundle {ca_bundle} does not exist") from exc
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"CA bundle {ca_bundle} holds no PEM certificate keyseal can read") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _DeadlineSocket
    return context


def fetch(
    email: str,
    *,
    ca_bundle: Path | None = None,
    connect_to: Mapping[Endpoint, Endpoint] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> FetchResult:
    """Look `email` up: advanced method, then direct after a 404 (or a missing advanced host).

    Raises WkdUnavailableError when the directory cannot be reached (network, TLS, timeout, server error),
    WkdError when it answers with something unusable or has no key for the address.
    """
    address = parse_address(email)
    context = tls_context(ca_bundle)
    routes = dict(connect_to or {})
    urls = urls_for(address)
    misses: list[str] = []
    deadline = _Deadline(timeout)  # one for the whole look-up, the direct method's try included
    for method in METHODS:
        host, path = urls[method]
        url = f"https://{host}{path}"
        try:
            body = _get(host, path, routes, context, deadline, max_bytes)
        except _NotFound as exc:
            misses.append(str(exc))
            continue
        return _keep_matching(address, url, method, body)
    raise WkdError(f"no key for {address} in its Web Key Directory: {'; '.join(misses)}")


def _get(host: str, path: str, routes: Mapping[Endpoint, Endpoint], context: ssl.SSLContext, deadline: _Deadline,
         max_bytes: int) -> bytes:
    target = routes.get((host, HTTPS_PORT), (host, HTTPS_PORT))
    url = f"https://{host}{path}"
    timeout = deadline.timeout
    connection = _Connection(host, target, context, deadline)
    try:
        connection.request("GET", path, headers={"Accept": "application/octet-stream", "User-Agent": "keyseal"})
        response = connection.getresponse()
        if response.status == 404:
            raise _NotFound(f"{url} answered 404")
        if response.status != 200:
            raise WkdUnavailableError(f"{url} answered HTTP {response.status} {response.reason}".rstrip())
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
            raise WkdError(f"{url} sent {declared} bytes: more than the {max_bytes >> 10} KiB a key may take")
        body = bytearray()
        while chunk := response.read(16384):
            body += chunk
            if len(body) > max_bytes:
                raise WkdError(f"{url} sent more than the {max_bytes >> 10} KiB a key may take")
        return bytes(body)
    except socket.gaierror as exc:
        if host.startswith("openpgpkey.") and exc.errno in _NO_SUCH_HOST:
            raise _NotFound(f"{host} does not exist") from exc
        raise WkdUnavailableError(f"cannot resolve {host}: the Web Key Directory is unreachable") from exc
    except ssl.SSLCertVerificationError as exc:
        raise WkdUnavailableError(f"TLS certificate of {host} failed verification ({exc.verify_message}): "
                                  f"refusing {url}") from exc
    except ssl.SSLError as exc:
        raise WkdUnavailableError(f"TLS with {host} failed ({exc.reason or exc}): refusing {url}") from exc
    except TimeoutError as exc:
        raise WkdUnavailableError(f"{url} timed out after {timeout:g} s") from exc
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise WkdUnavailableError(f"cannot fetch {url}: {reason}") from exc
    finally:
        connection.close()


def _keep_matching(address: Address, url: str, method: Method, body: bytes) -> FetchResult:
    if not body:
        raise WkdError(f"{url} answered with an empty body: no key for {address}")
    try:
        certificates = load_certificates(body, url)
    except OpenPGPError as exc:
        raise WkdError(f"{url} did not answer with usable OpenPGP keys: {exc.message}") from exc
    kept: list[Certificate] = []
    dropped: list[str] = []
    for cert in merge_certificates(certificates):
        if any(address.matches(email) for email in (email_of(uid) for uid in cert.user_ids) if email):
            kept.append(cert)
        else:
            dropped.append(f"{cert.fingerprint} (no user ID for {address})")
    if not kept:
        raise WkdError(f"{url} published no key with a user ID for {address}")
    return FetchResult(str(address), url, method, kept, dropped)
