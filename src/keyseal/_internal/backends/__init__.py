"""Signer backends, chosen by the scheme of a key URI (`keyseal._internal.registry.SIGNERS`).

The registry maps a scheme to a lazily imported `open`, so that opening a `file:` key never imports boto3,
`import keyseal._internal.backends` imports no SDK at all, and other packages can add schemes (entry points
in the group `keyseal.signers`).
"""

from __future__ import annotations

from dataclasses import dataclass

from keyseal._internal.registry import SIGNERS
from keyseal.errors import KeyURIError
from keyseal.signer import HashName, PublicKey, Signer

__all__ = ["BackendOptions", "HashName", "PublicKey", "Signer", "open_signer", "split_uri"]


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend may need beyond its URI. Unset values fall back to each SDK's own environment."""

    kms_endpoint: str | None = None
    region: str | None = None
    # KEK for wrapped key records (`local`, `local:PATH`, `awskms:<ARN>`, `hashivault://[MOUNT/]KEY` or its alias
    # `vault:[MOUNT/]KEY`); None: $KEYSEAL_KEK, else `local`.
    kek: str | None = None


def split_uri(uri: str) -> tuple[str, str]:
    """Split `scheme:rest`, refusing an empty or unknown scheme."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not scheme or not rest:
        raise KeyURIError(f"invalid key URI: expected SCHEME:KEY with a scheme of {', '.join(SIGNERS.names())}")
    if scheme not in SIGNERS:
        # The URI itself is not echoed: it may carry a secret (a PKCS#11 pin-value, a token).
        raise SIGNERS.unknown(scheme)
    return scheme, rest


def open_signer(uri: str, options: BackendOptions | None = None) -> Signer:
    """Open the signer a key URI names: the scheme's registered `open(uri, rest, options)`.

    Every signer is returned wrapped in `audit.AuditingSigner`: this is the one place every caller (CLI,
    git helpers, library) goes through, so every signature is recorded in the audit log whatever the backend.
    """
    from keyseal._internal.audit.signer import AuditingSigner

    scheme, rest = split_uri(uri)
    signer: Signer = SIGNERS.load(scheme)(uri, rest, options or BackendOptions())
    return AuditingSigner(signer)
