"""Replicas on one Kubernetes store under partition and config skew, driven by an injected clock:
- a replica whose Kubernetes API connections are reset (the emulator's EMULATED PARTITION) turns not-ready
  within the bound, says how stale it is (log line, metric), never signs with a keyset the schedule retired,
  and is ready again, with the others' bundle, once it can read the store;
- two replicas with different bundle.refreshHint: the agents' bundle ConfigMap only moves forward (an equal
  sequence never overwrites), so it is written a bounded number of times instead of at every publication."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import ssl
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import keyseal._internal.ca.bundle_configmap as bundle_configmap
from keyseal._internal.ca.bundle_configmap import BUNDLE_KEY, ENVIRONMENT
from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.server import CaServer
from keyseal.errors import KeysealError
from tests.harness.ca import START, TOKENS, TRUST_DOMAIN, Client, FakeClock, base_config
from tests.harness.kube_api import KubeApi

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

A = f"spiffe://{TRUST_DOMAIN}/ns/a/w"
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def replica(tmp: Path, kube_api: KubeApi, namespace: str, name: str, clock: FakeClock,
            **overrides: Any) -> CaServer:
    """A server on the shared store with a Kubernetes API client of its own (named, so it can be cut off)."""
    store = {"type": "kubernetes", "kubernetes": {"namespace": namespace, "apiServer": kube_api.url}}
    config = parse_config(base_config(tmp, store=store, **overrides))
    server = CaServer(config, clock=clock, rotation_thread=False, kube_api_client=kube_api.api_client(name))
    server.start()
    server.start_background()
    return server


def tick(server: CaServer) -> bool:
    """One rotation-loop pass, with a failure treated as the loop treats it (logged, retried at the next)."""
    try:
        server.tick()
    except KeysealError:
        return False
    return True


def ready(server: CaServer) -> int:
    client = Client(server.port, None)
    try:
        status, _, _ = client.request("GET", "/readyz")
        return status
    finally:
        client.close()


def issue(server: CaServer) -> tuple[int, Any]:
    client = Client(server.port, None, token=TOKENS["admin"])
    try:
        return client.x509_svid(A)
    finally:
        client.close()


def view_age_metric(server: CaServer) -> float:
    client = Client(server.port, None)
    try:
        _, text, _ = client.request("GET", "/metrics")
    finally:
        client.close()
    for family in text_string_to_metric_families(text):
        if family.name == "keyseal_store_view_age_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no keyseal_store_view_age_seconds")


@pytest.fixture
def pair(kube_api: KubeApi, namespace: str, tmp_path: Path) -> Iterator[tuple[CaServer, CaServer, FakeClock]]:
    clock = FakeClock(START)
    one = replica(tmp_path, kube_api, namespace, "replica-a", clock)
    two = replica(tmp_path, kube_api, namespace, "replica-b", clock)
    yield one, two, clock
    kube_api.restore("replica-b")
    one.shutdown()
    two.shutdown()


def test_cut_replica_turns_unready_within_the_bound_and_never_signs_with_a_retired_keyset(
        pair: tuple[CaServer, CaServer, FakeClock], kube_api: KubeApi, caplog: pytest.LogCaptureFixture) -> None:
    one, two, clock = pair
    bound = two.max_view_age
    assert bound is not None and bound <= two.config.refresh_hint + timedelta(seconds=15)
    assert ready(one) == ready(two) == 200

    # Cut replica B off ten seconds before keyset 2 is prepared (the issue's partition: ttl/2 - 10 s).
    clock.set(START + 12 * HOUR - timedelta(seconds=10))
    assert tick(one) and tick(two)
    last_read = clock()
    kube_api.cut("replica-b")
    with caplog.at_level(logging.INFO, logger="keyseal._internal.ca"):
        clock.set(START + 12 * HOUR)
        assert tick(one)
        assert [k.number for k in one.manager.loaded()] == [1, 2]  # A prepared keyset 2 ...
        # ... B cannot read it. It stays ready while its view is within the bound, and not a moment longer.
        while clock() - last_read <= bound:
            assert not tick(two)
            assert ready(two) == 200, clock() - last_read
            clock.advance(timedelta(seconds=5))
        assert not tick(two)
        assert ready(two) == 503
        assert ready(one) == 200
        assert "the keyset store was last read" in caplog.text
        assert view_age_metric(two) > bound.total_seconds()
        assert view_age_metric(one) <= bound.total_seconds()
        assert [k.number for k in two.manager.loaded()] == [1]  # its bundle lacks keyset 2

        # While cut, B signs with keyset 1 as long as the schedule keeps it active (until 20h) ...
        signed: list[tuple[Any, int]] = []
        for moment in (16 * HOUR, 19 * HOUR + 59 * MINUTE, 20 * HOUR, 20 * HOUR + 11 * timedelta(seconds=1),
                       22 * HOUR):
            clock.set(START + moment)
            tick(one)
            tick(two)
            status, body = issue(two)
            active = one.manager.active_keyset()
            assert active is not None
            signed.append((moment, status))
            if status == 200:  # ... and never with a keyset A (which reads the store) no longer signs with
                assert body["keyset"] == active.number, (moment, body["keyset"], active.number)
            else:
                assert status == 503
            assert ready(two) == 503
        assert [s for _, s in signed] == [200, 200, 503, 503, 503]

        # Reconnected, B reads keyset 2 at its next tick: ready, signing with keyset 2, the same bundle as A.
        kube_api.restore("replica-b")
        assert tick(two)
        assert "the keyset store is read again" in caplog.text
    assert ready(two) == 200
    status, body = issue(two)
    assert status == 200 and body["keyset"] == 2
    bundle_one = Client(one.port, None).bundle()
    bundle_two = Client(two.port, None).bundle()
    assert bundle_one == bundle_two


def configmap(kube_api: KubeApi, namespace: str) -> tuple[Any, str]:
    core = kubernetes.client.CoreV1Api(kube_api.api_client())
    return core, "trust-keyseal-agent-bundle"


def configmap_writes(kube_api: KubeApi, namespace: str, name: str) -> list[dict[str, Any]]:
    return [h for h in kube_api.history(namespace, name, plural="configmaps", group="")
            if (h.get("data") or {}).get(BUNDLE_KEY)]


def test_config_skew_does_not_flap_the_agents_bundle_configmap(
        kube_api: KubeApi, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas A (refreshHint 5m) and B (4m) during a rollout publish bundles with different bytes. Each
    publishes at every tick (the re-check interval made zero, as if a minute passed between ticks): the
    ConfigMap moves only to a strictly newer sequence, so it is written once per keyset change, not at every
    tick by whichever replica came last."""
    core, name = configmap(kube_api, namespace)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": name}})  # the chart creates it
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    monkeypatch.setenv(ENVIRONMENT, name)
    monkeypatch.setattr(bundle_configmap, "RECHECK_SECONDS", 0.0)
    clock = FakeClock(START)
    one = replica(tmp_path, kube_api, namespace, "skew-a", clock, bundle={"refreshHint": "5m"})
    two = replica(tmp_path, kube_api, namespace, "skew-b", clock, bundle={"refreshHint": "4m"})
    try:
        keyset_lists = set()
        for step in range(10):
            clock.set(START + step * 3 * HOUR)  # 10 steps over 27 h: keysets 2 and 3 prepared, 1 expired
            for _ in range(3):
                assert tick(one) and tick(two)
                keyset_lists.add(tuple(k.number for k, _ in one.manager.live()))
        written = [json.loads(h["data"][BUNDLE_KEY])["spiffe_sequence"]
                   for h in configmap_writes(kube_api, namespace, name)]
        # Every write strictly newer than the one before (never a write at an equal sequence) ...
        assert all(a < b for a, b in itertools.pairwise(written)), written
        # ... so at most one write per bundle each replica made, not one per tick: bounded however long it runs.
        assert len(written) <= 2 * len(keyset_lists), (written, keyset_lists)
    finally:
        one.shutdown()
        two.shutdown()


