"""The Python API (`import keyseal`): what it signs, real verifiers accept (gpg, sqv, `ssh-keygen -Y verify`,
minisign); what it verifies or opens, tampering breaks. Also the README's Python example, run as written."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import keyseal
from keyseal.errors import (
    KekMismatchError,
    KeyMismatchError,
    OutputExistsError,
    UsageError,
    VerificationError,
    WrappedRecordError,
)
from tests.conftest import Gpg, run_keyseal, sqv_verify
from tests.formats_peers import flip, minisign_verify, ok, ssh_keygen_verify

README = Path(__file__).resolve().parents[1] / "README.md"


def wrapped_release_key(directory: Path, private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
                        label: str = "release") -> tuple[str, keyseal.MintedCertificate, Path]:
    """A key wrapped under the session's local KEK, its certificate minted through the API and written out."""
    uri = keyseal.wrap_key(private_key, directory / f"{label}.key")
    cert = keyseal.mint_certificate(uri, name="Example Releases", email=f"{label}@example.org")
    cert_path = directory / f"{label}.asc"
    cert_path.write_bytes(cert.armored)
    return uri, cert, cert_path


def gpg_verify(gpg: Gpg, cert: Path, signature: Path, data: Path) -> str:
    imported = gpg.run("--import", cert)
    assert imported.returncode == 0, imported.stderr
    verified = gpg.run("--verify", signature, data)
    assert verified.returncode == 0, verified.stderr
    return verified.stderr.decode()


def test_import_keyseal_loads_nothing_until_used() -> None:
    """`import keyseal` stays as cheap as before the API: the names load on first use."""
    probe = ("import sys, keyseal; print(' '.join(sorted(sys.modules))); "
             "assert 'sign_file' in dir(keyseal) and 'sign_file' in keyseal.__all__")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(result.stdout.split())
    assert not {m for m in loaded if m.startswith(("keyseal.", "cryptography", "click"))} - {"keyseal._version"}, loaded
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = keyseal.nonexistent  # type: ignore[attr-defined]


def test_sign_with_wrapped_key_verified_by_gpg_sqv_and_keyseal(tmp_path: Path, gpg: Gpg) -> None:
    uri, cert, cert_path = wrapped_release_key(tmp_path, ec.generate_private_key(ec.SECP384R1()))
    assert b"PRIVATE KEY" not in (tmp_path / "release.key").read_bytes()
    imported = gpg.run("--import", cert_path)
    assert b"[GNUPG:] IMPORT_OK" in imported.stderr, imported.stderr  # the minted certificate as gpg sees it
    data = tmp_path / "tool-1.0.tar.gz"
    data.write_bytes(os.urandom(70_000))

    signature = keyseal.sign_file(uri, data, certificates=[cert_path])
    assert signature == tmp_path / "tool-1.0.tar.gz.asc"
    assert signature.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----")
    assert f"[GNUPG:] VALIDSIG {cert.fingerprint}" in gpg_verify(gpg, cert_path, signature, data)
    assert sqv_verify(cert_path, signature, data).returncode == 0
    result = keyseal.verify_file(data, certificates=[cert.armored])  # certificate bytes work as well as paths
    assert result.fingerprint == cert.fingerprint
    assert result.signatures[0].user_id == "Example Releases <release@example.org>"
    assert result.signatures[0].hash_name == "sha384"

    with pytest.raises(OutputExistsError, match="exists"):
        keyseal.sign_file(uri, data, certificates=[cert_path])  # an existing signature is never replaced silently
    tampered = flip(data, tmp_path / "tampered.tar.gz", 12_345)
    with pytest.raises(VerificationError):
        keyseal.verify_file(tampered, signature, certificates=[cert_path])
    assert sqv_verify(cert_path, signature, tampered).returncode != 0


