"""Keyset pins: which keys make up keyset n, recorded where every replica reads them, and chained by signatures.

A key manager (AWS KMS, a PKCS#11 token) tells keyseal which key an alias or a label names, but not who made
that key: whoever may create keys and aliases in the account, or objects on the token, could offer one of
their own under a keyset's name. So the CA does not trust a key because of its name. When it commits keyset n
it appends a pin to one document in the configured store (a file in the store directory, or a ConfigMap in
the Kubernetes store's namespace):

    {"keyset": n, "notBefore": T, "keys": {"x509": {"id": ID, "spki": DER}, "jwt": {...}},
     "signedBy": n-1, "signature": ...}

`id` is the key manager's own name for the key (a KMS key ARN, a PKCS#11 CKA_ID), `spki` its public key, and
the signature is made by the X.509 CA key of the previous pinned keyset (the first pin of a chain signs itself)
over the pin, the trust domain, the custody and its alias or label prefix. Loading then opens exactly the
pinned keys, by their pinned ids, and refuses any whose public key differs; aliases, markers and objects that
the pins do not name are ignored with an alarm (keyseal._internal.ca.custody.alarms).

Why a signature chain in the store rather than a MAC: the key-manager custodies have no KEK to key a MAC with,
and a chain needs no secret of its own. It is rooted in the store: someone who may create keys and aliases,
or token objects, but not write the store, cannot add a pin; someone who may write the store but cannot sign
with the current CA key cannot extend the chain, and a running replica refuses a chain that changed a pin it
has accepted, or that dropped the newest one it accepted (its anchor) unless the chain's first pin is signed by
the anchor's X.509 key (a prune: the chain keeps its newest KEEP pins). So a running replica accepts only pins
that chain by signatures to one it accepted; a replica that missed more than KEEP keysets cannot verify the
first pin and refuses (a restart brings it back). A fresh replica trusts the chain's first pin as it finds it
(trust on first use): the store's write permission is the root of trust, and the docs say so.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from keyseal._internal.ca.custody.alarms import alarm
from keyseal._internal.ca.custody.keys import CaKey
from keyseal._internal.ca.custody.pin_store import PinStore
from keyseal._internal.records.record import format_time
from keyseal.errors import CustodyIntegrityError, StoreConflictError
from keyseal.signer import PublicKey, default_hash, hash_algorithm

__all__ = ["KEEP", "KINDS", "PIN_FORMAT", "KeysetPins", "NewPin", "Pin", "PinnedKey", "spki_of", "verify_signature"]

log = logging.getLogger(__name__)

PIN_FORMAT = "keyseal.keyset-pins.v1"
KEEP = 16  # pins kept in the document (at most three keysets are live at once)
KINDS = ("x509", "jwt")
_CONTEXT = b"keyseal keyset pin v1\0"  # never the start of a DER TBSCertificate or a JWS signing input
_ATTEMPTS = 5


def spki_of(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_signature(public_key: PublicKey, signature: bytes, digest: bytes, hash_name: str) -> bool:
    """Whether `signature` (DER ECDSA or RSA PKCS#1 v1.5) over `digest` verifies with `public_key`."""
    algorithm = utils.Prehashed(hash_algorithm(hash_name))  # type: ignore[arg-type]
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class PinnedKey:
    id: str  # the key manager's name for the key: a KMS key ARN, a PKCS#11 CKA_ID in hex
    spki: bytes  # the DER SubjectPublicKeyInfo recorded when keyseal made the key

    def public_key(self) -> PublicKey:
        key = serialization.load_der_public_key(self.spki)
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError("a pinned key must be an ECDSA or RSA key")
        return key

    def matches(self, public_key: PublicKey) -> bool:
        return spki_of(public_key) == self.spki


@dataclass(frozen=True)
class Pin:
    number: int
    not_before: datetime
    keys: dict[str, PinnedKey]
    signed_by: int
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        return {**_unsigned(self.number, self.not_before, self.keys, self.signed_by),
                "signature": base64.b64encode(self.signature).decode("ascii")}


@dataclass(frozen=True)
class NewPin:
    """A keyset to pin: its keys as opened from the custody (id, key)."""

    number: int
    not_before: datetime
    keys: dict[str, tuple[str, CaKey]]


def _unsigned(number: int, not_before: datetime, keys: dict[str, PinnedKey], signed_by: int) -> dict[str, Any]:
    return {"keyset": number, "notBefore": format_time(not_before), "signedBy": signed_by,
            "keys": {kind: {"id": key.id, "spki": base64.b64encode(key.spki).decode("ascii")}
                     for kind, key in sorted(keys.items())}}


class KeysetPins:
    """The pin chain of one custody (trust domain, custody kind, alias or label prefix) in one PinStore."""

    def __init__(self, store: PinStore, trust_domain: str, custody: str, scope: str) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.custody = custody
        self.scope = scope
        self._accepted: tuple[Pin, ...] = ()  # the chain this process accepted last; its newest pin is the anchor

    def describe(self) -> str:
        return self.store.location()

    # -- reading -----------------------------------------------------------------------------------------

    def read(self) -> tuple[Pin, ...] | None:
        """The verified chain, oldest first; None when no pin was ever written. A chain that does not verify, or
        that does not chain to what this process accepted (see _check_anchor), is an alarm and a
        CustodyIntegrityError: the caller keeps what it has and uses nothing new."""
        found = self.store.read()
        if found is None:
            if self._accepted:
                self._fail(f"{self.describe()} has gone, but this server pinned keyset {self._accepted[-1].number}: "
                           "restore it from a backup")
            return None
        chain = self._parse(found[0])
        self._check_anchor(chain)
        self._accepted = chain
        return chain

    def _parse(self, data: bytes) -> tuple[Pin, ...]:
        where = self.describe()
        try:
            document = json.loads(data.decode("utf-8"))
            if not isinstance(document, dict) or document.get("format") != PIN_FORMAT:
                raise ValueError("not a keyseal keyset pin document")
            for field, mine in (("trustDomain", self.trust_domain), ("custody", self.custody),
                                ("scope", self.scope)):
                if document.get(field) != mine:
                    raise ValueError(f"its {field} is {document.get(field)!r}, not {mine!r}")
            pins = tuple(_parse_pin(item) for item in document["pins"])
            if not pins:
                raise ValueError("it holds no pin")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self._fail(f"{where} is not this custody's keyset pin record ({exc}): restore it from a backup")
        for index, pin in enumerate(pins):
            if index == 0:
                if pin.signed_by == pin.number:
                    signer = pin.keys["x509"]
                elif pin.signed_by < pin.number:
                    continue  # its signer was pruned: a running replica checks it with its anchor (_check_anchor)
                else:
                    self._fail(f"{where}: pin {pin.number} names keyset {pin.signed_by} as its signer")
            else:
                previous = pins[index - 1]
                if pin.number <= previous.number or pin.not_before <= previous.not_before:
                    self._fail(f"{where}: pin {pin.number} does not follow pin {previous.number}")
                if pin.signed_by != previous.number:
                    self._fail(f"{where}: pin {pin.number} is signed by keyset {pin.signed_by}, not by the "
                               f"previous pinned keyset {previous.number}")
                signer = previous.keys["x509"]
            if not self._verifies(pin, signer):
                self._fail(f"{where}: the signature of pin {pin.number} does not verify with the X.509 key of "
                           f"keyset {pin.signed_by}: the pin record was written by someone who cannot sign as "
                           "this CA")
        return pins

    def _check_anchor(self, chain: tuple[Pin, ...]) -> None:
        """A running replica accepts a chain only if it keeps every pin this process accepted that it still holds,
        unchanged, up to the anchor (the newest accepted pin); or, if it dropped the anchor (a prune), if its first
        pin is signed by the anchor's X.509 key. The first pin's signature is otherwise never checked (its signer
        was pruned, or it signs itself), so anything else would let whoever may write the store name keys of
        their own. With nothing accepted yet (a fresh process), the chain is trusted as found."""
        if not self._accepted:
            return
        anchor = self._accepted[-1]
        where = self.describe()
        if chain[0].number <= anchor.number:
            accepted = {pin.number: pin for pin in self._accepted}
            for pin in chain:
                if pin.number > anchor.number:
                    break
                if accepted.get(pin.number) != pin:
                    self._fail(f"{where} changed the pin of keyset {pin.number}, or dropped it, after this server "
                               f"accepted the chain up to keyset {anchor.number}: the pin record was rewritten; "
                               "restore it from a backup")
            if anchor.number not in {pin.number for pin in chain}:
                self._fail(f"{where} no longer holds the pin of keyset {anchor.number} that this server accepted: "
                           "the pin record was rewritten; restore it from a backup")
            return
        first = chain[0]
        if first.signed_by != anchor.number:
            self._fail(f"{where} no longer holds the pin of keyset {anchor.number} that this server accepted, and "
                       f"its first pin (keyset {first.number}) is signed by keyset {first.signed_by}, not by keyset "
                       f"{anchor.number}: either the pin record was rewritten (restore it from a backup), or more "
                       f"than {KEEP} keysets were pinned since this server last read it (restart this server: a "
                       "restarted server trusts the pin record as it finds it)")
        if not self._verifies(first, anchor.keys["x509"]):
            self._fail(f"{where}: the signature of pin {first.number} does not verify with the X.509 key of keyset "
                       f"{anchor.number} that this server accepted: the pin record was written by someone who "
                       "cannot sign as this CA; restore it from a backup")
        log.info("%s no longer holds keyset %d's pin (pruned); its first pin, keyset %d, is signed by it",
                 where, anchor.number, first.number)

    # -- writing -----------------------------------------------------------------------------------------

    def append(self, entries: Sequence[NewPin], open_signer: Callable[[Pin], CaKey], *,
               only_if_absent: bool = False) -> bool:
        """Pin `entries` (in order) after the chain's last pin; each is signed by the X.509 key of the keyset
        pinned before it (`open_signer` opens the chain's last one), the first of a new chain by itself.
        False if a pin for one of these keysets (or a later one) exists already: another writer won."""
        for _ in range(_ATTEMPTS):
            found = self.store.read()
            if found is None:
                if self._accepted:
                    self._fail(f"{self.describe()} has gone, but this server pinned keyset "
                               f"{self._accepted[-1].number}: restore it from a backup")
                chain: tuple[Pin, ...] = ()
                revision = None
            else:
                if only_if_absent:
                    return False
                chain = self._parse(found[0])
                self._check_anchor(chain)
                revision = found[1]
            if chain and chain[-1].number >= entries[0].number:
                return False
            pins = list(chain)
            signer: CaKey | None = open_signer(chain[-1]) if chain else None
            for entry in entries:
                pins.append(self._sign(entry, pins[-1] if pins else None, signer))
                signer = entry.keys["x509"][1]
            document = {"format": PIN_FORMAT, "trustDomain": self.trust_domain, "custody": self.custody,
                        "scope": self.scope, "pins": [pin.to_dict() for pin in pins[-KEEP:]]}
            data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")
            try:
                self.store.write(data, revision)
            except StoreConflictError:
                log.info("%s changed while a pin was added: reloading it", self.describe())
                continue
            self._accepted = tuple(pins[-KEEP:])
            return True
        raise StoreConflictError(f"{self.describe()} kept changing while keyseal tried to pin a keyset: try again")

    def _sign(self, entry: NewPin, previous: Pin | None, signer: CaKey | None) -> Pin:
        keys = {kind: PinnedKey(key_id, spki_of(key.public_key())) for kind, (key_id, key) in entry.keys.items()}
        if previous is None or signer is None:
            signer, signed_by, signer_pin = entry.keys["x509"][1], entry.number, keys["x509"]
        else:
            signed_by, signer_pin = previous.number, previous.keys["x509"]
        if not signer_pin.matches(signer.public_key()):
            raise CustodyIntegrityError(f"the key opened to sign pin {entry.number} is not keyset {signed_by}'s "
                                        "pinned X.509 key")
        stamp = datetime.strptime(format_time(entry.not_before), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        digest, hash_name = self._digest(entry.number, stamp, keys, signed_by, signer_pin)
        signature = signer.sign_digest(digest, hash_name)
        pin = Pin(entry.number, stamp, keys, signed_by, signature)
        if not verify_signature(signer_pin.public_key(), signature, digest, hash_name):
            alarm("signature-check", f"keyset {signed_by}'s X.509 key made a signature that does not verify with "
                                     f"its pinned public key (pinning keyset {entry.number})")
            raise CustodyIntegrityError(f"the X.509 CA key of keyset {signed_by} signs with another key than its "
                                        "pinned public key: the key manager's key objects were changed")
        return pin

    # -- internals ---------------------------------------------------------------------------------------

    def _digest(self, number: int, not_before: datetime, keys: dict[str, PinnedKey], signed_by: int,
                signer: PinnedKey) -> tuple[bytes, Any]:
        body = {"trustDomain": self.trust_domain, "custody": self.custody, "scope": self.scope,
                **_unsigned(number, not_before, keys, signed_by)}
        hash_name = default_hash(signer.public_key())
        hasher = hashes.Hash(hash_algorithm(hash_name))
        hasher.update(_CONTEXT + json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        return hasher.finalize(), hash_name

    def _verifies(self, pin: Pin, signer: PinnedKey) -> bool:
        digest, hash_name = self._digest(pin.number, pin.not_before, pin.keys, pin.signed_by, signer)
        return verify_signature(signer.public_key(), pin.signature, digest, hash_name)

    def _fail(self, message: str) -> NoReturn:
        alarm("pin-chain", message)
        raise CustodyIntegrityError(message)


def _parse_pin(item: Any) -> Pin:
    if not isinstance(item, dict):
        raise ValueError("a pin is not an object")
    keys = item["keys"]
    if not isinstance(keys, dict) or set(keys) != set(KINDS):
        raise ValueError("a pin must name an x509 and a jwt key")
    pinned = {}
    for kind in KINDS:
        key_id, spki = keys[kind]["id"], base64.b64decode(keys[kind]["spki"], validate=True)
        if not isinstance(key_id, str) or not key_id:
            raise ValueError("a pinned key has no id")
        pinned[kind] = PinnedKey(key_id, spki)
        pinned[kind].public_key()
    number, signed_by = item["keyset"], item["signedBy"]
    if not isinstance(number, int) or not isinstance(signed_by, int) or number < 1 or signed_by < 1:
        raise ValueError("a pin's keyset numbers must be positive integers")
    not_before = datetime.strptime(item["notBefore"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return Pin(number, not_before, pinned, signed_by, base64.b64decode(item["signature"], validate=True))
