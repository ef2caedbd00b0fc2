"""Trust sets and the cross-check: embedded keys against the keys a real HTTPS WKD on 127.0.0.1 serves.

Embedded == WKD passes; any difference aborts whatever the policy; an unreachable WKD aborts fail-closed and
warns fail-open. The README's updater example is run as written, with only its key and WKD route filled in.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyseal._internal.backends.file import FileSigner
from keyseal._internal.openpgp.cert import armor_certificate, load_certificates, mint_certificate
from keyseal._internal.openpgp.trust import Combined, CrossCheck, TrustSet, WkdResolver, verify_release
from keyseal._internal.openpgp.wkd import build_tree, connect_map, wkd_hash
from keyseal.errors import TrustError, VerificationError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.harness.https_server import HttpsServer, Override, TlsFiles, free_port, make_tls
from tests.harness.release_keys import ReleaseKey, make_key, sign_file

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

HOSTS = ["openpgpkey.example.org", "example.org"]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ReleaseKey]:
    directory = tmp_path_factory.mktemp("trust-keys")
    return {
        "v1": make_key(directory, "v1", "p256"),
        "v2": make_key(directory, "v2", "ed25519", email="releases-v2@example.org"),
        "attacker": make_key(directory, "attacker", "ed25519"),
    }


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"), HOSTS)


@pytest.fixture
def wkd(tmp_path: Path, tls: TlsFiles) -> Iterator[HttpsServer]:
    root = tmp_path / "site"
    root.mkdir()
    server = HttpsServer(root, tls).start()
    yield server
    server.stop()


@pytest.fixture
def release(tmp_path: Path, keys: dict[str, ReleaseKey]) -> Path:
    """A release directory: an artifact, SHA256SUMS signed by v1 and v2 (dual-signed)."""
    directory = tmp_path / "download"
    directory.mkdir()
    (directory / "tool-2.0.tar.gz").write_bytes(b"the update\n" * 100)
    assert run_keyseal("checksums", directory / "tool-2.0.tar.gz", "-o", directory / "SHA256SUMS").returncode == 0
    sign_file(keys["v1"], directory / "SHA256SUMS")
    appended = run_keyseal("sign", "--key", keys["v2"].uri, "--cert", keys["v2"].cert, "--append",
                           directory / "SHA256SUMS")
    assert appended.returncode == 0, appended.stderr
    return directory


def publish(server: HttpsServer, *keys: ReleaseKey) -> None:
    certs = [cert for key in keys for cert in load_certificates(key.cert.read_bytes())]
    build_tree(certs, "example.org", server.root)


def resolver(server: HttpsServer, tls: TlsFiles, email: str = "releases@example.org", **extra: Any) -> WkdResolver:
    return WkdResolver(email, tls.ca_pem, tuple(connect_map(server.connect_to(*HOSTS)).items()), **extra)


def embedded(*keys: ReleaseKey) -> TrustSet:
    return TrustSet.from_armored(*(key.cert.read_text() for key in keys))


def verify(release: Path, trust: Any) -> Any:
    return verify_release(release / "SHA256SUMS", release / "SHA256SUMS.asc", [release / "tool-2.0.tar.gz"], trust)


def test_embedded_equal_to_wkd_passes(wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                      release: Path) -> None:
    publish(wkd, keys["v1"])
    result = verify(release, CrossCheck(embedded(keys["v1"]), resolver(wkd, tls)))
    assert result.fingerprint == keys["v1"].fingerprint
    assert [item.name for item in result.artifacts] == ["tool-2.0.tar.gz"]
    assert wkd.requests  # the WKD really was asked


@pytest.mark.parametrize("policy", ["fail-closed", "fail-open"])
def test_a_different_key_on_wkd_aborts(policy: str, wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                       release: Path) -> None:
    # The attacker controls the web server: their key on the WKD, and the release signed by it.
    publish(wkd, keys["attacker"])
    sign_file(keys["attacker"], release / "SHA256SUMS")
    trust = CrossCheck(embedded(keys["v1"]), resolver(wkd, tls), policy)  # type: ignore[arg-type]
    with pytest.raises(TrustError, match="key mismatch") as caught:
        verify(release, trust)
    assert keys["attacker"].fingerprint in caught.value.message and keys["v1"].fingerprint in caught.value.message


def test_an_extra_key_on_wkd_aborts_too(wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                        release: Path) -> None:
    publish(wkd, keys["v1"], keys["attacker"])
    with pytest.raises(TrustError, match="key mismatch"):
        verify(release, CrossCheck(embedded(keys["v1"]), resolver(wkd, tls), "fail-open"))


def test_wkd_down_aborts_fail_closed_and_warns_fail_open(tls: TlsFiles, keys: dict[str, ReleaseKey],
                                                         release: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    down = WkdResolver("releases@example.org", tls.ca_pem,
                       tuple(connect_map([f"{host}:443:127.0.0.1:{port}" for host in HOSTS]).items()), timeout=2)
    with pytest.raises(TrustError, match=r"cannot cross-check .* \(policy fail-closed\)"):
        verify(release, CrossCheck(embedded(keys["v1"]), down))
    warnings: list[str] = []
    result = verify(release, CrossCheck(embedded(keys["v1"]), down, "fail-open", warn=warnings.append))
    assert result.fingerprint == keys["v1"].fingerprint
    assert len(warnings) == 1 and "cross-check skipped" in warnings[0] and "policy fail-open" in warnings[0]
    with caplog.at_level(logging.WARNING, logger="keyseal.trust"):
        verify(release, CrossCheck(embedded(keys["v1"]), down, "fail-open"))
    assert any("cross-check skipped" in record.message for record in caplog.records)


def test_a_server_error_counts_as_down_but_a_missing_key_does_not(wkd: HttpsServer, tls: TlsFiles,
                                                                  keys: dict[str, ReleaseKey], release: Path) -> None:
    wkd.overrides[f"/.well-known/openpgpkey/example.org/hu/{wkd_hash('releases')}"] = Override(status=503)
    warnings: list[str] = []
    verify(release, CrossCheck(embedded(keys["v1"]), resolver(wkd, tls), "fail-open", warn=warnings.append))
    assert "HTTP 503" in warnings[0]
    wkd.overrides.clear()  # now both methods answer 404: the directory says there is no key
    with pytest.raises(TrustError, match=r"no key for releases@example\.org"):
        verify(release, CrossCheck(embedded(keys["v1"]), resolver(wkd, tls), "fail-open", warn=warnings.append))


def test_rotation_window_old_and_new_clients(wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                             release: Path) -> None:
    """The runbook: releases@ keeps serving exactly v1, releases-v2@ serves v2, releases are dual-signed."""
    publish(wkd, keys["v1"], keys["v2"])
    old_client = CrossCheck(embedded(keys["v1"]), resolver(wkd, tls))
    new_client = Combined(old_client, CrossCheck(embedded(keys["v2"]), resolver(wkd, tls, "releases-v2@example.org")))
    assert verify(release, old_client).fingerprint == keys["v1"].fingerprint
    assert sorted(verify(release, new_client).trust.fingerprints) == sorted([keys["v1"].fingerprint,
                                                                            keys["v2"].fingerprint])
    v2_only = CrossCheck(embedded(keys["v2"]), resolver(wkd, tls, "releases-v2@example.org"))
    assert verify(release, v2_only).fingerprint == keys["v2"].fingerprint
    # Why the new key needs a new address: were v2 added at releases@, every old client would abort.
    both_at_old_address = make_key(release.parent / "k", "v2-at-old-address", "ed25519")
    publish(wkd, keys["v1"], both_at_old_address)
    with pytest.raises(TrustError, match="key mismatch"):
        verify(release, old_client)


def test_trust_set_checks_keys_at_load(tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = tmp_path / "weak.pem"
    pem.write_bytes(weak.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    weak_cert = armor_certificate(mint_certificate(FileSigner(f"file:{pem}", pem), name="Weak",
                                                   email="weak@example.org", created=1_700_000_000))
    with pytest.raises(TrustError, match="RSA-1024; keyseal requires at least 2048 bits"):
        TrustSet.from_armored(weak_cert)
    text = keys["v1"].cert.read_text()
    body = text.splitlines()
    body[3] = body[3][:10] + ("A" if body[3][10] != "A" else "B") + body[3][11:]
    with pytest.raises(TrustError, match="cannot load a certificate"):
        TrustSet.from_armored("\n".join(body))
    for bad in ("not a key", "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n=AAAA\n-----END PGP PUBLIC KEY BLOCK-----",
                "clé"):
        with pytest.raises(TrustError):
            TrustSet.from_armored(bad)
    with pytest.raises(TrustError):
        TrustSet.from_armored()
    assert TrustSet.from_armored(text, text).fingerprints == (keys["v1"].fingerprint,)  # copies merge


def test_verify_release_cli_cross_checks_wkd(wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                             release: Path) -> None:
    publish(wkd, keys["v1"])
    routes = [arg for spec in wkd.connect_to(*HOSTS) for arg in ("--connect-to", spec)]
    args = ["verify-release", "--manifest", release / "SHA256SUMS", "--cert", keys["v1"].cert,
            "--wkd", "releases@example.org", "--ca-bundle", tls.ca_pem, *routes, release / "tool-2.0.tar.gz"]
    good = run_keyseal(*args)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == f"{release / 'tool-2.0.tar.gz'}: OK"

    publish(wkd, keys["attacker"])  # the attacker replaced the key on the web server
    mismatch = run_keyseal(*args)
    assert_one_line_error(mismatch)
    assert mismatch.returncode == 1 and "key mismatch" in mismatch.stderr

    wkd.stop()
    closed = run_keyseal(*args, "--timeout", "2")
    assert_one_line_error(closed)
    assert "policy fail-closed" in closed.stderr
    opened = run_keyseal(*args, "--timeout", "2", "--wkd-policy", "fail-open")
    assert opened.returncode == 0, opened.stderr
    assert re.search(r"^keyseal: warning: cross-check skipped", opened.stderr, re.MULTILINE)


def test_verify_release_cli_keeps_to_its_wkd_timeout(wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                                     release: Path) -> None:
    """A WKD that answers a byte every 0.3 s: fail-closed ends at the timeout with one error line, fail-open
    ends at the timeout with a warning and the embedded key's verdict."""
    wkd.overrides[f"/.well-known/openpgpkey/example.org/hu/{wkd_hash('releases')}"] = Override(
        body=keys["v1"].cert.read_bytes(), trickle="body", interval=0.3)
    routes = [arg for spec in wkd.connect_to(*HOSTS) for arg in ("--connect-to", spec)]
    args = ["verify-release", "--manifest", release / "SHA256SUMS", "--cert", keys["v1"].cert,
            "--wkd", "releases@example.org", "--ca-bundle", tls.ca_pem, *routes, "--timeout", "1.5",
            release / "tool-2.0.tar.gz"]
    for policy in ("fail-closed", "fail-open"):
        started = time.monotonic()
        result = run_keyseal(*args, "--wkd-policy", policy)
        elapsed = time.monotonic() - started
        assert elapsed < 1.5 + 4.0, (policy, elapsed)  # 4 s for the interpreter to start on a loaded machine
        if policy == "fail-closed":
            assert_one_line_error(result)
            assert "timed out after 1.5 s" in result.stderr
        else:
            assert result.returncode == 0, result.stderr
            assert "timed out after 1.5 s" in result.stderr and "warning" in result.stderr


