"""Keyless CI signing end to end: `keyseal iam-policy --trust` writes a role's trust policy, the role is created in
the AWS peer (moto's IAM and STS on 127.0.0.1), a CI job's OIDC token (a JWT this test signs as the provider)
is exchanged by boto3's own web-identity provider (`AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`), and
`keyseal sign` signs through KMS with the role's temporary credentials: no access key in the job's environment.

moto does not evaluate trust policies or check token signatures, so the conditions the printed policy holds are
evaluated here, with IAM's StringEquals / StringLike semantics, against the claims of the job's token and of
tokens from other repositories, refs and audiences."""

from __future__ import annotations

import base64
import fnmatch
import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import REGION, assert_one_line_error, run_keyseal, sqv_verify
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

GITHUB = "token.actions.githubusercontent.com"
SUBJECT = "repo:example/tool:ref:refs/tags/v1.4.0"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ci_token(issuer_key: rsa.RSAPrivateKey, **claims: Any) -> str:
    """A JWT as GitHub Actions issues it to a job (RS256, the provider's key)."""
    now = int(time.time())
    body = {"iss": f"https://{GITHUB}", "aud": "sts.amazonaws.com", "sub": SUBJECT, "iat": now, "nbf": now,
            "exp": now + 300, "repository": "example/tool", "ref": "refs/tags/v1.4.0", **claims}
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "ci"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = issuer_key.sign(f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{payload}.{_b64(signature)}"


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return loaded


def admits(policy: dict[str, Any], provider_host: str, claims: dict[str, Any]) -> bool:
    """IAM's evaluation of the trust statement's conditions for a web identity token's claims: every operator's
    every key must match (StringEquals exactly, StringLike with `*` and `?` globbing)."""
    (statement,) = policy["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Principal"]["Federated"].endswith(f":oidc-provider/{provider_host}")
    for operator, tests in statement["Condition"].items():
        for key, expected in tests.items():
            host, _, claim = key.rpartition(":")
            assert host == provider_host, key
            value = str(claims.get(claim, ""))
            if operator == "StringEquals":
                if value != expected:
                    return False
            elif operator == "StringLike":
                if not fnmatch.fnmatchcase(value, expected.replace("[", "[[]")):
                    return False
            else:
                raise AssertionError(f"unexpected condition operator {operator}")
    return True


def print_policy(key_arn: str, *args: str) -> dict[str, Any]:
    result = run_keyseal("iam-policy", "--for", "sign", "--key", key_arn, *args)
    assert result.returncode == 0, result.stderr
    printed: dict[str, Any] = json.loads(result.stdout)
    return printed


@pytest.fixture
def signing_key(kms_client: Any) -> str:
    created = kms_client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    arn: str = created["KeyMetadata"]["Arn"]
    return arn


def test_ci_job_signs_with_role_credentials_only(aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                                 signing_key: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    policies = print_policy(signing_key, "--trust", "github:example/tool@refs/tags/v*")
    trust, permissions = policies["TrustPolicy"], policies["PermissionPolicy"]
    assert permissions["Statement"][0]["Action"] == ["kms:Sign", "kms:GetPublicKey"]
    assert permissions["Statement"][0]["Resource"] == signing_key

    # The account's side, done once by an administrator: the OIDC provider and the role, with keyseal's policies.
    iam = boto3.client("iam", region_name=REGION, endpoint_url=kms_emulator.endpoint)
    iam.create_open_id_connect_provider(Url=f"https://{GITHUB}", ClientIDList=["sts.amazonaws.com"],
                                        ThumbprintList=["0" * 40])
    role = iam.create_role(RoleName="release-signer", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    iam.put_role_policy(RoleName="release-signer", PolicyName="sign", PolicyDocument=json.dumps(permissions))
    assert json.loads(json.dumps(iam.get_role(RoleName="release-signer")["Role"]["AssumeRolePolicyDocument"])) \
        == trust

    # The certificate is minted once, by the key's administrator (standing credentials, outside CI).
    cert = tmp_path / "release.asc"
    minted = run_keyseal("keys", "mint", "--key", f"awskms:{signing_key}", "--name", "Tool Releases",
                         "--email", "releases@example.org", "-o", cert)
    assert minted.returncode == 0, minted.stderr

    # The CI job: a token file, the role's ARN, and no AWS secret anywhere in its environment.
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = ci_token(issuer_key)
    assert admits(trust, GITHUB, claims_of(token))
    token_file = tmp_path / "ci-token"
    token_file.write_text(token)
    artifact = tmp_path / "tool-1.4.0.tar.gz"
    artifact.write_bytes(b"release bytes\n" * 100)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    job_env = {"AWS_ROLE_ARN": role["Arn"], "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
               "AWS_ROLE_SESSION_NAME": "ci-release"}
    kms_emulator.calls.clear()
    signed = run_keyseal("sign", "--key", f"awskms:{signing_key}", "--cert", cert, artifact, env=job_env)
    assert signed.returncode == 0, signed.stderr

    # KMS saw the job's calls signed with the role's temporary credentials (STS's ASIA... keys), not a stored key.
    signers = {key for operation, key in kms_emulator.calls.callers if operation == "Sign"}
    assert signers and all(key.startswith("ASIA") for key in signers), kms_emulator.calls.callers
    assert sqv_verify(cert, artifact.with_name(artifact.name + ".asc"), artifact).returncode == 0
    verified = run_keyseal("verify", "--cert", cert, artifact)
    assert verified.returncode == 0, verified.stderr


def test_trust_policy_admits_only_the_named_repository_and_refs(signing_key: str) -> None:
    trust = print_policy(signing_key, "--trust", "github:example/tool@refs/tags/v*")["TrustPolicy"]
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = claims_of(ci_token(issuer_key))
    assert admits(trust, GITHUB, good)
    for sub in ("repo:example/tool-fork:ref:refs/tags/v1.4.0", "repo:other/tool:ref:refs/tags/v1.4.0",
                "repo:example/tool:ref:refs/heads/main", "repo:example/tool:pull_request",
                "repo:example/tool:ref:refs/tags/x1", "repo:example/tool:environment:release"):
        assert not admits(trust, GITHUB, {**good, "sub": sub}), sub
    assert not admits(trust, GITHUB, {**good, "aud": "https://github.com/example"})


def test_exact_refs_use_string_equals_and_gitlab_spells_its_own_claims(signing_key: str) -> None:
    github = print_policy(signing_key, "--trust", "github:example/tool@environment:release")["TrustPolicy"]
    condition = github["Statement"][0]["Condition"]
    assert condition == {"StringEquals": {f"{GITHUB}:aud": "sts.amazonaws.com",
                                          f"{GITHUB}:sub": "repo:example/tool:environment:release"}}

    gitlab = print_policy(signing_key, "--trust", "gitlab:group/sub/project@branch:main",
                          "--issuer", "https://gitlab.example.org")["TrustPolicy"]
    statement = gitlab["Statement"][0]
    assert statement["Principal"]["Federated"] == \
        f"arn:aws:iam::{signing_key.split(':')[4]}:oidc-provider/gitlab.example.org"
    assert statement["Condition"] == {"StringEquals": {
        "gitlab.example.org:aud": "https://gitlab.example.org",
        "gitlab.example.org:sub": "project_path:group/sub/project:ref_type:branch:ref:main"}}
    claims = {"aud": "https://gitlab.example.org", "sub": "project_path:group/sub/project:ref_type:branch:ref:main"}
    assert admits(gitlab, "gitlab.example.org", claims)
    assert not admits(gitlab, "gitlab.example.org",
                      {**claims, "sub": "project_path:group/sub/project:ref_type:branch:ref:feature"})

    tags = print_policy(signing_key, "--trust", "gitlab:group/project")["TrustPolicy"]
    assert tags["Statement"][0]["Condition"]["StringLike"] == {
        "gitlab.com:sub": "project_path:group/project:ref_type:tag:ref:*"}


@pytest.mark.parametrize("spec", [
    "github:example/*", "github:*/tool", "github:example/tool?", "github:example", "gitlab:group/*",
    "gitlab:*", "github:example/tool@*", "github:example/tool@v*", "github:example/tool@refs/tags/v:1",
    "gitlab:group/project@mr:1", "bitbucket:example/tool", "github:example/tool@environment:*",
])
def test_specs_that_could_admit_another_project_are_refused(signing_key: str, spec: str) -> None:
    result = run_keyseal("iam-policy", "--for", "sign", "--key", signing_key, "--trust", spec)
    assert_one_line_error(result)
    assert result.stdout == ""


def test_trust_is_for_signing_roles_only(signing_key: str) -> None:
    result = run_keyseal("iam-policy", "--for", "wrap", "--key", signing_key, "--trust", "github:example/tool")
    assert_one_line_error(result)
    assert "--for sign" in result.stderr
