"""What the agent holds: the entries it serves, an X.509-SVID (key + chain) per entry, JWT-SVIDs by entry and
audience (at most `jwt_cache_size`, the least recently used dropped first, expired ones dropped at each sync: a
workload chooses its audiences freely), and the trust bundle. `sync()` brings it up to date from the server;
every change bumps `version` and wakes the Workload API streams. When the server cannot be reached, cached SVIDs
are kept (and logged) until they expire, then dropped, so a workload gets a clear error instead of an expired
certificate.

Expiry is enforced where SVIDs are served, not only at the next sync: `usable_x509()` and `jwt_svid()` never
hand out an SVID within its serving margin of `notAfter` (`serve_until`), and `next_deadline()` tells the
Workload API streams and the sync loop when the next SVID is due for renewal or runs out, so renewal happens
before a workload could see a gap and the answer turns UNAVAILABLE the moment nothing valid is left."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.agent.client import ServerClient, ServerRefusedError, make_csr
from keyseal._internal.agent.state import AgentState
from keyseal._internal.spiffe.entry import Entry
from keyseal.errors import BackendUnavailableError, KeysealError

__all__ = ["AgentCache", "CachedJwt", "CachedX509"]

log = logging.getLogger(__name__)

RENEW_FRACTION = 0.4  # a new SVID is fetched once 40% of the old one's lifetime has passed
MARGIN_FRACTION = 0.1  # an SVID is no longer served in the last 10% of its life ...
MARGIN_LIMIT = timedelta(seconds=5)  # ... or its last 5 seconds, whichever is shorter


def _now() -> datetime:
    return datetime.now(UTC)


def _renew_at(issued: datetime, expires: datetime) -> datetime:
    return issued + (expires - issued) * RENEW_FRACTION


def _due(issued: datetime, expires: datetime, now: datetime) -> bool:
    return now >= _renew_at(issued, expires)


def serve_until(issued: datetime, expires: datetime) -> datetime:
    """The last moment an SVID is handed to a workload: `notAfter` minus a small margin, so that a workload
    never receives one that expires before it can use it."""
    return expires - min(MARGIN_LIMIT, (expires - issued) * MARGIN_FRACTION)


@dataclass(frozen=True)
class CachedX509:
    entry: Entry
    key_der: bytes  # PKCS#8, only in memory
    chain_der: bytes
    issued: datetime
    expires: datetime

    @property
    def serve_until(self) -> datetime:
        return serve_until(self.issued, self.expires)


@dataclass(frozen=True)
class CachedJwt:
    token: str
    issued: datetime
    expires: datetime

    @property
    def serve_until(self) -> datetime:
        return serve_until(self.issued, self.expires)


def _split_bundle(bundle: dict[str, Any]) -> tuple[list[bytes], bytes]:
    """A SPIFFE bundle's CA certificates (DER) and its JWT keys as a JWKS (what the Workload API serves)."""
    certificates, jwt_keys = [], []
    for item in bundle.get("keys", []):
        if item.get("use") == "x509-svid":
            certificates += [base64.b64decode(c) for c in item.get("x5c", [])]
        elif item.get("use") == "jwt-svid":
            jwt_keys.append({k: v for k, v in item.items() if k != "use"})
    return certificates, json.dumps({"keys": jwt_keys}, sort_keys=True).encode()


JwtKey = tuple[str, tuple[str, ...]]  # entry ID, sorted audience


def _is_psat_agent(trust_domain: str, certificate: x509.Certificate | None) -> bool:
    """Whether the agent SVID names an agent attested by its service account token:
    spiffe://<td>/keyseal/agent/k8s_psat/<cluster>/<node-uid>."""
    if certificate is None:
        return False
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    prefix = f"spiffe://{trust_domain}/keyseal/agent/k8s_psat/"
    return any(uri.startswith(prefix) for uri in names.get_values_for_type(x509.UniformResourceIdentifier))