def test_readme_updater_example_runs(wkd: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                     release: Path) -> None:
    text = README.read_text()
    block = text.split("<!-- updater-example")[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in block.splitlines() if line.strip()]) <= 16  # "a dozen lines", give or take
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    # Fill in what a real tool has: its key, and (for this test only) the route to the local WKD server.
    namespace["RELEASE_KEY"] = keys["v1"].cert.read_text()
    namespace["WkdResolver"] = functools.partial(WkdResolver, ca_bundle=tls.ca_pem,
                                                 connect_to=tuple(connect_map(wkd.connect_to(*HOSTS)).items()))
    publish(wkd, keys["v1"])
    assert namespace["verify_update"](release, "tool-2.0.tar.gz") == release / "tool-2.0.tar.gz"
    (release / "tool-2.0.tar.gz").write_bytes(b"tampered")
    with pytest.raises(VerificationError, match="differs"):
        namespace["verify_update"](release, "tool-2.0.tar.gz")


def test_threshold_release_cross_checks_every_key_at_its_own_address(wkd: HttpsServer, tls: TlsFiles,
                                                                     keys: dict[str, ReleaseKey],
                                                                     release: Path) -> None:
    """2 of 2 with keys published under two addresses: `--wkd` once per address, and the union must match."""
    publish(wkd, keys["v1"], keys["v2"])
    routes = [arg for spec in wkd.connect_to(*HOSTS) for arg in ("--connect-to", spec)]

    def verify_with(*addresses: str) -> Any:
        wkd_args = [arg for address in addresses for arg in ("--wkd", address)]
        return run_keyseal("verify-release", "--manifest", release / "SHA256SUMS", "--threshold", "2",
                           "--cert", keys["v1"].cert, "--cert", keys["v2"].cert, *wkd_args,
                           "--ca-bundle", tls.ca_pem, *routes, release / "tool-2.0.tar.gz")

    good = verify_with("releases@example.org", "releases-v2@example.org")
    assert good.returncode == 0, good.stderr
    assert good.stderr.count("Good signature on") == 2

    only_one_address = verify_with("releases@example.org")
    assert_one_line_error(only_one_address)
    assert "key mismatch" in only_one_address.stderr  # v2 is embedded but not published at the address asked

    publish(wkd, keys["v1"], keys["attacker"])  # the directory now serves another key in v2's place
    replaced = verify_with("releases@example.org", "releases-v2@example.org")
    assert_one_line_error(replaced)
    assert replaced.returncode == 1 and "key mismatch" in replaced.stderr, replaced.stderr
