"""`pkcs11` custody (key manager): each CA key is a key pair generated inside a PKCS#11 token (an HSM, or SoftHSM),
non-extractable and sensitive, and every SVID signature is one C_Sign. No CA private key is ever in memory.

Objects of keyset n, on the configured token:

    <labelPrefix>keyset-<n>-x509   key pair (private + public), CKA_ID random, made by keyseal's keygen
    <labelPrefix>keyset-<n>-jwt    key pair, likewise
    <labelPrefix>keyset-<n>        data object (CKO_DATA, CKA_APPLICATION "keyseal CA keyset"): the marker

PKCS#11 keys carry no creation time (CKA_START_DATE is only a date, and optional), so the keyset's not_before
lives in the marker, a small private, unmodifiable JSON document that also names the trust domain, the keyset
number and the CKA_ID of each key pair. The marker is written last: it is the commit point. Key pairs with a
keyset's labels but no marker are what a writer stopped half way left behind; the next creation of that keyset
destroys them before generating new ones.

Labels, ids and markers are not trusted: anyone with the user PIN can add objects with a keyset's labels and a
marker naming them. So after the marker, the keyset is pinned (ca.custody.pins): its CKA_IDs and public keys,
signed by the previous keyset's X.509 key, appended to the pin record in the configured store. A load opens
only pinned keysets, each key by its pinned label and CKA_ID, and refuses (alarm, and the load fails: the server
keeps what it has, or refuses to start) a key that was not generated in the token (CKA_LOCAL), was ever
extractable or not sensitive (CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE), whose public key object is not the
pinned key, or whose signature does not verify with the pinned public key (checked once per key when opened).
Markers and keysets the pins do not name are ignored with a custody alarm. Once pinned, a keyset's key ids
never change for any replica. Upgrading from a version without pins: the first load pins the live keysets the
markers name (trust on first use) and says so in the log; a keyset with two markers naming different keys is
not adopted (an alarm), since keyseal cannot tell which one it made.

Two writers on one token: PKCS#11 has no create-if-absent (C_CreateObject never refuses a duplicate label), so
the pin record decides: of two writers that made keyset n, the one whose pin is written first wins, the other
destroys its keys and marker. A writer that finds another's fresh, unmarked keys still takes them for leftovers
and destroys them, after which the other's keyset cannot be pinned; so run one writer per token (one replica,
or replicas that share the token but only one of which can reach it with a read-write login).
Objects of expired keysets stay on the token; destroy them (keys and marker) once nothing they signed is in use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keyseal._internal.backends.pkcs11 import Pkcs11Signer, create_key
from keyseal._internal.backends.pkcs11 import open as open_pkcs11
from keyseal._internal.ca.custody.alarms import alarm
from keyseal._internal.ca.custody.keys import CaKey, SignerCaKey
from keyseal._internal.ca.custody.pins import KINDS, KeysetPins, NewPin, Pin, verify_signature
from keyseal._internal.ca.custody.source import KeysetKeys, KeysetSource, Loaded
from keyseal._internal.providers.pkcs11 import uri as pkcs11uri
from keyseal._internal.providers.pkcs11.session import TokenAccess, token_session
from keyseal._internal.records.record import format_time
from keyseal.errors import (
    BackendUnavailableError,
    CustodyIntegrityError,
    KeyNotFoundError,
    KeyURIError,
    OutputExistsError,
    UnsupportedKeyError,
    UsageError,
)

if TYPE_CHECKING:
    from keyseal._internal.ca.config import Config
    from keyseal._internal.ca.custody.source import CustodyContext

__all__ = ["APPLICATION", "Pkcs11CaKey", "Pkcs11KeysetSource", "open"]

log = logging.getLogger(__name__)

APPLICATION = "keyseal CA keyset"
MARKER_FORMAT = "keyseal._internal.ca-keyset.v1"
_KINDS = KINDS
_REQUIRED = ("LOCAL", "NEVER_EXTRACTABLE", "ALWAYS_SENSITIVE", "SENSITIVE")  # true; and EXTRACTABLE false
_LABEL_SAFE = "-._~:[]@!$'()*+,"


def open(config: Config, context: CustodyContext) -> Pkcs11KeysetSource:
    """Registry entry point for `custody: pkcs11`."""
    from keyseal._internal.ca.config import CA_KEY_TYPES

    token = config.pkcs11
    if token is None:  # parse_config requires the pkcs11 section with this custody
        raise UsageError("custody: pkcs11 needs the pkcs11 section")
    return Pkcs11KeysetSource(config.trust_domain, token.uri, token.label_prefix, CA_KEY_TYPES[config.ca_key_type],
                              CA_KEY_TYPES[config.jwt_key_type], module_path=token.module_path,
                              pin_file=token.pin_file, pins=context.pins(token.label_prefix))


class Pkcs11CaKey(SignerCaKey):
    """A CA key inside a PKCS#11 token: every signature is one C_Sign on the process's logged-in session."""

    custody = "pkcs11"


