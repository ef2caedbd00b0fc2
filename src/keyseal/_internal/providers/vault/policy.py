"""The least-privilege Vault / OpenBao policy for one Transit key and one use (pure data): what `keyseal
vault-policy` prints and what the errors name when a call is refused.
"""

from __future__ import annotations

from keyseal._internal.providers.vault.uri import TransitKeyRef
from keyseal.errors import UsageError

__all__ = ["policy_capabilities", "policy_hcl"]
# purpose -> [(endpoint, capability, why)]
_POLICY: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sign": (
        ("keys", "read", "public key, key type and version creation times"),
        ("sign", "update", "one call per signature"),
    ),
    "wrap": (
        ("keys", "read", "key type check before records are written (aes256-gcm96)"),
        ("encrypt", "update", "wrap a record's DEK"),
        ("decrypt", "update", "unwrap a record's DEK"),
    ),
}


def policy_capabilities(ref: TransitKeyRef, purpose: str) -> list[tuple[str, str]]:
    """(path, capability) pairs a token needs on one key for one purpose ("sign" or "wrap")."""
    entries = _POLICY.get(purpose)
    if entries is None:
        raise UsageError(f"unknown policy purpose {purpose!r}: use sign or wrap")
    return [(ref.path(endpoint), capability) for endpoint, capability, _ in entries]


def policy_hcl(ref: TransitKeyRef, purpose: str) -> str:
    """The Vault / OpenBao policy (HCL) allowing exactly what keyseal needs on one Transit key.

    Only `update` (never `create`) on encrypt: Transit would otherwise create a missing key on first use.
    """
    entries = _POLICY.get(purpose)
    if entries is None:
        raise UsageError(f"unknown policy purpose {purpose!r}: use sign or wrap")
    lines = [f"# keyseal: {purpose} with Transit key {ref.key_uri} (nothing else)"]
    for endpoint, capability, why in entries:
        lines += [
            f"# {why}",
            f'path "{ref.path(endpoint)}" {{',
            f'  capabilities = ["{capability}"]',
            "}",
        ]
    return "\n".join(lines) + "\n"
