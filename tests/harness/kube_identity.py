"""A Kubernetes cluster's identity parts for tests: the API peer (kube_api.py) with TokenReview, pods, nodes,
namespaces and keyseal's IdentityTemplate resource, and a kubelet peer serving /pods over TLS.

Everything here is EMULATED (test harness only); keyseal speaks the real APIs' contracts and is not changed to
suit it. What each part emulates, and how far:

- EMULATED service-account issuer: `Cluster.token(...)` signs a projected service account token as the
  kube-apiserver does (RS256 JWT, `iss`, `sub` system:serviceaccount:<ns>:<sa>, `aud`, `exp`/`iat`/`nbf`, `jti`,
  and the `kubernetes.io` claim binding it to a pod, and the pod's node, as kube-apiserver >= 1.30 does). The
  signature is real (PyJWT), so a token altered after signing fails.
- EMULATED TokenReview (authentication.k8s.io/v1, create): verifies the JWT's signature with the issuer's key,
  its expiry, and its audiences against `spec.audiences` (an empty list means the API server's own audience);
  `status.audiences` is the intersection, as the API server answers. Like the API server, a token bound to a
  pod is refused once that pod is gone or has another uid (`check_bound_pods`; a test may switch this off to
  show keyseal checks the pod itself too). `ignore_audiences` plays an API server that ignores
  spec.audiences (checks its own audience, answers no status.audiences). `status.user.extra` carries pod-name,
  pod-uid, node-name, node-uid and credential-id, as the API server fills them in.
- EMULATED list filtering: `labelSelector` (equality and set-based `in`, `!=`, `key`, `!key`) and
  `fieldSelector` (`path=value`, `path!=value`, e.g. spec.nodeName, status.phase) on lists; kmock ignores both.
- EMULATED `status` subresource: PATCH (merge patch) and PUT of `.../status` change only `status`, as for a
  custom resource with `subresources: {status: {}}`; kmock has no subresources.
- EMULATOR FIX: kmock 0.8 reads /api/v1/namespaces[/<name>] as "objects in namespace <name>" and fails on the
  bare list; `_parse_path` reads them as the Namespace resource, as the API server does.
- EMULATED kubelet (`KubeletPeer`): GET /pods on HTTPS with a serving certificate from a test CA; a request
  without a valid bearer token (checked as the kubelet's webhook authenticator would, with a TokenReview for
  the API server's audience) gets 401. It answers a v1 PodList of the pods whose spec.nodeName is its node.
  It does no SubjectAccessReview (nodes/pods, nodes/proxy): RBAC is checked on the chart's rendered rules.
"""

from __future__ import annotations

import copy
import json
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jwt
import kmock
from cryptography.hazmat.primitives.asymmetric import rsa
from kmock._internal import parsing as _kmock_parsing

from tests.harness.https_server import TlsFiles, make_tls
from tests.harness.kube_api import KubeApi, ResourceVersionedEmulator

ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
_EXTRA = "authentication.kubernetes.io/"


