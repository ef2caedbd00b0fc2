"""Wiring: from a Config to a running trust-domain server (custody, keyset manager, API, TLS listener, and the
rotation thread). Startup order matters: the custody is checked and the keyset loaded or created before the
port is opened, so a server that cannot reach KMS exits without listening and without writing anything."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509

from keyseal._internal.ca.audit_logging import AuditConsole
from keyseal._internal.ca.bundle_configmap import BundleConfigMap
from keyseal._internal.ca.bundle_sequence import BundlePublisher, SequenceLedger
from keyseal._internal.ca.config import Config
from keyseal._internal.ca.custody.manager import Clock, KeysetManager, system_clock
from keyseal._internal.ca.custody.pin_store import PinStore
from keyseal._internal.ca.custody.pins import KeysetPins
from keyseal._internal.ca.custody.source import KeysetSource
from keyseal._internal.ca.federation import FederatedBundles
from keyseal._internal.ca.http.agents import agent_routes
from keyseal._internal.ca.http.api import Api
from keyseal._internal.ca.http.auth import Authenticator
from keyseal._internal.ca.http.listener import Handler, TlsHttpServer
from keyseal._internal.ca.http.messages import Request, Response
from keyseal._internal.ca.http.metrics import Metrics
from keyseal._internal.ca.http.tls import TlsContexts
from keyseal._internal.ca.issuance import signing_audit
from keyseal._internal.providers.aws.client import observe_kms_calls
from keyseal.errors import KeysealError, UsageError

if TYPE_CHECKING:
    from keyseal._internal.ca.registry.templates import TemplateReconciler

__all__ = ["BundleEndpoint", "CaServer", "build_document_store", "build_pins", "build_sequence_ledger",
           "build_source"]

log = logging.getLogger(__name__)

TICK_SECONDS = 5.0
# A replica whose last successful read of the store is older than one refresh hint plus this is stale (not
# ready): the periodic read comes every refresh hint, on a tick, and a failed read is retried at the next ticks.
STALE_MARGIN_SECONDS = 3 * TICK_SECONDS
_FROM_MEMORY = frozenset({"/healthz", "/readyz", "/metrics", "/v1/bundle", "/v1/federation"})
_ISSUANCE = frozenset({"/v1/x509-svid", "/v1/jwt-svid"})


def build_source(config: Config, kube_api_client: Any = None) -> KeysetSource:
    """The custody's keyset source, from the custody registry (keyseal._internal.registry.CUSTODIES); imports an
    SDK only for the custody and store configured."""
    from keyseal._internal.ca.custody.source import CustodyContext
    from keyseal._internal.registry import CUSTODIES

    context = CustodyContext(kube_api_client, lambda scope: build_pins(config, scope, kube_api_client))
    source: KeysetSource = CUSTODIES.load(config.custody)(config, context)
    return source


def build_sequence_ledger(config: Config, kube_api_client: Any = None) -> SequenceLedger:
    """Where bundle sequences are recorded (keyseal._internal.ca.bundle_sequence)."""
    return SequenceLedger(build_document_store(config, "bundle-sequence", kube_api_client))


def build_document_store(config: Config, kind: str, kube_api_client: Any = None) -> PinStore:
    """A small document of the server's own beside its records: `<store>/<recordPrefix>-<kind>.json`, or the
    ConfigMap `<recordPrefix>-<kind>` (data key `<kind>.json`) in the Kubernetes store's namespace."""
    from keyseal._internal.ca.custody.pin_store import ConfigMapPinStore, DirectoryPinStore, LazyPinStore

    name = f"{config.record_prefix}-{kind}"
    if config.store_type == "kubernetes":
        def configmap() -> PinStore:
            from keyseal._internal.providers.kubernetes.client import api_client_from_environment, resolve_namespace

            client = kube_api_client or api_client_from_environment(config.kube_api_server)
            return ConfigMapPinStore(client, resolve_namespace(config.kube_namespace, f"the {kind} document"),
                                     name, key=f"{kind}.json")

        return LazyPinStore(configmap, f"configmap {config.kube_namespace or '(the pod namespace)'}/{name}")
    return DirectoryPinStore(config.store_path, name)


