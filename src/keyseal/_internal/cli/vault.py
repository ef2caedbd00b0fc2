"""`keyseal vault-policy`: the least-privilege Vault / OpenBao policy (HCL) for one Transit key and one use."""

from __future__ import annotations

import click

__all__ = ["vault_policy"]


@click.command("vault-policy")
@click.option("--key", "key", required=True, metavar="KEY",
              help="The Transit key: hashivault://MOUNT/KEY, or its alias vault:MOUNT/KEY (signing key or KEK alike).")
@click.option("--for", "purpose", type=click.Choice(["sign", "wrap"]), required=True,
              help="sign: read the key + update on sign; wrap: read the key + update on encrypt and decrypt.")
def vault_policy(key: str, purpose: str) -> None:
    """Print the Vault policy (HCL) that allows exactly what keyseal needs on that key.

    Load it with `bao policy write NAME FILE` (or `vault policy write`) and attach it to the token, role or
    Kubernetes auth role keyseal uses.
    """
    from keyseal._internal.providers.vault.policy import policy_hcl
    from keyseal._internal.providers.vault.uri import parse_transit_ref
    from keyseal._internal.wrapping.vault import parse_kek_spec

    ref = parse_kek_spec(key[len("vault:"):]) if key.startswith("vault:") else parse_transit_ref(key)
    click.echo(policy_hcl(ref, purpose), nl=False)
