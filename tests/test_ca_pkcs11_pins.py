"""PKCS#11 custody trusts only the keys it pinned (#24): a second process with the user PIN adds key objects with
the keyset labels, CKA_ID all zeros, and a second marker naming them. Before pins, every reader switched to the
marker whose x509 id sorts lowest, so the active keyset became the attacker's: with an imported private key
(CKA_LOCAL false) SVIDs forged offline verified; with a public key object that does not match the private key,
the server issued SVIDs that verified against nothing. A planted stale keyset forced a rotation, and a marker
naming a missing key stopped the server. All against a real SoftHSM2 token."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.pkcs11 import Pkcs11KeysetSource, _Marker
from keyseal._internal.ca.server import build_source
from keyseal._internal.providers.pkcs11 import session as pkcs11_session
from keyseal.errors import CustodyIntegrityError
from tests.harness.ca import TRUST_DOMAIN, FakeClock, base_config
from tests.harness.softhsm import USER_PIN, SoftHsm

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

TOKEN = "keyseal-pins"
P256 = bytes.fromhex("06082a8648ce3d030107")
ZERO = {"x509": b"\x00" * 16, "jwt": b"\x00" * 15 + b"\x01"}


@pytest.fixture(scope="module")
def token(softhsm: SoftHsm) -> str:
    return softhsm.init_token(TOKEN)


@pytest.fixture(autouse=True)
def no_sessions_left() -> Iterator[None]:
    yield
    pkcs11_session.close_all_sessions()


@pytest.fixture
def config(tmp_path: Path, softhsm: SoftHsm, token: str) -> Any:
    pin_file = tmp_path / "pkcs11-pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    prefix = f"pins/{uuid.uuid4().hex[:8]}/"
    return parse_config(base_config(tmp_path, custody="pkcs11",
                                    pkcs11={"uri": f"pkcs11:token={TOKEN}", "modulePath": softhsm.module,
                                            "pinFile": str(pin_file), "labelPrefix": prefix}))


def manager_for(config: Any, clock: FakeClock | None = None) -> KeysetManager:
    if clock is None:
        return KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint)
    return KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint, clock)


def spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def ec_point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b"\x04" + bytes([len(raw)]) + raw  # DER OCTET STRING


def plant(source: Pkcs11KeysetSource, number: int, kind: str, key_id: bytes, how: str) -> bytes | None:
    """Objects another process with the user PIN makes under a keyset's labels. `how`: "generated" (a key pair
    made in the token), "imported" (a private key the attacker knows; returns its SPKI), or "mismatched" (a
    private key made in the token beside the public key object of another key)."""
    with pkcs11_session.token_session(source.token_uri) as access:
        attr, p11 = access.pkcs11.Attribute, access.pkcs11
        label = source.label(number, kind)
        with access.token.open(rw=True) as session:
            if how == "imported":
                secret = ec.generate_private_key(ec.SECP256R1())
                value = secret.private_numbers().private_value.to_bytes(32, "big")
                session.create_object({attr.CLASS: p11.ObjectClass.PRIVATE_KEY, attr.KEY_TYPE: p11.KeyType.EC,
                                       attr.TOKEN: True, attr.PRIVATE: True, attr.SENSITIVE: True,
                                       attr.EXTRACTABLE: False, attr.SIGN: True, attr.EC_PARAMS: P256,
                                       attr.VALUE: value, attr.LABEL: label, attr.ID: key_id})
                session.create_object({attr.CLASS: p11.ObjectClass.PUBLIC_KEY, attr.KEY_TYPE: p11.KeyType.EC,
                                       attr.TOKEN: True, attr.VERIFY: True, attr.EC_PARAMS: P256,
                                       attr.EC_POINT: ec_point(secret.public_key()), attr.LABEL: label,
                                       attr.ID: key_id})
                return spki(secret.public_key())
            public, _ = session.generate_keypair(
                p11.KeyType.EC, None, id=key_id, label=label, store=True, mechanism=p11.Mechanism.EC_KEY_PAIR_GEN,
                public_template={attr.TOKEN: True, attr.EC_PARAMS: P256, attr.VERIFY: True},
                private_template={attr.TOKEN: True, attr.PRIVATE: True, attr.SENSITIVE: True,
                                  attr.EXTRACTABLE: False, attr.SIGN: True})
            if how == "mismatched":
                public.destroy()
                other = ec.generate_private_key(ec.SECP256R1()).public_key()
                session.create_object({attr.CLASS: p11.ObjectClass.PUBLIC_KEY, attr.KEY_TYPE: p11.KeyType.EC,
                                       attr.TOKEN: True, attr.VERIFY: True, attr.EC_PARAMS: P256,
                                       attr.EC_POINT: ec_point(other), attr.LABEL: label, attr.ID: key_id})
                return spki(other)
    return None


def plant_keyset(config: Any, number: int, how: str, not_before: Any, ids: dict[str, bytes] = ZERO
                 ) -> dict[str, bytes | None]:
    rival = build_source(config)
    assert isinstance(rival, Pkcs11KeysetSource)
    planted = {kind: plant(rival, number, kind, ids[kind], how) for kind in ("x509", "jwt")}
    with pkcs11_session.token_session(rival.token_uri) as access:
        rival._write_marker(access, _Marker(number, not_before, ids))
    return planted


def alarm_count(reason: str) -> int:
    from keyseal._internal.ca.custody import alarms  # imported here: the attack assertions come first

    return alarms.counts().get(reason, 0)


@pytest.mark.parametrize("how", ["generated", "imported", "mismatched"])
def test_attacker_objects_with_zero_ids_do_not_replace_the_active_keyset(config: Any, how: str) -> None:
    first = manager_for(config)
    first.start()
    mine = first.active()
    planted = plant_keyset(config, 1, how, mine.not_before)
    readers = [manager_for(config) for _ in range(2)]
    for reader in readers:
        reader.start()
    first.refresh()
    for manager in (first, *readers):
        active = manager.active()
        assert spki(active.x509_key.public_key()) == spki(mine.x509_key.public_key())
        assert active.jwt_kid == mine.jwt_kid
        assert spki(active.ca_certificate.public_key()) not in planted.values()
        active.ca_certificate.verify_directly_issued_by(active.ca_certificate)
    assert alarm_count("unpinned-keyset") > 0


def test_adopting_an_imported_key_is_refused(config: Any) -> None:
    """A token from before pins, whose keyset 1 holds a key that was imported (the attacker knows it)."""
    clock = FakeClock()
    plant_keyset(config, 1, "imported", clock(), ids={"x509": b"\x11" * 16, "jwt": b"\x12" * 16})
    before = alarm_count("key-attributes")
    with pytest.raises(CustodyIntegrityError, match="CKA_LOCAL"):
        manager_for(config, clock).start()
    assert alarm_count("key-attributes") > before


def test_adopting_a_mismatched_public_key_is_refused(config: Any) -> None:
    """A keyset whose public key object is not its private key's: every signature would fail to verify."""
    clock = FakeClock()
    plant_keyset(config, 1, "mismatched", clock(), ids={"x509": b"\x21" * 16, "jwt": b"\x22" * 16})
    before = alarm_count("signature-check")
    with pytest.raises(CustodyIntegrityError, match="does not match"):
        manager_for(config, clock).start()
    assert alarm_count("signature-check") > before


