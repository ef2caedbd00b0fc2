"""Three replicas on one Kubernetes store through a keyset preparation: one of them is killed with SIGKILL at
each step of it (before its first write, between the X.509 and the JWT record, after both), the other two then
refresh at once. The store stays consistent (exactly one keyset 2, both records at its version, both replicas
with the same keysets and bundle). "a writer stopped half way" is logged only when a writer really did stop
between its two writes, never in an undisturbed rotation where a reader merely looked between them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyseal._internal.ca.bundle import bundle_json
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.wrapped import WrappedKeysetSource
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.store.kubernetes import KubernetesStore
from keyseal._internal.wrapping.local import LocalKek
from tests.harness.ca import START, TRUST_DOMAIN, FakeClock
from tests.harness.kube_api import KubeApi
from tests.harness.replicas import run_at_once

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

HOUR = timedelta(hours=1)
PREFIX = f"keyseal-{TRUST_DOMAIN}"
HALF_WAY = "a writer stopped half way"
ROOT = Path(__file__).resolve().parent.parent

# A replica in a process of its own that prepares keyset 2 and kills itself (SIGKILL: no cleanup, no finally)
# at the step named by argv[5].
CHILD = """
import os, signal, sys
from datetime import datetime
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.wrapped import WrappedKeysetSource
from keyseal._internal.store.kubernetes import KubernetesStore
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.wrapping.local import LocalKek
from tests.harness.kube_api import KubeApi

url, namespace, kek_file, now, step = sys.argv[1:6]

class Killed(KubernetesStore):
    def _write(self, name, record, expected_revision):
        kind = name.rsplit("-", 2)[-2]
        if step == "before-" + kind:
            os.kill(os.getpid(), signal.SIGKILL)
        revision = super()._write(name, record, expected_revision)
        if step == "after-" + kind:
            os.kill(os.getpid(), signal.SIGKILL)
        return revision

api = KubeApi()
api.url = url
store = Killed(namespace, api.api_client(), ledger=VersionLedger())
source = WrappedKeysetSource(store, LocalKek(__import__("pathlib").Path(kek_file)), "keyseal-example.org",
                             "p256", "p256")
moment = datetime.fromisoformat(now)
manager = KeysetManager(source, "example.org", __import__("datetime").timedelta(hours=24),
                        __import__("datetime").timedelta(minutes=5), lambda: moment)
manager.refresh()
print("not killed")
"""


class SlowSecondWrite(KubernetesStore):
    """The real store; the JWT record of a new keyset is written `delay` seconds after the X.509 record, and
    `x509_written` is set in between (so other replicas read exactly then)."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.x509_written = threading.Event()

    def _write(self, name: str, record: Any, expected_revision: str | None) -> str:
        if "-jwt-" in name and self.delay:
            time.sleep(self.delay)
        revision = super()._write(name, record, expected_revision)
        if "-x509-" in name:
            self.x509_written.set()
        return revision


def manager(kube_api: KubeApi, namespace: str, kek: LocalKek, clock: FakeClock,
            delay: float = 0.0) -> tuple[KeysetManager, SlowSecondWrite]:
    store = SlowSecondWrite(namespace, kube_api.api_client(), ledger=VersionLedger(), delay=delay)
    source = WrappedKeysetSource(store, kek, PREFIX, "p256", "p256")
    return KeysetManager(source, TRUST_DOMAIN, 24 * HOUR, timedelta(minutes=5), clock), store


def versions(kube_api: KubeApi, namespace: str, kind: str) -> list[int]:
    return [h["spec"]["version"] for h in kube_api.history(namespace, f"{PREFIX}-{kind}-1")]


@pytest.mark.parametrize("step", ["before-x509", "after-x509", "before-jwt", "after-jwt"])
def test_kill_9_at_each_step_of_a_preparation_leaves_the_store_consistent(
        kube_api: KubeApi, namespace: str, tmp_path: Path, step: str, caplog: pytest.LogCaptureFixture) -> None:
    kek = LocalKek(tmp_path / "kek")
    clock = FakeClock(START)
    one, _ = manager(kube_api, namespace, kek, clock)
    two, _ = manager(kube_api, namespace, kek, clock)
    one.start()
    two.start()
    half = START + 12 * HOUR
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", CHILD, kube_api.url, namespace, str(tmp_path / "kek"),
                            half.isoformat(), step], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env=env, check=False)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr[-2000:])
    # Keyset 2 lives in slot 1, at record version 1: what the killed writer left there.
    assert versions(kube_api, namespace, "x509") == ([] if step == "before-x509" else [1])
    assert versions(kube_api, namespace, "jwt") == ([1] if step == "after-jwt" else [])
    clock.set(half)
    with caplog.at_level(logging.WARNING, logger="keyseal._internal.ca"):
        run_at_once(one.refresh, two.refresh)
    assert versions(kube_api, namespace, "x509") == [1]  # exactly one keyset 2, written once
    assert versions(kube_api, namespace, "jwt") == [1]
    assert [k.number for k in one.loaded()] == [k.number for k in two.loaded()] == [1, 2]
    live = timedelta(minutes=5)
    assert bundle_json(list(one.loaded()), live) == bundle_json(list(two.loaded()), live)
    half_way = [r for r in caplog.records if HALF_WAY in r.getMessage()]
    if step in ("after-x509", "before-jwt"):  # a real leftover: completed, and said so
        assert half_way
    else:
        assert not half_way, [r.getMessage() for r in half_way]


def test_undisturbed_rotation_logs_no_false_half_way_warning(kube_api: KubeApi, namespace: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The winner writes its JWT record 0.5 s after its X.509 record; two other replicas read in between."""
    kek = LocalKek(tmp_path / "kek")
    clock = FakeClock(START)
    winner, store = manager(kube_api, namespace, kek, clock, delay=0.5)
    readers = [manager(kube_api, namespace, kek, clock)[0] for _ in range(2)]
    winner.start()
    for reader in readers:
        reader.start()
    clock.set(START + 12 * HOUR)

    def read_between(reader: KeysetManager) -> None:
        assert store.x509_written.wait(30)
        reader.refresh()

    with caplog.at_level(logging.INFO, logger="keyseal._internal.ca"):
        run_at_once(winner.refresh, *(lambda r=r: read_between(r) for r in readers))
    assert not [r for r in caplog.records if HALF_WAY in r.getMessage()], caplog.text
    assert versions(kube_api, namespace, "jwt") == [1]  # written once, by the winner
    assert [k.number for k in winner.loaded()] == [k.number for k in readers[0].loaded()] == \
        [k.number for k in readers[1].loaded()] == [1, 2]
