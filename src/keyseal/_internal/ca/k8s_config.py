"""The server's `kubernetes` configuration section: node attestation with projected service account tokens
(ca.registry.psat) and registration entries from IdentityTemplate resources (ca.registry.templates).

    kubernetes:
      cluster: prod                    # the cluster's name in agent SPIFFE IDs (.../k8s_psat/<cluster>/<node-uid>)
      apiServer: https://...           # optional; else store.kubernetes.apiServer, else in-cluster
      nodeAttestation:
        enabled: true
        audience: keyseal-server       # the audience of the agents' projected tokens
        serviceAccounts: [keyseal/keyseal-agent]   # namespace/name of the agent DaemonSet's service account
      identityTemplates:
        enabled: true
        interval: 2s                   # how often pods, nodes and templates are read again
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from keyseal.errors import UsageError

if TYPE_CHECKING:
    from keyseal._internal.ca.sections import _Section

__all__ = ["K8sConfig", "parse_kubernetes_section"]

_CLUSTER_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_SERVICE_ACCOUNT_RE = re.compile(rf"{_DNS_LABEL}/[a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?")
_AUDIENCE_RE = re.compile(r"[\x21-\x7e]{1,256}")


@dataclass(frozen=True)
class K8sConfig:
    cluster: str
    api_server: str | None = None
    node_attestation: bool = False
    audience: str = "keyseal-server"
    service_accounts: tuple[str, ...] = ()
    templates: bool = False
    template_interval: timedelta = timedelta(seconds=2)


def parse_kubernetes_section(section: _Section, store_type: str = "kubernetes") -> K8sConfig | None:
    """None when the section is absent; else the checked settings (an unknown key is an error)."""
    from keyseal._internal.durations import parse_duration

    if not section.data:
        section.done()
        return None
    cluster = section.text("cluster") or ""
    if not _CLUSTER_RE.fullmatch(cluster):
        raise UsageError(f"{section.key('cluster')}={cluster[:80]!r}: name the cluster with 1-63 lower-case letters, "
                         f"digits and '-' (it is part of every agent's SPIFFE ID)")
    api_server = section.text("apiServer")
    nodes = section.section("nodeAttestation")
    node_attestation = _flag(nodes.get("enabled"), nodes.key("enabled"))
    audience = nodes.text("audience", "keyseal-server") or "keyseal-server"
    if not _AUDIENCE_RE.fullmatch(audience):
        raise UsageError(f"{nodes.key('audience')} must be 1-256 printable characters without spaces")
    accounts = nodes.strings("serviceAccounts")
    for account in accounts:
        if not _SERVICE_ACCOUNT_RE.fullmatch(account):
            raise UsageError(f"{nodes.key('serviceAccounts')}: {account[:80]!r} is not NAMESPACE/NAME of a "
                             f"service account")
    if node_attestation and not accounts:
        raise UsageError(f"{nodes.key('serviceAccounts')} is empty: name the agent DaemonSet's service account "
                         f"(namespace/name); any pod can ask for a token with the server's audience, so only "
                         f"the agents' service account may join")
    nodes.done()
    templates = section.section("identityTemplates")
    templates_on = _flag(templates.get("enabled"), templates.key("enabled"))
    interval = parse_duration(templates.get("interval") or "2s", templates.key("interval"))
    if interval > timedelta(minutes=10):
        raise UsageError(f"{templates.key('interval')} is at most 10m (pods get their entries that late)")
    templates.done()
    section.done()
    if templates_on and store_type != "kubernetes":
        raise UsageError(f"{templates.key('enabled')} needs store.type kubernetes: the entries it makes are "
                         f"RegistrationEntry resources")
    return K8sConfig(cluster, api_server, node_attestation, audience, accounts, templates_on, interval)


def _flag(value: object, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UsageError(f"{where} must be true or false")
    return value
