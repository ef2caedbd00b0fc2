"""Node attestation with projected service account tokens (PSAT), as SPIRE's `k8s_psat`.

The agent DaemonSet mounts a token the kubelet projects for its pod with the server's audience (short-lived,
rotated by the kubelet) and sends it to POST /v1/agent/attest/k8s_psat. The server never checks the JWT itself:
it asks the API server, which issued it (TokenReview, authentication.k8s.io/v1), with `spec.audiences` set to the
configured audience. Then, in this order, a join is refused unless:

1. the review says authenticated, and `status.audiences` holds the audience (an API server that ignored
   spec.audiences answers none: refused, never taken as "any audience");
2. the user is a configured service account (any pod can ask for a token with any audience, so the audience
   alone proves nothing about being an agent);
3. the token is bound to a pod (`extra` pod-name and pod-uid), and that pod exists now with that uid and that
   service account (a token re-presented after its pod is gone, or for a pod of the same name made since, is
   refused even by an API server that does not check bound objects);
4. the pod runs on a node (spec.nodeName) that exists; if the token names a node (API servers >= 1.30 bind
   node-name and node-uid), it is that same node with that uid: a token whose pod is not on the node it names is
   refused.

The agent's SPIFFE ID is spiffe://<td>/keyseal/agent/k8s_psat/<cluster>/<node-uid>: one per node, stable while
the node object lives, a new one for a node rebuilt under the same name. Expiry is the API server's to check
(an expired token is not authenticated); a token whose own claims name another audience or a past expiry is
refused before the API server is asked, since anyone may call the endpoint. A stolen token that is still valid,
used while its pod runs, joins as that node: the same exposure as SPIRE's k8s_psat; the short token lifetime
bounds it.

The same checks run again at every renewal of the agent's SVID (ca.http.agents `renew`): the agent sends its
token as the kubelet has rotated it, and the node it attests must have the uid in the agent's SPIFFE ID. An agent
whose node was deleted (or made again: another uid), or an agent SVID stolen away from that node's agent pod,
is not renewed: it lasts no longer than its SVID (x509SVID.ttl).

RBAC: create tokenreviews; get pods; get nodes.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from keyseal._internal.ca.k8s_config import K8sConfig
from keyseal._internal.ca.registry.entries import AGENT_PATH
from keyseal._internal.providers.kubernetes.client import REQUEST_TIMEOUT, kubernetes_client
from keyseal._internal.providers.kubernetes.errors import api_failures, status_of, translate_api_error
from keyseal.errors import BackendUnavailableError, KeysealError

__all__ = ["AttestedNode", "NodeRefusedError", "PsatAttestor", "agent_id_of"]

log = logging.getLogger(__name__)

_EXTRA = "authentication.kubernetes.io/"
_JWT_RE = re.compile(r"[A-Za-z0-9_-]{1,8192}\.[A-Za-z0-9_-]{1,8192}\.[A-Za-z0-9_-]{1,8192}")
_UID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_LABEL_RE = re.compile(r"[A-Za-z0-9./_-]{1,317}")
MAX_REVIEWS_IN_FLIGHT = 8
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class NodeRefusedError(KeysealError):
    """The token does not prove the caller is an agent on a node of this cluster (HTTP 401)."""


@dataclass(frozen=True)
class AttestedNode:
    agent_id: str
    selectors: tuple[str, ...]


def agent_id_of(trust_domain: str, cluster: str, node_uid: str) -> str:
    return f"spiffe://{trust_domain}{AGENT_PATH}/k8s_psat/{cluster}/{node_uid}"


def _one(extra: dict[str, Any], key: str) -> str | None:
    values = extra.get(_EXTRA + key)
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) and values[0]:
        return values[0]
    return None


class PsatAttestor:
    """Checks agents' projected tokens with the API server (see the module docstring)."""

    def __init__(self, config: K8sConfig, trust_domain: str, api_client: Any) -> None:
        self.config = config
        self.trust_domain = trust_domain
        self.api_client = api_client
        client = kubernetes_client()
        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._in_flight = threading.BoundedSemaphore(MAX_REVIEWS_IN_FLIGHT)

    def _call(self, what: str, call: Any, *args: Any) -> dict[str, Any] | None:
        """A Kubernetes API call's answer as a JSON dict; None for 404; typed errors for the rest."""
        try:
            answer = call(*args, _request_timeout=REQUEST_TIMEOUT)
        except api_failures() as exc:
            status = status_of(exc)
            if status == 404:
                return None
            if status is not None and status not in (401, 403):  # a failing API server: the node may retry
                raise BackendUnavailableError(f"the Kubernetes API answered {status} to {what}") from exc
            raise translate_api_error(
                exc, what, grant="the server's service account that verb (the chart's ClusterRole does)") from exc
        document: dict[str, Any] = self.api_client.sanitize_for_serialization(answer)
        return document

    def attest(self, token: str) -> AttestedNode:
        if not _JWT_RE.fullmatch(token):
            raise NodeRefusedError("the token is not a JWT (a projected service account token)")
        self._screen(token)
        if not self._in_flight.acquire(timeout=5):
            raise BackendUnavailableError("too many node attestations in progress: try again")
        try:
            return self._attest(token)
        finally:
            self._in_flight.release()

    def _screen(self, token: str) -> None:
        """Refuse, without asking the API server, a token whose own (unverified) claims say it is for another
        audience or expired: anyone may call the join endpoint, and each review costs the API server. This
        decides nothing in the token's favour; TokenReview does."""
        payload = token.split(".")[1]
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError as exc:
            raise NodeRefusedError("the token's claims are not JSON") from exc
        audiences = claims.get("aud") if isinstance(claims, dict) else None
        audiences = [audiences] if isinstance(audiences, str) else audiences
        if not isinstance(audiences, list) or self.config.audience not in audiences:
            raise NodeRefusedError(f"the token is not for audience {self.config.audience!r} (its own claims)")
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires <= time.time():
            raise NodeRefusedError("the token has expired (its own claims)")

    def _attest(self, token: str) -> AttestedNode:
        audience = self.config.audience
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [audience]}}
        review = self._call("create tokenreviews", self._auth.create_token_review, body) or {}
        status = review.get("status") or {}
        if status.get("authenticated") is not True:
            raise NodeRefusedError(f"the API server did not authenticate the token: "
                                   f"{str(status.get('error') or 'no reason given')[:200]}")
        if audience not in (status.get("audiences") or []):
            raise NodeRefusedError(f"the token is not for audience {audience!r}")
        user = status.get("user") or {}
        username = str(user.get("username") or "")
        if not username.startswith(SERVICE_ACCOUNT_PREFIX) or username.count(":") != 3:
            raise NodeRefusedError(f"{username[:120]!r} is not a service account")
        namespace, account = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
        if f"{namespace}/{account}" not in self.config.service_accounts:
            raise NodeRefusedError(f"service account {namespace}/{account} is not an agent's "
                                   f"(kubernetes.nodeAttestation.serviceAccounts)")
        extra = user.get("extra") or {}
        pod_name, pod_uid = _one(extra, "pod-name"), _one(extra, "pod-uid")
        if pod_name is None or pod_uid is None:
            raise NodeRefusedError("the token is not bound to a pod: mount a projected service account token")
        pod = self._call(f"get pod {namespace}/{pod_name}", self._core.read_namespaced_pod, pod_name, namespace)
        metadata = (pod or {}).get("metadata") or {}
        if pod is None or metadata.get("uid") != pod_uid:
            raise NodeRefusedError(f"pod {namespace}/{pod_name} of the token is gone (uid {pod_uid[:40]})")
        spec = pod.get("spec") or {}
        if spec.get("serviceAccountName") != account:
            raise NodeRefusedError(f"pod {namespace}/{pod_name} does not run as service account {account}")
        node_name = spec.get("nodeName")
        if not isinstance(node_name, str) or not node_name:
            raise NodeRefusedError(f"pod {namespace}/{pod_name} is not scheduled on a node")
        claimed_node, claimed_uid = _one(extra, "node-name"), _one(extra, "node-uid")
        if claimed_node is not None and claimed_node != node_name:
            raise NodeRefusedError(f"the token names node {claimed_node[:80]}, but its pod runs on {node_name}")
        node = self._call(f"get node {node_name}", self._core.read_node, node_name)
        if node is None:
            raise NodeRefusedError(f"node {node_name} of pod {namespace}/{pod_name} does not exist")
        node_meta = node.get("metadata") or {}
        node_uid = str(node_meta.get("uid") or "")
        if claimed_uid is not None and claimed_uid != node_uid:
            raise NodeRefusedError(f"the token names node {node_name} with uid {claimed_uid[:40]}, but that node "
                                   f"now has uid {node_uid[:40]}")
        if not _UID_RE.fullmatch(node_uid):
            raise NodeRefusedError(f"node {node_name} has no usable uid")
        selectors = [f"k8s_psat:cluster:{self.config.cluster}", f"k8s_psat:agent_ns:{namespace}",
                     f"k8s_psat:agent_sa:{account}", f"k8s_psat:agent_pod_name:{pod_name}",
                     f"k8s_psat:agent_pod_uid:{pod_uid}", f"k8s_psat:agent_node_name:{node_name}",
                     f"k8s_psat:agent_node_uid:{node_uid}"]
        labels = node_meta.get("labels") or {}
        selectors += sorted(f"k8s_psat:agent_node_label:{k}:{v}" for k, v in labels.items()
                            if isinstance(v, str) and _LABEL_RE.fullmatch(k) and len(v) <= 63)
        return AttestedNode(agent_id_of(self.trust_domain, self.config.cluster, node_uid), tuple(selectors))
