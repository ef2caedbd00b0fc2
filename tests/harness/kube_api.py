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
keyseal's Kubernetes store is not changed to suit the emulator; it only speaks the real API's contract.

EMULATED PARTITION (test harness only): `KubeApi.api_client(client_id)` names its requests with the header
CLIENT_HEADER, and `KubeApi.cut(client_id)` makes the emulator reset the TCP connection of every request that
client sends (until `restore`), as a replica cut off from the API server sees it: connections reset, nothing
answered, nothing changed. Other clients are served as before.
"""

from __future__ import annotations

import asyncio
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

    async def _handle_versioned(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        named = request.resource is not None and request.name is not None and not request.subresource
        if request.resource is not None:
            self.verbs.append((_rbac_verb(request.method, named), str(request.resource.group or ""),
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
