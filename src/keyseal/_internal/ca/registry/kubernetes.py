"""Registration entries and agent join tokens in the Kubernetes store: one custom resource each (group
keyseal.dev, v1; deploy/crds/), in the namespace of the WrappedKey records.

- `RegistrationEntry` `<recordPrefix>-entry-<entryID>`. `keyseal entry create` derives the ID from what the
  entry means (SHA-256 of SPIFFE ID, parent and selectors) and creates the object: the API server refuses a
  second create of the same name (409 AlreadyExists), so two writers can never both add the same entry, and
  different entries are different objects, so no write is ever lost. Entries written by hand (kubectl apply)
  may use any ID (lower-case letters, digits, '.', '-').
- `JoinToken` `<recordPrefix>-join-<SHA-256 of the token>`: the token itself is never stored. Redeeming is a
  get, then a delete with preconditions (uid and resourceVersion): the API server deletes an object once, so of
  two replicas redeeming the same token exactly one gets 200 and joins the agent; the other gets 404 or 409.
- The server lists entries once, then watches them (providers.kubernetes.watch) into an index by parent
  (ca.registry.index): a change by any writer reaches every replica as the API server streams it, and an
  agent's sync reads only its own entries. A resource that is not a valid entry of this trust domain is skipped
  with a warning, never served. Join tokens are read only at a join, by name (get): they are not watched.

- `JoinedAgent` `<recordPrefix>-agent-<32 hex of SHA-256 of the agent ID>`: when the newest SVID the server
  issued to an agent expires (written at join and renewal), so a join token for a running agent is refused.

RBAC: the server needs list, watch on registrationentries, get, delete on jointokens and get, create, update on
joinedagents; `keyseal entry` (an operator's kubeconfig) needs create, list, get, delete on entries and tokens, and
`join-token --replace` delete on joinedagents (it forgets the running agent: the token itself cannot say replace).
Create on jointokens mints agent identities: it is as sensitive as administering the CA.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from keyseal._internal.ca.registry.entries import (
    DEFAULT_JOIN_TOKEN_MAX_TTL,
    AgentRegistry,
    Entry,
    EntryStore,
    JoinTokens,
    Progress,
    StoredToken,
    is_served,
)
from keyseal._internal.ca.registry.index import EntryIndex
from keyseal._internal.providers.kubernetes.client import (
    GROUP,
    REQUEST_TIMEOUT,
    VERSION,
    api_client_from_environment,
    kubernetes_client,
    resolve_namespace,
)
from keyseal._internal.providers.kubernetes.errors import (
    api_failures,
    names_missing_object,
    status_of,
    translate_api_error,
)
from keyseal._internal.providers.kubernetes.watch import Informer
from keyseal.errors import KeysealError, UsageError

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

    from keyseal._internal.ca.config import Config

__all__ = ["KubeAgentRegistry", "KubeEntryStore", "KubeJoinTokens", "entry_id_for"]

log = logging.getLogger(__name__)

ENTRIES = "registrationentries"
ENTRY_KIND = "RegistrationEntry"
JOIN_TOKENS = "jointokens"
JOIN_KIND = "JoinToken"
MAX_WARNED = 1000  # distinct invalid objects remembered, so each is logged once
JOINED_AGENTS = "joinedagents"
JOINED_KIND = "JoinedAgent"
LIST_PAGE = 500
_ENTRY_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def entry_id_for(spiffe_id: str, parent_id: str, selectors: tuple[str, ...]) -> str:
    """The ID `keyseal entry create` gives an entry: the same meaning always gets the same ID."""
    return hashlib.sha256(json.dumps([spiffe_id, parent_id, list(selectors)]).encode()).hexdigest()[:16]


class _Resources:
    """Calls on one plural of keyseal.dev in one namespace, with the API's failures made typed errors."""

    def __init__(self, api: CustomObjectsApi, namespace: str, plural: str, server: str) -> None:
        self.api, self.namespace, self.plural, self.server = api, namespace, plural, server

    def where(self, name: str | None = None) -> str:
        return f"{self.plural}.{GROUP} {self.namespace}" + (f"/{name}" if name else "")

    def create(self, body: dict[str, Any]) -> bool:
        """False when an object of that name exists already."""
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural, body,
                                                     _request_timeout=REQUEST_TIMEOUT)
        except api_failures() as exc:
            if status_of(exc) == 409:
                return False
            raise self.translate(exc, "create", body["metadata"]["name"]) from exc
        return True

    def replace(self, body: dict[str, Any]) -> bool:
        """A replace conditional on body's metadata.resourceVersion; False when the object changed (409)."""
        name = body["metadata"]["name"]
        return self._conditional("update", name, lambda: self.api.replace_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, name, body, _request_timeout=REQUEST_TIMEOUT))

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, self.plural, name, _request_timeout=REQUEST_TIMEOUT)
        except api_failures() as exc:
            if status_of(exc) == 404 and names_missing_object(exc, name):
                return None
            raise self.translate(exc, "get", name) from exc  # a 404 without: the resource type is not served
        return obj

    def delete(self, name: str, preconditions: dict[str, str] | None = None) -> bool:
        """False when the object is gone already or (with preconditions) changed: someone else deleted it."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions} \
            if preconditions else None
        return self._conditional("delete", name, lambda: self.api.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, name, body=body, _request_timeout=REQUEST_TIMEOUT))

    def _conditional(self, verb: str, name: str, call: Callable[[], object]) -> bool:
        """Run a write whose precondition may fail: False when the object is gone (404) or changed (409)."""
        try:
            call()
        except api_failures() as exc:
            if status_of(exc) in (404, 409):
                return False
            raise self.translate(exc, verb, name) from exc
        return True

    def list(self) -> list[dict[str, Any]]:
        return self.list_with_version()[0]

    def list_with_version(self) -> tuple[builtins.list[dict[str, Any]], str]:
        """Every object, in pages, and the resourceVersion of the list (of its first page: later pages continue
        the same snapshot), to watch from."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        version = ""
        while True:
            options: dict[str, Any] = {"limit": LIST_PAGE}
            if token:
                options["_continue"] = token
            try:
                page = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, self.plural,
                                                              _request_timeout=REQUEST_TIMEOUT, **options)
            except api_failures() as exc:
                raise self.translate(exc, "list", None) from exc
            items.extend(i for i in page.get("items") or [] if isinstance(i, dict))
            metadata = page.get("metadata") or {}
            version = version or str(metadata.get("resourceVersion") or "")
            token = metadata.get("continue")
            if not token:
                return items, version

    def translate(self, exc: Exception, verb: str, name: str | None) -> KeysealError:
        crd = (f"the Kubernetes API does not serve {self.plural}.{GROUP} in namespace {self.namespace}: install the "
               f"CRD (deploy/crds/{self.plural}.{GROUP}.yaml) and check the namespace exists")
        return translate_api_error(exc, f"{verb} {self.where(name)}", server=self.server,
                                   grant=f"the {verb} verb on {self.plural}.{GROUP} in namespace {self.namespace}",
                                   statuses={404: UsageError(crd)})


