"""Rollback and copy attacks on wrapped key records, with the real stores (a directory; WrappedKey resources in the
Kubernetes API emulator) and the real KEK providers (a local KEK file; a KMS key in the moto server):

- a fresh server replica (no memory, no ledger file of its own) is handed an older copy of a record;
- an older copy of a record is placed at another path;
- a record is copied into another namespace (or trust domain), as is or with its scope edited.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import kubernetes
import pytest

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.wrapped import WrappedKeysetSource
from keyseal._internal.ca.server import build_source
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.ledger import FileLedger
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.kek import KekProvider
from keyseal._internal.wrapping.keys import create_record, open_record, rewrap_record
from keyseal._internal.wrapping.local import LocalKek
from keyseal.errors import RecordRollbackError, WrappedRecordError
from tests.conftest import REGION
from tests.harness.ca import base_config
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

NAME = "keyseal-example.org-x509-0"


@pytest.fixture(params=["local", "awskms"])
def kek_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "local":
        return {"keyWrapping": {"provider": "local", "local": {"kekFile": str(tmp_path / "kek")}}}
    kms_emulator: KmsEmulator = request.getfixturevalue("kms_emulator")
    request.getfixturevalue("aws_env")
    client = boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                          aws_access_key_id="admin", aws_secret_access_key="admin")
    arn = client.create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"]
    return {"keyWrapping": {"provider": "awskms"}, "aws": {"kmsKeyARN": arn}}


@pytest.fixture(params=["directory", "kubernetes"])
def store_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    if request.param == "kubernetes":
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("POD_NAMESPACE", raising=False)
    return str(request.param)


class Replica:
    """One server replica's view of the store: its own process memory and (directory) its own ledger file."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path, store_kind: str, kek_config: dict[str, Any],
                 label: str, namespace: str | None = None, trust_domain: str = "example.org") -> None:
        overrides: dict[str, Any] = dict(kek_config)
        self.api = None
        if store_kind == "kubernetes":
            kube_api = request.getfixturevalue("kube_api")
            self.api = kube_api.api_client()
            overrides["store"] = {"type": "kubernetes", "kubernetes": {
                "namespace": namespace or request.getfixturevalue("namespace"), "apiServer": kube_api.url}}
        else:
            overrides["store"] = {"type": "directory", "directory": {
                "path": str(tmp / "store"), "ledgerFile": str(tmp / f"seen-versions-{label}.json")}}
        self.config = parse_config(base_config(tmp, trustDomain=trust_domain, **overrides))
        source = build_source(self.config, self.api)
        assert isinstance(source, WrappedKeysetSource)
        self.store, self.kek = source.store, source.kek

    def read_raw(self, name: str = NAME) -> Any:
        if self.api is None:
            return self.store.path(name).read_bytes()  # type: ignore[attr-defined]
        return custom(self.api).get_namespaced_custom_object("keyseal.dev", "v1", self.store.namespace,  # type: ignore[attr-defined]
                                                             "wrappedkeys", name)["spec"]

    def write_raw(self, content: Any, name: str = NAME) -> None:
        """What someone who may write the store does: put content there, bypassing keyseal."""
        if self.api is None:
            path = self.store.path(name)  # type: ignore[attr-defined]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            return
        objects = custom(self.api)
        namespace = self.store.namespace  # type: ignore[attr-defined]
        body = {"apiVersion": "keyseal.dev/v1", "kind": "WrappedKey", "metadata": {"name": name}, "spec": content}
        try:
            current = objects.get_namespaced_custom_object("keyseal.dev", "v1", namespace, "wrappedkeys", name)
        except kubernetes.client.exceptions.ApiException:
            objects.create_namespaced_custom_object("keyseal.dev", "v1", namespace, "wrappedkeys", body)
            return
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        objects.replace_namespaced_custom_object("keyseal.dev", "v1", namespace, "wrappedkeys", name, body)


def custom(api: Any) -> Any:
    return kubernetes.client.CustomObjectsApi(api)


