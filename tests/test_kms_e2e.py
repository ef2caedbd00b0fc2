"""KMS keys end to end through the CLI (child processes, as a user runs them) against the moto KMS server.

keys create --kms -> keys mint -> gpg --import -> keyseal sign -> gpg, sqv and keyseal verify accept; one
flipped byte -> all reject. Remote call counts are read on the server side, so they hold for child processes.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from keyseal._internal.providers.aws.iam import ca_server_policy, least_privilege_policy
from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.harness.kms_emulator import KmsEmulator
from tests.openpgp_checks import assert_accepted_everywhere, flip_byte, gpg_accepts, pgpy_accepts, sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

KMS_TYPES = ["rsa2048", "rsa3072", "rsa4096", "p256", "p384", "p521"]
UID = ("--name", "Release Signing", "--email", "release@example.org")


def create_kms_key(alias: str, key_type: str) -> str:
    """`keyseal keys create --kms`; returns the awskms: URI it prints."""
    created = run_keyseal("keys", "create", "--kms", "--alias", alias, "--type", key_type)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.split()
    assert lines[0].startswith("arn:aws:kms:") and lines[1] == f"awskms:{lines[0]}", created.stdout
    return lines[1]


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("key_type", KMS_TYPES)
def test_kms_key_end_to_end(key_type: str, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                            tmp_path: Path, gpg: Gpg) -> None:
    alias = f"alias/e2e/{key_type}"
    uri = create_kms_key(alias, key_type)
    assert kms_emulator.calls.counts()["CreateKey"] == 1

    # mint = 1 GetPublicKey (+ <= 1 DescribeKey) + 1 Sign
    cert = tmp_path / "release.cert.asc"
    kms_emulator.calls.clear()
    minted = run_keyseal("keys", "mint", "--key", f"awskms:{alias}", *UID, "-o", cert)
    assert minted.returncode == 0, minted.stderr
    fingerprint = minted.stdout.strip()
    counts = kms_emulator.calls.counts()
    assert counts["GetPublicKey"] == 1 and counts["Sign"] == 1 and counts["DescribeKey"] <= 1, counts
    assert set(counts) <= {"GetPublicKey", "Sign", "DescribeKey"}, counts

    # signing N files = N Sign and <= 1 GetPublicKey (the certificate names the issuer: no DescribeKey)
    files = []
    for index in range(3):
        data = tmp_path / f"release-{index}.tar.gz"
        data.write_bytes(f"release {key_type} payload {index}\n".encode() * 500)
        files.append(data)
    kms_emulator.calls.clear()
    signed = run_keyseal("sign", "--key", uri, "--cert", cert, *files)
    assert signed.returncode == 0, signed.stderr
    counts = kms_emulator.calls.counts()
    assert counts["Sign"] == len(files) and counts["GetPublicKey"] <= 1 and counts["DescribeKey"] == 0, counts

    kms_emulator.calls.clear()
    for data in files:
        assert_accepted_everywhere(gpg, cert, data, data.with_name(data.name + ".asc"), fingerprint)
    assert pgpy_accepts(cert, files[0], files[0].with_name(files[0].name + ".asc"))
    assert kms_emulator.calls.calls == []  # verify = 0 KMS calls

    # One flipped byte in the data, then in the (binary) signature: every verifier rejects.
    data, sig = files[0], files[0].with_name(files[0].name + ".asc")
    bad_data = flip_byte(data, 100, tmp_path / "tampered.tar.gz")
    bad_sig = tmp_path / "tampered.tar.gz.asc"
    bad_sig.write_bytes(sig.read_bytes())
    assert not gpg_accepts(gpg, cert, bad_data, bad_sig)
    assert not sqv_accepts(cert, bad_data, bad_sig)
    assert run_keyseal("verify", "--cert", cert, bad_data, bad_sig).returncode == 1

    binary = run_keyseal("sign", "--key", uri, "--cert", cert, "--binary", data)
    assert binary.returncode == 0, binary.stderr
    raw_sig = data.with_name(data.name + ".sig")
    size = len(raw_sig.read_bytes())
    for index in (size - 1, size - 3):  # inside the signature value itself
        broken = flip_byte(raw_sig, index, tmp_path / f"broken-{index}.sig")
        assert not gpg_accepts(gpg, cert, data, broken)
        assert not sqv_accepts(cert, data, broken)
        result = run_keyseal("verify", "--cert", cert, data, broken)
        assert result.returncode == 1 and "Traceback" not in result.stderr


def test_signer_role_mints_with_created(aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A role with only kms:Sign + kms:GetPublicKey: mint asks for --created, then gives the same fingerprint."""
    alias = "alias/e2e/signer-role"
    create_kms_key(alias, "p256")
    reference = run_keyseal("keys", "mint", "--key", f"awskms:{alias}", *UID, "-o", tmp_path / "ref.asc")
    assert reference.returncode == 0, reference.stderr
    created = kms_emulator_creation_time(kms_emulator, alias)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAE2ESIGNERONLY")
    kms_emulator.deny("AKIAE2ESIGNERONLY", "DescribeKey")
    out = tmp_path / "cert.asc"
    refused = run_keyseal("keys", "mint", "--key", f"awskms:{alias}", *UID, "-o", out)
    assert_one_line_error(refused)
    assert "kms:DescribeKey" in refused.stderr and "--created" in refused.stderr
    assert not out.exists()

    minted = run_keyseal("keys", "mint", "--key", f"awskms:{alias}", *UID, "--created", created, "-o", out)
    assert minted.returncode == 0, minted.stderr
    assert minted.stdout.strip() == reference.stdout.strip()  # same key packet (ECDSA signatures differ)


