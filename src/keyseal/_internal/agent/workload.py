"""The SPIFFE Workload API (`SpiffeWorkloadAPI` gRPC service) on a Unix socket, with workload attestation.

The public socket is served by a relay (relay.py) that attests each connection when it accepts it and forwards it
to the gRPC server's own socket, in a directory only the agent can enter. Calls in progress are bounded per uid
and in total (each holds a thread); the server pings clients with open calls, so such a connection is never idle,
and says goodbye to connections without calls after the idle timeout. The messages and the service are workload.proto as
`keyseal._internal.agent.proto` describes it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from keyseal._internal.agent.attestation import PeerCredentials, selectors_of
from keyseal._internal.agent.cache import AgentCache
from keyseal._internal.agent.config import WorkloadApiLimits
from keyseal._internal.agent.metrics import AgentMetrics
from keyseal._internal.agent.proto import WorkloadServicer, add_servicer, message
from keyseal._internal.agent.relay import Relay
from keyseal._internal.spiffe.entry import Entry

__all__ = ["WorkloadApiServer"]

log = logging.getLogger(__name__)

HEADER = ("workload.spiffe.io", "true")
Attestor = Callable[[PeerCredentials], frozenset[str]]  # more selectors of a caller (keyseal._internal.agent.k8s)
SPARE_THREADS = 16  # over maxCalls: to refuse calls over a limit quickly instead of queueing them
FIRST_SYNC_WAIT = 10.0
STREAM_POLL = 1.0


class _Calls:
    """Workload API calls in progress, per uid and in total. Each holds one of the gRPC server's threads for as
    long as it lasts (a stream: until the client ends it), so these limits keep one user from taking them all."""

    def __init__(self, total: int, per_uid: int) -> None:
        self.total, self.per_uid = total, per_uid
        self._lock = threading.Lock()
        self._by_uid: Counter[int] = Counter()
        self._open = 0

    def enter(self, uid: int) -> str | None:
        """None when the call may go on (then leave() must follow), else why not."""
        with self._lock:
            if self._by_uid[uid] >= self.per_uid:
                return "too_many_calls_for_uid"
            if self._open >= self.total:
                return "too_many_calls"
            self._by_uid[uid] += 1
            self._open += 1
            return None

    def leave(self, uid: int) -> None:
        with self._lock:
            self._open -= 1
            self._by_uid[uid] -= 1
            if self._by_uid[uid] <= 0:
                del self._by_uid[uid]


class _Service(WorkloadServicer):
    def __init__(self, cache: AgentCache, relay: Relay, stop: threading.Event, metrics: AgentMetrics,
                 limits: WorkloadApiLimits, attestor: Attestor | None = None) -> None:
        self.attestor = attestor
        self.cache = cache
        self.relay = relay
        self.stop = stop
        self.metrics = metrics
        self.calls = _Calls(limits.max_calls, limits.max_calls_per_uid)

    # -- common checks ------------------------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> None:
        self.metrics.request(method, code.name.lower())
        context.abort(code, message)

    def _check_header(self, context: grpc.ServicerContext, method: str) -> None:
        if HEADER not in tuple(context.invocation_metadata() or ()):
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    @contextlib.contextmanager
    def _call(self, context: grpc.ServicerContext, method: str) -> Iterator[PeerCredentials]:
        """The caller's credentials, for a call within the limits on calls in progress."""
        self._check_header(context, method)
        credentials = self.relay.credentials(context.peer())
        if credentials is None:
            self.metrics.attestation_failure("no_credentials")
            self._abort(context, method, grpc.StatusCode.PERMISSION_DENIED, "the caller could not be attested")
        assert credentials is not None
        refused = self.calls.enter(credentials.uid)
        if refused is not None:
            self.metrics.call_refused(refused)
            self._abort(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "too many Workload API calls in progress " +
                        ("for this user" if refused == "too_many_calls_for_uid" else "on this node"))
        try:
            yield credentials
        finally:
            self.calls.leave(credentials.uid)

    def _selectors(self, context: grpc.ServicerContext, method: str, credentials: PeerCredentials) -> frozenset[str]:
        if not self.cache.synced.wait(FIRST_SYNC_WAIT):
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE,
                        "the agent has not synced with the keyseal server yet")
        selectors = selectors_of(credentials, self.metrics.attestation_failure)
        if self.attestor is not None:  # k8s: selectors of the caller's pod (keyseal._internal.agent.k8s)
            selectors |= self.attestor(credentials)
        log.debug("attested pid %d: %s", credentials.pid, " ".join(sorted(selectors)))
        return selectors

    def _matching(self, selectors: frozenset[str]) -> list[Entry]:
        entries = self.cache.matching(selectors)
        if not entries:
            self.metrics.attestation_failure("no_matching_entry")
        return entries

    def _x509_response(self, selectors: frozenset[str]) -> tuple[Any, grpc.StatusCode | None, str]:
        entries = self._matching(selectors)
        if not entries:
            return None, grpc.StatusCode.PERMISSION_DENIED, "no identity issued"
        svids = []
        for entry in entries:
            cached = self.cache.usable_x509(entry.entry_id)
            if cached is not None:
                svids.append(message("X509SVID", spiffe_id=entry.spiffe_id, x509_svid=cached.chain_der,
                                                   x509_svid_key=cached.key_der, bundle=self.cache.bundle_der))
        if not svids:
            return None, grpc.StatusCode.UNAVAILABLE, (
                "no valid X.509-SVID: the keyseal server is unreachable and the cached SVIDs expired")
        federated = {f"spiffe://{t}": der for t, (der, _) in self.cache.federated_for(entries).items()}
        return message("X509SVIDResponse", svids=svids, federated_bundles=federated), None, ""

    def _stream(self, context: grpc.ServicerContext, method: str, build: Any) -> Iterator[Any]:
        """Send `build()` now and again whenever the cache changes it; end with its error when it has one."""
        last = None
        while context.is_active() and not self.stop.is_set():
            version = self.cache.version
            response, code, message = build()
            if code is not None:
                self._abort(context, method, code, message)
            if response != last:
                if last is None:
                    self.metrics.request(method, "ok")
                last = response
                yield response
            self.cache.wait_change(version, self._stream_wait())

    def _stream_wait(self) -> float:
        """Until the next change by time alone (an SVID renewed or running out), at most STREAM_POLL."""
        deadline = self.cache.next_deadline(renewals=False)
        if deadline is None:
            return STREAM_POLL
        return min(STREAM_POLL, max(0.01, (deadline - datetime.now(UTC)).total_seconds() + 0.001))

    # -- the X.509-SVID profile ---------------------------------------------------------------------------

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        method = "FetchX509SVID"
        with self._call(context, method) as credentials:
            selectors = self._selectors(context, method, credentials)
            yield from self._stream(context, method, lambda: self._x509_response(selectors))

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        method = "FetchX509Bundles"
        with self._call(context, method) as credentials:
            selectors = self._selectors(context, method, credentials)
            domain = self.cache.trust_domain
            yield from self._stream(context, method, lambda: (message("X509BundlesResponse", bundles={
                **{t: der for t, (der, _) in self.cache.federated_for(self.cache.matching(selectors)).items()},
                domain: self.cache.bundle_der}), None, ""))

    # -- the JWT-SVID profile -----------------------------------------------------------------------------

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = "FetchJWTSVID"
        with self._call(context, method) as credentials:
            return self._jwt_svid(request, context, method, self._selectors(context, method, credentials))

    def _jwt_svid(self, request: Any, context: grpc.ServicerContext, method: str, selectors: frozenset[str]) -> Any:
        audience = tuple(sorted(set(request.audience)))
        if not audience:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        entries = self._matching(selectors)
        if request.spiffe_id:
            entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
        if not entries:
            self._abort(context, method, grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        svids = []
        for entry in entries:
            cached = self.cache.jwt_svid(entry, audience)
            if cached is not None:
                svids.append(message("JWTSVID", spiffe_id=entry.spiffe_id, svid=cached.token))
        if not svids:
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE,
                        "no valid JWT-SVID: the keyseal server is unreachable and no cached one is valid")
        self.metrics.request(method, "ok")
        return message("JWTSVIDResponse", svids=svids)

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        method = "FetchJWTBundles"
        with self._call(context, method) as credentials:
            selectors = self._selectors(context, method, credentials)
            domain = self.cache.trust_domain
            yield from self._stream(context, method, lambda: (message("JWTBundlesResponse", bundles={
                **{t: jwks for t, (_, jwks) in self.cache.federated_for(self.cache.matching(selectors)).items()},
                domain: self.cache.jwks}), None, ""))

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = "ValidateJWTSVID"
        with self._call(context, method) as credentials:
            return self._validate(request, context, method, credentials)

    def _jwt_bundle_for(self, token: str, context: grpc.ServicerContext, method: str,
                        credentials: PeerCredentials) -> tuple[str, bytes] | None:
        """The trust domain a JWT-SVID names in `sub` (unverified: it only picks the keys) and its JWT keys: this
        trust domain's, or a federated one's that the caller's entries federate with; None if there are none."""
        own = self.cache.trust_domain
        try:
            payload = token.split(".")[1]
            subject = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("sub", "")
            domain = str(subject).split("/")[2] if str(subject).startswith("spiffe://") else own
        except (IndexError, ValueError, AttributeError):
            domain = own
        if domain == own:
            return own, self.cache.jwks
        federated = self.cache.federated_for(self.cache.matching(self._selectors(context, method, credentials)))
        return (domain, federated[domain][1]) if domain in federated else None

    def _validate(self, request: Any, context: grpc.ServicerContext, method: str,
                  credentials: PeerCredentials) -> Any:
        if not request.audience:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        from keyseal._internal.agent.pyspiffe import jwt_validation

        JwtBundle, JwtSvid, TrustDomain = jwt_validation()

        keys = self._jwt_bundle_for(request.svid, context, method, credentials)
        if keys is None:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                        "the JWT-SVID is not valid: no JWT bundle for its trust domain")
        assert keys is not None
        try:
            bundle = JwtBundle.parse(TrustDomain(keys[0]), keys[1])
            svid = JwtSvid.parse_and_validate(request.svid, bundle, {request.audience})
        except Exception as exc:  # the library raises several error types; all mean "not valid"
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, f"the JWT-SVID is not valid: {exc}")
        response = message("ValidateJWTSVIDResponse", spiffe_id=str(svid.spiffe_id))
        payload = request.svid.split(".")[1]  # verified above; the library keeps its claims private
        response.claims.update(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
        self.metrics.request(method, "ok")
        return response


class WorkloadApiServer:
    """The gRPC server on a private socket, and the relay on the public one."""

    def __init__(self, cache: AgentCache, socket_path: Path, mode: int, group: int | None,
                 metrics: AgentMetrics | None = None, limits: WorkloadApiLimits | None = None,
                 attestor: Attestor | None = None) -> None:
        limits = limits or WorkloadApiLimits()
        metrics = metrics or AgentMetrics()
        self._private = Path(tempfile.mkdtemp(prefix="keyseal-agent-"))  # mode 0700: only the agent connects
        internal = str(self._private / "grpc.sock")
        self.relay = Relay(socket_path, mode, group, internal, limits, metrics)
        metrics.open_connections = self.relay.open_connections
        self._stop = threading.Event()
        threads = limits.max_calls + SPARE_THREADS
        idle_ms = int(limits.idle_timeout * 1000)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="keyseal-workload"),
            maximum_concurrent_rpcs=threads,
            options=[
                ("grpc.max_connection_idle_ms", idle_ms),  # no call for this long: GOAWAY
                # Ping clients with calls open (they answer at once) so the relay sees them as not idle.
                ("grpc.keepalive_time_ms", max(100, idle_ms // 4)),
                ("grpc.keepalive_timeout_ms", max(1000, min(20000, idle_ms // 4))),
                ("grpc.http2.max_pings_without_data", 0),
            ])
        add_servicer(_Service(cache, self.relay, self._stop, metrics, limits, attestor), self.server)
        self.server.add_insecure_port(f"unix:{internal}")

    def start(self) -> None:
        self.server.start()
        self.relay.start()

    def stop(self) -> None:
        self._stop.set()
        self.relay.stop()
        self.server.stop(grace=1).wait(5)
        with contextlib.suppress(OSError):
            (self._private / "grpc.sock").unlink()
        with contextlib.suppress(OSError):
            self._private.rmdir()
