"""`keyseal iam-policy`: the least-privilege IAM policy for one key and one use."""

from __future__ import annotations

import json

import click


@click.command("iam-policy")
@click.option("--key", "key_arn", required=True, metavar="ARN", help="The KMS key ARN.")
@click.option("--for", "purpose", type=click.Choice(["sign", "wrap"]), required=True,
              help="sign: kms:Sign + kms:GetPublicKey; wrap: kms:Encrypt + kms:Decrypt.")
def iam_policy(key_arn: str, purpose: str) -> None:
    """Print the IAM policy JSON that allows exactly what keyseal needs on that key."""
    from keyseal.iam import least_privilege_policy

    click.echo(json.dumps(least_privilege_policy(key_arn, purpose), indent=2))