_original_parse_path = _kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    """EMULATOR FIX: /api/v1/namespaces and /api/v1/namespaces/<name> name Namespace objects."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _original_parse_path(path)


_kmock_parsing.parse_path = _parse_path


@attrs.define(kw_only=True)
class ClusterEmulator(ResourceVersionedEmulator):
    """EMULATOR ADDITION: TokenReview, label and field selectors on lists, and status subresources."""

    issuer_key: rsa.RSAPrivateKey = attrs.field(factory=lambda: rsa.generate_private_key(65537, 2048))
    check_bound_pods: bool = True
    ignore_audiences: bool = False  # EMULATED: an API server that ignores spec.audiences (answers none)
    reviews: list[dict[str, Any]] = attrs.field(factory=list)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if resource is not None and resource.plural == "tokenreviews" and request.method == kmock.method.POST:
            self.verbs.append(("create", str(resource.group or ""), "tokenreviews", ""))
            review = await self._review(request.data if isinstance(request.data, dict) else {})
            self.reviews.append(review)
            return aiohttp.web.json_response(review, status=201)
        if resource is not None and request.name and request.subresource == "status" \
                and request.method in (kmock.method.PATCH, kmock.method.PUT):
            self.verbs.append(("patch" if request.method == kmock.method.PATCH else "update",
                               str(resource.group or ""), f"{resource.plural}/status", str(request.name)))
            return await self._status(request)
        response = await super()._handle(request)
        if resource is not None and request.name is None and request.method == kmock.method.GET \
                and "watch" not in request.params and isinstance(response, aiohttp.web.Response) \
                and response.status == 200 and response.body:
            response = self._filtered(request, response)
        return response

    # -- TokenReview ----------------------------------------------------------------------------------------

    async def _review(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("spec") or {}
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        if self.ignore_audiences:
            wanted = [API_AUDIENCE]
        answer: dict[str, Any] = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                  "metadata": {"creationTimestamp": None}, "spec": spec}
        try:
            claims = jwt.decode(str(spec.get("token", "")), self.issuer_key.public_key(), algorithms=["RS256"],
                                issuer=ISSUER, options={"verify_aud": False, "require": ["exp", "iat", "sub"]})
        except jwt.ExpiredSignatureError:
            return {**answer, "status": {"authenticated": False, "error": "[invalid bearer token, Token has expired.]"}}
        except jwt.PyJWTError:
            return {**answer, "status": {"authenticated": False, "error": "invalid bearer token"}}
        token_audiences = claims.get("aud") or []
        if isinstance(token_audiences, str):
            token_audiences = [token_audiences]
        audiences = [a for a in wanted if a in token_audiences]
        if not audiences:
            return {**answer, "status": {"authenticated": False, "error": (
                f"[invalid bearer token, token audiences {json.dumps(token_audiences)} is invalid for the target "
                f"audiences {json.dumps(wanted)}]")}}
        bound = claims.get("kubernetes.io") or {}
        pod = bound.get("pod") or {}
        node = bound.get("node") or {}
        if pod and self.check_bound_pods:
            stored = await self._object(kmock.resource("", "v1", "pods"), bound.get("namespace"), pod.get("name"))
            if stored is None or (stored.get("metadata") or {}).get("uid") != pod.get("uid"):
                return {**answer, "status": {"authenticated": False, "error": (
                    f"[invalid bearer token, pods \"{pod.get('name')}\" not found or its uid changed: token has "
                    f"been invalidated]")}}
        extra: dict[str, list[str]] = {}
        if pod:
            extra[_EXTRA + "pod-name"] = [str(pod.get("name"))]
            extra[_EXTRA + "pod-uid"] = [str(pod.get("uid"))]
        if node:
            extra[_EXTRA + "node-name"] = [str(node.get("name"))]
            extra[_EXTRA + "node-uid"] = [str(node.get("uid"))]
        if claims.get("jti"):
            extra[_EXTRA + "credential-id"] = [f"JTI={claims['jti']}"]
        namespace = str(bound.get("namespace", ""))
        user = {"username": claims["sub"], "uid": str((bound.get("serviceaccount") or {}).get("uid", "")),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "extra": extra}
        if self.ignore_audiences:
            audiences = []
        return {**answer, "status": {"authenticated": True, "user": user, "audiences": audiences}}

    async def _object(self, resource: kmock.resource, namespace: Any, name: Any) -> dict[str, Any] | None:
        async with self._lock:
            key = (resource, namespace, name)
            if key not in self._objects or self._objects[key].deleted:
                return None
            return copy.deepcopy(dict(self._objects[key].raw))

    # -- status subresource ---------------------------------------------------------------------------------

    async def _status(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        key = (request.resource, request.namespace, request.name)
        data = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return aiohttp.web.json_response({"kind": "Status", "status": "Failure", "reason": "NotFound",
                                                  "code": 404}, status=404)
            new = copy.deepcopy(dict(self._objects[key].raw))
            if request.method == kmock.method.PUT:
                new["status"] = data.get("status")
            else:
                new["status"] = {**(new.get("status") or {}), **(data.get("status") or {})}
            new.setdefault("metadata", {})["resourceVersion"] = self._next_version()
            self._objects[key].create(new)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
        return aiohttp.web.json_response(new)

    # -- list selectors -------------------------------------------------------------------------------------

    def _filtered(self, request: kmock.Request, response: aiohttp.web.Response) -> aiohttp.web.Response:
        labels = request.params.get("labelSelector") or ""
        fields = request.params.get("fieldSelector") or ""
        if not labels and not fields:
            return response
        assert isinstance(response.body, bytes)
        document = json.loads(response.body)
        items = [i for i in document.get("items") or []
                 if matches_labels(labels, (i.get("metadata") or {}).get("labels") or {})
                 and _matches_fields(fields, i)]
        return aiohttp.web.json_response({**document, "items": items})


def matches_labels(selector: str, labels: dict[str, str]) -> bool:
    """EMULATED: the API server's label selector syntax (a, !a, a=b, a==b, a!=b, a in (b,c), a notin (b,c))."""
    terms: list[str] = []
    depth, current = 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current.strip())
    for term in terms:
        if " notin " in term or " in " in term:
            negate = " notin " in term
            key, values = term.split(" notin " if negate else " in ", 1)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            present = labels.get(key.strip()) in allowed
            if present == negate:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _matches_fields(selector: str, item: dict[str, Any]) -> bool:
    """EMULATED: field selectors `path=value`, `path==value` and `path!=value` (an absent field is "")."""
    for term in filter(None, selector.split(",")):
        negate = "!=" in term
        key, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        node = item
        for part in key.strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None  # type: ignore[assignment]
        if (str(node or "") == value.strip()) == negate:
            return False
    return True


