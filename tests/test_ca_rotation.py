"""Keyset rotation (prepared -> active -> old) driven by an injected clock; restarts; two replicas racing on
the Kubernetes store (a real 409 from the API server decides); the ring of record slots."""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
import yaml

from keyseal._internal.ca.bundle import bundle_json
from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.wrapped import SLOTS, WrappedKeysetSource
from keyseal._internal.ca.server import CaServer
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.store.kubernetes import KubernetesStore
from keyseal._internal.wrapping.local import LocalKek
from tests.conftest import REGION
from tests.harness.ca import (
    START,
    TOKENS,
    TRUST_DOMAIN,
    Client,
    FakeClock,
    base_config,
    chain_of,
    new_key,
    openssl_verify,
    verify_x509_svid,
)
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.kube_api import KubeApi
from tests.harness.replicas import run_at_once

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

A = f"spiffe://{TRUST_DOMAIN}/ns/a/w"
HOUR = timedelta(hours=1)


def start_server(config: dict[str, Any], clock: FakeClock) -> CaServer:
    server = CaServer(parse_config(config), clock=clock, rotation_thread=False)
    server.start()
    server.start_background()
    return server


def client_for(server: CaServer) -> Client:
    """TLS without server verification: the injected clock is years ahead of the real one, which the TLS
    client checks the serving certificate against (test_server_api.py verifies the serving certificate)."""
    return Client(server.port, None, token=TOKENS["admin"])


def serving_certificate_issuer(server: CaServer) -> bytes:
    """The AKI of the certificate the server presents now (its self-issued serving certificate)."""
    import socket
    import ssl

    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    aki = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier is not None
    return aki.value.key_identifier