class BundleEndpoint:
    """The SPIFFE Federation bundle endpoint (federation.listen): GET / answers this trust domain's bundle, the
    same document as /v1/bundle. Public: no client certificate is needed."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def handle(self, request: Request) -> Response:
        from keyseal._internal.ca.http.http1 import error

        if request.path.split("?", 1)[0] != "/":
            return error(404, "not_found", "the bundle endpoint serves the trust bundle at /")
        if request.method != "GET":
            response = error(405, "method_not_allowed", "use GET")
            response.headers["Allow"] = "GET"
            return response
        response = Response(200, self.api.bundle()[1])
        response.headers["Cache-Control"] = f"max-age={int(self.api.config.refresh_hint.total_seconds())}"
        return response


def build_pins(config: Config, scope: str, kube_api_client: Any = None) -> KeysetPins:
    """The keyset pins of a key-manager custody, in the configured store (ca.custody.pins): a file in the store
    directory, or a ConfigMap in the Kubernetes store's namespace, named after store.recordPrefix."""
    from keyseal._internal.ca.custody.pin_store import ConfigMapPinStore, DirectoryPinStore, LazyPinStore

    name = f"{config.record_prefix}-keyset-pins"
    store: PinStore
    if config.store_type == "kubernetes":
        def configmap() -> PinStore:
            from keyseal._internal.providers.kubernetes.client import api_client_from_environment, resolve_namespace

            client = kube_api_client or api_client_from_environment(config.kube_api_server)
            return ConfigMapPinStore(client, resolve_namespace(config.kube_namespace, "the keyset pins"), name)

        store = LazyPinStore(configmap, f"configmap {config.kube_namespace or '(the pod namespace)'}/{name}")
    else:
        store = DirectoryPinStore(config.store_path, name)
    return KeysetPins(store, config.trust_domain, config.custody, scope)


