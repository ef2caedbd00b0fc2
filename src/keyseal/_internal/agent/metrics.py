"""The agent's Prometheus metrics (text exposition format 0.0.4) on a plain HTTP port, off unless
`metrics.listen` is set: whether the keyseal server is reachable, and what the agent still serves when it is not.

- keyseal_agent_server_reachable 1 or 0 (the last sync reached the server, or not)
- keyseal_agent_last_sync_timestamp_seconds (Unix time of the last successful sync; 0 before the first)
- keyseal_agent_sync_failures_total
- keyseal_agent_svid_expiry_timestamp_seconds (the agent's own X.509-SVID)
- keyseal_agent_entries, keyseal_agent_x509_svids_cached, keyseal_agent_jwt_svids_cached
- keyseal_agent_workload_api_requests_total{method,outcome}: "ok" when a call first answers, the gRPC status
  (e.g. "permission_denied", "unavailable", "invalid_argument") when it ends with an error
- keyseal_agent_attestation_failures_total{reason="no_credentials"|"pid_replaced"|"exe_changed"|
  "no_matching_entry"}
- keyseal_agent_workload_api_connections (open now), keyseal_agent_workload_api_connections_closed_total{reason}
  (refused over a limit, idle, written on by another process, accept() failing, a request written
  before attestation that its process never vouched for: "unproven") and
  keyseal_agent_workload_api_calls_refused_total{reason} (over a limit on calls in progress)
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from keyseal._internal.metrics_text import CONTENT_TYPE

if TYPE_CHECKING:
    from keyseal._internal.agent.cache import AgentCache

__all__ = ["ATTESTATION_FAILURES", "AgentMetrics", "MetricsServer"]

log = logging.getLogger(__name__)

ATTESTATION_FAILURES = ("no_credentials", "pid_replaced", "exe_changed", "no_matching_entry")
CONNECTIONS_CLOSED = ("too_many_connections", "too_many_connections_for_uid", "idle", "foreign_writer",
                      "accept_failed", "unproven")
CALLS_REFUSED = ("too_many_calls", "too_many_calls_for_uid")


class AgentMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._attestation: Counter[str] = Counter(dict.fromkeys(ATTESTATION_FAILURES, 0))
        self._closed: Counter[str] = Counter(dict.fromkeys(CONNECTIONS_CLOSED, 0))
        self._refused: Counter[str] = Counter(dict.fromkeys(CALLS_REFUSED, 0))
        self.open_connections: Callable[[], int] = lambda: 0  # set by the Workload API server

    def request(self, method: str, outcome: str) -> None:
        with self._lock:
            self._requests[(method, outcome)] += 1

    def attestation_failure(self, reason: str) -> None:
        with self._lock:
            self._attestation[reason] += 1

    def connection_closed(self, reason: str) -> None:
        with self._lock:
            self._closed[reason] += 1

    def call_refused(self, reason: str) -> None:
        with self._lock:
            self._refused[reason] += 1

    def render(self, cache: AgentCache) -> bytes:
        with self._lock:
            requests, attestation = dict(self._requests), dict(self._attestation)
            closed, refused = dict(self._closed), dict(self._refused)
        last_sync = cache.last_sync.timestamp() if cache.last_sync else 0
        expiry = cache.agent_expires.timestamp() if cache.agent_expires else 0
        lines = [
            "# HELP keyseal_agent_server_reachable Whether the last sync reached the keyseal server (1) or not (0).",
            "# TYPE keyseal_agent_server_reachable gauge",
            f"keyseal_agent_server_reachable {int(cache.server_reachable)}",
            "# HELP keyseal_agent_last_sync_timestamp_seconds Unix time of the last successful sync.",
            "# TYPE keyseal_agent_last_sync_timestamp_seconds gauge",
            f"keyseal_agent_last_sync_timestamp_seconds {last_sync:.3f}",
            "# HELP keyseal_agent_sync_failures_total Syncs with the keyseal server that failed.",
            "# TYPE keyseal_agent_sync_failures_total counter",
            f"keyseal_agent_sync_failures_total {cache.sync_failures}",
            "# HELP keyseal_agent_svid_expiry_timestamp_seconds Unix time the agent's own X.509-SVID expires.",
            "# TYPE keyseal_agent_svid_expiry_timestamp_seconds gauge",
            f"keyseal_agent_svid_expiry_timestamp_seconds {expiry:.0f}",
            "# HELP keyseal_agent_entries Registration entries the agent holds.",
            "# TYPE keyseal_agent_entries gauge",
            f"keyseal_agent_entries {len(cache.entries)}",
            "# HELP keyseal_agent_x509_svids_cached X.509-SVIDs the agent can serve now.",
            "# TYPE keyseal_agent_x509_svids_cached gauge",
            f"keyseal_agent_x509_svids_cached {len(cache.x509)}",
            "# HELP keyseal_agent_jwt_svids_cached JWT-SVIDs in the agent's cache.",
            "# TYPE keyseal_agent_jwt_svids_cached gauge",
            f"keyseal_agent_jwt_svids_cached {len(cache.jwt)}",
            "# HELP keyseal_agent_workload_api_requests_total Workload API calls, by method and outcome.",
            "# TYPE keyseal_agent_workload_api_requests_total counter",
            *(f'keyseal_agent_workload_api_requests_total{{method="{m}",outcome="{o}"}} {v}'
              for (m, o), v in sorted(requests.items())),
            "# HELP keyseal_agent_attestation_failures_total Workload attestations that gave no identity, by reason.",
            "# TYPE keyseal_agent_attestation_failures_total counter",
            *(f'keyseal_agent_attestation_failures_total{{reason="{r}"}} {v}' for r, v in sorted(attestation.items())),
            "# HELP keyseal_agent_workload_api_connections Workload API connections open now.",
            "# TYPE keyseal_agent_workload_api_connections gauge",
            f"keyseal_agent_workload_api_connections {self.open_connections()}",
            "# HELP keyseal_agent_workload_api_connections_closed_total Workload API connections the agent refused or "
            "closed, by reason.",
            "# TYPE keyseal_agent_workload_api_connections_closed_total counter",
            *(f'keyseal_agent_workload_api_connections_closed_total{{reason="{r}"}} {v}'
              for r, v in sorted(closed.items())),
            "# HELP keyseal_agent_workload_api_calls_refused_total Workload API calls refused over a limit, by reason.",
            "# TYPE keyseal_agent_workload_api_calls_refused_total counter",
            *(f'keyseal_agent_workload_api_calls_refused_total{{reason="{r}"}} {v}'
              for r, v in sorted(refused.items())),
        ]
        return ("\n".join(lines) + "\n").encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = self.server.metrics.render(self.server.cache)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s %s", self.address_string(), format % args)


class MetricsServer(ThreadingHTTPServer):
    """Plain HTTP (the metrics hold no secrets): GET /metrics."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, metrics: AgentMetrics, cache: AgentCache) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.metrics, self.cache = metrics, cache
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="keyseal-agent-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
