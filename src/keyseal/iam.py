"""Least-privilege IAM policies for the one KMS key a keyseal role uses. Pure data, no AWS call.

A CI signer needs only `kms:Sign` + `kms:GetPublicKey`; a key-wrapping user only `kms:Encrypt` +
`kms:Decrypt`. The policy names the key by its ARN: IAM matches resources by key ARN, so an alias ARN in
`Resource` would grant nothing (and an alias can be moved to another key).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from keyseal.errors import UsageError

__all__ = ["PERMISSIONS", "least_privilege_policy"]

Purpose = Literal["sign", "wrap"]

PERMISSIONS: dict[str, tuple[str, ...]] = {
    "sign": ("kms:Sign", "kms:GetPublicKey"),
    "wrap": ("kms:Encrypt", "kms:Decrypt"),
}

_KEY_ARN_RE = re.compile(
    r"arn:aws[-a-z]*:kms:[a-z]{2}(?:-[a-z0-9]+)+-\d+:\d{12}:key/"
    r"(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|mrk-[0-9a-fA-F]{32})"
)


def least_privilege_policy(key_arn: str, purpose: str) -> dict[str, Any]:
    """An IAM policy document allowing only what `purpose` ("sign" or "wrap") needs on exactly `key_arn`."""
    actions = PERMISSIONS.get(purpose)
    if actions is None:
        raise UsageError(f"unknown policy purpose {purpose!r}: use sign or wrap")
    if not _KEY_ARN_RE.fullmatch(key_arn):
        hint = (
            "an alias cannot scope an IAM policy; give the key ARN "
            "(`aws kms describe-key --key-id ALIAS` shows it)"
            if ":alias/" in key_arn or key_arn.startswith("alias/")
            else "expected arn:aws:kms:REGION:ACCOUNT:key/KEY_ID"
        )
        raise UsageError(f"{key_arn!r} is not a KMS key ARN: {hint}")
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "KeysealSign" if purpose == "sign" else "KeysealWrap",
                "Effect": "Allow",
                "Action": list(actions),
                "Resource": key_arn,
            }
        ],
    }
