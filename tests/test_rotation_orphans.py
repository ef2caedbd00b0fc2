"""A KMS rotation that creates its key and then cannot mint the certificate tags the new key
`keyseal:orphaned=rotation-failed` (checked server-side with ListResourceTags), so it can be found and scheduled
for deletion instead of lingering as an unnoticed orphan."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import assert_one_line_error, run_keyseal
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

USER_ID = ("--name", "Example Releases", "--email", "releases@example.org")


def tags_of(client: Any, key_id: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in client.list_resource_tags(KeyId=key_id)["Tags"]}


def target_of(client: Any, alias: str) -> str | None:
    for page in client.get_paginator("list_aliases").paginate():
        for entry in page["Aliases"]:
            if entry["AliasName"] == alias:
                return str(entry["TargetKeyId"])
    return None


def make_current(alias: str) -> None:
    created = run_keyseal("keys", "create", "--kms", "--alias", alias, "--type", "p256")
    assert created.returncode == 0, created.stderr


def test_mint_failure_tags_the_new_key(kms_emulator: KmsEmulator, kms_client: Any) -> None:
    alias = f"alias/orphan-{uuid.uuid4().hex[:8]}"
    make_current(alias)
    kms_emulator.deny("testing", "Sign")  # the CI role lacks kms:Sign: the self-signature fails after CreateKey
    before = datetime.now(UTC).replace(microsecond=0)
    result = run_keyseal("keys", "rotate", "--kms", "--alias", alias, *USER_ID)
    after = datetime.now(UTC)
    assert_one_line_error(result)
    line = result.stderr.strip()
    assert f"created {alias}-v2" in line and "could not mint its certificate" in line
    assert "tagged keyseal:orphaned=rotation-failed" in line and "schedule-key-deletion" in line

    key_id = target_of(kms_client, f"{alias}-v2")
    assert key_id is not None
    tags = tags_of(kms_client, key_id)
    assert tags["keyseal:orphaned"] == "rotation-failed"
    assert tags["keyseal:orphaned-alias"] == f"{alias}-v2"
    at = datetime.strptime(tags["keyseal:orphaned-at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= at <= after + timedelta(seconds=1)
    # The current key, and a rotation that succeeds, carry no such tag.
    current = target_of(kms_client, alias)
    assert current is not None and "keyseal:orphaned" not in tags_of(kms_client, current)
    kms_emulator.allow_all()
    retried = run_keyseal("keys", "rotate", "--kms", "--alias", alias, *USER_ID)
    assert retried.returncode == 0, retried.stderr
    assert f"{alias}-v3" in retried.stderr.split()
    v3 = target_of(kms_client, f"{alias}-v3")
    assert v3 is not None and tags_of(kms_client, v3) == {}


def test_untaggable_key_is_reported(kms_emulator: KmsEmulator, kms_client: Any) -> None:
    """Without kms:TagResource the message says the key is untagged and how to delete it."""
    alias = f"alias/orphan-{uuid.uuid4().hex[:8]}"
    make_current(alias)
    kms_emulator.deny("testing", "Sign")
    kms_emulator.deny("testing", "TagResource")
    result = run_keyseal("keys", "rotate", "--kms", "--alias", alias, *USER_ID)
    assert_one_line_error(result)
    assert "tagging it keyseal:orphaned=rotation-failed also failed" in result.stderr
    key_id = target_of(kms_client, f"{alias}-v2")
    assert key_id is not None and "--key-id arn:aws:kms:" in result.stderr
    assert tags_of(kms_client, key_id) == {}
