"""Shared AWS plumbing for every keyseal component that talks to KMS (signing, key wrapping).

One place builds the KMS client (boto3's own credential chain and endpoint settings, explicit timeouts and
bounded retries) and one place turns botocore errors into keyseal's typed errors with one clear line.

boto3 and botocore are imported only inside functions, so `import providers.aws.client` is cheap and works without the
`aws` extra installed; the ImportError becomes a clear message when a client is actually needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from keyseal._internal.envsettings import env_number
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeysealError,
    UnsupportedKeyError,
    UsageError,
    one_line,
)

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READ_TIMEOUT",
    "KmsSettings",
    "kms_client",
    "kms_errors",
    "kms_settings",
    "observe_kms_calls",
    "translate_kms_error",
]

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 20.0
DEFAULT_MAX_ATTEMPTS = 4

# Server error codes that mean "try again later" rather than "your request is wrong".
_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
        "KMSInternalException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "CloudHsmClusterNotActiveException",
        "CustomKeyStoreInvalidStateException",
        "XksProxyUriUnreachableException",
        "XksProxyVpcEndpointServiceNotFoundException",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_UNUSABLE_KEY_CODES = frozenset(
    {
        "DisabledException",
        "KMSInvalidStateException",
        "InvalidKeyUsageException",
        "IncorrectKeyException",
        "UnsupportedOperationException",
    }
)
_CREDENTIALS_HINT = (
    "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "or AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE (web identity / IRSA)"
)


class KmsSettings:
    """Timeouts and retry budget for KMS calls, read from the environment (KEYSEAL_KMS_*)."""

    __slots__ = ("connect_timeout", "max_attempts", "read_timeout")

    def __init__(self, connect_timeout: float, read_timeout: float, max_attempts: int) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts


def kms_settings() -> KmsSettings:
    """Read KEYSEAL_KMS_CONNECT_TIMEOUT, KEYSEAL_KMS_READ_TIMEOUT (seconds) and KEYSEAL_KMS_MAX_ATTEMPTS.

    max_attempts counts the first try: 1 means no retry. Defaults keep a CI job from hanging on a dead
    endpoint while riding out the short throttling bursts KMS answers under load.
    """
    return KmsSettings(
        connect_timeout=env_number(
            "KEYSEAL_KMS_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, integer=False, minimum=0.01
        ),
        read_timeout=env_number(
            "KEYSEAL_KMS_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, integer=False, minimum=0.01
        ),
        max_attempts=int(
            env_number("KEYSEAL_KMS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, integer=True, minimum=1)
        ),
    )


_observers: list[Callable[[str], None]] = []


def observe_kms_calls(observer: Callable[[str], None]) -> None:
    """Call `observer(operation)` ("Sign", "Decrypt" ...) once per KMS API call made by any client built here
    (retries of one call count once). The CA server counts KMS calls for its metrics this way."""
    if observer not in _observers:
        _observers.append(observer)


def _notify_observers(model: Any = None, **_: Any) -> None:
    name = str(getattr(model, "name", "") or "unknown")
    for observer in list(_observers):
        observer(name)


def kms_client(endpoint: str | None = None, region: str | None = None) -> KMSClient:
    """A boto3 KMS client using boto3's standard credential chain and endpoint settings.

    Credentials: environment, shared config / profile, web identity (AWS_ROLE_ARN and
    AWS_WEB_IDENTITY_TOKEN_FILE, as on EKS with IRSA or a CI OIDC token), container and instance metadata, all
    as boto3 resolves them. Endpoint: `endpoint` when given, else boto3's own AWS_ENDPOINT_URL_KMS /
    AWS_ENDPOINT_URL / config file handling, else the regional AWS endpoint. Region: `region` when given, else
    boto3's (AWS_DEFAULT_REGION, profile), else AWS_REGION (which boto3 itself ignores but CI runners set).
    """
    try:  # the optional SDK is imported only when a KMS client is really needed
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError as exc:
        raise UsageError("AWS KMS support needs boto3: pip install 'keyseal[aws]'") from exc
    settings = kms_settings()
    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        user_agent_extra="keyseal",
    )
    try:
        session = boto3.session.Session(region_name=region or None)
        if session.region_name is None and os.environ.get("AWS_REGION"):
            session = boto3.session.Session(region_name=os.environ["AWS_REGION"])
        if session.region_name is None:
            raise UsageError(
                "no AWS region is configured for KMS: set AWS_REGION (or a region in your AWS profile), "
                "or use a key ARN, which names its region"
            )
        client = session.client("kms", endpoint_url=endpoint or None, config=config)
        client.meta.events.register("before-call.kms", _notify_observers)
        return client
    except BotoCoreError as exc:
        raise KeysealError(f"cannot set up the AWS KMS client: {one_line(str(exc))}") from exc
    except ValueError as exc:  # botocore rejects a malformed endpoint URL with ValueError
        raise UsageError(f"invalid KMS endpoint {endpoint!r}: {one_line(str(exc))}") from exc


def _endpoint_label(exc: BaseException, endpoint: str | None) -> str:
    kwargs = getattr(exc, "kwargs", None)
    from_exc = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    return str(from_exc or endpoint or "the AWS KMS regional endpoint")


def translate_kms_error(
    exc: BaseException, operation: str, key_id: str, endpoint: str | None
) -> KeysealError:
    """Map a botocore error from a KMS call to a typed keyseal error with one clear line.

    `operation` is the KMS API name ("Sign", "GetPublicKey", "Encrypt" ...): the missing IAM permission is
    `kms:<operation>`. `endpoint` is the client's endpoint URL, named when the service cannot be reached.
    Anything that is not a botocore error is wrapped as a plain KeysealError (never leaks a traceback).
    """
    from botocore import exceptions as bce

    permission = f"kms:{operation}"
    where = _endpoint_label(exc, endpoint)
    if isinstance(exc, KeysealError):
        return exc
    if isinstance(exc, bce.ClientError):
        return _translate_client_error(exc, operation, permission, key_id, where)
    if isinstance(exc, bce.ConnectTimeoutError | bce.ReadTimeoutError):
        what = "connecting to" if isinstance(exc, bce.ConnectTimeoutError) else "waiting for an answer from"
        return BackendUnavailableError(
            f"AWS KMS {operation} for {key_id} timed out {what} {where}: check the endpoint and network, "
            f"or raise KEYSEAL_KMS_CONNECT_TIMEOUT / KEYSEAL_KMS_READ_TIMEOUT"
        )
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectionError | bce.HTTPClientError):
        return BackendUnavailableError(
            f"cannot reach AWS KMS at {where} for {operation} on {key_id}: check the endpoint "
            f"(AWS_ENDPOINT_URL_KMS or the endpoint option), the region and the network"
        )
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return AccessDeniedError(
            f"no usable AWS credentials for KMS {operation} on {key_id}: {_CREDENTIALS_HINT}"
        )
    if isinstance(exc, bce.CredentialRetrievalError | bce.TokenRetrievalError | bce.SSOError):
        return AccessDeniedError(
            f"cannot obtain AWS credentials for KMS {operation} on {key_id}: {one_line(str(exc))}"
        )
    if isinstance(exc, bce.ProfileNotFound):
        return UsageError(f"{one_line(str(exc))}: fix AWS_PROFILE or your AWS config file")
    if isinstance(exc, bce.NoRegionError):
        return UsageError(
            f"no AWS region is configured for KMS {operation}: set AWS_REGION or use a key ARN, which names "
            f"its region"
        )
    if isinstance(exc, bce.ParamValidationError):
        return UsageError(f"invalid KMS {operation} request for {key_id}: {one_line(str(exc))}")
    if isinstance(exc, bce.BotoCoreError):
        return KeysealError(f"AWS KMS {operation} on {key_id} failed: {one_line(str(exc))}")
    if isinstance(exc, OSError):
        # e.g. an unreadable AWS_WEB_IDENTITY_TOKEN_FILE, read while resolving credentials.
        return AccessDeniedError(
            f"cannot obtain AWS credentials for KMS {operation} on {key_id}: {exc.strerror or exc}"
            f"{' (' + str(exc.filename) + ')' if exc.filename else ''}"
        )
    return KeysealError(
        f"AWS KMS {operation} on {key_id} failed: {type(exc).__name__}: {one_line(str(exc))}"
    )


def _translate_client_error(
    exc: BaseException, operation: str, permission: str, key_id: str, where: str
) -> KeysealError:
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {}) or {}
    code = str(error.get("Code", "") or "")
    message = one_line(str(error.get("Message", "") or ""))
    status = int((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    detail = f" ({code}: {message})" if message else f" ({code})"
    remote_op = str(getattr(exc, "operation_name", "") or operation)

    if remote_op == "AssumeRoleWithWebIdentity" or remote_op.startswith("AssumeRole"):
        role = os.environ.get("AWS_ROLE_ARN", "the configured role")
        return AccessDeniedError(
            f"AWS STS refused {remote_op} for {role}{detail}: check the role's trust policy and the "
            f"web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)"
        )
    if code in {"AccessDeniedException", "AccessDenied"}:
        return AccessDeniedError(
            f"AWS KMS denied {permission} on {key_id}{detail}: grant the caller {permission} on this key "
            f"(see `keyseal iam-policy`)"
        )
    if code in _CREDENTIAL_CODES:
        return AccessDeniedError(
            f"AWS rejected the credentials used for KMS {operation} on {key_id}{detail}: {_CREDENTIALS_HINT}"
        )
    if code == "NotFoundException":
        return KeyNotFoundError(
            f"AWS KMS key {key_id} does not exist in this account and region{detail}: check the key ID, "
            f"alias or ARN and AWS_REGION"
        )
    if code in _UNUSABLE_KEY_CODES:
        return UnsupportedKeyError(
            f"AWS KMS key {key_id} cannot be used for {operation}{detail}: enable the key or use another one"
        )
    if code in _RETRYABLE_CODES or status >= 500:
        return BackendUnavailableError(
            f"AWS KMS at {where} kept failing {operation} on {key_id}{detail}, even after retries: try again "
            f"later or raise KEYSEAL_KMS_MAX_ATTEMPTS"
        )
    return KeysealError(f"AWS KMS refused {operation} on {key_id}{detail}")


@contextmanager
def kms_errors(operation: str, key_id: str, endpoint: str | None) -> Iterator[None]:
    """Run a KMS call, turning any botocore (or credential file) error into a typed keyseal error.

    Usage: `with kms_errors("Sign", key_id, client.meta.endpoint_url): client.sign(...)`.
    KeysealErrors raised inside pass through unchanged.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except KeysealError:
        raise
    except (BotoCoreError, ClientError, OSError) as exc:
        raise translate_kms_error(exc, operation, key_id, endpoint) from exc
