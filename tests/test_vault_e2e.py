"""Transit keys end to end through the CLI (child processes, as a user runs them) against a real OpenBao.

keys create --vault -> keys mint -> keyseal sign -> gpg, sqv and keyseal verify accept; one flipped byte -> all
reject. Transit calls are counted from OpenBao's audit log, so they hold for child processes.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from keyseal._internal.openpgp.cert import load_certificates
from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.harness.openbao import OpenBao
from tests.openpgp_checks import assert_accepted_everywhere, flip_byte, gpg_accepts, sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

UID = ("--name", "Release Signing", "--email", "release@example.org")
# rsa4096 once: OpenBao generates it in a second or two, but every extra RSA-4096 test costs CI time.
KEY_TYPES = ["p256", "p384", "rsa2048", "ed25519", "rsa4096"]


def create_vault_key(uri: str, key_type: str) -> str:
    created = run_keyseal("keys", "create", "--vault", uri, "--type", key_type)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_transit_key_end_to_end(key_type: str, vault_env: dict[str, str], openbao: OpenBao, tmp_path: Path,
                                gpg: Gpg) -> None:
    name = f"e2e-{key_type}"
    uri = create_vault_key(f"hashivault://{name}", key_type)
    assert uri == f"hashivault://transit/{name}"
    assert openbao.read_key(name)["exportable"] is False

    cert = tmp_path / "release.asc"
    mark = openbao.audit_mark()
    minted = run_keyseal("keys", "mint", "--key", uri, *UID, "-o", cert)
    assert minted.returncode == 0, minted.stderr
    fingerprint = minted.stdout.strip()
    calls = openbao.requests_since(mark)
    assert calls == [("read", f"transit/keys/{name}"), ("update", f"transit/sign/{name}")], calls

    files = []
    for index in range(2):
        data = tmp_path / f"release-{index}.tar.gz"
        data.write_bytes(f"release {key_type} payload {index}\n".encode() * 300)
        files.append(data)
    mark = openbao.audit_mark()
    signed = run_keyseal("sign", "--key", uri, "--cert", cert, *files)
    assert signed.returncode == 0, signed.stderr
    calls = openbao.requests_since(mark)
    assert calls.count(("update", f"transit/sign/{name}")) == len(files)
    assert calls.count(("read", f"transit/keys/{name}")) <= 1 and len(calls) <= len(files) + 1, calls

    mark = openbao.audit_mark()
    for data in files:
        assert_accepted_everywhere(gpg, cert, data, data.with_name(data.name + ".asc"), fingerprint)
    assert openbao.requests_since(mark) == []  # verifying never asks Vault

    data, sig = files[0], files[0].with_name(files[0].name + ".asc")
    bad_data = flip_byte(data, 100, tmp_path / "tampered.tar.gz")
    bad_sig = tmp_path / "tampered.tar.gz.asc"
    bad_sig.write_bytes(sig.read_bytes())
    assert not gpg_accepts(gpg, cert, bad_data, bad_sig)
    assert not sqv_accepts(cert, bad_data, bad_sig)
    assert run_keyseal("verify", "--cert", cert, bad_data, bad_sig).returncode == 1


def test_mint_pinned_version_after_rotation(vault_env: dict[str, str], openbao: OpenBao, tmp_path: Path,
                                            gpg: Gpg) -> None:
    """?version=1 after a rotation: mint frames v1's public key (and its creation time), and signs with v1."""
    uri = create_vault_key("hashivault://transit/e2e-rotated", "p256")
    openbao.rotate_key("e2e-rotated")
    cert_v1, cert_latest = tmp_path / "v1.asc", tmp_path / "latest.asc"
    assert run_keyseal("keys", "mint", "--key", f"{uri}?version=1", *UID, "-o", cert_v1).returncode == 0
    assert run_keyseal("keys", "mint", "--key", uri, *UID, "-o", cert_latest).returncode == 0
    versions = openbao.read_key("e2e-rotated")["keys"]
    for cert, version in ((cert_v1, "1"), (cert_latest, "2")):
        primary = load_certificates(cert.read_bytes())[0].primary
        expected = serialization.load_pem_public_key(versions[version]["public_key"].encode())
        assert primary.public_key.public_numbers() == expected.public_numbers()  # type: ignore[union-attr]
    data = tmp_path / "artifact"
    data.write_bytes(b"built before the rotation was trusted")
    signed = run_keyseal("sign", "--key", f"{uri}?version=1", "--cert", cert_v1, data)
    assert signed.returncode == 0, signed.stderr
    sig = data.with_name("artifact.asc")
    assert sqv_accepts(cert_v1, data, sig)
    assert not sqv_accepts(cert_latest, data, sig)
    # The certificate of another version is refused before anything is signed.
    mismatch = run_keyseal("sign", "--key", uri, "--cert", cert_v1, "-o", tmp_path / "x.asc", "--force", data)
    assert_one_line_error(mismatch)


def test_create_errors(vault_env: dict[str, str], openbao: OpenBao, tmp_path: Path) -> None:
    create_vault_key("hashivault://transit/e2e-taken", "p256")
    for args, text in [
        (["--vault", "hashivault://transit/e2e-taken", "--type", "p384"], "already exists"),
        (["--vault", "hashivault://transit/e2e-x", "--out", tmp_path / "k"], "--vault takes only --type"),
        (["--vault", "hashivault://transit/e2e-x?version=2"], "pins a version"),
        (["--vault", "hashivault://no-such-mount/e2e-x"], "bao secrets enable -path=no-such-mount transit"),
        (["--vault", "transit/e2e-x"], "invalid Vault Transit key URI"),
    ]:
        result = run_keyseal("keys", "create", *args)
        assert_one_line_error(result)
        assert text in result.stderr, result.stderr
    assert openbao.read_key("e2e-taken")["type"] == "ecdsa-p256"
    assert not (tmp_path / "k").exists()


