"""The node-agent endpoints of the API: join with a one-time token, then sync entries and obtain SVIDs for them.

After the join, an agent authenticates every call by mutual TLS with its own X.509-SVID
(`spiffe://<td>/keyseal/agent/<name>`) as the client certificate. OpenSSL accepted the chain at handshake time,
against the CA certificates the TLS context held then (and server.tls.clientCAFile); here the certificate is
verified again against the live keysets at the server's clock, so a keyset that expired or a certificate from
another CA the handshake trusts is refused, and it must be an agent's SPIFFE ID. The chain check is remembered
per certificate while the live keysets are the same ones; its validity at the server's clock is checked on
every request.

Renewal (POST /v1/agent/renew) of an agent attested by its service account token (k8s_psat) attests it again, as
SPIRE re-attests agents of its re-attestable k8s_psat attestor at each rotation: the agent sends its projected
token as it is now, the server checks it as at the join (ca.registry.psat) and it must attest the very node in
the agent's SPIFFE ID. A join-token agent renews on its SVID alone: nothing outside it could attest it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keyseal._internal.ca.http.messages import Request, Response, _json, _Refused
from keyseal._internal.ca.issuance.jwtsvid import check_audience, issue_jwt_svid
from keyseal._internal.ca.issuance.x509svid import issue_x509_svid, parse_csr
from keyseal._internal.ca.registry.entries import AGENT_PATH, Entry, EntryStore, JoinTokens
from keyseal._internal.ca.registry.index import entries_digest
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from keyseal._internal.records.record import format_time
from keyseal._internal.spiffe.ids import parse_spiffe_id
from keyseal.errors import KeysealError, UsageError, loggable

if TYPE_CHECKING:
    from keyseal._internal.ca.http.api import Api
    from keyseal._internal.ca.registry.psat import PsatAttestor

__all__ = ["agent_routes"]

log = logging.getLogger(__name__)

VERIFIED_CACHE = 65536  # agent certificates remembered as verified (about 100 bytes each, plus the DER)


class AgentApi:
    def __init__(self, api: Api) -> None:
        self.api = api
        self._entries: EntryStore | None = None
        self._tokens: JoinTokens | None = None
        self._psat: PsatAttestor | None = None
        self._bundle_tag: tuple[bytes, str] | None = None  # the served bundle's JSON and its digest
        self._verified: dict[bytes, tuple[tuple[x509.Certificate, ...], str, datetime, datetime]] = {}

    @property
    def entries(self) -> EntryStore:
        """The server store's entries, opened at the first agent call (a Kubernetes store needs its API)."""
        if self._entries is None:
            self._entries = entry_store_for(self.api.config, self.api.kube_api_client, serving=True)
        return self._entries

    def close(self) -> None:
        """Stop what the entry store runs (a Kubernetes store's watch)."""
        if self._entries is not None:
            self._entries.close()

    @property
    def tokens(self) -> JoinTokens:
        if self._tokens is None:
            self._tokens = join_tokens_for(self.api.config, self.api.kube_api_client)
        return self._tokens

    # -- helpers ------------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str, message: str) -> Exception:
        return _Refused(status, reason, message)

    def _json(self, document: dict[str, Any]) -> Response:
        return _json(200, document)

    def _agent(self, request: Request) -> str:
        """The SPIFFE ID of the agent whose X.509-SVID is this connection's client certificate (401 otherwise)."""
        if request.peer_certificate is None:
            log.warning("refused %s from %s: no client certificate", loggable(request.path), request.peer)
            raise self._refuse(401, "unauthenticated",
                               "present the agent's X.509-SVID as the TLS client certificate (join first)")
        try:
            return self._verify_agent(request.peer_certificate)
        except (ValueError, VerificationError, KeysealError) as exc:
            log.warning("refused %s from %s: the client certificate is not a valid agent SVID (%s)",
                        loggable(request.path), request.peer, loggable(str(exc), 160))
            raise self._refuse(401, "unauthenticated", "the client certificate is not a valid agent X.509-SVID of "
                                                       "this trust domain: renew it in time, or join again") from exc

    def _verify_agent(self, der: bytes) -> str:
        """The agent ID of a client certificate verified against the live CAs at the server's clock. A verified
        certificate is remembered with its validity while the live CAs stay the same (a sync every few seconds
        per agent otherwise rebuilds the same chain check); the validity is still checked at every request."""
        now = self.api.manager.clock()
        authorities = [k.ca_certificate for k, _ in self.api.manager.live(now)]
        if not authorities:
            raise ValueError("no live CA")
        anchors = tuple(authorities)
        known = self._verified.get(der)
        if known is not None and known[0] == anchors and known[2] <= now < known[3]:
            return known[1]
        leaf = x509.load_der_x509_certificate(der)
        agent_id = self._verify_chain(leaf, authorities, now)
        if len(self._verified) >= VERIFIED_CACHE:
            self._verified.clear()  # bounded: at worst every agent is verified once more
        self._verified[der] = (anchors, agent_id, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        return agent_id

    def _verify_chain(self, leaf: x509.Certificate, authorities: list[x509.Certificate], now: datetime) -> str:
        verifier = PolicyBuilder().store(Store(authorities)).time(now).build_client_verifier()
        verified = verifier.verify(leaf, [])
        uris = [s.value for s in verified.subjects or [] if isinstance(s, x509.UniformResourceIdentifier)]
        agent_prefix = f"spiffe://{self.api.config.trust_domain}{AGENT_PATH}/"
        if len(uris) != 1 or not uris[0].startswith(agent_prefix) or not _agent_name(uris[0][len(agent_prefix):]):
            raise ValueError(f"{str(uris)[:100]} is not an agent SPIFFE ID ({agent_prefix}<name>)")
        parse_spiffe_id(uris[0])
        return str(uris[0])

    def _issue(self, spiffe_id: str, csr: object, ttl: timedelta, dns_names: tuple[str, ...] = ()) -> dict[str, Any]:
        public_key = parse_csr(csr)  # type: ignore[arg-type]
        keyset = self.api.manager.active()
        certificate = issue_x509_svid(keyset, parse_spiffe_id(spiffe_id), public_key, self.api.manager.clock(), ttl,
                                      dns_names=dns_names)
        self.api.metrics.issued("x509")
        return {"spiffeID": spiffe_id,
                "certChain": [certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")],
                "expiresAt": format_time(certificate.not_valid_after_utc), "keyset": keyset.number}

    def _bundle(self) -> dict[str, Any]:
        return self.api.bundle()[0]

    def _bundle_tagged(self) -> tuple[dict[str, Any], str]:
        """The bundle document as served and a digest of it, hashed again only when the served JSON changes."""
        document, body = self.api.bundle()
        cached = self._bundle_tag
        if cached is None or cached[0] is not body:
            cached = self._bundle_tag = (body, hashlib.sha256(body).hexdigest()[:32])
        return document, cached[1]

    def _entry(self, agent_id: str, document: dict[str, Any], request: Request) -> Entry:
        entry_id = document.get("entryID")
        entry = self.entries.get(entry_id) if isinstance(entry_id, str) else None
        if entry is None or not entry.parented_by(agent_id):
            log.warning("refused %s from %s: agent %s asked for entry %s it does not hold", loggable(request.path),
                        request.peer, agent_id, loggable(str(entry_id), 40))
            raise self._refuse(403, "forbidden", f"agent {agent_id} holds no entry {str(entry_id)[:40]!r}")
        return entry

    # -- endpoints ----------------------------------------------------------------------------------------

    def join(self, request: Request) -> Response:
        document = self.api._body(request, {"token", "csr"})
        token = document.get("token")
        if not isinstance(token, str) or not token or len(token) > 256:
            raise UsageError("token is missing: give the join token from keyseal entry join-token")
        # The token first, read only: one nobody issued costs neither a signature check nor a write.
        # Everything that can fail (a running agent, the registry, the CSR, the signature) happens before the
        # token is spent, so only a join that is answered with an SVID redeems it.
        now = self.api.manager.clock()
        agent_id = self.tokens.lookup(token, now)
        answer: dict[str, Any] | None = None
        if agent_id is not None:
            answer = self._issue(agent_id, document.get("csr"), self.api.config.x509_ttl)
            if self.tokens.redeem(token, now) != agent_id:  # another request redeemed it meanwhile
                answer = None
        if agent_id is None or answer is None:
            log.warning("refused an agent join from %s: unknown, used or expired join token", request.peer)
            raise self._refuse(401, "unauthenticated", "the join token is unknown, used or expired: issue a new one")
        self._note_agent_svid(agent_id, answer)
        log.info("agent %s joined from %s", agent_id, request.peer)
        return self._json({**answer, "bundle": self._bundle()})

    def attest_k8s_psat(self, request: Request) -> Response:
        """Join with a projected service account token, checked by the API server (ca.registry.psat)."""
        from keyseal._internal.ca.registry.psat import NodeRefusedError

        document = self.api._body(request, {"token", "csr"})
        token = document.get("token")
        if not isinstance(token, str) or not token or len(token) > 16384:
            raise UsageError("token is missing: send the agent's projected service account token")
        attestor = self.psat
        if attestor is None:
            raise self._refuse(404, "not_found", "this server does not attest nodes with Kubernetes service "
                                                 "account tokens (kubernetes.nodeAttestation.enabled)")
        parse_csr(document.get("csr"))  # type: ignore[arg-type]  # local and cheap: before the API server's call
        try:
            node = attestor.attest(token)
        except NodeRefusedError as exc:
            log.warning("refused a k8s_psat join from %s: %s", request.peer, loggable(exc.message, 300))
            raise self._refuse(401, "unauthenticated", "the service account token does not attest an agent of "
                                                       "this cluster; see the server log") from exc
        except KeysealError as exc:  # the Kubernetes API cannot be reached, or refuses the server
            log.error("cannot attest a k8s_psat join from %s: %s", request.peer, loggable(exc.message, 300))
            raise self._refuse(503, "unavailable", "the Kubernetes API could not check the token; see the "
                                                   "server log") from exc
        answer = self._issue(node.agent_id, document.get("csr"), self.api.config.x509_ttl)
        self._note_agent_svid(node.agent_id, answer)
        log.info("agent %s joined from %s (k8s_psat: %s)", node.agent_id, request.peer, " ".join(node.selectors))
        return self._json({**answer, "selectors": list(node.selectors), "bundle": self._bundle()})

    @property
    def psat(self) -> PsatAttestor | None:
        """The node attestor when kubernetes.nodeAttestation is on, made at the first join."""
        k8s = self.api.config.kubernetes
        if k8s is None or not k8s.node_attestation:
            return None
        if self._psat is None:
            from keyseal._internal.ca.registry.psat import PsatAttestor
            from keyseal._internal.providers.kubernetes.client import api_client_from_environment

            client = self.api.kube_api_client or api_client_from_environment(k8s.api_server
                                                                         or self.api.config.kube_api_server)
            self._psat = PsatAttestor(k8s, self.api.config.trust_domain, client)
        return self._psat

    def renew(self, request: Request) -> Response:
        """A new agent SVID for the agent of the connection's SVID. A join-token agent renews on its SVID alone;
        an agent attested by its service account token (k8s_psat) is attested again: it sends the token as the
        kubelet has rotated it, checked as at its join, and the node it attests must be the one in the agent's
        SPIFFE ID. So an agent whose node is gone, or a stolen agent SVID used away from that node's agent pod,
        renews no more: it lasts until its SVID expires (x509SVID.ttl)."""
        agent_id = self._agent(request)
        document = self.api._body(request, {"csr", "token"})
        psat = _is_psat_agent(self.api.config.trust_domain, agent_id)
        if not psat and "token" in document:
            raise UsageError("token: only agents attested by their service account token (k8s_psat) renew with one")
        if psat:
            parse_csr(document.get("csr"))  # type: ignore[arg-type]  # local and cheap: before the API server's call
            self._reattest(agent_id, document.get("token"), request)
        answer = self._issue(agent_id, document.get("csr"), self.api.config.x509_ttl)
        self._note_agent_svid(agent_id, answer)
        return self._json({**answer, "bundle": self._bundle()})

    def _reattest(self, agent_id: str, token: object, request: Request) -> None:
        """Attest a k8s_psat agent again at its renewal (see `renew`): 401 unless the token attests its node."""
        from keyseal._internal.ca.registry.psat import NodeRefusedError

        def refuse(reason: str) -> Exception:
            log.warning("refused the renewal of k8s_psat agent %s from %s: %s", agent_id, request.peer,
                        loggable(reason, 300))
            return self._refuse(401, "unauthenticated", "the renewal of an agent attested by its service account "
                                                        "token needs a fresh token that attests the agent's node "
                                                        "again; see the server log")

        if not isinstance(token, str) or not token or len(token) > 16384:
            raise refuse("it sent no service account token (an agent renews with a fresh one)")
        attestor = self.psat
        if attestor is None:
            raise refuse("this server does not attest nodes with service account tokens "
                         "(kubernetes.nodeAttestation.enabled)")
        try:
            node = attestor.attest(token)
        except NodeRefusedError as exc:
            raise refuse(exc.message) from exc
        except KeysealError as exc:  # the Kubernetes API cannot be reached, or refuses the server
            log.error("cannot attest the renewal of k8s_psat agent %s from %s: %s", agent_id, request.peer,
                      loggable(exc.message, 300))
            raise self._refuse(503, "unavailable", "the Kubernetes API could not check the token; see the "
                                                   "server log") from exc
        if node.agent_id != agent_id:
            raise refuse(f"the token attests {node.agent_id}, another node (or the node was made again under its "
                         f"name)")

    def _note_agent_svid(self, agent_id: str, answer: dict[str, Any]) -> None:
        """Remember until when the agent holds an SVID (join tokens for it are refused until then). A failure is
        logged, not answered: the agent has its SVID, and refusing a renewal would not take it back."""
        registry = self.tokens.registry
        if registry is None:
            return
        expires = datetime.strptime(answer["expiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        try:
            registry.issued(agent_id, expires)
        except KeysealError as exc:
            log.error("could not record the SVID of agent %s (a join token for it would not be refused until it "
                      "expires): %s", agent_id, exc.message)

    def sync(self, request: Request) -> Response:
        """The agent's entries and the bundle. With `revision` (what an earlier answer said), only the parts that
        changed since: an agent that is current gets an answer without either. The revision is a digest of
        the agent's own entries and of the bundle, so every replica that holds the same entries gives the same
        one, and costs O(the agent's entries) to check whatever the total (see docs/server-api.md)."""
        agent_id = self._agent(request)
        held = self.api._body(request, {"revision"}).get("revision")
        if held is not None and (not isinstance(held, str) or len(held) > 200):
            raise UsageError("revision must be the string an earlier sync answered")
        entries = self.entries.for_agent(agent_id)
        bundle, bundle_tag = self._bundle_tagged()
        federation = self.api.federation
        federated = federation.documents({t for e in entries for t in e.federates_with}) if federation else {}
        if federated:  # the bundle part covers the foreign bundles this agent gets, or their updates would be missed
            bundle_tag = hashlib.sha256(
                (bundle_tag + json.dumps(federated, sort_keys=True)).encode()).hexdigest()[:32]
        entries_tag = entries_digest(entries)
        held_entries, _, held_bundle = (held or "").partition(".")
        answer: dict[str, Any] = {"agentID": agent_id, "revision": f"{entries_tag}.{bundle_tag}"}
        if held is None or held_entries != entries_tag:
            answer["entries"] = [e.to_json() for e in entries]
        if held is None or held_bundle != bundle_tag:
            answer["bundle"] = bundle
            answer["federatedBundles"] = federated
        return self._json(answer)

    def x509_svid(self, request: Request) -> Response:
        agent_id = self._agent(request)
        document = self.api._body(request, {"entryID", "csr"})
        entry = self._entry(agent_id, document, request)
        ttl = self.api.config.x509_ttl
        if entry.x509_ttl:
            ttl = min(ttl, timedelta(seconds=entry.x509_ttl))
        return self._json(self._issue(entry.spiffe_id, document.get("csr"), ttl, entry.dns_names))

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
                                        self.api.manager.clock(), ttl, self.api.config.jwt_issuer)
        self.api.metrics.issued("jwt")
        return self._json({"spiffeID": entry.spiffe_id, "token": token, "expiresAt": format_time(expires)})


_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PSAT_RE = re.compile(r"k8s_psat/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/[A-Za-z0-9-]{1,64}")


def _is_psat_agent(trust_domain: str, agent_id: str) -> bool:
    """Whether an agent ID (already checked by `_agent_name`) is one of the agents attested by service account
    tokens: spiffe://<td>/keyseal/agent/k8s_psat/<cluster>/<node-uid>."""
    return agent_id.startswith(f"spiffe://{trust_domain}{AGENT_PATH}/k8s_psat/")


def _agent_name(rest: str) -> bool:
    """What follows /keyseal/agent/ in an agent's SPIFFE ID: a join token's agent name, or
    k8s_psat/<cluster>/<node-uid> for an agent attested by its service account token."""
    return _NAME_RE.fullmatch(rest) is not None or _PSAT_RE.fullmatch(rest) is not None


def agent_routes(api: Api) -> dict[str, tuple[str, Callable[[Request], Response]]]:
    """The agent endpoints, for Api's route table."""
    agents = AgentApi(api)
    api.closers.append(agents.close)
    return {
        "/v1/agent/join": ("POST", agents.join),
        "/v1/agent/attest/k8s_psat": ("POST", agents.attest_k8s_psat),
        "/v1/agent/renew": ("POST", agents.renew),
        "/v1/agent/sync": ("POST", agents.sync),
        "/v1/agent/x509-svid": ("POST", agents.x509_svid),
        "/v1/agent/jwt-svid": ("POST", agents.jwt_svid),
    }