def _resources(config: Config, api_client: Any, plural: str) -> _Resources:
    client = api_client if api_client is not None else api_client_from_environment(config.kube_api_server)
    namespace = resolve_namespace(config.kube_namespace, f"the {plural}.{GROUP} resources")
    server = str(getattr(client.configuration, "host", "") or "")
    return _Resources(kubernetes_client().CustomObjectsApi(client), namespace, plural, server)


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "keyseal"}}


class KubeEntryStore(EntryStore):
    """Entries as `RegistrationEntry` resources. With `watch` (the server), reads come from an index kept
    current by an informer (see providers.kubernetes.watch); without (the CLI), from the API each time."""

    def __init__(self, resources: _Resources, trust_domain: str, record_prefix: str, watch: bool = False) -> None:
        super().__init__(trust_domain)
        self.resources = resources
        self.prefix = record_prefix
        self.watch = watch
        self._name_re = re.compile(re.escape(record_prefix) + r"-entry-(" + _ENTRY_ID_RE.pattern + ")")
        self._lock = threading.Lock()
        self._index = EntryIndex()
        self.informer: Informer | None = None
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, config: Config, api_client: Any = None, watch: bool = False) -> KubeEntryStore:
        return cls(_resources(config, api_client, ENTRIES), config.trust_domain, config.record_prefix, watch)

    def _name(self, entry_id: str) -> str:
        return f"{self.prefix}-entry-{entry_id}"

    # -- the watched view -------------------------------------------------------------------------------------

    def _view(self) -> EntryIndex | None:
        """The watched index (started at the first read), or None when this store does not watch."""
        if not self.watch:
            return None
        with self._lock:
            if self.informer is None:
                informer = Informer(self.resources, self._apply, self._reset)
                informer.start()  # lists once: an unreachable API is the caller's error, as without watching
                self.informer = informer
        return self._index

    def close(self) -> None:
        """Stop watching (a server shutting down, or a test's replica)."""
        with self._lock:
            informer, self.informer = self.informer, None
        if informer is not None:
            informer.stop()

    def _reset(self, objects: list[dict[str, Any]]) -> None:
        self._index = EntryIndex(self._read_all(objects))

    def _apply(self, name: str, obj: dict[str, Any] | None) -> None:
        match = self._name_re.fullmatch(name)
        if match is None:
            return
        entry = self._read_all([obj])[0:1] if obj is not None else []
        if entry:
            self._index.put(entry[0])
        else:
            self._index.remove(match.group(1))  # deleted, or changed into something not served

    # -- reads ------------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        view = self._view()
        if view is not None:
            return view.all()
        return sorted(self._read_all(self.resources.list()), key=lambda e: e.entry_id)

    def get(self, entry_id: str) -> Entry | None:
        view = self._view()
        if view is not None:
            entry = view.get(entry_id)
        elif _ENTRY_ID_RE.fullmatch(entry_id):
            obj = self.resources.get(self._name(entry_id))
            entry = next(iter(self._read_all([obj])), None) if obj is not None else None
        else:
            entry = None
        return entry if entry is not None and is_served(entry) else None

    def for_agent(self, agent_id: str) -> list[Entry]:
        view = self._view()
        return (view if view is not None else EntryIndex(self.entries())).for_agent(agent_id)

    def _read_all(self, objects: list[dict[str, Any]]) -> list[Entry]:
        entries: list[Entry] = []
        for obj in objects:
            metadata = obj.get("metadata") or {}
            match = self._name_re.fullmatch(str(metadata.get("name", "")))
            if match is None:
                continue  # another trust domain's entry (another record prefix), or not keyseal's
            try:
                entries.append(self._parse(match.group(1), obj.get("spec")))
            except (KeysealError, KeyError, TypeError, ValueError) as exc:
                stamp = (str(metadata.get("name")), str(metadata.get("resourceVersion")))
                if stamp not in self._warned and len(self._warned) < MAX_WARNED:
                    self._warned.add(stamp)
                    log.warning("skipped %s: not a valid registration entry of %s (%s)",
                                self.resources.where(stamp[0]), self.trust_domain, str(exc)[:200])
        return entries

    def _parse(self, entry_id: str, spec: Any) -> Entry:
        if not isinstance(spec, dict):
            raise TypeError("no spec")
        selectors = spec["selectors"]
        x509_ttl, jwt_ttl = spec.get("x509SVIDTTL", 0), spec.get("jwtSVIDTTL", 0)
        if not isinstance(selectors, list) or not all(isinstance(t, int) for t in (x509_ttl, jwt_ttl)):
            raise TypeError("selectors must be a list, TTLs whole seconds")
        federates_with, dns_names = spec.get("federatesWith", []), spec.get("dnsNames", [])
        if not isinstance(federates_with, list) or not isinstance(dns_names, list):
            raise TypeError("federatesWith and dnsNames must be lists")
        entry = Entry(entry_id, str(spec["spiffeID"]), str(spec["parentID"]), tuple(selectors), x509_ttl, jwt_ttl,
                      tuple(str(t) for t in federates_with), tuple(str(n) for n in dns_names))
        return self.check(entry)

    # -- writes -----------------------------------------------------------------------------------------------

    def _body(self, entry: Entry) -> dict[str, Any]:
        spec: dict[str, Any] = {"spiffeID": entry.spiffe_id, "parentID": entry.parent_id,
                                "selectors": list(entry.selectors)}
        if entry.x509_ttl:
            spec["x509SVIDTTL"] = entry.x509_ttl
        if entry.jwt_ttl:
            spec["jwtSVIDTTL"] = entry.jwt_ttl
        if entry.federates_with:
            spec["federatesWith"] = list(entry.federates_with)
        if entry.dns_names:
            spec["dnsNames"] = list(entry.dns_names)
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": ENTRY_KIND,
                "metadata": _metadata(self._name(entry.entry_id), self.resources.namespace), "spec": spec}

    def _add(self, entry: Entry) -> Entry:
        """One entry, named by its meaning: the API server's 409 on a second create of that name is the
        duplicate check, O(1) and atomic; a watched view also catches a duplicate written under another name."""
        entry = replace(entry, entry_id=entry_id_for(entry.spiffe_id, entry.parent_id, entry.selectors))
        view = self._view()
        other = view.duplicate_of(entry) if view is not None else None
        if other is not None or not self.resources.create(self._body(entry)):
            raise UsageError(f"entry {other.entry_id if other else entry.entry_id} already gives "
                             f"{entry.spiffe_id} to these selectors")
        if view is not None:
            view.put(entry)  # this replica sees its own write at once; the watch event brings the same
        return entry

    def _add_many(self, entries: list[Entry], labels: list[str], progress: Progress | None = None) -> list[Entry]:
        """Checked against every stored entry (one list, or the watched view) before the first create. The API
        has no transaction: if another writer creates a clashing entry meanwhile, the entries before it stay
        written and the error says how many."""
        view = self._view()
        known = view if view is not None else EntryIndex(self.entries())
        for label, entry in zip(labels, entries, strict=True):
            other = known.duplicate_of(entry) or known.get(entry.entry_id)
            if other is not None:
                raise UsageError(f"{label}: entry {other.entry_id} already gives {other.spiffe_id} to "
                                 f"{'these selectors' if other.entry_id != entry.entry_id else 'its selectors'}")
        for number, (label, entry) in enumerate(zip(labels, entries, strict=True)):
            if not self.resources.create(self._body(entry)):
                raise UsageError(f"{label}: entry {entry.entry_id} was created by another writer meanwhile; "
                                 f"the {number} entries before it were written")
            if view is not None:
                view.put(entry)
            if progress is not None:
                progress(1)
        return entries

    def delete(self, entry_id: str) -> None:
        if not _ENTRY_ID_RE.fullmatch(entry_id) or not self.resources.delete(self._name(entry_id)):
            raise UsageError(f"no entry {entry_id[:40]!r}: see keyseal entry list")
        view = self._view()
        if view is not None:
            view.remove(entry_id)


