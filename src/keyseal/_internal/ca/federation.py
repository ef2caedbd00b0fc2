"""SPIFFE Federation: the bundles of foreign trust domains, fetched from their bundle endpoints (docs/federation.md).

Each trust domain in `federation.trustDomains` is fetched over one of the two profiles of the SPIFFE Federation
spec:
- `https_web`: the endpoint's certificate is checked by web PKI rules (the system's roots, or `caFile`), its
  host name included;
- `https_spiffe`: the endpoint presents an X.509-SVID; it must chain to the foreign trust domain's own X.509
  authorities and name exactly `endpointSPIFFEID`. The first authorities come from `bundleFile` (obtained once,
  out of band); after that, the latest bundle fetched is what authenticates the next fetch.

A fetched bundle replaces the one held only if it is well formed, is for that trust domain (a CA certificate
naming another trust domain in its URI SAN is refused), and its `spiffe_sequence` did not go backwards. On
any failure the last good bundle is kept and the fetch is tried again sooner. The next fetch follows the
bundle's `spiffe_refresh_hint`, bounded to [MIN_REFRESH, MAX_REFRESH]. The latest bundles are kept in the
server's store (a file, or a ConfigMap), so a restart goes on from them rather than from a bootstrap bundle
whose authorities may have expired since.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyseal._internal.ca.config import ForeignTrustDomain
from keyseal._internal.ca.custody.pin_store import PinStore
from keyseal._internal.deadline import Deadline, DeadlineConnection, DeadlineSocket
from keyseal.errors import InputError, KeysealError, StoreConflictError, loggable

__all__ = ["MAX_REFRESH", "MIN_REFRESH", "FederatedBundles", "ForeignBundle", "parse_foreign_bundle"]

log = logging.getLogger(__name__)

MIN_REFRESH = 5.0  # seconds: a hint below this would let a foreign endpoint make us poll it hot
MAX_REFRESH = 3600.0
DEFAULT_REFRESH = 300.0  # a bundle without a hint
RETRY_SECONDS = 10.0  # after a failed fetch (at most the bundle's own refresh interval)
TIMEOUT = 10.0
MAX_BUNDLE_BYTES = 1 << 20
MAX_KEYS = 256
STORE_FORMAT = "keyseal.federated-bundles.v1"
_ATTEMPTS = 5


class FederationError(KeysealError):
    """A foreign bundle endpoint or bundle was refused."""


@dataclass(frozen=True)
class ForeignBundle:
    """One trust domain's bundle as held: the SPIFFE bundle document, its sequence, and its X.509 authorities."""

    trust_domain: str
    document: dict[str, Any]
    sequence: int
    refresh_hint: float | None
    authorities: tuple[x509.Certificate, ...]

    @property
    def authorities_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self.authorities)


