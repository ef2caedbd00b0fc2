"""Wiring: from a Config to a running trust-domain server (custody, keyset manager, API, TLS listener, and the
rotation thread). Startup order matters: the custody is checked and the keyset loaded or created before the
port is opened, so a server that cannot reach KMS exits without listening and without writing anything."""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from cryptography import x509

from keyseal.aws import observe_kms_calls
from keyseal.ca import signing_audit
from keyseal.ca.api import Api
from keyseal.ca.auth import Authenticator
from keyseal.ca.bundle_configmap import BundleConfigMap
from keyseal.ca.config import CA_KEY_TYPES, Config
from keyseal.ca.httpd import TlsHttpServer
from keyseal.ca.manager import Clock, KeysetManager, system_clock
from keyseal.ca.metrics import Metrics
from keyseal.ca.pins import KeysetPins
from keyseal.ca.source import KeysetSource
from keyseal.ca.tls import TlsContexts
from keyseal.errors import KeysealError, UsageError

__all__ = ["CaServer", "build_pins", "build_source"]

log = logging.getLogger(__name__)

TICK_SECONDS = 5.0
_FROM_MEMORY = frozenset({"/healthz", "/readyz", "/metrics", "/v1/bundle"})
_ISSUANCE = frozenset({"/v1/x509-svid", "/v1/jwt-svid"})


def build_source(config: Config, kube_api_client: Any = None) -> KeysetSource:
    """The custody's keyset source; imports an SDK only for the custody and store configured."""
    x509_type, jwt_type = CA_KEY_TYPES[config.ca_key_type], CA_KEY_TYPES[config.jwt_key_type]
    if config.custody == "kms":
        from keyseal.ca.kms_source import KmsKeysetSource

        return KmsKeysetSource(config.trust_domain, config.kms_alias_prefix, x509_type, jwt_type,
                               endpoint=config.kms_endpoint, region=config.aws_region,
                               pins=build_pins(config, config.kms_alias_prefix, kube_api_client))
    if config.custody == "pkcs11" and config.pkcs11 is not None:
        from keyseal.ca.pkcs11_source import Pkcs11KeysetSource

        token = config.pkcs11
        return Pkcs11KeysetSource(config.trust_domain, token.uri, token.label_prefix, x509_type, jwt_type,
                                  module_path=token.module_path, pin_file=token.pin_file,
                                  pins=build_pins(config, token.label_prefix, kube_api_client))
    from keyseal.ca.wrapped_source import WrappedKeysetSource
    from keyseal.store import RecordStore
    from keyseal.wrapping.kek import KekProvider, parse_kek

    kek: KekProvider
    if config.wrapping_provider == "vault" and config.vault is not None:
        from keyseal.wrapping.vault import VaultKek

        vault = config.vault
        kek = VaultKek.from_config(vault.address, vault.transit_key, mount=vault.mount, token_file=vault.token_file,
                                   kubernetes_role=vault.kubernetes_role, kubernetes_mount=vault.kubernetes_mount,
                                   namespace=vault.namespace, ca_bundle=vault.ca_bundle)
        log.info("Key wrapping via Vault Transit key=%s/%s address=%s", vault.mount, vault.transit_key,
                 vault.address)
    else:
        kek = parse_kek(config.kek_spec(), kms_endpoint=config.kms_endpoint, region=config.aws_region)
    if config.wrapping_provider == "local":
        log.info("Key wrapping via local KEK file %s", getattr(kek, "path", "?"))
    store: RecordStore
    if config.store_type == "kubernetes":
        from keyseal.store.kubernetes import KubernetesStore, api_client_from_environment, resolve_namespace

        client = kube_api_client or api_client_from_environment(config.kube_api_server)
        store = KubernetesStore(resolve_namespace(config.kube_namespace, "the WrappedKey resources"), client)
    else:
        from keyseal.store.directory import DirectoryStore
        from keyseal.wrapping.ledger import FileLedger

        store = DirectoryStore(config.store_path, FileLedger(config.ledger_file) if config.ledger_file else None)
    return WrappedKeysetSource(store, kek, config.record_prefix, x509_type, jwt_type)