class KubeJoinTokens(JoinTokens):
    """Join tokens as `JoinToken` resources named by the token's SHA-256. A token's age comes from the API
    server's `metadata.creationTimestamp`, which its creator cannot set."""

    def __init__(self, resources: _Resources, trust_domain: str, record_prefix: str,
                 max_ttl: timedelta = DEFAULT_JOIN_TOKEN_MAX_TTL, registry: AgentRegistry | None = None) -> None:
        super().__init__(trust_domain, max_ttl, registry)
        self.resources = resources
        self.prefix = record_prefix

    @classmethod
    def from_config(cls, config: Config, api_client: Any = None) -> KubeJoinTokens:
        return cls(_resources(config, api_client, JOIN_TOKENS), config.trust_domain, config.record_prefix,
                   config.join_token_max_ttl, KubeAgentRegistry.from_config(config, api_client))

    def _name(self, digest: str) -> str:
        return f"{self.prefix}-join-{digest}"

    def _add(self, digest: str, agent_id: str, expires: datetime, now: datetime) -> None:
        spec: dict[str, Any] = {"agentID": agent_id, "expiresAt": expires.astimezone(UTC).strftime(_TIME_FORMAT)}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": JOIN_KIND,
                "metadata": _metadata(self._name(digest), self.resources.namespace), "spec": spec}
        if not self.resources.create(body):
            raise KeysealError("a join token with this digest exists already: issue another one")
        self._purge_expired(datetime.now(UTC))

    def _peek(self, digest: str, now: datetime) -> str | None:
        obj = self.resources.get(self._name(digest))
        spec = (obj or {}).get("spec") or {}
        agent_id = spec.get("agentID") if isinstance(spec, dict) else None
        expires = _parse_time(spec.get("expiresAt") if isinstance(spec, dict) else None)
        if expires is None or expires <= now or not self.is_agent_id(agent_id):
            return None
        return str(agent_id)

    def _take(self, digest: str, now: datetime) -> StoredToken | None:
        obj = self.resources.get(self._name(digest))
        if obj is None:
            return None
        metadata = obj.get("metadata") or {}
        preconditions = {k: metadata[k] for k in ("uid", "resourceVersion") if isinstance(metadata.get(k), str)}
        if "resourceVersion" not in preconditions:
            raise KeysealError(f"{self.resources.where(self._name(digest))}: the API server gave no "
                               f"metadata.resourceVersion; refusing to redeem the token")
        if not self.resources.delete(self._name(digest), preconditions):
            return None  # another replica (or a concurrent request) redeemed it first
        spec = obj.get("spec") or {}
        agent_id = spec.get("agentID") if isinstance(spec, dict) else None
        expires = _parse_time(spec.get("expiresAt") if isinstance(spec, dict) else None)
        created = _parse_time(metadata.get("creationTimestamp"))
        if expires is None or created is None or not self.is_agent_id(agent_id):
            log.warning("refused %s: not a valid join token of %s", self.resources.where(self._name(digest)),
                        self.trust_domain)
            return None
        if expires <= now:
            return None
        return StoredToken(str(agent_id), expires, created)  # a spec.replace (older keyseal) is ignored

    def _purge_expired(self, now: datetime) -> None:
        """Remove expired tokens of this prefix: best effort (an operator may lack list or delete)."""
        pattern = re.compile(re.escape(self.prefix) + r"-join-[0-9a-f]{64}")
        try:
            for obj in self.resources.list():
                metadata = obj.get("metadata") or {}
                name = str(metadata.get("name", ""))
                expires = _parse_time((obj.get("spec") or {}).get("expiresAt"))
                if pattern.fullmatch(name) and expires is not None and expires <= now:
                    self.resources.delete(name, {"resourceVersion": str(metadata.get("resourceVersion"))})
        except KeysealError as exc:
            log.info("expired join tokens were not removed: %s", exc.message)


