"""Local keys end to end: create, mint, sign with keyseal; verify with gpg, sqv, PGPy and keyseal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.openpgp_checks import flip_byte, gpg_accepts, pgpy_accepts, sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

KEY_TYPES = ["rsa2048", "rsa3072", "rsa4096", "p256", "p384", "p521", "ed25519"]


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


def make_key(keydir: Path, key_type: str) -> tuple[Path, Path]:
    key = keydir / f"{key_type}.pem"
    cert = keydir / f"{key_type}.asc"
    if not cert.exists():
        assert run_keyseal("keys", "create", "--out", key, "--type", key_type).returncode == 0
        minted = run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "Release Signing",
                             "--email", "release@example.org", "-o", cert)
        assert minted.returncode == 0, minted.stderr
    return key, cert


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_sign_and_verify_with_every_verifier(key_type: str, keydir: Path, tmp_path: Path, gpg: Gpg) -> None:
    key, cert = make_key(keydir, key_type)
    data = tmp_path / "release.tar.gz"
    data.write_bytes(b"release payload\n" * 1000)
    signed = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data)
    assert signed.returncode == 0, signed.stderr
    sig = tmp_path / "release.tar.gz.asc"
    assert sig.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----")

    assert gpg_accepts(gpg, cert, data, sig)
    assert sqv_accepts(cert, data, sig)
    assert pgpy_accepts(cert, data, sig)
    verified = run_keyseal("verify", "--cert", cert, data)
    assert verified.returncode == 0, verified.stderr
    fingerprint = run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "Release Signing",
                              "--email", "release@example.org").stderr.strip()
    assert verified.stdout.strip() == fingerprint

    # One flipped byte in the data, then in the signature: every verifier rejects.
    bad_data = flip_byte(data, 100, tmp_path / "tampered.tar.gz")
    bad_sig = tmp_path / "tampered.tar.gz.asc"
    bad_sig.write_bytes(sig.read_bytes())
    assert not gpg_accepts(gpg, cert, bad_data, bad_sig)
    assert not sqv_accepts(cert, bad_data, bad_sig)
    assert run_keyseal("verify", "--cert", cert, bad_data, bad_sig).returncode == 1

    binary = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, "--binary", data)
    assert binary.returncode == 0, binary.stderr
    raw_sig = tmp_path / "release.tar.gz.sig"
    for index in (len(raw_sig.read_bytes()) - 3, len(raw_sig.read_bytes()) // 2):
        broken = flip_byte(raw_sig, index, tmp_path / f"broken-{index}.sig")
        assert not gpg_accepts(gpg, cert, data, broken)
        assert not sqv_accepts(cert, data, broken)
        result = run_keyseal("verify", "--cert", cert, data, broken)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("key_type", ["rsa2048", "ed25519"])
def test_mint_is_reproducible(key_type: str, keydir: Path, tmp_path: Path) -> None:
    key, _ = make_key(keydir, key_type)
    outputs = []
    for index in range(2):
        out = tmp_path / f"cert{index}.asc"
        result = run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "A", "--email", "a@example.org",
                             "--created", "2025-01-02T03:04:05Z", "--expires", "2y", "-o", out)
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_mint_default_creation_time_is_stable(keydir: Path) -> None:
    key, _ = make_key(keydir, "p256")
    prints = {run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "A",
                          "--email", "a@example.org").stderr.strip() for _ in range(2)}
    assert len(prints) == 1 and len(next(iter(prints))) == 40


def test_signature_after_key_expiry_is_rejected(keydir: Path, tmp_path: Path) -> None:
    key, _ = make_key(keydir, "p256")
    cert = tmp_path / "expired.asc"
    minted = run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "Old", "--email", "old@example.org",
                         "--created", "2020-01-01T00:00:00Z", "--expires", "30d", "-o", cert)
    assert minted.returncode == 0, minted.stderr
    data = tmp_path / "file"
    data.write_bytes(b"x")
    # keyseal sign refuses the expired certificate (below); a signature made without that check:
    (tmp_path / "file.asc").write_bytes(_unchecked_signature(key, cert, data))
    result = run_keyseal("verify", "--cert", cert, data)
    assert result.returncode == 1
    assert "expired" in result.stderr


def _unchecked_signature(key: Path, cert: Path, data: Path) -> bytes:
    """A signature made now by `key` for `cert`, skipping the validity check `keyseal sign` makes."""
    from keyseal._internal.backends.file import FileSigner
    from keyseal._internal.openpgp.cert import load_certificates
    from keyseal._internal.openpgp.sign import SigningIdentity, render, signature_packet
    from keyseal._internal.openpgp.signature import HASH_IDS
    from keyseal._internal.openpgp.stream import hash_file

    primary = load_certificates(cert.read_bytes())[0].primary
    signer = FileSigner(f"file:{key}", key)
    identity = SigningIdentity(signer.public_key(), primary.fingerprint)
    hasher = hash_file(data, [HASH_IDS["sha256"]])[HASH_IDS["sha256"]]
    return render(signature_packet(signer, identity, hasher, "sha256"), armored=True)


@pytest.mark.parametrize(
    ("created", "expires", "reason"),
    [
        ("2020-01-01T00:00:00Z", "30d", "it expired at 2020-01-31T00:00:00Z"),
        ("2099-01-01T00:00:00Z", None, "it was created at 2099-01-01T00:00:00Z"),
    ],
)
def test_sign_refuses_a_certificate_verify_would_reject(created: str, expires: str | None, reason: str,
                                                        keydir: Path, tmp_path: Path) -> None:
    """Signing with an expired (or not yet valid) certificate made a signature `keyseal verify` refuses: now
    `keyseal sign` refuses first, with the verifier's own reason, and writes nothing."""
    key, _ = make_key(keydir, "ed25519")
    cert = tmp_path / "cert.asc"
    extra = ["--expires", expires] if expires else []
    minted = run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "Old", "--email", "old@example.org",
                         "--created", created, *extra, "-o", cert)
    assert minted.returncode == 0, minted.stderr
    data = tmp_path / "file"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data)
    assert_one_line_error(result)
    assert "refusing to sign" in result.stderr and reason in result.stderr, result.stderr
    assert not (tmp_path / "file.asc").exists()