class CaServer:
    """One trust-domain server. `start()` loads keys and opens the port; `serve_forever()` answers."""

    def __init__(self, config: Config, *, clock: Clock = system_clock, source: KeysetSource | None = None,
                 kube_api_client: Any = None, rotation_thread: bool = True) -> None:
        self.config = config
        self.clock = clock
        signing_audit.configure_from_environment()
        self.audit_console = AuditConsole(config.audit, signing_audit.writes_file())
        self.metrics = Metrics()
        observe_kms_calls(self.metrics.kms_call)
        self.source = source or build_source(config, kube_api_client)
        # Reading records or a local token costs no KMS call: re-read every refresh hint to see a keyset another
        # replica made (for pkcs11, also to agree on one if two writers raced; see pkcs11_source). Only then is an
        # old read a sign of a replica cut off from the store (KMS custody reads when the schedule is due).
        self._periodic = config.custody in ("wrapped", "pkcs11")
        self.max_view_age = config.refresh_hint + timedelta(seconds=STALE_MARGIN_SECONDS) if self._periodic \
            else None
        self.manager = KeysetManager(self.source, config.trust_domain, config.ca_ttl, config.refresh_hint, clock,
                                     max_view_age=self.max_view_age)
        self.metrics.store_view_age = self._view_age_seconds
        self.bundles = BundlePublisher(build_sequence_ledger(config, kube_api_client), config.refresh_hint)
        self.api = Api(config, self.manager, Authenticator(config.clients), self.metrics, self.bundles)
        self.api.kube_api_client = kube_api_client
        for path, (method, handler) in agent_routes(self.api).items():  # node agents and entries (docs/agent.md)
            self.api.add_route(path, method, handler)
        # In a cluster the node agents read their first trust bundle from a ConfigMap this server keeps current
        # (the chart names it in $KEYSEAL_BUNDLE_CONFIGMAP); elsewhere there is none.
        self.bundle_configmap = BundleConfigMap.from_environment(kube_api_client, config.kube_api_server)
        self.tls = TlsContexts(config)
        self.federation = FederatedBundles(config.federation.trust_domains,
                                           build_document_store(config, "federated-bundles", kube_api_client))
        self.api.federation = self.federation
        self.api.add_route("/v1/federation", "GET", self._federation_status)
        self.metrics.extra.append(self.federation.metrics_lines)
        self.httpd: TlsHttpServer | None = None
        # Listeners beside the API, each on its own thread: OIDC discovery, the federation bundle endpoint.
        self.side_listeners: dict[str, TlsHttpServer] = {}
        self._rotation = rotation_thread
        self._reported_stale = False
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._threads: list[threading.Thread] = []
        self.templates: TemplateReconciler | None = None
        self._templates_lock = threading.Lock()  # a shutdown racing the start either comes first or stops them

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return self.httpd.port

    def start(self) -> None:
        """Check the custody, load or create the keyset, issue the serving certificate, bind the port."""
        if self.config.store_type == "kubernetes":  # fail closed: without it, tokens for running agents pass
            from keyseal._internal.ca.registry.stores import agent_registry_for

            agent_registry_for(self.config, self.api.kube_api_client).check()
        self.manager.start()
        now = self.clock()
        self.tls.renew(self.manager.active_keyset(now) or self.manager.loaded()[-1], now, self._authorities(now))
        self._publish_bundle(now)
        try:
            self.httpd = TlsHttpServer(self.config.listen_host, self.config.listen_port, self.api, self.tls.current,
                                       answer_inline=self.answers_from_memory, limits=self.config.connections)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: {exc.strerror or exc}"
            ) from exc
        try:
            self._open_side_listeners()
        except BaseException:
            self.httpd.server_close()
            raise
        active = self.manager.active_keyset()
        log.info("serving trust domain %s on https://%s:%d with keyset %s (%s custody)", self.config.trust_domain,
                 self.config.listen_host, self.port, active.number if active else "none active yet",
                 self.config.custody)
        self.log_bundle_fingerprint()
        self.audit_console.start()

    def bundle_fingerprint(self) -> str:
        """SHA-256 of the CA certificate a new node pins to fetch its first trust bundle (spiffe.bootstrap)."""
        from keyseal._internal.spiffe.bootstrap import ca_fingerprint

        keyset = self.manager.active_keyset() or self.manager.loaded()[-1]
        return ca_fingerprint(keyset.ca_certificate)

    def log_bundle_fingerprint(self) -> None:
        fingerprint = self.bundle_fingerprint()
        log.info("trust bundle CA sha256 %s: a new node fetches the bundle with keyseal bundle fetch --server "
                 "https://HOST:%d --sha256 %s -o bundle.pem", fingerprint, self.port, fingerprint)

    def _open_side_listeners(self) -> None:
        """The OIDC discovery listener (oidc.listen) and the federation bundle endpoint (federation.listen), if
        configured."""
        oidc = self.config.oidc
        if oidc is not None and self.config.jwt_issuer is not None:
            from keyseal._internal.ca.http.tls_files import FileTlsContext
            from keyseal._internal.ca.oidc import OidcApi

            files = FileTlsContext(oidc.cert_file, oidc.key_file, "oidc.tls")
            handler = OidcApi(self.config.jwt_issuer, self.manager, int(self.config.refresh_hint.total_seconds()))
            self._side_listener("oidc", "oidc.listen", oidc.listen_host, oidc.listen_port, handler, files.context)
        federation = self.config.federation
        if federation.listen_host is not None:
            from keyseal._internal.ca.http.tls_files import FileTlsContext

            context = self.tls.current  # https_spiffe: the server's own X.509-SVID, renewed with the CA
            if federation.cert_file is not None and federation.key_file is not None:  # https_web
                context = FileTlsContext(federation.cert_file, federation.key_file, "federation.tls").context
            self._side_listener("federation", "federation.listen", federation.listen_host, federation.listen_port,
                                BundleEndpoint(self.api), context)

    def _side_listener(self, name: str, key: str, host: str, port: int, handler: Handler,
                       context: Callable[[], ssl.SSLContext]) -> None:
        try:
            server = TlsHttpServer(host, port, handler, context, answer_inline=lambda path: True,
                                   limits=self.config.connections)
        except OSError as exc:
            for other in self.side_listeners.values():
                other.server_close()
            self.side_listeners.clear()
            raise UsageError(f"cannot listen on {host}:{port} ({key}): {exc.strerror or exc}") from exc
        self.side_listeners[name] = server
        log.info("serving %s on https://%s:%d", name, host, server.port)

    def side_port(self, name: str) -> int:
        return self.side_listeners[name].port

    def answers_from_memory(self, path: str) -> bool:
        """Whether answering `path` needs nothing but this process's memory: the listener then answers it on its
        own thread. Issuance does when the CA keys sign in memory and no audit file is written; a key manager's
        remote signature, the store (agents, entries) or a file write would hold up every other connection."""
        route = path.split("?", 1)[0]
        if route in _FROM_MEMORY:
            return True
        return route in _ISSUANCE and self.config.custody == "wrapped" and not signing_audit.writes_file()

    def serve_forever(self) -> None:
        assert self.httpd is not None
        for name, side in self.side_listeners.items():
            thread = threading.Thread(target=side.serve_forever, kwargs={"poll_interval": 0.5},
                                      name=f"keyseal-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.federation.start()
        self._start_templates()
        if self._rotation:
            thread = threading.Thread(target=self._rotation_loop, name="keyseal-rotation", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._serving.set()
        self.httpd.serve_forever(poll_interval=0.5)

    def _start_templates(self) -> None:
        """Registration entries from IdentityTemplate resources, when kubernetes.identityTemplates is on."""
        k8s = self.config.kubernetes
        if k8s is None or not k8s.templates:
            return
        from keyseal._internal.ca.registry.templates import TemplateReconciler
        from keyseal._internal.providers.kubernetes.client import api_client_from_environment, resolve_namespace

        with self._templates_lock:
            if self._stop.is_set() or self.templates is not None:
                return
            client = self.api.kube_api_client or api_client_from_environment(k8s.api_server
                                                                             or self.config.kube_api_server)
            self.templates = TemplateReconciler(k8s, self.config.trust_domain, self.config.record_prefix,
                                                resolve_namespace(self.config.kube_namespace, "registration entries"),
                                                client)
            self.templates.start()

    def start_background(self) -> threading.Thread:
        """Serve from a daemon thread (tests, benchmarks)."""
        thread = threading.Thread(target=self.serve_forever, name="keyseal-server", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def shutdown(self) -> None:
        self._stop.set()
        self.federation.stop()
        with self._templates_lock:
            templates = self.templates
        if templates is not None:
            templates.stop()
        if self.httpd is not None:
            if self._serving.is_set():  # socketserver's shutdown() waits for a serve_forever() that never ran
                self.httpd.shutdown()
            self.httpd.server_close()
        for side in self.side_listeners.values():
            side.shutdown()  # also before its serve_forever() began: that one then returns at once
            side.server_close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        self.api.close()
        self.audit_console.close()

    def tick(self) -> None:
        """One pass of the rotation loop: refresh the keysets when a new one is due (and, for wrapped keys, every
        refresh hint: reading the store costs no KMS call, and shows a keyset another replica made), log state
        changes (activation and expiry need no write: they follow from the clock), renew the serving
        certificate when due.

        A refresh that fails (the store cannot be read) does not stop the rest: the serving certificate is
        renewed and the bundle published from the keysets already loaded (a stale replica's active_keyset()
        already refuses a keyset the schedule may have retired), so an outage longer than x509SVID.ttl does not
        leave clients with an expired server certificate while the keyset still signs. The failure is raised
        afterwards, for the rotation loop to log and count."""
        now = self.clock()
        last = self.manager.last_refresh
        periodic_due = self._periodic and (last is None or now - last >= self.config.refresh_hint)
        failure: KeysealError | None = None
        try:
            if self.manager.due(now) or periodic_due:
                self.manager.refresh()
            else:
                self.manager.log_transitions()
        except KeysealError as exc:
            failure = exc
        finally:
            self.report_view(now)
        active = self.manager.active_keyset(now)
        if active is not None:
            self.tls.renew(active, now, self._authorities(now))
        if self.manager.loaded():
            self._publish_bundle(now)
        if failure is not None:
            raise failure

    def report_view(self, now: datetime) -> None:
        """Log once when this replica's view of the store turns stale (it leaves the Service: /readyz fails)
        and once when it is fresh again."""
        stale = self.manager.stale(now)
        if stale and not self._reported_stale:
            age = self.manager.view_age(now)
            log.warning("the keyset store was last read %.0fs ago (the bound is %.0fs): not ready until it is read "
                        "again; this replica's bundle may lack a keyset the others publish",
                        age.total_seconds() if age else -1,
                        self.max_view_age.total_seconds() if self.max_view_age else -1)
        elif not stale and self._reported_stale:
            log.info("the keyset store is read again: ready")
        self._reported_stale = stale

    def _view_age_seconds(self) -> float | None:
        age = self.manager.view_age()
        return None if age is None else age.total_seconds()

    def _federation_status(self, request: Request) -> Response:
        from keyseal._internal.ca.http.messages import _json

        return _json(200, {"trustDomain": self.config.trust_domain, "federatedBundles": self.federation.status()})

    def _publish_bundle(self, now: datetime) -> None:
        keysets = [k for k, _ in self.manager.live(now)]
        self.bundles.refresh()
        document, _ = self.bundles.current(keysets)  # the sequence is recorded here, off the listener's thread
        if self.bundle_configmap is not None:
            self.bundle_configmap.publish_logged(keysets, self.config.refresh_hint, document)

    def _authorities(self, now: datetime) -> list[x509.Certificate]:
        """The live CA certificates: what a node agent's client certificate (its SVID) may chain to."""
        return [keyset.ca_certificate for keyset, _ in self.manager.live(now)]

    def _rotation_loop(self) -> None:
        reported: str | None = None  # a store outage fails every tick: the same failure is logged once
        while not self._stop.wait(TICK_SECONDS):
            signing_audit.checkpoint_if_due()
            try:
                self.tick()
                if reported is not None:
                    log.info("keyset refresh works again")
                reported = None
            except KeysealError as exc:
                self.metrics.error("rotation")
                if exc.message != reported:
                    log.error("keyset refresh failed, retrying every %.0fs (logged once while it fails the same "
                              "way): %s", TICK_SECONDS, exc.message)
                reported = exc.message
            except Exception:
                self.metrics.error("rotation")
                log.exception("keyset refresh failed, retrying in %.0fs", TICK_SECONDS)
