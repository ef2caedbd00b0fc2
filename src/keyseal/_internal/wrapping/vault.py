"""`vault` KEK provider: DEKs wrapped by a Vault / OpenBao Transit `aes256-gcm96` key that never leaves Vault.

Named as `--kek hashivault://[MOUNT/]KEY` or its alias `--kek vault:[MOUNT/]KEY` (mount `transit` by default;
the same spellings as a signing key's); records store and compare the key's canonical URI
`hashivault://MOUNT/KEY` (with `?namespace=NS` when a namespace is configured), and a record naming another
key is refused before any decrypt. Each DEK is encrypted with the record's KEK context (name, version, format)
as Transit associated data, so a wrapped DEK moved to another record does not decrypt.

Vault policy capabilities on the key (`keyseal vault-policy --for wrap` prints them): `update` on
`<mount>/encrypt/<key>` (writing records) and `<mount>/decrypt/<key>` (opening them), and `read` on
`<mount>/keys/<key>` (the key type check before writing; without it the check is skipped with a warning, and
Transit itself still refuses associated data for a key that is not an AEAD key). Vault is called when records
are written or opened and for the startup canary, never per signature. Transit key rotation needs nothing from
keyseal: each ciphertext names its key version, and new records use the latest.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from keyseal._internal.providers.vault.client import VaultConnection, VaultSettings
from keyseal._internal.providers.vault.uri import ALIAS_SCHEME, SCHEME, TransitKeyRef, parse_transit_ref
from keyseal._internal.records.record import DEK_SIZE
from keyseal._internal.wrapping.provider import KekOptions, KekProvider, invalid_kek, zero
from keyseal.errors import AccessDeniedError, KeyURIError, UnsupportedKeyError, WrappedRecordError

__all__ = ["KEY_TYPE", "VaultKek", "open", "parse_kek_spec"]

log = logging.getLogger(__name__)

KEY_TYPE = "aes256-gcm96"
_CIPHERTEXT_RE = re.compile(rb"vault:v[1-9][0-9]{0,9}:[A-Za-z0-9+/]+={0,2}")
_announced: set[str] = set()
_announce_lock = threading.Lock()


def open(spec: str, rest: str, options: KekOptions) -> VaultKek:
    """Registry entry point: `hashivault://[MOUNT/]KEY` or its alias `vault:[MOUNT/]KEY`. No remote call yet."""
    if not rest:
        raise invalid_kek(spec)
    return VaultKek(spec if spec.startswith(f"{SCHEME}:") else rest)


def parse_kek_spec(rest: str) -> TransitKeyRef:
    """A KEK's Transit key: the part after `vault:` (`MOUNT/KEY`, `KEY` for mount transit, or a
    `hashivault://MOUNT/KEY` URI), or a whole `hashivault:` URI. Either spelling names the same key."""
    spelled = rest if rest.startswith(f"{SCHEME}:") else f"{ALIAS_SCHEME}:{rest}"
    try:
        ref = parse_transit_ref(spelled)
    except KeyURIError as exc:
        raise KeyURIError(
            f"invalid Vault KEK {spelled!r}: use vault:MOUNT/KEY or vault:KEY (mount transit), or "
            f"{SCHEME}://MOUNT/KEY"
        ) from exc
    if ref.version is not None:
        raise KeyURIError(
            f"a Vault KEK takes no ?version: records name their key version themselves; use vault:{ref.mount}/"
            f"{ref.name}"
        )
    return ref


class VaultKek(KekProvider):
    """A Transit aes256-gcm96 key. `settings` say where Vault is and how to log in (see `providers.vault.client`)."""

    provider: ClassVar[str] = "vault"

    def __init__(self, ref: TransitKeyRef | str, *, settings: VaultSettings | None = None) -> None:
        self.ref = parse_kek_spec(ref) if isinstance(ref, str) else ref
        if self.ref.version is not None:
            raise KeyURIError(f"a Vault KEK takes no ?version: use {self.ref.key_uri}")
        self._vault = VaultConnection(settings)
        self.settings = self._vault.settings
        self._checked = False

    @classmethod
    def from_config(
        cls,
        address: str,
        transit_key: str,
        *,
        mount: str = "transit",
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        kubernetes_role: str | None = None,
        kubernetes_mount: str | None = None,
        namespace: str | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
    ) -> VaultKek:
        """The provider from a server configuration: Vault's address, the Transit key's name and mount, and
        one token source (a token, a token file, or a Kubernetes auth role); unset ones come from the
        environment as for the CLI."""
        ref = parse_kek_spec(f"{mount.strip('/')}/{transit_key}")
        settings = VaultSettings(
            address=address, token=token, token_file=Path(token_file) if token_file else None,
            kubernetes_role=kubernetes_role, kubernetes_mount=kubernetes_mount, namespace=namespace,
            ca_bundle=Path(ca_bundle) if ca_bundle else None,
        )
        return cls(ref, settings=settings)

    @property
    def kek_id(self) -> str:
        namespace = self.settings.namespace
        return self.ref.key_uri + (f"?namespace={namespace.strip('/')}" if namespace else "")

    def describe(self) -> str:
        return f"Vault Transit key {self.kek_id}"

    def _call(self, capability: str, endpoint: str, subject: str, fn: Callable[[Any], Any]) -> Any:
        with _announce_lock:
            first = self.kek_id not in _announced
            _announced.add(self.kek_id)
        if first:  # operators grep for this line
            log.info("Key wrapping via Vault Transit key=%s address=%s", self.kek_id, self.settings.address)
        return self._vault.call(capability, self.ref.path(endpoint), subject, fn)

    def prepare_write(self) -> None:
        """Check once that the key is a non-derived aes256-gcm96 key that encrypts and decrypts (`read`)."""
        if self._checked:
            return
        try:
            data = self._call("read", "keys", f"reading {self.describe()}", lambda client: (
                client.secrets.transit.read_key(name=self.ref.name, mount_point=self.ref.mount)))["data"]
        except AccessDeniedError:
            log.warning(
                "cannot check the type of %s (no \"read\" on %s): relying on Transit to refuse a key that is not "
                "an AEAD key", self.describe(), self.ref.path("keys"),
            )
            self._checked = True
            return
        key_type = data.get("type")
        if key_type != KEY_TYPE or data.get("derived") or not data.get("supports_decryption", True):
            what = f"{key_type}{' derived' if data.get('derived') else ''}"
            raise UnsupportedKeyError(
                f"{self.describe()} is a {what} key: key wrapping needs a non-derived {KEY_TYPE} key; create one "
                f"with `bao write -f {self.ref.path('keys')} type={KEY_TYPE}`"
            )
        self._checked = True

    def wrap(self, dek: bytearray, context: Mapping[str, str]) -> bytes:
        answer = self._call("update", "encrypt", f"wrapping a DEK with {self.describe()}", lambda client: (
            client.secrets.transit.encrypt_data(
                name=self.ref.name, plaintext=base64.b64encode(bytes(dek)).decode("ascii"),
                associated_data=_associated_data(context), mount_point=self.ref.mount,
            )))
        ciphertext = str((answer.get("data") or {}).get("ciphertext", "")).encode("ascii", "replace")
        if not _CIPHERTEXT_RE.fullmatch(ciphertext):
            raise UnsupportedKeyError(f"{self.describe()} returned a ciphertext keyseal does not recognise")
        return ciphertext

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], where: str) -> bytearray:
        from hvac.exceptions import InvalidRequest

        if not _CIPHERTEXT_RE.fullmatch(wrapped):
            raise WrappedRecordError(f"{where}: its wrapped DEK is not a Vault Transit ciphertext: restore it")

        def decrypt(client: Any) -> Any:
            try:
                return client.secrets.transit.decrypt_data(
                    name=self.ref.name, ciphertext=wrapped.decode("ascii"),
                    associated_data=_associated_data(context), mount_point=self.ref.mount,
                )
            except InvalidRequest as exc:
                text = " ".join(map(str, exc.errors or ())) if not isinstance(exc.errors, str) else exc.errors
                if "authentication failed" in text or "invalid ciphertext" in text or "decode" in text:
                    raise WrappedRecordError(
                        f"{where}: {self.describe()} refused its wrapped DEK for this record (the record was "
                        f"tampered with, or its DEK belongs to another record): restore it"
                    ) from exc
                raise

        answer = self._call("update", "decrypt", f"unwrapping {where} with {self.describe()}", decrypt)
        try:
            dek = bytearray(base64.b64decode(str((answer.get("data") or {}).get("plaintext", "")), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise WrappedRecordError(f"{where}: {self.describe()} returned a DEK that is not base64") from exc
        if len(dek) != DEK_SIZE:
            zero(dek)
            raise WrappedRecordError(f"{where}: its wrapped DEK is not a {DEK_SIZE * 8}-bit key")
        return dek

    def canary_checks(self) -> None:
        """The Transit key's type (an AEAD key, not derived) before the round trip."""
        self.prepare_write()

    def close(self) -> None:
        self._vault.close()


def _associated_data(context: Mapping[str, str]) -> str:
    """The KEK context as Transit associated data: canonical JSON, base64 (Vault's wire form)."""
    canonical = json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return base64.b64encode(canonical.encode("ascii")).decode("ascii")
