"""The keyset pin chain on its own (ca.custody.pins): each pin signed by the previous keyset's X.509 key, a chain
that does not verify refused, a running replica refusing a rewritten chain, and the chain kept short."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.ca.custody.keys import CaKey, MemoryCaKey
from keyseal._internal.ca.custody.pin_store import ConfigMapPinStore, DirectoryPinStore, PinStore
from keyseal._internal.ca.custody.pins import KEEP, KeysetPins, NewPin, Pin, spki_of
from keyseal.errors import CustodyIntegrityError

START = datetime(2030, 1, 1, tzinfo=UTC)


def new_keys() -> dict[str, tuple[str, CaKey]]:
    return {kind: (f"{kind}-{id(object())}", MemoryCaKey(ec.generate_private_key(ec.SECP256R1())))
            for kind in ("x509", "jwt")}


class Chain:
    """A writer that remembers the keys it pinned (as a custody would open them again)."""

    def __init__(self, store: PinStore) -> None:
        self.pins = KeysetPins(store, "example.org", "kms", "keyseal/example_org")
        self.keys: dict[int, dict[str, tuple[str, CaKey]]] = {}

    def add(self, number: int) -> bool:
        self.keys[number] = new_keys()
        entry = NewPin(number, START + timedelta(hours=12 * number), self.keys[number])
        return self.pins.append([entry], self.signer)

    def signer(self, pin: Pin) -> CaKey:
        return self.keys[pin.number]["x509"][1]


def reader(store: PinStore) -> KeysetPins:
    return KeysetPins(store, "example.org", "kms", "keyseal/example_org")


def test_chain_verifies_and_binds_its_scope(tmp_path: Path) -> None:
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    assert writer.add(1) and writer.add(2) and writer.add(3)
    assert not writer.add(2)  # a keyset already pinned (or an older one) is not pinned again
    chain = reader(store).read()
    assert chain is not None and [(p.number, p.signed_by) for p in chain] == [(1, 1), (2, 1), (3, 2)]
    assert chain[2].keys["x509"].id == writer.keys[3]["x509"][0]
    for other in (KeysetPins(store, "other.org", "kms", "keyseal/example_org"),
                  KeysetPins(store, "example.org", "pkcs11", "keyseal/example_org"),
                  KeysetPins(store, "example.org", "kms", "keyseal/other")):
        with pytest.raises(CustodyIntegrityError, match="not this custody's keyset pin record"):
            other.read()


@pytest.mark.parametrize("tamper", ["signature", "key", "order", "signer"])
def test_a_changed_pin_is_refused(tmp_path: Path, tamper: str) -> None:
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    for number in (1, 2, 3):
        writer.add(number)
    document = json.loads(store.path.read_text())
    pins = document["pins"]
    if tamper == "signature":
        pins[1]["signature"] = pins[2]["signature"]
    elif tamper == "key":
        pins[2]["keys"]["jwt"] = pins[1]["keys"]["jwt"]
    elif tamper == "order":
        pins[1], pins[2] = pins[2], pins[1]
    else:
        pins[2]["signedBy"] = 1
    store.path.write_text(json.dumps(document))
    with pytest.raises(CustodyIntegrityError):
        reader(store).read()


def test_a_running_replica_refuses_a_rewritten_chain(tmp_path: Path) -> None:
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    writer.add(1)
    writer.add(2)
    running = reader(store)
    assert running.read() is not None
    saved = store.path.read_bytes()
    store.path.unlink()
    forger = Chain(store)  # someone who may write the store, with keys of their own: a consistent new chain
    forger.add(1)
    forger.add(2)
    with pytest.raises(CustodyIntegrityError, match="rewritten"):
        running.read()
    assert reader(store).read() is not None  # a fresh replica cannot tell: the store is the root of trust
    store.path.unlink()
    with pytest.raises(CustodyIntegrityError, match="has gone"):
        running.read()
    store.path.write_bytes(saved)
    assert running.read() is not None


@pytest.mark.slow
def test_the_chain_keeps_its_newest_pins(tmp_path: Path) -> None:
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    running = reader(store)
    for number in range(1, KEEP + 6):
        writer.add(number)
        assert running.read() is not None  # pruning the oldest pin is not a rewrite
    chain = reader(store).read()
    assert chain is not None and len(chain) == KEEP and chain[-1].number == KEEP + 5
    assert chain[0].signed_by == chain[0].number - 1  # its signer was pruned: the first pin is the root now


# -- a running replica and pins it did not see signed (the anchor) ---------------------------------------------

@pytest.fixture(params=["directory", "configmap"])
def pin_store(request: pytest.FixtureRequest, tmp_path: Path) -> PinStore:
    """The two real pin stores: a file in the store directory, a ConfigMap in the Kubernetes API emulator."""
    if request.param == "directory":
        return DirectoryPinStore(tmp_path, "pins")
    kube_api = request.getfixturevalue("kube_api")
    return ConfigMapPinStore(kube_api.api_client(), request.getfixturevalue("namespace"), "pins")


def document_of(store: PinStore) -> dict[str, Any]:
    found = store.read()
    assert found is not None
    return dict(json.loads(found[0]))


def overwrite(store: PinStore, document: dict[str, Any]) -> None:
    """What someone who may write the store (but not sign as the CA) does."""
    found = store.read()
    store.write(json.dumps(document).encode(), found[1] if found else None)


def forged_pin(number: int, signed_by: int, signature: bytes | None = None) -> dict[str, Any]:
    """A pin naming the attacker's own keys (their KMS ARNs, their public key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = base64.b64encode(spki_of(key.public_key())).decode()
    if signature is None:
        signature = key.sign(b"anything", ec.ECDSA(hashes.SHA256()))
    return {"keyset": number, "notBefore": "2031-01-01T00:00:00Z", "signedBy": signed_by,
            "keys": {"x509": {"id": "arn:attacker-x509", "spki": der}, "jwt": {"id": "arn:attacker-jwt", "spki": der}},
            "signature": base64.b64encode(signature).decode()}


