"""KMS custody trusts only the keys it pinned (#24): someone who may create KMS keys and aliases in the account
cannot make the CA sign with a key of theirs, publish one, or force a rotation by planting aliases.

Each test plays the attacker with the emulator's admin credentials: CreateKey with a copied description,
UpdateAlias/CreateAlias onto the CA's alias names. The server must keep signing with the keys it made, keep its
bundle, and raise a custody alarm (log line and keyseal_custody_alarms_total)."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.pin_store import ConfigMapPinStore
from keyseal._internal.ca.server import CaServer, build_source
from keyseal.errors import CustodyIntegrityError, StoreConflictError
from tests.harness.ca import TRUST_DOMAIN, FakeClock
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.kube_api import KubeApi
from tests.test_ca_kms_custody import admin, kms_config

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def attacker_key(client: Any, number: int, kind: str, not_before: datetime) -> str:
    """A key the attacker made, with the description keyseal would have given it."""
    description = (f"keyseal CA key: trust domain {TRUST_DOMAIN}, keyset {number} ({kind}), "
                   f"not before {not_before:%Y-%m-%dT%H:%M:%SZ}")
    return str(client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256",
                                 Description=description)["KeyMetadata"]["KeyId"])


def public_of(client: Any, key_id: str) -> bytes:
    return bytes(client.get_public_key(KeyId=key_id)["PublicKey"])


def same_ca(one: Any, other: Any) -> bool:
    """The same CA (a KMS ECDSA signature differs each time the certificate is built, so not the same bytes)."""
    return bool(spki(one.ca_certificate.public_key()) == spki(other.ca_certificate.public_key())
                and one.ca_certificate.serial_number == other.ca_certificate.serial_number)


def alarm_count(reason: str) -> int:
    from keyseal._internal.ca.custody import alarms  # imported here: the attack assertions come first

    return alarms.counts().get(reason, 0)


def manager_for(config: Any, clock: FakeClock) -> KeysetManager:
    return KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint, clock)


def test_a_repointed_alias_is_not_followed(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    first = CaServer(config)
    first.start()
    original = first.manager.active()
    first.shutdown()

    client = admin(kms_emulator)
    planted = {kind: attacker_key(client, 1, kind, original.not_before) for kind in ("x509", "jwt")}
    for kind, key_id in planted.items():
        client.update_alias(AliasName=f"alias/{prefix}/keyset-1-{kind}", TargetKeyId=key_id)
    before = alarm_count("alias-moved")

    caplog.set_level(logging.ERROR, logger="keyseal._internal.ca.custody")
    restarted = CaServer(parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix)))
    restarted.start()
    try:
        active = restarted.manager.active()
        # The restarted replica signs with the key keyseal made, not the alias's new target: same CA certificate,
        # same bundle as the replica that made it.
        assert spki(active.ca_certificate.public_key()) == spki(original.ca_certificate.public_key())
        assert spki(active.ca_certificate.public_key()) != public_of(client, planted["x509"])
        assert spki(active.jwt_key.public_key()) != public_of(client, planted["jwt"])
        assert same_ca(active, original) and active.jwt_kid == original.jwt_kid
        assert alarm_count("alias-moved") >= before + 2
        assert any("CUSTODY ALARM (alias-moved)" in r.getMessage() and planted["x509"] in r.getMessage()
                   for r in caplog.records)
        assert b'keyseal_custody_alarms_total{reason="alias-moved"}' in restarted.metrics.render()
    finally:
        restarted.shutdown()


def test_planted_next_keyset_is_neither_published_nor_activated(
        tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = manager_for(config, clock)
    manager.start()

    client = admin(kms_emulator)
    clock.advance(timedelta(hours=1))
    planted = {kind: attacker_key(client, 2, kind, clock()) for kind in ("x509", "jwt")}
    for kind in ("jwt", "x509"):
        client.create_alias(AliasName=f"alias/{prefix}/keyset-2-{kind}", TargetKeyId=planted[kind])
    before = alarm_count("unpinned-keyset")
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active")]  # keyset 2 is not published
    assert alarm_count("unpinned-keyset") > before

    # The rotation makes keyset 3 (2 is spent) with keys of its own, and that is what becomes active.
    clock.advance(timedelta(hours=11))
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active"), (3, "prepared")]
    clock.advance(timedelta(hours=8))
    manager.refresh()
    active = manager.active()
    assert active.number == 3
    planted_keys = {public_of(client, key_id) for key_id in planted.values()}
    assert spki(active.x509_key.public_key()) not in planted_keys
    assert spki(active.jwt_key.public_key()) not in planted_keys

    # Another replica starting now sees the same keysets.
    other = manager_for(config, clock)
    other.start()
    assert [(k.number, s) for k, s in other.live()] == [(1, "old"), (3, "active")]
    assert same_ca(other.active(), active)


def test_a_stale_planted_keyset_forces_no_rotation(tmp_path: Path, kms_emulator: KmsEmulator,
                                                   aws_env: dict[str, str]) -> None:
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = manager_for(config, clock)
    manager.start()
    active = manager.active()

    client = admin(kms_emulator)
    for kind in ("jwt", "x509"):
        client.create_alias(AliasName=f"alias/{prefix}/keyset-99-{kind}",
                            TargetKeyId=attacker_key(client, 99, kind, clock() - timedelta(days=30)))
    kms_emulator.calls.clear()
    manager.refresh()
    assert manager.active().number == 1 and same_ca(manager.active(), active)
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active")]
    assert kms_emulator.calls.counts().get("CreateKey", 0) == 0  # no keyset 100, active at once
    restarted = manager_for(config, clock)
    restarted.start()
    assert same_ca(restarted.active(), active)


def test_a_rewritten_pin_record_is_refused(tmp_path: Path, kms_emulator: KmsEmulator,
                                           aws_env: dict[str, str]) -> None:
    """Someone who may write the store and create KMS keys, but cannot sign with the CA key, swaps a pinned key."""
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = manager_for(config, clock)
    manager.start()
    clock.advance(timedelta(hours=12))
    manager.refresh()  # keyset 2, signed by keyset 1
    client = admin(kms_emulator)
    [path] = list((tmp_path / "store").glob("*keyset-pins.json"))
    document = json.loads(path.read_text())
    assert [p["keyset"] for p in document["pins"]] == [1, 2] and document["pins"][1]["signedBy"] == 1
    rogue = client.describe_key(KeyId=attacker_key(client, 2, "x509", clock()))["KeyMetadata"]
    document["pins"][1]["keys"]["x509"] = {
        "id": rogue["Arn"],
        "spki": base64.b64encode(public_of(client, rogue["KeyId"])).decode()}
    path.write_text(json.dumps(document))
    before = alarm_count("pin-chain")
    with pytest.raises(CustodyIntegrityError, match="does not verify"):
        manager_for(config, clock).start()
    with pytest.raises(CustodyIntegrityError):
        manager.refresh()
    assert manager.active().number == 1  # the running replica keeps what it had
    assert alarm_count("pin-chain") > before


def test_a_running_replica_refuses_a_forged_successor_pin(tmp_path: Path, kms_emulator: KmsEmulator,
                                                           aws_env: dict[str, str]) -> None:
    """Someone who may write the store and create KMS keys replaces the pin record with one pin: keyset 3, "signed
    by" keyset 2 (which the running replica accepted) with a signature that is not keyset 2's, naming their own
    keys. The replica took this for a prune (the first pin's signature was never checked) and published, then
    activated, the attacker's keys; it must refuse, alarm, and keep its keysets."""
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = manager_for(config, clock)
    manager.start()
    clock.advance(timedelta(hours=12))
    manager.refresh()  # keyset 2, signed by keyset 1: the running replica's anchor
    assert [k.number for k, _ in manager.live()] == [1, 2]
    client = admin(kms_emulator)
    rogue = {kind: client.describe_key(KeyId=attacker_key(client, 3, kind, clock()))["KeyMetadata"]
             for kind in ("x509", "jwt")}
    [path] = list((tmp_path / "store").glob("*keyset-pins.json"))
    document = json.loads(path.read_text())
    genuine = path.read_text()
    document["pins"] = [{
        "keyset": 3, "notBefore": f"{clock():%Y-%m-%dT%H:%M:%SZ}", "signedBy": 2,
        "keys": {kind: {"id": rogue[kind]["Arn"], "spki": base64.b64encode(public_of(client, rogue[kind]["KeyId"]))
                        .decode()} for kind in ("x509", "jwt")},
        "signature": base64.b64encode(b"not keyset 2's signature").decode()}]
    path.write_text(json.dumps(document))
    before = alarm_count("pin-chain")
    with pytest.raises(CustodyIntegrityError, match="keyset 2"):
        manager.refresh()
    clock.advance(timedelta(hours=8))
    with pytest.raises(CustodyIntegrityError):
        manager.refresh()
    assert [k.number for k, _ in manager.live()] == [1, 2]  # the running replica keeps what it had
    rogue_keys = {public_of(client, metadata["KeyId"]) for metadata in rogue.values()}
    assert spki(manager.active().x509_key.public_key()) not in rogue_keys
    assert alarm_count("pin-chain") > before
    path.write_text(genuine)  # restored from a backup: the replica carries on
    manager.refresh()
    assert manager.active().number == 2


def test_pins_in_the_kubernetes_store_are_shared_by_replicas(
        tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str], kube_api: KubeApi, namespace: str) -> None:
    """With store.type kubernetes the pins are one ConfigMap every replica reads (written only conditionally),
    under exactly the RBAC the chart grants: get and update on it by name, create on configmaps."""
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix,
                                     store={"type": "kubernetes", "kubernetes": {"namespace": namespace}}))
    clock = FakeClock()
    first = KeysetManager(build_source(config, kube_api.api_client()), TRUST_DOMAIN, config.ca_ttl,
                          config.refresh_hint, clock)
    first.start()
    client = admin(kms_emulator)
    planted = attacker_key(client, 1, "x509", clock())
    client.update_alias(AliasName=f"alias/{prefix}/keyset-1-x509", TargetKeyId=planted)
    second = KeysetManager(build_source(config, kube_api.api_client()), TRUST_DOMAIN, config.ca_ttl,
                           config.refresh_hint, clock)
    second.start()
    assert same_ca(second.active(), first.active())
    assert spki(second.active().x509_key.public_key()) != public_of(client, planted)
    name = f"{config.record_prefix}-keyset-pins"
    used = {(verb, resource, obj) for verb, _, resource, obj in kube_api.verbs()
            if resource == "configmaps" and obj in (name, "")}
    assert used <= {("get", "configmaps", name), ("update", "configmaps", name), ("create", "configmaps", "")}
    assert ("create", "configmaps", "") in used

    store = ConfigMapPinStore(kube_api.api_client(), namespace, name)
    found = store.read()
    assert found is not None and json.loads(found[0])["pins"][0]["keyset"] == 1
    store.write(found[0], found[1])  # the revision it read: accepted
    with pytest.raises(StoreConflictError):
        store.write(found[0], found[1])  # that revision is stale now: refused, nothing written