def parse_foreign_bundle(data: bytes, trust_domain: str) -> ForeignBundle:
    """Check a SPIFFE bundle (JWKS) for `trust_domain`; keys of other uses are dropped, a malformed one refused."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise FederationError(f"the bundle of {trust_domain} is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FederationError(f"the bundle of {trust_domain} is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FederationError(f"the bundle of {trust_domain} is not a SPIFFE bundle (a JWKS with keys)")
    raw_keys = document["keys"]
    if len(raw_keys) > MAX_KEYS:
        raise FederationError(f"the bundle of {trust_domain} has more than {MAX_KEYS} keys")
    sequence = document.get("spiffe_sequence", 0)
    hint = document.get("spiffe_refresh_hint")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise FederationError(f"the bundle of {trust_domain} has no valid spiffe_sequence")
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int | float) or hint <= 0):
        raise FederationError(f"the bundle of {trust_domain} has no valid spiffe_refresh_hint")
    keys: list[dict[str, Any]] = []
    authorities: list[x509.Certificate] = []
    for item in raw_keys:
        if not isinstance(item, dict):
            raise FederationError(f"the bundle of {trust_domain} has a key that is not an object")
        use = item.get("use")
        if use == "x509-svid":
            authorities.append(_authority(item, trust_domain))
            keys.append(item)
        elif use == "jwt-svid":
            if not isinstance(item.get("kid"), str) or not item["kid"] or not isinstance(item.get("kty"), str):
                raise FederationError(f"the bundle of {trust_domain} has a jwt-svid key without kid or kty")
            keys.append(item)
    if not authorities and not keys:
        raise FederationError(f"the bundle of {trust_domain} holds no X.509 authority and no JWT key")
    cleaned: dict[str, Any] = {"keys": keys, "spiffe_sequence": sequence}
    if hint is not None:
        cleaned["spiffe_refresh_hint"] = hint
    return ForeignBundle(trust_domain, cleaned, sequence, float(hint) if hint is not None else None,
                         tuple(authorities))


def _authority(item: dict[str, Any], trust_domain: str) -> x509.Certificate:
    chain = item.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise FederationError(f"the bundle of {trust_domain} has an x509-svid key without exactly one x5c")
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise FederationError(f"the bundle of {trust_domain} has an x509-svid key that is not a CA "
                              f"certificate") from exc
    if not constraints.ca:
        raise FederationError(f"the bundle of {trust_domain} has an x509-svid certificate that is not a CA")
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        if uri.lower().startswith("spiffe://") and urllib.parse.urlsplit(uri).hostname != trust_domain:
            raise FederationError(f"the bundle fetched for {trust_domain} holds a CA certificate of "
                                  f"{loggable(uri, 80)}: a bundle for the wrong trust domain")
    return certificate


@dataclass
class _State:
    config: ForeignTrustDomain
    bundle: ForeignBundle | None = None
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    last_error: str | None = None
    failures: int = 0
    next_fetch: float = 0.0


def _uri_sans(der: bytes) -> list[str]:
    certificate = x509.load_der_x509_certificate(der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.UniformResourceIdentifier))


class FederatedBundles:
    """The foreign trust domains' bundles; `start()` fetches them from a thread of their own."""

    def __init__(self, domains: tuple[ForeignTrustDomain, ...], store: PinStore | None = None) -> None:
        self._states = {d.trust_domain: _State(d) for d in domains}
        self.store = store
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for state in self._states.values():
            if state.config.bundle_file is not None:
                state.bundle = self._bootstrap(state.config)
        self._load_stored()

    # -- what the server reads --------------------------------------------------------------------------

    def bundle(self, trust_domain: str) -> ForeignBundle | None:
        state = self._states.get(trust_domain)
        return state.bundle if state is not None else None

    def documents(self, trust_domains: set[str]) -> dict[str, dict[str, Any]]:
        """The bundle documents held for these trust domains (those with none yet are left out)."""
        found = {}
        for name in sorted(trust_domains):
            bundle = self.bundle(name)
            if bundle is not None:
                found[name] = bundle.document
        return found

    def status(self) -> list[dict[str, Any]]:
        """Each foreign trust domain's freshness, for `keyseal server federation` and the metrics."""
        rows = []
        for name, state in sorted(self._states.items()):
            bundle = state.bundle
            rows.append({
                "trustDomain": name,
                "profile": state.config.profile,
                "bundleEndpointURL": state.config.bundle_endpoint_url,
                "sequence": bundle.sequence if bundle else None,
                "authorities": len(bundle.authorities) if bundle else 0,
                "jwtKeys": sum(1 for k in bundle.document["keys"] if k.get("use") == "jwt-svid") if bundle else 0,
                "lastSuccess": _iso(state.last_success),
                "lastAttempt": _iso(state.last_attempt),
                "lastError": state.last_error,
                "failures": state.failures,
            })
        return rows

    def metrics_lines(self) -> list[str]:
        rows = self.status()
        return [
            "# HELP keyseal_federated_bundle_last_refresh_timestamp_seconds When each foreign trust domain's "
            "bundle was last fetched successfully (0: never since start).",
            "# TYPE keyseal_federated_bundle_last_refresh_timestamp_seconds gauge",
            *(f'keyseal_federated_bundle_last_refresh_timestamp_seconds{{trust_domain="{r["trustDomain"]}"}} '
              f'{_timestamp(self._states[r["trustDomain"]].last_success)}' for r in rows),
            "# HELP keyseal_federated_bundle_sequence The spiffe_sequence of each foreign bundle held.",
            "# TYPE keyseal_federated_bundle_sequence gauge",
            *(f'keyseal_federated_bundle_sequence{{trust_domain="{r["trustDomain"]}"}} {r["sequence"] or 0}'
              for r in rows),
            "# HELP keyseal_federated_bundle_refresh_failures Failed fetches of each foreign bundle since the "
            "last success.",
            "# TYPE keyseal_federated_bundle_refresh_failures gauge",
            *(f'keyseal_federated_bundle_refresh_failures{{trust_domain="{r["trustDomain"]}"}} {r["failures"]}'
              for r in rows),
        ]

    # -- fetching -------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:  # a stop() racing this start() either comes first (nothing starts) or joins the thread
            if not self._states or self._stop.is_set() or self._thread is not None:
                return
            thread = threading.Thread(target=self._loop, name="keyseal-federation", daemon=True)
            thread.start()
            self._thread = thread

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=TIMEOUT + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for name, state in list(self._states.items()):
                if self._stop.is_set():
                    return
                if state.next_fetch <= now:
                    try:
                        self.refresh(name)
                    except Exception:  # a bug must not end the thread: the other trust domains go on
                        log.exception("federation: refreshing the bundle of %s failed", name)
                        self._failed(state, f"internal error refreshing the bundle of {name}; see the log")
            self._stop.wait(0.5)

    def refresh(self, trust_domain: str) -> bool:
        """Fetch one trust domain's bundle now; True if a new bundle was taken. Failures are logged and kept
        in its status; the last good bundle stays."""
        state = self._states[trust_domain]
        state.last_attempt = datetime.now(UTC)
        try:
            fetched = self._fetch(state)
            taken = self._take(state, fetched)
        except (FederationError, InputError) as exc:
            self._failed(state, exc.message)
            return False
        except TimeoutError:  # the fetch's one deadline, or one socket step past what was left of it
            self._failed(state, f"cannot fetch the bundle of {trust_domain} from "
                                f"{state.config.bundle_endpoint_url}: no complete answer within {TIMEOUT:g} s")
            return False
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
            self._failed(state, f"cannot fetch the bundle of {trust_domain} from "
                                f"{state.config.bundle_endpoint_url}: {loggable(str(exc), 200)}")
            return False
        state.last_success, state.last_error, state.failures = datetime.now(UTC), None, 0
        hint = fetched.refresh_hint if fetched.refresh_hint is not None else DEFAULT_REFRESH
        state.next_fetch = time.monotonic() + min(max(hint, MIN_REFRESH), MAX_REFRESH)
        return taken

    def _failed(self, state: _State, message: str) -> None:
        if state.last_error != message:
            log.error("federation: %s (keeping the last good bundle)", message)
        state.last_error = message
        state.failures += 1
        hint = state.bundle.refresh_hint if state.bundle and state.bundle.refresh_hint else DEFAULT_REFRESH
        state.next_fetch = time.monotonic() + min(max(min(hint, RETRY_SECONDS), MIN_REFRESH / 5), MAX_REFRESH)

    def _take(self, state: _State, fetched: ForeignBundle) -> bool:
        held = state.bundle
        if held is not None and fetched.sequence < held.sequence:
            raise FederationError(f"the bundle of {state.config.trust_domain} went back from sequence "
                                  f"{held.sequence} to {fetched.sequence}: refused")
        if held is not None and held.document == fetched.document:
            return False
        with self._lock:
            state.bundle = fetched
        log.info("federation: took the bundle of %s (sequence %d, %d authorities)", fetched.trust_domain,
                 fetched.sequence, len(fetched.authorities))
        self._save(fetched)
        return True

    def _fetch(self, state: _State) -> ForeignBundle:
        config = state.config
        url = urllib.parse.urlsplit(config.bundle_endpoint_url)
        host, port = url.hostname or "", url.port or 443
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if config.profile == "https_spiffe":
            held = state.bundle
            if held is None or not held.authorities:
                raise FederationError(f"no X.509 authorities of {config.trust_domain} to authenticate its bundle "
                                      f"endpoint with: set bundleFile")
            context = ssl.create_default_context(cadata=held.authorities_pem)
            context.check_hostname = False  # the SPIFFE ID is the endpoint's name, checked below
        else:
            context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        # One deadline for the whole fetch (resolve, connect, handshake, headers, body): every trust domain is
        # fetched on one thread, so an endpoint trickling bytes must not hold up the others.
        context.sslsocket_class = DeadlineSocket
        connection = DeadlineConnection(host, port, context, Deadline(TIMEOUT))
        try:
            connection.connect()
            if config.profile == "https_spiffe":
                assert connection.sock is not None
                der = connection.sock.getpeercert(binary_form=True)
                names = _uri_sans(der) if der else []
                if names != [config.endpoint_spiffe_id]:
                    raise FederationError(f"the bundle endpoint of {config.trust_domain} presented "
                                          f"{loggable(str(names), 120)}, not {config.endpoint_spiffe_id}")
            connection.request("GET", path, headers={"Accept": "application/json"})
            response = connection.getresponse()
            body = response.read(MAX_BUNDLE_BYTES + 1)
            if response.status != 200:
                raise FederationError(f"the bundle endpoint of {config.trust_domain} answered HTTP "
                                      f"{response.status}")
        finally:
            connection.close()
        return parse_foreign_bundle(body, config.trust_domain)

    # -- bootstrap and persistence ----------------------------------------------------------------------

    def _bootstrap(self, config: ForeignTrustDomain) -> ForeignBundle:
        path = config.bundle_file
        assert path is not None
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the bundleFile of {config.trust_domain} ({path}): "
                             f"{exc.strerror or exc}") from exc
        try:
            return parse_foreign_bundle(data, config.trust_domain)
        except FederationError as exc:
            raise InputError(f"{path}: {exc.message}") from exc

    def _read_store(self) -> tuple[dict[str, Any], str | None]:
        assert self.store is not None
        found = self.store.read()
        if found is None or not found[0].strip():
            return {}, found[1] if found else None
        try:
            document = json.loads(found[0])
            if document.get("format") != STORE_FORMAT or not isinstance(document.get("bundles"), dict):
                raise ValueError
        except (ValueError, AttributeError) as exc:
            raise KeysealError(f"{self.store.location()} is not a keyseal federated-bundles document: remove "
                               f"it (the bundles are fetched again)") from exc
        return dict(document["bundles"]), found[1]

    def _load_stored(self) -> None:
        if self.store is None:
            return
        try:
            stored, _ = self._read_store()
        except KeysealError as exc:
            log.error("federation: %s", exc.message)
            return
        for name, state in self._states.items():
            raw = stored.get(name)
            if raw is None:
                continue
            try:
                bundle = parse_foreign_bundle(json.dumps(raw).encode(), name)
            except FederationError as exc:
                log.error("federation: the stored bundle of %s is refused: %s", name, exc.message)
                continue
            if state.bundle is None or bundle.sequence >= state.bundle.sequence:
                state.bundle = bundle

    def _save(self, bundle: ForeignBundle) -> None:
        if self.store is None:
            return
        for _ in range(_ATTEMPTS):
            try:
                stored, revision = self._read_store()
                previous = stored.get(bundle.trust_domain)
                if isinstance(previous, dict) and isinstance(previous.get("spiffe_sequence"), int) \
                        and previous["spiffe_sequence"] > bundle.sequence:
                    return  # another replica stored a newer one
                stored[bundle.trust_domain] = bundle.document
                data = json.dumps({"format": STORE_FORMAT, "bundles": stored}, indent=1, sort_keys=True)
                self.store.write(data.encode() + b"\n", revision)
                return
            except StoreConflictError:
                continue
            except KeysealError as exc:
                log.error("federation: cannot store the bundle of %s: %s", bundle.trust_domain, exc.message)
                return


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def _timestamp(moment: datetime | None) -> int:
    return int(moment.timestamp()) if moment else 0
