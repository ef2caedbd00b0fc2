"""`kubernetes` store: one namespaced `WrappedKey` custom resource (group keyseal.dev, v1) per record.

The resource's `spec` is the record's fields (deploy/crds/wrappedkeys.keyseal.dev.yaml). Writes are
conditional on `metadata.resourceVersion`: a create fails if the resource exists, a replace fails with 409
Conflict if it changed since it was read; the caller (`RecordStore.update`) then reloads and decides again.
Nothing is ever written without a resourceVersion, so a newer record is never overwritten blindly.

RBAC: get, create, update on wrappedkeys.keyseal.dev in the namespace. Seen versions (rollback protection) are
kept in this process's memory unless a file ledger is given, and, for the server, also in the store itself (a
sealed `keyseal-seen-versions` record every replica reads: `keyseal._internal.wrapping.store_ledger`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.store import RecordStore
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeysealError,
    StoreConflictError,
    UsageError,
    WrappedRecordError,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CustomObjectsApi

GROUP = "keyseal.dev"
VERSION = "v1"
PLURAL = "wrappedkeys"
KIND = "WrappedKey"
API_VERSION = f"{GROUP}/{VERSION}"
REQUEST_TIMEOUT = (5.0, 20.0)  # connect, read (seconds)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _kubernetes() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise UsageError(
            "the Kubernetes store needs the kubernetes client: pip install 'keyseal[k8s]'"
        ) from None
    return kubernetes


def kubernetes_client() -> Any:
    """The `kubernetes.client` module (a clear error when the extra is not installed)."""
    return _kubernetes().client


def api_client_from_environment(host: str | None = None) -> ApiClient:
    """In-cluster service account when running in a pod, else the kubeconfig; `host` overrides the server."""
    kubernetes = _kubernetes()
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        except (kubernetes.config.ConfigException, OSError):
            if host is None:
                raise UsageError(
                    "no Kubernetes configuration: run in a pod with a service account, or set KUBECONFIG"
                ) from None
    if host is not None:
        configuration.host = host
    client: ApiClient = kubernetes.client.ApiClient(configuration)
    return client


def resolve_namespace(configured: str | None, what: str = "keyseal's custom resources") -> str:
    """store.kubernetes.namespace, else $POD_NAMESPACE, else the pod's service account namespace."""
    if configured:
        return configured
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="ascii").strip()
    except OSError:
        raise UsageError(
            f"store.kubernetes.namespace is not set and this is not a pod: set the namespace of {what}"
        ) from None


class KubernetesStore(RecordStore):
    """Records as `WrappedKey` resources in one namespace."""

    def __init__(self, namespace: str, api_client: ApiClient, ledger: VersionLedger | None = None,
                 scope: str = "") -> None:
        super().__init__(ledger if ledger is not None else VersionLedger(), scope)
        kubernetes = _kubernetes()
        self.namespace = namespace
        self._api: CustomObjectsApi = kubernetes.client.CustomObjectsApi(api_client)
        self._server = str(getattr(api_client.configuration, "host", "") or "")

    def location(self, name: str) -> str:
        return f"{PLURAL}.{GROUP} {self.namespace}/{name}"

    def ledger_key(self, name: str) -> str:
        return f"k8s:{self._server}/{self.namespace}/{name}"

    def _get_object(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self._api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            if _status(exc) == 404:
                return None
            raise self._translate(exc, "get", name) from None
        return obj

    def _read(self, name: str) -> tuple[WrappedRecord, str] | None:
        obj = self._get_object(name)
        if obj is None:
            return None
        where = self.location(name)
        record = WrappedRecord.from_dict(obj.get("spec") or {}, where)
        if (obj.get("metadata") or {}).get("name") != name:
            raise WrappedRecordError(f"{where}: the API server answered with another object")
        return record, _resource_version(obj, where)

    def current_revision(self, name: str) -> str | None:
        obj = self._get_object(name)
        return None if obj is None else _resource_version(obj, self.location(name))

    def _write(self, name: str, record: WrappedRecord, expected_revision: str | None) -> str:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if expected_revision is not None:
            metadata["resourceVersion"] = expected_revision
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": record.to_dict()}
        try:
            if expected_revision is None:
                answer = self._api.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body, _request_timeout=REQUEST_TIMEOUT
                )
            else:
                answer = self._api.replace_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, body, _request_timeout=REQUEST_TIMEOUT
                )
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            if _status(exc) == 409:
                raise StoreConflictError(
                    f"{self.location(name)} changed since it was read (409 Conflict): reload it and decide "
                    f"again"
                ) from None
            raise self._translate(exc, "create" if expected_revision is None else "update", name) from None
        return _resource_version(answer, self.location(name))

    def _translate(self, exc: Exception, verb: str, name: str) -> KeysealError:
        status = _status(exc)
        where = self.location(name)
        if status in (401, 403):
            return AccessDeniedError(
                f"the Kubernetes API refused to {verb} {where} ({status}): grant the service account the "
                f"{verb} verb on {PLURAL}.{GROUP} in namespace {self.namespace}"
            )
        if status == 404:
            return UsageError(
                f"the Kubernetes API does not serve {PLURAL}.{GROUP} in namespace {self.namespace}: install "
                f"the CRD (deploy/crds/wrappedkeys.keyseal.dev.yaml) and check the namespace exists"
            )
        if status == 422:
            return UsageError(
                f"the Kubernetes API refused to {verb} {where} as invalid (422): the WrappedKey CRD is older than "
                f"this keyseal (record format v2 needs its scope field); apply deploy/crds/ (helm upgrade does not "
                f"update CRDs)"
            )
        if status is not None:
            return KeysealError(f"the Kubernetes API refused to {verb} {where} (HTTP {status})")
        return BackendUnavailableError(
            f"cannot reach the Kubernetes API at {self._server} to {verb} {where} ({type(exc).__name__}): "
            f"check the cluster address and network"
        )


def is_client_error(exc: Exception) -> bool:
    """An API answer or a transport failure (not a bug in keyseal)."""
    return _is_client_error(exc)


def status_of(exc: Exception) -> int | None:
    """The HTTP status of an API answer; None for a transport failure."""
    return _status(exc)


def _is_client_error(exc: Exception) -> bool:
    """An API answer or a transport failure (not a bug in keyseal)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return isinstance(exc, ApiException | urllib3.exceptions.HTTPError | OSError)


def _status(exc: Exception) -> int | None:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException) and exc.status:
        return int(exc.status)
    return None


def _resource_version(obj: Any, where: str) -> str:
    version = (obj.get("metadata") or {}).get("resourceVersion") if isinstance(obj, dict) else None
    if not isinstance(version, str) or not version:
        raise WrappedRecordError(
            f"{where}: the API server gave no metadata.resourceVersion; refusing to write"
        )
    return version