def test_sign_files_with_one_opened_clear_file_key(tmp_path: Path) -> None:
    """A clear PKCS#8 key (`file:` URI), opened once for several files; binary signatures."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "clear.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    files = [tmp_path / f"part-{i}.bin" for i in range(3)]
    for path in files:
        path.write_bytes(os.urandom(1000))
    with keyseal.open_signer(f"file:{pem}") as signer:
        cert = keyseal.mint_certificate(signer, name="Parts", email="parts@example.org", created=1_700_000_000)
        cert_path = tmp_path / "parts.asc"
        cert_path.write_bytes(cert.armored)
        written = keyseal.sign_files(signer, files, certificates=[cert_path], armor=False, jobs=2)
    assert written == [path.with_name(path.name + ".sig") for path in files]
    for data, signature in zip(files, written, strict=True):
        assert not signature.read_bytes().startswith(b"-----")
        assert sqv_verify(cert_path, signature, data).returncode == 0
    other = tmp_path / "other.asc"
    other.write_bytes(keyseal.mint_certificate(f"file:{pem}", name="Parts", email="parts@example.org").armored)
    with pytest.raises(VerificationError):  # same key, another creation time: another certificate, not trusted
        keyseal.verify_file(files[0], written[0], certificates=[other])


def test_append_adds_a_second_signature(tmp_path: Path, gpg: Gpg) -> None:
    uri_a, cert_a, path_a = wrapped_release_key(tmp_path, ed25519.Ed25519PrivateKey.generate(), "v1")
    uri_b, cert_b, path_b = wrapped_release_key(tmp_path, ed25519.Ed25519PrivateKey.generate(), "v2")
    data = tmp_path / "SHA256SUMS"
    data.write_bytes(b"0" * 64 + b"  tool-1.0.tar.gz\n")
    signature = keyseal.sign_file(uri_a, data, certificates=[path_a])
    assert keyseal.sign_file(uri_b, data, certificates=[path_b], append=True) == signature

    imported = gpg.run("--import", path_b)
    assert imported.returncode == 0, imported.stderr
    status = gpg_verify(gpg, path_a, signature, data)
    assert f"VALIDSIG {cert_a.fingerprint}" in status and f"VALIDSIG {cert_b.fingerprint}" in status
    both = keyseal.verify_file(data, certificates=[path_a, path_b], threshold=2)
    assert {good.fingerprint for good in both.signatures} == {cert_a.fingerprint, cert_b.fingerprint}

    with pytest.raises(UsageError, match="already holds a signature"):
        keyseal.sign_file(uri_b, data, certificates=[path_b], append=True)
    uri_c, _, path_c = wrapped_release_key(tmp_path, ed25519.Ed25519PrivateKey.generate(), "v3")
    data.write_bytes(b"another build\n")  # what the file holds is no longer over this file: refused
    with pytest.raises(UsageError, match="refusing to append"):
        keyseal.sign_file(uri_c, data, certificates=[path_c], append=True)
    with pytest.raises(KeyMismatchError):
        keyseal.sign_file(uri_a, data, certificates=[path_b], force=True)


def test_sign_data_verified_by_sqv(tmp_path: Path) -> None:
    uri, cert, cert_path = wrapped_release_key(tmp_path, ed25519.Ed25519PrivateKey.generate())
    signed = keyseal.sign_data(uri, b"hello\n", certificates=[cert_path], audit_subject="greeting")
    assert signed.fingerprint == cert.fingerprint and signed.hash_name == "sha256"
    (tmp_path / "hello").write_bytes(b"hello\n")
    (tmp_path / "hello.asc").write_bytes(signed.signature)
    assert sqv_verify(cert_path, tmp_path / "hello.asc", tmp_path / "hello").returncode == 0
    (tmp_path / "hello").write_bytes(b"hellO\n")
    assert sqv_verify(cert_path, tmp_path / "hello.asc", tmp_path / "hello").returncode != 0


def test_ssh_signature_verified_by_ssh_keygen(tmp_path: Path) -> None:
    uri = keyseal.wrap_key(ed25519.Ed25519PrivateKey.generate(), tmp_path / "ssh.key")
    data = tmp_path / "artifact.bin"
    data.write_bytes(os.urandom(4000))
    signature = keyseal.sign_file(uri, data, format="ssh", namespace="release")
    assert signature == tmp_path / "artifact.bin.sig"
    allowed = tmp_path / "allowed_signers"
    ok(run_keyseal("keys", "export", "--key", uri, "--format", "ssh", "--principal", "ci@example.org",
                   "-o", allowed))
    accepted = ssh_keygen_verify(allowed, "ci@example.org", "release", signature, data)
    assert accepted.returncode == 0, accepted.stderr
    assert ssh_keygen_verify(allowed, "ci@example.org", "file", signature, data).returncode != 0  # namespace bound
    with pytest.raises(UsageError, match="--cert apply to --format openpgp only"):
        keyseal.sign_file(uri, data, format="ssh", certificates=[b""], force=True)


def test_minisign_signature_verified_by_minisign(tmp_path: Path) -> None:
    uri = keyseal.wrap_key(ed25519.Ed25519PrivateKey.generate(), tmp_path / "mini.key")
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(os.urandom(4000))
    signature = keyseal.sign_file(uri, data, format="minisign")
    assert signature == tmp_path / "tool.tar.gz.minisig"
    pub = tmp_path / "minisign.pub"
    ok(run_keyseal("keys", "export", "--key", uri, "--format", "minisign", "-o", pub))
    accepted = minisign_verify(pub, data, signature)
    assert accepted.returncode == 0, accepted.stderr
    assert minisign_verify(pub, flip(data, tmp_path / "bad.tar.gz", 7), signature).returncode != 0


def test_wrap_and_open_round_trip_and_tampering(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "records" / "ca.key"
    path.parent.mkdir()
    assert keyseal.wrap_key(key, path) == f"file:{path}"
    stored = path.read_bytes()
    raw = key.private_numbers().private_value.to_bytes(32, "big")
    assert raw not in stored and base64.b64encode(raw) not in stored and b"PRIVATE KEY" not in stored
    opened = keyseal.open_wrapped_key(path)
    assert isinstance(opened, ec.EllipticCurvePrivateKey)
    assert opened.private_numbers() == key.private_numbers()

    with pytest.raises(OutputExistsError):
        keyseal.wrap_key(key, path)
    other_kek = f"local:{tmp_path / 'other-kek'}"
    keyseal.wrap_key(ec.generate_private_key(ec.SECP256R1()), tmp_path / "other.key", kek=other_kek)
    with pytest.raises(KekMismatchError):  # another KEK than the record's is refused before any unwrap
        keyseal.open_wrapped_key(path, kek=other_kek)
    fields = json.loads(stored)
    ciphertext = bytearray(base64.b64decode(fields["ciphertext"]))
    ciphertext[5] ^= 0x01
    fields["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
    path.write_bytes((json.dumps(fields, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode())
    with pytest.raises(WrappedRecordError):
        keyseal.open_wrapped_key(path)
    path.write_bytes(stored)
    assert keyseal.open_wrapped_key(path).private_numbers() == key.private_numbers()


def readme_example() -> str:
    text = README.read_text()
    return text.split("<!-- api-example")[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's sign + verify example, run as written in an empty directory (its key under the session's
    local KEK); its signature is then checked by sqv, and a tampered file fails its verification."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    signed = sorted(path.name for path in tmp_path.iterdir())
    assert "tool-1.0.tar.gz.asc" in signed and "release-key.asc" in signed, signed
    assert sqv_verify(tmp_path / "release-key.asc", tmp_path / "tool-1.0.tar.gz.asc",
                      tmp_path / "tool-1.0.tar.gz").returncode == 0
    (tmp_path / "tool-1.0.tar.gz").write_bytes(b"tampered")
    with pytest.raises(VerificationError):
        keyseal.verify_file("tool-1.0.tar.gz", certificates=["release-key.asc"])


def test_the_public_name_lists_agree() -> None:
    """keyseal/__init__.py, keyseal/api.py and the implementation each list the public names (the lazy re-export
    needs them literal for type checkers): they must name the same things, and every name must resolve."""
    import keyseal.api
    from keyseal._internal import api as implementation

    trust = {"Combined", "CrossCheck", "ReleaseVerification", "Resolver", "TrustSet", "WkdResolver"}
    assert set(keyseal.api.__all__) == set(implementation.__all__)
    assert set(keyseal.__all__) - trust - {"__version__"} == set(keyseal.api.__all__)
    for name in keyseal.__all__:
        assert getattr(keyseal, name) is not None, name
    assert keyseal.sign_file is implementation.sign_file


def test_bad_input_is_a_keyseal_error_not_a_traceback(tmp_path: Path) -> None:
    """What the CLI refuses before the library sees it (no FILES, a time OpenPGP cannot record) is refused by the
    API too, with a UsageError, and nothing is written."""
    uri = keyseal.wrap_key(ed25519.Ed25519PrivateKey.generate(), tmp_path / "k.key")
    with pytest.raises(UsageError, match="no files to sign"):
        keyseal.sign_files(uri, [])
    for created in (-1, 0, 2**32, datetime(1960, 1, 1, tzinfo=UTC)):
        with pytest.raises(UsageError, match="outside the range OpenPGP can record"):
            keyseal.mint_certificate(uri, name="A", email="a@example.org", created=created)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["k.key"]
