"""The trust bundle in a ConfigMap, so a node agent can verify the server on its first contact.

An agent sends its join token only to a server it has verified, so it needs the server's CA certificates
before it has talked to the server. In a cluster the server writes its bundle (the SPIFFE bundle document,
every live keyset: prepared, active and old) as `bundle.json` into a ConfigMap the chart creates, through the
Kubernetes API; the kubelet mounts that ConfigMap into the agent pods (agent `trustBundleFile`). The trust
anchor therefore travels through the API server, authenticated and authorized, never over the network path
the agent is about to verify: there is no trust on first use. Whoever may update that ConfigMap can point
agents at another server, so the server's Role names it alone (resourceNames) and namespace admins are
trusted anyway.

Writes are conditional on `metadata.resourceVersion`, and the ConfigMap only moves forward: a replica writes
its bundle only if its `spiffe_sequence` is strictly higher than the stored one's. An equal sequence never
overwrites, even with other bytes: during a rollout, replicas whose configuration differs (refresh hint, CA
lifetime) may publish different bytes, and letting each overwrite the other made the agents' bundle flap at
every publication. (The sequence itself is the bundle's, keyseal._internal.ca.bundle; it is not decided here.)
RBAC: get, update on that one ConfigMap. The server never creates it (create cannot be limited to a name).
Enabled by the environment variable `KEYSEAL_BUNDLE_CONFIGMAP` (the ConfigMap's name, in the pod's namespace).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from keyseal._internal.ca.bundle import bundle_document
from keyseal._internal.providers.kubernetes.client import (
    REQUEST_TIMEOUT,
    api_client_from_environment,
    kubernetes_client,
    resolve_namespace,
)
from keyseal._internal.providers.kubernetes.errors import api_failures, status_of, translate_api_error
from keyseal.errors import KeysealError, UsageError

if TYPE_CHECKING:
    from keyseal._internal.ca.custody.keyset import Keyset

__all__ = ["BUNDLE_KEY", "ENVIRONMENT", "BundleConfigMap"]

log = logging.getLogger(__name__)

ENVIRONMENT = "KEYSEAL_BUNDLE_CONFIGMAP"
BUNDLE_KEY = "bundle.json"
ATTEMPTS = 3
RECHECK_SECONDS = 60.0  # an unchanged bundle is compared with the stored one this often (a tick is every 5 s)


class BundleConfigMap:
    """Keeps `bundle.json` in one ConfigMap equal to the server's bundle."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        self.api = kubernetes_client().CoreV1Api(api_client)
        self.namespace, self.name = namespace, name
        self._failing = False
        self._ahead_reported = False
        self._equal_reported = False
        self._confirmed: tuple[str, float] | None = None  # the text known to be stored, and when

    @classmethod
    def from_environment(cls, api_client: Any = None, api_server: str | None = None) -> BundleConfigMap | None:
        """The publisher $KEYSEAL_BUNDLE_CONFIGMAP names, or None when it is not set."""
        name = os.environ.get(ENVIRONMENT, "").strip()
        if not name:
            return None
        client = api_client if api_client is not None else api_client_from_environment(api_server)
        return cls(client, resolve_namespace(None, f"the ConfigMap {name}"), name)

    @property
    def where(self) -> str:
        return f"configmap {self.namespace}/{self.name}"

    def publish(self, keysets: Sequence[Keyset], refresh_hint: timedelta,
                document: dict[str, Any] | None = None) -> bool:
        """Write the bundle of these keysets (or `document`, the bundle as served) if its sequence is strictly
        newer than the stored one's; True when it wrote."""
        document = document if document is not None else bundle_document(keysets, refresh_hint)
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        confirmed = self._confirmed
        if confirmed is not None and confirmed[0] == text and time.monotonic() - confirmed[1] < RECHECK_SECONDS:
            return False
        for _ in range(ATTEMPTS):
            current = self._call("get", self.api.read_namespaced_config_map, self.name, self.namespace)
            data = dict(current.data or {})
            stored = data.get(BUNDLE_KEY)
            if stored == text:
                self._confirmed = (text, time.monotonic())
                return False
            if _sequence(stored) == document["spiffe_sequence"]:
                self._confirmed = (text, time.monotonic())  # as new as ours: left alone until ours is newer
                if not self._equal_reported:
                    self._equal_reported = True
                    log.info("%s holds another bundle with this server's sequence %d (a replica with another "
                             "configuration, e.g. during a rollout): left as it is", self.where,
                             document["spiffe_sequence"])
                return False
            if _sequence(stored) > document["spiffe_sequence"]:
                self._confirmed = None
                if not self._ahead_reported:  # another replica has seen a newer keyset (this one catches up at
                    self._ahead_reported = True  # its next refresh), or someone wrote the ConfigMap by hand
                    log.warning("%s holds bundle sequence %d, ahead of this server's %d: left as it is; if no "
                                "replica has made that keyset, the ConfigMap was written by someone else and "
                                "agents trust it: check it", self.where, _sequence(stored),
                                document["spiffe_sequence"])
                return False
            data[BUNDLE_KEY] = text
            current.data = data
            try:
                self._call("update", self.api.replace_namespaced_config_map, self.name, self.namespace, current)
            except _Conflict:
                continue
            self._confirmed = (text, time.monotonic())
            log.info("published the trust bundle (sequence %d) to %s", document["spiffe_sequence"], self.where)
            return True
        raise KeysealError(f"{self.where} kept changing while keyseal tried to write the bundle: try again")

    def publish_logged(self, keysets: Sequence[Keyset], refresh_hint: timedelta,
                       document: dict[str, Any] | None = None) -> None:
        """`publish`, with a failure logged (once until it works again) instead of raised: serving goes on."""
        try:
            self.publish(keysets, refresh_hint, document)
        except KeysealError as exc:
            if not self._failing:
                log.error("cannot publish the trust bundle to %s: %s", self.where, exc.message)
            self._failing = True
            return
        if self._failing:
            log.info("the trust bundle is published to %s again", self.where)
        self._failing = False

    def _call(self, verb: str, method: Any, *args: Any) -> Any:
        try:
            return method(*args, _request_timeout=REQUEST_TIMEOUT)
        except api_failures() as exc:
            if status_of(exc) == 409:
                raise _Conflict from exc
            missing = UsageError(f"{self.where} does not exist: create it (the Helm chart does when agent.enabled) "
                                 f"or unset {ENVIRONMENT}")
            raise translate_api_error(
                exc, f"{verb} {self.where}", statuses={404: missing},
                grant=f"get and update on configmaps with resourceNames [{self.name}] in namespace {self.namespace}",
            ) from exc


class _Conflict(Exception):
    """The ConfigMap changed since it was read (409)."""


def _sequence(text: str | None) -> int:
    """The spiffe_sequence of a stored bundle; -1 when there is none or it is not a bundle."""
    if not text:
        return -1
    try:
        value = json.loads(text).get("spiffe_sequence")
    except (ValueError, AttributeError):
        return -1
    return value if isinstance(value, int) else -1