@dataclass(frozen=True)
class _Marker:
    number: int
    not_before: datetime
    ids: dict[str, bytes]  # kind -> CKA_ID of the key pair


def _encode(value: str) -> str:
    return urllib.parse.quote(value, safe=_LABEL_SAFE)


class Pkcs11KeysetSource(KeysetSource):
    def __init__(self, trust_domain: str, token_uri: str, label_prefix: str, x509_key_type: str,
                 jwt_key_type: str, module_path: str | None = None, pin_file: str | None = None, *,
                 pins: KeysetPins) -> None:
        self.pins = pins
        self.trust_domain = trust_domain
        self.label_prefix = label_prefix
        self.key_types = {"x509": x509_key_type, "jwt": jwt_key_type}
        parsed = pkcs11uri.parse(token_uri)
        if any(name in parsed.path for name in ("object", "id", "type")):
            raise UsageError(f"pkcs11.uri {parsed.redacted()!r} must name the token only (no object=, id=, type=)")
        if "pin-value" in parsed.query:
            log.warning("pkcs11.uri holds pin-value=: the token's PIN is in the configuration in the clear; use "
                        "pkcs11.pinFile or KEYSEAL_PKCS11_PIN instead")
        path, _, query = token_uri.partition("?")
        extra = []
        if module_path:
            extra.append(f"module-path={urllib.parse.quote(module_path, safe='/:._-')}")
        if pin_file:
            extra.append(f"pin-source=file:{urllib.parse.quote(pin_file, safe='/:._-')}")
        self._path = path.rstrip(";")
        self._query = "&".join(part for part in (query, *extra) if part)
        self.token_uri = self._path + (f"?{self._query}" if self._query else "")
        self._shown = pkcs11uri.redact(self._path)
        self._lock = threading.Lock()
        self._opened: dict[str, tuple[bytes, CaKey]] = {}  # key label -> (CKA_ID, key)
        self._retired: list[CaKey] = []  # no longer live: closed at the next load, once no issuer can hold them

    def describe(self) -> str:
        return f"PKCS#11 objects {self.label_prefix}keyset-* on {self._shown}"

    def label(self, number: int, kind: str | None = None) -> str:
        return f"{self.label_prefix}keyset-{number}" + (f"-{kind}" if kind else "")

    def key_uri(self, number: int, kind: str, key_id: bytes) -> str:
        ident = "".join(f"%{byte:02x}" for byte in key_id)
        uri = f"{self._path};object={_encode(self.label(number, kind))};id={ident}"
        return uri + (f"?{self._query}" if self._query else "")

    def startup_check(self) -> None:
        """Read the pins, log in and read the markers: an unreadable store, a missing module or token, or a wrong
        PIN, shows before anything is written; and the token must be able to make the configured key types'
        signatures."""
        self.pins.read()  # the store must be readable, and the pin chain verify
        with token_session(self.token_uri) as access:
            self._markers(access)
            mechanisms = access.token.slot.get_mechanisms()
            needed = {"p256": "ECDSA", "p384": "ECDSA", "rsa2048": "RSA_PKCS", "rsa4096": "RSA_PKCS"}
            for kind, key_type in self.key_types.items():
                name = needed.get(key_type, "")
                if name and getattr(access.pkcs11.Mechanism, name) not in mechanisms:
                    raise UnsupportedKeyError(
                        f"PKCS#11 token {access.label!r} cannot sign with {name} for the {kind} CA key "
                        f"({key_type}): choose another keyType"
                    )

    def load(self, live_after: datetime) -> Loaded:
        previously_retired, self._retired = self._retired, []
        for key in previously_retired:  # dropped a whole refresh ago: no issuer holds them any more
            if isinstance(key, SignerCaKey):
                key.signer.close()  # releases its share of the session
        with token_session(self.token_uri) as access:
            markers = self._markers(access)
        chain = self.pins.read()
        if chain is None:
            chain = self._adopt(markers, live_after)
        # A number a marker took is spent, pinned or not: the next keyset gets a higher one.
        highest = max([*markers, *(pin.number for pin in chain)], default=0)
        self._report_unpinned(markers, chain)
        keysets: list[KeysetKeys] = []
        for pin in sorted(chain, key=lambda p: p.number, reverse=True):
            if pin.not_before <= live_after:
                break  # older keysets are older still
            keysets.append(KeysetKeys(pin.number, pin.not_before, self._open_pinned(pin, "x509"),
                                      self._open_pinned(pin, "jwt")))
        numbers = {k.number for k in keysets}
        live = {self.label(p.number, kind): bytes.fromhex(p.keys[kind].id)
                for p in chain if p.number in numbers for kind in _KINDS}
        for label, (key_id, key) in list(self._opened.items()):
            if live.get(label) != key_id:
                del self._opened[label]
                self._retired.append(key)
        return Loaded(tuple(sorted(keysets, key=lambda k: k.number)), highest)

    def create(self, number: int, not_before: datetime, live_after: datetime) -> bool:
        """Generate both key pairs in the token, write the marker, then pin the keyset (the commit); False if
        keyset `number` (or a later one) exists, or another writer pinned its own keyset `number` first."""
        with self._lock:
            chain = self.pins.read() or ()
            with token_session(self.token_uri) as access:
                if number in self._markers(access) or (chain and chain[-1].number >= number):
                    return False
                self._destroy_leftovers(access, number)
            ids = {kind: secrets.token_bytes(16) for kind in _KINDS}
            try:
                for kind in _KINDS:
                    create_key(self.key_uri(number, kind, ids[kind]), self.key_types[kind])
            except OutputExistsError:
                log.warning("another writer is creating %s at the same time: leaving it to that writer",
                            self.label(number))
                with token_session(self.token_uri) as access:
                    self._destroy(access, number, ids)
                return False
            with token_session(self.token_uri) as access:
                self._write_marker(access, _Marker(number, not_before, ids))
            opened: dict[str, CaKey] = {}
            try:
                for kind in _KINDS:
                    opened[kind] = self._open_checked(number, kind, ids[kind], None)
                entry = NewPin(number, not_before, {kind: (ids[kind].hex(), opened[kind]) for kind in _KINDS})
                pinned = self.pins.append([entry], lambda pin: self._open_pinned(pin, "x509"))
            except BaseException:
                self._discard(number, ids, opened)
                raise
            if not pinned:
                log.warning("another writer pinned keyset %d first: destroying this writer's %s", number,
                            self.label(number))
                self._discard(number, ids, opened)
                return False
            for kind, key in opened.items():
                self._opened[self.label(number, kind)] = (ids[kind], key)
            log.info("created and pinned keyset %d in PKCS#11 token %s (%s, %s)", number, self._shown,
                     self.label(number, "x509"), self.label(number, "jwt"))
            return True

    # -- internals -------------------------------------------------------------------------------------

    def _markers(self, access: TokenAccess) -> dict[int, list[_Marker]]:
        """Every keyset marker under the label prefix, by keyset number (a race, or someone else, may have left
        several). Markers are only hints: what a keyset is, the pins say. One that is not a marker of this
        trust domain is an alarm, and ignored."""
        attr, pkcs11 = access.pkcs11.Attribute, access.pkcs11
        found: dict[int, list[_Marker]] = {}
        try:
            objects = list(access.session.get_objects({attr.CLASS: pkcs11.ObjectClass.DATA,
                                                       attr.APPLICATION: APPLICATION}))
            for obj in objects:
                label = obj[attr.LABEL]
                if not isinstance(label, str) or not label.startswith(f"{self.label_prefix}keyset-"):
                    continue
                try:
                    marker = self._parse_marker(label, bytes(obj[attr.VALUE]))
                except UnsupportedKeyError as exc:
                    alarm("unpinned-keyset", exc.message)
                    continue
                found.setdefault(marker.number, []).append(marker)
        except pkcs11.PKCS11Error as exc:
            raise BackendUnavailableError(
                f"cannot read the CA keyset objects on PKCS#11 token {access.label!r} ({type(exc).__name__})"
            ) from exc
        return found

    def _report_unpinned(self, markers: dict[int, list[_Marker]], chain: tuple[Pin, ...]) -> None:
        """Alarm on markers the pins do not back: a keyset that is not pinned, or a second marker naming other
        keys for a pinned one. Numbers below the first pin are history and not reported."""
        pinned = {pin.number: pin for pin in chain}
        floor = chain[0].number if chain else 0
        for number, found in sorted(markers.items()):
            pin = pinned.get(number)
            for marker in found:
                if pin is not None and all(marker.ids[k].hex() == pin.keys[k].id for k in _KINDS):
                    continue
                if pin is None and number <= floor:
                    continue
                what = "names other keys than its pin" if pin else f"is not pinned in {self.pins.describe()}"
                alarm("unpinned-keyset", f"PKCS#11 marker {self.label(number)!r} on {self._shown} (x509 id "
                                         f"{marker.ids['x509'].hex()}, jwt id {marker.ids['jwt'].hex()}) {what}: "
                                         "it is not used (made by someone else, or by a writer that stopped "
                                         "before pinning it)")

    def _adopt(self, markers: dict[int, list[_Marker]], live_after: datetime) -> tuple[Pin, ...]:
        """No pin record yet: pin the live keysets the markers name (trust on first use), oldest first. A live
        keyset with two markers that name different keys is not adopted (an alarm): anyone with the user PIN can
        add a marker, so neither is more credible than the other (readers before pins took the lowest CKA_ID,
        which an attacker chooses)."""
        entries: list[NewPin] = []
        for number in sorted(markers):
            distinct = {(m.not_before, tuple(m.ids[kind] for kind in _KINDS)): m for m in markers[number]}
            if len(distinct) > 1:
                if any(m.not_before > live_after for m in distinct.values()):
                    alarm("unpinned-keyset", f"keyset {number} is not adopted: {len(distinct)} markers "
                                             f"{self.label(number)!r} on {self._shown} name different keys (x509 ids "
                                             f"{', '.join(sorted(m.ids['x509'].hex() for m in distinct.values()))})"
                                             "; keyseal does not choose between them, so it is not used and the "
                                             "next keyset replaces it")
                continue
            [marker] = distinct.values()
            if marker.not_before <= live_after or (entries and marker.not_before <= entries[-1].not_before):
                continue
            keys = {kind: (marker.ids[kind].hex(), self._open_checked(number, kind, marker.ids[kind], None))
                    for kind in _KINDS}
            entries.append(NewPin(number, marker.not_before, keys))
        if entries:
            if self.pins.append(entries, lambda pin: self._open_pinned(pin, "x509"), only_if_absent=True):
                log.warning("no keyset pins were found in %s: pinned the live keysets %s as their markers on %s "
                            "name them now (trust on first use)", self.pins.describe(),
                            ", ".join(str(e.number) for e in entries), self._shown)
            for entry in entries:  # the pins name these keys (unless another replica pinned others first)
                for kind, (key_id, key) in entry.keys.items():
                    self._opened[self.label(entry.number, kind)] = (bytes.fromhex(key_id), key)
            return self.pins.read() or ()
        return ()

    def _discard(self, number: int, ids: dict[str, bytes], opened: dict[str, CaKey]) -> None:
        """Close and destroy this writer's keys and marker for keyset `number` (it did not become the keyset)."""
        for key in opened.values():
            if isinstance(key, SignerCaKey):
                key.signer.close()
        with token_session(self.token_uri) as access:
            self._destroy(access, number, ids, marker=True)

    def _parse_marker(self, label: str, value: bytes) -> _Marker:
        suffix = label[len(f"{self.label_prefix}keyset-"):]
        problem = f"PKCS#11 data object {label!r} is not a keyseal CA keyset marker for trust domain " \
                  f"{self.trust_domain}: remove it, or choose another pkcs11.labelPrefix"
        try:
            data = json.loads(value.decode("utf-8"))
            number = int(data["keyset"])
            if (data.get("format") != MARKER_FORMAT or data.get("trustDomain") != self.trust_domain
                    or suffix != str(number) or number < 1):
                raise ValueError
            not_before = datetime.strptime(data["notBefore"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            ids = {kind: bytes.fromhex(data[f"{kind}Id"]) for kind in _KINDS}
            if not all(ids.values()):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise UnsupportedKeyError(problem) from exc
        return _Marker(number, not_before, ids)

    def _write_marker(self, access: TokenAccess, marker: _Marker) -> None:
        attr, pkcs11 = access.pkcs11.Attribute, access.pkcs11
        document = {"format": MARKER_FORMAT, "trustDomain": self.trust_domain, "keyset": marker.number,
                    "notBefore": format_time(marker.not_before),
                    **{f"{kind}Id": marker.ids[kind].hex() for kind in _KINDS}}
        try:
            with access.token.open(rw=True) as session:  # the shared login covers it
                session.create_object({
                    attr.CLASS: pkcs11.ObjectClass.DATA, attr.TOKEN: True, attr.PRIVATE: True,
                    attr.MODIFIABLE: False, attr.LABEL: self.label(marker.number),
                    attr.APPLICATION: APPLICATION, attr.VALUE: json.dumps(document, sort_keys=True).encode(),
                })
        except pkcs11.PKCS11Error as exc:
            raise BackendUnavailableError(
                f"cannot write {self.label(marker.number)!r} on PKCS#11 token {access.label!r} "
                f"({type(exc).__name__}): the keys of keyset {marker.number} were made but are not in use"
            ) from exc

    def _destroy_leftovers(self, access: TokenAccess, number: int) -> None:
        """Key pairs of keyset `number` without a marker: a writer stopped before its commit."""
        attr = access.pkcs11.Attribute
        for kind in _KINDS:
            label = self.label(number, kind)
            leftovers = list(access.session.get_objects({attr.LABEL: label}))
            if leftovers:
                log.warning("destroying %d object(s) labelled %r left by an unfinished keyset creation",
                            len(leftovers), label)
                self._destroy_where(access, {attr.LABEL: label})

    def _destroy(self, access: TokenAccess, number: int, ids: dict[str, bytes], marker: bool = False) -> None:
        """Our own key pairs (by label and id) and, if asked, our own marker, after losing a race."""
        attr, pkcs11 = access.pkcs11.Attribute, access.pkcs11
        for kind in _KINDS:
            self._destroy_where(access, {attr.LABEL: self.label(number, kind), attr.ID: ids[kind]})
        if marker:
            for obj in access.session.get_objects({attr.CLASS: pkcs11.ObjectClass.DATA,
                                                   attr.LABEL: self.label(number)}):
                try:
                    parsed = self._parse_marker(self.label(number), bytes(obj[attr.VALUE]))
                except UnsupportedKeyError:
                    continue
                if parsed.ids == ids:
                    self._destroy_where(access, {attr.CLASS: pkcs11.ObjectClass.DATA, attr.LABEL: self.label(number),
                                                 attr.VALUE: obj[attr.VALUE]})

    def _destroy_where(self, access: TokenAccess, template: dict[Any, Any]) -> None:
        pkcs11 = access.pkcs11
        try:
            with access.token.open(rw=True) as session:
                for obj in list(session.get_objects(template)):
                    obj.destroy()
        except pkcs11.PKCS11Error as exc:
            log.warning("could not destroy unused objects on PKCS#11 token %r (%s): destroy them yourself",
                        access.label, type(exc).__name__)

    def _open_pinned(self, pin: Pin, kind: str) -> CaKey:
        label = self.label(pin.number, kind)
        key_id = bytes.fromhex(pin.keys[kind].id)
        cached = self._opened.get(label)
        if cached is not None:
            if cached[0] == key_id:
                return cached[1]
            del self._opened[label]
            self._retired.append(cached[1])
        key = self._open_checked(pin.number, kind, key_id, pin)
        self._opened[label] = (key_id, key)
        return key

    def _open_checked(self, number: int, kind: str, key_id: bytes, pin: Pin | None) -> CaKey:
        """Open the key pair `label` + `key_id` and check that keyseal made it: generated in the token, never
        extractable, always sensitive, its public key the pinned one (if pinned), and a fresh signature of
        it verifying with that public key (a public key object that does not match the private key)."""
        label = self.label(number, kind)
        what = f"the {kind} key of keyset {number} ({label!r}, id {key_id.hex()}) on {self._shown}"
        uri = self.key_uri(number, kind, key_id)
        try:
            signer = open_pkcs11(uri, "", None)
        except KeyNotFoundError as exc:
            raise KeyNotFoundError(
                f"{what} is missing although keyset {number} is pinned: restore it from the HSM's backup"
            ) from exc
        except KeyURIError as exc:
            alarm("key-mismatch", f"{what}: {exc.message}")
            raise CustodyIntegrityError(f"{what}: {exc.message}") from exc
        try:
            attributes = signer.key_attributes()
            wrong = [name for name in _REQUIRED if attributes.get(name) is not True]
            if attributes.get("EXTRACTABLE") is not False:
                wrong.append("EXTRACTABLE (must be false)")
            if wrong:
                problem = f"CKA_{', CKA_'.join(wrong)}: it was not generated in the token as a non-extractable key"
                alarm("key-attributes", f"{what}: {problem}")
                raise CustodyIntegrityError(f"{what} is refused: {problem}")
            public = signer.public_key()
            expected = pin.keys[kind].public_key() if pin is not None else public
            if pin is not None and not pin.keys[kind].matches(public):
                alarm("key-mismatch", f"{what}: its public key object is not the pinned public key")
                raise CustodyIntegrityError(f"{what}: its public key object is not the pinned public key")
            key = self._ca_key(signer, label)
            digest = hashlib.new(key.hash_name, b"keyseal CA key check\0" + secrets.token_bytes(32)).digest()
            if not verify_signature(expected, key.sign_digest(digest, key.hash_name), digest, key.hash_name):
                alarm("signature-check", f"{what}: its signature does not verify with its "
                                         f"{'pinned ' if pin else ''}public key")
                raise CustodyIntegrityError(f"{what}: the private key does not match its "
                                            f"{'pinned ' if pin else ''}public key: it signs nothing")
        except BaseException:
            signer.close()
            raise
        return key

    @staticmethod
    def _ca_key(signer: Pkcs11Signer, label: str) -> CaKey:
        try:
            return Pkcs11CaKey(signer)
        except UnsupportedKeyError as exc:
            signer.close()
            raise UnsupportedKeyError(f"PKCS#11 key {label!r}: a CA key must be an ECDSA or RSA key") from exc
