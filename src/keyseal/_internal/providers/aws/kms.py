"""KMS key lifecycle, written once for every keyseal component that makes keys: `keys create --kms` and
`keys rotate --kms` (signing keys), the CA's `kms` custody (keyset keys).

Create a key, find or create its alias, tag it, mark it orphaned, schedule its deletion: each call goes through
`kms_errors`, so a failure is the same one-line typed error wherever it happens. The orphan tags are one
vocabulary (`keyseal:orphaned=<reason>`, `-at`, `-alias`, `-detail`) so that one search finds what any part
of keyseal left behind.

IAM: kms:CreateKey (and kms:TagResource when tags are given at creation), kms:CreateAlias, kms:DescribeKey,
kms:TagResource, kms:ScheduleKeyDeletion, as each function says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keyseal._internal.providers.aws.client import kms_client, kms_errors
from keyseal.errors import AccessDeniedError, KeysealError, UsageError

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = [
    "ALIAS_PATTERN",
    "DELETION_WINDOW_DAYS",
    "KEY_SPECS",
    "ORPHAN_ALIAS_TAG",
    "ORPHAN_AT_TAG",
    "ORPHAN_DETAIL_TAG",
    "ORPHAN_TAG",
    "alias_exists",
    "create_alias",
    "create_key",
    "create_signing_key",
    "describe_alias",
    "orphan_tags",
    "schedule_deletion",
    "tag_key",
    "validate_alias",
]

ALIAS_PATTERN = r"alias/[a-zA-Z0-9/_-]{1,250}"
_ALIAS_RE = re.compile(ALIAS_PATTERN)

# keyseal key type -> KMS KeySpec of an asymmetric signing key.
KEY_SPECS: dict[str, str] = {
    "rsa2048": "RSA_2048",
    "rsa3072": "RSA_3072",
    "rsa4096": "RSA_4096",
    "p256": "ECC_NIST_P256",
    "p384": "ECC_NIST_P384",
    "p521": "ECC_NIST_P521",
}
DELETION_WINDOW_DAYS = 7

ORPHAN_TAG = "keyseal:orphaned"  # the reason: rotation-failed, lost-race, abandoned
ORPHAN_AT_TAG = f"{ORPHAN_TAG}-at"
ORPHAN_ALIAS_TAG = f"{ORPHAN_TAG}-alias"
ORPHAN_DETAIL_TAG = f"{ORPHAN_TAG}-detail"


def validate_alias(alias: str) -> str:
    """An alias keyseal may create: `alias/NAME` (letters, digits, `/`, `_`, `-`), not AWS-reserved."""
    if not _ALIAS_RE.fullmatch(alias):
        raise UsageError(
            f"invalid KMS alias {alias!r}: use alias/NAME with letters, digits, '/', '_' and '-' "
            f"(at most 256 characters)"
        )
    if alias.startswith("alias/aws/"):
        raise UsageError(
            f"KMS alias {alias!r} is reserved for AWS managed keys: choose a name outside alias/aws/"
        )
    return alias


def orphan_tags(reason: str, at: str, *, alias: str | None = None, detail: str | None = None) -> dict[str, str]:
    """The tags that mark a key nothing uses: why, when, and (when known) the alias it was made for."""
    tags = {ORPHAN_TAG: reason, ORPHAN_AT_TAG: at}
    if alias is not None:
        tags[ORPHAN_ALIAS_TAG] = alias
    if detail is not None:
        tags[ORPHAN_DETAIL_TAG] = detail
    return tags


def _tag_list(tags: Mapping[str, str]) -> list[Any]:
    return [{"TagKey": key, "TagValue": value} for key, value in tags.items()]


def create_key(client: KMSClient, what: str, spec: str, description: str,
               tags: Mapping[str, str] | None = None) -> tuple[str, str]:
    """CreateKey for a SIGN_VERIFY key of `spec`, tagged in the same call (so even a crash right after leaves a
    findable key); returns (key id, key ARN). `what` names the key in errors (its alias-to-be)."""
    extra: dict[str, Any] = {"Tags": _tag_list(tags)} if tags else {}
    try:
        with kms_errors("CreateKey", what, client.meta.endpoint_url):
            created = client.create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec,  # type: ignore[arg-type]
                                        Description=description, **extra)
    except AccessDeniedError as exc:
        if not tags:
            raise
        raise AccessDeniedError(f"{exc.message} (a tagged CreateKey also needs kms:TagResource)") from exc
    metadata = created["KeyMetadata"]
    return metadata["KeyId"], metadata.get("Arn") or metadata["KeyId"]


def create_alias(client: KMSClient, alias: str, key_id: str) -> bool:
    """CreateAlias; False if the alias exists already (another writer made it: the alias is the lock)."""
    from botocore.exceptions import ClientError

    with kms_errors("CreateAlias", alias, client.meta.endpoint_url):
        try:
            client.create_alias(AliasName=alias, TargetKeyId=key_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "AlreadyExistsException":
                return False
            raise
    return True


def describe_alias(client: KMSClient, alias: str) -> Any:
    """The KeyMetadata of the key an alias names, or None when no key has that alias (kms:DescribeKey)."""
    from botocore.exceptions import ClientError

    with kms_errors("DescribeKey", alias, client.meta.endpoint_url):
        try:
            return client.describe_key(KeyId=alias)["KeyMetadata"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NotFoundException":
                return None
            raise


def tag_key(client: KMSClient, key_id: str, tags: Mapping[str, str]) -> None:
    """TagResource (kms:TagResource)."""
    with kms_errors("TagResource", key_id, client.meta.endpoint_url):
        client.tag_resource(KeyId=key_id, Tags=_tag_list(tags))


def schedule_deletion(client: KMSClient, key_id: str, days: int = DELETION_WINDOW_DAYS) -> None:
    """ScheduleKeyDeletion after the shortest window keyseal uses (kms:ScheduleKeyDeletion)."""
    with kms_errors("ScheduleKeyDeletion", key_id, client.meta.endpoint_url):
        client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days)


# -- signing keys (`keys create --kms`, `keys rotate --kms`) ----------------------------------------------


def create_signing_key(
    alias: str, key_type: str, endpoint: str | None, region: str | None = None
) -> str:
    """Create an asymmetric SIGN_VERIFY key in KMS under a new alias; return the key ARN.

    The alias is checked first, so an existing alias leaves no orphan key behind. If CreateAlias still fails
    (a race, or a missing kms:CreateAlias), the new key is scheduled for deletion and the error says so.
    """
    validate_alias(alias)
    spec = KEY_SPECS.get(key_type)
    if spec is None:
        raise UsageError(f"unknown KMS key type {key_type!r}: use one of {', '.join(KEY_SPECS)}")
    client = kms_client(endpoint, region)
    existing = describe_alias(client, alias)
    if existing is not None:
        raise UsageError(
            f"KMS alias {alias} already exists (it names {existing.get('Arn', 'a key')}): "
            f"use it with awskms:{alias}, or choose another alias"
        )
    key_id, key_arn = create_key(client, alias, spec, f"keyseal signing key ({alias})")
    try:
        if not create_alias(client, alias, key_id):
            raise UsageError(f"KMS alias {alias} was created by someone else meanwhile: choose another alias")
    except KeysealError as exc:
        try:
            schedule_deletion(client, key_id)
            cleanup = f"was scheduled for deletion in {DELETION_WINDOW_DAYS} days"
        except KeysealError:
            cleanup = "could NOT be scheduled for deletion: delete it yourself (kms:ScheduleKeyDeletion)"
        raise type(exc)(f"{exc.message}; the key {key_arn} just created for it {cleanup}") from exc
    return key_arn


def alias_exists(alias: str, endpoint: str | None, region: str | None = None) -> bool:
    """Whether a KMS alias names a key (one `kms:DescribeKey`); `keys rotate` uses it to find the next -vN."""
    validate_alias(alias)
    client = kms_client(endpoint, region)
    try:
        return describe_alias(client, alias) is not None
    finally:
        client.close()
