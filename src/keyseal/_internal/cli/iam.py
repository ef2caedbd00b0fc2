"""`keyseal iam-policy`: the least-privilege IAM policy for one key and one use, or for a CA server that keeps
its keys in KMS."""

from __future__ import annotations

import json

import click

from keyseal.errors import UsageError

__all__ = ["iam_policy"]


@click.command("iam-policy")
@click.option("--key", "key_arn", metavar="ARN", help="The KMS key ARN (sign, wrap).")
@click.option("--for", "purpose", type=click.Choice(["sign", "wrap", "ca-server", "ca-server-guard"]), required=True,
              help="sign: kms:Sign + kms:GetPublicKey; wrap: kms:Encrypt + kms:Decrypt; ca-server: a trust-domain "
                   "server in custody kms (creates, tags, uses and tidies its own CA keys); ca-server-guard: the "
                   "deny statements for everyone else (an SCP or permissions boundary) that keep the CA's aliases "
                   "and keys to its role.")
@click.option("--trust-domain", metavar="NAME", help="ca-server: the server's trustDomain.")
@click.option("--alias-prefix", metavar="PREFIX",
              help="ca-server: the server's aws.keyManager.aliasPrefix (default: keyseal/<trust domain>).")
@click.option("--trust", "trust_spec", metavar="SPEC",
              help="sign: also print the role's trust policy for keyless CI: github:OWNER/REPO[@REF] (REF: "
                   "refs/tags/PATTERN, default refs/tags/*; refs/heads/PATTERN; environment:NAME) or "
                   "gitlab:GROUP/PROJECT[@REF] (REF: tag:PATTERN, default tag:*; branch:PATTERN).")
@click.option("--issuer", metavar="URL",
              help="--trust: the CI provider's OIDC issuer, for self-hosted instances (default: "
                   "https://token.actions.githubusercontent.com, https://gitlab.com).")
@click.option("--audience", metavar="AUD",
              help="--trust: the token audience the job asks for (default: sts.amazonaws.com for GitHub, the "
                   "issuer URL for GitLab).")
@click.option("--ca-role", "ca_role", metavar="ARN", help="ca-server-guard: the IAM role ARN the CA server runs as.")
def iam_policy(key_arn: str | None, purpose: str, trust_domain: str | None, alias_prefix: str | None,
               trust_spec: str | None, issuer: str | None, audience: str | None, ca_role: str | None) -> None:
    """Print the IAM policy JSON that allows exactly what keyseal needs.

    With --trust, print {"TrustPolicy": ..., "PermissionPolicy": ...}: the trust policy of a role that only that
    CI project's OIDC tokens can assume, beside what the role may do."""
    from keyseal._internal.providers.aws import iam

    if trust_spec is None and (issuer or audience):
        raise UsageError("--issuer and --audience apply to --trust only")
    if trust_spec is not None and purpose != "sign":
        raise UsageError("--trust is for --for sign: a CI role that signs releases")

    if purpose in ("ca-server", "ca-server-guard"):
        if not trust_domain:
            raise UsageError(f"--for {purpose} needs --trust-domain (the server's trustDomain)")
        from keyseal._internal.ca.config import default_alias_prefix
        from keyseal._internal.spiffe.ids import check_trust_domain

        check_trust_domain(trust_domain)
        prefix = alias_prefix or default_alias_prefix(trust_domain)
        if purpose == "ca-server-guard":
            if not ca_role:
                raise UsageError("--for ca-server-guard needs --ca-role ARN (the role the CA server runs as)")
            click.echo(json.dumps(iam.ca_alias_guard_policy(prefix, ca_role), indent=2))
            return
        policy = iam.ca_server_policy(trust_domain, prefix)
        click.echo(json.dumps(policy, indent=2))
        click.echo(
            f"# Only the CA's role may create, move or delete aliases under alias/{prefix}/ or use, re-alias or "
            "remove the keys that carry them (kms:ResourceAliases). Deny it to everyone else with an SCP or a "
            f"permissions boundary: keyseal iam-policy --for ca-server-guard --trust-domain {trust_domain} "
            "--ca-role ARN. keyseal also pins each keyset's keys in its store and refuses any other key.",
            err=True)
        return
    if not key_arn:
        raise UsageError(f"--for {purpose} needs --key ARN")
    policy = iam.least_privilege_policy(key_arn, purpose)
    if trust_spec is not None:
        from keyseal._internal.release.ci_trust import parse_ci_subject, web_identity_trust_policy

        subject = parse_ci_subject(trust_spec, issuer, audience)
        policy = {"TrustPolicy": web_identity_trust_policy(key_arn, subject), "PermissionPolicy": policy}
    click.echo(json.dumps(policy, indent=2))