class AgentCache:
    def __init__(self, client: ServerClient, trust_domain: str, state: AgentState | None = None,
                 jwt_cache_size: int = 1000) -> None:
        self.client = client
        self.state = state
        self.trust_domain = trust_domain
        self.condition = threading.Condition()
        self.version = 0
        self.entries: tuple[Entry, ...] = ()
        self.x509: dict[str, CachedX509] = {}
        self.jwt: OrderedDict[JwtKey, CachedJwt] = OrderedDict()  # least recently used first
        self.jwt_cache_size = jwt_cache_size
        self._jwt_lock = threading.Lock()  # JWT-SVIDs are fetched on the Workload API's threads
        self.bundle_der = b""
        self.jwks = b""
        # Foreign trust domains' bundles that entries federate with: trust domain -> (CA certificates DER, JWKS).
        self.federated: dict[str, tuple[bytes, bytes]] = {}
        self.synced = threading.Event()
        self.server_reachable = True
        self.last_sync: datetime | None = None
        self.sync_failures = 0
        self.agent_expires: datetime | None = None
        self._agent_issued: datetime | None = None
        self.revision: str | None = None  # what the last sync answered (see keyseal._internal.ca.http.agents sync)
        self.incremental = True
        # The agent SVID expired, or the server refused it: only a new join helps (agent.main rejoins).
        self.needs_join = False
        # An agent attested by its service account token (k8s_psat) renews with a fresh one: this reads it (the
        # kubelet rotates the file). keyseal._internal.agent.main sets it when k8sPSAT.tokenFile is configured.
        self.renewal_token: Callable[[], str] | None = None

    # -- reading ------------------------------------------------------------------------------------------

    def matching(self, selectors: frozenset[str]) -> list[Entry]:
        """The entries a workload with these selectors holds: all of an entry's selectors must match."""
        return [e for e in self.entries if set(e.selectors) <= selectors]

    def usable_x509(self, entry_id: str, now: datetime | None = None) -> CachedX509 | None:
        """The cached X.509-SVID of an entry if it may still be served (before its `serve_until`)."""
        cached = self.x509.get(entry_id)
        if cached is None or (now or _now()) >= cached.serve_until:
            return None
        return cached

    def next_deadline(self, now: datetime | None = None, renewals: bool = True) -> datetime | None:
        """The next moment something changes by time alone: a cached SVID is due for renewal (the sync loop
        wakes then, so renewal comes before a gap) or leaves service (the Workload API streams wake then;
        they ask with `renewals` False, since a renewal wakes them anyway)."""
        now = now or _now()
        moments = []
        for cached in list(self.x509.values()):
            moments.append(cached.serve_until)
            if renewals:
                moments.append(_renew_at(cached.issued, cached.expires))
        if renewals and self._agent_issued is not None and self.agent_expires is not None:
            moments.append(_renew_at(self._agent_issued, self.agent_expires))
        future = [m for m in moments if m > now]
        due = [m for m in moments if m <= now]
        if due and renewals and self.server_reachable:
            return now  # something is due already
        return min(future) if future else None

    def wait_change(self, version: int, timeout: float) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.version != version, timeout)

    def wake(self) -> None:
        """Wake everything waiting for a change (the sync loop re-reads its schedule, e.g. at a stop)."""
        self._changed()

    def _changed(self) -> None:
        with self.condition:
            self.version += 1
            self.condition.notify_all()

    # -- joining and syncing ------------------------------------------------------------------------------

    def _take_agent_svid(self, key: ec.EllipticCurvePrivateKey, answer: dict[str, Any]) -> None:
        certificate = x509.load_pem_x509_certificate(answer["certChain"][0].encode("ascii"))
        self.client.set_identity(key, certificate)
        self._agent_issued, self.agent_expires = _now(), certificate.not_valid_after_utc
        self.needs_join = False
        log.info("agent SVID %s valid until %s", answer["spiffeID"], answer["expiresAt"])
        if self.state is not None:
            try:
                self.state.save(key, certificate)
            except KeysealError as exc:
                log.error("cannot save the agent SVID (a restart will need a new join token): %s", exc.message)

    def join(self, token: str, path: str = "/v1/agent/join") -> None:
        """Join with a one-time token, or (path /v1/agent/attest/k8s_psat) a projected service account token."""
        key = ec.generate_private_key(ec.SECP256R1())
        held = (self.client.key, self.client.certificate)
        self.client.forget_identity()  # a join is authenticated by the token alone
        try:
            answer = self.client.call(path, {"token": token, "csr": make_csr(key)})
        except BaseException:
            if held[0] is not None and held[1] is not None:  # a refused join costs no identity still held
                self.client.set_identity(held[0], held[1])
            raise
        self._take_agent_svid(key, answer)
        self._take_bundle(answer["bundle"])

    def resume(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        """Take up a saved agent SVID and renew it at once (over mTLS with it): ServerRefusedError if the
        server no longer accepts it. If the server cannot be reached, the saved SVID is kept until it can."""
        self.client.set_identity(key, certificate)
        # Renewal is due by the saved SVID's own lifetime, not from this restart.
        self._agent_issued, self.agent_expires = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        fresh = ec.generate_private_key(ec.SECP256R1())
        try:
            answer = self._renew(fresh)
        except BackendUnavailableError as exc:
            log.warning("%s: keeping the saved agent SVID until the server answers", exc.message)
            return
        self._take_agent_svid(fresh, answer)
        self._take_bundle(answer["bundle"])

    def _renew(self, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
        """Ask for a new agent SVID for `key` over mTLS with the current one. A k8s_psat agent sends its service
        account token as it is now, to be attested again (ca.http.agents renew); a refusal is logged here,
        since it means the server no longer takes this node's agent (its node is gone, or the token is not this
        node's)."""
        document = {"csr": make_csr(key)}
        psat = self.renewal_token is not None and _is_psat_agent(self.trust_domain, self.client.certificate)
        if psat:
            assert self.renewal_token is not None
            document["token"] = self.renewal_token()  # InputError (one line) when the file cannot be read
        try:
            return self.client.call("/v1/agent/renew", document)
        except ServerRefusedError as exc:
            log.error("the keyseal server refused to renew the agent SVID%s: %s", " (re-attestation with the "
                      "service account token failed)" if psat else "", exc.message)
            raise

    def federated_for(self, entries: list[Entry]) -> dict[str, tuple[bytes, bytes]]:
        """The foreign bundles these entries federate with (those the server holds one for)."""
        wanted = {t for e in entries for t in e.federates_with}
        return {t: b for t, b in self.federated.items() if t in wanted}

    def _take_federated(self, documents: dict[str, Any]) -> bool:
        federated = {}
        for trust_domain, bundle in documents.items():
            certificates, jwks = _split_bundle(bundle)
            federated[str(trust_domain)] = (b"".join(certificates), jwks)
        if federated == self.federated:
            return False
        self.federated = federated
        log.info("federated bundles changed: %s", ", ".join(sorted(federated)) or "none")
        return True

    def _take_bundle(self, bundle: dict[str, Any]) -> bool:
        certificates, jwks = _split_bundle(bundle)
        bundle_der = b"".join(certificates)
        if (bundle_der, jwks) == (self.bundle_der, self.jwks):
            return False
        self.bundle_der, self.jwks = bundle_der, jwks
        pem = "".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM).decode()
                      for c in certificates)
        self.client.set_trust(pem)
        log.info("trust bundle changed (sequence %s)", bundle.get("spiffe_sequence"))
        return True

    def sync(self, *, renew_agent: bool = False) -> None:
        """One pass: renew the agent SVID if due (or asked), fetch entries and bundle, renew the X.509-SVIDs that
        are due."""
        now = _now()
        changed = False
        try:
            if self.agent_expires is not None and now >= self.agent_expires:
                raise ServerRefusedError(401, "the agent SVID expired while no server could renew it: the agent "
                                              "must join again")
            renewal_failure: KeysealError | None = None
            if renew_agent or (self._agent_issued and self.agent_expires
                               and _due(self._agent_issued, self.agent_expires, now)):
                key = ec.generate_private_key(ec.SECP256R1())
                try:
                    self._take_agent_svid(key, self._renew(key))
                except BackendUnavailableError as exc:
                    # The agent SVID held is still valid: a renewal the server could not answer (a k8s_psat
                    # agent's while the Kubernetes API is away) must not stop the workloads' renewals with it.
                    renewal_failure = exc
            changed |= self._take_sync(self._call_sync())
            for entry in self.entries:
                cached = self.x509.get(entry.entry_id)
                if cached is None or cached.entry != entry or _due(cached.issued, cached.expires, now):
                    self.x509[entry.entry_id] = self._fetch_x509(entry)
                    changed = True
            if renewal_failure is not None:
                raise renewal_failure  # reported, and retried no sooner than after a failed sync
            if not self.server_reachable:
                log.info("the keyseal server is reachable again")
            if self.needs_join:
                log.info("the keyseal server accepts the agent SVID again: no join needed")
            self.server_reachable = True
            self.needs_join = False
            self.last_sync = _now()
        except BackendUnavailableError as exc:
            if self.server_reachable:
                log.warning("%s: serving %d cached X.509-SVIDs until they expire", exc.message, len(self.x509))
            self.server_reachable = False
            self.sync_failures += 1
        except (ServerRefusedError, KeysealError, KeyError, ValueError) as exc:
            if isinstance(exc, ServerRefusedError) and exc.status == 401:
                if not self.needs_join:
                    log.error("sync with the keyseal server failed: %s", exc)
                self.needs_join = True
            else:
                log.error("sync with the keyseal server failed: %s", exc)
            self.server_reachable = False
            self.sync_failures += 1
        self._drop_jwt(lambda _, cached: cached.serve_until <= _now())
        for entry_id, cached in list(self.x509.items()):
            if cached.serve_until <= _now():
                log.warning("X.509-SVID %s expired and could not be renewed: no longer served",
                            cached.entry.spiffe_id)
                del self.x509[entry_id]
                changed = True
        if changed:
            self._changed()
        self.synced.set()

    def _take_sync(self, answer: dict[str, Any]) -> bool:
        """Take the parts a sync answered (see `_call_sync`), then its revision; whether anything changed."""
        changed = False
        if "bundle" in answer:  # the bundle part of the revision differs: the bundle and the federated ones
            changed |= self._take_bundle(answer["bundle"])
            changed |= self._take_federated(answer.get("federatedBundles") or {})
        entries = tuple(Entry.from_json(e) for e in answer["entries"]) if "entries" in answer else self.entries
        if entries != self.entries:
            removed = {e.entry_id for e in self.entries} - {e.entry_id for e in entries}
            for entry_id in removed:
                self.x509.pop(entry_id, None)
            self._drop_jwt(lambda key, _: key[0] in removed)
            self.entries = entries
            changed = True
        revision = answer.get("revision")  # taken once entries and bundle are: the next sync asks from here
        self.revision = revision if isinstance(revision, str) else None
        return changed

    def _call_sync(self) -> dict[str, Any]:
        """Ask for what changed since the revision held (everything at first); a server that does not know
        revisions (it refuses the field) is asked the old way from then on."""
        if self.revision is None or not self.incremental:
            answer = self.client.call("/v1/agent/sync", {})
        else:
            try:
                answer = self.client.call("/v1/agent/sync", {"revision": self.revision})
            except ServerRefusedError as exc:
                if exc.status != 400 or "revision" not in exc.message:
                    raise
                self.incremental = False
                answer = self.client.call("/v1/agent/sync", {})
        return answer

    def _fetch_x509(self, entry: Entry) -> CachedX509:
        key = ec.generate_private_key(ec.SECP256R1())
        answer = self.client.call("/v1/agent/x509-svid", {"entryID": entry.entry_id, "csr": make_csr(key)})
        chain = [x509.load_pem_x509_certificate(p.encode("ascii")) for p in answer["certChain"]]
        key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        chain_der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
        log.info("X.509-SVID %s renewed, valid until %s", entry.spiffe_id, answer["expiresAt"])
        return CachedX509(entry, key_der, chain_der, _now(), chain[0].not_valid_after_utc)

    def _drop_jwt(self, which: Callable[[JwtKey, CachedJwt], bool]) -> None:
        with self._jwt_lock:
            for key in [k for k, v in self.jwt.items() if which(k, v)]:
                del self.jwt[key]

    def _keep_jwt(self, key: JwtKey, cached: CachedJwt) -> None:
        with self._jwt_lock:
            self.jwt[key] = cached
            self.jwt.move_to_end(key)
            while len(self.jwt) > self.jwt_cache_size:
                self.jwt.popitem(last=False)

    def _cached_jwt(self, key: JwtKey) -> CachedJwt | None:
        with self._jwt_lock:
            cached = self.jwt.get(key)
            if cached is not None:
                self.jwt.move_to_end(key)
            return cached

    def jwt_svid(self, entry: Entry, audience: tuple[str, ...]) -> CachedJwt | None:
        """A JWT-SVID for the entry and audience: cached while less than 40% of its life has passed, fetched
        otherwise; a cached, unexpired one when the server is unreachable; None when there is none."""
        cache_key = (entry.entry_id, audience)
        now = _now()
        cached = self._cached_jwt(cache_key)
        if cached is not None and not _due(cached.issued, cached.expires, now):
            return cached
        try:
            answer = self.client.call("/v1/agent/jwt-svid", {"entryID": entry.entry_id, "audience": list(audience)})
        except BackendUnavailableError as exc:
            log.warning("%s: serving a cached JWT-SVID for %s if one is still valid", exc.message, entry.spiffe_id)
            return cached if cached is not None and _now() < cached.serve_until else None
        expires = datetime.strptime(answer["expiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        fresh = CachedJwt(answer["token"], now, expires)
        self._keep_jwt(cache_key, fresh)
        return fresh
