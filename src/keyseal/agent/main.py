"""The agent: read the bootstrap trust bundle, join the server, sync, serve the Workload API, keep syncing."""

from __future__ import annotations

import json
import logging
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyseal.agent.cache import AgentCache
from keyseal.agent.client import ServerClient, ServerRefusedError
from keyseal.agent.config import AgentConfig
from keyseal.agent.metrics import AgentMetrics, MetricsServer
from keyseal.agent.state import AgentState
from keyseal.errors import InputError, UsageError

__all__ = ["Agent", "read_trust_bundle"]

log = logging.getLogger(__name__)


def read_trust_bundle(text: str) -> str:
    """CA certificates as PEM, from a PEM file or a SPIFFE bundle (JSON)."""
    import base64

    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
            ders = [base64.b64decode(c) for k in document["keys"] if k.get("use") == "x509-svid"
                    for c in k["x5c"]]
            return "".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM).decode()
                           for d in ders)
        except (ValueError, KeyError, TypeError):
            raise InputError("the trust bundle is not a SPIFFE bundle (JSON with x509-svid keys)") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise InputError("the trust bundle holds no PEM certificate")
    return text


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        try:
            ca_pem = read_trust_bundle(config.trust_bundle_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"cannot read trustBundleFile {config.trust_bundle_file}: {exc.strerror}") from None
        self.client = ServerClient(config.server_host, config.server_port, ca_pem)
        state = None
        if config.state_dir is not None and config.state_kek_file is not None:
            state = AgentState(config.state_dir, config.state_kek_file, config.trust_domain)
        self.cache = AgentCache(self.client, config.trust_domain, state, config.workload_api.jwt_cache_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.workload: object | None = None
        self.metrics = AgentMetrics()
        self.metrics_server: MetricsServer | None = None

    def start(self) -> None:
        """Resume the saved agent SVID or join (the token is spent here), sync once, open the Workload API socket
        (and the metrics port), start syncing."""
        from keyseal.agent.workload import WorkloadApiServer

        self._identity()
        self.cache.sync()
        server = WorkloadApiServer(self.cache, self.config.socket_path, self.config.socket_mode,
                                   self.config.socket_group, self.metrics, self.config.workload_api)
        server.start()
        self.workload = server
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            try:
                self.metrics_server = MetricsServer(host, port, self.metrics, self.cache)
            except OSError as exc:
                server.stop()
                raise InputError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
            self.metrics_server.start()
            log.info("serving metrics on http://%s:%d/metrics", host, self.metrics_server.port)
        self._thread = threading.Thread(target=self._loop, name="keyseal-agent-sync", daemon=True)
        self._thread.start()
        log.info("serving the SPIFFE Workload API on unix:%s", self.config.socket_path)

    def _identity(self) -> None:
        """The saved agent SVID if there is one the server still takes, else a join with the token."""
        saved = self.cache.state.load() if self.cache.state is not None else None
        if saved is not None:
            try:
                self.cache.resume(saved.key, saved.certificate)
                log.info("resumed the saved agent SVID (no join token spent)")
                return
            except ServerRefusedError as exc:
                log.warning("the server refused the saved agent SVID (%s): joining with the token", exc.message)
        if not self.config.join_token:
            raise UsageError("no usable saved agent SVID and no join token: issue one with keyseal entry "
                             "join-token and set joinTokenFile or KEYSEAL_JOIN_TOKEN")
        self.cache.join(self.config.join_token)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.sync_interval):
            try:
                self.cache.sync()
            except Exception:
                log.exception("agent sync failed")

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        from keyseal.agent.workload import WorkloadApiServer

        if isinstance(self.workload, WorkloadApiServer):
            self.workload.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.client.close()
