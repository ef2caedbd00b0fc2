"""`wrapped` custody: each CA key is an envelope-encrypted record (keyseal.wrapped-key.v2, bound to the trust domain
and namespace; v1 records of older versions are read) in a record store, with its shared seen-versions record.

Records live in a ring of SLOTS slots, two records per slot: `<prefix>-x509-<slot>` and `<prefix>-jwt-<slot>`.
Keyset n lives in slot (n - 1) mod SLOTS at record version (n - 1) // SLOTS + 1, so the record version, which
the record binds and the store's ledger keeps from going backwards, also names the keyset; a startup reads
2 * SLOTS records and decrypts only the live ones. A slot is reused only once the keyset in it has expired
(keysets are created at least half a CA lifetime apart, so at most three are ever live), which overwrites
expired CA keys instead of keeping them forever.

Creating keyset n is a conditional write of version v over version v - 1: of two replicas that try at once,
the store lets exactly one win (a 409 Conflict or a changed file hash for the other), and the loser finds the
winner's keyset on its next read. The X.509 record decides; the JWT record follows it (and a JWT record left
missing by a crash between the two writes is created by whoever next reads the slot). A reader that finds the
X.509 record without its JWT record may simply have read between the winner's two writes: it re-reads for up
to HALF_WRITE_WAIT seconds before it concludes that the writer died, and warns only then.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyseal._internal.ca.custody.keys import CaKey, MemoryCaKey
from keyseal._internal.ca.custody.source import KeysetKeys, KeysetSource, Loaded, SlotBusyError
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.store import RecordStore, StoredRecord
from keyseal._internal.wrapping.envelope import seal, unseal
from keyseal._internal.wrapping.keys import key_type_of
from keyseal._internal.wrapping.provider import KekProvider, new_dek, zero
from keyseal.errors import KekMismatchError, WrappedRecordError

if TYPE_CHECKING:
    from keyseal._internal.ca.config import Config
    from keyseal._internal.ca.custody.source import CustodyContext

__all__ = ["SLOTS", "WrappedKeysetSource", "open"]

log = logging.getLogger(__name__)

SLOTS = 4
HALF_WRITE_WAIT = 2.0  # seconds a reader waits for the second record of a keyset being written ...
HALF_WRITE_POLL = 0.1  # ... re-reading this often


class _Exists(Exception):
    """Another writer created the record first."""


class WrappedKeysetSource(KeysetSource):
    def __init__(self, store: RecordStore, kek: KekProvider, prefix: str, x509_key_type: str,
                 jwt_key_type: str) -> None:
        self.store = store
        self.kek = kek
        self.prefix = prefix
        self.key_types = {"x509": x509_key_type, "jwt": jwt_key_type}
        self._opened: dict[tuple[str, str], CaKey] = {}  # (record name, store revision) -> key

    def describe(self) -> str:
        return f"wrapped records {self.prefix}-* ({self.store.location(self.name('x509', 0))} ...)"

    def name(self, kind: str, slot: int) -> str:
        return f"{self.prefix}-{kind}-{slot}"

    def startup_check(self) -> None:
        """Before anything is written: refuse records of another KEK provider or KEK, then prove the KEK works.

        With records present, opening them proves Decrypt (one per live record), so only a wrap is tried
        (kms:Encrypt is needed at the next rotation); with none, the full wrap/unwrap canary runs, so a role
        that could write records but not read them back never writes one.
        """
        found = False
        unopenable: list[tuple[str, str]] = []  # (where, the KEK id the record names)
        for slot in range(SLOTS):
            for kind in ("x509", "jwt"):
                stored = self.store.peek(self.name(kind, slot))  # the KEK first: the ledger needs it too
                if stored is None:
                    continue
                found = True
                where = self.store.location(self.name(kind, slot))
                if stored.record.kek_provider == self.kek.provider and stored.record.kek_id != self.kek.kek_id:
                    unopenable.append((where, stored.record.kek_id))
                else:
                    self.kek.check_record(stored.record, where)  # another provider: its own message
        if unopenable:
            raise KekMismatchError(
                f"refusing to start: {len(unopenable)} stored CA key record(s) ({unopenable[0][0]}"
                f"{' ...' if len(unopenable) > 1 else ''}) are wrapped by {self.kek.provider} KEK "
                f"{', '.join(sorted({kek_id for _, kek_id in unopenable}))}, and no configured KEK opens them "
                f"(the configured one is {self.kek.describe()}, id {self.kek.kek_id}); the CA keys are unreadable "
                f"until the KEK they were written with is restored (e.g. the KEK Secret from a backup); nothing "
                f"was written, and no new CA keys are made over them"
            )
        if not found:
            self.kek.canary()
            return
        self.kek.prepare_write()
        dek = new_dek()
        try:
            self.kek.wrap(dek, {"keyseal:purpose": "canary"})
        finally:
            zero(dek)

    def load(self, live_after: datetime) -> Loaded:
        keysets: list[KeysetKeys] = []
        highest = 0
        for slot in range(SLOTS):
            x509_name = self.name("x509", slot)
            stored = self.store.get(x509_name)
            if stored is None:
                continue
            where = self.store.location(x509_name)
            self.kek.check_record(stored.record, where)  # a provider switch is refused even for old records
            number = (stored.record.version - 1) * SLOTS + slot + 1
            highest = max(highest, number)
            if stored.record.created <= live_after:
                continue
            jwt = self._jwt_record(slot, stored.record.version, stored.record.created)
            keysets.append(KeysetKeys(number, stored.record.created, self._open(x509_name, stored),
                                      self._open(self.name("jwt", slot), jwt)))
        live = {(self.name(k, (ks.number - 1) % SLOTS)) for ks in keysets for k in ("x509", "jwt")}
        self._opened = {key: value for key, value in self._opened.items() if key[0] in live}
        return Loaded(tuple(sorted(keysets, key=lambda k: k.number)), highest)

    def create(self, number: int, not_before: datetime, live_after: datetime) -> bool:
        slot, version = (number - 1) % SLOTS, (number - 1) // SLOTS + 1
        if not self._create_record("x509", slot, version, not_before, live_after):
            return False
        self._create_record("jwt", slot, version, not_before, None)
        return True

    # -- internals -------------------------------------------------------------------------------------

    def _jwt_record(self, slot: int, version: int, created: datetime) -> StoredRecord:
        name = self.name("jwt", slot)
        stored = self._await_record(name, version)
        if stored is None or stored.record.version < version:
            log.warning("%s is missing for keyset version %d (a writer stopped half way): creating it",
                        self.store.location(name), version)
            self._create_record("jwt", slot, version, created, None)
            stored = self.store.get(name)
        if stored is None or stored.record.version != version:
            found = "missing" if stored is None else f"version {stored.record.version}"
            raise WrappedRecordError(
                f"{self.store.location(name)} is {found}, but {self.store.location(self.name('x509', slot))} is "
                f"version {version}: the two records of a keyset disagree; restore both from a backup"
            )
        self.kek.check_record(stored.record, self.store.location(name))
        return stored

    def _await_record(self, name: str, version: int) -> StoredRecord | None:
        """The record `name` once it reaches `version`, or as it is after HALF_WRITE_WAIT seconds."""
        deadline = time.monotonic() + HALF_WRITE_WAIT
        while True:
            stored = self.store.get(name)
            if (stored is not None and stored.record.version >= version) or time.monotonic() >= deadline:
                return stored
            time.sleep(HALF_WRITE_POLL)

    def _open(self, name: str, stored: StoredRecord) -> CaKey:
        cached = self._opened.get((name, stored.revision))
        if cached is not None:
            return cached
        where = self.store.location(name)
        der = unseal(stored.record, self.kek, where)
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise WrappedRecordError(f"{where} decrypts, but not to a private key keyseal can read") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or \
                key_type_of(key) != stored.record.key_type:
            raise WrappedRecordError(f"{where} does not hold the {stored.record.key_type} CA key its header names")
        self.store.remember(stored.record)
        opened = MemoryCaKey(key)
        self._opened[(name, stored.revision)] = opened
        return opened

    def _create_record(self, kind: str, slot: int, version: int, created: datetime,
                       live_after: datetime | None) -> bool:
        name = self.name(kind, slot)
        where = self.store.location(name)
        key_type = self.key_types[kind]

        def produce(current: StoredRecord | None) -> WrappedRecord:
            current_version = current.record.version if current else 0
            if current_version >= version:
                raise _Exists
            if current_version != version - 1:
                raise WrappedRecordError(
                    f"{where} is version {current_version}, but keyset record version {version - 1} was "
                    f"expected before writing version {version}: the store is inconsistent; restore it"
                )
            if current is not None:
                self.kek.check_record(current.record, where)
                if live_after is not None and current.record.created > live_after:
                    raise SlotBusyError(
                        f"{where} still holds a keyset that has not expired (created "
                        f"{current.record.created:%Y-%m-%dT%H:%M:%SZ}): the new keyset waits until it has"
                    )
            key = generate_private_key(key_type)
            der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            return seal(der, name=name, version=version, created=created, key_type=key_type_of(key), kek=self.kek,
                        scope=self.store.scope)

        try:
            self.store.update(name, produce)
        except _Exists:
            log.info("%s version %d was created by another replica: using it", where, version)
            return False
        log.info("created %s version %d (%s key)", where, version, key_type)
        return True


def open(config: Config, context: CustodyContext) -> WrappedKeysetSource:
    """Registry entry point for `custody: wrapped`: the configured KEK and record store (directory or Kubernetes),
    with the store's own rollback ledger."""
    from keyseal._internal.ca.config import CA_KEY_TYPES
    from keyseal._internal.wrapping.kek import parse_kek

    kek: KekProvider
    if config.wrapping_provider == "vault" and config.vault is not None:
        from keyseal._internal.wrapping.vault import VaultKek

        vault = config.vault
        kek = VaultKek.from_config(vault.address, vault.transit_key, mount=vault.mount, token_file=vault.token_file,
                                   kubernetes_role=vault.kubernetes_role, kubernetes_mount=vault.kubernetes_mount,
                                   namespace=vault.namespace, ca_bundle=vault.ca_bundle)
        log.info("Key wrapping via Vault Transit key=%s/%s address=%s", vault.mount, vault.transit_key,
                 vault.address)
    else:
        kek = parse_kek(config.kek_spec(), kms_endpoint=config.kms_endpoint, region=config.aws_region)
    if config.wrapping_provider == "local":
        log.info("Key wrapping via local KEK file %s", getattr(kek, "path", "?"))
    from keyseal._internal.wrapping.store_ledger import StoreLedger

    # Records are bound to the trust domain (and namespace): a copy in another one does not open there.
    scope = f"trust-domain={config.trust_domain}"
    store: RecordStore
    if config.store_type == "kubernetes":
        from keyseal._internal.providers.kubernetes.client import api_client_from_environment, resolve_namespace
        from keyseal._internal.store.kubernetes import KubernetesStore

        client = context.kube_api_client or api_client_from_environment(config.kube_api_server)
        namespace = resolve_namespace(config.kube_namespace, "the WrappedKey resources")
        store = KubernetesStore(namespace, client, scope=f"{scope};namespace={namespace}")
    else:
        from keyseal._internal.records.ledger import FileLedger
        from keyseal._internal.store.directory import DirectoryStore

        store = DirectoryStore(config.store_path, FileLedger(config.ledger_file) if config.ledger_file else None,
                               scope=scope)
    StoreLedger(store, kek)  # the rollback high-water mark every replica reads, in the store itself
    return WrappedKeysetSource(store, kek, config.record_prefix, CA_KEY_TYPES[config.ca_key_type],
                               CA_KEY_TYPES[config.jwt_key_type])