class Cluster(KubeApi):
    """The API peer with the identity parts, and helpers to make nodes, pods and tokens the way a cluster does."""

    emulator = ClusterEmulator

    def add_resources(self, handler: ResourceVersionedEmulator) -> None:
        verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
        for key, kind, namespaced in (("v1/pods", "Pod", True), ("v1/nodes", "Node", False),
                                      ("v1/namespaces", "Namespace", False),
                                      ("keyseal.dev/v1/identitytemplates", "IdentityTemplate", False)):
            handler.resources[key] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced,
                                                        verbs=verbs)
        handler.resources["authentication.k8s.io/v1/tokenreviews"] = kmock.ResourceInfo(
            kind="TokenReview", singular="tokenreview", namespaced=False, verbs={"create"})

    @property
    def cluster(self) -> ClusterEmulator:
        handler = self._handler()
        assert isinstance(handler, ClusterEmulator)
        return handler

    def core(self) -> Any:
        import kubernetes

        return kubernetes.client.CoreV1Api(self.api_client())

    def node(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}
        created: dict[str, Any] = self.api_client().sanitize_for_serialization(self.core().create_node(body))
        return created

    def pod(self, namespace: str, name: str, node: str, service_account: str = "default",
            labels: dict[str, str] | None = None, containers: list[tuple[str, str, str]] | None = None
            ) -> dict[str, Any]:
        """A running pod on `node`; containers are (name, image, containerID as the kubelet reports it)."""
        containers = containers or [("main", "registry.example/app:1", f"containerd://{uuid.uuid4().hex * 2}")]
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": c, "image": i} for c, i, _ in containers]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": c, "image": i, "imageID": f"{i}@sha256:{'0' * 64}", "containerID": cid, "ready": True,
                 "restartCount": 0, "state": {"running": {}}} for c, i, cid in containers]},
        }
        created: dict[str, Any] = self.api_client().sanitize_for_serialization(
            self.core().create_namespaced_pod(namespace, body))
        return created

    def delete_pod(self, namespace: str, name: str) -> None:
        self.core().delete_namespaced_pod(name, namespace)

    def token(self, pod: dict[str, Any] | None, audience: str | list[str], *, namespace: str | None = None,
              service_account: str | None = None, node: dict[str, Any] | None = None, lifetime: int = 600,
              issued: float | None = None) -> str:
        """A projected service account token, signed as the cluster's issuer, bound to `pod` (and its node)."""
        now = int(issued if issued is not None else time.time())
        metadata = (pod or {}).get("metadata") or {}
        namespace = namespace or metadata.get("namespace", "default")
        service_account = service_account or ((pod or {}).get("spec") or {}).get("serviceAccountName", "default")
        bound: dict[str, Any] = {"namespace": namespace,
                                 "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())}}
        if pod is not None:
            bound["pod"] = {"name": metadata["name"], "uid": metadata["uid"]}
        if node is not None:
            bound["node"] = {"name": node["metadata"]["name"], "uid": node["metadata"]["uid"]}
        claims = {"aud": [audience] if isinstance(audience, str) else audience, "exp": now + lifetime, "iat": now,
                  "nbf": now, "iss": ISSUER, "jti": str(uuid.uuid4()), "kubernetes.io": bound,
                  "sub": f"system:serviceaccount:{namespace}:{service_account}"}
        return jwt.encode(claims, self.cluster.issuer_key, algorithm="RS256", headers={"kid": "test-issuer"})

    def pods_on(self, node: str) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            handler = self.cluster
            async with handler._lock:
                return [copy.deepcopy(dict(o.raw)) for (r, _, _), o in handler.objects.items()
                        if r.plural == "pods" and not o.deleted
                        and (o.raw.get("spec") or {}).get("nodeName") == node]

        return self.run(read())

    def review(self, token: str, audience: str) -> dict[str, Any]:
        async def review() -> dict[str, Any]:
            return await self.cluster._review({"spec": {"token": token, "audiences": [audience]}})

        return self.run(review())


class KubeletPeer:
    """EMULATED kubelet: GET /pods (a v1 PodList of its node's pods) over TLS, bearer tokens checked by a
    TokenReview for the API server's audience, as the kubelet's webhook authenticator does. `requests` counts
    the answered /pods calls (to show the agent's cache)."""

    def __init__(self, cluster: Cluster, node: str, directory: Path) -> None:
        self.cluster, self.node = cluster, node
        self.tls: TlsFiles = make_tls(directory, ["127.0.0.1"], ca_name="kubelet test CA")
        self.requests = 0
        self.refused = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> KubeletPeer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                header = self.headers.get("Authorization", "")
                token = header[7:] if header.startswith("Bearer ") else ""
                review = peer.cluster.review(token, API_AUDIENCE) if token else {"status": {}}
                if not (review.get("status") or {}).get("authenticated"):
                    peer.refused += 1
                    self._answer(401, b"Unauthorized")
                    return
                if self.path.split("?", 1)[0] != "/pods":
                    self._answer(404, b"404 page not found")
                    return
                peer.requests += 1
                body = {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                        "items": peer.cluster.pods_on(peer.node)}
                self._answer(200, json.dumps(body).encode(), "application/json")

            def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.tls.cert_pem), str(self.tls.key_pem))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