def older_and_newer(replica: Replica) -> Any:
    """Version 1 of a record (as stored), then version 2 written over it (a rewrap): returns version 1."""
    create_record(replica.store, NAME, generate_private_key("p256"), replica.kek)
    old = replica.read_raw()
    rewrap_record(replica.store, NAME, replica.kek, replica.kek)
    assert open_record(replica.store, NAME, replica.kek).record.version == 2
    return old


def test_a_fresh_replica_refuses_an_older_record(request: pytest.FixtureRequest, tmp_path: Path, store_kind: str,
                                                 kek_config: dict[str, Any]) -> None:
    """Replica A wrote version 2; someone puts version 1 back; replica B starts fresh (nothing in memory, a ledger
    file of its own) and must still refuse it: the high-water mark is in the store, sealed under the KEK."""
    first = Replica(request, tmp_path, store_kind, kek_config, "a")
    old = older_and_newer(first)
    first.write_raw(old)
    fresh = Replica(request, tmp_path, store_kind, kek_config, "b", namespace=getattr(first.store, "namespace", None))
    with pytest.raises(RecordRollbackError, match="version 1, but version 2"):
        open_record(fresh.store, NAME, fresh.kek)


def test_the_high_water_mark_cannot_be_edited(request: pytest.FixtureRequest, tmp_path: Path, store_kind: str,
                                              kek_config: dict[str, Any]) -> None:
    """The seen-versions record is sealed like a key: edited, or replaced by an older copy of itself, it is
    refused (and every record with it) rather than believed."""
    first = Replica(request, tmp_path, store_kind, kek_config, "a")
    create_record(first.store, NAME, generate_private_key("p256"), first.kek)
    ledger_v1 = first.read_raw("keyseal-seen-versions")
    rewrap_record(first.store, NAME, first.kek, first.kek)
    namespace = getattr(first.store, "namespace", None)
    first.write_raw(ledger_v1, "keyseal-seen-versions")
    with pytest.raises(RecordRollbackError):  # the replica that saw the newer mark refuses the older one
        open_record(first.store, NAME, first.kek)
    tampered = re.sub(rb'"version": \d+', b'"version": 9', ledger_v1, count=1) if isinstance(ledger_v1, bytes) else \
        {**ledger_v1, "version": 9}
    assert tampered != ledger_v1
    first.write_raw(tampered, "keyseal-seen-versions")
    fresh = Replica(request, tmp_path, store_kind, kek_config, "b", namespace=namespace)
    with pytest.raises(WrappedRecordError):
        open_record(fresh.store, NAME, fresh.kek)


def test_an_older_copy_at_another_path_is_refused(tmp_path: Path, kek_config: dict[str, Any]) -> None:
    """#16: the ledger was keyed by absolute path, so an older copy of a key file placed elsewhere opened. A key
    file is known by the key itself now (the SHA-256 of its public key), whatever its name or path."""
    if kek_config["keyWrapping"]["provider"] == "local":
        kek: KekProvider = LocalKek(tmp_path / "kek")
    else:
        from keyseal._internal.wrapping.awskms import AwsKmsKek

        kek = AwsKmsKek(kek_config["aws"]["kmsKeyARN"])
    ledger = FileLedger(tmp_path / "home" / "seen-versions.json")  # one user's ledger, as keyseal sign uses
    home = DirectoryStore(tmp_path / "keys", ledger)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    create_record(home, "signing.key", generate_private_key("p256"), kek, created=created)
    old = home.path("signing.key").read_bytes()
    rewrap_record(home, "signing.key", kek, kek)
    open_record(home, "signing.key", kek)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "signing.key").write_bytes(old)
    with pytest.raises(RecordRollbackError, match="version 1, but version 2"):
        open_record(DirectoryStore(tmp_path / "elsewhere", FileLedger(ledger.path)), "signing.key", kek)
    # An unrelated key that shares the file name and was made in the same second (a script creating keys for
    # two projects) is not confused with it: it opens at version 1 after the first one was rewrapped.
    other = DirectoryStore(tmp_path / "other-project", FileLedger(ledger.path))
    create_record(other, "signing.key", generate_private_key("p256"), kek, created=created)
    assert open_record(other, "signing.key", kek).record.version == 1
    # The older copy under yet another name is still the same key: refused.
    (tmp_path / "renamed").mkdir()
    copy = tmp_path / "renamed" / "signing.key"
    copy.write_bytes(old)
    with pytest.raises(RecordRollbackError, match="version 1, but version 2"):
        open_record(DirectoryStore(tmp_path / "renamed", FileLedger(ledger.path)), "signing.key", kek)