def build_pins(config: Config, scope: str, kube_api_client: Any = None) -> KeysetPins:
    """The keyset pins of a key-manager custody, in the configured store (keyseal.ca.pins): a file in the store
    directory, or a ConfigMap in the Kubernetes store's namespace, named after store.recordPrefix."""
    from keyseal.ca.pin_store import ConfigMapPinStore, DirectoryPinStore, LazyPinStore, PinStore

    name = f"{config.record_prefix}-keyset-pins"
    store: PinStore
    if config.store_type == "kubernetes":
        def configmap() -> PinStore:
            from keyseal.store.kubernetes import api_client_from_environment, resolve_namespace

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
        self.metrics = Metrics()
        observe_kms_calls(self.metrics.kms_call)
        self.source = source or build_source(config, kube_api_client)
        self.manager = KeysetManager(self.source, config.trust_domain, config.ca_ttl, config.refresh_hint, clock)
        self.api = Api(config, self.manager, Authenticator(config.clients), self.metrics)
        # In a cluster the node agents read their first trust bundle from a ConfigMap this server keeps current
        # (the chart names it in $KEYSEAL_BUNDLE_CONFIGMAP); elsewhere there is none.
        self.bundle_configmap = BundleConfigMap.from_environment(kube_api_client, config.kube_api_server)
        self.tls = TlsContexts(config)
        self.httpd: TlsHttpServer | None = None
        self._rotation = rotation_thread
        # Reading records or a local token costs no KMS call: re-read every refresh hint to see a keyset another
        # replica made (for pkcs11, also to agree on one if two writers raced; see pkcs11_source).
        self._periodic = config.custody in ("wrapped", "pkcs11")
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return self.httpd.port

    def start(self) -> None:
        """Check the custody, load or create the keyset, issue the serving certificate, bind the port."""
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
            ) from None
        active = self.manager.active_keyset()
        log.info("serving trust domain %s on https://%s:%d with keyset %s (%s custody)", self.config.trust_domain,
                 self.config.listen_host, self.port, active.number if active else "none active yet",
                 self.config.custody)

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
        if self._rotation:
            thread = threading.Thread(target=self._rotation_loop, name="keyseal-rotation", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._serving.set()
        self.httpd.serve_forever(poll_interval=0.5)

    def start_background(self) -> threading.Thread:
        """Serve from a daemon thread (tests, benchmarks)."""
        thread = threading.Thread(target=self.serve_forever, name="keyseal-server", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def shutdown(self) -> None:
        self._stop.set()
        if self.httpd is not None:
            if self._serving.is_set():  # socketserver's shutdown() waits for a serve_forever() that never ran
                self.httpd.shutdown()
            self.httpd.server_close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        self.api.close()

    def tick(self) -> None:
        """One pass of the rotation loop: refresh the keysets when a new one is due (and, for wrapped keys, every
        refresh hint: reading the store costs no KMS call, and shows a keyset another replica made), log state
        changes (activation and expiry need no write: they follow from the clock), renew the serving
        certificate when due."""
        now = self.clock()
        last = self.manager.last_refresh
        periodic_due = self._periodic and (last is None or now - last >= self.config.refresh_hint)
        if self.manager.due(now) or periodic_due:
            self.manager.refresh()
        else:
            self.manager.log_transitions()
        active = self.manager.active_keyset(now)
        if active is not None:
            self.tls.renew(active, now, self._authorities(now))
        self._publish_bundle(now)

    def _publish_bundle(self, now: datetime) -> None:
        if self.bundle_configmap is not None:
            self.bundle_configmap.publish_logged([k for k, _ in self.manager.live(now)], self.config.refresh_hint)

    def _authorities(self, now: datetime) -> list[x509.Certificate]:
        """The live CA certificates: what a node agent's client certificate (its SVID) may chain to."""
        return [keyset.ca_certificate for keyset, _ in self.manager.live(now)]

    def _rotation_loop(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            try:
                self.tick()
            except KeysealError as exc:
                self.metrics.error("rotation")
                log.error("keyset refresh failed, retrying in %.0fs: %s", TICK_SECONDS, exc.message)
            except Exception:
                self.metrics.error("rotation")
                log.exception("keyset refresh failed, retrying in %.0fs", TICK_SECONDS)
