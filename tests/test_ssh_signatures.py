"""SSH signatures (`keyseal sign --format ssh`) from every custody, checked by OpenSSH's own `ssh-keygen -Y verify`
and by `keyseal verify --format ssh`; a tampered file, signature or namespace is rejected by both."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest

from keyseal._internal.formats import ssh
from keyseal.errors import VerificationError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.formats_peers import Custody, flip, kms_key, local_key, ok, pkcs11_key, ssh_keygen_verify, tool
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.softhsm import SoftHsm

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

PRINCIPAL = "release@example.org"
SIGNATURE_TYPES = {"p256": "ecdsa-sha2-nistp256", "p384": "ecdsa-sha2-nistp384", "p521": "ecdsa-sha2-nistp521",
                   "rsa2048": "rsa-sha2-512", "ed25519": "ssh-ed25519"}


def resign_value(signature: Path, out: Path) -> Path:
    """The signature with one bit flipped inside the signature value (the blob's last bytes), armor kept valid."""
    lines = signature.read_text().splitlines()
    blob = bytearray(base64.b64decode("".join(lines[1:-1])))
    blob[-5] ^= 0x01
    encoded = base64.b64encode(bytes(blob)).decode()
    body = [encoded[i : i + 70] for i in range(0, len(encoded), 70)]
    out.write_text("\n".join([lines[0], *body, lines[-1]]) + "\n")
    return out


def check_custody(custody: Custody, key_type: str, tmp_path: Path, kms: KmsEmulator | None = None) -> None:
    """sign -> export -> ssh-keygen and keyseal accept; tampered data, signature and namespace -> both reject."""
    data = tmp_path / "tool-1.0.tar.gz"
    data.write_bytes(os.urandom(3000) + key_type.encode())
    if kms is not None:
        kms.calls.clear()
    signed = ok(custody.keyseal("sign", "--key", custody.uri, "--format", "ssh", data))
    if kms is not None:  # one remote signature per file, no other call than the public key
        counts = kms.calls.counts()
        assert counts["Sign"] == 1 and counts["GetPublicKey"] <= 1 and set(counts) <= {"Sign", "GetPublicKey"}
    sig = data.with_name(data.name + ".sig")
    assert signed.stdout.strip() == str(sig)
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----\n")

    allowed = tmp_path / "allowed_signers"
    ok(custody.keyseal("keys", "export", "--key", custody.uri, "--format", "ssh", "--principal", PRINCIPAL,
                       "-o", allowed))
    pub = tmp_path / "key.pub"
    pub.write_text(allowed.read_text().split(" ", 1)[1])
    listed = subprocess.run([tool("ssh-keygen", "openssh-client"), "-l", "-f", str(pub)], capture_output=True,
                            text=True, check=True)
    fingerprint = listed.stdout.split()[1]

    accepted = ssh_keygen_verify(allowed, PRINCIPAL, "file", sig, data)
    assert accepted.returncode == 0, accepted.stderr
    assert f'Good "file" signature for {PRINCIPAL}'.encode() in accepted.stdout
    ours = run_keyseal("verify", "--format", "ssh", "--cert", allowed, data)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == fingerprint
    assert f"({SIGNATURE_TYPES[key_type]})" in ours.stderr
    trusted = ssh.load_trusted_keys(pub.read_bytes(), "key.pub")
    assert ssh.verify_file(trusted, data, sig.read_bytes(), "file").fingerprint == fingerprint

    bad_data = flip(data, tmp_path / "tampered.tar.gz", 100)
    bad_sig = resign_value(sig, tmp_path / "tampered-value.sig")
    for candidate_data, candidate_sig in ((bad_data, sig), (data, bad_sig)):
        assert ssh_keygen_verify(allowed, PRINCIPAL, "file", candidate_sig, candidate_data).returncode != 0
        with pytest.raises(VerificationError, match="BAD signature"):
            ssh.verify_file(trusted, candidate_data, candidate_sig.read_bytes(), "file")
    refused = run_keyseal("verify", "--format", "ssh", "--cert", allowed, bad_data, sig)
    assert_one_line_error(refused)
    assert refused.returncode == 1 and "BAD signature" in refused.stderr
    assert ssh_keygen_verify(allowed, PRINCIPAL, "git", sig, data).returncode != 0
    with pytest.raises(VerificationError, match="namespace 'file'"):
        ssh.verify_file(trusted, data, sig.read_bytes(), "git")


@pytest.mark.parametrize("key_type", ["p256", "p384", "p521", "rsa2048", "ed25519"])
def test_wrapped_local_key(key_type: str, tmp_path: Path) -> None:
    check_custody(local_key(tmp_path, key_type), key_type, tmp_path)


@pytest.mark.parametrize("key_type", ["p256", "p384", "p521", "rsa2048"])
def test_kms_key(key_type: str, aws_env: dict[str, str], kms_emulator: KmsEmulator, tmp_path: Path) -> None:
    check_custody(kms_key(key_type), key_type, tmp_path, kms_emulator)


@pytest.mark.parametrize("key_type", ["p256", "rsa2048", "ed25519"])
def test_pkcs11_key(key_type: str, softhsm: SoftHsm, tmp_path: Path) -> None:
    check_custody(pkcs11_key(softhsm, key_type), key_type, tmp_path)


def test_vault_transit_ed25519(vault_env: dict[str, str], tmp_path: Path) -> None:
    """Transit signs the SSH signed-data blob as the Ed25519 message (not a 64-byte digest)."""
    uri = ok(run_keyseal("keys", "create", "--vault", f"hashivault://transit/ssh-{tmp_path.name[-12:]}",
                         "--type", "ed25519")).stdout.strip()
    check_custody(Custody(uri), "ed25519", tmp_path)


@pytest.mark.parametrize("ssh_type", ["ed25519", "ecdsa", "rsa"])
def test_keyseal_verifies_what_ssh_keygen_signs(ssh_type: str, tmp_path: Path) -> None:
    """The other direction: keyseal's verifier accepts OpenSSH's own signatures, and refuses another key's."""
    ssh_keygen = tool("ssh-keygen", "openssh-client")
    key = tmp_path / "id"
    extra = ["-b", "2048"] if ssh_type == "rsa" else []
    subprocess.run([ssh_keygen, "-q", "-t", ssh_type, *extra, "-N", "", "-f", str(key)], check=True)
    data = tmp_path / "release.tar.gz"
    data.write_bytes(os.urandom(1000))
    subprocess.run([ssh_keygen, "-q", "-Y", "sign", "-f", str(key), "-n", "file", str(data)], check=True,
                   capture_output=True)
    ours = run_keyseal("verify", "--format", "ssh", "--cert", f"{key}.pub", data)
    assert ours.returncode == 0, ours.stderr
    other = local_key(tmp_path, "ed25519")
    pub = tmp_path / "other.pub"
    ok(run_keyseal("keys", "export", "--key", other.uri, "--format", "ssh", "-o", pub))
    refused = run_keyseal("verify", "--format", "ssh", "--cert", pub, data)
    assert_one_line_error(refused)
    assert "not among the trusted keys" in refused.stderr


def test_namespace_and_several_files(tmp_path: Path) -> None:
    custody = local_key(tmp_path, "ed25519")
    files = []
    for index in range(3):
        path = tmp_path / f"f{index}.txt"
        path.write_text(f"file {index}\n")
        files.append(path)
    ok(custody.keyseal("sign", "--key", custody.uri, "--format", "ssh", "--namespace", "release@example.org",
                       *files))
    allowed = tmp_path / "allowed"
    ok(custody.keyseal("keys", "export", "--key", custody.uri, "--format", "ssh", "--principal", PRINCIPAL,
                       "-o", allowed))
    for path in files:
        sig = path.with_name(path.name + ".sig")
        assert ssh_keygen_verify(allowed, PRINCIPAL, "release@example.org", sig, path).returncode == 0
    verified = run_keyseal("verify", "--format", "ssh", "--namespace", "release@example.org", "--cert", allowed,
                           files[1])
    assert verified.returncode == 0, verified.stderr
    assert f'Good "release@example.org" signature for {PRINCIPAL}' in verified.stderr


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    custody = local_key(tmp_path, "p256")
    data = tmp_path / "f"
    data.write_bytes(b"x")
    cert = tmp_path / "cert.asc"
    cases: list[tuple[list[str | os.PathLike[str]], str]] = [
        (["sign", "--key", custody.uri, "--format", "ssh", "--cert", cert, data], "--cert apply to --format openpgp"),
        (["sign", "--key", custody.uri, "--format", "ssh", "--binary", data], "--binary apply to --format openpgp"),
        (["sign", "--key", custody.uri, "--format", "ssh", "--namespace", "two words", data], "invalid SSH signature"),
        (["sign", "--key", custody.uri, "--namespace", "git", data], "--namespace applies to --format ssh only"),
    ]
    for args, expected in cases:
        result = run_keyseal(*args)
        assert_one_line_error(result)
        assert expected in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(custody.uri[5:]).name, "f"])

    ok(custody.keyseal("sign", "--key", custody.uri, "--format", "ssh", data))
    again = run_keyseal("sign", "--key", custody.uri, "--format", "ssh", data)
    assert_one_line_error(again)
    assert "f.sig exists" in again.stderr and "--append" not in again.stderr

    with_options = tmp_path / "allowed-with-options"
    line = ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "ssh")).stdout.strip()
    with_options.write_text(f'{PRINCIPAL} namespaces="git" {line}\n')
    refused = run_keyseal("verify", "--format", "ssh", "--cert", with_options, data)
    assert_one_line_error(refused)
    assert "ssh-keygen -Y verify" in refused.stderr
    garbage = tmp_path / "garbage.sig"
    garbage.write_text("-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n")
    pub = tmp_path / "pub"
    pub.write_text(line + "\n")
    refused = run_keyseal("verify", "--format", "ssh", "--cert", pub, data, garbage)
    assert_one_line_error(refused)
    assert refused.returncode == 1