def kms_emulator_creation_time(kms_emulator: KmsEmulator, alias: str) -> str:
    import boto3  # test setup, outside keyseal

    client = boto3.client("kms", endpoint_url=kms_emulator.endpoint)
    created = client.describe_key(KeyId=alias)["KeyMetadata"]["CreationDate"]
    return str(created.strftime("%Y-%m-%dT%H:%M:%SZ"))


# -- bad input: one line, non-zero exit, no traceback, nothing written ------------------------------------


@pytest.fixture
def signing_setup(aws_env: dict[str, str], tmp_path: Path) -> tuple[str, Path, Path]:
    """A P-256 KMS key with its certificate, and a data file, in a directory of their own."""
    alias = f"alias/e2e/errors-{tmp_path.name}"
    uri = create_kms_key(alias, "p256")
    keydir = tmp_path / "key"
    keydir.mkdir()
    cert = keydir / "cert.asc"
    assert run_keyseal("keys", "mint", "--key", uri, *UID, "-o", cert).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    data = work / "f.tar.gz"
    data.write_bytes(b"payload")
    return uri, cert, data


def assert_nothing_written(data: Path) -> None:
    assert listing(data.parent) == {data.name}


def test_unknown_uri_scheme(aws_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "cert.asc"
    result = run_keyseal("keys", "mint", "--key", "gcpkms:projects/p/keys/k", *UID, "-o", out)
    assert_one_line_error(result)
    assert "unknown key URI scheme 'gcpkms'" in result.stderr
    assert listing(tmp_path) == set()


def test_bad_awskms_reference(aws_env: dict[str, str], kms_emulator: KmsEmulator, tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", "awskms:my key", data)
    assert_one_line_error(result)
    assert "invalid AWS KMS key reference" in result.stderr
    assert_nothing_written(data)
    assert kms_emulator.calls.calls == []


def test_unreachable_endpoint(signing_setup: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    uri, cert, data = signing_setup
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("KEYSEAL_KMS_CONNECT_TIMEOUT", "1")
    endpoint = closed_port_url()
    for extra in (["--kms-endpoint", endpoint], []):
        if not extra:
            monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
        result = run_keyseal("sign", "--key", uri, "--cert", cert, *extra, data)
        assert_one_line_error(result)
        assert endpoint in result.stderr and "cannot reach AWS KMS" in result.stderr
        assert_nothing_written(data)


def test_access_denied(signing_setup: tuple[str, Path, Path], kms_emulator: KmsEmulator,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    uri, cert, data = signing_setup
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAE2ENOSIGN")
    kms_emulator.deny("AKIAE2ENOSIGN", "Sign")
    result = run_keyseal("sign", "--key", uri, "--cert", cert, data)
    assert_one_line_error(result)
    assert "kms:Sign" in result.stderr and "AccessDeniedException" in result.stderr
    assert_nothing_written(data)


def test_unknown_key(aws_env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    for ref in ("alias/e2e/never-created", "00000000-0000-0000-0000-000000000000"):
        result = run_keyseal("sign", "--key", f"awskms:{ref}", data)
        assert_one_line_error(result)
        assert ref in result.stderr and "does not exist" in result.stderr
        assert_nothing_written(data)


def test_symmetric_key_for_signing(aws_env: dict[str, str], kms_emulator: KmsEmulator, tmp_path: Path) -> None:
    import boto3

    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    data = tmp_path / "f"
    data.write_bytes(b"x")
    out = tmp_path / "cert.asc"
    commands: list[list[str | Path]] = [
        ["sign", "--key", f"awskms:{key_id}", data],
        ["keys", "mint", "--key", f"awskms:{key_id}", *UID, "-o", out],
    ]
    for args in commands:
        result = run_keyseal(*args)
        assert_one_line_error(result)
        assert "SIGN_VERIFY" in result.stderr
    assert_nothing_written(data)
    assert kms_emulator.calls.counts()["Sign"] == 0


def test_create_alias_conflict(aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    create_kms_key("alias/e2e/taken", "p256")
    kms_emulator.calls.clear()
    result = run_keyseal("keys", "create", "--kms", "--alias", "alias/e2e/taken", "--type", "p384")
    assert_one_line_error(result)
    assert "already exists" in result.stderr
    assert kms_emulator.calls.counts()["CreateKey"] == 0


def test_iam_policy_command(aws_env: dict[str, str]) -> None:
    arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for purpose in ("sign", "wrap"):
        result = run_keyseal("iam-policy", "--key", arn, "--for", purpose)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == least_privilege_policy(arn, purpose)
    refused = run_keyseal("iam-policy", "--key", "arn:aws:kms:us-east-1:123456789012:alias/x", "--for", "sign")
    assert_one_line_error(refused)
    assert "alias" in refused.stderr
    server = run_keyseal("iam-policy", "--for", "ca-server", "--trust-domain", "example.org")
    assert server.returncode == 0, server.stderr
    assert json.loads(server.stdout) == ca_server_policy("example.org", "keyseal/example_org")
    aliases = [s for s in json.loads(server.stdout)["Statement"] if s["Sid"] == "KeysealCaAliases"]
    assert aliases[0]["Resource"] == "arn:aws:kms:*:*:alias/keyseal/example_org/keyset-*"
    assert "ca-server-guard" in server.stderr and "kms:ResourceAliases" in server.stderr
    role = "arn:aws:iam::123456789012:role/keyseal-ca"
    guard = run_keyseal("iam-policy", "--for", "ca-server-guard", "--trust-domain", "example.org", "--ca-role", role)
    assert guard.returncode == 0, guard.stderr
    statements = {s["Sid"]: s for s in json.loads(guard.stdout)["Statement"]}
    aliases_only = statements["KeysealCaAliasesOnlyByTheCa"]
    assert aliases_only["Effect"] == "Deny" and "kms:UpdateAlias" in aliases_only["Action"]
    assert aliases_only["Resource"] == "arn:aws:kms:*:*:alias/keyseal/example_org/*"
    assert aliases_only["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": role}}
    keys_only = statements["KeysealCaKeysOnlyByTheCa"]
    assert keys_only["Condition"]["ForAnyValue:StringLike"] == {"kms:ResourceAliases": "alias/keyseal/example_org/*"}
    assert {"kms:Sign", "kms:UpdateAlias", "kms:ScheduleKeyDeletion"} <= set(keys_only["Action"])
    for wrong in (("--for", "ca-server"), ("--for", "ca-server", "--trust-domain", "Example.ORG"), ("--for", "sign"),
                  ("--for", "ca-server-guard", "--trust-domain", "example.org"),
                  ("--for", "ca-server-guard", "--trust-domain", "example.org", "--ca-role", "keyseal-ca")):
        assert_one_line_error(run_keyseal("iam-policy", *wrong))
