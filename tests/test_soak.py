"""The soak (benchmarks/soak.py) in short: the real server under concurrent issuance, in KMS custody with kms:Sign
faults injected within the retry bound, across CA rotations. No request may fail, memory and open files stay
within the stated bounds, and no rotation is lost."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.soak]

ROOT = Path(__file__).resolve().parent.parent


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("keyseal_soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_short_soak(tmp_path: Path) -> None:
    soak = load_soak()
    options = soak.SoakOptions(duration=36.0, clients=3, ca_ttl=24, fault_every=5)
    report = soak.run_soak(options, tmp_path, say=lambda line: None)
    print(report.render())
    assert report.failure_count == 0, report.failures
    assert sum(report.requests.values()) >= 100 and min(report.requests.values()) > 0
    assert report.faults_injected > 0 and report.sign_calls > report.faults_injected
    # Rotations: keysets 1..n all published, activated one after another, at least keyset 2 active.
    assert report.keysets_seen == list(range(1, max(report.keysets_seen) + 1))
    assert report.active_sequence[:2] == [1, 2] and report.rotations >= 1
    assert not report.bad_polls and report.server_errors.get("rotation") == 0
    assert set(report.issued_by) >= {1, 2}
    assert len(report.rss_kib) >= 30 and len(report.fds) >= 30
    assert report.violations == [], report.render()
