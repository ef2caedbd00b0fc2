"""The node-agent endpoints of the API: join with a one-time token, then sync entries and obtain SVIDs for them.

An agent proves who it is on every call with its own X.509-SVID (`spiffe://<td>/keyseal/agent/<name>`): the
`X-Keyseal-Agent-Proof` header is a compact JWS signed by the SVID's key, carrying the SVID in `x5c` and binding
the method, path, a hash of the body and the time. The server checks the SVID against its live keysets at
request time, so the proof needs no TLS client authentication (it works with any serving certificate, and the
CA rotation applies at once). A proof is good for PROOF_WINDOW seconds either side of the server's clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keyseal.ca.bundle import bundle_document
from keyseal.ca.entries import AGENT_PATH, Entry, entry_store_for, join_tokens_for
from keyseal.ca.jwtsvid import check_audience, issue_jwt_svid
from keyseal.ca.spiffeid import parse_spiffe_id
from keyseal.ca.x509svid import issue_x509_svid, parse_csr
from keyseal.errors import UsageError

if TYPE_CHECKING:
    from keyseal.ca.api import Api, Request, Response

__all__ = ["PROOF_AUDIENCE", "PROOF_HEADER", "PROOF_WINDOW", "agent_routes"]

log = logging.getLogger(__name__)

PROOF_HEADER = "x-keyseal-agent-proof"
PROOF_AUDIENCE = "keyseal-agent-api"
PROOF_WINDOW = 120
MAX_PROOF = 8192


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _time(moment: Any) -> str:
    return str(moment.strftime("%Y-%m-%dT%H:%M:%SZ"))


class AgentApi:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.entries = entry_store_for(api.config)
        self.tokens = join_tokens_for(api.config)

    # -- helpers ------------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str, message: str) -> Exception:
        from keyseal.ca.api import _Refused

        return _Refused(status, reason, message)

    def _json(self, document: dict[str, Any]) -> Response:
        from keyseal.ca.api import _json

        return _json(200, document)

    def _agent(self, request: Request) -> str:
        """The SPIFFE ID of the agent whose proof this request carries (401 otherwise)."""
        proof = request.headers.get(PROOF_HEADER, "")
        try:
            agent_id = self._verify_proof(proof, request)
        except (ValueError, KeyError, TypeError, InvalidSignature, VerificationError) as exc:
            log.warning("refused %s from %s: bad agent proof (%s)", request.path, request.peer,
                        type(exc).__name__ if not isinstance(exc, ValueError) else str(exc)[:120])
            raise self._refuse(401, "unauthenticated", "send a valid agent proof (join first)") from None
        return agent_id

    def _verify_proof(self, proof: str, request: Request) -> str:
        if not proof or len(proof) > MAX_PROOF:
            raise ValueError("no proof")
        header_b64, payload_b64, signature_b64 = proof.split(".")
        header = json.loads(_b64url_decode(header_b64))
        payload = json.loads(_b64url_decode(payload_b64))
        if header.get("alg") != "ES256" or len(header.get("x5c", [])) != 1:
            raise ValueError("proof header must be ES256 with one x5c certificate")
        leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
        now = self.api.manager.clock()
        authorities = [k.ca_certificate for k, _ in self.api.manager.live(now)]
        verifier = PolicyBuilder().store(Store(authorities)).time(now).build_client_verifier()
        verified = verifier.verify(leaf, [])
        uris = [s.value for s in verified.subjects or [] if isinstance(s, x509.UniformResourceIdentifier)]
        agent_prefix = f"spiffe://{self.api.config.trust_domain}{AGENT_PATH}/"
        if len(uris) != 1 or not uris[0].startswith(agent_prefix):
            raise ValueError("the certificate is not an agent SVID")
        key = leaf.public_key()
        raw = _b64url_decode(signature_b64)
        if not isinstance(key, ec.EllipticCurvePublicKey) or len(raw) != 64:
            raise ValueError("the agent key must be ECDSA P-256")
        signature = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.verify(signature, f"{header_b64}.{payload_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        body_hash = base64.urlsafe_b64encode(hashlib.sha256(request.body).digest()).rstrip(b"=").decode()
        if (payload.get("aud") != PROOF_AUDIENCE or payload.get("htm") != request.method
                or payload.get("htu") != request.path or payload.get("bh") != body_hash):
            raise ValueError("the proof is for another request")
        issued = payload.get("iat")
        if not isinstance(issued, int) or abs(issued - now.timestamp()) > PROOF_WINDOW:
            raise ValueError("the proof is too old or from the future (check the clocks)")
        return str(uris[0])

    def _issue(self, spiffe_id: str, csr: object, ttl: timedelta) -> dict[str, Any]:
        public_key = parse_csr(csr)  # type: ignore[arg-type]
        keyset = self.api.manager.active()
        certificate = issue_x509_svid(keyset, parse_spiffe_id(spiffe_id), public_key, self.api.manager.clock(), ttl)
        self.api.metrics.issued("x509")
        return {"spiffeID": spiffe_id,
                "certChain": [certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")],
                "expiresAt": _time(certificate.not_valid_after_utc), "keyset": keyset.number}

    def _bundle(self) -> dict[str, Any]:
        return bundle_document([k for k, _ in self.api.manager.live()], self.api.config.refresh_hint)

    def _entry(self, agent_id: str, document: dict[str, Any], request: Request) -> Entry:
        entry_id = document.get("entryID")
        entry = self.entries.get(entry_id) if isinstance(entry_id, str) else None
        if entry is None or not entry.parented_by(agent_id):
            log.warning("refused %s from %s: agent %s asked for entry %r it does not hold", request.path,
                        request.peer, agent_id, str(entry_id)[:40])
            raise self._refuse(403, "forbidden", f"agent {agent_id} holds no entry {str(entry_id)[:40]!r}")
        return entry

    # -- endpoints ----------------------------------------------------------------------------------------

    def join(self, request: Request) -> Response:
        document = self.api._body(request, {"token", "csr"})
        token = document.get("token")
        if not isinstance(token, str) or not token or len(token) > 256:
            raise UsageError("token is missing: give the join token from keyseal entry join-token")
        parse_csr(document.get("csr"))  # type: ignore[arg-type]  # a bad CSR must not burn the token
        agent_id = self.tokens.redeem(token, self.api.manager.clock())
        if agent_id is None:
            log.warning("refused an agent join from %s: unknown, used or expired join token", request.peer)
            raise self._refuse(401, "unauthenticated", "the join token is unknown, used or expired: issue a new one")
        answer = self._issue(agent_id, document.get("csr"), self.api.config.x509_ttl)
        log.info("agent %s joined from %s", agent_id, request.peer)
        return self._json({**answer, "bundle": self._bundle()})

    def renew(self, request: Request) -> Response:
        agent_id = self._agent(request)
        document = self.api._body(request, {"csr"})
        return self._json({**self._issue(agent_id, document.get("csr"), self.api.config.x509_ttl),
                           "bundle": self._bundle()})

    def sync(self, request: Request) -> Response:
        agent_id = self._agent(request)
        self.api._body(request, set())
        return self._json({"agentID": agent_id, "entries": [e.to_json() for e in self.entries.for_agent(agent_id)],
                           "bundle": self._bundle()})

    def x509_svid(self, request: Request) -> Response:
        agent_id = self._agent(request)
        document = self.api._body(request, {"entryID", "csr"})
        entry = self._entry(agent_id, document, request)
        ttl = self.api.config.x509_ttl
        if entry.x509_ttl:
            ttl = min(ttl, timedelta(seconds=entry.x509_ttl))
        return self._json(self._issue(entry.spiffe_id, document.get("csr"), ttl))

    def jwt_svid(self, request: Request) -> Response:
        agent_id = self._agent(request)
        document = self.api._body(request, {"entryID", "audience"})
        entry = self._entry(agent_id, document, request)
        audience = check_audience(document.get("audience"))
        ttl = self.api.config.jwt_ttl
        if entry.jwt_ttl:
            ttl = min(ttl, timedelta(seconds=entry.jwt_ttl))
        keyset = self.api.manager.active()
        token, expires = issue_jwt_svid(keyset, parse_spiffe_id(entry.spiffe_id), audience,
                                        self.api.manager.clock(), ttl)
        self.api.metrics.issued("jwt")
        return self._json({"spiffeID": entry.spiffe_id, "token": token, "expiresAt": _time(expires)})


def agent_routes(api: Api) -> dict[str, tuple[str, Callable[[Request], Response]]]:
    """The agent endpoints, for Api's route table; none when the store cannot hold entries."""
    if api.config.store_type != "directory":
        return {}
    agents = AgentApi(api)
    return {
        "/v1/agent/join": ("POST", agents.join),
        "/v1/agent/renew": ("POST", agents.renew),
        "/v1/agent/sync": ("POST", agents.sync),
        "/v1/agent/x509-svid": ("POST", agents.x509_svid),
        "/v1/agent/jwt-svid": ("POST", agents.jwt_svid),
    }
