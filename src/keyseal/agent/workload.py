"""The SPIFFE Workload API (`SpiffeWorkloadAPI` gRPC service) on a Unix socket, with workload attestation.

gRPC for Python does not expose the peer credentials of a Unix-socket caller, so the public socket is served by
a small relay: for each accepted connection it reads SO_PEERCRED, then relays the bytes to the gRPC server's own
socket (in a directory only the agent can enter) from a socket bound to a fresh random abstract name. The gRPC
handler sees that name as its peer and looks up the credentials recorded for it. The messages and stubs are the
generated ones the PyPI `spiffe` package ships (spiffe._proto), so both ends use the same workload.proto.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from keyseal.agent.attestation import PeerCredentials, peer_credentials, selectors_of
from keyseal.agent.cache import AgentCache
from keyseal.agent.metrics import AgentMetrics
from keyseal.agent.proto import workload_pb2, workload_pb2_grpc
from keyseal.ca.entries import Entry

__all__ = ["WorkloadApiServer"]

log = logging.getLogger(__name__)

HEADER = ("workload.spiffe.io", "true")
MAX_STREAMS = 256
FIRST_SYNC_WAIT = 10.0
STREAM_POLL = 1.0


class _Relay:
    """Public Unix socket -> internal gRPC socket, remembering each connection's peer credentials."""

    def __init__(self, path: Path, mode: int, group: int | None, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self.peers: dict[str, PeerCredentials] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no moment where the socket is more open than asked
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        self.listener.listen(128)
        self.thread = threading.Thread(target=self._accept_loop, name="keyseal-agent-relay", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def credentials(self, peer: str) -> PeerCredentials | None:
        with self._lock:
            return self.peers.get(peer)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            try:
                credentials = peer_credentials(client)
                name = f"keyseal-agent-{secrets.token_hex(16)}"
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.bind("\0" + name)
                with self._lock:
                    self.peers[f"unix-abstract:{name}"] = credentials
                upstream.connect(self.upstream)
            except OSError as exc:
                log.warning("cannot relay a workload connection: %s", exc)
                client.close()
                continue
            state = {"open": 2}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target, client, upstream, name, state),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, client: socket.socket,
              upstream: socket.socket, name: str, state: dict[str, int]) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        with self._lock:
            state["open"] -= 1
            last = state["open"] == 0
            if last:
                self.peers.pop(f"unix-abstract:{name}", None)
        if last:
            client.close()
            upstream.close()


class _Service(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, cache: AgentCache, relay: _Relay, stop: threading.Event, metrics: AgentMetrics) -> None:
        self.cache = cache
        self.relay = relay
        self.stop = stop
        self.metrics = metrics

    # -- common checks ------------------------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> None:
        self.metrics.request(method, code.name.lower())
        context.abort(code, message)

    def _check_header(self, context: grpc.ServicerContext, method: str) -> None:
        if HEADER not in tuple(context.invocation_metadata() or ()):
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def _selectors(self, context: grpc.ServicerContext, method: str) -> frozenset[str]:
        self._check_header(context, method)
        credentials = self.relay.credentials(context.peer())
        if credentials is None:
            self.metrics.attestation_failure("no_credentials")
            self._abort(context, method, grpc.StatusCode.PERMISSION_DENIED, "the caller could not be attested")
        assert credentials is not None
        if not self.cache.synced.wait(FIRST_SYNC_WAIT):
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE,
                        "the agent has not synced with the keyseal server yet")
        selectors = selectors_of(credentials, lambda: self.metrics.attestation_failure("pid_replaced"))
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
            cached = self.cache.x509.get(entry.entry_id)
            if cached is not None:
                svids.append(workload_pb2.X509SVID(spiffe_id=entry.spiffe_id, x509_svid=cached.chain_der,
                                                   x509_svid_key=cached.key_der, bundle=self.cache.bundle_der))
        if not svids:
            return None, grpc.StatusCode.UNAVAILABLE, (
                "no valid X.509-SVID: the keyseal server is unreachable and the cached SVIDs expired")
        federated = {f"spiffe://{t}": der for t, (der, _) in self.cache.federated_for(entries).items()}
        return workload_pb2.X509SVIDResponse(svids=svids, federated_bundles=federated), None, ""

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
            self.cache.wait_change(version, STREAM_POLL)

    # -- the X.509-SVID profile ---------------------------------------------------------------------------

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        selectors = self._selectors(context, "FetchX509SVID")
        yield from self._stream(context, "FetchX509SVID", lambda: self._x509_response(selectors))

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        selectors = self._selectors(context, "FetchX509Bundles")
        domain = self.cache.trust_domain
        yield from self._stream(context, "FetchX509Bundles", lambda: (workload_pb2.X509BundlesResponse(bundles={
            **{t: der for t, (der, _) in self.cache.federated_for(self.cache.matching(selectors)).items()},
            domain: self.cache.bundle_der}), None, ""))

    # -- the JWT-SVID profile -----------------------------------------------------------------------------

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = "FetchJWTSVID"
        selectors = self._selectors(context, method)
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
                svids.append(workload_pb2.JWTSVID(spiffe_id=entry.spiffe_id, svid=cached.token))
        if not svids:
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE,
                        "no valid JWT-SVID: the keyseal server is unreachable and no cached one is valid")
        self.metrics.request(method, "ok")
        return workload_pb2.JWTSVIDResponse(svids=svids)

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        selectors = self._selectors(context, "FetchJWTBundles")
        domain = self.cache.trust_domain
        yield from self._stream(context, "FetchJWTBundles", lambda: (workload_pb2.JWTBundlesResponse(bundles={
            **{t: jwks for t, (_, jwks) in self.cache.federated_for(self.cache.matching(selectors)).items()},
            domain: self.cache.jwks}), None, ""))

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = "ValidateJWTSVID"
        self._check_header(context, method)
        if not request.audience:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        from spiffe import JwtBundle, JwtSvid, TrustDomain

        try:
            bundle = JwtBundle.parse(TrustDomain(self.cache.trust_domain), self.cache.jwks)
            svid = JwtSvid.parse_and_validate(request.svid, bundle, {request.audience})
        except Exception as exc:  # the library raises several error types; all mean "not valid"
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, f"the JWT-SVID is not valid: {exc}")
        claims = struct_pb2.Struct()
        payload = request.svid.split(".")[1]  # verified above; the library keeps its claims private
        claims.update(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
        self.metrics.request(method, "ok")
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)


class WorkloadApiServer:
    """The gRPC server on a private socket, and the relay on the public one."""

    def __init__(self, cache: AgentCache, socket_path: Path, mode: int, group: int | None,
                 metrics: AgentMetrics | None = None) -> None:
        self._private = Path(tempfile.mkdtemp(prefix="keyseal-agent-"))  # mode 0700: only the agent connects
        internal = str(self._private / "grpc.sock")
        self.relay = _Relay(socket_path, mode, group, internal)
        self._stop = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 8,
                                                             thread_name_prefix="keyseal-workload"),
                                  maximum_concurrent_rpcs=MAX_STREAMS)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
            _Service(cache, self.relay, self._stop, metrics or AgentMetrics()), self.server)
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
