"""k-of-n releases: a release is valid only with good signatures from K distinct keys, here held by independent
custodies (a KMS key in moto's server, a key inside SoftHSM2, a local wrapped key). Each custody signs in its own
"job", the signature files are merged, and keyseal's verdicts are compared with `sqv --signatures K` over the
same keyring for every case."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyseal._internal.openpgp.trust import TrustSet, verify_release
from keyseal.errors import VerificationError
from tests.conftest import assert_one_line_error, run_keyseal
from tests.harness.softhsm import USER_PIN, SoftHsm

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


@dataclass
class Custodies:
    env: dict[str, str]
    kms_uri: str
    kms_cert: Path
    hsm_uri: str
    hsm_cert: Path
    local_uri: str
    local_cert: Path

    @property
    def certs(self) -> list[Path]:
        return [self.kms_cert, self.hsm_cert, self.local_cert]


def keyseal(custodies: Custodies, *args: str | os.PathLike[str]) -> Any:
    result = run_keyseal(*args, env=custodies.env, input=b"")
    return result


@pytest.fixture
def custodies(aws_env: dict[str, str], kms_client: Any, softhsm: SoftHsm, tmp_path: Path) -> Custodies:
    token = f"threshold-{uuid.uuid4().hex[:8]}"  # a token per test: the SoftHSM2 peer is shared by the session
    softhsm.init_token(token)
    env = {**softhsm.env(), "KEYSEAL_PKCS11_MODULE": softhsm.module, "KEYSEAL_PKCS11_PIN": USER_PIN}
    arn = kms_client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    hsm_uri = f"pkcs11:token={token};object=release-hsm"
    created = run_keyseal("keys", "create", "--pkcs11", hsm_uri, "--type", "p256", env=env, input=b"")
    assert created.returncode == 0, created.stderr
    local_key = tmp_path / "local.key"
    created = run_keyseal("keys", "create", "--out", local_key, "--type", "ed25519", env=env)
    assert created.returncode == 0, created.stderr
    result = Custodies(env, f"awskms:{arn}", tmp_path / "kms.asc", hsm_uri, tmp_path / "hsm.asc",
                       f"file:{local_key}", tmp_path / "local.asc")
    for uri, cert, name in ((result.kms_uri, result.kms_cert, "KMS"), (hsm_uri, result.hsm_cert, "HSM"),
                            (result.local_uri, result.local_cert, "Local")):
        minted = run_keyseal("keys", "mint", "--key", uri, "--name", f"{name} Releases", "--email",
                             f"{name.lower()}@example.org", "--created", "2026-01-01T00:00:00Z", "-o", cert,
                             env=env, input=b"")
        assert minted.returncode == 0, minted.stderr
    return result


def sign_job(custodies: Custodies, uri: str, cert: Path, artifact: Path, out: Path) -> Path:
    """One custody's job: its own signature file for the artifact."""
    signed = keyseal(custodies, "sign", "--key", uri, "--cert", cert, "-o", out, artifact)
    assert signed.returncode == 0, signed.stderr
    return out


def sqv_count(keyring: list[Path], threshold: int, signature: Path, data: Path) -> bool:
    args = ["sqv", "--signatures", str(threshold)]
    for cert in keyring:
        args += ["--keyring", str(cert)]
    result = subprocess.run([*args, str(signature), str(data)], capture_output=True, timeout=60, check=False)
    return result.returncode == 0


def keyseal_count(custodies: Custodies, keyring: list[Path], threshold: int, signature: Path,
                  data: Path) -> tuple[bool, str]:
    args: list[str | os.PathLike[str]] = ["verify", "--threshold", str(threshold)]
    for cert in keyring:
        args += ["--cert", cert]
    result = keyseal(custodies, *args, data, signature)
    if result.returncode != 0:
        assert_one_line_error(result)
    return result.returncode == 0, result.stdout