def test_a_record_copied_to_another_namespace_is_refused(request: pytest.FixtureRequest, tmp_path: Path,
                                                         kek_config: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two trust-domain servers in two namespaces share a KEK: a record copied from one namespace to the other,
    as is, is refused (its scope names the first); with its scope edited to the second, it does not decrypt (the
    scope is in the AES-GCM associated data and the KMS encryption context)."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    source_ns, target_ns = request.getfixturevalue("namespace"), request.getfixturevalue("namespace") + "-b"
    first = Replica(request, tmp_path / "a", "kubernetes", kek_config, "a", namespace=source_ns)
    second = Replica(request, tmp_path / "b", "kubernetes", kek_config, "b", namespace=target_ns)
    create_record(first.store, NAME, generate_private_key("p256"), first.kek)
    create_record(second.store, NAME, generate_private_key("p256"), second.kek)
    spec = first.read_raw()
    assert spec["scope"] == f"trust-domain=example.org;namespace={source_ns}"
    second.write_raw(spec)
    fresh = Replica(request, tmp_path / "c", "kubernetes", kek_config, "c", namespace=target_ns)
    with pytest.raises(WrappedRecordError, match="belongs to trust-domain=example.org;namespace=" + source_ns):
        open_record(fresh.store, NAME, fresh.kek)
    second.write_raw({**spec, "scope": f"trust-domain=example.org;namespace={target_ns}"})
    with pytest.raises(WrappedRecordError, match=r"tampered|refused its wrapped DEK|does not unwrap"):
        open_record(Replica(request, tmp_path / "d", "kubernetes", kek_config, "d", namespace=target_ns).store,
                    NAME, fresh.kek)


def test_a_record_copied_to_another_trust_domain_is_refused(tmp_path: Path, kek_config: dict[str, Any],
                                                            request: pytest.FixtureRequest) -> None:
    """The same on the directory store: the scope names the trust domain."""
    first = Replica(request, tmp_path / "a", "directory", kek_config, "a")
    other = Replica(request, tmp_path / "b", "directory", kek_config, "b", trust_domain="other.example")
    create_record(first.store, NAME, generate_private_key("p256"), first.kek)
    other.write_raw(first.read_raw())
    with pytest.raises(WrappedRecordError, match=r"belongs to trust-domain=example\.org, not to "
                                                 r"trust-domain=other\.example"):
        open_record(other.store, NAME, other.kek)


def test_old_records_are_read_protected_and_bound_at_their_next_write(
        request: pytest.FixtureRequest, tmp_path: Path, store_kind: str, kek_config: dict[str, Any]) -> None:
    """Records an older keyseal wrote (format v1, no scope) in the server's store still open; from then on the
    store's high-water mark covers them (a fresh replica refuses an older one; a newer one is what an older replica
    still running wrote, see the rolling-upgrade test below); their next write makes them v2, bound to the trust
    domain (and namespace)."""
    replica = Replica(request, tmp_path, store_kind, kek_config, "a")
    if store_kind == "kubernetes":
        from keyseal._internal.store.kubernetes import KubernetesStore

        legacy: Any = KubernetesStore(replica.store.namespace, replica.api)  # type: ignore[attr-defined]
    else:
        legacy = DirectoryStore(tmp_path / "store", FileLedger(tmp_path / "legacy-ledger.json"))
    create_record(legacy, NAME, generate_private_key("p256"), replica.kek)
    version_1 = replica.read_raw()
    rewrap_record(legacy, NAME, replica.kek, replica.kek)
    version_2 = replica.read_raw()
    rewrap_record(legacy, NAME, replica.kek, replica.kek)
    version_3 = replica.read_raw()
    replica.write_raw(version_2)
    opened = open_record(replica.store, NAME, replica.kek)  # v1 records still open in the server's store
    assert opened.record.format == "keyseal.wrapped-key.v1" and opened.record.version == 2
    namespace = getattr(replica.store, "namespace", None)
    replica.write_raw(version_1)
    with pytest.raises(RecordRollbackError):
        open_record(Replica(request, tmp_path, store_kind, kek_config, "b", namespace=namespace).store, NAME,
                    replica.kek)
    replica.write_raw(version_3)  # newer: an older replica of a rolling upgrade rewrapped it
    assert open_record(Replica(request, tmp_path, store_kind, kek_config, "c", namespace=namespace).store, NAME,
                       replica.kek).record.version == 3
    rewrapped = rewrap_record(replica.store, NAME, replica.kek, replica.kek)
    assert rewrapped.format == "keyseal.wrapped-key.v2" and rewrapped.scope.startswith("trust-domain=example.org")
    assert open_record(replica.store, NAME, replica.kek).record.version == 4


def test_an_older_replica_rotating_during_a_rolling_upgrade_wedges_nothing(
        request: pytest.FixtureRequest, tmp_path: Path, store_kind: str, kek_config: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """A rolling upgrade: a new replica opens a record an older keyseal wrote (v1, no scope) and raises the store's
    mark to its version; a replica of the older version, still running, rotates that slot (v1, one version on).
    Every new replica refused that record for good ("newer than any this store has seen"), so the server was
    wedged. It is accepted, loudly, while no bound (v2) record of that name was ever seen; once one was, a v1 record
    is refused whatever its version, and an older record stays refused."""
    replica = Replica(request, tmp_path, store_kind, kek_config, "a")
    namespace = getattr(replica.store, "namespace", None)
    if store_kind == "kubernetes":
        from keyseal._internal.store.kubernetes import KubernetesStore

        legacy: Any = KubernetesStore(replica.store.namespace, replica.api)  # type: ignore[attr-defined]
    else:
        legacy = DirectoryStore(tmp_path / "store", FileLedger(tmp_path / "legacy-ledger.json"))
    create_record(legacy, NAME, generate_private_key("p256"), replica.kek)  # before the upgrade
    assert open_record(replica.store, NAME, replica.kek).record.version == 1  # the store's mark: 1
    create_record(legacy, NAME, generate_private_key("p256"), replica.kek, force=True)  # the older replica rotates
    rotated = replica.read_raw()
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.store"):
        opened = open_record(Replica(request, tmp_path, store_kind, kek_config, "b", namespace=namespace).store, NAME,
                             replica.kek)
    assert opened.record.format == "keyseal.wrapped-key.v1" and opened.record.version == 2
    assert any("older keyseal" in r.getMessage() for r in caplog.records)
    assert open_record(replica.store, NAME, replica.kek).record.version == 2  # and the running new replica too
    # A genuine v1 record of this name at a later version, from elsewhere (another namespace sharing the KEK,
    # before its upgrade): made here by the older version, then the store is put back.
    rewrap_record(legacy, NAME, replica.kek, replica.kek)
    rewrap_record(legacy, NAME, replica.kek, replica.kek)
    foreign_v1 = replica.read_raw()
    replica.write_raw(rotated)
    assert rewrap_record(replica.store, NAME, replica.kek, replica.kek).format == "keyseal.wrapped-key.v2"  # v3
    replica.write_raw(foreign_v1)  # v1, version 4: newer, but this store holds bound records of it now
    with pytest.raises(WrappedRecordError, match="bound"):
        open_record(Replica(request, tmp_path, store_kind, kek_config, "c", namespace=namespace).store, NAME,
                    replica.kek)
    replica.write_raw(rotated)  # older: refused as ever
    with pytest.raises(RecordRollbackError, match="version 2, but version 3"):
        open_record(Replica(request, tmp_path, store_kind, kek_config, "d", namespace=namespace).store, NAME,
                    replica.kek)