def signer_ski(body: dict[str, Any]) -> bytes:
    from cryptography import x509

    leaf = chain_of(body)[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier


def test_prepared_active_old(tmp_path: Path) -> None:
    clock = FakeClock()
    server = start_server(base_config(tmp_path), clock)
    try:
        one = server.manager.keyset(1)
        assert one is not None
        assert [(k.number, s) for k, s in server.manager.live()] == [(1, "active")]

        # Half way through keyset 1's life, keyset 2 is prepared: published, not yet signing.
        clock.advance(12 * HOUR)
        server.tick()
        assert [(k.number, s) for k, s in server.manager.live()] == [(1, "active"), (2, "prepared")]
        two = server.manager.keyset(2)
        assert two is not None
        client = client_for(server)
        bundle = client.bundle()
        assert bundle["spiffe_sequence"] == 3
        assert len([k for k in bundle["keys"] if k["use"] == "x509-svid"]) == 2
        assert len([k for k in bundle["keys"] if k["use"] == "jwt-svid"]) == 2
        status, body = client.x509_svid(A)
        assert status == 200 and body["keyset"] == 1
        assert signer_ski(body) == one.subject_key_identifier.digest
        assert serving_certificate_issuer(server) == one.subject_key_identifier.digest
        status, jwt = client.jwt_svid(A, "x")
        assert jwt["keyset"] == 1

        # Just before five sixths of keyset 1's life: still keyset 1. Issue an SVID that outlives the switch.
        clock.advance(7 * HOUR + 30 * timedelta(minutes=1))  # 19h30
        server.tick()
        old_key = new_key()
        status, old_svid = client.x509_svid(A, old_key)
        assert status == 200 and old_svid["keyset"] == 1

        # At five sixths (20h) keyset 2 becomes active and keyset 1 old: new SVIDs chain to keyset 2.
        clock.advance(30 * timedelta(minutes=1))
        server.tick()
        assert [(k.number, s) for k, s in server.manager.live()] == [(1, "old"), (2, "active")]
        assert serving_certificate_issuer(server) == two.subject_key_identifier.digest  # renewed with the switch
        client.close()
        client = client_for(server)
        key = new_key()
        status, body = client.x509_svid(A, key)
        assert status == 200 and body["keyset"] == 2
        assert signer_ski(body) == two.subject_key_identifier.digest
        bundle = client.bundle()
        verify_x509_svid(body, key, bundle, clock())
        assert openssl_verify(tmp_path, body["certChain"][0], bundle, clock()).returncode == 0
        assert client.jwt_svid(A, "x")[1]["keyset"] == 2

        # The SVID keyset 1 signed still verifies against the published bundle until it expires (20h30).
        just_before = clock() + 29 * timedelta(minutes=1)
        verify_x509_svid(old_svid, old_key, bundle, just_before)
        assert openssl_verify(tmp_path, old_svid["certChain"][0], bundle, just_before).returncode == 0
        after = clock() + 31 * timedelta(minutes=1)
        assert openssl_verify(tmp_path, old_svid["certChain"][0], bundle, after).returncode != 0

        # At 24h keyset 1 expires and leaves the bundle; keyset 2 is half way, so keyset 3 is prepared.
        clock.advance(4 * HOUR)
        server.tick()
        assert [(k.number, s) for k, s in server.manager.live()] == [(2, "active"), (3, "prepared")]
        assert client.bundle()["spiffe_sequence"] == 5
        client.close()
    finally:
        server.shutdown()


def test_slots_are_reused_only_after_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    config = base_config(tmp_path)
    server = start_server(config, clock)
    try:
        seen_keys = set()
        for step in range(1, 12):
            clock.advance(12 * HOUR)
            server.tick()
            live = server.manager.live()
            assert len(live) <= 3
            assert [k.number for k, _ in live][-1] == step + 1
            active = server.manager.active()
            seen_keys.add(active.ca_der)
            client = client_for(server)
            key = new_key()
            status, body = client.x509_svid(A, key)
            assert status == 200 and body["keyset"] == active.number
            verify_x509_svid(body, key, client.bundle(), clock())
            client.close()
        # the store directory also holds the bundle sequences (ca.bundle_sequence), which are no record
        records = sorted(p.name for p in (tmp_path / "store").iterdir() if not p.name.endswith("-sequence.json"))
        assert records == sorted([f"keyseal-{TRUST_DOMAIN}-{kind}-{slot}" for kind in ("x509", "jwt")
                                  for slot in range(SLOTS)] + ["keyseal-seen-versions"])
        assert len(seen_keys) >= 10
    finally:
        server.shutdown()


def test_restart_gives_the_same_bundle_with_one_decrypt_per_record(
        tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    admin = boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    arn = admin.create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"]
    config = base_config(tmp_path, keyWrapping={"provider": "awskms"}, aws={"kmsKeyARN": arn})
    clock = FakeClock()
    first = start_server(config, clock)
    clock.advance(13 * HOUR)
    first.tick()  # keyset 2 prepared: two live keysets, four live records
    assert len(first.manager.live()) == 2
    before = client_for(first)
    bundle_before = before.request("GET", "/v1/bundle")[1]
    before.close()
    first.shutdown()
    store = tmp_path / "store"
    files_before = {p.name: p.read_bytes() for p in store.iterdir()}

    kms_emulator.calls.clear()
    second = start_server(config, clock)
    try:
        counts = kms_emulator.calls.counts()
        assert counts["Decrypt"] == 5, counts  # one per live record and one for the seen-versions record
        assert counts["GenerateDataKey"] == 0
        after = client_for(second)
        assert after.request("GET", "/v1/bundle")[1] == bundle_before
        after.close()
        assert {p.name: p.read_bytes() for p in store.iterdir()} == files_before  # nothing rewritten
        assert bundle_json([k for k, _ in second.manager.live()], timedelta(minutes=5)) == \
            bundle_json([k for k, _ in first.manager.live()], timedelta(minutes=5))
    finally:
        second.shutdown()


def test_missing_jwt_record_is_recreated(tmp_path: Path) -> None:
    clock = FakeClock()
    server = start_server(base_config(tmp_path), clock)
    server.shutdown()
    jwt_record = tmp_path / "store" / f"keyseal-{TRUST_DOMAIN}-jwt-0"
    jwt_record.unlink()  # as if the writer stopped between the X.509 and the JWT record
    again = start_server(base_config(tmp_path), clock)
    try:
        assert jwt_record.exists()
        assert [k.number for k, _ in again.manager.live()] == [1]
    finally:
        again.shutdown()


# -- two replicas on the Kubernetes store --------------------------------------------------------------------


class RacingStore(KubernetesStore):
    """The real Kubernetes store, made to hold its first write of `name` until the other replica is about to
    write too: both then send a write based on the same state, and the API server must refuse one."""

    def __init__(self, *args: Any, barrier: threading.Barrier, name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.barrier, self.race_name = barrier, name

    def _write(self, name: str, record: Any, expected_revision: str | None) -> str:
        if name == self.race_name:
            self.race_name = ""
            self.barrier.wait(timeout=30)
        return super()._write(name, record, expected_revision)


def replica(kube_api: KubeApi, namespace: str, kek: LocalKek, clock: FakeClock, barrier: threading.Barrier,
            race: str) -> tuple[KeysetManager, RacingStore]:
    store = RacingStore(namespace, kube_api.api_client(), ledger=VersionLedger(), barrier=barrier, name=race)
    source = WrappedKeysetSource(store, kek, f"keyseal-{TRUST_DOMAIN}", "p256", "p256")
    return KeysetManager(source, TRUST_DOMAIN, 24 * HOUR, timedelta(minutes=5), clock), store


def test_two_replicas_make_exactly_one_keyset(kube_api: KubeApi, tmp_path: Path) -> None:
    namespace = "race"
    kek = LocalKek(tmp_path / "kek")
    clock = FakeClock(START)
    prefix = f"keyseal-{TRUST_DOMAIN}"
    barrier = threading.Barrier(2)
    one, store_one = replica(kube_api, namespace, kek, clock, barrier, f"{prefix}-x509-0")
    two, store_two = replica(kube_api, namespace, kek, clock, barrier, f"{prefix}-x509-0")

    # Both start on an empty store at once: both try to create keyset 1, the API server keeps one.
    run_at_once(one.start, two.start)
    assert len(kube_api.history(namespace, f"{prefix}-x509-0")) == 1
    assert len(kube_api.history(namespace, f"{prefix}-jwt-0")) == 1
    assert one.active().ca_der == two.active().ca_der

    # Three rotations, each replica refreshing in turn: no duplicate, both always agree.
    for _ in range(3):
        clock.advance(12 * HOUR)
        one.refresh()
        two.refresh()
        assert [k.ca_der for k, _ in one.live()] == [k.ca_der for k, _ in two.live()]

    # Keyset 5 reuses slot 0 (keyset 1 has expired): a replace with resourceVersion. Both race again.
    barrier.reset()
    store_one.race_name = store_two.race_name = f"{prefix}-x509-0"
    conflicts_before = len(kube_api.conflicts(namespace))
    clock.advance(12 * HOUR)
    run_at_once(one.refresh, two.refresh)
    conflicts = kube_api.conflicts(namespace)[conflicts_before:]
    assert len(conflicts) == 1, conflicts  # the API server refused exactly one writer
    history = kube_api.history(namespace, f"{prefix}-x509-0")
    assert [h["spec"]["version"] for h in history] == [1, 2]  # keyset 1, then exactly one keyset 5
    assert [h["spec"]["version"] for h in kube_api.history(namespace, f"{prefix}-jwt-0")] == [1, 2]
    assert [k.number for k, _ in one.live()] == [k.number for k, _ in two.live()] == [4, 5]
    assert bundle_json([k for k, _ in one.live()], timedelta(minutes=5)) == \
        bundle_json([k for k, _ in two.live()], timedelta(minutes=5))
    # What the server writes is what the shipped CRD admits, under valid Kubernetes object names.
    crd = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy" / "crds" /
                          "wrappedkeys.keyseal.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for kind in ("x509", "jwt"):
        for obj in kube_api.history(namespace, f"{prefix}-{kind}-0"):
            jsonschema.validate(obj, schema)
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                                obj["metadata"]["name"])


def test_schedule_publishes_a_late_keyset_before_it_signs() -> None:
    """A keyset prepared late (the server was down at the half-life) is still published for one refresh hint
    before it becomes active, unless its predecessor expires first."""
    from dataclasses import dataclass
    from datetime import datetime

    from keyseal._internal.ca.custody.schedule import plan

    @dataclass(frozen=True)
    class Times:
        number: int
        not_before: datetime
        not_after: datetime

    hint = timedelta(minutes=5)
    one = Times(1, START, START + 24 * HOUR)
    late = Times(2, START + 21 * HOUR, START + 45 * HOUR)
    at = START + 21 * HOUR + timedelta(minutes=1)
    assert [(p.number, p.state) for p in plan([one, late], at, hint).phases] == [(1, "active"), (2, "prepared")]
    at = START + 21 * HOUR + timedelta(minutes=5)
    assert [(p.number, p.state) for p in plan([one, late], at, hint).phases] == [(1, "old"), (2, "active")]
    very_late = Times(2, START + 24 * HOUR - timedelta(minutes=1), START + 48 * HOUR - timedelta(minutes=1))
    at = START + 24 * HOUR - timedelta(seconds=30)
    assert [(p.number, p.state) for p in plan([one, very_late], at, hint).phases] == [(1, "active"), (2, "prepared")]
    after = plan([one, very_late], START + 24 * HOUR, hint)
    assert [(p.number, p.state) for p in after.phases] == [(2, "active")]
    assert plan([], START, hint).prepare
    assert plan([one], START + 12 * HOUR, hint).prepare
    assert not plan([one], START + 12 * HOUR - timedelta(seconds=1), hint).prepare
    assert not plan([one, late], START + 22 * HOUR, hint).prepare  # the newest is not half way yet