def concatenate(out: Path, *signature_files: Path) -> Path:
    """Signature files joined as binary packets: how a careless merge (or an attacker) could stack them."""
    from keyseal._internal.openpgp.armor import dearmor_or_binary

    out.write_bytes(b"".join(dearmor_or_binary(f.read_bytes()) for f in signature_files))
    return out


def test_two_of_three_custodies(custodies: Custodies, tmp_path: Path) -> None:
    artifact = tmp_path / "tool-2.0.tar.gz"
    artifact.write_bytes(os.urandom(4096))
    kms_sig = sign_job(custodies, custodies.kms_uri, custodies.kms_cert, artifact, tmp_path / "job-kms.asc")
    hsm_sig = sign_job(custodies, custodies.hsm_uri, custodies.hsm_cert, artifact, tmp_path / "job-hsm.asc")
    merged = keyseal(custodies, "signatures", "merge", "--data", artifact, kms_sig, hsm_sig)
    assert merged.returncode == 0, merged.stderr
    both = artifact.with_name(artifact.name + ".asc")

    ok, printed = keyseal_count(custodies, custodies.certs, 2, both, artifact)
    assert ok and sqv_count(custodies.certs, 2, both, artifact)
    fingerprints = printed.split()
    assert len(fingerprints) == 2 and len(set(fingerprints)) == 2
    # Not three: the local custody did not sign. Both verifiers agree.
    assert not keyseal_count(custodies, custodies.certs, 3, both, artifact)[0]
    assert not sqv_count(custodies.certs, 3, both, artifact)

    # One signature is not two.
    assert not keyseal_count(custodies, custodies.certs, 2, kms_sig, artifact)[0]
    assert not sqv_count(custodies.certs, 2, kms_sig, artifact)

    # Two signatures by one key are one key's: the HSM signs twice (a second later, so the packets differ).
    time.sleep(1.1)
    hsm_again = sign_job(custodies, custodies.hsm_uri, custodies.hsm_cert, artifact, tmp_path / "job-hsm-2.asc")
    same_key = concatenate(tmp_path / "same-key.sig", hsm_sig, hsm_again)
    assert not keyseal_count(custodies, custodies.certs, 2, same_key, artifact)[0]
    assert not sqv_count(custodies.certs, 2, same_key, artifact)
    refused = keyseal(custodies, "signatures", "merge", "--data", artifact, "-o", tmp_path / "m.asc", hsm_sig,
                      hsm_again)
    assert_one_line_error(refused)

    # A changed artifact fails both signatures.
    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(artifact.read_bytes()[:-1] + bytes([artifact.read_bytes()[-1] ^ 1]))
    assert not keyseal_count(custodies, custodies.certs, 2, both, tampered)[0]
    assert not sqv_count(custodies.certs, 2, both, tampered)


