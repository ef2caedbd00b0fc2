"""hvac / requests errors from Vault calls as keyseal's typed errors, one clear line each that names the policy
capability a refused call needs. Tokens never appear in messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeysealError,
    UnsupportedKeyError,
    UsageError,
    one_line,
)

__all__ = ["error_detail", "translate_vault_error", "vault_errors"]


def error_detail(exc: BaseException) -> str:
    """Vault's own error text: its `errors` list, without hvac's `, on post URL` tail or multi-error framing."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, str):
        errors = [errors]
    parts: list[str] = []
    for error in errors or ():
        text = str(error)
        bullets = re.findall(r"^\s*\*\s*(.+)$", text, flags=re.MULTILINE)
        parts.extend(bullets or [text])
    if not parts:
        message = str(exc).split(", on ")[0]
        parts = [message] if message and message != "None" else []
    return one_line("; ".join(parts)) or type(exc).__name__


def _token_accepted(client: Any) -> bool | None:
    """Whether the token is valid at all (`auth/token/lookup-self`, in Vault's default policy); None: unknown."""
    try:
        client.auth.token.lookup_self()
    except Exception as exc:
        from hvac import exceptions as hx

        return False if isinstance(exc, hx.Forbidden | hx.Unauthorized) else None
    return True


def translate_vault_error(
    exc: BaseException,
    address: str,
    capability: str,
    path: str,
    subject: str,
    *,
    probe: Any = None,
) -> KeysealError:
    """Map an hvac / requests error from one Vault call to a typed keyseal error with one clear line.

    `capability` and `path` are what the token's policy must grant for this call (e.g. "update" on
    "transit/sign/release"); `subject` says what was being done. With `probe` (the client), a permission
    denial is told apart from a token that is not valid at all by one `lookup-self` call.
    """
    if isinstance(exc, KeysealError):
        return exc
    from hvac import exceptions as hx
    from requests import exceptions as rx

    detail = error_detail(exc)
    if isinstance(exc, hx.Forbidden | hx.Unauthorized):
        accepted = _token_accepted(probe) if probe is not None else None
        if accepted is False:
            return AccessDeniedError(
                f"Vault at {address} refused the token for {subject} ({detail}): the token is invalid or expired "
                f"(or lacks the default policy); set VAULT_TOKEN, KEYSEAL_VAULT_TOKEN_FILE or KEYSEAL_VAULT_K8S_ROLE"
            )
        return AccessDeniedError(
            f"Vault at {address} denied {subject} ({detail}): the token's policy needs the \"{capability}\" "
            f"capability on path \"{path}\" (see `keyseal vault-policy`)"
            + ("" if accepted else "; or the token is invalid or expired")
        )
    if isinstance(exc, hx.InvalidPath):
        if "no handler for route" in detail:
            mount = path.rsplit("/", 2)[0]  # "<mount>/<endpoint>/<key>"
            return KeyNotFoundError(
                f"Vault at {address} has no secrets engine at {path!r} for {subject} ({detail}): enable Transit "
                f"at the key URI's mount (e.g. `bao secrets enable -path={mount} transit`) or fix the mount"
            )
        return KeyNotFoundError(f"Vault at {address} has nothing at {path} for {subject}: check the key URI")
    if isinstance(exc, hx.InvalidRequest):
        lowered = detail.lower()
        if "key not found" in lowered:
            return KeyNotFoundError(
                f"Vault at {address}: {subject} failed, the Transit key does not exist ({detail}): check the key "
                f"URI, or create the key"
            )
        if "does not support" in lowered or "non-aead" in lowered or "key derivation" in lowered:
            return UnsupportedKeyError(f"Vault at {address}: {subject} failed, wrong key type ({detail})")
        return KeysealError(f"Vault at {address} refused {subject} ({detail})")
    if isinstance(exc, hx.VaultDown | hx.VaultNotInitialized):
        return BackendUnavailableError(
            f"Vault at {address} is sealed, not initialised or unavailable ({detail}) for {subject}: try again "
            f"once it is unsealed"
        )
    if isinstance(exc, hx.RateLimitExceeded | hx.BadGateway):
        return BackendUnavailableError(
            f"Vault at {address} kept failing {subject} ({detail}), even after retries: try again later or "
            f"raise KEYSEAL_VAULT_MAX_ATTEMPTS"
        )
    if isinstance(exc, hx.ParamValidationError):
        return UsageError(f"invalid Vault request for {subject}: {detail}")
    if isinstance(exc, hx.VaultError):
        return KeysealError(f"Vault at {address} failed {subject} ({detail})")
    if isinstance(exc, rx.SSLError):
        return BackendUnavailableError(
            f"TLS verification of Vault at {address} failed for {subject}: set VAULT_CACERT (or BAO_CACERT) to "
            f"the CA bundle that issued its certificate"
        )
    if isinstance(exc, rx.Timeout):
        return BackendUnavailableError(
            f"Vault at {address} did not answer {subject} in time: check the address and network, or raise "
            f"KEYSEAL_VAULT_CONNECT_TIMEOUT / KEYSEAL_VAULT_READ_TIMEOUT"
        )
    if isinstance(exc, rx.ConnectionError | rx.RetryError):
        return BackendUnavailableError(
            f"cannot reach Vault at {address} for {subject}: is it running? check VAULT_ADDR (or BAO_ADDR) and "
            f"the network"
        )
    if isinstance(exc, rx.RequestException):
        return BackendUnavailableError(f"Vault at {address}: {subject} failed ({type(exc).__name__})")
    return KeysealError(f"Vault at {address}: {subject} failed ({type(exc).__name__}: {one_line(str(exc))})")


@contextmanager
def vault_errors(client: Any, capability: str, path: str, subject: str) -> Iterator[None]:
    """Run one Vault call, turning any hvac / requests error into a typed keyseal error.

    Usage: `with vault_errors(client, "update", "transit/sign/k", "signing with ..."): transit.sign_data(...)`.
    """
    from hvac.exceptions import VaultError
    from requests.exceptions import RequestException

    try:
        yield
    except KeysealError:
        raise
    except (VaultError, RequestException, OSError) as exc:
        address = str(getattr(client, "url", "") or "the configured address")
        raise translate_vault_error(exc, address, capability, path, subject, probe=client) from exc
