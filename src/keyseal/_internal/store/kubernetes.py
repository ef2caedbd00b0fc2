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

from typing import TYPE_CHECKING, Any

from keyseal._internal.providers.kubernetes.client import GROUP, REQUEST_TIMEOUT, VERSION, kubernetes_client
from keyseal._internal.providers.kubernetes.errors import api_failures, status_of, translate_api_error
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.store import RecordStore
from keyseal.errors import KeysealError, StoreConflictError, UsageError, WrappedRecordError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CustomObjectsApi

__all__ = ["API_VERSION", "KIND", "PLURAL", "KubernetesStore"]

PLURAL = "wrappedkeys"
KIND = "WrappedKey"
API_VERSION = f"{GROUP}/{VERSION}"


class KubernetesStore(RecordStore):
    """Records as `WrappedKey` resources in one namespace."""

    def __init__(self, namespace: str, api_client: ApiClient, ledger: VersionLedger | None = None,
                 scope: str = "") -> None:
        super().__init__(ledger if ledger is not None else VersionLedger(), scope)
        self.namespace = namespace
        self._api: CustomObjectsApi = kubernetes_client().CustomObjectsApi(api_client)
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
        except api_failures() as exc:
            if status_of(exc) == 404:
                return None
            raise self._translate(exc, "get", name) from exc
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
        except api_failures() as exc:
            if status_of(exc) == 409:
                raise StoreConflictError(
                    f"{self.location(name)} changed since it was read (409 Conflict): reload it and decide "
                    f"again"
                ) from exc
            raise self._translate(exc, "create" if expected_revision is None else "update", name) from exc
        return _resource_version(answer, self.location(name))

    def _translate(self, exc: Exception, verb: str, name: str) -> KeysealError:
        crd = (f"the Kubernetes API does not serve {PLURAL}.{GROUP} in namespace {self.namespace}: install the CRD "
               f"(deploy/crds/wrappedkeys.keyseal.dev.yaml) and check the namespace exists")
        invalid = (f"the Kubernetes API refused to {verb} {self.location(name)} as invalid (422): the WrappedKey CRD "
                   f"is older than this keyseal (record format v2 needs its scope field); apply deploy/crds/ (helm "
                   f"upgrade does not update CRDs)")
        return translate_api_error(
            exc, f"{verb} {self.location(name)}", server=self._server,
            grant=f"the service account the {verb} verb on {PLURAL}.{GROUP} in namespace {self.namespace}",
            statuses={404: UsageError(crd), 422: UsageError(invalid)})


def _resource_version(obj: Any, where: str) -> str:
    version = (obj.get("metadata") or {}).get("resourceVersion") if isinstance(obj, dict) else None
    if not isinstance(version, str) or not version:
        raise WrappedRecordError(
            f"{where}: the API server gave no metadata.resourceVersion; refusing to write"
        )
    return version
