"""Group commit: threads that sign at once share an fsync, and a signature is still handed out only once its
line is durable, even when the process is killed (SIGKILL) at any moment."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal import audit
from keyseal._internal.audit import verify_log
from keyseal._internal.audit.checkpoint import load_keys
from keyseal._internal.backends import open_signer

THREADS = 4


def file_key(tmp_path: Path) -> tuple[str, Path]:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "k.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = tmp_path / "k.pub.pem"
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"file:{pem}", public


@pytest.mark.slow
def test_concurrent_signers_share_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = file_key(tmp_path)
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(log))
    real_sync, calls = os.fdatasync, []

    def counting_sync(fd: int) -> None:
        calls.append(fd)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_sync)
    per_thread = 100
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")  # opened and checked before the threads start
        calls.clear()
        barrier = threading.Barrier(THREADS)

        def work(number: int) -> None:
            barrier.wait()
            for index in range(per_thread):
                with audit.subject(f"{number}-{index}"):
                    signer.sign_digest(hashlib.sha256(f"{number}-{index}".encode()).digest(), "sha256")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    signatures = THREADS * per_thread
    assert verify_log(log).lines == signatures + 1
    assert len(calls) < signatures * 0.9, f"{len(calls)} fsyncs for {signatures} signatures"


def test_one_signer_pays_one_fsync_per_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = file_key(tmp_path)
    monkeypatch.setenv("KEYSEAL_AUDIT_LOG", str(tmp_path / "audit.log"))
    real_sync, calls = os.fdatasync, []
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real_sync(fd))[1])
    with open_signer(uri) as signer:
        signer.sign_digest(bytes(32), "sha256")
        calls.clear()
        for index in range(20):
            signer.sign_digest(hashlib.sha256(str(index).encode()).digest(), "sha256")
    assert len(calls) == 20


_SIGNER = """
import hashlib, os, sys, threading
from pathlib import Path
from keyseal._internal import audit
from keyseal._internal.backends import open_signer

out, uri, run = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
signer = open_signer(uri)
signer.sign_digest(bytes(32), "sha256")
print("ready", flush=True)

def work(number):
    index = 0
    while True:
        name = f"{run}-{number}-{index}"
        with audit.subject(name):
            signature = signer.sign_digest(hashlib.sha256(name.encode()).digest(), "sha256")
        temporary = out / (name + ".tmp")
        temporary.write_bytes(signature)
        os.rename(temporary, out / (name + ".sig"))
        index += 1
        if len(sys.argv) > 4 and index == int(sys.argv[4]):
            return

threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


@pytest.mark.slow
def test_sigkill_never_leaves_a_signature_without_its_line(tmp_path: Path) -> None:
    uri, public = file_key(tmp_path)
    log = tmp_path / "audit.log"
    out = tmp_path / "signatures"
    out.mkdir()
    env = dict(os.environ, KEYSEAL_AUDIT_LOG=str(log), KEYSEAL_AUDIT_CHECKPOINT_LINES="50")
    rng = random.Random()
    for run in range(6):
        last = run == 5  # a last run that ends by itself: the next writer after a kill
        proc = subprocess.Popen([sys.executable, "-c", _SIGNER, str(out), uri, f"r{run}", *(["5"] if last else [])],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n", proc.stderr.read() if proc.stderr else b""
            if not last:
                threading.Event().wait(rng.uniform(0.05, 0.5))
                proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == (-signal.SIGKILL if not last else 0), stderr.decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = [json.loads(line) for line in log.read_bytes().splitlines()]
    logged = {r["subject"] for r in records if r.get("outcome") == "ok"}
    signed = {p.name.removesuffix(".sig") for p in out.glob("*.sig")}
    assert len(signed) > 20
    assert signed - logged == set()  # every signature handed out has its line
    report = verify_log(log, keys=load_keys([public]))
    assert report.checkpoints >= 1
