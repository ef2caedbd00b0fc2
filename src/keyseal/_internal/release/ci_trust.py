"""Trust policies for keyless CI signing: an IAM role that only one CI project's OIDC token can assume.

A CI job that signs a release needs no stored AWS key: the CI provider hands the job a short-lived OIDC token
(GitHub Actions with `permissions: id-token: write`, GitLab CI with `id_tokens:`), and STS exchanges it for the
role's credentials (`sts:AssumeRoleWithWebIdentity`, boto3's `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`).
The role is only as narrow as its trust policy: without a `sub` condition any repository on the provider could
assume it. This module writes that policy from a short spec, with the `aud` and `sub` conditions spelled as each
provider documents them, and refuses specs that would admit another repository. Pure data, no AWS call.

  github:OWNER/REPO[@REF]       REF: refs/tags/PATTERN (default refs/tags/*), refs/heads/PATTERN, environment:NAME
  gitlab:GROUP/PROJECT[@REF]    REF: tag:PATTERN (default tag:*), branch:PATTERN

A `*` in PATTERN matches within the ref (git ref names hold no `:`), never across the repository part. Whether a
tag or branch is protected is the CI provider's setting: the policy can only name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keyseal.errors import UsageError

__all__ = ["CiSubject", "parse_ci_subject", "web_identity_trust_policy"]

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
GITHUB_AUDIENCE = "sts.amazonaws.com"  # what aws-actions/configure-aws-credentials asks GitHub for
GITLAB_ISSUER = "https://gitlab.com"

_GITHUB_OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}")
# What a ref pattern may hold: git ref-name characters and `*` (IAM's StringLike wildcard); no `?`, `:`, spaces.
_REF_PATTERN = re.compile(r"[A-Za-z0-9_./+@-]*\*?[A-Za-z0-9_./+@*-]*")
_ENVIRONMENT = re.compile(r"[A-Za-z0-9_.-][A-Za-z0-9 _.-]{0,254}")


@dataclass(frozen=True)
class CiSubject:
    """Who may assume the role: the provider's token issuer, the audience the job asks for, and the `sub`."""

    provider: str
    issuer: str
    audience: str
    subject: str

    @property
    def issuer_host(self) -> str:
        """The issuer as IAM names its OIDC provider and its condition keys: host and path, no scheme."""
        return self.issuer.removeprefix("https://")


def parse_ci_subject(spec: str, issuer: str | None = None, audience: str | None = None) -> CiSubject:
    """`github:OWNER/REPO[@REF]` or `gitlab:GROUP/PROJECT[@REF]`, checked so that no other project matches."""
    provider, sep, rest = spec.partition(":")
    if not sep or provider not in ("github", "gitlab"):
        raise UsageError(f"--trust {spec[:80]!r}: expected github:OWNER/REPO[@REF] or gitlab:GROUP/PROJECT[@REF]")
    project, at, ref = rest.partition("@")
    if "*" in project or "?" in project:
        raise UsageError(f"--trust {spec[:80]!r}: a wildcard in the repository would let other repositories "
                         f"assume the role; name one repository")
    if provider == "github":
        subject = _github_subject(project, ref if at else "refs/tags/*", spec)
        return CiSubject("github", _issuer(issuer or GITHUB_ISSUER), audience or GITHUB_AUDIENCE, subject)
    subject = _gitlab_subject(project, ref if at else "tag:*", spec)
    chosen_issuer = _issuer(issuer or GITLAB_ISSUER)
    return CiSubject("gitlab", chosen_issuer, audience or chosen_issuer, subject)


def _github_subject(project: str, ref: str, spec: str) -> str:
    owner, slash, repo = project.partition("/")
    if not slash or not _GITHUB_OWNER.fullmatch(owner) or not _NAME.fullmatch(repo) or repo in (".", ".."):
        raise UsageError(f"--trust {spec[:80]!r}: expected github:OWNER/REPO with one owner and one repository")
    if ref.startswith("environment:"):
        name = ref.removeprefix("environment:")
        if not _ENVIRONMENT.fullmatch(name) or "*" in name:
            raise UsageError(f"--trust {spec[:80]!r}: environment:NAME names one GitHub environment")
        return f"repo:{owner}/{repo}:environment:{name}"
    for kind in ("refs/tags/", "refs/heads/"):
        if ref.startswith(kind) and _ref_pattern_ok(ref.removeprefix(kind)):
            return f"repo:{owner}/{repo}:ref:{ref}"
    raise UsageError(f"--trust {spec[:80]!r}: after @ give refs/tags/PATTERN, refs/heads/PATTERN or "
                     f"environment:NAME")


def _gitlab_subject(project: str, ref: str, spec: str) -> str:
    parts = project.split("/")
    if len(parts) < 2 or not all(_NAME.fullmatch(p) and p not in (".", "..") for p in parts):
        raise UsageError(f"--trust {spec[:80]!r}: expected gitlab:GROUP/PROJECT (subgroups allowed)")
    kind, colon, pattern = ref.partition(":")
    if not colon or kind not in ("tag", "branch") or not _ref_pattern_ok(pattern):
        raise UsageError(f"--trust {spec[:80]!r}: after @ give tag:PATTERN or branch:PATTERN")
    return f"project_path:{project}:ref_type:{kind}:ref:{pattern}"


def _ref_pattern_ok(pattern: str) -> bool:
    return bool(pattern) and _REF_PATTERN.fullmatch(pattern) is not None and ".." not in pattern


def _issuer(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or url.endswith("/"):
        raise UsageError(f"--issuer {url[:80]!r}: expected the provider's https:// URL without a trailing slash "
                         f"(e.g. {GITLAB_ISSUER})")
    return url


def web_identity_trust_policy(key_arn: str, subject: CiSubject) -> dict[str, Any]:
    """The role's trust policy: `sts:AssumeRoleWithWebIdentity` through the provider's IAM OIDC provider in the
    key's account, for tokens with exactly this audience and a `sub` matching this project (and ref)."""
    fields = key_arn.split(":")
    if len(fields) < 6 or fields[2] != "kms":
        raise UsageError(f"{key_arn!r} is not a KMS key ARN")
    partition, account = fields[1], fields[4]
    host = subject.issuer_host
    conditions: dict[str, dict[str, str]] = {"StringEquals": {f"{host}:aud": subject.audience}}
    operator = "StringLike" if "*" in subject.subject else "StringEquals"
    conditions.setdefault(operator, {})[f"{host}:sub"] = subject.subject
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "KeysealCiSigner",
                "Effect": "Allow",
                "Principal": {"Federated": f"arn:{partition}:iam::{account}:oidc-provider/{host}"},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": conditions,
            }
        ],
    }
