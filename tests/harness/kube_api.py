"""A Kubernetes API peer for tests: kmock's emulator on 127.0.0.1, reached by the official kubernetes client.

EMULATOR ADDITION (test harness only): kmock 0.8 keeps objects and serves GET/POST/PATCH/DELETE, but has no
`metadata.resourceVersion` and no PUT. `ResourceVersionedEmulator` adds both as the real API server behaves:
- every create / replace / patch sets a new `metadata.resourceVersion` (a counter shared by all objects);
- PUT replaces the object whole; a PUT or PATCH whose `metadata.resourceVersion` is not the stored one is
  refused with 409 Conflict and changes nothing (a PUT without one is unconditional, as in Kubernetes);
- a create answers 201 Created, as the API server does (the official client reads the body only then);
- a DELETE whose body carries `preconditions` (uid / resourceVersion) that the stored object does not meet is
  refused with 409 Conflict and deletes nothing, as the API server does (kmock ignores them).
- a missing object of a served resource is answered as the API server does (a Status, reason NotFound, whose
  details name the object), and a resource named in `unserved` (a CRD that was never applied) with the API
  server's plain `404 page not found`; a resource named in `failing` is answered 503 ServiceUnavailable (an
  API server that is overloaded or cannot reach etcd).
- WATCH (added for the informer, #19): a list answers `metadata.resourceVersion` (kmock answers "..."); a delete
  takes a new resourceVersion for its DELETED event; every event is kept in a log, and a watch with
  `resourceVersion=N` streams the events after N from it, then live ones; with `allowWatchBookmarks=true` it
  sends a BOOKMARK (only `metadata.resourceVersion`) every `bookmark_seconds` while idle; `timeoutSeconds` ends
  it. `compact()` forgets the log, as etcd compaction does, and ends every open watch: a watch from a version
  before that point gets the API server's answer, an ERROR event with a Status of code 410 ("too old resource
  version", reason Expired). `end_watches()` ends open watches without compacting (a dropped connection).
  One approximation: a list reads the version before the objects, so a write racing it may be both listed and
  streamed after it (delivered twice, never missed); the real API gives the exact version of the snapshot.
keyseal's Kubernetes store is not changed to suit the emulator; it only speaks the real API's contract.

EMULATED PARTITION (test harness only): `KubeApi.api_client(client_id)` names its requests with the header
CLIENT_HEADER, and `KubeApi.cut(client_id)` makes the emulator reset the TCP connection of every request that
client sends (until `restore`), as a replica cut off from the API server sees it: connections reset, nothing
answered, nothing changed. Other clients are served as before.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp.web
import attrs
import kmock
from kmock._internal.k8s import KubernetesEmulator, KubernetesError, KubernetesObjectNotFoundError

T = TypeVar("T")

CLIENT_HEADER = "X-Keyseal-Test-Client"

CONFLICT_MESSAGE = (
    "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest "
    "version and try again"
)


@attrs.define(kw_only=True)
class ResourceVersionedEmulator(KubernetesEmulator):
    """EMULATOR ADDITION: resourceVersion on every write, PUT, and 409 on a stale resourceVersion."""

    counter: int = 0
    conflicts: list[tuple[str, str]] = attrs.field(factory=list)
    replaces: int = 0
    verbs: list[tuple[str, str, str, str]] = attrs.field(factory=list)
    cut_clients: set[str] = attrs.field(factory=set)
    dropped: int = 0
    unserved: set[str] = attrs.field(factory=set)  # plurals answered as a CRD that is not installed
    failing: set[str] = attrs.field(factory=set)  # plurals answered 503, as by an API server in trouble
    # WATCH (EMULATOR ADDITION, #19): the event log and what compaction forgot.
    bookmark_seconds: float = 0.5
    compacted: int = 0
    watch_generation: int = 0
    watches_served: int = 0
    _event_versions: list[int] = attrs.field(factory=list)
    _events: list[tuple[Any, dict[str, Any]]] = attrs.field(factory=list)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = _Recorders(self)  # every event the base emulator emits is logged with its version

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        client = request.headers.get(CLIENT_HEADER)
        if client is not None and client in self.cut_clients:  # EMULATED PARTITION: reset, answer nothing
            self.dropped += 1
            raw = request._raw_request
            if raw is not None and raw.transport is not None:
                raw.transport.abort()
            raise ConnectionResetError(f"emulated partition of client {client}")
        if request.resource is not None and str(request.resource.plural) in self.unserved:
            return aiohttp.web.Response(status=404, text="404 page not found")
        if request.resource is not None and str(request.resource.plural) in self.failing:
            raise KubernetesError(status=503, reason="ServiceUnavailable", message="the server is currently unable "
                                  "to handle the request", details={"kind": str(request.resource.plural)})
        try:
            return await self._handle_versioned(request)
        except KubernetesObjectNotFoundError:
            resource = request.resource
            plural, group = (str(resource.plural), str(resource.group or "")) if resource is not None else ("", "")
            raise KubernetesError(status=404, reason="NotFound",
                                  message=f'{plural}.{group} "{request.name}" not found',
                                  details={"name": request.name, "group": group, "kind": plural}) from None

    def _next_version(self) -> str:
        self.counter += 1
        return str(self.counter)

    async def _record(self, resource: Any, event: dict[str, Any]) -> None:
        """EMULATOR ADDITION: log an event; a deletion takes a new resourceVersion, as in the API server."""
        event = {"type": event["type"], "object": copy.deepcopy(event["object"])}
        meta = event["object"].setdefault("metadata", {})
        if event["type"] == "DELETED":
            meta["resourceVersion"] = self._next_version()
        self._event_versions.append(int(meta.get("resourceVersion") or self.counter))
        self._events.append((resource, event))
        async with self._changed:
            self._changed.notify_all()

    async def compact(self) -> None:
        """EMULATOR ADDITION: forget the log (etcd compaction) and end open watches."""
        async with self._lock:
            self.compacted = self.counter
            self._events.clear()
            self._event_versions.clear()
        await self.end_watches()

    async def end_watches(self) -> None:
        self.watch_generation += 1
        async with self._changed:
            self._changed.notify_all()

    async def _serve_list(self, request: kmock.Request) -> Any:
        version = str(self.counter)  # read before the objects: see the approximation in the module docstring
        answer = await super()._serve_list(request)
        answer["metadata"] = {**answer.get("metadata", {}), "resourceVersion": version}
        return answer

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """EMULATOR ADDITION: a watch from a resourceVersion, with bookmarks, timeoutSeconds and 410 Gone."""
        yield b""  # headers first, as kmock's own watch does
        self.watches_served += 1
        loop = asyncio.get_running_loop()
        params = request.params
        since = str(params.get("resourceVersion") or "")
        deadline = loop.time() + float(params.get("timeoutSeconds") or 1800)
        bookmarks = _true(params.get("allowWatchBookmarks"))
        generation = self.watch_generation
        if since in ("", "0"):  # no version: the current objects as ADDED, then changes
            async with self._lock:
                position = self.counter
                current = [copy.deepcopy(o.raw) for k, o in self._objects.items()
                           if k[0] == request.resource and not o.deleted and self._mine(request, o.raw)]
            for raw in current:
                yield {"type": "ADDED", "object": raw}
        else:
            position = int(since) if since.isdigit() else -1
            if position < self.compacted:
                yield {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired",
                    "code": 410, "message": f"too old resource version: {since} ({self.compacted})"}}
                return
        while True:
            start = bisect.bisect_right(self._event_versions, position)
            for version, (resource, event) in zip(self._event_versions[start:], self._events[start:], strict=True):
                position = version
                if resource == request.resource and self._mine(request, event["object"]):
                    yield event
            if self.watch_generation != generation or loop.time() >= deadline:
                return
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(),
                                           min(self.bookmark_seconds, max(deadline - loop.time(), 0.01)))
                    continue
                except TimeoutError:
                    pass
            if bookmarks and position >= self.compacted and not self._has_after(position):
                position = max(position, self.counter)
                kind = request.resource.kind if hasattr(request.resource, "kind") else None
                yield {"type": "BOOKMARK", "object": {"apiVersion": f"{request.resource.group}/v1",
                                                      "kind": kind or "Object",
                                                      "metadata": {"resourceVersion": str(position)}}}

    def _has_after(self, position: int) -> bool:
        return bool(self._event_versions) and self._event_versions[-1] > position

    @staticmethod
    def _mine(request: kmock.Request, raw: dict[str, Any]) -> bool:
        return not request.namespace or (raw.get("metadata") or {}).get("namespace") == request.namespace

    async def _handle_versioned(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.action == kmock.action.LIST and _true(request.params.get("watch")):
            # EMULATOR FIX (#19): the API server reads boolean query parameters as Go's strconv.ParseBool does,
            # so `watch=True` (what the official Python client sends) is a watch; kmock knows only "true".
            object.__setattr__(request, "action", kmock.action.WATCH)  # kmock tracks this very request object
        named = request.resource is not None and request.name is not None and not request.subresource
        if request.resource is not None:
            verb = "watch" if _true(request.params.get("watch")) else _rbac_verb(request.method, named)
            self.verbs.append((verb, str(request.resource.group or ""),
                               str(request.resource.plural), str(request.name or "")))
        if named and request.method == kmock.method.PUT:
            return await self._replace(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = self._next_version()
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if request.namespace:
                meta["namespace"] = request.namespace
            response = await super()._handle(request)
            if response.status == 200 and not response.prepared:
                response.set_status(201)  # as the API server answers a create (the client expects 201)
            return response
        elif named and request.action == kmock.action.DELETE and isinstance(request.data, dict) \
                and request.data.get("preconditions"):
            return await self._delete_with_preconditions(request)
        elif named and request.action == kmock.action.UPDATE and isinstance(request.data, dict):
            async with self._lock:
                current = self._current(request)
                if current is not None:
                    self._check_version(request, current)
                request.data.setdefault("metadata", {})["resourceVersion"] = self._next_version()
        return await super()._handle(request)

    @staticmethod
    def _key(request: kmock.Request) -> tuple[kmock.resource, str | None, str]:
        assert request.resource is not None and request.name is not None
        return request.resource, request.namespace, request.name

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        key = self._key(request)
        if key not in self._objects or self._objects[key].deleted:
            return None
        raw: dict[str, Any] = self._objects[key].raw
        return raw

    def _check_version(self, request: kmock.Request, current: dict[str, Any]) -> None:
        sent = (request.data.get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != current["metadata"].get("resourceVersion"):
            self.conflicts.append((str(request.namespace), str(request.name)))
            raise KubernetesError(status=409, reason="Conflict", message=CONFLICT_MESSAGE,
                                  details={"name": request.name, "kind": self._key(request)[0].plural})

    def _check_preconditions(self, request: kmock.Request, current: dict[str, Any]) -> None:
        wanted = request.data.get("preconditions") or {}
        meta = current["metadata"]
        for field in ("uid", "resourceVersion"):
            if wanted.get(field) is not None and wanted[field] != meta.get(field):
                self.conflicts.append((str(request.namespace), str(request.name)))
                raise KubernetesError(
                    status=409, reason="Conflict",
                    message=f"Precondition failed: {field} in precondition: {wanted[field]}, {field} in object "
                            f"meta: {meta.get(field)}",
                    details={"name": request.name, "kind": self._key(request)[0].plural})

    async def _delete_with_preconditions(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Check and delete under one lock, so a concurrent delete or replace cannot slip in between."""
        async with self._lock:
            current = self._current(request)
            if current is None:
                raise KubernetesObjectNotFoundError()
            self._check_preconditions(request, current)
            gone = copy.deepcopy(current)
            self._objects[self._key(request)].delete()
            await self._buses[self._key(request)[0]].put({"type": "DELETED", "object": gone})
        return aiohttp.web.json_response(gone)

    async def _replace(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if not isinstance(request.data, dict):
            raise KubernetesError(status=400, reason="BadRequest", message="PUT needs a JSON object")
        async with self._lock:
            current = self._current(request)
            if current is None:
                raise KubernetesObjectNotFoundError()
            self._check_version(request, current)
            new = copy.deepcopy(request.data)
            meta = new.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "namespace", "name"):
                if kept in current["metadata"]:
                    meta[kept] = current["metadata"][kept]
            meta["resourceVersion"] = self._next_version()
            self._objects[self._key(request)].create(new)
            self.replaces += 1
            await self._buses[self._key(request)[0]].put({"type": "MODIFIED", "object": new})
        return aiohttp.web.json_response(new)


