"""Least-privilege IAM policies for the one KMS key a keyseal role uses. Pure data, no AWS call.

A CI signer needs only `kms:Sign` + `kms:GetPublicKey`; a key-wrapping user only `kms:Encrypt` +
`kms:Decrypt`. The policy names the key by its ARN: IAM matches resources by key ARN, so an alias ARN in
`Resource` would grant nothing (and an alias can be moved to another key).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from keyseal.errors import UsageError

__all__ = ["CA_SERVER_CLEANUP_PERMISSIONS", "CA_SERVER_PERMISSIONS", "PERMISSIONS", "ca_alias_guard_policy",
           "ca_server_policy", "least_privilege_policy"]

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


# The trust-domain server in key-manager custody (ca.custody.kms) creates its own CA keys, so its policy
# cannot name key ARNs: it is scoped by the tags the server puts on every key it creates.
CA_SERVER_PERMISSIONS: tuple[str, ...] = (
    "kms:ListAliases", "kms:CreateKey", "kms:TagResource", "kms:CreateAlias", "kms:DescribeKey",
    "kms:GetPublicKey", "kms:Sign",
)
# Clean-up after a failed or lost keyset creation, and the startup search for keys a crash left behind.
# Without them the server works and logs what it could not tidy (orphaned keys stay tagged).
CA_SERVER_CLEANUP_PERMISSIONS: tuple[str, ...] = (
    "kms:ScheduleKeyDeletion", "kms:DeleteAlias", "kms:ListKeys", "kms:ListResourceTags",
)


def ca_server_policy(trust_domain: str, alias_prefix: str) -> dict[str, Any]:
    """An IAM policy for a CA server in KMS custody: create keys only tagged with its trust domain, use and
    tidy only keys that carry that tag, and manage only aliases under its prefix.

    Limit: KMS evaluates the tag a CreateKey adds with kms:TagResource on "*", and no condition key tells that
    call apart from tagging an existing key. A role with this policy can therefore add the trust-domain tag to
    another key whose key policy delegates to IAM, and then use it. Keep such keys' policies from delegating to
    IAM, or give the server an account (or a permissions boundary) of its own."""
    tag = "keyseal:trust-domain"
    own_keys = {"StringEquals": {f"aws:ResourceTag/{tag}": trust_domain}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "KeysealCaList", "Effect": "Allow", "Action": ["kms:ListAliases", "kms:ListKeys"],
             "Resource": "*"},
            {"Sid": "KeysealCaCreate", "Effect": "Allow", "Action": ["kms:CreateKey", "kms:TagResource"],
             "Resource": "*", "Condition": {"StringEquals": {f"aws:RequestTag/{tag}": trust_domain}}},
            {"Sid": "KeysealCaUse", "Effect": "Allow",
             "Action": ["kms:DescribeKey", "kms:GetPublicKey", "kms:Sign", "kms:TagResource",
                        "kms:ListResourceTags", "kms:ScheduleKeyDeletion", "kms:CreateAlias", "kms:DeleteAlias"],
             "Resource": "*", "Condition": own_keys},
            {"Sid": "KeysealCaAliases", "Effect": "Allow", "Action": ["kms:CreateAlias", "kms:DeleteAlias"],
             "Resource": f"arn:aws:kms:*:*:alias/{alias_prefix}/keyset-*"},
        ],
    }


_ROLE_ARN_RE = re.compile(r"arn:aws[-a-z]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")

# What nobody but the CA server may do to a key that carries one of its aliases: sign as the CA, change which
# key an alias names, or take the key away (deletion, disabling, its policy, its tags).
CA_KEY_GUARDED_ACTIONS: tuple[str, ...] = (
    "kms:Sign", "kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias", "kms:TagResource", "kms:UntagResource",
    "kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:PutKeyPolicy", "kms:CreateGrant", "kms:UpdateKeyDescription",
)


def ca_alias_guard_policy(alias_prefix: str, ca_role_arn: str) -> dict[str, Any]:
    """Deny statements for everyone but the CA server's role (a service control policy, a permissions boundary,
    or a policy on every other principal of the account): only the CA may create, move or delete aliases under
    its prefix (`kms:CreateAlias`/`kms:UpdateAlias`/`kms:DeleteAlias` on the alias resource), and only the CA may
    sign with, re-alias, retag or remove a key that carries one of them (`kms:ResourceAliases`).

    keyseal does not rely on this for its integrity (it pins every keyset's keys and ignores anything else, with
    an alarm), but without it anyone who may manage aliases can make the CA raise alarms, spend keyset numbers,
    or take its keys away."""
    if not _ROLE_ARN_RE.fullmatch(ca_role_arn):
        raise UsageError(f"{ca_role_arn!r} is not an IAM role ARN: expected arn:aws:iam::ACCOUNT:role/NAME")
    not_the_ca = {"ArnNotEquals": {"aws:PrincipalArn": ca_role_arn}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "KeysealCaAliasesOnlyByTheCa", "Effect": "Deny",
             "Action": ["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias"],
             "Resource": f"arn:aws:kms:*:*:alias/{alias_prefix}/*", "Condition": not_the_ca},
            {"Sid": "KeysealCaKeysOnlyByTheCa", "Effect": "Deny", "Action": list(CA_KEY_GUARDED_ACTIONS),
             "Resource": "*",
             "Condition": {"ForAnyValue:StringLike": {"kms:ResourceAliases": f"alias/{alias_prefix}/*"},
                           **not_the_ca}},
        ],
    }