def test_a_stale_planted_keyset_forces_no_rotation(config: Any) -> None:
    clock = FakeClock()
    manager = manager_for(config, clock)
    manager.start()
    active = manager.active()
    plant_keyset(config, 99, "generated", clock() - timedelta(days=30))
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active")]
    assert manager.active().jwt_kid == active.jwt_kid
    restarted = manager_for(config, clock)
    restarted.start()
    assert [(k.number, s) for k, s in restarted.live()] == [(1, "active")]
    # The rotation continues in sequence past the spent number.
    clock.advance(timedelta(hours=12))
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active"), (100, "prepared")]


def test_a_marker_naming_a_missing_key_is_ignored(config: Any) -> None:
    clock = FakeClock()
    manager = manager_for(config, clock)
    manager.start()
    source = manager.source
    assert isinstance(source, Pkcs11KeysetSource)
    with pkcs11_session.token_session(source.token_uri) as access:
        source._write_marker(access, _Marker(2, clock(), {"x509": b"\x31" * 16, "jwt": b"\x32" * 16}))
    before = alarm_count("unpinned-keyset")
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active")]
    restarted = manager_for(config, clock)
    restarted.start()  # a restart is not stopped by it
    assert restarted.active().jwt_kid == manager.active().jwt_kid
    assert alarm_count("unpinned-keyset") > before
    clock.advance(timedelta(hours=12))
    manager.refresh()  # and the rotation is not stalled: keyset 3 (2 is spent)
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active"), (3, "prepared")]