def _true(value: str | None) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


class _Recorders(dict[Any, "_Recorder"]):
    """EMULATOR ADDITION: stands in for kmock's per-resource event buses; every put is logged for watches."""

    def __init__(self, emulator: ResourceVersionedEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def __missing__(self, resource: Any) -> _Recorder:
        recorder = self[resource] = _Recorder(self.emulator, resource)
        return recorder


@attrs.define
class _Recorder:
    emulator: ResourceVersionedEmulator
    resource: Any

    async def put(self, event: dict[str, Any]) -> None:
        await self.emulator._record(self.resource, event)


def _rbac_verb(method: kmock.method | None, named: bool) -> str:
    """The RBAC verb the API server would authorize this request under."""
    verbs = {kmock.method.GET: "get" if named else "list", kmock.method.POST: "create",
             kmock.method.PUT: "update", kmock.method.PATCH: "patch",
             kmock.method.DELETE: "delete" if named else "deletecollection"}
    return verbs.get(method, str(method)) if method is not None else "?"


class KubeApi:
    """The emulator served on an ephemeral 127.0.0.1 port by its own event loop in a daemon thread."""

    emulator: type[ResourceVersionedEmulator] = ResourceVersionedEmulator

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)
        self.handler: ResourceVersionedEmulator | None = None
        self.url = ""

    def start(self) -> KubeApi:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the Kubernetes API emulator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emulator() as handler, kmock.Server(handler) as server:
            for plural, kind in (("wrappedkeys", "WrappedKey"), ("registrationentries", "RegistrationEntry"),
                                 ("jointokens", "JoinToken"), ("joinedagents", "JoinedAgent")):
                handler.resources[f"keyseal.dev/v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, singular=kind.lower(), namespaced=True,
                    verbs={"get", "list", "create", "update", "patch", "delete"},
                )
            handler.resources["v1/configmaps"] = kmock.ResourceInfo(
                kind="ConfigMap", singular="configmap", namespaced=True,
                verbs={"get", "list", "create", "update", "patch", "delete"},
            )
            self.add_resources(handler)
            self.handler = handler
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def add_resources(self, handler: ResourceVersionedEmulator) -> None:
        """More resources a subclass serves (tests/harness/kube_identity.py)."""

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the emulator's loop (reads of its state must not race its writes)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def history(self, namespace: str, name: str, plural: str = "wrappedkeys",
                group: str = "keyseal.dev") -> list[dict[str, Any]]:
        """Every stored version of an object, oldest first (deletions left out)."""

        async def read() -> list[dict[str, Any]]:
            handler = self._handler()
            async with handler._lock:
                key = (kmock.resource(group, "v1", plural), namespace, name)
                if key not in handler.objects:
                    return []
                return [copy.deepcopy(dict(v.raw)) for v in handler.objects[key].history if v is not None]

        return self.run(read())

    def compact(self) -> None:
        """EMULATOR ADDITION: etcd compaction; a watch from an older resourceVersion then gets 410 Gone."""
        self.run(self._handler().compact())

    def end_watches(self) -> None:
        """EMULATOR ADDITION: end every open watch, as a dropped connection or an API server restart does."""
        self.run(self._handler().end_watches())

    def conflicts(self, namespace: str) -> list[tuple[str, str]]:
        """The (namespace, name) of every write refused with 409 in `namespace`, oldest first. The peer is shared
        by a worker's tests, whose servers may still write in their own namespaces: count only your own."""
        return [c for c in self._handler().conflicts if c[0] == namespace]

    def verbs(self) -> list[tuple[str, str, str, str]]:
        """(RBAC verb, API group, resource plural, object name or "") of every request so far, in order."""
        return list(self._handler().verbs)

    def _handler(self) -> ResourceVersionedEmulator:
        assert self.handler is not None
        return self.handler

    def api_client(self, client_id: str | None = None) -> Any:
        """An official `kubernetes` ApiClient pointed at this emulator (no credentials); with `client_id`, its
        requests carry that name, so `cut(client_id)` can cut this client (and only it) off."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        if client_id is None:
            return kubernetes.client.ApiClient(configuration)
        return kubernetes.client.ApiClient(configuration, header_name=CLIENT_HEADER, header_value=client_id)

    def cut(self, client_id: str) -> None:
        """EMULATED PARTITION: reset every connection of this client from now on."""
        self._handler().cut_clients.add(client_id)

    def restore(self, client_id: str) -> None:
        self._handler().cut_clients.discard(client_id)
