"""Kubernetes API failures as keyseal's typed errors, one way for every caller.

Callers catch `api_failures()` (an API answer or a transport failure, never a bug in keyseal), handle the
statuses that are part of their protocol (404 absent, 409 changed) and hand the rest to `translate_api_error`,
which words 401/403 as the RBAC grant that is missing, any other status as a refusal, and no status at all as
an unreachable API server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from keyseal.errors import AccessDeniedError, BackendUnavailableError, KeysealError

__all__ = ["api_failures", "is_client_error", "names_missing_object", "status_of", "translate_api_error"]


def api_failures() -> tuple[type[Exception], ...]:
    """The exception types of an API answer or a transport failure; for `except api_failures() as exc:`
    (evaluated only when something was raised, so the SDK is imported only then)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return ApiException, urllib3.exceptions.HTTPError, OSError


def is_client_error(exc: BaseException) -> bool:
    """An API answer or a transport failure (not a bug in keyseal)."""
    return isinstance(exc, api_failures())


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API answer; None for a transport failure."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException) and exc.status:
        return int(exc.status)
    return None


def names_missing_object(exc: BaseException, name: str) -> bool:
    """Whether a 404 says that the object `name` does not exist (a Status NotFound naming it), as opposed to the
    API server not serving the resource type at all (a CRD that was never applied: `404 page not found`)."""
    try:
        status = json.loads(getattr(exc, "body", None) or "")
    except (TypeError, ValueError):
        return False
    details = status.get("details") if isinstance(status, dict) else None
    return isinstance(details, dict) and status.get("reason") == "NotFound" and details.get("name") == name


def translate_api_error(exc: BaseException, action: str, *, grant: str,
                        statuses: Mapping[int, KeysealError] | None = None,
                        server: str | None = None) -> KeysealError:
    """One line for a failed `action` (a verb and what it was on: "get configmap ns/name").

    `grant`: the RBAC a refused (401/403) caller needs, said after "grant". `statuses`: what this caller's
    resource means by other statuses (a 404 is a missing CRD for one, a missing ConfigMap for another).
    `server`: the API server's address, named (with a hint) when it cannot be reached.
    """
    status = status_of(exc)
    if status in (401, 403):
        return AccessDeniedError(f"the Kubernetes API refused to {action} ({status}): grant {grant}")
    if status is not None and statuses and status in statuses:
        return statuses[status]
    if status is not None:
        return KeysealError(f"the Kubernetes API refused to {action} (HTTP {status})")
    if server is not None:
        return BackendUnavailableError(
            f"cannot reach the Kubernetes API at {server} to {action} ({type(exc).__name__}): "
            f"check the cluster address and network")
    return BackendUnavailableError(f"cannot reach the Kubernetes API to {action} ({type(exc).__name__})")
