"""The `awskms:` signer and the shared AWS helpers, against the moto KMS server over HTTP through boto3.

Every signature is verified here with `cryptography` (Prehashed), independently of the backend, so a wrong
emulator or a wrong algorithm choice shows. Remote call counts come from the server side.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from keyseal._internal.audit import unwrap
from keyseal._internal.backends import BackendOptions, HashName, open_signer
from keyseal._internal.backends.awskms import AwsKmsSigner, parse_key_ref
from keyseal._internal.providers.aws.client import kms_client
from keyseal._internal.providers.aws.iam import least_privilege_policy
from keyseal._internal.providers.aws.kms import create_signing_key
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeysealError,
    KeyURIError,
    UnsupportedKeyError,
    UsageError,
)
from keyseal.signer import hash_algorithm
from tests.conftest import REGION
from tests.harness.kms_emulator import KmsEmulator

SPECS = ["RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521"]
EXPECTED_HASHES: dict[str, tuple[str, ...]] = {
    "RSA_2048": ("sha256", "sha384", "sha512"),
    "RSA_3072": ("sha256", "sha384", "sha512"),
    "RSA_4096": ("sha256", "sha384", "sha512"),
    "ECC_NIST_P256": ("sha256",),
    "ECC_NIST_P384": ("sha384",),
    "ECC_NIST_P521": ("sha512",),
}


@dataclass(frozen=True)
class Keys:
    """Keys made once per session by plain boto3 (independently of keyseal)."""

    by_spec: dict[str, dict[str, Any]]  # spec -> KeyMetadata
    alias: str  # alias/NAME of the P-256 key
    alias_arn: str
    symmetric: str  # key id of a SYMMETRIC_DEFAULT key
    rsa_encrypt: str  # key id of an RSA_2048 ENCRYPT_DECRYPT key


def admin_client(endpoint: str) -> Any:
    """A boto3 client for test setup, with its own fixed credentials (never a denied test identity)."""
    return boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
    )


@pytest.fixture(scope="session")
def keys(kms_emulator: KmsEmulator) -> Keys:
    client = admin_client(kms_emulator.endpoint)
    by_spec = {
        spec: client.create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec)["KeyMetadata"] for spec in SPECS
    }
    alias = "alias/test/awskms-p256"
    client.create_alias(AliasName=alias, TargetKeyId=by_spec["ECC_NIST_P256"]["KeyId"])
    alias_arn = by_spec["ECC_NIST_P256"]["Arn"].split(":key/")[0] + ":" + alias
    symmetric = client.create_key()["KeyMetadata"]["KeyId"]
    rsa_encrypt = client.create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="RSA_2048")["KeyMetadata"]["KeyId"]
    return Keys(by_spec, alias, alias_arn, symmetric, rsa_encrypt)


@pytest.fixture
def fast_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small timeouts and retry budget so failure tests stay fast."""
    monkeypatch.setenv("KEYSEAL_KMS_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("KEYSEAL_KMS_READ_TIMEOUT", "1")
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "2")


def server_public_key(kms_emulator: KmsEmulator, key_id: str) -> Any:
    der = admin_client(kms_emulator.endpoint).get_public_key(KeyId=key_id)["PublicKey"]
    return serialization.load_der_public_key(der)


def spki(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def verify(public_key: Any, signature: bytes, digest: bytes, hash_name: HashName) -> None:
    """Independent check of a KMS signature over a digest (raises InvalidSignature if wrong)."""
    prehashed = utils.Prehashed(hash_algorithm(hash_name))
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, digest, padding.PKCS1v15(), prehashed)
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(signature, digest, ec.ECDSA(prehashed))


