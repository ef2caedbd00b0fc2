"""Key-manager custody never leaves a half-created keyset in use, and every KMS key a failed or crashed keyset
creation made is tagged `keyseal:orphaned` (read back server-side with ListResourceTags) and, where allowed,
scheduled for deletion. Faults are injected by the emulator over HTTP, after the step that should succeed."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.hashes import SHA256

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.kms import KmsKeysetSource
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.pin_store import DirectoryPinStore
from keyseal._internal.ca.custody.pins import KeysetPins
from keyseal._internal.ca.server import build_source
from keyseal._internal.providers.aws.iam import CA_SERVER_CLEANUP_PERMISSIONS, CA_SERVER_PERMISSIONS, ca_server_policy
from keyseal.errors import KeysealError
from tests.conftest import REGION
from tests.harness.ca import TRUST_DOMAIN, FakeClock, base_config
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def admin(kms_emulator: KmsEmulator) -> Any:
    """A separate caller (its own access key id), so denials set for the server do not touch it."""
    return boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                        aws_access_key_id="admin", aws_secret_access_key="admin")


def all_keys(client: Any) -> set[str]:
    return {k["KeyId"] for page in client.get_paginator("list_keys").paginate() for k in page["Keys"]}


def aliases_of(client: Any, prefix: str) -> dict[str, str]:
    return {a["AliasName"]: a["TargetKeyId"] for page in client.get_paginator("list_aliases").paginate()
            for a in page["Aliases"] if a["AliasName"].startswith(f"alias/{prefix}/")}


def tags_of(client: Any, key_id: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in client.list_resource_tags(KeyId=key_id)["Tags"]}


def state_of(client: Any, key_id: str) -> str:
    return str(client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"])


def new_manager(tmp: Path, endpoint: str, prefix: str, clock: FakeClock) -> KeysetManager:
    config = parse_config(base_config(tmp, custody="kms", aws={"endpoints": {"kms": endpoint},
                                                               "keyManager": {"aliasPrefix": prefix}}))
    return KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint, clock)


def assert_signs(manager: KeysetManager, number: int) -> None:
    """The active keyset is `number` and its KMS key still signs (verified locally)."""
    keyset = manager.active()
    assert keyset.number == number
    digest = hashlib.sha256(b"still serving").digest()
    signature = keyset.x509_key.sign_digest(digest, "sha256")
    public = keyset.x509_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(SHA256())))


# (operation, calls let through first, error code, HTTP status, times): each fails one step of keyset 2 after
# its X.509 key exists. Retryable faults are injected as often as the retry bound (KEYSEAL_KMS_MAX_ATTEMPTS=2).
FAULTS = {
    "jwt-CreateKey": ("CreateKey", 1, "AccessDeniedException", 400, 1),
    "jwt-GetPublicKey": ("GetPublicKey", 1, "ThrottlingException", 400, 2),
    "jwt-CreateAlias": ("CreateAlias", 0, "KMSInternalException", 500, 2),
    "x509-CreateAlias": ("CreateAlias", 1, "KMSInternalException", 500, 2),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_rotation_orphans_its_keys(fault: str, tmp_path: Path, kms_emulator: KmsEmulator,
                                          aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "2")
    operation, after, code, status, times = FAULTS[fault]
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    client = admin(kms_emulator)
    clock = FakeClock()
    manager = new_manager(tmp_path, kms_emulator.endpoint, prefix, clock)
    manager.start()
    first = set(aliases_of(client, prefix).values())
    assert all(tags_of(client, key)["keyseal:state"] == "active" for key in first)

    clock.advance(timedelta(hours=12))  # keyset 2 is due
    before = all_keys(client)
    kms_emulator.fail(operation, times, code=code, status=status, after=after)
    with pytest.raises(KeysealError) as raised:
        manager.refresh()
    assert kms_emulator.faults_injected[operation] == times
    made = all_keys(client) - before
    assert made, "the X.509 key of keyset 2 was created before the fault"
    assert "tagged keyseal:orphaned and scheduled for deletion" in raised.value.message
    for key in made:
        tags = tags_of(client, key)
        assert tags["keyseal:orphaned"] == "rotation-failed", tags
        assert tags["keyseal:state"] == "orphaned"
        assert tags["keyseal:keyset"] == "2" and tags["keyseal:trust-domain"] == TRUST_DOMAIN
        assert tags["keyseal:orphaned-detail"].endswith(" failed")
        assert state_of(client, key) == "PendingDeletion"
    kinds = sorted(tags_of(client, key)["keyseal:kind"] for key in made)
    assert kinds == (["x509"] if fault == "jwt-CreateKey" else ["jwt", "x509"])
    # Nothing of keyset 2 is published or used: no alias left, the old keyset keeps serving.
    assert set(aliases_of(client, prefix)) == {f"alias/{prefix}/keyset-1-x509", f"alias/{prefix}/keyset-1-jwt"}
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active")]
    assert_signs(manager, 1)

    # A later retry (the rotation thread's next tick) makes a complete keyset 2.
    kms_emulator.allow_all()
    before = all_keys(client)
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active"), (2, "prepared")]
    second = all_keys(client) - before
    assert len(second) == 2
    assert set(aliases_of(client, prefix).values()) == first | second
    for key in second:
        tags = tags_of(client, key)
        assert tags["keyseal:state"] == "active" and "keyseal:orphaned" not in tags
        assert state_of(client, key) == "Enabled"
    clock.advance(timedelta(hours=8))
    assert_signs(manager, 2)


def test_untidy_failure_spends_the_number(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Without kms:DeleteAlias and kms:ScheduleKeyDeletion, a commit that fails leaves keyset 2's JWT alias
    and its keys (tagged, still enabled): keyset 2 is never used, and the retry makes keyset 3."""
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    client = admin(kms_emulator)
    clock = FakeClock()
    manager = new_manager(tmp_path, kms_emulator.endpoint, prefix, clock)
    manager.start()
    clock.advance(timedelta(hours=12))
    before = all_keys(client)
    kms_emulator.fail("CreateAlias", 1, code="AccessDeniedException", after=1)  # the X.509 alias (commit)
    kms_emulator.deny("testing", "DeleteAlias")
    kms_emulator.deny("testing", "ScheduleKeyDeletion")
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.custody.kms"), \
            pytest.raises(KeysealError) as raised:
        manager.refresh()
    assert "its deletion could not be scheduled" in raised.value.message
    made = all_keys(client) - before
    assert len(made) == 2
    for key in made:
        assert tags_of(client, key)["keyseal:orphaned"] == "rotation-failed"
        assert state_of(client, key) == "Enabled"  # deletion was denied: the tag is the finding aid
    warnings = [r.getMessage() for r in caplog.records if "deletion not scheduled" in r.getMessage()]
    assert len(warnings) == 2 and all("tagged keyseal:orphaned=rotation-failed" in w for w in warnings)
    assert f"alias/{prefix}/keyset-2-jwt" in aliases_of(client, prefix)

    kms_emulator.allow_all()
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active"), (3, "prepared")]
    assert manager.keyset(2) is None


