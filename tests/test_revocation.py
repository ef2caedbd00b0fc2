"""Revocation: `keyseal keys revoke` writes a revocation signature the key's custody computes; keyseal, gpg and
sqv then refuse the key's signatures (all of them when compromised, later ones when superseded), and a
revocation served by the WKD reaches clients that embed the unrevoked certificate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyseal._internal.openpgp.cert import load_certificates
from keyseal._internal.openpgp.trust import CrossCheck, TrustSet, WkdResolver, verify_release
from keyseal._internal.openpgp.wkd import build_tree, connect_map
from keyseal.errors import VerificationError
from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.harness.https_server import HttpsServer, TlsFiles, make_tls
from tests.harness.release_keys import ReleaseKey, make_key, sign_file
from tests.openpgp_checks import gpg_accepts, sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

HOSTS = ["openpgpkey.example.org", "example.org"]


@pytest.fixture
def key(tmp_path: Path) -> ReleaseKey:
    return make_key(tmp_path / "keys", "release", "p256")


def revoke(key: ReleaseKey, reason: str, out: Path, *extra: str) -> Path:
    result = run_keyseal("keys", "revoke", "--key", key.uri, "--cert", key.cert, "--reason", reason, "-o", out,
                         *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{key.fingerprint} revoked ({reason})"
    return out


def test_compromised_key_is_rejected_by_keyseal_gpg_and_sqv(tmp_path: Path, key: ReleaseKey, gpg: Gpg) -> None:
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(b"signed before the compromise was found")
    sig = sign_file(key, data, created=int(time.time()) - 3600)
    assert gpg_accepts(gpg, key.cert, data, sig)  # before: accepted everywhere
    assert run_keyseal("verify", "--cert", key.cert, data).returncode == 0

    revoked = revoke(key, "compromised", tmp_path / "revoked.asc", "--description", "laptop stolen")
    cert = load_certificates(revoked.read_bytes())[0]
    assert cert.revoked and cert.fingerprint == key.fingerprint

    result = run_keyseal("verify", "--cert", revoked, data)
    assert_one_line_error(result)
    assert result.returncode == 1 and "is revoked (compromised" in result.stderr
    # Giving the old copy as well does not help: copies of one certificate are merged.
    both = run_keyseal("verify", "--cert", key.cert, "--cert", revoked, data)
    assert both.returncode == 1 and "revoked" in both.stderr

    imported = gpg.run("--import", revoked)
    assert imported.returncode == 0, imported.stderr
    status = gpg.run("--verify", sig, data).stderr.decode()
    assert "[GNUPG:] REVKEYSIG" in status and "[GNUPG:] GOODSIG" not in status, status
    assert "[GNUPG:] KEYREVOKED" in status
    assert not sqv_accepts(revoked, data, sig)


def test_superseded_key_keeps_earlier_signatures(tmp_path: Path, key: ReleaseKey) -> None:
    earlier = tmp_path / "tool-1.0.tar.gz"
    earlier.write_bytes(b"released last year")
    sign_file(key, earlier, created=int(time.time()) - 86400)
    revoked = revoke(key, "superseded", tmp_path / "retired.asc")
    assert run_keyseal("verify", "--cert", revoked, earlier).returncode == 0

    later = tmp_path / "tool-2.0.tar.gz"
    later.write_bytes(b"signed after the revocation")
    assert run_keyseal("sign", "--key", key.uri, "--cert", key.cert, later).returncode == 0
    result = run_keyseal("verify", "--cert", revoked, later)
    assert_one_line_error(result)
    assert "revoked (superseded or retired) since" in result.stderr


@pytest.mark.parametrize(("reason", "message"), [("compromised", "is revoked (compromised"),
                                               ("superseded", "revoked (superseded or retired) since")])
def test_sign_refuses_a_revoked_certificate(reason: str, message: str, tmp_path: Path, key: ReleaseKey) -> None:
    """`keyseal sign` used to sign with a revoked certificate and `keyseal verify` then refused the result."""
    revoked = revoke(key, reason, tmp_path / "revoked.asc")
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", key.uri, "--cert", revoked, data)
    assert_one_line_error(result)
    assert "refusing to sign" in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "tool.tar.gz.asc").exists()
    # The stale copy given beside the revoked one does not help: copies of one certificate are merged.
    both = run_keyseal("sign", "--key", key.uri, "--cert", key.cert, "--cert", revoked, data)
    assert_one_line_error(both)
    assert message in both.stderr


def test_revoke_refuses_another_key_and_keeps_outputs(tmp_path: Path, key: ReleaseKey) -> None:
    other = make_key(tmp_path / "keys", "other")
    out = tmp_path / "revoked.asc"
    wrong = run_keyseal("keys", "revoke", "--key", other.uri, "--cert", key.cert, "--reason", "retired", "-o", out)
    assert_one_line_error(wrong)
    assert "only the primary key can revoke it" in wrong.stderr and not out.exists()
    out.write_text("keep")
    exists = run_keyseal("keys", "revoke", "--key", key.uri, "--cert", key.cert, "--reason", "retired", "-o", out)
    assert_one_line_error(exists)
    assert out.read_text() == "keep"
    bad_reason = run_keyseal("keys", "revoke", "--key", key.uri, "--cert", key.cert, "--reason", "bored")
    assert_one_line_error(bad_reason)
    printed = run_keyseal("keys", "revoke", "--key", key.uri, "--cert", key.cert, "--reason", "retired")
    assert printed.returncode == 0 and load_certificates(printed.stdout.encode())[0].revoked


def test_kms_key_revocation_is_computed_by_kms(tmp_path: Path, aws_env: dict[str, str], gpg: Gpg) -> None:
    alias = f"alias/revoke-{uuid.uuid4().hex[:8]}"
    assert run_keyseal("keys", "create", "--kms", "--alias", alias, "--type", "p256").returncode == 0
    cert = tmp_path / "kms.asc"
    assert run_keyseal("keys", "mint", "--key", f"awskms:{alias}", "--name", "KMS", "--email", "kms@example.org",
                       "-o", cert).returncode == 0
    data = tmp_path / "f"
    data.write_bytes(b"x")
    assert run_keyseal("sign", "--key", f"awskms:{alias}", "--cert", cert, data).returncode == 0
    revoked = tmp_path / "revoked.asc"
    result = run_keyseal("keys", "revoke", "--key", f"awskms:{alias}", "--cert", cert, "--reason", "compromised",
                         "-o", revoked)
    assert result.returncode == 0, result.stderr
    assert run_keyseal("verify", "--cert", revoked, data).returncode == 1
    assert gpg.run("--import", cert).returncode == 0
    assert not gpg_accepts(gpg, revoked, data, tmp_path / "f.asc")


@pytest.fixture
def wkd(tmp_path: Path) -> Iterator[tuple[HttpsServer, TlsFiles]]:
    tls = make_tls(tmp_path / "tls", HOSTS)
    (tmp_path / "site").mkdir()
    server = HttpsServer(tmp_path / "site", tls).start()
    yield server, tls
    server.stop()


def test_a_revocation_on_the_wkd_reaches_clients_with_the_old_copy(tmp_path: Path, key: ReleaseKey,
                                                                   wkd: tuple[HttpsServer, TlsFiles]) -> None:
    server, tls = wkd
    release = tmp_path / "release"
    release.mkdir()
    (release / "tool.tar.gz").write_bytes(b"signed by a key that is now known to be stolen")
    assert run_keyseal("checksums", release / "tool.tar.gz", "-o", release / "SHA256SUMS").returncode == 0
    sign_file(key, release / "SHA256SUMS")
    revoked = revoke(key, "compromised", tmp_path / "revoked.asc")
    build_tree(load_certificates(revoked.read_bytes()), "example.org", server.root)

    client = CrossCheck(TrustSet.from_armored(key.cert.read_text()),  # the tool still embeds the old copy
                        WkdResolver("releases@example.org", tls.ca_pem,
                                    tuple(connect_map(server.connect_to(*HOSTS)).items())))
    with pytest.raises(VerificationError, match="is revoked"):
        verify_release(release / "SHA256SUMS", release / "SHA256SUMS.asc", [release / "tool.tar.gz"], client)
    # Without the WKD copy the same client would have accepted it.
    verify_release(release / "SHA256SUMS", release / "SHA256SUMS.asc", [release / "tool.tar.gz"],
                   TrustSet.from_armored(key.cert.read_text()))