def one_line(exc: pytest.ExceptionInfo[KeysealError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that completes the handshake (the kernel's backlog) but never answers: a read timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- signing ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_sign_every_key_spec(
    spec: str, keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator
) -> None:
    meta = keys.by_spec[spec]
    signer = open_signer(f"awskms:{meta['Arn']}")
    assert isinstance(unwrap(signer), AwsKmsSigner)  # open_signer wraps every backend for the audit log
    assert signer.supported_hashes() == EXPECTED_HASHES[spec]
    assert signer.key_spec == spec
    expected_public = server_public_key(kms_emulator, meta["KeyId"])
    assert spki(signer.public_key()) == spki(expected_public)
    for hash_name in signer.supported_hashes():
        digest = hashlib.new(hash_name, f"release {spec} {hash_name}".encode()).digest()
        signature = signer.sign_digest(digest, hash_name)
        verify(expected_public, signature, digest, hash_name)
        if spec.startswith("RSA"):
            assert len(signature) == int(spec.split("_")[1]) // 8  # raw PKCS#1 v1.5, not DER
        else:
            utils.decode_dss_signature(signature)  # DER Ecdsa-Sig-Value
        with pytest.raises(InvalidSignature):
            verify(expected_public, signature, hashlib.new(hash_name, b"other").digest(), hash_name)
    counts = kms_emulator.calls.counts()
    assert counts["GetPublicKey"] == 2  # one by the signer, one by this test's independent check
    assert counts["Sign"] == len(EXPECTED_HASHES[spec])


def test_get_public_key_once_for_many_signs(
    keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator
) -> None:
    signer = open_signer(f"awskms:{keys.alias}")
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:  # concurrent first use must still fetch the key once
        signatures = list(pool.map(lambda d: signer.sign_digest(d, "sha256"), digests))
    signer.public_key()
    signer.supported_hashes()
    public = server_public_key(kms_emulator, keys.alias)
    for digest, signature in zip(digests, signatures, strict=True):
        verify(public, signature, digest, "sha256")
    counts = kms_emulator.calls.counts()
    assert counts["Sign"] == 12
    assert counts["GetPublicKey"] == 2  # the signer's one + the test's own
    assert counts["DescribeKey"] == 0


@pytest.mark.slow
def test_every_reference_form(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    meta = keys.by_spec["ECC_NIST_P256"]
    public = server_public_key(kms_emulator, meta["KeyId"])
    digest = hashlib.sha256(b"forms").digest()
    for ref in (meta["KeyId"], meta["Arn"], keys.alias, keys.alias_arn):
        signer = open_signer(f"awskms:{ref}")
        assert spki(signer.public_key()) == spki(public), ref
        verify(public, signer.sign_digest(digest, "sha256"), digest, "sha256")


def test_reference_parsing() -> None:
    assert parse_key_ref("1234abcd-12ab-34cd-56ef-1234567890ab").kind == "key-id"
    assert parse_key_ref("mrk-1234abcd12ab34cd56ef1234567890ab").kind == "key-id"
    arn = parse_key_ref("arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab")
    assert (arn.kind, arn.region) == ("key-arn", "eu-west-3")
    gov = parse_key_ref("arn:aws-us-gov:kms:us-gov-west-1:111122223333:alias/release/signing")
    assert (gov.kind, gov.region) == ("alias-arn", "us-gov-west-1")
    assert parse_key_ref("alias/release-signing_1").kind == "alias"


@pytest.mark.parametrize(
    "uri",
    [
        "awskms:not-a-key",
        "awskms:alias/",
        "awskms:alias/has space",
        "awskms:1234abcd-12ab-34cd-56ef",
        "awskms:arn:aws:kms:us-east-1:123:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "awskms:arn:aws:s3:::bucket",
        "awskms:arn:aws:kms:us-east-1:111122223333:key/alias/x",
    ],
)
def test_bad_reference_syntax(uri: str, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    with pytest.raises(KeyURIError) as exc:
        open_signer(uri)
    message = one_line(exc)
    assert uri.split(":", 1)[1] in message and "alias/NAME" in message
    assert kms_emulator.calls.calls == []


def test_explicit_endpoint_without_env(
    keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_KMS")
    assert kms_client().meta.endpoint_url == f"https://kms.{REGION}.amazonaws.com"  # no call is made
    meta = keys.by_spec["ECC_NIST_P384"]
    signer = open_signer(f"awskms:{meta['Arn']}", BackendOptions(kms_endpoint=kms_emulator.endpoint))
    digest = hashlib.sha384(b"explicit").digest()
    signature = signer.sign_digest(digest, "sha384")
    verify(server_public_key(kms_emulator, meta["KeyId"]), signature, digest, "sha384")
    assert kms_emulator.calls.counts()["Sign"] == 1


def test_generic_endpoint_env_and_region_from_arn(
    keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3's own AWS_ENDPOINT_URL handling is used; a key ARN supplies the region when none is set."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_KMS")
    monkeypatch.setenv("AWS_ENDPOINT_URL", kms_emulator.endpoint)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    meta = keys.by_spec["ECC_NIST_P256"]
    digest = hashlib.sha256(b"generic").digest()
    signature = open_signer(f"awskms:{meta['Arn']}").sign_digest(digest, "sha256")
    verify(server_public_key(kms_emulator, meta["KeyId"]), signature, digest, "sha256")
    with pytest.raises(UsageError) as exc:
        open_signer(f"awskms:{keys.alias}").public_key()
    assert "AWS_REGION" in one_line(exc)


def test_aws_region_env_is_honoured(
    keys: Keys, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI runners often set only AWS_REGION, which boto3 itself ignores."""
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    signer = open_signer(f"awskms:{keys.alias}")
    assert signer.supported_hashes() == ("sha256",)


def test_created_at_from_describe_key(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    meta = keys.by_spec["RSA_2048"]
    signer = open_signer(f"awskms:{meta['Arn']}")
    created = signer.created_at()
    assert created is not None and created.tzinfo is not None
    assert created == meta["CreationDate"].astimezone(UTC)
    assert abs(datetime.now(UTC) - created) < timedelta(hours=1)
    assert signer.created_at() == created
    assert kms_emulator.calls.counts()["DescribeKey"] == 1  # cached


def test_imports_stay_light() -> None:
    code = (
        "import sys, keyseal, keyseal._internal.backends, keyseal._internal.providers.aws.client\n"
        "import keyseal._internal.providers.aws.iam, keyseal._internal.backends.awskms\n"
        "heavy = [m for m in ('boto3', 'botocore') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- errors -----------------------------------------------------------------------------------------------


def test_unreachable_endpoint(keys: Keys, aws_env: dict[str, str], fast_failures: None,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as exc:
        open_signer(f"awskms:{keys.alias}").public_key()
    message = one_line(exc)
    assert endpoint in message and "GetPublicKey" in message and keys.alias in message
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_read_timeout(keys: Keys, aws_env: dict[str, str], fast_failures: None, silent_server: str,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_READ_TIMEOUT", "0.3")
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "1")
    signer = open_signer(f"awskms:{keys.alias}", BackendOptions(kms_endpoint=silent_server))
    with pytest.raises(BackendUnavailableError) as exc:
        signer.public_key()
    message = one_line(exc)
    assert "timed out" in message and "KEYSEAL_KMS_READ_TIMEOUT" in message and "GetPublicKey" in message


@pytest.mark.parametrize("name", ["KEYSEAL_KMS_READ_TIMEOUT", "KEYSEAL_KMS_MAX_ATTEMPTS"])
def test_bad_setting(name: str, keys: Keys, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "soon")
    with pytest.raises(UsageError) as exc:
        open_signer(f"awskms:{keys.alias}").public_key()
    assert name in one_line(exc)


def test_access_denied_on_sign(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTNOSIGN")
    kms_emulator.deny("AKIATESTNOSIGN", "Sign")
    signer = open_signer(f"awskms:{keys.alias}")
    signer.public_key()  # still allowed
    with pytest.raises(AccessDeniedError) as exc:
        signer.sign_digest(hashlib.sha256(b"x").digest(), "sha256")
    message = one_line(exc)
    assert "kms:Sign" in message and keys.alias in message and "AccessDeniedException" in message
    assert kms_emulator.calls.counts()["Sign"] == 1  # a denial is not retried


def test_access_denied_on_get_public_key(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTNOGPK")
    kms_emulator.deny("AKIATESTNOGPK", "GetPublicKey")
    signer = open_signer(f"awskms:{keys.alias}")
    with pytest.raises(AccessDeniedError) as exc:
        signer.sign_digest(hashlib.sha256(b"x").digest(), "sha256")
    message = one_line(exc)
    assert "kms:GetPublicKey" in message and keys.alias in message
    assert kms_emulator.calls.counts()["Sign"] == 0


def test_describe_key_denied_asks_for_created(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTSIGNERONLY")
    kms_emulator.deny("AKIATESTSIGNERONLY", "DescribeKey")
    signer = open_signer(f"awskms:{keys.alias}")
    digest = hashlib.sha256(b"signer role").digest()
    signer.sign_digest(digest, "sha256")  # Sign + GetPublicKey suffice to sign
    with pytest.raises(AccessDeniedError) as exc:
        signer.created_at()
    message = one_line(exc)
    assert "kms:DescribeKey" in message and "--created" in message and "keyseal keys mint" in message


def test_no_credentials(keys: Keys, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDeniedError) as exc:
        open_signer(f"awskms:{keys.alias}").public_key()
    message = one_line(exc)
    assert "credentials" in message and "AWS_ROLE_ARN" in message


@pytest.mark.parametrize("ref", ["00000000-0000-0000-0000-000000000000", "alias/test/does-not-exist"])
def test_unknown_key(ref: str, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    with pytest.raises(KeyNotFoundError) as exc:
        open_signer(f"awskms:{ref}").public_key()
    message = one_line(exc)
    assert ref in message and "does not exist" in message


@pytest.mark.slow
@pytest.mark.parametrize("which", ["symmetric", "rsa_encrypt"])
def test_key_that_cannot_sign(
    which: str, keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator
) -> None:
    ref = getattr(keys, which)
    signer = open_signer(f"awskms:{ref}")
    with pytest.raises(UnsupportedKeyError) as exc:
        signer.sign_digest(hashlib.sha256(b"x").digest(), "sha256")
    message = one_line(exc)
    assert ref in message and "SIGN_VERIFY" in message
    assert kms_emulator.calls.counts()["Sign"] == 0


@pytest.mark.parametrize("hash_name", ["sha256", "sha512"])
def test_p384_refuses_other_hashes(hash_name: HashName, keys: Keys, aws_env: dict[str, str],
                                   kms_emulator: KmsEmulator) -> None:
    signer = open_signer(f"awskms:{keys.by_spec['ECC_NIST_P384']['KeyId']}")
    with pytest.raises(UnsupportedKeyError) as exc:
        signer.sign_digest(hashlib.new(hash_name, b"x").digest(), hash_name)
    message = one_line(exc)
    assert hash_name in message and "sha384" in message and "ECC_NIST_P384" in message
    assert kms_emulator.calls.counts()["Sign"] == 0  # refused before any Sign: no silent substitution


@pytest.mark.slow
def test_wrong_digest_length(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    signer = open_signer(f"awskms:{keys.alias}")
    with pytest.raises(UsageError):
        signer.sign_digest(b"short", "sha256")
    assert kms_emulator.calls.counts()["Sign"] == 0


@pytest.mark.slow
def test_throttling_is_retried(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "3")
    signer = open_signer(f"awskms:{keys.alias}")
    signer.public_key()
    kms_emulator.fail("Sign", times=2)
    digest = hashlib.sha256(b"busy").digest()
    verify(signer.public_key(), signer.sign_digest(digest, "sha256"), digest, "sha256")
    assert kms_emulator.calls.counts()["Sign"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(("code", "status"), [("ThrottlingException", 400), ("KMSInternalException", 500)])
def test_still_failing_after_retries(code: str, status: int, keys: Keys, aws_env: dict[str, str],
                                     kms_emulator: KmsEmulator, fast_failures: None) -> None:
    signer = open_signer(f"awskms:{keys.alias}")
    signer.public_key()
    kms_emulator.fail("Sign", times=10, code=code, status=status)
    with pytest.raises(BackendUnavailableError) as exc:
        signer.sign_digest(hashlib.sha256(b"busy").digest(), "sha256")
    message = one_line(exc)
    assert code in message and "retries" in message and "KEYSEAL_KMS_MAX_ATTEMPTS" in message
    assert kms_emulator.calls.counts()["Sign"] == 2


@pytest.mark.slow
def test_web_identity_credentials(keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The keyless CI path: boto3 exchanges an OIDC token for role credentials at STS, then signs."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvOmtleXNlYWwifQ.c2lnbmF0dXJl")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/release-signer")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    signer = open_signer(f"awskms:{keys.alias}")
    digest = hashlib.sha256(b"keyless").digest()
    signature = signer.sign_digest(digest, "sha256")
    verify(server_public_key(kms_emulator, keys.alias), signature, digest, "sha256")
    used = {"Sign", "GetPublicKey"}
    callers = {key for op, key in kms_emulator.calls.callers if op in used and key != "admin"}
    assert len(callers) == 1 and next(iter(callers)).startswith("ASIA")  # temporary credentials from STS

    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "missing-token"))
    with pytest.raises(AccessDeniedError) as exc:
        open_signer(f"awskms:{keys.alias}").public_key()
    assert "missing-token" in one_line(exc)


# -- key creation -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key_type", "spec"),
    [("rsa2048", "RSA_2048"), ("rsa3072", "RSA_3072"), ("rsa4096", "RSA_4096"),
     ("p256", "ECC_NIST_P256"), ("p384", "ECC_NIST_P384"), ("p521", "ECC_NIST_P521")],
)
def test_create_signing_key(
    key_type: str, spec: str, aws_env: dict[str, str], kms_emulator: KmsEmulator
) -> None:
    alias = f"alias/test/create-{key_type}"
    arn = create_signing_key(alias, key_type, None)
    assert arn.startswith(f"arn:aws:kms:{REGION}:") and ":key/" in arn
    meta = admin_client(kms_emulator.endpoint).describe_key(KeyId=alias)["KeyMetadata"]
    assert meta["Arn"] == arn and meta["KeyUsage"] == "SIGN_VERIFY" and meta["KeySpec"] == spec
    signer = open_signer(f"awskms:{alias}")
    hash_name = EXPECTED_HASHES[spec][-1]
    digest = hashlib.new(hash_name, b"new key").digest()
    verify(server_public_key(kms_emulator, arn), signer.sign_digest(digest, hash_name), digest, hash_name)  # type: ignore[arg-type]


def test_create_signing_key_alias_conflict(
    keys: Keys, aws_env: dict[str, str], kms_emulator: KmsEmulator
) -> None:
    with pytest.raises(UsageError) as exc:
        create_signing_key(keys.alias, "p256", kms_emulator.endpoint)
    message = one_line(exc)
    assert keys.alias in message and "already exists" in message
    assert kms_emulator.calls.counts()["CreateKey"] == 0  # checked first: no orphan key


@pytest.mark.parametrize(
    ("alias", "key_type"),
    [("release", "p256"), ("alias/", "p256"), ("alias/aws/release", "p256"), ("alias/has space", "p256"),
     ("alias/ok", "ed25519"), ("alias/ok", "rsa1024")],
)
def test_create_signing_key_bad_input(alias: str, key_type: str, aws_env: dict[str, str],
                                      kms_emulator: KmsEmulator) -> None:
    with pytest.raises(UsageError) as exc:
        create_signing_key(alias, key_type, None)
    one_line(exc)
    assert kms_emulator.calls.calls == []


def test_create_signing_key_alias_failure_schedules_deletion(
    aws_env: dict[str, str], kms_emulator: KmsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTNOALIAS")
    kms_emulator.deny("AKIATESTNOALIAS", "CreateAlias")
    with pytest.raises(AccessDeniedError) as exc:
        create_signing_key("alias/test/no-alias-permission", "p256", None)
    message = one_line(exc)
    assert "kms:CreateAlias" in message and "scheduled for deletion" in message
    arn = message.split("the key ", 1)[1].split(" ", 1)[0]
    meta = admin_client(kms_emulator.endpoint).describe_key(KeyId=arn)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"


# -- IAM policy -------------------------------------------------------------------------------------------

KEY_ARN = "arn:aws:kms:eu-central-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    ("purpose", "actions"),
    [("sign", ["kms:Sign", "kms:GetPublicKey"]), ("wrap", ["kms:Encrypt", "kms:Decrypt"])],
)
def test_least_privilege_policy(purpose: str, actions: list[str]) -> None:
    policy = least_privilege_policy(KEY_ARN, purpose)
    assert json.loads(json.dumps(policy)) == policy
    assert policy["Version"] == "2012-10-17"
    (statement,) = policy["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == actions
    assert statement["Resource"] == KEY_ARN
    assert set(statement) == {"Sid", "Effect", "Action", "Resource"}  # no Condition/NotAction widening


@pytest.mark.parametrize(
    ("key_arn", "purpose", "hint"),
    [
        ("arn:aws:kms:eu-central-1:111122223333:alias/release", "sign", "alias"),
        ("alias/release", "sign", "alias"),
        ("arn:aws:kms:eu-central-1:111122223333:key/*", "sign", "arn:aws:kms:REGION"),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", "wrap", "arn:aws:kms:REGION"),
        (KEY_ARN, "admin", "sign or wrap"),
    ],
)
def test_least_privilege_policy_refuses(key_arn: str, purpose: str, hint: str) -> None:
    with pytest.raises(UsageError) as exc:
        least_privilege_policy(key_arn, purpose)
    assert hint in one_line(exc)
