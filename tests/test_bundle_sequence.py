"""`spiffe_sequence` changes whenever the bundle's bytes change, and every replica serves the same sequence for
the same bytes (keyseal._internal.ca.bundle_sequence): a restart with another ca.ttl, ECDSA CA certificates signed again
by a key manager (KMS), rotation, and replicas starting at the same moment on one store."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyseal._internal.ca.bundle_sequence import SequenceLedger
from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.pin_store import DirectoryPinStore
from keyseal._internal.ca.server import CaServer
from keyseal.errors import KeysealError
from tests.harness.ca import FakeClock, base_config
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.replicas import run_as_replicas

HOUR = timedelta(hours=1)


def served(server: CaServer) -> tuple[bytes, int]:
    """The bundle as the API answers it (bytes), and its sequence."""
    from keyseal._internal.ca.http.messages import Request

    response = server.api.handle(Request("GET", "/v1/bundle", {}, b"", "test"))
    assert response.status == 200
    return response.body, json.loads(response.body)["spiffe_sequence"]


def keys_of(body: bytes) -> Any:
    return json.loads(body)["keys"]


def run(config: dict[str, Any], clock: FakeClock) -> tuple[bytes, int]:
    server = CaServer(parse_config(config), clock=clock, rotation_thread=False)
    server.start()
    try:
        return served(server)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_restart_with_another_ca_ttl_changes_the_sequence(tmp_path: Path) -> None:
    clock = FakeClock()
    body1, seq1 = run(base_config(tmp_path), clock)
    again, seq_again = run(base_config(tmp_path), clock)
    assert (again, seq_again) == (body1, seq1)  # the same bytes keep their sequence
    body2, seq2 = run(base_config(tmp_path, ca={"ttl": "30h"}), clock)
    assert body2 != body1  # the CA certificates were derived again with another lifetime ...
    assert seq2 > seq1  # ... so the sequence moves on (it did not: it was a function of keyset numbers alone)
    body3, seq3 = run(base_config(tmp_path), clock)  # and back to the old lifetime: still forward
    assert keys_of(body3) == keys_of(body1) and seq3 > seq2


@pytest.mark.slow
def test_rotation_moves_the_sequence_forward(tmp_path: Path) -> None:
    clock = FakeClock()
    server = CaServer(parse_config(base_config(tmp_path)), clock=clock, rotation_thread=False)
    server.start()
    try:
        seen = [served(server)[1]]
        for _ in range(6):
            clock.advance(6 * HOUR)
            server.tick()
            body, sequence = served(server)
            assert sequence >= seen[-1] and served(server) == (body, sequence)
            seen.append(sequence)
        assert len(set(seen)) >= 4 and seen == sorted(seen)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_replicas_serve_the_same_sequence_for_the_same_bytes(tmp_path: Path) -> None:
    clock = FakeClock()

    def config(label: str) -> Any:  # one store, and each replica's own local ledger of record versions
        return parse_config(base_config(tmp_path, store={"type": "directory", "directory": {
            "path": str(tmp_path / "store"), "ledgerFile": str(tmp_path / f"seen-versions-{label}.json")}}))

    CaServer(config("first"), clock=clock, rotation_thread=False).manager.start()  # keyset 1 exists already
    servers: dict[str, CaServer] = {}

    def replica(label: str) -> None:
        server = CaServer(config(label), clock=clock, rotation_thread=False)
        server.start()
        servers[label] = server

    run_as_replicas(replica, labels=("A", "B", "C"))
    try:

        answers = {label: served(server) for label, server in servers.items()}
        assert len(set(answers.values())) == 1, answers
        clock.advance(13 * HOUR)  # keyset 2 prepared: every replica refreshes at the same time
        run_as_replicas(lambda label: servers[label].tick(), labels=tuple(servers))
        after = {label: served(server) for label, server in servers.items()}
        assert len(set(after.values())) == 1, after
        assert next(iter(after.values()))[1] > next(iter(answers.values()))[1]
    finally:
        for server in servers.values():
            server.shutdown()


def test_a_replica_adopts_the_number_recorded_anew_for_its_contents(tmp_path: Path) -> None:
    clock = FakeClock()
    old = CaServer(parse_config(base_config(tmp_path)), clock=clock, rotation_thread=False)
    old.start()
    try:
        body, first = served(old)
        _, other = run(base_config(tmp_path, ca={"ttl": "30h"}), clock)  # a replica with another ca.ttl
        again_body, again = run(base_config(tmp_path), clock)  # a replica back on the old one: forward
        assert keys_of(again_body) == keys_of(body) and again > other > first
        old.tick()  # the replica that kept running serves the same bytes: it adopts the number recorded for them
        assert served(old) == (again_body, again)
    finally:
        old.shutdown()


def test_ecdsa_kms_custody_signing_again_changes_the_sequence(
        tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    config = base_config(tmp_path, custody="kms",
                         aws={"endpoints": {"kms": kms_emulator.endpoint}, "keyManager": {"aliasPrefix": prefix}})
    clock = FakeClock()
    body1, seq1 = run(config, clock)
    body2, seq2 = run(config, clock)  # the same keys; the CA certificate is signed again (ECDSA: new bytes)
    assert body2 != body1 and [k.get("kid") for k in keys_of(body2)] == [k.get("kid") for k in keys_of(body1)]
    assert seq2 > seq1


def test_the_ledger_gives_one_number_to_contents_raced_by_many_writers(tmp_path: Path) -> None:
    ledger = SequenceLedger(DirectoryPinStore(tmp_path, "sequences"))
    assert ledger.sequence_for("a" * 64, 3) == 3
    results: dict[str, int] = {}
    lock = threading.Lock()

    def write(label: str) -> None:
        number = SequenceLedger(DirectoryPinStore(tmp_path, "sequences")).sequence_for("b" * 64, 0)
        with lock:
            results[label] = number

    run_as_replicas(write, labels=tuple("ABCDEF"))
    assert set(results.values()) == {4}
    assert ledger.sequence_for("b" * 64, 0) == 4  # the newest contents keep their number
    assert ledger.recorded("a" * 64) == 3
    assert ledger.sequence_for("a" * 64, 0) == 5  # older contents coming back: forward, never back to 3
    assert ledger.sequence_for("c" * 64, 10) == 10  # never below the floor (what older versions served)
    (tmp_path / "sequences.json").write_text("not json")
    with pytest.raises(KeysealError, match="not a keyseal bundle-sequence document"):
        ledger.sequence_for("d" * 64, 0)


SEQUENCE_TOKEN = "keyseal-sequence"  # a token of this module's own: others' tests count theirs by label


@pytest.fixture(scope="module")
def pkcs11_token(softhsm: Any) -> str:
    return str(softhsm.init_token(SEQUENCE_TOKEN))


@pytest.mark.slow
def test_ecdsa_pkcs11_custody_signing_again_changes_the_sequence(tmp_path: Path, softhsm: Any,
                                                                  pkcs11_token: str) -> None:
    from keyseal._internal.providers.pkcs11 import session as pkcs11_session
    from tests.harness.softhsm import USER_PIN

    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    config = base_config(tmp_path, custody="pkcs11",
                         pkcs11={"uri": f"pkcs11:token={pkcs11_token}", "modulePath": softhsm.module,
                                 "pinFile": str(pin_file), "labelPrefix": f"test/{uuid.uuid4().hex[:8]}/"})
    clock = FakeClock()
    try:
        body1, seq1 = run(config, clock)
        body2, seq2 = run(config, clock)  # the token signs the same CA certificate again: new ECDSA bytes
    finally:
        pkcs11_session.close_all_sessions()
    assert body2 != body1 and [k.get("kid") for k in keys_of(body2)] == [k.get("kid") for k in keys_of(body1)]
    assert seq2 > seq1


@pytest.mark.slow
def test_on_the_kubernetes_store_sequences_and_federated_bundles_live_in_configmaps_the_role_allows(
        kube_api: Any, namespace: str, tmp_path: Path) -> None:
    """Two replicas on the Kubernetes store agree through the ConfigMap <recordPrefix>-bundle-sequence; every
    call they make for it, and for the federated bundles' ConfigMap, is one the chart's Role allows."""
    import helm_python

    from tests.test_entries_kubernetes import CHART, allowed_by, kube_store
    from tests.test_helm_chart import render, server_role

    role = server_role(render(helm_python.Chart.load(str(CHART))))
    config = parse_config(base_config(tmp_path, store=kube_store(kube_api, namespace)))
    clock = FakeClock()
    before = len(kube_api.verbs())
    answers = []
    for _ in range(2):
        server = CaServer(config, clock=clock, rotation_thread=False, kube_api_client=kube_api.api_client())
        server.start()
        try:
            answers.append(served(server))
            server.tick()
            bundles_store = server.federation.store
            assert bundles_store is not None
            bundles_store.write(b'{"format": "keyseal.federated-bundles.v1", "bundles": {}}\n',
                                bundles_store.read()[1] if bundles_store.read() else None)
        finally:
            server.shutdown()
    assert answers[0] == answers[1]
    calls = [c for c in kube_api.verbs()[before:] if c[2] == "configmaps"]
    names = {c[3] for c in calls}
    assert {f"{config.record_prefix}-bundle-sequence", f"{config.record_prefix}-federated-bundles"} <= names | {""}
    assert [c for c in calls if not allowed_by(role, *c)] == []