def test_sign_refuses_key_that_is_not_the_certificates(keydir: Path, tmp_path: Path) -> None:
    key, _ = make_key(keydir, "p256")
    _, other_cert = make_key(keydir, "p384")
    data = tmp_path / "file"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", other_cert, data)
    assert_one_line_error(result)
    assert "not a signing key of the certificate" in result.stderr
    assert not (tmp_path / "file.asc").exists()


def test_sign_never_overwrites_without_force(keydir: Path, tmp_path: Path) -> None:
    key, cert = make_key(keydir, "ed25519")
    data = tmp_path / "file"
    data.write_bytes(b"x")
    existing = tmp_path / "file.asc"
    existing.write_bytes(b"keep me")
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data)
    assert_one_line_error(result)
    assert existing.read_bytes() == b"keep me"
    onto_input = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, "-o", data, "--force", data)
    assert_one_line_error(onto_input)
    assert data.read_bytes() == b"x"
    forced = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, "--force", data)
    assert forced.returncode == 0
    assert existing.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----")


def test_key_create_is_private_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert run_keyseal("keys", "create", "--out", key, "--type", "p256").returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    again = run_keyseal("keys", "create", "--out", key, "--type", "p256")
    assert_one_line_error(again)
    assert key.read_bytes() == before
    assert run_keyseal("keys", "create", "--out", key, "--type", "p256", "--force").returncode == 0
    assert key.read_bytes() != before


def test_many_files_signed_in_one_run(keydir: Path, tmp_path: Path, gpg: Gpg) -> None:
    key, cert = make_key(keydir, "p256")
    files = []
    for index in range(12):
        path = tmp_path / f"artifact-{index}.bin"
        path.write_bytes(bytes([index]) * (index * 1000 + 1))
        files.append(path)
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, "--jobs", "4", *files)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 12
    for path in files:
        assert sqv_accepts(cert, path, path.with_name(path.name + ".asc"))


def test_large_file_is_streamed_not_loaded(keydir: Path, tmp_path: Path) -> None:
    """A 1 GiB (sparse) file is signed with a bounded resident set: it is never read into memory whole."""
    key, cert = make_key(keydir, "ed25519")
    big = tmp_path / "big.iso"
    with big.open("wb") as handle:
        handle.truncate(1 << 30)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a large test worker would report
    # the worker's size; VmHWM belongs to the child's own address space.
    script = (
        "import re, sys, runpy; sys.argv = ['keyseal'] + sys.argv[1:];\n"
        "try:\n    runpy.run_module('keyseal', run_name='__main__')\n"
        "finally:\n    status = open('/proc/self/status').read()\n"
        "    print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", script, "sign", "--key", f"file:{key}", "--cert", str(cert),
                           str(big)], capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    max_rss_kib = int(proc.stderr.decode().split()[-1])
    assert max_rss_kib < 200 * 1024, f"signing used {max_rss_kib} KiB"
    assert run_keyseal("verify", "--cert", cert, big).returncode == 0
