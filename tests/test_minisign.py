"""minisign signatures (`keyseal sign --format minisign`) from every Ed25519 custody, checked by the minisign tool
itself (`minisign -V`) and by `keyseal verify --format minisign`; tampering is rejected by both."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest

from keyseal._internal.formats import minisign
from keyseal.errors import VerificationError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.formats_peers import Custody, flip, kms_key, local_key, minisign_verify, ok, pkcs11_key, tool
from tests.harness.softhsm import SoftHsm

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def check_custody(custody: Custody, tmp_path: Path) -> None:
    """sign -> export -> minisign and keyseal accept; tampered data, signature or trusted comment -> both reject."""
    data = tmp_path / "tool-1.0.tar.gz"
    data.write_bytes(os.urandom(5000))
    signed = ok(custody.keyseal("sign", "--key", custody.uri, "--format", "minisign", data))
    sig = data.with_name(data.name + ".minisig")
    assert signed.stdout.strip() == str(sig)
    pub = tmp_path / "minisign.pub"
    ok(custody.keyseal("keys", "export", "--key", custody.uri, "--format", "minisign", "-o", pub))

    accepted = minisign_verify(pub, data, sig)
    assert accepted.returncode == 0, accepted.stderr
    assert b"Signature and comment signature verified" in accepted.stdout
    assert b"file:tool-1.0.tar.gz\thashed" in accepted.stdout
    ours = run_keyseal("verify", "--format", "minisign", "--cert", pub, data)
    assert ours.returncode == 0, ours.stderr
    key_id = pub.read_text().splitlines()[0].rsplit(" ", 1)[1]
    assert ours.stdout.strip() == key_id
    assert "trusted comment: timestamp:" in ours.stderr

    keys = minisign.load_public_keys(pub.read_bytes(), "minisign.pub")
    lines = sig.read_text().splitlines()
    tampered_data = flip(data, tmp_path / "tampered.tar.gz", 10)
    value = bytearray(base64.b64decode(lines[1]))
    value[-1] ^= 0x01
    tampered_value = tmp_path / "value.minisig"
    tampered_value.write_text("\n".join([lines[0], base64.b64encode(bytes(value)).decode(), *lines[2:]]) + "\n")
    tampered_comment = tmp_path / "comment.minisig"
    tampered_comment.write_text("\n".join([*lines[:2], lines[2].replace("timestamp:", "timestamp:1"), lines[3]])
                                + "\n")
    cases = [(tampered_data, sig, "BAD signature"), (data, tampered_value, "BAD signature"),
             (data, tampered_comment, "BAD global signature")]
    for candidate_data, candidate_sig, reason in cases:
        assert minisign_verify(pub, candidate_data, candidate_sig).returncode != 0
        with pytest.raises(VerificationError, match=reason):
            minisign.verify_file(keys, candidate_data, candidate_sig.read_bytes())
    refused = run_keyseal("verify", "--format", "minisign", "--cert", pub, data, tampered_comment)
    assert_one_line_error(refused)
    assert refused.returncode == 1 and "trusted comment was altered" in refused.stderr


def test_wrapped_local_key(tmp_path: Path) -> None:
    check_custody(local_key(tmp_path, "ed25519"), tmp_path)


def test_pkcs11_key(softhsm: SoftHsm, tmp_path: Path) -> None:
    check_custody(pkcs11_key(softhsm, "ed25519"), tmp_path)


def test_vault_transit_key(vault_env: dict[str, str], tmp_path: Path) -> None:
    uri = ok(run_keyseal("keys", "create", "--vault", f"hashivault://transit/minisign-{tmp_path.name[-12:]}",
                         "--type", "ed25519")).stdout.strip()
    check_custody(Custody(uri), tmp_path)


def test_kms_key_is_refused(aws_env: dict[str, str], tmp_path: Path) -> None:
    """AWS KMS has no Ed25519 keys: one clear line, nothing written."""
    custody = kms_key("p256")
    data = tmp_path / "f"
    data.write_bytes(b"x")
    for args in (["sign", "--key", custody.uri, "--format", "minisign", data],
                 ["keys", "export", "--key", custody.uri, "--format", "minisign"]):
        result = custody.keyseal(*args)
        assert_one_line_error(result)
        assert "minisign signs with Ed25519 keys only" in result.stderr and "ECDSA P-256" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_keyseal_verifies_what_minisign_signs(tmp_path: Path) -> None:
    """The other direction: a key and signature made by minisign itself, and a key ID that does not match."""
    tool_path = tool("minisign", "minisign")
    pub, secret = tmp_path / "m.pub", tmp_path / "m.key"
    subprocess.run([tool_path, "-G", "-W", "-p", str(pub), "-s", str(secret)], check=True, capture_output=True)
    data = tmp_path / "release.tar.gz"
    data.write_bytes(os.urandom(2000))
    subprocess.run([tool_path, "-S", "-s", str(secret), "-m", str(data), "-t", "release 1.0"], check=True,
                   capture_output=True)
    ours = run_keyseal("verify", "--format", "minisign", "--cert", pub, data)
    assert ours.returncode == 0, ours.stderr
    assert "trusted comment: release 1.0" in ours.stderr
    other = local_key(tmp_path, "ed25519")
    other_pub = tmp_path / "other.pub"
    ok(run_keyseal("keys", "export", "--key", other.uri, "--format", "minisign", "-o", other_pub))
    refused = run_keyseal("verify", "--format", "minisign", "--cert", other_pub, data)
    assert_one_line_error(refused)
    assert "not among the trusted keys" in refused.stderr


def test_export_is_stable_and_bad_input(tmp_path: Path) -> None:
    custody = local_key(tmp_path, "ed25519")
    first = ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "minisign")).stdout
    assert first == ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "minisign")).stdout
    assert first.startswith("untrusted comment: minisign public key ")
    pem = ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "pem")).stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    data = tmp_path / "f"
    data.write_bytes(b"x")
    for args, expected in (
        (["sign", "--key", custody.uri, "--format", "minisign", "--namespace", "git", data], "--namespace applies"),
        (["sign", "--key", custody.uri, "--format", "minisign", "--digest", "sha256", data], "--digest apply"),
        (["keys", "export", "--key", custody.uri, "--format", "minisign", "--principal", "a"], "--format ssh only"),
        (["verify", "--format", "minisign", "--cert", data, data], "no signature given"),
    ):
        result = run_keyseal(*args)
        assert_one_line_error(result)
        assert expected in result.stderr, result.stderr
    legacy = tmp_path / "f.minisig"
    pub = tmp_path / "k.pub"
    pub.write_text(first)
    kid = base64.b64decode(first.splitlines()[1])[2:10]
    legacy.write_text("untrusted comment: x\n" + base64.b64encode(b"Ed" + kid + bytes(64)).decode()
                      + "\ntrusted comment: t\n" + base64.b64encode(bytes(64)).decode() + "\n")
    refused = run_keyseal("verify", "--format", "minisign", "--cert", pub, data)
    assert_one_line_error(refused)
    assert "legacy minisign signature" in refused.stderr