def test_one_good_and_one_revoked_is_not_two(custodies: Custodies, tmp_path: Path) -> None:
    artifact = tmp_path / "tool-2.1.tar.gz"
    artifact.write_bytes(os.urandom(4096))
    kms_sig = sign_job(custodies, custodies.kms_uri, custodies.kms_cert, artifact, tmp_path / "job-kms.asc")
    hsm_sig = sign_job(custodies, custodies.hsm_uri, custodies.hsm_cert, artifact, tmp_path / "job-hsm.asc")
    both = concatenate(tmp_path / "both.sig", kms_sig, hsm_sig)
    assert keyseal_count(custodies, custodies.certs, 2, both, artifact)[0]

    # The HSM key is revoked as compromised: its signatures no longer count, whenever they were made.
    revoked = tmp_path / "hsm-revoked.asc"
    result = keyseal(custodies, "keys", "revoke", "--key", custodies.hsm_uri, "--cert", custodies.hsm_cert,
                     "--reason", "compromised", "-o", revoked)
    assert result.returncode == 0, result.stderr
    keyring = [custodies.kms_cert, revoked, custodies.local_cert]
    assert not keyseal_count(custodies, keyring, 2, both, artifact)[0]
    assert not sqv_count(keyring, 2, both, artifact)
    assert keyseal_count(custodies, keyring, 1, both, artifact)[0]
    assert sqv_count(keyring, 1, both, artifact)

    # Merging refuses the revoked key's signature: beside the good one it would still count wherever the
    # revocation is not known. Kept only when asked, with a warning.
    merged = tmp_path / "merged.asc"
    refused = keyseal(custodies, "signatures", "merge", "--data", artifact, "--cert", revoked, "-o", merged,
                      kms_sig, hsm_sig)
    assert_one_line_error(refused)
    assert "no longer counts" in refused.stderr and not merged.exists()
    kept = keyseal(custodies, "signatures", "merge", "--data", artifact, "--cert", revoked,
                   "--keep-revoked-signatures", "-o", merged, kms_sig, hsm_sig)
    assert kept.returncode == 0, kept.stderr
    assert "warning: kept the signature by revoked key" in kept.stderr
    assert not keyseal_count(custodies, keyring, 2, merged, artifact)[0]


def test_verify_release_threshold_in_python_and_cli(custodies: Custodies, tmp_path: Path) -> None:
    artifact = tmp_path / "tool-3.0.tar.gz"
    artifact.write_bytes(os.urandom(2048))
    manifest = tmp_path / "SHA256SUMS"
    made = keyseal(custodies, "checksums", artifact, "-o", manifest)
    assert made.returncode == 0, made.stderr
    kms_sig = sign_job(custodies, custodies.kms_uri, custodies.kms_cert, manifest, tmp_path / "kms.asc.part")
    local_sig = sign_job(custodies, custodies.local_uri, custodies.local_cert, manifest,
                         tmp_path / "local.asc.part")
    merged = keyseal(custodies, "signatures", "merge", "--data", manifest, kms_sig, local_sig)
    assert merged.returncode == 0, merged.stderr

    trust = TrustSet.from_files(custodies.certs)
    result = verify_release(manifest, manifest.with_name("SHA256SUMS.asc"), [artifact], trust, threshold=2)
    kms_fpr = _fingerprint(custodies.kms_cert)
    local_fpr = _fingerprint(custodies.local_cert)
    assert set(result.fingerprints) == {kms_fpr, local_fpr}
    with pytest.raises(VerificationError, match="2 signatures by distinct keys are required, found 1"):
        verify_release(manifest, kms_sig, [artifact], trust, threshold=2)

    args: list[str | os.PathLike[str]] = ["verify-release", "--manifest", manifest, "--threshold", "2"]
    for cert in custodies.certs:
        args += ["--cert", cert]
    accepted = keyseal(custodies, *args, artifact)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stderr.count("Good signature on") == 2
    refused = keyseal(custodies, *args[:1], "--sig", kms_sig, *args[1:], artifact)
    assert_one_line_error(refused)
    assert "found 1" in refused.stderr


def _fingerprint(cert: Path) -> str:
    from keyseal._internal.openpgp.cert import load_certificates

    (loaded,) = load_certificates(cert.read_bytes(), str(cert))
    return loaded.fingerprint


def test_threshold_needs_that_many_certificates(custodies: Custodies, tmp_path: Path) -> None:
    artifact = tmp_path / "f"
    artifact.write_bytes(b"x")
    sig = sign_job(custodies, custodies.local_uri, custodies.local_cert, artifact, tmp_path / "f.asc")
    result = keyseal(custodies, "verify", "--threshold", "2", "--cert", custodies.local_cert, artifact, sig)
    assert_one_line_error(result)
    assert "only 1 certificate" in result.stderr
    ssh = keyseal(custodies, "verify", "--format", "ssh", "--threshold", "2", "--cert", custodies.local_cert,
                  artifact, sig)
    assert_one_line_error(ssh)