class KubeAgentRegistry(AgentRegistry):
    """Joined agents as `JoinedAgent` resources, `<recordPrefix>-agent-<32 hex of SHA-256(agent ID)>`; written with
    conditional creates and replaces (on a conflict: read again and decide again)."""

    def __init__(self, resources: _Resources, record_prefix: str) -> None:
        self.resources = resources
        self.prefix = record_prefix

    @classmethod
    def from_config(cls, config: Config, api_client: Any = None) -> KubeAgentRegistry:
        return cls(_resources(config, api_client, JOINED_AGENTS), config.record_prefix)

    def _name(self, agent_id: str) -> str:
        return f"{self.prefix}-agent-{hashlib.sha256(agent_id.encode()).hexdigest()[:32]}"

    def _read(self, agent_id: str) -> tuple[dict[str, Any] | None, datetime | None]:
        obj = self.resources.get(self._name(agent_id))
        spec = (obj or {}).get("spec") or {}
        if obj is None or not isinstance(spec, dict) or spec.get("agentID") != agent_id:
            return obj, None
        return obj, _parse_time(spec.get("svidExpiresAt"))

    def svid_expiry(self, agent_id: str) -> datetime | None:
        return self._read(agent_id)[1]

    def forget(self, agent_id: str) -> bool:
        return self.resources.delete(self._name(agent_id))

    def check(self) -> None:
        """A get of a name no agent has: 404 NotFound if the JoinedAgent CRD is served, else a one-line error
        naming the CRD to apply (`helm upgrade` does not install CRDs a chart gained)."""
        self.resources.get(f"{self.prefix}-agent-served-check")

    def issued(self, agent_id: str, expires: datetime) -> None:
        for _ in range(5):
            obj, known = self._read(agent_id)
            if known is not None and known >= expires:
                return
            metadata = _metadata(self._name(agent_id), self.resources.namespace)
            if obj is not None:
                metadata["resourceVersion"] = str((obj.get("metadata") or {}).get("resourceVersion"))
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": JOINED_KIND, "metadata": metadata,
                    "spec": {"agentID": agent_id, "svidExpiresAt": expires.astimezone(UTC).strftime(_TIME_FORMAT)}}
            if self.resources.create(body) if obj is None else self.resources.replace(body):
                return
        raise KeysealError(f"{self.resources.where(self._name(agent_id))} kept changing: the agent's SVID expiry "
                           f"was not recorded")


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
