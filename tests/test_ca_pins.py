"""The keyset pin chain on its own (keyseal.ca.pins): each pin signed by the previous keyset's X.509 key, a chain
that does not verify refused, a running replica refusing a rewritten chain, and the chain kept short."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal.ca.custody import CaKey, MemoryCaKey
from keyseal.ca.pin_store import DirectoryPinStore
from keyseal.ca.pins import KEEP, KeysetPins, NewPin, Pin
from keyseal.errors import CustodyIntegrityError

START = datetime(2030, 1, 1, tzinfo=UTC)


def new_keys() -> dict[str, tuple[str, CaKey]]:
    return {kind: (f"{kind}-{id(object())}", MemoryCaKey(ec.generate_private_key(ec.SECP256R1())))
            for kind in ("x509", "jwt")}


class Chain:
    """A writer that remembers the keys it pinned (as a custody would open them again)."""

    def __init__(self, store: DirectoryPinStore) -> None:
        self.pins = KeysetPins(store, "example.org", "kms", "keyseal/example_org")
        self.keys: dict[int, dict[str, tuple[str, CaKey]]] = {}

    def add(self, number: int) -> bool:
        self.keys[number] = new_keys()
        entry = NewPin(number, START + timedelta(hours=12 * number), self.keys[number])
        return self.pins.append([entry], self.signer)

    def signer(self, pin: Pin) -> CaKey:
        return self.keys[pin.number]["x509"][1]


def reader(store: DirectoryPinStore) -> KeysetPins:
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
