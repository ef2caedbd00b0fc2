"""The agent: read the bootstrap trust bundle, join the server, sync, serve the Workload API, keep syncing."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyseal._internal.agent.cache import AgentCache
from keyseal._internal.agent.client import ServerClient, ServerRefusedError
from keyseal._internal.agent.config import AgentConfig
from keyseal._internal.agent.metrics import AgentMetrics, MetricsServer
from keyseal._internal.agent.state import AgentState
from keyseal.errors import BackendUnavailableError, InputError, KeysealError, UsageError

__all__ = ["Agent", "Rejoiner", "read_trust_bundle"]

log = logging.getLogger(__name__)

PSAT_JOIN = "/v1/agent/attest/k8s_psat"
MIN_WAIT = 0.05  # seconds between two syncs at the least
RETRY_WAIT = 1.0  # seconds between syncs at the least while the server does not answer


@dataclass(frozen=True)
class Rejoiner:
    """One way to join again: `offer()` gives a credential (or None), `join(credential)` spends it. A one-time
    credential (a join token) is never offered to the server twice."""

    what: str
    offer: Callable[[], str | None]
    join: Callable[[str], None]
    one_time: bool


def _digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


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
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError("the trust bundle is not a SPIFFE bundle (JSON with x509-svid keys)") from exc
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise InputError("the trust bundle holds no PEM certificate")
    return text


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        try:
            ca_pem = read_trust_bundle(config.trust_bundle_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"cannot read trustBundleFile {config.trust_bundle_file}: {exc.strerror}") from exc
        self.client = ServerClient(config.server_host, config.server_port, ca_pem, config.more_servers)
        state = None
        if config.state_dir is not None and config.state_kek_file is not None:
            state = AgentState(config.state_dir, config.state_kek_file, config.trust_domain)
        self.cache = AgentCache(self.client, config.trust_domain, state, config.workload_api.jwt_cache_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.workload: object | None = None
        self.metrics = AgentMetrics()
        self.metrics_server: MetricsServer | None = None
        # How the agent joins again when its SVID expired while no server answered (or was refused), in order.
        # A projected service account token (k8sPSAT) is presented again, as the kubelet has rotated it: node
        # attestation, not a one-time credential. joinTokenFile is re-read (a new token put there by whoever
        # provisions nodes).
        self.rejoiners: list[Rejoiner] = []
        if config.psat_token_file is not None:
            self.cache.renewal_token = self._psat_token  # renewals attest the node again (ca.http.agents)
            self.rejoiners.append(Rejoiner(f"the service account token in {config.psat_token_file}",
                                           self._psat_offer, self._join_psat, one_time=False))
        if config.join_token_file is not None:
            self.rejoiners.append(Rejoiner(f"a new token in {config.join_token_file}", self._token_from_file,
                                           self.cache.join, one_time=True))
        # One-time tokens offered to the server (their SHA-256), kept in stateDir so a restart with a saved SVID
        # does not offer the already-spent token in joinTokenFile again.
        self._spent: list[str] = state.spent_tokens() if state is not None else []
        self._rejoin_reported = False

    def start(self) -> None:
        """Resume the saved agent SVID or join (the token is spent here), sync once, open the Workload API socket
        (and the metrics port), start syncing."""
        from keyseal._internal.agent.workload import WorkloadApiServer

        self._identity()
        self.cache.sync()
        attestor = None
        if self.config.k8s is not None:
            from keyseal._internal.agent.k8s import K8sAttestor

            attestor = K8sAttestor(self.config.k8s, on_failure=self.metrics.attestation_failure).selectors
        server = WorkloadApiServer(self.cache, self.config.socket_path, self.config.socket_mode,
                                   self.config.socket_group, self.metrics, self.config.workload_api, attestor)
        server.start()
        self.workload = server
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            try:
                self.metrics_server = MetricsServer(host, port, self.metrics, self.cache)
            except OSError as exc:
                server.stop()
                raise InputError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
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
        if self.config.psat_token_file is not None:
            self._join_psat(self._psat_token())
            return
        if not self.config.join_token:
            raise UsageError("no usable saved agent SVID and no join token: issue one with keyseal entry "
                             "join-token and set joinTokenFile or KEYSEAL_JOIN_TOKEN")
        self._mark_spent(_digest(self.config.join_token))
        try:
            self.cache.join(self.config.join_token)
        except BackendUnavailableError:
            self._mark_spent(_digest(self.config.join_token), spent=False)  # the server never saw it
            raise

    def _mark_spent(self, digest: str, spent: bool = True) -> None:
        """Record (or, for a token the server never saw, forget) a one-time token as offered, in stateDir too."""
        if (digest in self._spent) == spent:
            return
        if spent:
            self._spent.append(digest)
        else:
            self._spent.remove(digest)
        if self.cache.state is not None:
            try:
                self.cache.state.save_spent_tokens(self._spent)
            except (KeysealError, OSError) as exc:
                log.warning("cannot record the spent join token in stateDir (a restart may offer it again): %s",
                            exc.message if isinstance(exc, KeysealError) else exc.strerror or exc)

    def _psat_token(self) -> str:
        assert self.config.psat_token_file is not None
        try:  # read at every join: the kubelet rotates the token
            token = self.config.psat_token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read k8sPSAT.tokenFile {self.config.psat_token_file}: {exc}") from exc
        if not token:
            raise InputError(f"k8sPSAT.tokenFile {self.config.psat_token_file} is empty")
        return token

    def _psat_offer(self) -> str | None:
        """The service account token as it is now, for a re-join; None (said why) when it cannot be read."""
        try:
            return self._psat_token()
        except InputError as exc:
            log.warning("cannot join again with the service account token: %s", exc.message)
            return None

    def _join_psat(self, token: str) -> None:
        self.cache.join(token, PSAT_JOIN)

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            version = self.cache.version
            wait = self._next_wait(last)
            if wait > 0:
                self.cache.wait_change(version, wait)  # a change (a new entry, a stop) recomputes the wait
                continue
            try:
                self.cache.sync()
                if self.cache.needs_join:
                    self._rejoin()
            except KeysealError as exc:
                log.error("agent sync failed: %s", exc.message)
            except Exception:
                log.exception("agent sync failed")
            last = time.monotonic()

    def _token_from_file(self) -> str | None:
        path = self.config.join_token_file
        if path is None:
            return None
        try:
            token = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return token or None

    def _rejoin(self) -> None:
        """Join again with the first credential a re-joiner offers that this agent has not spent yet; the saved
        state (stateDir) then holds the new SVID. Without one, say once what would help."""
        for rejoiner in self.rejoiners:
            what = rejoiner.what
            credential = rejoiner.offer()
            if credential is None or (rejoiner.one_time and _digest(credential) in self._spent):
                continue
            if rejoiner.one_time:
                self._mark_spent(_digest(credential))
            try:
                rejoiner.join(credential)
            except ServerRefusedError as exc:
                log.warning("joining again with %s was refused: %s", what, exc.message)
                continue
            except BackendUnavailableError as exc:
                if rejoiner.one_time:
                    self._mark_spent(_digest(credential), spent=False)  # not spent: the server never saw it
                log.warning("cannot join again with %s yet: %s", what, exc.message)
                return
            log.info("joined again with %s: serving again", what)
            self._rejoin_reported = False
            self.cache.sync()
            return
        if not self._rejoin_reported:
            self._rejoin_reported = True
            psat = (" (the service account token was refused or could not be read: see above; it is offered again "
                    "at every sync)" if self.config.psat_token_file is not None else "")
            log.error("the agent SVID is no longer accepted and no unused join credential is at hand%s: put a new "
                      "join token in joinTokenFile (keyseal entry join-token), or restart the agent with one", psat)

    def _next_wait(self, last: float) -> float:
        """Seconds until the next sync: syncInterval after the last one, or sooner when an SVID is due for
        renewal before then (so a workload never sees a gap while the server answers); after a failed sync,
        not sooner than a second later."""
        since = time.monotonic() - last
        wait = self.config.sync_interval - since
        deadline = self.cache.next_deadline()
        if deadline is not None:
            wait = min(wait, (deadline - datetime.now(UTC)).total_seconds())
        floor = min(self.config.sync_interval, RETRY_WAIT) if not self.cache.server_reachable else MIN_WAIT
        return max(wait, floor - since)

    def request_stop(self) -> None:
        self._stop.set()
        self.cache.wake()

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self.cache.wake()
        from keyseal._internal.agent.workload import WorkloadApiServer

        if isinstance(self.workload, WorkloadApiServer):
            self.workload.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.client.close()