def test_keysets_from_before_pins_are_adopted_once(tmp_path: Path, kms_emulator: KmsEmulator,
                                                   aws_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """A store without a pin record (an upgrade): the live keysets the aliases name are pinned on first use and
    logged; expired ones and keys described for another trust domain are not."""
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = manager_for(config, clock)
    manager.start()
    clock.advance(timedelta(hours=12))
    manager.refresh()
    before = {k.number: k for k in manager.loaded()}
    [path] = list((tmp_path / "store").glob("*keyset-pins.json"))
    path.unlink()  # as an older keyseal left it
    client = admin(kms_emulator)
    foreign = attacker_key(client, 3, "x509", clock())
    client.update_key_description(KeyId=foreign, Description=f"keyseal CA key: trust domain other.org, keyset 3 "
                                                              f"(x509), not before {clock():%Y-%m-%dT%H:%M:%SZ}")
    client.create_alias(AliasName=f"alias/{prefix}/keyset-3-jwt", TargetKeyId=attacker_key(client, 3, "jwt", clock()))
    client.create_alias(AliasName=f"alias/{prefix}/keyset-3-x509", TargetKeyId=foreign)

    with caplog.at_level(logging.WARNING):
        upgraded = manager_for(config, clock)
        upgraded.start()
    assert [k.number for k in upgraded.loaded()] == [1, 2]
    for number, keyset in before.items():
        assert same_ca(upgraded.keyset(number), keyset)
    assert any("trust on first use" in r.getMessage() for r in caplog.records)
    assert [p["keyset"] for p in json.loads(path.read_text())["pins"]] == [1, 2]
    # From now on the pins hold: the restarted replica needs no adoption.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        manager_for(config, clock).start()
    assert not any("trust on first use" in r.getMessage() for r in caplog.records)


def test_aliases_naming_an_unusable_key_stop_nothing(tmp_path: Path, kms_emulator: KmsEmulator,
                                                     aws_env: dict[str, str]) -> None:
    """The KMS form of a marker naming a missing key: keyset-2 aliases on a key pending deletion made a load raise,
    so a restart refused to start and the rotation stalled. Unpinned, they are ignored with an alarm."""
    prefix = f"pins/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = manager_for(config, clock)
    manager.start()
    client = admin(kms_emulator)
    for kind in ("jwt", "x509"):
        doomed = attacker_key(client, 2, kind, clock())
        client.create_alias(AliasName=f"alias/{prefix}/keyset-2-{kind}", TargetKeyId=doomed)
        client.schedule_key_deletion(KeyId=doomed, PendingWindowInDays=7)
    before = alarm_count("unpinned-keyset")
    restarted = manager_for(config, clock)
    restarted.start()
    assert [(k.number, s) for k, s in restarted.live()] == [(1, "active")]
    assert alarm_count("unpinned-keyset") > before
    clock.advance(timedelta(hours=12))
    restarted.refresh()
    assert [(k.number, s) for k, s in restarted.live()] == [(1, "active"), (3, "prepared")]
