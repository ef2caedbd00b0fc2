"""Where the keyset pins live: one small document beside the server's other state, readable by every replica.

The document is not a wrapped record (keyseal._internal.store holds those, with their own formats and ledger): it is a
separate file in the directory store (`<store>/<name>.json`) or a separate ConfigMap in the Kubernetes store's
namespace. Writes are compare-and-swap on a revision, as for records: a writer that lost a race reloads.

RBAC (Kubernetes): get and update on the ConfigMap by name, and create on configmaps (the first pin creates it;
create cannot be limited to a name).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keyseal._internal.atomic import directory_locked, write_atomic
from keyseal._internal.providers.kubernetes.client import REQUEST_TIMEOUT, kubernetes_client
from keyseal._internal.providers.kubernetes.errors import api_failures, status_of, translate_api_error
from keyseal.errors import InputError, KeysealError, StoreConflictError

__all__ = ["ConfigMapPinStore", "DirectoryPinStore", "LazyPinStore", "PinStore"]

PIN_KEY = "keyset-pins.json"


class PinStore(abc.ABC):
    """One document with compare-and-swap writes."""

    @abc.abstractmethod
    def location(self) -> str:
        """Where the document lives, for messages."""

    @abc.abstractmethod
    def read(self) -> tuple[bytes, str] | None:
        """The document and its revision; None if there is none yet."""

    @abc.abstractmethod
    def write(self, data: bytes, expected_revision: str | None) -> None:
        """Write only if the stored revision is still `expected_revision` (None: only if absent); otherwise a
        StoreConflictError and nothing is written."""


class DirectoryPinStore(PinStore):
    """`<root>/<name>.json`, mode 0600, written atomically under an exclusive lock on the directory."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.path = root / f"{name}.json"

    def location(self) -> str:
        return str(self.path)

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror}") from exc
        return data, hashlib.sha256(data).hexdigest()

    def write(self, data: bytes, expected_revision: str | None) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            current = self.read()
            if (current[1] if current else None) != expected_revision:
                raise StoreConflictError(f"{self.path} changed since it was read: reload it and decide again")
            write_atomic(self.path, data, mode=0o600)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return directory_locked(self.root)


class ConfigMapPinStore(PinStore):
    """The data key `keyset-pins.json` of one ConfigMap; writes conditional on its resourceVersion."""

    def __init__(self, api_client: Any, namespace: str, name: str, key: str = PIN_KEY) -> None:
        self.key = key
        self.api = kubernetes_client().CoreV1Api(api_client)
        self.namespace, self.name = namespace, name

    def location(self) -> str:
        return f"configmap {self.namespace}/{self.name}"

    def read(self) -> tuple[bytes, str] | None:
        obj = self._call("get", self.api.read_namespaced_config_map, self.name, self.namespace)
        if obj is None:
            return None
        text = (obj.data or {}).get(self.key)
        version = obj.metadata.resource_version if obj.metadata else None
        if not isinstance(version, str) or not version:
            raise KeysealError(f"{self.location()}: the API server gave no metadata.resourceVersion")
        return (text or "").encode("utf-8"), version

    def write(self, data: bytes, expected_revision: str | None) -> None:
        client = kubernetes_client()
        metadata = client.V1ObjectMeta(name=self.name, namespace=self.namespace,
                                       labels={"app.kubernetes.io/part-of": "keyseal"},
                                       resource_version=expected_revision)
        body = client.V1ConfigMap(metadata=metadata, data={self.key: data.decode("utf-8")})
        if expected_revision is None:
            self._call("create", self.api.create_namespaced_config_map, self.namespace, body)
        else:
            self._call("update", self.api.replace_namespaced_config_map, self.name, self.namespace, body)

    def _call(self, verb: str, method: Any, *args: Any) -> Any:
        try:
            return method(*args, _request_timeout=REQUEST_TIMEOUT)
        except api_failures() as exc:
            status = status_of(exc)
            if status == 404 and verb == "get":
                return None
            if status == 409 or (status == 404 and verb == "update"):
                raise StoreConflictError(f"{self.location()} changed since it was read: reload it") from exc
            raise translate_api_error(
                exc, f"{verb} {self.location()}",
                grant=f"get and update on configmaps with resourceNames [{self.name}] and create on configmaps in "
                      f"namespace {self.namespace}") from exc


class LazyPinStore(PinStore):
    """A store made at first use: building a server (and checking its custody) needs no Kubernetes client until
    the pins are read."""

    def __init__(self, make: Callable[[], PinStore], where: str) -> None:
        self._make = make
        self._where = where
        self._store: PinStore | None = None

    def _inner(self) -> PinStore:
        if self._store is None:
            self._store = self._make()
        return self._store

    def location(self) -> str:
        return self._store.location() if self._store is not None else self._where

    def read(self) -> tuple[bytes, str] | None:
        return self._inner().read()

    def write(self, data: bytes, expected_revision: str | None) -> None:
        self._inner().write(data, expected_revision)