def test_lost_race_orphans_the_losers_keys(tmp_path: Path, kms_emulator: KmsEmulator,
                                           aws_env: dict[str, str]) -> None:
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    client = admin(kms_emulator)
    pins = DirectoryPinStore(tmp_path / "store", "pins")
    winner = KmsKeysetSource(TRUST_DOMAIN, prefix, "p256", "p256", endpoint=kms_emulator.endpoint,
                             pins=KeysetPins(pins, TRUST_DOMAIN, "kms", prefix))
    loser = KmsKeysetSource(TRUST_DOMAIN, prefix, "p256", "p256", endpoint=kms_emulator.endpoint,
                            pins=KeysetPins(pins, TRUST_DOMAIN, "kms", prefix))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert winner.create(1, now, now - timedelta(days=1))
    targets = set(aliases_of(client, prefix).values())
    before = all_keys(client)
    assert not loser.create(1, now, now - timedelta(days=1))
    lost = all_keys(client) - before
    assert len(lost) == 2
    for key in lost:
        assert tags_of(client, key)["keyseal:orphaned"] == "lost-race"
        assert state_of(client, key) == "PendingDeletion"
    assert set(aliases_of(client, prefix).values()) == targets
    loaded = loser.load(now - timedelta(days=1))
    assert [k.number for k in loaded.keysets] == [1] and loaded.highest == 1


def create_pending(client: Any, prefix: str, number: int | str, kind: str, created_at: datetime,
                   trust_domain: str = TRUST_DOMAIN) -> str:
    """What a server killed between CreateKey and its commit leaves: a tagged `pending` key."""
    tags = {"keyseal:trust-domain": trust_domain, "keyseal:alias-prefix": prefix, "keyseal:keyset": str(number),
            "keyseal:kind": kind, "keyseal:state": "pending",
            "keyseal:created-at": created_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    description = (f"keyseal CA key: trust domain {trust_domain}, keyset {number} ({kind}), "
                   f"not before 2030-01-01T00:00:00Z")
    key = client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256", Description=description,
                            Tags=[{"TagKey": k, "TagValue": v} for k, v in tags.items()])
    return str(key["KeyMetadata"]["KeyId"])


