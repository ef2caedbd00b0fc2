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

Two writers on one token: PKCS#11 has no create-if-absent (C_CreateObject never refuses a duplicate label), so
unlike the KMS alias nothing makes one writer win. keyseal narrows the window (check for the marker, generate,
check again, write the marker) and makes readers agree: if two markers for keyset n exist, every reader uses the
one whose x509 CKA_ID sorts first. It cannot close the window: a writer that finds another's fresh, unmarked
keys takes them for leftovers and destroys them, and the other may then commit a marker naming keys that are
gone, after which keyset n cannot be opened until its objects are removed by hand. So run one writer per token
(one replica, or replicas that share the token but only one of which can reach it with a read-write login).
Objects of expired keysets stay on the token; destroy them (keys and marker) once nothing they signed is in use.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keyseal import pkcs11uri
from keyseal.backends.pkcs11 import Pkcs11Signer, TokenAccess, create_key, token_session
from keyseal.backends.pkcs11 import open as open_pkcs11
from keyseal.ca.custody import CaKey, SignerCaKey
from keyseal.ca.source import KeysetKeys, KeysetSource, Loaded
from keyseal.errors import (
    BackendUnavailableError,
    KeyNotFoundError,
    OutputExistsError,
    UnsupportedKeyError,
    UsageError,
)
from keyseal.wrapping.record import format_time

__all__ = ["APPLICATION", "Pkcs11CaKey", "Pkcs11KeysetSource"]

log = logging.getLogger(__name__)

APPLICATION = "keyseal CA keyset"
MARKER_FORMAT = "keyseal.ca-keyset.v1"
_KINDS = ("x509", "jwt")
_LABEL_SAFE = "-._~:[]@!$'()*+,"


class Pkcs11CaKey(SignerCaKey):
    """A CA key inside a PKCS#11 token: every signature is one C_Sign on the process's logged-in session."""

    custody = "pkcs11"


@dataclass(frozen=True)
class _Marker:
    number: int
    not_before: datetime
    ids: dict[str, bytes]  # kind -> CKA_ID of the key pair

    @property
    def order(self) -> bytes:
        """Readers pick the marker with the lowest order when a race left two for one keyset."""
        return self.ids["x509"]


def _encode(value: str) -> str:
    return urllib.parse.quote(value, safe=_LABEL_SAFE)


class Pkcs11KeysetSource(KeysetSource):
    def __init__(self, trust_domain: str, token_uri: str, label_prefix: str, x509_key_type: str,
                 jwt_key_type: str, module_path: str | None = None, pin_file: str | None = None) -> None:
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
        """Log in and read the markers: a missing module or token, or a wrong PIN, shows before anything is
        written; and the token must be able to make the configured key types' signatures."""
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
        highest = max(markers, default=0)
        keysets: list[KeysetKeys] = []
        for number in sorted(markers, reverse=True):
            marker = markers[number]
            if marker.not_before <= live_after:
                break  # older keysets are older still
            x509_key = self._open(marker, "x509")
            jwt_key = self._open(marker, "jwt")
            keysets.append(KeysetKeys(number, marker.not_before, x509_key, jwt_key))
        live = {self.label(k.number, kind): markers[k.number].ids[kind] for k in keysets for kind in _KINDS}
        for label, (key_id, key) in list(self._opened.items()):
            if live.get(label) != key_id:
                del self._opened[label]
                self._retired.append(key)
        return Loaded(tuple(sorted(keysets, key=lambda k: k.number)), highest)

    def create(self, number: int, not_before: datetime, live_after: datetime) -> bool:
        """Generate both key pairs in the token, then write the marker; False if keyset `number` exists."""
        with self._lock:
            with token_session(self.token_uri) as access:
                if number in self._markers(access):
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
                if number in self._markers(access):  # another writer committed while we generated
                    self._destroy(access, number, ids)
                    return False
                self._write_marker(access, _Marker(number, not_before, ids))
                mine = self._markers(access).get(number)
            if mine is None or mine.ids != ids:
                log.warning("another writer created %s at the same time: using its keys (they sort first)",
                            self.label(number))
                with token_session(self.token_uri) as access:
                    self._destroy(access, number, ids, marker=True)
                return False
            log.info("created keyset %d in PKCS#11 token %s (%s, %s)", number, self._shown,
                     self.label(number, "x509"), self.label(number, "jwt"))
            return True

    # -- internals -------------------------------------------------------------------------------------

    def _markers(self, access: TokenAccess) -> dict[int, _Marker]:
        """Every keyset marker under the label prefix; of duplicates, the one readers agree on."""
        attr, pkcs11 = access.pkcs11.Attribute, access.pkcs11
        found: dict[int, _Marker] = {}
        try:
            objects = list(access.session.get_objects({attr.CLASS: pkcs11.ObjectClass.DATA,
                                                       attr.APPLICATION: APPLICATION}))
            for obj in objects:
                label = obj[attr.LABEL]
                if not isinstance(label, str) or not label.startswith(f"{self.label_prefix}keyset-"):
                    continue
                marker = self._parse_marker(label, bytes(obj[attr.VALUE]))
                current = found.get(marker.number)
                if current is not None:
                    log.warning("PKCS#11 token %s holds two markers for keyset %d (two writers raced): using "
                                "the one whose x509 key id sorts first", self._shown, marker.number)
                    if current.order <= marker.order:
                        continue
                found[marker.number] = marker
        except pkcs11.PKCS11Error as exc:
            raise BackendUnavailableError(
                f"cannot read the CA keyset objects on PKCS#11 token {access.label!r} ({type(exc).__name__})"
            ) from None
        return found

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
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UnsupportedKeyError(problem) from None
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
            ) from None

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

    def _open(self, marker: _Marker, kind: str) -> CaKey:
        label = self.label(marker.number, kind)
        cached = self._opened.get(label)
        if cached is not None:
            if cached[0] == marker.ids[kind]:
                return cached[1]
            self._retired.append(cached[1])  # another writer's keys won a race: ours go
        uri = self.key_uri(marker.number, kind, marker.ids[kind])
        try:
            signer = open_pkcs11(uri, "", None)
        except KeyNotFoundError:
            raise KeyNotFoundError(
                f"the {kind} key of keyset {marker.number} ({label!r}) is missing from PKCS#11 token "
                f"{self._shown} although its marker {self.label(marker.number)!r} exists: restore it from the "
                "HSM's backup, or destroy the marker to let the next keyset be made"
            ) from None
        key = self._ca_key(signer, label)
        self._opened[label] = (marker.ids[kind], key)
        return key

    @staticmethod
    def _ca_key(signer: Pkcs11Signer, label: str) -> CaKey:
        try:
            return Pkcs11CaKey(signer)
        except UnsupportedKeyError:
            signer.close()
            raise UnsupportedKeyError(f"PKCS#11 key {label!r}: a CA key must be an ECDSA or RSA key") from None