def alarm_count(reason: str) -> int:
    from keyseal._internal.ca.custody import alarms

    return alarms.counts().get(reason, 0)


def attacker_pins(tmp_path: Path, *numbers: int) -> list[dict[str, Any]]:
    """Well-formed pins signed by keys of the attacker's own (a chain of theirs, rooted at its first pin)."""
    attacker = Chain(DirectoryPinStore(tmp_path / "attacker", "pins"))
    for number in numbers:
        attacker.add(number)
    return list(document_of(attacker.pins.store)["pins"])


@pytest.mark.slow
@pytest.mark.parametrize("forgery", ["garbage", "own-key", "skips-a-keyset", "re-rooted"])
def test_a_running_replica_refuses_a_forged_successor_of_its_anchor(pin_store: PinStore, tmp_path: Path,
                                                                    forgery: str) -> None:
    """The document replaced by one pin of a keyset after the newest one the replica accepted (2): "signed by"
    keyset 2 with a garbage signature or with the attacker's key, signed by a keyset 3 the replica never saw, or
    signed by itself. The replica took this for a prune of its anchor and accepted the attacker's keys; it must
    refuse (alarm) and keep its chain."""
    (tmp_path / "attacker").mkdir()
    writer = Chain(pin_store)
    writer.add(1)
    writer.add(2)
    running = reader(pin_store)
    assert running.read() is not None
    genuine = document_of(pin_store)
    if forgery == "garbage":
        forged = [forged_pin(3, 2, b"not a signature")]
    elif forgery == "own-key":
        forged = attacker_pins(tmp_path, 2, 3)[1:]
    elif forgery == "skips-a-keyset":
        forged = attacker_pins(tmp_path, 3, 4)[1:]
    else:
        forged = attacker_pins(tmp_path, 3)
    assert forged[0]["signedBy"] in (2, 3) and forged[0]["keyset"] > 2
    overwrite(pin_store, {**genuine, "pins": forged})
    before = alarm_count("pin-chain")
    with pytest.raises(CustodyIntegrityError, match="keyset 2"):
        running.read()
    assert alarm_count("pin-chain") > before
    with pytest.raises(CustodyIntegrityError):
        running.read()  # and again: it did not take the forgery as its new anchor
    # It keeps its anchor: the genuine chain, restored and extended by the CA, is accepted again.
    overwrite(pin_store, genuine)
    assert writer.add(3)
    chain = running.read()
    assert chain is not None and [p.number for p in chain] == [1, 2, 3]
    assert chain[-1].keys["x509"].id == writer.keys[3]["x509"][0]


@pytest.mark.slow
def test_a_running_replica_refuses_a_changed_older_pin(tmp_path: Path) -> None:
    """A pin older than the anchor changed (the first pin of a pruned chain is not signed by anything the
    document still holds): the replica accepted that pin before, so a change to it is a rewrite."""
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    for number in range(1, KEEP + 3):
        writer.add(number)
    running = reader(store)
    chain = running.read()
    assert chain is not None and chain[0].signed_by == chain[0].number - 1
    document = json.loads(store.path.read_text())
    document["pins"][0]["keys"]["jwt"]["id"] = "arn:attacker-jwt"
    store.path.write_text(json.dumps(document))
    with pytest.raises(CustodyIntegrityError, match="rewritten"):
        running.read()


@pytest.mark.slow
def test_a_replica_follows_a_prune_it_can_verify_and_refuses_one_it_cannot(tmp_path: Path) -> None:
    """A replica that slept while KEEP more keysets were pinned finds its anchor pruned: the first pin is signed
    by its anchor's key, so it verifies and is accepted. One that slept through more cannot verify the first
    pin: it refuses (and a restart, trusting the store as a fresh replica does, is what brings it back)."""
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    writer.add(1)
    awake, asleep = reader(store), reader(store)
    assert awake.read() is not None and asleep.read() is not None
    for number in range(2, KEEP + 2):
        writer.add(number)
    chain = awake.read()
    assert chain is not None and chain[0].number == 2 and chain[0].signed_by == 1  # pin 1 pruned
    writer.add(KEEP + 2)
    chain = awake.read()
    assert chain is not None and chain[0].number == 3
    with pytest.raises(CustodyIntegrityError, match="restart"):
        asleep.read()  # its anchor, keyset 1, signed nothing the document still holds
    assert reader(store).read() is not None  # a restarted replica trusts the store


def test_a_writer_does_not_start_a_new_chain_where_its_own_has_gone(tmp_path: Path) -> None:
    """A replica that accepted a chain and then finds the record gone when it pins the next keyset refuses, as a
    read does, rather than root a new chain that every fresh replica would then trust."""
    store = DirectoryPinStore(tmp_path, "pins")
    writer = Chain(store)
    writer.add(1)
    store.path.unlink()
    with pytest.raises(CustodyIntegrityError, match="has gone"):
        writer.add(2)
    assert not store.path.exists()