def test_unreachable_vault_writes_nothing(vault_env: dict[str, str], openbao: OpenBao, tmp_path: Path) -> None:
    uri = create_vault_key("hashivault://e2e-down", "p256")
    cert = tmp_path / "cert.asc"
    assert run_keyseal("keys", "mint", "--key", uri, *UID, "-o", cert).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    data = work / "f.tar.gz"
    data.write_bytes(b"payload")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"VAULT_ADDR": closed, "KEYSEAL_VAULT_MAX_ATTEMPTS": "2"}
    result = run_keyseal("sign", "--key", uri, "--cert", cert, data, env=env)
    assert_one_line_error(result)
    assert f"cannot reach Vault at {closed}" in result.stderr
    assert [p.name for p in work.iterdir()] == ["f.tar.gz"]


# -- vault-policy: a token holding exactly the printed policy can do what the command needs, and no more -------


def policy_token(openbao: OpenBao, key: str, purpose: str) -> str:
    printed = run_keyseal("vault-policy", "--key", key, "--for", purpose)
    assert printed.returncode == 0, printed.stderr
    return openbao.token_for_policy(f"keyseal-{purpose}-{abs(hash(key))}", printed.stdout)


def test_policy_limited_tokens(vault_env: dict[str, str], openbao: OpenBao, tmp_path: Path, gpg: Gpg) -> None:
    uri = create_vault_key("hashivault://e2e-policy", "p384")
    create_vault_key("hashivault://e2e-policy-other", "p256")
    openbao.create_key("e2e-policy-kek", "aes256-gcm96")
    sign_token = policy_token(openbao, uri, "sign")
    wrap_token = policy_token(openbao, "vault:transit/e2e-policy-kek", "wrap")

    # The sign-only token mints and signs: all a release job does.
    signer = {"VAULT_TOKEN": sign_token}
    cert = tmp_path / "cert.asc"
    minted = run_keyseal("keys", "mint", "--key", uri, *UID, "-o", cert, env=signer)
    assert minted.returncode == 0, minted.stderr
    data = tmp_path / "artifact.tar.gz"
    data.write_bytes(b"artifact")
    signed = run_keyseal("sign", "--key", uri, "--cert", cert, data, env=signer)
    assert signed.returncode == 0, signed.stderr
    assert gpg_accepts(gpg, cert, data, data.with_name(data.name + ".asc"))

    # ... and nothing else: another key, creating keys, the KEK (neither wrapping nor unwrapping).
    other = run_keyseal("keys", "mint", "--key", "hashivault://e2e-policy-other", *UID, "-o", tmp_path / "o.asc",
                        env=signer)
    assert_one_line_error(other)
    assert '"read" capability on path "transit/keys/e2e-policy-other"' in other.stderr
    created = run_keyseal("keys", "create", "--vault", "hashivault://e2e-policy-new", env=signer)
    assert_one_line_error(created)
    wrapped = run_keyseal("keys", "create", "--out", tmp_path / "w.key", "--kek", "vault:e2e-policy-kek",
                          env=signer)
    # Two lines: the warning that the key type cannot be checked (no "read" on the KEK), then the error.
    assert wrapped.returncode != 0 and "Traceback" not in wrapped.stderr
    assert wrapped.stderr.splitlines()[-1].startswith("keyseal: error: key wrapping startup check failed")
    assert '"update" capability on path "transit/encrypt/e2e-policy-kek"' in wrapped.stderr
    assert not (tmp_path / "w.key").exists()
    ciphertext = openbao.request("POST", "transit/encrypt/e2e-policy-kek",
                                 {"plaintext": base64.b64encode(b"\x00" * 32).decode()})["data"]["ciphertext"]
    from tests.harness.openbao import OpenBaoError

    with pytest.raises(OpenBaoError, match="permission denied"):  # a sign-only token cannot decrypt
        openbao.request("POST", "transit/decrypt/e2e-policy-kek", {"ciphertext": ciphertext}, token=sign_token)

    # The wrap token creates and opens wrapped keys, and cannot sign with the Transit key.
    wrapper = {"VAULT_TOKEN": wrap_token, "KEYSEAL_KEK": "vault:transit/e2e-policy-kek"}
    key_file = tmp_path / "wrapped.key"
    assert run_keyseal("keys", "create", "--out", key_file, "--type", "p256", env=wrapper).returncode == 0
    wcert = tmp_path / "wrapped.asc"
    assert run_keyseal("keys", "mint", "--key", f"file:{key_file}", *UID, "-o", wcert, env=wrapper).returncode == 0
    refused = run_keyseal("sign", "--key", uri, "--cert", cert, "-o", tmp_path / "x.asc", data, env=wrapper)
    assert_one_line_error(refused)
    assert '"read" capability on path "transit/keys/e2e-policy"' in refused.stderr
    with pytest.raises(OpenBaoError, match="permission denied"):
        openbao.request("POST", "transit/sign/e2e-policy", {"input": base64.b64encode(b"x" * 48).decode(),
                                                             "prehashed": True, "hash_algorithm": "sha2-384"},
                        token=wrap_token)


def test_vault_policy_command_errors() -> None:
    for key, text in [("arn:aws:kms:us-east-1:1:key/x", "invalid Vault Transit key URI"),
                      ("vault:transit/k?version=2", "takes no ?version")]:
        result = run_keyseal("vault-policy", "--key", key, "--for", "sign")
        assert_one_line_error(result)
        assert text in result.stderr
