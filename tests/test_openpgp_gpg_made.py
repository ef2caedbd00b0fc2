"""Keys and signatures made by gpg itself are accepted by `keyseal verify`, and rejected when tampered with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Gpg, run_keyseal
from tests.openpgp_checks import flip_byte

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def gpg_key(gpg: Gpg, email: str, algo: str) -> str:
    made = gpg.run("--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key",
                   f"Upstream <{email}>", algo, "sign", "never")
    assert made.returncode == 0, made.stderr.decode()
    listing = gpg.run("--with-colons", "--list-keys", email).stdout.decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def export(gpg: Gpg, who: str, out: Path) -> Path:
    result = gpg.run("--armor", "--export", who)
    assert result.returncode == 0 and result.stdout
    out.write_bytes(result.stdout)
    return out


def gpg_sign(gpg: Gpg, who: str, data: Path, *extra: str) -> Path:
    result = gpg.run("--passphrase", "", "--pinentry-mode", "loopback", "--armor", "--detach-sign",
                     "--local-user", who, *extra, data)
    assert result.returncode == 0, result.stderr.decode()
    return data.with_name(data.name + ".asc")


@pytest.mark.parametrize("algo", ["rsa3072", "ed25519", "nistp256", "nistp384"])
def test_gpg_made_signatures_verify(algo: str, gpg: Gpg, tmp_path: Path) -> None:
    fingerprint = gpg_key(gpg, "upstream@example.org", algo)
    cert = export(gpg, fingerprint, tmp_path / "upstream.asc")
    data = tmp_path / "tool-1.0.tar.gz"
    data.write_bytes(b"upstream release\n" * 512)
    sig = gpg_sign(gpg, fingerprint, data)

    good = run_keyseal("verify", "--cert", cert, data, sig)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == fingerprint

    tampered = flip_byte(data, 7, tmp_path / "tampered.tar.gz")
    bad = run_keyseal("verify", "--cert", cert, tampered, sig)
    assert bad.returncode == 1
    assert "BAD signature" in bad.stderr

    sig_bytes = bytearray(run_keyseal_dearmor(sig))
    sig_bytes[-5] ^= 0x40
    broken = tmp_path / "broken.sig"
    broken.write_bytes(bytes(sig_bytes))
    assert run_keyseal("verify", "--cert", cert, data, broken).returncode == 1


def run_keyseal_dearmor(path: Path) -> bytes:
    from keyseal._internal.openpgp.armor import dearmor_or_binary

    return dearmor_or_binary(path.read_bytes())


def test_signing_subkey_made_by_gpg_verifies(gpg: Gpg, tmp_path: Path) -> None:
    primary = gpg_key(gpg, "sub@example.org", "ed25519")
    added = gpg.run("--passphrase", "", "--pinentry-mode", "loopback", "--quick-add-key", primary, "rsa2048",
                    "sign", "never")
    assert added.returncode == 0, added.stderr.decode()
    listing = gpg.run("--with-colons", "--list-keys", primary).stdout.decode().splitlines()
    subkey = [line.split(":")[9] for line in listing if line.startswith("fpr:")][1]
    cert = export(gpg, primary, tmp_path / "sub.asc")
    data = tmp_path / "data"
    data.write_bytes(b"signed by a subkey")
    sig = gpg_sign(gpg, subkey + "!", data)
    result = run_keyseal("verify", "--cert", cert, data, sig)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == primary


def test_sha1_signature_is_rejected(gpg: Gpg, tmp_path: Path) -> None:
    fingerprint = gpg_key(gpg, "sha1@example.org", "rsa2048")
    cert = export(gpg, fingerprint, tmp_path / "c.asc")
    data = tmp_path / "data"
    data.write_bytes(b"weak")
    sig = gpg_sign(gpg, fingerprint, data, "--digest-algo", "SHA1")
    assert gpg.run("--verify", sig, data).returncode == 0  # gpg itself still accepts it
    result = run_keyseal("verify", "--cert", cert, data, sig)
    assert result.returncode == 1
    assert "SHA-1" in result.stderr


def test_rsa_1024_key_is_rejected(gpg: Gpg, tmp_path: Path) -> None:
    fingerprint = gpg_key(gpg, "small@example.org", "rsa1024")
    cert = export(gpg, fingerprint, tmp_path / "c.asc")
    data = tmp_path / "data"
    data.write_bytes(b"small key")
    sig = gpg_sign(gpg, fingerprint, data)
    assert gpg.run("--verify", sig, data).returncode == 0
    result = run_keyseal("verify", "--cert", cert, data, sig)
    assert result.returncode == 1
    assert "2048" in result.stderr


def test_signature_from_another_key_is_rejected(gpg: Gpg, tmp_path: Path) -> None:
    trusted = gpg_key(gpg, "trusted@example.org", "ed25519")
    other = gpg_key(gpg, "other@example.org", "ed25519")
    cert = export(gpg, trusted, tmp_path / "trusted.asc")
    data = tmp_path / "data"
    data.write_bytes(b"payload")
    sig = gpg_sign(gpg, other, data)
    result = run_keyseal("verify", "--cert", cert, data, sig)
    assert result.returncode == 1
    assert "no given certificate has the signing key" in result.stderr