def test_config_skew_changes_the_sequence_whenever_the_bytes_differ(
        kube_api: KubeApi, namespace: str, tmp_path: Path) -> None:
    clock = FakeClock(START)
    one = replica(tmp_path, kube_api, namespace, "seq-a", clock, bundle={"refreshHint": "5m"})
    two = replica(tmp_path, kube_api, namespace, "seq-b", clock, bundle={"refreshHint": "4m"})
    try:
        for step in range(4):
            clock.set(START + step * 6 * HOUR)
            assert tick(one) and tick(two)
            first, second = Client(one.port, None).bundle(), Client(two.port, None).bundle()
            if first != second:
                assert first["spiffe_sequence"] != second["spiffe_sequence"], (step, first["spiffe_sequence"])
    finally:
        one.shutdown()
        two.shutdown()


def served_certificate(server: CaServer) -> x509.Certificate:
    """The certificate the API listener presents now (read, not verified: its validity is checked against the
    injected clock, the clock the server issued it by)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_cut_replica_keeps_renewing_its_serving_certificate(
        pair: tuple[CaServer, CaServer, FakeClock], kube_api: KubeApi) -> None:
    """A replica that cannot read the store still signs with its active keyset for hours; its self-issued
    serving certificate (x509SVID.ttl) must be renewed meanwhile, or every client fails TLS long before."""
    _, two, clock = pair
    ttl = two.config.x509_ttl
    clock.set(START + HOUR)
    assert tick(two)
    kube_api.cut("replica-b")
    end = clock() + 3 * ttl
    while clock() < end:
        clock.advance(5 * MINUTE)
        assert not tick(two)  # the refresh still fails (and is reported) ...
        assert two.manager.active_keyset(clock()) is not None
        certificate = served_certificate(two)  # ... but the serving certificate covers the present
        assert certificate.not_valid_before_utc <= clock() < certificate.not_valid_after_utc, clock()
    assert issue(two)[0] == 200
