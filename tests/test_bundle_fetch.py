"""`keyseal bundle fetch`: a node's first trust bundle, kept only if the served CA has the fingerprint the server
printed at start-up. The fingerprint is checked against `openssl x509 -fingerprint -sha256` (an independent
tool), and the server is the real `keyseal server` process."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from keyseal._internal.spiffe.bootstrap import parse_fingerprint
from tests.conftest import run_keyseal
from tests.harness.agent import start_server
from tests.harness.ca import base_config
from tests.test_dev import fields as fields_of

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

KEYSEAL = str(Path(sys.executable).with_name("keyseal"))


def openssl_fingerprint(pem: str) -> str:
    result = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=pem,
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip().split("=", 1)[1]  # AB:CD:... as openssl prints it


def test_fetch_with_the_fingerprint_printed_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(base_config(tmp_path)))
    process = subprocess.Popen([KEYSEAL, "server", "--config", str(tmp_path / "server.yaml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        match = None
        while match is None:
            assert time.monotonic() < deadline and process.poll() is None, "".join(seen)
            seen.append(process.stderr.readline())
            match = re.search(r"trust bundle CA sha256 ([0-9a-f]{64}).*--server https://HOST:(\d+)", seen[-1])
        fingerprint, port = match.group(1), match.group(2)
        result = run_keyseal("bundle", "fetch", "--server", f"https://127.0.0.1:{port}", "--sha256", fingerprint,
                             "-o", tmp_path / "bundle.pem")
        assert result.returncode == 0, result.stderr
        assert f"sha256 {fingerprint}" in fields_of(result.stdout)["pinned CA"]
        assert "the whole bundle" in result.stdout
        pem = (tmp_path / "bundle.pem").read_text()
        assert parse_fingerprint(openssl_fingerprint(pem)) == fingerprint
        # openssl's own spelling (colons, upper case) is accepted as the pin too.
        again = run_keyseal("bundle", "fetch", "--server", f"https://127.0.0.1:{port}", "--sha256",
                            openssl_fingerprint(pem), "-o", tmp_path / "bundle.pem", "--force", "--json")
        assert again.returncode == 0, again.stderr
        assert '"wholeBundle": true' in again.stdout
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.parametrize("pin", ["0" * 64, "sha256:" + "ab" * 32])
def test_fetch_refuses_a_ca_whose_fingerprint_differs(tmp_path: Path, pin: str) -> None:
    server = start_server(tmp_path)
    try:
        result = run_keyseal("bundle", "fetch", "--server", f"https://127.0.0.1:{server.port}", "--sha256", pin,
                             "-o", tmp_path / "bundle.pem")
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert result.stderr.startswith("keyseal: error: no CA served by https://127.0.0.1:")
    assert "nothing written" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "bundle.pem").exists()


def test_fetch_keeps_only_the_pinned_ca_when_tls_is_not_from_it(tmp_path: Path) -> None:
    """A serving certificate from files (not from the trust domain's CA) cannot prove the rest of the bundle
    came from the server that holds the pinned CA: only the pinned CA is written."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now - timedelta(minutes=1))
                   .not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .sign(key, hashes.SHA256()))
    (tmp_path / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = start_server(tmp_path, server={"listen": "127.0.0.1:0", "tls": {
        "certFile": str(tmp_path / "tls.crt"), "keyFile": str(tmp_path / "tls.key")}})
    try:
        from keyseal._internal.spiffe.bootstrap import fetch_bundle

        fetched = fetch_bundle(f"https://127.0.0.1:{server.port}", server.bundle_fingerprint())
    finally:
        server.shutdown()
    assert not fetched.whole_bundle
    assert fetched.certificates == (fetched.pinned,)


@pytest.mark.parametrize(("args", "needle"), [
    (["--server", "http://127.0.0.1:1", "--sha256", "0" * 64], "must be https://HOST:PORT"),
    (["--server", "https://127.0.0.1:1", "--sha256", "abc"], "is not a SHA-256 fingerprint"),
    (["--server", "https://127.0.0.1:1", "--sha256", "0" * 64], "cannot fetch the trust bundle from"),
])
def test_fetch_usage_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run_keyseal("bundle", "fetch", *args, "-o", tmp_path / "bundle.pem")
    assert result.returncode != 0 and needle in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
