"""The Kubernetes API client, built one way for every keyseal component that talks to the cluster (the record
store, the CA's registry, pins and bundle ConfigMaps, node attestation).

The `kubernetes` SDK is imported only inside functions: `import` of this module works without the `k8s` extra,
and the ImportError becomes one clear line when a client is actually needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyseal.errors import UsageError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "GROUP",
    "REQUEST_TIMEOUT",
    "SERVICE_ACCOUNT_NAMESPACE",
    "VERSION",
    "api_client_from_environment",
    "kubernetes_client",
    "kubernetes_sdk",
    "resolve_namespace",
]

GROUP = "keyseal.dev"  # the API group of keyseal's custom resources
VERSION = "v1"
REQUEST_TIMEOUT = (5.0, 20.0)  # connect, read (seconds)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubernetes_sdk() -> Any:
    """The `kubernetes` package (a clear error when the extra is not installed)."""
    try:
        import kubernetes
    except ImportError as exc:
        raise UsageError(
            "the Kubernetes store needs the kubernetes client: pip install 'keyseal[k8s]'"
        ) from exc
    return kubernetes


def kubernetes_client() -> Any:
    """The `kubernetes.client` module (a clear error when the extra is not installed)."""
    return kubernetes_sdk().client


def api_client_from_environment(host: str | None = None) -> ApiClient:
    """In-cluster service account when running in a pod, else the kubeconfig; `host` overrides the server."""
    kubernetes = kubernetes_sdk()
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        except (kubernetes.config.ConfigException, OSError) as exc:
            if host is None:
                raise UsageError(
                    "no Kubernetes configuration: run in a pod with a service account, or set KUBECONFIG"
                ) from exc
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
    except OSError as exc:
        raise UsageError(
            f"store.kubernetes.namespace is not set and this is not a pod: set the namespace of {what}"
        ) from exc
