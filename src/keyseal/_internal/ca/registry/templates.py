"""Registration entries from IdentityTemplate resources (cluster-scoped, keyseal.dev/v1), in the spirit of SPIRE's
ClusterSPIFFEID: no entry per pod by hand.

    apiVersion: keyseal.dev/v1
    kind: IdentityTemplate
    metadata: {name: default}
    spec:
      spiffeIDTemplate: "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
      podSelector: {matchLabels: {...}, matchExpressions: [...]}        # optional: every pod
      namespaceSelector: {matchLabels: {...}, matchExpressions: [...]}  # optional: every namespace
      dnsNameTemplates:   # optional: DNS SANs of the pod's X.509-SVIDs, in the same syntax
        - "{{ .PodSpec.ServiceAccountName }}.{{ .PodMeta.Namespace }}.svc"
      x509SVIDTTL: 3600   # optional, seconds
      jwtSVIDTTL: 300

The template language is a small subset of Go templates: `{{ .Field }}` with the fields TrustDomain, ClusterName,
PodMeta.Namespace, PodMeta.Name, PodMeta.UID, PodSpec.ServiceAccountName and PodSpec.NodeName; nothing else (no
functions, no pipelines). A template that gives no valid workload SPIFFE ID for any pod (checked with harmless
sample values: outside the trust domain, under the reserved /keyseal path, an unknown field) is a template error
and gives no entries. Each of `dnsNameTemplates` must render to an RFC 1123 host name (no wildcards, see
ca.registry.entries.check_dns_name), checked the same way. A pod whose own values make an invalid or reserved ID (a
pod or namespace named `keyseal` in `/{{ .PodMeta.Namespace }}/...`) or an invalid DNS name is skipped alone:
counted in `status.podsSkipped`, the first one's reason in `status.podError`; the template's other pods keep their
entries.

Mirror pods (annotation `kubernetes.io/config.mirror`: a kubelet's static pods, which it may create in any
namespace) get no entry unless the template sets `includeMirrorPods: true`.

The server runs a reconciler every `kubernetes.identityTemplates.interval`: for every running pod the templates
select on a node that exists, one RegistrationEntry with selectors k8s:ns:<ns> and k8s:pod-uid:<uid>, parented
by the agent of the pod's node (spiffe://<td>/keyseal/agent/k8s_psat/<cluster>/<node-uid>), so only that node's
agent is ever given it. Entries it makes are labelled `keyseal.dev/managed-by: identity-templates`; it creates,
replaces and deletes only entries with that label and this server's record prefix, so hand-written entries are
never touched. A deleted pod's entry is deleted at the next pass. Each template's status says how many pods it
selected and the template error, if any.

Several server replicas may reconcile at once: creates of the same entry are the same object (409 is taken as
done) and deletes of a gone one are 404, so they agree without a leader.

RBAC: list pods, nodes, namespaces; list identitytemplates and patch identitytemplates/status; list, create,
update, delete registrationentries in the store's namespace (the store's own role).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from keyseal._internal.ca.k8s_config import K8sConfig
from keyseal._internal.ca.registry.entries import MAX_DNS_NAMES, check_dns_names
from keyseal._internal.ca.registry.kubernetes import ENTRIES, ENTRY_KIND, entry_id_for
from keyseal._internal.ca.registry.psat import agent_id_of
from keyseal._internal.providers.kubernetes.client import GROUP, REQUEST_TIMEOUT, VERSION, kubernetes_client
from keyseal._internal.providers.kubernetes.errors import api_failures, is_client_error, status_of
from keyseal._internal.spiffe.ids import SpiffeIdError, is_reserved, parse_spiffe_id
from keyseal.errors import KeysealError, UsageError

__all__ = ["MANAGED_BY", "TEMPLATES", "TemplateError", "TemplateReconciler", "render_template", "selects"]

log = logging.getLogger(__name__)

TEMPLATES = "identitytemplates"
MANAGED_BY = "keyseal.dev/managed-by"
MANAGER = "identity-templates"
TEMPLATE_LABEL = "keyseal.dev/template"
POD_FIELDS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
_FIELD_RE = re.compile(r"\{\{\s*\.([A-Za-z.]+)\s*\}\}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")


class TemplateError(KeysealError):
    """An IdentityTemplate that cannot give a valid SPIFFE ID (reported in its status)."""


def render_template(template: str, fields: dict[str, str], where: str = "spiffeIDTemplate") -> str:
    def field(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fields:
            raise TemplateError(f"unknown template field .{name}: use one of "
                                f"{', '.join('.' + f for f in sorted(fields))}")
        value = fields[name]
        if not _SEGMENT_RE.fullmatch(value):
            raise TemplateError(f".{name} is {value[:80]!r}, not a SPIFFE ID path segment")
        return value

    rendered = _FIELD_RE.sub(field, template)
    if "{{" in rendered or "}}" in rendered:
        raise TemplateError(f"only {{{{ .Field }}}} is supported in {where}")
    return rendered


def selects(selector: Any, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist); absent: all."""
    if selector is None:
        return True
    if not isinstance(selector, dict):
        raise TemplateError("a selector must be a LabelSelector (matchLabels, matchExpressions)")
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        if not isinstance(expression, dict):
            raise TemplateError("matchExpressions must be a list of {key, operator, values}")
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        if operator == "In":
            ok = labels.get(str(key)) in values
        elif operator == "NotIn":
            ok = labels.get(str(key)) not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise TemplateError(f"matchExpressions operator {str(operator)[:20]!r} is not In, NotIn, Exists or "
                                f"DoesNotExist")
        if not ok:
            return False
    return True


MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
# Harmless values for every field: a template that fails with them fails for every pod (a template error); one
# that fails only for some pods (a pod named "keyseal" in ".../{{ .PodMeta.Name }}") skips those pods.
_SAMPLE = {"PodMeta.Namespace": "namespace", "PodMeta.Name": "name", "PodMeta.UID": "uid",
           "PodSpec.ServiceAccountName": "account", "PodSpec.NodeName": "node"}


@dataclass
class _Stats:
    pods: int = 0
    entries: int = 0
    error: str = ""
    skipped: int = 0
    pod_error: str = ""  # the first skipped pod's, as "<namespace>/<name>: <why>"


class TemplateReconciler:
    """Keeps the managed RegistrationEntry resources in step with pods and templates (module docstring)."""

    def __init__(self, config: K8sConfig, trust_domain: str, record_prefix: str, namespace: str,
                 api_client: Any) -> None:
        self.config, self.trust_domain, self.prefix, self.namespace = config, trust_domain, record_prefix, namespace
        self.api_client = api_client
        client = kubernetes_client()
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    # -- reading ----------------------------------------------------------------------------------------------

    def _items(self, call: Any, *args: Any, **options: Any) -> list[dict[str, Any]]:
        """Every item of a list call, as raw JSON (the API's own documents, no client models)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            if token:
                options["_continue"] = token
            response = call(*args, limit=500, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **options)
            document = json.loads(response.data)
            items.extend(i for i in document.get("items") or [] if isinstance(i, dict))
            token = (document.get("metadata") or {}).get("continue") or ""
            if not token:
                return items

    def _managed(self) -> dict[str, dict[str, Any]]:
        found = self._items(self._custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, ENTRIES,
                            label_selector=f"{MANAGED_BY}={MANAGER}")
        mine = re.compile(re.escape(self.prefix) + r"-entry-[0-9a-f]{16}")
        return {str(o["metadata"]["name"]): o for o in found
                if ((o.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) == MANAGER
                and mine.fullmatch(str((o.get("metadata") or {}).get("name", "")))}

    # -- the desired entries ----------------------------------------------------------------------------------

    def _desired(self, templates: list[dict[str, Any]], pods: list[dict[str, Any]],
                 node_uids: dict[str, str], namespaces: dict[str, dict[str, str]]
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, _Stats]]:
        desired: dict[str, dict[str, Any]] = {}
        stats: dict[str, _Stats] = {}
        for template in sorted(templates, key=lambda t: str(t["metadata"]["name"])):
            name = str(template["metadata"]["name"])
            stat = stats[name] = _Stats()
            spec = template.get("spec") or {}
            try:
                self._check(spec)
            except TemplateError as exc:
                stat.error = exc.message
                log.warning("identity template %s: %s", name, exc.message)
                continue
            for pod in pods:
                try:
                    body = self._entry_for(name, spec, pod, node_uids, namespaces)
                except TemplateError as exc:
                    metadata = pod.get("metadata") or {}
                    where = f"{metadata.get('namespace')}/{metadata.get('name')}"
                    stat.skipped += 1
                    stat.pod_error = stat.pod_error or f"{where}: {exc.message}"
                    log.warning("identity template %s: pod %s: %s", name, where, exc.message)
                    continue
                if body is None:
                    continue
                stat.pods += 1
                stat.entries += 1
                desired.setdefault(body["metadata"]["name"], body)
        return desired, stats

    def _check(self, spec: dict[str, Any]) -> None:
        """The template's own errors, the same for every pod: its selectors, TTLs and a sample rendering."""
        for key in ("podSelector", "namespaceSelector"):
            selector = spec.get(key)
            if selector is None:
                continue
            if not isinstance(selector, dict) or not isinstance(selector.get("matchLabels") or {}, dict) \
                    or not isinstance(selector.get("matchExpressions") or [], list):
                raise TemplateError(f"spec.{key} must be a LabelSelector (matchLabels, matchExpressions)")
            for expression in selector.get("matchExpressions") or []:  # each alone: every operator is checked
                selects({"matchExpressions": [expression]}, {})
        include = spec.get("includeMirrorPods", False)
        if not isinstance(include, bool):
            raise TemplateError("spec.includeMirrorPods must be true or false")
        self._rendered(spec, {"TrustDomain": self.trust_domain, "ClusterName": self.config.cluster, **_SAMPLE})

    def _rendered(self, spec: dict[str, Any], fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """The SPIFFE ID and the rest of the entry's spec (TTLs, DNS names) the template gives for these fields."""
        template_text = spec.get("spiffeIDTemplate")
        if not isinstance(template_text, str) or not template_text:
            raise TemplateError("spec.spiffeIDTemplate is missing")
        try:
            spiffe_id = parse_spiffe_id(render_template(template_text, fields))
        except SpiffeIdError as exc:
            raise TemplateError(f"the template gives no SPIFFE ID: {exc.message}") from exc
        if spiffe_id.trust_domain != self.trust_domain or not spiffe_id.path or is_reserved(spiffe_id.path):
            raise TemplateError(f"{spiffe_id} is not a workload SPIFFE ID of trust domain {self.trust_domain}")
        ttls = {}
        for key in ("x509SVIDTTL", "jwtSVIDTTL"):
            value = spec.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 366 * 24 * 3600:
                    raise TemplateError(f"spec.{key} must be whole seconds, at most a year")
                ttls[key] = value
        dns_names = self._dns_names(spec, fields)
        return str(spiffe_id), ({**ttls, "dnsNames": list(dns_names)} if dns_names else ttls)

    @staticmethod
    def _dns_names(spec: dict[str, Any], fields: dict[str, str]) -> tuple[str, ...]:
        templates = spec.get("dnsNameTemplates")
        if templates is None:
            return ()
        if not isinstance(templates, list) or not all(isinstance(t, str) and t for t in templates) \
                or len(templates) > MAX_DNS_NAMES:
            raise TemplateError(f"spec.dnsNameTemplates must be a list of at most {MAX_DNS_NAMES} templates")
        rendered = []
        for number, text in enumerate(templates):
            rendered.append(render_template(text, fields, f"spec.dnsNameTemplates[{number}]"))
        try:
            return check_dns_names(tuple(rendered))
        except UsageError as exc:
            raise TemplateError(f"spec.dnsNameTemplates gives {exc.message}") from exc

    def _entry_for(self, template: str, spec: dict[str, Any], pod: dict[str, Any], node_uids: dict[str, str],
                   namespaces: dict[str, dict[str, str]]) -> dict[str, Any] | None:
        metadata, pod_spec = pod.get("metadata") or {}, pod.get("spec") or {}
        namespace = str(metadata.get("namespace") or "")
        if not selects(spec.get("namespaceSelector"), namespaces.get(namespace, {})):
            return None
        if not selects(spec.get("podSelector"), metadata.get("labels") or {}):
            return None
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return None  # finished: its containers are gone
        if MIRROR_ANNOTATION in (metadata.get("annotations") or {}) and spec.get("includeMirrorPods") is not True:
            return None  # a static pod's mirror: its kubelet alone made it, in any namespace it chose
        node_uid = node_uids.get(str(pod_spec.get("nodeName") or ""))
        if node_uid is None:
            return None  # not scheduled yet, or its node is gone: no agent could be given the entry
        fields = {"TrustDomain": self.trust_domain, "ClusterName": self.config.cluster,
                  "PodMeta.Namespace": namespace, "PodMeta.Name": str(metadata.get("name") or ""),
                  "PodMeta.UID": str(metadata.get("uid") or ""),
                  "PodSpec.ServiceAccountName": str(pod_spec.get("serviceAccountName") or "default"),
                  "PodSpec.NodeName": str(pod_spec.get("nodeName") or "")}
        spiffe_id, rest = self._rendered(spec, fields)
        parent = agent_id_of(self.trust_domain, self.config.cluster, node_uid)
        selectors = tuple(sorted((f"k8s:ns:{namespace}", f"k8s:pod-uid:{fields['PodMeta.UID']}")))
        entry_id = entry_id_for(spiffe_id, parent, selectors)
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": ENTRY_KIND,
                "metadata": {"name": f"{self.prefix}-entry-{entry_id}", "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/part-of": "keyseal", MANAGED_BY: MANAGER,
                                        TEMPLATE_LABEL: template[:63].rstrip(".-")}},
                "spec": {"spiffeID": spiffe_id, "parentID": parent, "selectors": list(selectors), **rest}}

    # -- one pass ---------------------------------------------------------------------------------------------

    def reconcile(self) -> dict[str, _Stats]:
        """Read templates, pods, nodes (and namespaces), then create, replace and delete managed entries."""
        templates = self._items(self._custom.list_cluster_custom_object, GROUP, VERSION, TEMPLATES)
        # Scheduled pods that have not finished, from the API server's watch cache (resourceVersion 0): a pass
        # costs the API server no read from etcd.
        pods = self._items(self._core.list_pod_for_all_namespaces, resource_version="0",
                           field_selector=POD_FIELDS) if templates else []
        nodes = self._items(self._core.list_node) if templates else []
        node_uids = {str(n["metadata"]["name"]): str(n["metadata"].get("uid") or "") for n in nodes}
        namespaces: dict[str, dict[str, str]] = {}
        if any((t.get("spec") or {}).get("namespaceSelector") for t in templates):
            namespaces = {str(n["metadata"]["name"]): (n["metadata"].get("labels") or {})
                          for n in self._items(self._core.list_namespace)}
        desired, stats = self._desired(templates, pods, node_uids, namespaces)
        existing = self._managed()
        for name, body in desired.items():
            current = existing.get(name)
            if current is None:
                self._create(body)
            elif current.get("spec") != body["spec"]:
                body["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
                self._write("replace", self._custom.replace_namespaced_custom_object, GROUP, VERSION,
                            self.namespace, ENTRIES, name, body)
        for name in sorted(set(existing) - set(desired)):
            self._write("delete", self._custom.delete_namespaced_custom_object, GROUP, VERSION, self.namespace,
                        ENTRIES, name)
        for template in templates:
            self._status(template, stats.get(str(template["metadata"]["name"]), _Stats()))
        self.passes += 1
        return stats

    def _create(self, body: dict[str, Any]) -> None:
        self._write("create", self._custom.create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                    ENTRIES, body)

    def _write(self, verb: str, call: Any, *args: Any) -> None:
        try:
            call(*args, _request_timeout=REQUEST_TIMEOUT)
        except api_failures() as exc:
            if status_of(exc) in (404, 409):
                return  # another replica got there first (or the entry changed meanwhile: next pass)
            log.warning("identity templates: cannot %s a registration entry (%s)", verb,
                        status_of(exc) or type(exc).__name__)

    def _status(self, template: dict[str, Any], stat: _Stats) -> None:
        status = {"podsSelected": stat.pods, "entries": stat.entries, "error": stat.error,
                  "podsSkipped": stat.skipped, "podError": stat.pod_error}
        if template.get("status") == status:
            return
        self._write("update the status of", self._custom.patch_cluster_custom_object_status, GROUP, VERSION,
                    TEMPLATES, template["metadata"]["name"], {"status": status})

    # -- the loop ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="keyseal-identity-templates", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = self.config.template_interval.total_seconds()
        while True:
            try:
                self.reconcile()
            except Exception as exc:
                if not is_client_error(exc) and not isinstance(exc, KeysealError | ValueError):
                    log.exception("identity templates: the pass failed")
                else:
                    log.warning("identity templates: the pass failed (%s); retrying in %.0fs",
                                status_of(exc) if is_client_error(exc) else exc, interval)
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