def test_a_pinned_keys_public_object_swapped_is_refused(config: Any) -> None:
    """Someone with the PIN replaces the public key object of the pinned X.509 key (same label and id)."""
    clock = FakeClock()
    manager = manager_for(config, clock)
    manager.start()
    source = manager.source
    assert isinstance(source, Pkcs11KeysetSource)
    with pkcs11_session.token_session(source.token_uri) as access:
        attr, p11 = access.pkcs11.Attribute, access.pkcs11
        label = source.label(1, "x509")
        with access.token.open(rw=True) as session:
            [public] = list(session.get_objects({attr.CLASS: p11.ObjectClass.PUBLIC_KEY, attr.LABEL: label}))
            key_id = public[attr.ID]
            public.destroy()
            other = ec.generate_private_key(ec.SECP256R1()).public_key()
            session.create_object({attr.CLASS: p11.ObjectClass.PUBLIC_KEY, attr.KEY_TYPE: p11.KeyType.EC,
                                   attr.TOKEN: True, attr.VERIFY: True, attr.EC_PARAMS: P256,
                                   attr.EC_POINT: ec_point(other), attr.LABEL: label, attr.ID: key_id})
    before = alarm_count("key-mismatch")
    with pytest.raises(CustodyIntegrityError, match="not the pinned public key"):
        manager_for(config, clock).start()
    assert alarm_count("key-mismatch") > before


def test_keysets_from_before_pins_are_adopted_once(config: Any, tmp_path: Path) -> None:
    clock = FakeClock()
    manager = manager_for(config, clock)
    manager.start()
    clock.advance(timedelta(hours=12))
    manager.refresh()
    [path] = list((tmp_path / "store").glob("*keyset-pins.json"))
    path.unlink()  # as an older keyseal left the token and the store
    upgraded = manager_for(config, clock)
    upgraded.start()
    assert [k.number for k in upgraded.loaded()] == [1, 2]
    assert [k.jwt_kid for k in upgraded.loaded()] == [k.jwt_kid for k in manager.loaded()]
    assert path.exists()
    restarted = manager_for(config, clock)
    restarted.start()
    assert [k.jwt_kid for k in restarted.loaded()] == [k.jwt_kid for k in manager.loaded()]


def test_duplicate_markers_are_not_chosen_between_at_adoption(config: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """An upgrade from a version without pins, on a token where another process with the user PIN added a second
    marker for the live keyset naming key pairs it generated with CKA_ID all zeros. Adoption took the lowest id
    (the rule readers followed before pins), so the attacker's keys were pinned and became the active keyset. Now
    two markers for one keyset are an alarm and that keyset is not adopted: neither is chosen."""
    clock = FakeClock()
    manager = manager_for(config, clock)
    manager.start()
    mine = manager.active()
    [path] = list((tmp_path / "store").glob("*keyset-pins.json"))
    path.unlink()  # as an older keyseal left the token and the store
    plant_keyset(config, 1, "generated", mine.not_before)
    before = alarm_count("unpinned-keyset")
    with caplog.at_level(logging.ERROR, logger="keyseal._internal.ca.custody"):
        upgraded = manager_for(config, clock)
        upgraded.start()
    pinned = json.loads(path.read_text())["pins"]
    zero = {ids.hex() for ids in ZERO.values()}
    assert not any(pin["keys"][kind]["id"] in zero for pin in pinned for kind in ("x509", "jwt"))
    assert 1 not in [pin["keyset"] for pin in pinned]
    assert upgraded.active().number != 1
    assert alarm_count("unpinned-keyset") > before
    assert any("markers" in r.getMessage() and "not adopted" in r.getMessage() for r in caplog.records)
    restarted = manager_for(config, clock)
    restarted.start()  # from now on the pins decide: the same keyset, no adoption
    assert restarted.active().jwt_kid == upgraded.active().jwt_kid
