"""The agent's HTTPS client for the trust-domain server: join with a token, then authenticate every call by
mutual TLS with the agent's own X.509-SVID (see ca.http.agents). A new SVID (renewal) or new trust anchors
(a bundle change) close the connection, so the next call handshakes with them. The server is verified against
the bootstrap trust bundle plus the trust domain's bundle, which the agent keeps up to date from the server.

With several server addresses (replicas), a call that cannot reach one, or gets a 5xx from it (a replica that
is not ready or cannot sign), is sent to the next; the client stays with the one that answered. A 4xx is an
answer, not a failure of the replica: it is never retried elsewhere."""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.spiffe.tls import load_chain, not_the_server
from keyseal.errors import BackendUnavailableError, KeysealError

__all__ = ["ServerClient", "ServerRefusedError", "make_csr"]

log = logging.getLogger(__name__)

TIMEOUT = 10.0


class ServerRefusedError(KeysealError):
    """The server answered with a 4xx: the request (or the agent) is not acceptable as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _refused_certificate(exc: Exception) -> bool:
    """The server sent a TLS alert about our certificate (expired, unknown CA, bad or missing)."""
    reason = str(getattr(exc, "reason", "") or "") if isinstance(exc, ssl.SSLError) else ""
    return "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason)


def _unreachable(host: str, port: int, exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return (f"TLS with the keyseal server at {host}:{port} failed ({exc.reason or exc}): is the server's "
                "certificate from a CA in the trust bundle?")
    return f"cannot reach the keyseal server at {host}:{port}: {exc}"


class ServerClient:
    def __init__(self, host: str, port: int, ca_pem: str, more: Sequence[tuple[str, int]] = ()) -> None:
        self.servers = [(host, port), *(m for m in more if m != (host, port))]
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._bootstrap_pem = ca_pem if ca_pem.endswith("\n") else ca_pem + "\n"
        self._ca_pem = self._bootstrap_pem
        self._connection: http.client.HTTPSConnection | None = None
        self._context: ssl.SSLContext | None = None
        self.key: ec.EllipticCurvePrivateKey | None = None
        self.certificate: x509.Certificate | None = None

    def set_trust(self, bundle_pem: str) -> None:
        """The trust domain's CA certificates changed (rotation): the next call opens a connection that trusts
        them and the bootstrap trust bundle (which may hold the CA of a serving certificate from files)."""
        ca_pem = self._bootstrap_pem + bundle_pem
        with self._lock:
            if ca_pem != self._ca_pem:
                self._ca_pem = ca_pem
                self._reset()

    def set_identity(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        """A new agent SVID: the next call opens a connection that presents it."""
        with self._lock:
            self.key, self.certificate = key, certificate
            self._reset()

    def forget_identity(self) -> None:
        """No client certificate on the next connection (a join)."""
        with self._lock:
            self.key, self.certificate = None, None
            self._reset()

    def _reset(self) -> None:
        self._close()
        self._context = None

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _ssl_context(self) -> ssl.SSLContext:
        """Verify the server; present the agent SVID once there is one (not at the join)."""
        if self._context is None:
            context = ssl.create_default_context(cadata=self._ca_pem)
            if self.key is not None and self.certificate is not None:
                load_chain(context, self.certificate.public_bytes(serialization.Encoding.PEM), self.key)
            self._context = context
        return self._context

    def call(self, path: str, document: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON document to the current server, else to the next ones in turn; BackendUnavailableError
        when none can be reached or all answer 5xx.

        A 401 (the token or the agent SVID refused) also moves on: a stale replica that does not know the
        current CA, or a join token yet, must not cost the agent its identity. ServerRefusedError(401) only
        when every server refused; when some refused and the others could not be reached, the refusal is not
        yet every server's: BackendUnavailableError (retried)."""
        failures: list[str] = []
        refusal: ServerRefusedError | None = None
        refused = 0
        start = self.servers.index((self.host, self.port))
        for step in range(len(self.servers)):
            if step:
                with self._lock:
                    self._close()
                    self.host, self.port = self.servers[(start + step) % len(self.servers)]
            try:
                answer = self._call(path, document)
            except BackendUnavailableError as exc:
                failures.append(exc.message)
                continue
            except ServerRefusedError as exc:
                if exc.status != 401:
                    raise
                refusal, refused = refusal or exc, refused + 1
                failures.append(f"{self.host}:{self.port} refused: {exc.message}")
                continue
            if step:
                log.warning("failed over to the keyseal server at %s:%d (%s)", self.host, self.port,
                            "; ".join(failures))
            return answer
        if refusal is not None and len(failures) == 1:
            raise refusal
        if refusal is not None and refused == len(failures):
            raise ServerRefusedError(401, f"every keyseal server refused {path}: {'; '.join(failures)}")
        if len(failures) == 1:
            raise BackendUnavailableError(failures[0])
        raise BackendUnavailableError(f"no keyseal server answered: {'; '.join(failures)}")

    def _connect(self) -> http.client.HTTPSConnection:
        """A connection whose peer passed the host name check and is the server (`not_the_server`), before
        anything (a join token, a service account token) is sent on it."""
        connection = http.client.HTTPSConnection(self.host, self.port, context=self._ssl_context(), timeout=TIMEOUT)
        connection.connect()
        assert isinstance(connection.sock, ssl.SSLSocket)
        why = not_the_server(connection.sock.getpeercert(binary_form=True) or b"")
        if why is not None:
            connection.close()
            raise BackendUnavailableError(f"the peer at {self.host}:{self.port} is not the keyseal server: {why}")
        return connection

    def _call(self, path: str, document: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(document).encode()
        with self._lock:
            headers = {"Content-Type": "application/json"}
            for attempt in (1, 2):  # a kept-alive connection the server closed is retried once
                try:
                    if self._connection is None:
                        self._connection = self._connect()
                    self._connection.request("POST", path, body=body, headers=headers)
                    response = self._connection.getresponse()
                    raw = response.read()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self._close()
                    if _refused_certificate(exc) and self.certificate is not None:
                        reason = getattr(exc, "reason", "")
                        raise ServerRefusedError(401, f"the keyseal server refused the agent SVID at the TLS "
                                                      f"handshake ({reason}): it expired or its CA is no longer "
                                                      f"trusted; a new join token is needed") from exc
                    if attempt == 2:
                        raise BackendUnavailableError(_unreachable(self.host, self.port, exc)) from exc
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if response.status >= 500:
            raise BackendUnavailableError(f"the keyseal server answered {response.status}: "
                                          f"{str(answer.get('message', ''))[:200]}")
        if response.status != 200:
            raise ServerRefusedError(response.status, f"the keyseal server refused {path} ({response.status}): "
                                                      f"{str(answer.get('message', ''))[:200]}")
        return answer
