"""The HTTP API, version 1 (docs/server-api.md), independent of the socket layer: a request in, a response out.

Order of checks on an issuance request: the route, then who is asking (401), then the request itself
(400: body, SPIFFE ID, trust domain), then whether the client may have that SPIFFE ID (403), and only then the
CSR (400) and the signature. Refusals are logged with the peer address and client name, never a token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from keyseal._internal.audit.log import utc_second
from keyseal._internal.ca.bundle_sequence import BundlePublisher
from keyseal._internal.ca.config import Config
from keyseal._internal.ca.custody.manager import KeysetManager, NoActiveKeysetError
from keyseal._internal.ca.http.auth import Authenticator, Principal, valid_at
from keyseal._internal.ca.http.messages import Request, Response, _json, _Refused
from keyseal._internal.ca.http.metrics import Metrics
from keyseal._internal.ca.issuance.jwtsvid import check_audience, issue_jwt_svid
from keyseal._internal.ca.issuance.x509svid import parse_csr_key, sign_x509_svid
from keyseal._internal.metrics_text import CONTENT_TYPE as METRICS_CONTENT_TYPE
from keyseal._internal.spiffe.ids import RESERVED_PATH, SpiffeId, SpiffeIdError, is_reserved, parse_spiffe_id
from keyseal.errors import KeysealError, UsageError, loggable

if TYPE_CHECKING:
    from keyseal._internal.ca.federation import FederatedBundles

__all__ = ["MAX_BODY_BYTES", "Api", "Request", "Response"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


def _expires_at(moment: datetime) -> str:
    """`moment` as an answer spells it (UTC, whole seconds, Z), e.g. 2026-11-23T21:12:08Z."""
    return utc_second(int(moment.timestamp())) + "Z"


class Api:
    def __init__(self, config: Config, manager: KeysetManager, authenticator: Authenticator,
                 metrics: Metrics, bundles: BundlePublisher | None = None) -> None:
        self.config = config
        self.bundles = bundles or BundlePublisher(None, config.refresh_hint)
        self.federation: FederatedBundles | None = None
        self.manager = manager
        self.authenticator = authenticator
        self.metrics = metrics
        self.kube_api_client: Any = None  # a kubernetes ApiClient the server was given (tests), else from the pod
        self._routes: dict[str, tuple[str, Callable[[Request], Response]]] = {
            "/healthz": ("GET", self._health),
            "/readyz": ("GET", self._ready),
            "/metrics": ("GET", self._metrics),
            "/v1/bundle": ("GET", self._bundle),
            "/v1/x509-svid": ("POST", self._x509_svid),
            "/v1/jwt-svid": ("POST", self._jwt_svid),
        }
        self.closers: list[Callable[[], None]] = []  # run by close(): e.g. the entries' watch
        metrics.keyset_states = lambda: [(k.number, s) for k, s in self.manager.live()]
        metrics.bundle_sequence = lambda: self.bundle()[0]["spiffe_sequence"]

    def add_route(self, path: str, method: str, handler: Callable[[Request], Response]) -> None:
        """A route the server adds beside the API's own (e.g. /v1/federation)."""
        self._routes[path] = (method, handler)

    def close(self) -> None:
        for closer in self.closers:
            closer()

    def handle(self, request: Request) -> Response:
        route = self._routes.get(request.path.split("?", 1)[0])
        if route is None:
            return _json(404, {"error": "not_found", "message": f"no such endpoint {request.path[:100]!r}"})
        method, handler = route
        if request.method != method:
            response = _json(405, {"error": "method_not_allowed", "message": f"use {method}"})
            response.headers["Allow"] = method
            return response
        try:
            return handler(request)
        except _Refused as refused:
            self.metrics.error(refused.reason)
            response = _json(refused.status, {"error": refused.reason, "message": refused.message})
            if refused.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="keyseal"'
            return response
        except NoActiveKeysetError as exc:
            self.metrics.error("unavailable")
            return _json(503, {"error": "unavailable", "message": exc.message})
        except UsageError as exc:
            self.metrics.error("bad_request")
            return _json(400, {"error": "bad_request", "message": exc.message})
        except KeysealError as exc:  # the key manager failed (KMS down, permission withdrawn ...)
            self.metrics.error("unavailable")
            log.error("cannot sign for %s: %s", request.peer, exc.message)
            return _json(503, {"error": "unavailable", "message": "the CA key manager failed; see the server log"})
        except Exception:
            self.metrics.error("internal")
            log.exception("internal error answering %s %s", request.method, loggable(request.path))
            return _json(500, {"error": "internal", "message": "internal error; see the server log"})

    # -- public endpoints ---------------------------------------------------------------------------------

    def _health(self, request: Request) -> Response:
        return _json(200, {"status": "ok"})

    def _ready(self, request: Request) -> Response:
        now = self.manager.clock()
        if self.manager.stale(now):
            age = self.manager.view_age(now)
            return _json(503, {"status": "the keyset store has not been read for "
                                         f"{int(age.total_seconds()) if age else 0}s"})
        if self.manager.active_keyset(now) is None:
            return _json(503, {"status": "no active keyset"})
        return _json(200, {"status": "ready"})

    def _metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    def bundle(self) -> tuple[dict[str, Any], bytes]:
        """The trust bundle as published now (keyseal._internal.ca.bundle_sequence): its document and its JSON."""
        return self.bundles.served([k for k, _ in self.manager.live()])

    def _bundle(self, request: Request) -> Response:
        response = Response(200, self.bundle()[1])
        response.headers["Cache-Control"] = f"max-age={int(self.config.refresh_hint.total_seconds())}"
        return response

    # -- issuance -----------------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> Principal:
        principal = self.authenticator.authenticate(request.headers.get("authorization"), request.peer_certificate)
        if principal is None:
            what = "an unknown bearer token" if "authorization" in request.headers else (
                "an unknown client certificate" if request.peer_certificate else "no credentials")
            log.warning("refused %s %s from %s: not authenticated (%s)", request.method, loggable(request.path),
                        request.peer, what)
            raise _Refused(401, "unauthenticated",
                           "authenticate with a bearer token (Authorization: Bearer ...) or a client certificate")
        if principal.method == "mtls" and request.peer_certificate is not None \
                and not valid_at(request.peer_certificate, self.manager.clock()):
            log.warning("refused %s %s from %s: the client certificate of client %s is not valid now (expired or "
                        "not yet valid)", request.method, loggable(request.path), request.peer, principal.name)
            raise _Refused(401, "unauthenticated", "the client certificate is not valid now (expired, or not yet "
                                                   "valid): connect again with a current one")
        return principal

    def _body(self, request: Request, allowed: set[str]) -> dict[str, Any]:
        if len(request.body) > MAX_BODY_BYTES:
            raise UsageError(f"request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            document = json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: arrays nested 1000 deep
            raise UsageError("request body is not a JSON object") from exc
        if not isinstance(document, dict):
            raise UsageError("request body is not a JSON object")
        if not allowed.issuperset(document):
            unknown = sorted(set(document) - allowed)
            raise UsageError(f"unknown field {unknown[0][:40]!r}: the fields are {', '.join(sorted(allowed))}")
        return document

    def _spiffe_id(self, document: dict[str, Any]) -> SpiffeId:
        spiffe_id = parse_spiffe_id(document.get("spiffeID"))  # type: ignore[arg-type]
        if spiffe_id.trust_domain != self.config.trust_domain:
            raise SpiffeIdError(
                f"{spiffe_id} is not in trust domain {self.config.trust_domain}: this CA signs only "
                f"spiffe://{self.config.trust_domain}/..."
            )
        if not spiffe_id.path:
            raise SpiffeIdError(f"{spiffe_id} is the trust domain itself: an SVID needs a path")
        return spiffe_id

    def _authorize(self, principal: Principal, spiffe_id: SpiffeId, request: Request) -> None:
        if is_reserved(spiffe_id.path):
            log.warning("refused %s from %s: client %s asked for %s, a path reserved for the server and its "
                        "node agents", loggable(request.path), request.peer, principal.name, spiffe_id)
            raise _Refused(403, "forbidden", f"{spiffe_id} is reserved for the keyseal server and its node agents "
                                             f"({RESERVED_PATH}/...): no client may obtain it")
        if not principal.may_ask_for(spiffe_id.path):
            log.warning("refused %s from %s: client %s asked for %s, outside its allowed prefixes %s",
                        loggable(request.path), request.peer, principal.name, spiffe_id,
                        ", ".join(principal.prefixes))
            raise _Refused(403, "forbidden", f"client {principal.name} may not obtain an SVID for {spiffe_id}")

    def _ttl(self, document: dict[str, Any], limit: timedelta) -> timedelta:
        value = document.get("ttlSeconds")
        if value is None:
            return limit
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError("ttlSeconds must be a positive whole number of seconds")
        if value >= limit.total_seconds():  # also keeps a huge number away from timedelta's range
            return limit
        return timedelta(seconds=value)

    def _x509_svid(self, request: Request) -> Response:
        principal = self._authenticate(request)
        document = self._body(request, {"spiffeID", "csr", "ttlSeconds"})
        spiffe_id = self._spiffe_id(document)
        self._authorize(principal, spiffe_id, request)
        ttl = self._ttl(document, self.config.x509_ttl)
        leaf_key = parse_csr_key(document.get("csr"))  # type: ignore[arg-type]
        keyset = self.manager.active()
        leaf = sign_x509_svid(keyset, spiffe_id, leaf_key, self.manager.clock(), ttl)
        self.metrics.issued("x509")
        log.debug("issued X.509-SVID %s to client %s (keyset %d)", spiffe_id, principal.name, keyset.number)
        return _json(200, {
            "spiffeID": spiffe_id.uri,
            "certChain": [leaf.pem()],
            "expiresAt": _expires_at(leaf.not_after),
            "serialNumber": format(leaf.serial_number, "x"),
            "keyset": keyset.number,
        })

    def _jwt_svid(self, request: Request) -> Response:
        principal = self._authenticate(request)
        document = self._body(request, {"spiffeID", "audience", "ttlSeconds"})
        spiffe_id = self._spiffe_id(document)
        self._authorize(principal, spiffe_id, request)
        ttl = self._ttl(document, self.config.jwt_ttl)
        audience = check_audience(document.get("audience"))
        keyset = self.manager.active()
        token, expires = issue_jwt_svid(keyset, spiffe_id, audience, self.manager.clock(), ttl,
                                         self.config.jwt_issuer)
        self.metrics.issued("jwt")
        log.debug("issued JWT-SVID %s to client %s (keyset %d)", spiffe_id, principal.name, keyset.number)
        return _json(200, {"spiffeID": spiffe_id.uri, "token": token, "expiresAt": _expires_at(expires),
                           "keyset": keyset.number})
