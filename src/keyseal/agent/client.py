"""The agent's HTTPS client for the trust-domain server: join with a token, then sign every call with a proof
made by the agent SVID's key (see keyseal.ca.agents). The server is verified against the trust bundle, which the
agent keeps up to date from the server itself."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import threading
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keyseal.ca.agents import PROOF_AUDIENCE, PROOF_HEADER
from keyseal.errors import BackendUnavailableError, KeysealError

__all__ = ["ServerClient", "ServerRefusedError", "make_csr"]

TIMEOUT = 10.0


class ServerRefusedError(KeysealError):
    """The server answered with a 4xx: the request (or the agent) is not acceptable as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


class ServerClient:
    def __init__(self, host: str, port: int, ca_pem: str) -> None:
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._ca_pem = ca_pem
        self._connection: http.client.HTTPSConnection | None = None
        self.key: ec.EllipticCurvePrivateKey | None = None
        self.certificate: x509.Certificate | None = None

    def set_trust(self, ca_pem: str) -> None:
        """New trust anchors (a bundle change): the next call opens a connection that uses them."""
        with self._lock:
            if ca_pem != self._ca_pem:
                self._ca_pem = ca_pem
                self._close()

    def set_identity(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        with self._lock:
            self.key, self.certificate = key, certificate

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _proof(self, method: str, path: str, body: bytes) -> str:
        assert self.key is not None and self.certificate is not None
        header = {"alg": "ES256", "typ": "JWT",
                  "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()]}
        payload = {"aud": PROOF_AUDIENCE, "htm": method, "htu": path, "iat": int(time.time()),
                   "bh": _b64url(hashlib.sha256(body).digest())}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(payload).encode())
        r, s = decode_dss_signature(self.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def call(self, path: str, document: dict[str, Any], *, signed: bool = True) -> dict[str, Any]:
        """POST a JSON document; BackendUnavailableError when the server cannot be reached or answers 5xx."""
        body = json.dumps(document).encode()
        with self._lock:
            headers = {"Content-Type": "application/json"}
            if signed:
                headers[PROOF_HEADER] = self._proof("POST", path, body)
            for attempt in (1, 2):  # a kept-alive connection the server closed is retried once
                if self._connection is None:
                    context = ssl.create_default_context(cadata=self._ca_pem)
                    self._connection = http.client.HTTPSConnection(self.host, self.port, context=context,
                                                                   timeout=TIMEOUT)
                try:
                    self._connection.request("POST", path, body=body, headers=headers)
                    response = self._connection.getresponse()
                    raw = response.read()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self._close()
                    if attempt == 2:
                        raise BackendUnavailableError(
                            f"cannot reach the keyseal server at {self.host}:{self.port}: {exc}") from None
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
