"""`keyseal iam-policy`: the least-privilege IAM policy for one key and one use, or for a CA server that keeps
its keys in KMS."""

from __future__ import annotations

import json

import click

from keyseal.errors import UsageError


@click.command("iam-policy")
@click.option("--key", "key_arn", metavar="ARN", help="The KMS key ARN (sign, wrap).")
@click.option("--for", "purpose", type=click.Choice(["sign", "wrap", "ca-server"]), required=True,
              help="sign: kms:Sign + kms:GetPublicKey; wrap: kms:Encrypt + kms:Decrypt; ca-server: a trust-domain "
                   "server in custody kms (creates, tags, uses and tidies its own CA keys).")
@click.option("--trust-domain", metavar="NAME", help="ca-server: the server's trustDomain.")
@click.option("--alias-prefix", metavar="PREFIX",
              help="ca-server: the server's aws.keyManager.aliasPrefix (default: keyseal/<trust domain>).")
def iam_policy(key_arn: str | None, purpose: str, trust_domain: str | None, alias_prefix: str | None) -> None:
    """Print the IAM policy JSON that allows exactly what keyseal needs."""
    from keyseal import iam

    if purpose == "ca-server":
        if not trust_domain:
            raise UsageError("--for ca-server needs --trust-domain (the server's trustDomain)")
        from keyseal.ca.config import default_alias_prefix
        from keyseal.ca.spiffeid import check_trust_domain

        check_trust_domain(trust_domain)
        policy = iam.ca_server_policy(trust_domain, alias_prefix or default_alias_prefix(trust_domain))
    else:
        if not key_arn:
            raise UsageError(f"--for {purpose} needs --key ARN")
        policy = iam.least_privilege_policy(key_arn, purpose)
    click.echo(json.dumps(policy, indent=2))