def test_startup_orphans_what_a_crash_left(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    client = admin(kms_emulator)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    crashed = create_pending(client, prefix, 1, "x509", hour_ago)  # killed before any alias
    # Killed between the two aliases: keyset 4's JWT alias exists, its X.509 alias (the commit) does not.
    half = create_pending(client, prefix, 4, "jwt", hour_ago)
    client.create_alias(AliasName=f"alias/{prefix}/keyset-4-jwt", TargetKeyId=half)
    young = create_pending(client, prefix, 1, "jwt", datetime.now(UTC))  # another replica, still creating
    other_domain = create_pending(client, prefix, 1, "x509", hour_ago, trust_domain="other.example")

    manager = new_manager(tmp_path, kms_emulator.endpoint, prefix, FakeClock())
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.custody.kms"):
        manager.start()
    for key in (crashed, half):
        tags = tags_of(client, key)
        assert tags["keyseal:orphaned"] == "abandoned" and tags["keyseal:state"] == "orphaned"
        assert state_of(client, key) == "PendingDeletion"
        assert any(key in r.getMessage() and "deletion scheduled" in r.getMessage() for r in caplog.records)
    for key in (young, other_domain):
        assert tags_of(client, key)["keyseal:state"] == "pending" and state_of(client, key) == "Enabled"
    # The half keyset 4 is never used: the first keyset this server makes is 5.
    assert [k.number for k, _ in manager.live()] == [5]
    assert_signs(manager, 5)

    # A second startup finds nothing more to do (the orphans are tagged once).
    caplog.clear()
    again = new_manager(tmp_path, kms_emulator.endpoint, prefix, FakeClock())
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.custody.kms"):
        again.start()
    assert not [r for r in caplog.records if "orphaned KMS key" in r.getMessage()]


def test_a_keyset_tag_that_is_not_ascii_digits_is_no_number(tmp_path: Path, kms_emulator: KmsEmulator,
                                                             aws_env: dict[str, str]) -> None:
    """`keyseal:keyset=²`: str.isdigit() took it and int() did not, so the startup sweep raised ValueError and the
    server did not start. Such a key is an orphan like any other, of keyset 0."""
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    client = admin(kms_emulator)
    odd = create_pending(client, prefix, "\u00b2", "x509", datetime.now(UTC) - timedelta(hours=1))
    manager = new_manager(tmp_path, kms_emulator.endpoint, prefix, FakeClock())
    manager.start()
    assert tags_of(client, odd)["keyseal:state"] == "orphaned"


def test_incomplete_keyset_is_never_used(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    """An X.509 alias without its JWT alias (left by an older writer, or a deleted alias) is skipped, not
    completed: the server makes the next keyset instead."""
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    client = admin(kms_emulator)
    key = create_pending(client, prefix, 1, "x509", datetime.now(UTC))
    client.create_alias(AliasName=f"alias/{prefix}/keyset-1-x509", TargetKeyId=key)
    manager = new_manager(tmp_path, kms_emulator.endpoint, prefix, FakeClock())
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.custody"):
        manager.start()
    assert [k.number for k, _ in manager.live()] == [2]
    assert any("keyset 1 is incomplete" in r.getMessage() for r in caplog.records)
    assert f"alias/{prefix}/keyset-1-jwt" not in aliases_of(client, prefix)


def test_server_needs_only_the_listed_permissions(tmp_path: Path, kms_emulator: KmsEmulator,
                                                  aws_env: dict[str, str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Every KMS operation the server makes (a startup, a failed and a good rotation) is in the IAM lists; and
    without the search permission it still starts, saying what it could not do."""
    prefix = f"orphans/{uuid.uuid4().hex[:8]}"
    create_pending(admin(kms_emulator), prefix, 1, "x509", datetime.now(UTC) - timedelta(hours=1))
    kms_emulator.calls.clear()
    clock = FakeClock()
    manager = new_manager(tmp_path, kms_emulator.endpoint, prefix, clock)
    manager.start()
    clock.advance(timedelta(hours=12))
    kms_emulator.fail("CreateAlias", 1, code="AccessDeniedException", after=1)
    with pytest.raises(KeysealError):
        manager.refresh()
    manager.refresh()
    kms_emulator.deny("testing", "ListResourceTags")
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca.custody.kms"):
        restarted = new_manager(tmp_path, kms_emulator.endpoint, prefix, clock)
        restarted.start()  # loads keysets 1 and 2 (DescribeKey + GetPublicKey), the search denied
    assert any("could not look for orphaned CA keys" in r.getMessage() and "kms:ListResourceTags" in r.getMessage()
               for r in caplog.records)
    assert [k.number for k, _ in restarted.live()] == [1, 2]

    used = {f"kms:{operation}" for operation, caller in kms_emulator.calls.callers if caller == "testing"}
    assert used == set(CA_SERVER_PERMISSIONS) | set(CA_SERVER_CLEANUP_PERMISSIONS)
    policy = json.dumps(ca_server_policy(TRUST_DOMAIN, prefix))
    assert all(f'"{permission}"' in policy for permission in used)
